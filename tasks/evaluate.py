from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from lora_pipeline.evaluate import run_test
from lora_pipeline.settings import EvaluateSettings

from . import RETRY, cached_on_content, sdk_retries_logged


@task(name="evaluate-adapter",
      cache_policy=cached_on_content(lambda p: [p["settings"].lora_weights, p["settings"].test_prompts]),
      persist_result=True, **RETRY)
@sdk_retries_logged
def evaluate_adapter(settings: EvaluateSettings) -> str:
    """Samples LoRA (and base) answers to the test prompts; returns the results file. Progress
    is logged as it comes and advances the `lora-pipeline-evaluation` progress artifact."""
    logger = get_run_logger()
    sides = 2 if settings.compare_base else 1
    progress = create_progress_artifact(0.0, key="lora-pipeline-evaluation",
                                        description="answering the test prompts")
    share = {"lora": 0.0, "base": 0.0}

    def answered(who: str, done: int, total: int, tokens: int, seconds: float, fraction: float) -> None:
        share[who] = fraction
        name = "LoRA" if who == "lora" else "base model"
        said = f"{name}: {done}/{total} prompts answered, {tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s"
        logger.info(said)
        update_progress_artifact(progress, 100 * sum(share.values()) / sides, description=said)

    result = run_test(settings, answered)
    logger.info("%d prompts answered by the LoRA%s -> %s", len(result["results"]),
                " and the base model" if settings.compare_base else "", settings.output)
    return settings.output
