from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from lora_pipeline.gate import Decision
from lora_pipeline.promotion import judge, trend_markdown
from lora_pipeline.run_folder import RunSummary
from lora_pipeline.settings import PipelineSettings

from . import RETRY, sdk_retries_logged


@task(name="judge-candidate", cache_policy=NO_CACHE, **RETRY)
@sdk_retries_logged
def judge_candidate(stages: PipelineSettings, summary: RunSummary, inputs_key: str | None) -> Decision:
    """The run's adapter against its base model and the champion on the evaluation set: promoted
    or rejected, in the registry; then the `lora-pipeline.adapter.promoted` (or `.rejected`)
    event, which automations can act on, and the `lora-pipeline-nightly` artifact: every
    night so far."""
    train = stages.train
    decision = judge(summary.run_dir, stages.promotion.eval_data, stages.promotion.promotion_margin,
                     train.output_dir, inputs_key, stages.evaluate.max_tokens, train.device, train.dtype)
    get_run_logger().info("%s", decision.reason)
    run = Path(summary.run_dir).name
    emit_event(event=f"lora-pipeline.adapter.{'promoted' if decision.promoted else 'rejected'}",
               resource={"prefect.resource.id": f"lora-pipeline.adapter.{run}", "prefect.resource.name": run},
               payload={"reason": decision.reason, "adapter": summary.final_lora_weights,
                        "output_dir": train.output_dir})
    create_markdown_artifact(trend_markdown(train.output_dir), key="lora-pipeline-nightly", description=decision.reason)
    return decision
