from prefect import get_run_logger, task

from lora_pipeline import data

from . import cached_on_content


@task(name="prepare-data", cache_policy=cached_on_content(lambda p: [p["dataset"]]), persist_result=True)
def prepare_data(dataset: str, split: str, output: str, max_examples: int | None = None) -> dict:
    report = data.prepare(dataset, split, output, max_examples)
    dropped = ", ".join(f"{n} {why}" for why, n in report["dropped"].items()) or "none"
    get_run_logger().info("prepared %s: kept %d of %d rows (dropped: %s) -> %s",
                          dataset, report["kept"], report["rows_read"], dropped, output)
    return report
