"""The nightly deployment end to end: a real Prefect server, `lora-pipeline serve`, and
`prefect deployment run` with local overrides, as the README tells a user to do."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # trains a model or starts a Prefect server

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args[:2]} exited with {p.returncode} while waiting for {what}")
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env.pop("TINKER_API_KEY", None)
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=10)

    def healthy():
        try:
            return api.get("/health").status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_for("the Prefect server", healthy, 90, [server])
        yield env, api
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_nightly_deployment_runs_with_local_overrides(prefect_server, tmp_path, small_data):
    env, api = prefect_server
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Hello!"]))
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([BIN / "lora-pipeline", "serve"], cwd=tmp_path, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        deployment = wait_for(
            "the nightly deployment",
            lambda: (r := api.get("/deployments/name/lora-pipeline/nightly")).status_code == 200 and r.json(),
            90, [serve])
        assert deployment["parameters"]["backend"] == "tinker"
        assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"

        params = {"backend": "local", "max_steps": 4, "dataset": str(small_data), "batch": 4,
                  "save_every": 2, "test_prompts": str(prompts), "max_tokens": 8}
        cmd = [BIN / "prefect", "deployment", "run", "lora-pipeline/nightly"]
        for k, v in params.items():
            cmd += ["-p", f"{k}={v}"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        [flow_run_id] = [line.split()[-1] for line in r.stdout.splitlines() if "UUID" in line]

        def finished():
            state = api.get(f"/flow_runs/{flow_run_id}").json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None
        state = wait_for("the flow run", finished, 300, [serve])
        assert state["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]

        task_runs = api.post("/task_runs/filter",
                             json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
        names = {t["name"] for t in task_runs}
        assert {"step-1", "step-2", "step-3", "step-4", "checkpoint-step-2"} <= names
        [run_dir] = (tmp_path / "checkpoints").glob("lora_*")
        assert (run_dir / "final_lora_weights" / "adapter_model.safetensors").exists()
    finally:
        serve.terminate()
        serve.wait(30)
        log.close()
