"""The pipeline as a service on one machine, for tests and benchmarks: a Prefect server (on
PostgreSQL or SQLite), the `lora-pipeline` process work pool, `prefect deploy --all` from the
checkout, and workers. Loopback only. Everything it starts dies with the process that started
it (lora_pipeline.processes), and `close()` stops it in order.

    with ServiceStack(database="postgresql", workers=2, env={...}) as stack:
        run_id = stack.run("lora-pipeline/trial", max_steps=2)
        stack.wait(run_id)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil

from lora_pipeline import processes
from lora_pipeline.deployments.postgres import LocalPostgres

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class ServiceStack:
    def __init__(self, database: str = "postgresql", workers: int = 2, env: dict | None = None,
                 deploy: bool = True, network=None, alert_webhook: str | None = None):
        """`network`: a hosts.Network with hosts "server" (PostgreSQL and the Prefect server)
        and "worker-0", "worker-1"... (one worker each); without it, all on loopback."""
        # PostgreSQL runs as its own user when we are root: its folder must not be under a
        # private one (pytest's tmp_path is).
        self.root = Path(tempfile.mkdtemp(prefix="lora-service-", dir="/tmp"))
        self.root.chmod(0o755)
        self.database, self.n_workers, self.extra_env, self.deploy = database, workers, env or {}, deploy
        self.network, self.alert_webhook = network, alert_webhook
        self.workers: dict[str, subprocess.Popen] = {}
        self.db = None
        self._stops: list = []

    def __enter__(self) -> "ServiceStack":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def netns(self, host: str) -> str | None:
        return self.network.namespace(host) if self.network else None

    def start(self) -> "ServiceStack":
        if self.network:
            self.host, self.port = self.network.address("server"), 4200
        else:
            self.host, self.port = "127.0.0.1", processes.free_port()
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
                    "PREFECT_HOME": str(self.root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_URL": f"http://{self.host}:{self.port}/api",
                    # Workers look for new runs every second (10 s by default).
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                    **self.extra_env}
        if self.database == "postgresql":
            self.db = LocalPostgres(self.root / "postgres", processes.free_port(), netns=self.netns("server")).start()
            self._stops.append(lambda: self.db.stop())
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.db.url
        self._stops.append(self.stop_server)
        self.api = httpx.Client(base_url=self.env["PREFECT_API_URL"], timeout=30)
        self.start_server()
        if self.deploy:
            self.prefect("work-pool", "create", "lora-pipeline", "--type", "process")
            self.deployed = self.prefect("--no-prompt", "deploy", "--all", cwd=ROOT).stdout
            self.apply_automations()
        for i in range(self.n_workers):
            self.start_worker(f"worker-{i}")
        return self

    def start_server(self) -> None:
        log = open(self.root / "server.log", "a")
        self.server = processes.start([BIN / "prefect", "server", "start", "--host", self.host, "--port", self.port],
                                      env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                      netns=self.netns("server"))
        log.close()

        def healthy() -> bool:
            try:
                return self.api.get("/health").status_code == 200
            except httpx.HTTPError:
                return False
        processes.wait_until(f"the Prefect server on {self.database}", healthy, 180, self.server, every=1)

    def stop_server(self, kill: bool = False) -> None:
        """Stops the Prefect server; `kill`: at once, with its children (as its machine dying)."""
        if getattr(self, "server", None) is None:
            return
        if kill and self.server.poll() is None:
            for child in psutil.Process(self.server.pid).children(recursive=True):
                child.kill()
            self.server.kill()
        processes.stop(self.server, 30)

    def apply_automations(self) -> str:
        """As `make deploy` does after `prefect deploy --all`."""
        env = {**self.env, "LORA_PIPELINE_ALERT_WEBHOOK": self.alert_webhook or ""}
        r = subprocess.run([sys.executable, "-m", "lora_pipeline.deployments.automations"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"applying the automations failed: {(r.stdout + r.stderr)[-2000:]}")
        return r.stdout

    def close(self) -> None:
        for worker in self.workers.values():
            self._kill_runs_of(worker)
            processes.stop(worker)
        for stop in reversed(self._stops):
            stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def prefect(self, *args, timeout: float = 180, cwd=None) -> subprocess.CompletedProcess:
        r = subprocess.run([BIN / "prefect", *map(str, args)], env=self.env, cwd=cwd or self.root,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            raise RuntimeError(f"prefect {' '.join(map(str, args))} failed: {(r.stdout + r.stderr)[-2000:]}")
        return r

    def start_worker(self, name: str) -> subprocess.Popen:
        """A worker named `name`, on the host of that name when there is a network."""
        log = open(self.root / f"{name}.log", "a")
        worker = processes.start([BIN / "prefect", "worker", "start", "--pool", "lora-pipeline", "--name", name],
                                 env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                 netns=self.netns(name))
        log.close()
        self.workers[name] = worker
        return worker

    @staticmethod
    def _kill_runs_of(worker: subprocess.Popen) -> None:
        """The flow runs a worker started are its child processes; they do not die with it."""
        if worker.poll() is None:
            for child in psutil.Process(worker.pid).children(recursive=True):
                child.kill()

    def kill_worker(self, name: str) -> None:
        """As when its machine goes away: the worker and its flow runs, at once."""
        worker = self.workers.pop(name)
        self._kill_runs_of(worker)
        worker.kill()
        worker.wait()

    def worker_running_a_flow(self) -> str | None:
        for name, worker in self.workers.items():
            if worker.poll() is None and any("prefect.engine" in " ".join(c.cmdline())
                                             for c in psutil.Process(worker.pid).children(recursive=True)):
                return name
        return None

    def run(self, deployment: str, /, **params) -> str:
        """Starts a run of `deployment` as `prefect deployment run -p name=value` does; its id."""
        args = ["deployment", "run", deployment]
        for k, v in params.items():
            args += ["-p", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
        out = self.prefect(*args).stdout
        return next(line.split()[-1] for line in out.splitlines() if "UUID" in line)

    def state(self, flow_run_id: str) -> dict:
        return self.api.get(f"/flow_runs/{flow_run_id}").json()["state"]

    def wait(self, flow_run_id: str, timeout: float = 300) -> dict:
        def final():
            state = self.state(flow_run_id)
            return state if state["type"] in FINAL else None
        return processes.wait_until(f"flow run {flow_run_id}", final, timeout, every=1)

    def children(self, flow_run_id: str) -> list[dict]:
        return self.api.post("/flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}}).json()

    def logs(self, flow_run_id: str) -> list[str]:
        return [log["message"] for log in self.api.post("/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).json()]

    def line_of(self, flow_run_id: str) -> list[dict]:
        """A run and its re-runs (tagged first-run:<its name> by the recover deployment), first
        first."""
        first = self.api.get(f"/flow_runs/{flow_run_id}").json()
        reruns = self.api.post("/flow_runs/filter", json={"flow_runs": {"tags": {"all_": [
            f"first-run:{first['name']}"]}}, "sort": "EXPECTED_START_TIME_ASC"}).json()
        return [first, *reruns]

    def wait_for_line(self, flow_run_id: str, timeout: float) -> list[dict]:
        """`line_of(flow_run_id)` once its newest run has completed."""
        def done():
            runs = self.line_of(flow_run_id)
            return runs if runs[-1]["state"]["type"] == "COMPLETED" else None
        return processes.wait_until(f"flow run {flow_run_id} or a re-run of it to complete", done, timeout, every=2)


def training_log(out: Path) -> list[int]:
    """The steps that the run folder in `out` has logged, in order."""
    log = next(out.glob("lora_*/training_log.json"), None)
    try:
        return [r["step"] for r in json.loads(log.read_text())] if log else []
    except ValueError:  # being replaced as we read
        return []


def adapter(out: Path) -> dict:
    """The final adapter's tensors of the run folder in `out`."""
    from safetensors.torch import load_file

    [weights] = out.glob("lora_*/final_lora_weights/adapter_model.safetensors")
    return load_file(weights)


def largest_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two adapters' tensors (inf if they differ in shape)."""
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k] - b[k]).abs().max()) for k in a)
