"""The lora-pipeline flow under a Prefect test server: stages, step task runs, artifacts."""

import asyncio
import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from lora_pipeline.flows.pipeline import lora_pipeline

pytestmark = pytest.mark.slow  # trains a model or starts a Prefect server


async def _task_runs_and_artifacts(flow_run_id):
    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return runs, artifacts


def test_pipeline_flow_runs_every_stage_as_tasks(prefect_harness, tmp_path, small_data):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["What is 2 plus 3?", "Hello!"]))
    state = lora_pipeline(dataset=str(small_data), batch=4, max_steps=3, save_every=2,
                          learning_rate=5e-4, output_dir=str(tmp_path / "runs"), backend="auto",
                          run_name="flow", test_prompts=str(prompts), max_tokens=12,
                          return_state=True)
    assert state.is_completed(), state
    result = state.result()
    run = tmp_path / "runs" / "flow"
    assert result["summary"].run_dir == str(run) and result["summary"].backend == "local"
    assert json.loads((run / "results.json").read_text())["results"][0]["base_response"]
    assert result["report"] == str(run / "report.html") and (run / "loss.png").exists()
    report = (run / "report.md").read_text()
    assert report.count("> What is 2 plus 3?") == 1
    assert "## Held-out loss" in report and "| 0 (base) |" in report  # on the 5% validation split
    assert "On held-out data the LoRA" in report
    assert (tmp_path / "runs" / "data" / "small_all.jsonl").exists()
    assert (tmp_path / "runs" / "data" / "small_all.val.jsonl").exists()  # 5% held out

    runs, artifacts = asyncio.run(_task_runs_and_artifacts(state.state_details.flow_run_id))
    names = {r.name for r in runs}
    assert {"step-1", "step-2", "step-3", "checkpoint-step-2"} <= names
    stages = {r.name.rsplit("-", 1)[0] for r in runs}
    assert {"prepare-data", "find-finished-training", "start-training", "validate-base", "save-final-weights",
            "evaluate-adapter", "write-report"} <= stages
    assert {r.state.name for r in runs} == {"Completed"}
    by_key = {a.key: a for a in artifacts}
    assert sorted(by_key) == ["lora-pipeline-answers", "lora-pipeline-checkpoints", "lora-pipeline-data",
                              "lora-pipeline-evaluation", "lora-pipeline-progress", "lora-pipeline-report",
                              "lora-pipeline-report-link"]
    # The evaluation said how far it was, for the LoRA and then for the base model.
    evaluation = by_key["lora-pipeline-evaluation"]
    assert evaluation.type == "progress" and evaluation.data == 100
    assert evaluation.description.startswith("base model: 2/2 prompts answered") and "tokens/s" in evaluation.description
    assert "Training loss" in by_key["lora-pipeline-report"].description
    assert by_key["lora-pipeline-progress"].type == "progress" and by_key["lora-pipeline-progress"].data == 100
    assert "step 3/3" in by_key["lora-pipeline-progress"].description
    checkpoints = json.loads(by_key["lora-pipeline-checkpoints"].data)
    assert [row["adapter"].removesuffix(" (best)") for row in checkpoints] == ["checkpoint_step_2", "final_lora_weights"]
    assert sum(row["adapter"].endswith("(best)") for row in checkpoints) == 1
    answers = json.loads(by_key["lora-pipeline-answers"].data)
    assert [row["prompt"] for row in answers] == ["What is 2 plus 3?", "Hello!"] and answers[0]["base"]
    assert by_key["lora-pipeline-report-link"].data == f"[report.html of flow]({(run / 'report.html').as_uri()})"


def test_tinker_backend_without_a_key_fails_before_preparing(prefect_harness, tmp_path, small_data):
    state = lora_pipeline(dataset=str(small_data), backend="tinker", output_dir=str(tmp_path),
                          return_state=True)
    assert state.is_failed()
    assert "Missing TINKER_API_KEY" in state.message
    assert not (tmp_path / "data").exists()


def _task_states(flow_run_id) -> dict:
    runs, _ = asyncio.run(_task_runs_and_artifacts(flow_run_id))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if not r.name.startswith(("step", "checkpoint"))}


def test_a_rerun_reuses_finished_stages_and_a_changed_byte_redoes_them(prefect_harness, tmp_path, small_data, tiny):
    # The tiny model: what is checked is which stages run again, not what the model learns.
    params = dict(dataset=str(small_data), batch=4, max_steps=3, save_every=0, backend="local",
                  base_model=str(tiny), device="cpu", output_dir=str(tmp_path / "runs"), max_tokens=8)
    first = lora_pipeline(**params, return_state=True)
    # Without test prompts, the held-out conversations' prompts are answered.
    held_out = [json.loads(line)["messages"][:-1]
                for line in (tmp_path / "runs" / "data" / "small_all.val.jsonl").read_text().splitlines()]
    results = json.loads(Path(first.result()["results"]).read_text())["results"]
    assert [r["prompt"] for r in results] == held_out and held_out
    second = lora_pipeline(**params, return_state=True)
    assert second.result()["summary"].run_dir == first.result()["summary"].run_dir
    assert _task_states(second.state_details.flow_run_id) == {
        "prepare-data": "Cached", "find-finished-training": "Cached", "evaluate-adapter": "Cached",
        "write-report": "Completed"}
    # The data artifact comes from the cached report too.
    _, artifacts = asyncio.run(_task_runs_and_artifacts(second.state_details.flow_run_id))
    assert "lora-pipeline-data" in {a.key for a in artifacts}

    # A cached result whose files are gone (deleted, or another checkout's) is made again.
    import shutil

    shutil.rmtree(tmp_path / "runs")
    again = lora_pipeline(**params, return_state=True)
    assert again.is_completed() and Path(again.result()["report"]).exists()

    # One byte in every answer, so that the training split changes whatever the validation split holds.
    small_data.write_bytes(small_data.read_bytes().replace(b"Arr!", b"Arr?"))
    third = lora_pipeline(**params, return_state=True)
    assert third.result()["summary"].run_dir != first.result()["summary"].run_dir
    assert set(_task_states(third.state_details.flow_run_id).values()) == {"Completed"}
