"""The training's tasks, one per operation of lora_pipeline.train.TrainingRun; the loop that
makes them into task runs is train_adapter, in flows/pipeline.py."""

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from lora_pipeline.run_config import RunConfig
from lora_pipeline.run_folder import RunSummary
from lora_pipeline.settings import TrainSettings
from lora_pipeline.train import TrainingRun

from . import RETRY, sdk_retries_logged
from .fence import Fence

# The run (engine, model, optimizer) is passed between these tasks in memory: it is neither
# hashable for a cache key nor worth persisting, hence NO_CACHE. They are called from the flow,
# not from a task: a task's failure rolls back the transaction of the task it runs in, and
# with it every task that had completed there (shown as RolledBack, results not kept).


@task(name="find-finished-training", cache_policy=NO_CACHE)
def find_finished_training(settings: TrainSettings):
    """The summary of this training if its run folder holds it finished (same data, settings and
    final weights), shown as Cached; else None. The run folder is the training's cache: it is
    named after the data and settings, so every worker that shares the output folder finds it."""
    summary = RunConfig(settings).finished_summary(say=get_run_logger().info)
    if summary is None:
        return None
    return Completed(name="Cached", message=f"already trained: {summary.run_dir}", data=summary)


@task(name="start-training", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def start_training(settings: TrainSettings) -> TrainingRun:
    """Checks the inputs, starts the engine (a Tinker session), makes or continues the run folder."""
    logger = get_run_logger()
    run = TrainingRun(settings).open(say=logger.info)
    logger.info(run.describe())
    return run


@task(name="validate-base", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def validate_base(run: TrainingRun) -> dict | None:
    record = run.validate(0)
    if record:
        get_run_logger().info("held-out loss of the base model: %.4f (perplexity %.2f)",
                              record["val_loss"], record["val_ppl"])
    return record


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
    held_out = next((f", held-out loss {r['val_loss']:.4f}" for r in run.records.val_log if r["step"] == n), "")
    get_run_logger().info("saved checkpoint_step_%d: %s%s", n, path, held_out)
    return path


@task(name="save-final-weights", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def finish_training(run: TrainingRun) -> RunSummary:
    summary = run.finish()
    logger = get_run_logger()
    for entry in summary.checkpoints:
        logger.info("%s (step %d): %s", entry.name, entry.step, entry.path)
    return summary


def backstop_s(run: TrainingRun) -> float | None:
    """A Tinker step's or checkpoint's task timeout: a backstop behind the engine's own
    deadlines (it cannot stop a thread blocked in a socket). Each call is bounded by
    request_timeout; after a failure, a step also replays the steps since the last checkpoint,
    two calls each."""
    return None if run.backend == "local" else (2 * max(run.settings.save_every, 1) + 6) * run.settings.request_timeout


class TrainingProgress:
    """The flow run's progress bar in the UI (an artifact), moved after each step."""

    def __init__(self, run: TrainingRun):
        self.name, self.total = run.run_dir.name, run.total_steps
        self.id = create_progress_artifact(
            100 * (run.first_step - 1) / run.total_steps, key="lora-pipeline-progress",
            description=f"{self.name}: training from step {run.first_step} of {run.total_steps}")

    def show(self, n: int, record: dict) -> None:
        """Never in a step's way: a cut-off API would hold the training up in this call (the
        client retries for minutes) and then fail it, so the fence's last poll decides whether
        to try, and a failure is only logged."""
        fence = Fence.current()
        if fence and not fence.api_answers:
            return
        try:
            update_progress_artifact(self.id, 100 * n / self.total,
                                     description=f"{self.name}: step {n}/{self.total}, loss {record['loss']:.4f}")
        except Exception as e:  # the step is done and logged; its bar can wait
            get_run_logger().warning("progress of step %d not shown: %s", n, e)
