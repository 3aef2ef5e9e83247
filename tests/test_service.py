"""The pipeline as a service, as the README sets it up: PostgreSQL, a Prefect server on it, the
process work pool `lora-pipeline` with two workers, `prefect deploy --all` from the checkout,
and deployment runs on the local engine and on Tinker (the local Tinker-protocol server, with
clock cycles). Loopback only; everything started here dies with this process."""

import json

import pytest

from conftest import PROMPTS, ROOT, SAMPLE
from lora_pipeline.models import SMOLLM2, load_tokenizer
from service_stack import ServiceStack
from tinker_server import TinkerTestServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tinker():
    answer = load_tokenizer(SMOLLM2).encode("Arr! Ahoy there.", add_special_tokens=False) + [2]
    with TinkerTestServer(models=[SMOLLM2], sample_tokens=answer, tick=0.05) as server:
        yield server


@pytest.fixture(scope="module")
def service(tinker):
    env = {"TINKER_API_KEY": tinker.api_key, "TINKER_BASE_URL": tinker.base_url}
    with ServiceStack("postgresql", workers=2, env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def small(service):
    path = service.root / "small.jsonl"
    path.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:60]))
    return path


def test_deploy_registers_the_deployments_on_the_process_pool(service, tinker):
    found = {(d["name"], d["work_pool_name"], d["entrypoint"])
             for d in service.api.post("/deployments/filter", json={}).json()}
    assert found == {("nightly", "lora-pipeline", "flows/pipeline.py:lora_pipeline"),
                     ("trial", "lora-pipeline", "flows/pipeline.py:lora_pipeline"),
                     ("nightly-trial", "lora-pipeline", "flows/pipeline.py:lora_pipeline"),
                     ("training", "lora-pipeline", "flows/pipeline.py:lora_pipeline"),
                     ("sweep", "lora-pipeline", "flows/sweep.py:lora_sweep"),
                     ("recover", "lora-pipeline", "flows/recover.py:rerun_crashed")}
    nightly = service.api.get("/deployments/name/lora-pipeline/nightly").json()
    assert nightly["schedules"][0]["schedule"] == {"cron": "0 2 * * *", "timezone": "UTC", "day_or": True}
    assert nightly["parameters"]["backend"] == "tinker" and nightly["parameters"]["lock_wait"] == 600
    # One at a time, queued; every run sends heartbeats and knows when it counts as crashed.
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert nightly["job_variables"]["env"] == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                                               "LORA_PIPELINE_CRASH_AFTER": "90"}
    # Workers run in the checkout that deployed: the pull step says where.
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert tinker.api_key not in json.dumps(service.api.post("/deployments/filter", json={}).json())


def test_a_tinker_sweep_fans_out_over_the_workers_within_its_concurrency_limit(service, tinker, small):
    out = service.root / "sweep"
    before = set(tinker.runs)
    flow_run = service.run("lora-pipeline-sweep/sweep", dataset=str(small), split="train", max_examples=None,
                           base_model=SMOLLM2, batch=4, max_steps=3, save_every=0, max_tokens=8,
                           learning_rates=[1e-4, 5e-4], ranks=[4, 8], tinker_sessions=2, output_dir=str(out),
                           request_timeout=30.0)
    assert service.wait(flow_run, 600)["type"] == "COMPLETED", service.logs(flow_run)[-20:]
    children = service.children(flow_run)
    training = service.api.get("/deployments/name/lora-pipeline/training").json()["id"]
    assert len(children) == 4 and all(c["state"]["type"] == "COMPLETED" for c in children)
    assert {c["deployment_id"] for c in children} == {training}  # runs of the training deployment, on workers
    # Each training applied each of its 3 steps once, on the service.
    # (the sessions that load a final state to download its adapter are not trainings)
    trained = [tinker.runs[r] for r in set(tinker.runs) - before if tinker.runs[r].resumed_from is None]
    assert sorted((r.rank, r.steps) for r in trained) == [(4, 3), (4, 3), (8, 3), (8, 3)]
    # Never more than 2 trainings on the service at once.
    active = peak = 0
    for _, change in sorted([(r.created, 1) for r in trained] + [(r.last_request_time, -1) for r in trained]):
        active += change
        peak = max(peak, active)
    assert peak <= 2
    [report] = out.glob("sweep_*/sweep_report.html")
    page = report.read_text()
    assert page.count("<tr") == 5 and page.count("(best)") == 1


def test_a_local_sweep_trains_one_configuration_at_a_time(service, small, tiny):
    out = service.root / "local-sweep"
    flow_run = service.run("lora-pipeline-sweep/sweep", dataset=str(small), split="train", max_examples=None,
                           backend="local", base_model=str(tiny), device="cpu", batch=4, max_steps=2, save_every=0, max_tokens=4,
                           test_prompts=str(PROMPTS), learning_rates=[5e-4], ranks=[4, 8], deployment=None,
                           output_dir=str(out))
    assert service.wait(flow_run, 600)["type"] == "COMPLETED", service.logs(flow_run)[-20:]
    assert len(list(out.glob("lora_*/summary.json"))) == 2
    children = [c["id"] for c in service.children(flow_run)]
    spans = {}  # each run's training: from start-training's start to save-final-weights' end
    for t in service.api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": children}}}).json():
        if t["name"].startswith(("start-training", "save-final-weights")):
            spans.setdefault(t["flow_run_id"], []).extend([t["start_time"], t["end_time"]])
    first, second = sorted((min(times), max(times)) for times in spans.values())
    assert first[1] <= second[0], spans  # the second started after the first had ended
    [report] = out.glob("sweep_*/sweep_report.html")
    assert report.read_text().count("(best)") == 1


def test_a_second_deploy_keeps_one_copy_of_each_automation(service):
    def names() -> list[str]:
        return sorted(a["name"] for a in service.api.post("/automations/filter", json={}).json())
    first = names()
    assert {"lora-pipeline: a run whose heartbeats stop is Crashed", "lora-pipeline: alert on a run no worker takes",
            "recover__automation_1"} <= set(first)
    service.prefect("--no-prompt", "deploy", "--all", cwd=ROOT)
    assert "updated  lora-pipeline: a run whose heartbeats stop is Crashed" in service.apply_automations()
    assert names() == first and len(set(first)) == len(first)
