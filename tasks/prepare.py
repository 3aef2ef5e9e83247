from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from lora_pipeline.prepare import prepare_data_file, summary
from lora_pipeline.settings import PrepareSettings

from . import cached_on_content


@task(name="prepare-data", cache_policy=cached_on_content(lambda p: [p["settings"].dataset]), persist_result=True)
def prepare_data(settings: PrepareSettings) -> dict:
    """Validated chat JSONL from any common dataset shape; returns the report."""
    report = prepare_data_file(settings)
    get_run_logger().info(summary(report))
    return report


def show_data_report(report: dict) -> None:
    """The `lora-pipeline-data` artifact: what was kept and dropped, and why. Made by the flow
    from the report, so that a run whose preparation came from the cache shows it too."""
    rows = [{"reason": "kept", "rows": report["kept"], "examples": ""}] + [
        {"reason": reason, "rows": n, "examples": ", ".join(report["dropped_examples"][reason])}
        for reason, n in report["dropped"].items()]
    create_table_artifact(rows, key="lora-pipeline-data", description=f"{report['dataset']} -> {report['output']}")
