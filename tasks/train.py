from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from lora_pipeline.run_folder import RunSummary
from lora_pipeline.settings import TrainSettings
from lora_pipeline.train import TrainingRun, train

from . import RETRY, sdk_retries_logged, slot_of
from .fence import Fence

# The run (engine, model, optimizer) is passed between these tasks in memory: it is neither
# hashable for a cache key nor worth persisting, hence NO_CACHE. They are called from the flow,
# not from a task: a task's failure rolls back the transaction of the task it runs in, and
# with it every task that had completed there (shown as RolledBack, results not kept).


@task(name="start-training", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def start_training(settings: TrainSettings) -> TrainingRun:
    """Checks the inputs, starts the engine (a Tinker session), makes the run folder."""
    logger = get_run_logger()
    run = TrainingRun(settings).open(say=logger.info)
    logger.info(run.describe())
    return run


@task(name="train-step", task_run_name="step-{n}", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def train_step(run: TrainingRun, n: int) -> dict:
    r = run.step(n)
    get_run_logger().info("step %d/%d  loss %.4f  tokens %d  lr %.2e  %.2f s",
                          n, run.total_steps, r["loss"], r["tokens"], r["lr"], r["time_s"])
    return r


@task(name="save-checkpoint", task_run_name="checkpoint-step-{n}", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def save_checkpoint(run: TrainingRun, n: int) -> str:
    path = run.save_checkpoint(n)
    held_out = next((f", held-out loss {r['val_loss']:.4f}" for r in run.val_log if r["step"] == n), "")
    get_run_logger().info("saved checkpoint_step_%d: %s%s", n, path, held_out)
    return path


@task(name="validate-base", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def validate_base(run: TrainingRun, n: int) -> dict | None:
    record = run.validate(n)
    if record:
        get_run_logger().info("held-out loss of the base model: %.4f (perplexity %.2f)",
                              record["val_loss"], record["val_ppl"])
    return record


@task(name="save-final-weights", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def finish_training(run: TrainingRun) -> RunSummary:
    summary = run.finish()
    logger = get_run_logger()
    for entry in summary.checkpoints:
        logger.info("%s (step %d): %s", entry.name, entry.step, entry.path)
    return summary


@task(name="find-finished-training", cache_policy=NO_CACHE)
def find_finished_training(settings: TrainSettings):
    """The summary of this training if its run folder holds it finished (same data, settings and
    final weights), shown as Cached; else None. The run folder is the training's cache: it is
    named after the data and settings, so every worker that shares the output folder finds it."""
    summary = TrainingRun(settings).trained_before()
    if summary is None:
        return None
    return Completed(name="Cached", message=f"already trained: {summary.run_dir}", data=summary)


def train_adapter(settings: TrainSettings) -> RunSummary:
    """Trains a LoRA from a prepared data file (or finds it trained); returns the run's
    summary. Each part is a task of the flow's own (start, base validation, each step and
    checkpoint, the final weights), so that a retried step leaves the others as they were.
    With `concurrency_limit` set (a sweep's), it waits for a slot of that limit first."""
    summary = find_finished_training(settings, return_state=True).result()
    if summary is not None:
        return summary
    with slot_of(settings.concurrency_limit):
        return _train(settings)


def _train(settings: TrainSettings) -> RunSummary:
    run = start_training(settings)
    # Prefect's task timeout is a backstop behind the engine's own deadlines (it cannot stop a
    # thread blocked in a socket). A step's calls are each bounded by request_timeout; after a
    # failure, a step also replays the steps since the last checkpoint, two calls each.
    backstop = None if run.backend == "local" else \
        (2 * max(run.settings.save_every, 1) + 6) * run.settings.request_timeout
    step = train_step.with_options(timeout_seconds=backstop)
    save = save_checkpoint.with_options(timeout_seconds=backstop)
    fence = Fence.current()

    def fenced(task):
        """`task`, once the fence has said this process may still train."""
        def call(*args):
            if fence:
                fence.check()
            return task(*args)
        return call

    def step_with_progress(run: TrainingRun, n: int) -> dict:
        record = fenced(step)(run, n)
        # A cut-off API would hold the training up in this call (the client retries for
        # minutes), and then fail it; the fence's last poll tells whether to try.
        if fence is None or fence.api_answers:
            try:
                update_progress_artifact(progress, 100 * n / run.total_steps,
                                         description=f"{run.run_dir.name}: step {n}/{run.total_steps}, "
                                                     f"loss {record['loss']:.4f}")
            except Exception as e:  # the step is done and logged; its bar can wait
                get_run_logger().warning("progress of step %d not shown: %s", n, e)
        return record

    progress = create_progress_artifact(
        100 * (run.first_step - 1) / run.total_steps, key="lora-pipeline-progress",
        description=f"{run.run_dir.name}: training from step {run.first_step} of {run.total_steps}")
    summary = train(run, step=step_with_progress, save=fenced(save), finish=fenced(finish_training),
                    validate=validate_base)
    get_run_logger().info("final LoRA weights: %s", summary.final_lora_weights)
    return summary
