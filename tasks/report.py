import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from lora_pipeline.report import verdict, write_report


@task(name="write-report")
def write_run_report(summary: dict, results_file: str) -> str:
    """report.md in the run folder, and the same as a Prefect artifact; returns its path."""
    path, markdown = write_report(summary, json.loads(Path(results_file).read_text()))
    create_markdown_artifact(markdown, key="lora-pipeline-report", description=verdict(summary))
    get_run_logger().info("%s Report: %s", verdict(summary), path)
    return str(path)
