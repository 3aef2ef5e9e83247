"""The automations as files (automations/*.yaml) and the values `make deploy` fills in, and the
fence that stops a training whose run another process may own now. Applying them to a server,
and what they do there, is in test_service.py and test_faults.py."""

import time

import httpx
import pytest
import yaml

from conftest import ROOT
from lora_pipeline.deployments import automations
from lora_pipeline.tasks import fence as fence_module
from lora_pipeline.tasks.fence import Fence, Fenced

VALUES = {"crash_after": 90, "late_after": 1800, "alert_block": "5f0c0c0c-0000-4000-8000-000000000001"}


def test_every_automation_is_valid_for_prefect_with_its_values_filled_in():
    from prefect.events.schemas.automations import AutomationCore

    specs = automations.specs(ROOT / "automations", VALUES)
    cores = {s["name"]: AutomationCore.model_validate(s) for s in specs}
    assert len(cores) == len(list((ROOT / "automations").glob("*.yaml"))) == 3
    crash = cores["lora-pipeline: a run whose heartbeats stop is Crashed"]
    assert crash.trigger.within.total_seconds() == 90 and crash.trigger.posture == "Proactive"
    # Not forced: a late heartbeat after Completed cannot turn it Crashed (Prefect #18653).
    assert crash.actions[0].type == "change-flow-run-state" and crash.actions[0].force is False
    assert "No heartbeat for 90 s" in crash.actions[0].message
    late = cores["lora-pipeline: alert on a run no worker takes"]
    assert late.trigger.within.total_seconds() == 1800
    assert [a.type for a in late.actions] == ["send-notification", "change-flow-run-state"]
    assert str(late.actions[0].block_document_id) == VALUES["alert_block"]


def test_without_a_webhook_the_notifications_are_left_out_and_the_rest_kept():
    specs = {s["name"]: s for s in automations.specs(ROOT / "automations", {**VALUES, "alert_block": None})}
    assert "lora-pipeline: alert on a failed run" not in specs  # it only notifies
    assert [a["type"] for a in specs["lora-pipeline: alert on a run no worker takes"]["actions"]] == \
        ["change-flow-run-state"]  # late runs still do not pile up


def test_the_crash_threshold_is_read_from_prefect_yaml_and_checked_against_the_heartbeat(tmp_path):
    assert automations.crash_after(ROOT / "prefect.yaml") == 90
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    env = spec["definitions"]["work_pool"]["job_variables"]["env"]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    # Every deployment's runs send heartbeats (the pool's job variables are shared).
    assert all(d["work_pool"]["job_variables"]["env"] == env for d in spec["deployments"])
    env["LORA_PIPELINE_CRASH_AFTER"] = "45"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit, match="under two heartbeats of 30 s"):
        automations.crash_after(tmp_path / "prefect.yaml")


@pytest.mark.slow
def test_the_fence_stops_a_training_whose_run_is_no_longer_running(prefect_harness, monkeypatch):
    from prefect import flow, get_client
    from prefect.runtime import flow_run
    from prefect.states import Crashed

    monkeypatch.setattr(fence_module, "POLL_S", 0.2)
    seen = {}

    @flow
    def training():
        with Fence(flow_run.id, lost_after=None) as fence:
            fence.check()  # Running: go on
            # The crash automation marks this run Crashed (here: by hand, as it would).
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run.id, Crashed(message="No heartbeat for 90 s"), force=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    fence.check()
                except Fenced as e:
                    seen["why"] = str(e)
                    return
                time.sleep(0.1)

    training(return_state=True)
    assert "is CRASHED in Prefect now: its re-run owns the run folder" in seen["why"]


def test_the_fence_stops_a_training_that_lost_the_api_for_the_crash_threshold(monkeypatch):
    monkeypatch.setattr(fence_module, "POLL_S", 0.1)

    def unreachable():  # what every poll of a cut-off host gets
        raise httpx.ConnectError("All connection attempts failed")
    with Fence("00000000-0000-4000-8000-000000000000", lost_after=1.0, read_state=unreachable) as fence:
        fence.check()  # not yet
        time.sleep(1.3)
        with pytest.raises(Fenced, match=r"has not answered for 1 s \(LORA_PIPELINE_CRASH_AFTER is 1 s\)"):
            fence.check()
