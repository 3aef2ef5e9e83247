"""`lora-pipeline serve`, the one-process way to run the nightly deployment: a real Prefect
server, `lora-pipeline serve`, and `prefect deployment run` as the README says; a failed run's
hint in the deployment's own terms; and serve stopping on SIGTERM, server or no server."""

import contextlib
import json
import signal
import subprocess
import time

import pytest

from lora_pipeline import processes
from service_stack import BIN, ServiceStack

pytestmark = pytest.mark.slow  # starts a Prefect server and trains a model


@contextlib.contextmanager
def _served(folder):
    """A Prefect server (SQLite) and `lora-pipeline serve` against it, working in `folder`."""
    with ServiceStack("sqlite", workers=0, deploy=False, env={"PREFECT_RUNNER_POLL_FREQUENCY": "2"}) as stack:
        stack.env.pop("TINKER_API_KEY", None)
        log = open(folder / "serve.log", "w")
        serve = processes.start([BIN / "lora-pipeline", "serve"], cwd=folder, env=stack.env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        try:
            processes.wait_until("the nightly deployment",
                                 lambda: stack.api.get("/deployments/name/lora-pipeline/nightly").status_code == 200,
                                 120, serve)
            yield stack, serve, folder
        finally:
            processes.stop(serve, 30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One served stack for the tests that leave it running (a stack takes half a minute)."""
    with _served(tmp_path_factory.mktemp("served")) as stack:
        yield stack


def test_nightly_is_served_with_its_schedule_and_runs_with_overrides(served, tmp_path, small_data):
    stack, serve, folder = served
    deployment = stack.api.get("/deployments/name/lora-pipeline/nightly").json()
    assert deployment["parameters"]["backend"] == "tinker"  # prefect.yaml's nightly, the one definition
    assert deployment["schedules"][0]["schedule"] == {"cron": "0 2 * * *", "timezone": "UTC", "day_or": True}
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Hello!"]))
    run = stack.run("lora-pipeline/nightly", backend="local", max_steps=4, dataset=str(small_data), batch=4,
                    save_every=2, test_prompts=str(prompts), max_tokens=8, eval_data=None)
    assert stack.wait(run, 400)["type"] == "COMPLETED", (folder / "serve.log").read_text()[-3000:]
    names = {t["name"] for t in stack.api.post("/task_runs/filter",
                                               json={"flow_runs": {"id": {"any_": [run]}}}).json()}
    assert {"step-1", "step-2", "step-3", "step-4", "checkpoint-step-2"} <= names
    [run_dir] = (folder / "checkpoints").glob("lora_*")
    assert (run_dir / "final_lora_weights" / "adapter_model.safetensors").exists()


def test_a_failed_deployment_run_says_what_to_do_in_its_own_terms(served, small_data):
    stack, _, folder = served
    # On Tinker, and this worker has no key. (Local data: the hub, the nightly's default, is out
    # of reach here, and is said first.)
    run = stack.run("lora-pipeline/nightly", dataset=str(small_data), eval_data=None)
    state = stack.wait(run, 120)
    assert state["type"] == "FAILED"
    assert "Missing TINKER_API_KEY" in state["message"] and "-p backend=local" in state["message"]
    assert "--backend" not in state["message"]
    # The failure hook runs once the run is Failed: its line may come a moment later.
    [said] = processes.wait_until("the failure note's line", lambda: [
        m for m in stack.logs(run) if m.startswith("What failed and how to continue: ")], 60, every=1)
    note = said.removeprefix("What failed and how to continue: ")
    assert note == str(folder / "checkpoints" / "last_failure.md")  # absolute, wherever the worker runs
    text = open(note).read()
    assert "prefect deployment run lora-pipeline/nightly" in text and "-p backend=local" in text


def test_serve_stops_on_sigterm_even_when_its_server_is_gone(tmp_path):
    with _served(tmp_path) as (stack, serve, _):
        _sigterm_after_the_server(stack, serve)


def _sigterm_after_the_server(stack, serve):
    processes.stop(stack.server, 30)  # the Prefect server goes away first
    time.sleep(3)
    start = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    serve.wait(30)
    assert time.monotonic() - start < 20
