from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lora_pipeline.train import TrainConfig, TrainingRun, train


# The run (engine, model, optimizer) is passed between these tasks in memory: it is neither
# hashable for a cache key nor worth persisting, hence NO_CACHE.
@task(name="train-step", task_run_name="step-{n}", cache_policy=NO_CACHE)
def train_step(run: TrainingRun, n: int) -> dict:
    r = run.step(n)
    get_run_logger().info("step %d/%d  loss %.4f  tokens %d  lr %.2e  %.2f s",
                          n, run.total_steps, r["loss"], r["tokens"], r["lr"], r["time_s"])
    return r


@task(name="save-checkpoint", task_run_name="checkpoint-step-{n}", cache_policy=NO_CACHE)
def save_checkpoint(run: TrainingRun, n: int) -> str:
    path = run.save_checkpoint(n)
    get_run_logger().info("saved %s", path)
    return path


@task(name="train-adapter", cache_policy=NO_CACHE)
def train_adapter(config: dict) -> dict:
    """Trains a LoRA from a prepared data file; returns the run's summary (paths, losses)."""
    logger = get_run_logger()
    run = TrainingRun(TrainConfig(**config))
    logger.info(run.describe())
    summary = train(run, step=train_step, save=save_checkpoint)
    logger.info("final LoRA weights: %s", summary["final_lora_weights"])
    return summary
