import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from lora_pipeline.engines import check_base_model, choose_backend, default_base_model
from lora_pipeline.report import verdict

from tasks import unless_gone
from tasks.evaluate import evaluate_adapter
from tasks.prepare import prepare_data
from tasks.report import write_run_report
from tasks.train import train_adapter


def write_failure_note(flow, flow_run, state) -> None:
    """On failure: what failed, the last good checkpoint and the command to continue, in the
    run folder and as an artifact on the flow run."""
    from lora_pipeline.report import write_failure_summary

    params = flow_run.parameters.get("config", flow_run.parameters)
    since = flow_run.start_time.timestamp() - 1 if flow_run.start_time else 0
    path, markdown = write_failure_summary(params.get("output_dir", "checkpoints"), params.get("run_name"),
                                           state.message or "unknown error", since)
    create_markdown_artifact(markdown, key="lora-pipeline-failure", description=f"written to {path}")
    get_run_logger().error("What failed and how to continue: %s", path)


def _prepared(report: dict) -> list[str]:
    return [report["output"]] + ([report["validation"]] if report["validation"] else [])


def _trained(summary: dict) -> list[str]:
    return [summary["final_lora_weights"]]


def _answered(results_file: str) -> list[str]:
    return [results_file]


@flow(name="lora-pipeline-prepare")
def prepare(dataset: str, output: str, split: str = "train", max_examples: int | None = None,
            options: dict | None = None) -> dict:
    return unless_gone(prepare_data, _prepared, dataset, split, output, max_examples, options)


@flow(name="lora-pipeline-train", on_failure=[write_failure_note])
def train(config: dict) -> dict:
    """`config` holds lora_pipeline.train.TrainConfig's fields, named like the CLI flags."""
    return unless_gone(train_adapter, _trained, config)


@flow(name="lora-pipeline-test")
def test(lora_weights: str, output: str, test_prompts: str | None = None,
         base_model: str | None = None, compare_base: bool = False, max_tokens: int = 150,
         temperature: float = 0.7, seed: int = 0, request_timeout: float = 120.0) -> str:
    return unless_gone(evaluate_adapter, _answered, lora_weights, output, test_prompts, base_model,
                       compare_base, max_tokens, temperature, seed, request_timeout)


@flow(name="lora-pipeline", on_failure=[write_failure_note])
def lora_pipeline(
    dataset: str = "HuggingFaceH4/ultrachat_200k",
    split: str = "train_sft",
    max_examples: int | None = 10000,
    batch: int = 8,
    max_steps: int = 0,
    rank: int = 16,
    learning_rate: float = 1e-4,
    save_every: int = 25,
    output_dir: str = "checkpoints",
    backend: str = "auto",
    base_model: str | None = None,
    seed: int = 0,
    run_name: str | None = None,
    max_length: int = 1024,
    on_overflow: str = "truncate",
    val_fraction: float = 0.05,
    request_timeout: float = 120.0,
    start_over: bool = False,
    test_prompts: str | None = None,
    max_tokens: int = 150,
    temperature: float = 0.7,
    compare_base: bool = True,
) -> dict:
    """Prepare the data, train a LoRA, answer the test prompts with it and its base, report."""
    # A missing Tinker key or an unknown model fails here, not after the data is prepared.
    engine = choose_backend(backend)
    check_base_model(engine, base_model or default_base_model(engine))
    # The split only means something for hub datasets; local files are read whole.
    source = Path(dataset).stem if Path(dataset).exists() else f"{dataset}_{split}"
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", source)
    data_file = str(Path(output_dir) / "data" / f"{slug}_{max_examples or 'all'}.jsonl")
    report = unless_gone(prepare_data, _prepared, dataset, split, data_file, max_examples,
                         {"val_fraction": val_fraction, "max_length": max_length, "on_overflow": on_overflow,
                          "base_model": base_model, "seed": seed})
    val_data = report["validation"]  # held-out loss is measured on it during training
    summary = unless_gone(train_adapter, _trained, dict(
        data=data_file, batch=batch, max_steps=max_steps, rank=rank, learning_rate=learning_rate,
        save_every=save_every, output_dir=output_dir, backend=backend, base_model=base_model,
        seed=seed, run_name=run_name, max_length=max_length, on_overflow=on_overflow,
        request_timeout=request_timeout, start_over=start_over, val_data=val_data))
    results = unless_gone(evaluate_adapter, _answered, summary["final_lora_weights"],
                          str(Path(summary["run_dir"]) / "results.json"), test_prompts or val_data,
                          None, compare_base, max_tokens, temperature, seed, request_timeout)
    report = write_run_report(summary, results)
    get_run_logger().info("%s Report: %s", verdict(summary), report)
    return {**summary, "results": results, "report": report}
