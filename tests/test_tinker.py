"""The pipeline's Tinker path, through the real SDK, against the local Tinker-protocol server
(tests/tinker_server.py): end to end, and with the faults a nightly run must survive."""

import asyncio
import json
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

from lora_pipeline.flows.pipeline import lora_pipeline
from lora_pipeline.models import SMOLLM2, load_tokenizer
from tinker_server import TinkerTestServer, service_client

pytestmark = pytest.mark.slow  # trains a model or starts a Prefect server

TIMEOUT = 2.0  # --request-timeout in these tests
RETRIES, FIRST_DELAY = 2, 0.2  # as conftest sets them


@pytest.fixture
def server(monkeypatch):
    answer = load_tokenizer(SMOLLM2).encode("Arr! Ahoy there.", add_special_tokens=False) + [2]
    with TinkerTestServer(models=[SMOLLM2, "Qwen/Qwen3-8B"], sample_tokens=answer) as server:
        monkeypatch.setenv("TINKER_API_KEY", server.api_key)
        monkeypatch.setenv("TINKER_BASE_URL", server.base_url)
        yield server


def run_pipeline(tmp_path, small_data, **overrides):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["What is 2 plus 3?", "Hello!"]))
    params = dict(dataset=str(small_data), backend="auto", base_model=SMOLLM2, batch=4, max_steps=3,
                  save_every=2, output_dir=str(tmp_path / "runs"), run_name="t",
                  request_timeout=TIMEOUT, test_prompts=str(prompts), max_tokens=16)
    start = time.monotonic()
    state = lora_pipeline(**{**params, **overrides}, return_state=True)
    return state, time.monotonic() - start


async def _flow_run_records(flow_run_id):
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = await client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return flow_run, logs, artifacts, task_runs


def test_pipeline_trains_saves_and_samples_on_tinker(prefect_harness, server, tmp_path, small_data):
    state, _ = run_pipeline(tmp_path, small_data)
    assert state.is_completed(), state.message
    run = tmp_path / "runs" / "t"
    assert json.loads((run / "config.json").read_text())["backend"] == "tinker"  # auto, with a key
    registry = [json.loads(line) for line in (run / "checkpoints.jsonl").read_text().splitlines()]
    assert [(e["name"], e["step"]) for e in registry] == [
        ("checkpoint_step_2", 2), ("final_lora_weights", 3), ("training_state", 3)]
    assert registry[0]["state_path"].endswith("/weights/step_0002")
    assert registry[1]["sampler_path"].endswith("/sampler_weights/final")
    assert registry[2]["state_path"].endswith("/weights/final")
    assert all(e["state_path"] or e["sampler_path"] for e in registry)
    record = json.loads((run / "final_lora_weights" / "lora_pipeline.json").read_text())
    assert record["sampler_path"] == registry[1]["sampler_path"] and record["backend"] == "tinker"

    log = json.loads((run / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3] and log[-1]["loss"] < log[0]["loss"]
    # The training's session, then the one that loads its final state to download the adapter.
    training, download = sorted(server.runs.values(), key=lambda r: r.created)
    assert training.steps == 3  # each optim_step applied once

    results = json.loads((run / "results.json").read_text())["results"]
    assert [r["lora_response"] for r in results] == ["Arr! Ahoy there."] * 2
    assert all(r["base_response"] and r["lora_stop_reason"] == "stop" for r in results)


@pytest.mark.parametrize("server_op, message", [
    ("create_session", "create_lora_training_client"),
    ("forward_backward", "forward_backward for step 1"),
    ("optim_step", "optim_step for step 1"),
    ("save_weights", "save_state for checkpoint at step 2"),
    ("sample", "sample"),
])
def test_a_hung_call_fails_within_the_deadline_and_retries(prefect_harness, server, tmp_path,
                                                          small_data, server_op, message):
    server.fault(server_op, "hang")
    state, elapsed = run_pipeline(tmp_path, small_data)
    assert state.is_failed()
    assert f"Tinker did not answer {message}" in state.message
    assert f"within {TIMEOUT:g} s" in state.message
    # Each try waits TIMEOUT; retries wait FIRST_DELAY, doubling, +50% jitter at most. The rest
    # (three short training steps on fake numbers, Prefect) stays well under 15 s.
    bound = (RETRIES + 1) * TIMEOUT + sum(FIRST_DELAY * 2 ** i * 1.5 for i in range(RETRIES)) + 15
    assert elapsed < bound, elapsed
    assert server.count(server_op) >= RETRIES + 1  # it was retried, not left hanging

    # The failure hook says what failed and how to continue, in the run folder and the UI.
    run_dir = tmp_path / "runs" / "t"
    note = (run_dir / "failure.md") if run_dir.exists() else (tmp_path / "runs" / "last_failure.md")
    text = note.read_text()
    assert f"Tinker did not answer {message}" in text
    if run_dir.exists():
        assert "lora-pipeline train --data" in text and "--run-name t" in text
        if server_op == "sample":  # training had finished
            assert "/weights/final` (step 3)" in text
    _, _, artifacts, _ = asyncio.run(_flow_run_records(state.state_details.flow_run_id))
    assert "lora-pipeline-failure" in [a.key for a in artifacts]


def test_a_call_that_hangs_once_is_retried_and_the_run_completes(prefect_harness, server, tmp_path,
                                                                small_data):
    server.fault("optim_step", "hang", times=1)
    state, _ = run_pipeline(tmp_path, small_data)
    assert state.is_completed(), state.message
    log = json.loads((tmp_path / "runs" / "t" / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3]


def _messages(state) -> list[str]:
    _, logs, _, task_runs = asyncio.run(_flow_run_records(state.state_details.flow_run_id))
    return [log.message for log in logs], task_runs


def test_http_500s_are_retried_and_the_retries_are_logged(prefect_harness, server, tmp_path,
                                                         small_data):
    server.fault("optim_step", "500", times=2)
    state, _ = run_pipeline(tmp_path, small_data)
    assert state.is_completed(), state.message
    messages, _ = _messages(state)
    # The SDK retries these by itself, silently; the step's task says so.
    said = [m for m in messages if m.startswith("Tinker SDK retried on its own")]
    assert sum(m.count("/api/v1/optim_step after HTTP 500") for m in said) == 2, messages
    assert server.count("optim_step") == 3 + 2


def test_failed_requests_are_retried_by_the_task(prefect_harness, server, tmp_path, small_data):
    # A request the service reports failed (category server) is not retried by the SDK. (Which
    # step's optim_step gets it depends on which poll comes first: the next step is queued early.)
    server.fault("retrieve_future:optim_step", "fail", times=1)
    state, _ = run_pipeline(tmp_path, small_data)
    assert state.is_completed(), state.message
    messages, task_runs = _messages(state)
    assert sum("Retry" in m and "RequestFailedError" in m for m in messages) == 1, messages
    assert sorted(t.run_count for t in task_runs if t.name.startswith("step-")) == [1, 1, 2]
    # A retried step leaves the tasks that had completed as they were: none shows RolledBack.
    assert {t.state.name for t in task_runs} == {"Completed"}
    log = json.loads((tmp_path / "runs" / "t" / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3]


def test_a_rejected_key_fails_at_once_and_is_never_written(prefect_harness, server, tmp_path,
                                                          small_data, monkeypatch):
    secret = "tml-this-key-is-secret-7f3a9c"
    monkeypatch.setenv("TINKER_API_KEY", secret)
    server.reject_key = secret
    state, elapsed = run_pipeline(tmp_path, small_data)
    assert state.is_failed()
    assert "rejected the API key" in state.message and "TINKER_API_KEY" in state.message
    assert elapsed < 15
    assert [r.op for r in server.request_log] == ["client_config"]  # refused once, not retried

    flow_run, logs, artifacts, _ = asyncio.run(_flow_run_records(state.state_details.flow_run_id))
    assert secret not in json.dumps(flow_run.parameters)
    assert all(secret not in log.message for log in logs)
    assert all(secret not in json.dumps(a.data) for a in artifacts)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_inspect_lists_models_runs_and_checkpoints(server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    with service_client(server) as service:
        client = service.create_lora_training_client(SMOLLM2, rank=4).result()
        saved = client.save_state("step_0001").result().path
        r = subprocess.run([str(Path(sys.executable).parent / "lora-pipeline"), "inspect", "--timeout", "10"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "TINKER_API_KEY: set" in r.stdout and server.api_key not in r.stdout + r.stderr
        assert f"server models (2): {SMOLLM2}, Qwen/Qwen3-8B" in r.stdout
        assert "recent training runs (1):" in r.stdout and saved in r.stdout
