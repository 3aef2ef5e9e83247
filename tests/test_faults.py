"""Machines dying under a running trial, across hosts, with nobody there: `make test-faults`.

Hosts in network namespaces (tests/hosts.py): PostgreSQL and the Prefect server on one, a
worker on each of two others, the output folder shared (a folder of this machine, as a mounted
volume would be); the Tinker test server on this machine's own address. The deployments and
automations are applied as `make deploy` does. Each fault lands in the middle of a training;
each time the run must reach Completed by itself: marked Crashed when its heartbeats stop,
re-run by the recover deployment, continued after its last checkpoint, every step logged
once, and the adapter equal to that of an uninterrupted run of the same seed.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import hosts
from conftest import PROMPTS, SAMPLE
from lora_pipeline import processes
from lora_pipeline.models import SMOLLM2, load_tokenizer
from service_stack import ServiceStack, adapter, largest_difference, training_log
from tinker_server import TinkerTestServer

pytestmark = [pytest.mark.slow, pytest.mark.faults,
              pytest.mark.skipif(hosts.available() is not None, reason=str(hosts.available()))]

# A trial: 12 steps of 4, a checkpoint every 3, short answers.
TRIAL = dict(batch=4, max_steps=12, save_every=3, max_tokens=4, test_prompts=str(PROMPTS))
# Heartbeats every 30 s and Crashed after 90 s of silence (prefect.yaml), a re-run, a restart:
# minutes, not seconds.
RECOVERY_S = 600


@pytest.fixture(scope="module")
def net():
    with hosts.Network(["server", "worker-0", "worker-1"]) as network:
        yield network


@pytest.fixture(scope="module")
def tinker(net):
    answer = load_tokenizer(SMOLLM2).encode("Arr! Ahoy there.", add_special_tokens=False) + [2]
    with TinkerTestServer(models=[SMOLLM2], sample_tokens=answer, host=net.gateway) as server:
        yield server


class Webhook:
    """A local receiver for the alerts: what a Slack incoming webhook would get, kept."""

    def __init__(self, host: str):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/alerts"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def about(self, run_name: str) -> list[str]:
        return [m["text"] for m in self.received if run_name in m["text"]]


@pytest.fixture(scope="module")
def webhook(net):
    hook = Webhook(net.gateway)
    yield hook
    hook.httpd.shutdown()


@pytest.fixture(scope="module")
def stack(net, tinker, webhook):
    env = {"TINKER_API_KEY": tinker.api_key, "TINKER_BASE_URL": tinker.base_url,
           "LORA_PIPELINE_RETRY_DELAY": "5", "LORA_PIPELINE_LATE_AFTER": "20"}
    with ServiceStack("postgresql", workers=2, env=env, network=net, alert_webhook=webhook.url) as s:
        yield s


@pytest.fixture(scope="module")
def data(stack) -> Path:
    path = stack.root / "small.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:60]))
    return path


@pytest.fixture(scope="module")
def clean(stack, data) -> dict:
    """The uninterrupted twins: the adapter each backend trains from the same seed."""
    twins = {}
    for backend in ("local", "tinker"):
        out = stack.root / f"clean-{backend}"
        run = stack.run("lora-pipeline/trial", dataset=str(data), output_dir=str(out), backend=backend,
                        base_model=SMOLLM2, **TRIAL)
        assert stack.wait(run, RECOVERY_S)["type"] == "COMPLETED", stack.logs(run)[-20:]
        twins[backend] = adapter(out)
    return twins


def started(stack, data, name: str, backend: str = "local") -> tuple[str, Path]:
    """A trial run, once it has trained 4 steps (so one checkpoint is saved): its id and output
    folder."""
    out = stack.root / name
    run = stack.run("lora-pipeline/trial", dataset=str(data), output_dir=str(out), backend=backend,
                    base_model=SMOLLM2, **TRIAL)
    processes.wait_until("four training steps", lambda: len(training_log(out)) >= 4, 300, every=0.2)
    return run, out


def completed_by_itself(stack, clean, run: str, out: Path, backend: str = "local") -> list[dict]:
    """Waits for `run`'s line of runs (it, and its re-runs) to complete, and checks the result:
    every step logged once, the adapter its clean twin's. Returns the line, first first."""
    runs = stack.wait_for_line(run, RECOVERY_S)
    assert training_log(out) == list(range(1, TRIAL["max_steps"] + 1))
    assert largest_difference(adapter(out), clean[backend]) < 1e-5
    return runs


def test_kill_9_of_a_worker_and_its_flow_run(stack, clean, data):
    run, out = started(stack, data, "kill9")
    name = stack.worker_running_a_flow()
    stack.kill_worker(name)
    assert stack.state(run)["type"] == "RUNNING"  # nothing told the server
    runs = completed_by_itself(stack, clean, run, out)
    first, rerun = runs[0], runs[-1]
    assert first["state"]["type"] == "CRASHED" and "No heartbeat for 90 s" in first["state"]["message"]
    assert rerun["name"] == f"{first['name']}-attempt-2" and "attempt:2/3" in rerun["tags"]
    assert rerun["parameters"] == first["parameters"]
    # Its step that was running when it died is not shown running for ever.
    assert not stack.api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run]}}, "task_runs": {
        "state": {"type": {"any_": ["RUNNING"]}}}}).json()
    said = " ".join(stack.logs(rerun["id"]))
    assert "continuing after step" in said and "continuing after step 0 " not in said
    stack.start_worker(name)


def test_a_worker_host_cut_off_the_network(stack, net, clean, data):
    run, out = started(stack, data, "cut")
    name = stack.worker_running_a_flow()
    net.cut(name)
    try:
        # Past the crash threshold: the server marks the run Crashed and re-runs it on the other
        # host, whose re-run waits for the run folder until the cut-off process has stopped.
        processes.wait_until("the run marked Crashed", lambda: stack.state(run)["type"] == "CRASHED", 300, every=2)
        time.sleep(30)
    finally:
        net.restore(name)
    runs = completed_by_itself(stack, clean, run, out)
    assert runs[0]["state"]["type"] in ("CRASHED", "COMPLETED")


def test_the_prefect_server_killed_and_restarted_30_s_later(stack, clean, data):
    run, out = started(stack, data, "server")
    stack.stop_server(kill=True)
    time.sleep(30)
    stack.start_server()
    completed_by_itself(stack, clean, run, out)


def test_postgresql_restarted(stack, clean, data):
    run, out = started(stack, data, "postgres")
    stack.db.stop()
    stack.db.start()
    completed_by_itself(stack, clean, run, out)


def test_tinker_unreachable_for_2_minutes(stack, net, tinker, clean, data):
    run, out = started(stack, data, "tinker", backend="tinker")
    workers = [h for h in net.hosts if h.startswith("worker-")]
    for host in workers:
        net.unreachable(host, net.gateway)
    try:
        time.sleep(120)
    finally:
        for host in workers:
            net.unreachable(host, net.gateway, on=False)
    completed_by_itself(stack, clean, run, out, backend="tinker")


def test_a_run_that_fails_for_good_is_not_re_run_and_alerts(stack, webhook, data):
    run = stack.run("lora-pipeline/trial", dataset=str(data), output_dir=str(stack.root / "failed"),
                    base_model=str(stack.root / "no-such-model"), **TRIAL)
    final = stack.wait(run, 300)
    assert final["type"] == "FAILED"
    name = stack.api.get(f"/flow_runs/{run}").json()["name"]
    [alert] = processes.wait_until("the alert", lambda: webhook.about(name), 120, every=1)
    assert f"lora-pipeline/trial run {name} failed: " in alert and "no-such-model" in alert
    assert f"/runs/flow-run/{run}" in alert  # the run's page in the UI
    assert "continues after its last checkpoint: prefect deployment run lora-pipeline/trial -p " in alert
    assert f" -p dataset={data}" in alert and " -p lock_wait" not in alert  # the parameters it was given
    time.sleep(5)  # a recover run would have started by now
    assert not stack.api.post("/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [f"first-run:{name}"]}}}).json()


def test_a_run_that_crashed_on_its_last_attempt_is_failed_and_alerts(stack, webhook, data):
    trial = stack.api.get("/deployments/name/lora-pipeline/trial").json()
    # A third attempt, as the recover deployment started it (due tomorrow: no worker takes it)...
    tomorrow = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86400))
    run = stack.api.post(f"/deployments/{trial['id']}/create_flow_run", json={
        "name": "stubborn-run-attempt-3", "tags": ["attempt:3/3", "first-run:stubborn-run"],
        "parameters": {"dataset": str(data), "output_dir": str(stack.root / "stubborn")},
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": tomorrow}}}).json()["id"]
    # ...crashes (here: marked so by hand, as the heartbeat automation does).
    stack.api.post(f"/flow_runs/{run}/set_state", json={
        "state": {"type": "CRASHED", "message": "No heartbeat for 90 s"}, "force": True})
    state = processes.wait_until("the run failed", lambda: (s := stack.state(run))["type"] == "FAILED" and s, 120)
    assert state["message"].startswith("Crashed on attempt 3 of 3 (No heartbeat for 90 s); not re-run again")
    [alert] = processes.wait_until("the alert", lambda: webhook.about("stubborn-run-attempt-3"), 120, every=1)
    assert "failed: Crashed on attempt 3 of 3" in alert
    assert not stack.api.post("/flow_runs/filter", json={"flow_runs": {"name": {"any_": ["stubborn-run-attempt-4"]}}}).json()


def test_a_run_no_worker_takes_alerts_and_is_cancelled(stack, webhook, data):
    stack.prefect("work-pool", "pause", "lora-pipeline")
    try:
        run = stack.run("lora-pipeline/trial", dataset=str(data), output_dir=str(stack.root / "late"), **TRIAL)
        name = stack.api.get(f"/flow_runs/{run}").json()["name"]
        # Late after 15 s (Prefect's default), then 20 s more (LORA_PIPELINE_LATE_AFTER here).
        [alert] = processes.wait_until("the late alert", lambda: webhook.about(name), 180, every=1)
        assert "was still Late after 20 s: no worker of pool lora-pipeline took it" in alert
        assert "prefect deployment run lora-pipeline/trial" in alert
        state = processes.wait_until("cancelled", lambda: (s := stack.state(run))["type"] == "CANCELLED" and s, 60)
        assert "late runs do not pile up" in state["message"]
    finally:
        stack.prefect("work-pool", "resume", "lora-pipeline")


def test_tonights_nightly_waits_while_yesterdays_still_runs(stack, data):
    """The nightly's deployment concurrency (one at a time, queued): no flow retries, so it
    cannot end Crashed as flow retries with a concurrency limit can (Prefect #20251)."""
    params = dict(dataset=str(data), split="train", max_examples=None, backend="local", base_model=SMOLLM2,
                  batch=4, max_steps=2, save_every=0, max_tokens=2, compare_base=False,
                  test_prompts=str(PROMPTS), output_dir=str(stack.root / "nightly"), eval_data=None)
    yesterday = stack.run("lora-pipeline/nightly", **params)
    tonight = stack.run("lora-pipeline/nightly", **{**params, "seed": 1})
    processes.wait_until("tonight's run queued", lambda: stack.state(tonight)["name"] == "AwaitingConcurrencySlot"
                         or stack.state(yesterday)["type"] == "COMPLETED", 120, every=0.5)
    assert stack.wait(yesterday, 300)["type"] == "COMPLETED"
    assert stack.wait(tonight, 300)["type"] == "COMPLETED", stack.logs(tonight)[-20:]
    first, second = (stack.api.get(f"/flow_runs/{r}").json() for r in (yesterday, tonight))
    assert first["end_time"] <= second["start_time"]
    names = [s["name"] for s in stack.api.get("/flow_run_states/", params={"flow_run_id": tonight}).json()]
    assert "AwaitingConcurrencySlot" in names
