import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from lora_pipeline.report import CHECKPOINT_COLUMNS, checkpoint_cells, verdict, write_report
from lora_pipeline.run_folder import RunSummary


def _short(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[:n] + "…"


@task(name="write-report")
def write_run_report(summary: RunSummary, results_file: str) -> str:
    """report.md, report.html and loss.png in the run folder; in Prefect, the summary, tables
    of checkpoints and answers, and a link to report.html. Returns report.html's path."""
    results = json.loads(Path(results_file).read_text())
    report = write_report(summary, results)
    m = report["metrics"]
    # Keyed artifacts: the UI's Artifacts page shows the latest of each key, with its history.
    create_markdown_artifact(report["markdown"], key="lora-pipeline-report", description=verdict(summary))
    create_table_artifact([dict(zip(CHECKPOINT_COLUMNS + ["path"], checkpoint_cells(r) + [r["path"]]))
                           for r in m["checkpoints"]],
                          key="lora-pipeline-checkpoints", description=f"{Path(summary.run_dir).name}: "
                          "training and held-out loss of each saved adapter")
    with_base = all("base_response" in r for r in results["results"])
    create_table_artifact([{"prompt": _short(r["prompt"][-1]["content"]), "LoRA": _short(r["lora_response"]),
                            **({"base": _short(r["base_response"])} if with_base else {})}
                           for r in results["results"]],
                          key="lora-pipeline-answers",
                          description="LoRA and base answers to the same prompts" if with_base else "LoRA answers")
    html_path = Path(report["html_path"]).resolve()
    create_link_artifact(html_path.as_uri(), link_text=f"report.html of {html_path.parent.name}",
                         key="lora-pipeline-report-link", description=f"{html_path} (open on the machine that ran it)")
    for line in m["overfitting"]:
        get_run_logger().info(line)
    return report["html_path"]
