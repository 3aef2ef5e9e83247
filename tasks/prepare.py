from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from lora_pipeline.prepare import prepare, summary

from . import cached_on_content


@task(name="prepare-data", cache_policy=cached_on_content(lambda p: [p["dataset"]]), persist_result=True)
def prepare_data(dataset: str, split: str, output: str, max_examples: int | None = None,
                 options: dict | None = None) -> dict:
    """Validated chat JSONL from any common dataset shape; returns the report. `options` holds
    lora_pipeline.prepare.prepare's keyword settings (format, val_fraction, max_length, ...)."""
    report = prepare(dataset, split, output, max_examples, **(options or {}))
    get_run_logger().info(summary(report))
    rows = [{"reason": "kept", "rows": report["kept"], "examples": ""}] + [
        {"reason": reason, "rows": n, "examples": ", ".join(report["dropped_examples"][reason])}
        for reason, n in report["dropped"].items()]
    create_table_artifact(rows, key="lora-pipeline-data", description=f"{dataset} -> {output}")
    return report
