"""The registry on the shared output folder: champion alias, history, overrides, races, damage."""

import json
import multiprocessing
import os

import pytest

from lora_pipeline.errors import PipelineError
from lora_pipeline.gate import Decision
from lora_pipeline.registry import Registry, whoami

PROMOTED = Decision(True, "promoted: better than the base model by 0.500 nats/token", [])
REJECTED = Decision(False, "rejected: worse than the champion lora_a by 0.041 nats/token", [])


def candidate(out, run: str, **more) -> dict:
    return {"run_dir": str(out / run), "data_sha256": "ab" * 32, "metrics": {"eval_loss": 1.5}, **more}


def test_an_empty_folder_has_no_champion(tmp_path):
    reg = Registry(tmp_path / "runs")
    assert reg.champion() is None and reg.history() == []
    assert not (tmp_path / "runs").exists()  # reading creates nothing


def test_the_first_promoted_candidate_becomes_champion(tmp_path):
    reg = Registry(tmp_path)
    entry = reg.record_candidate(candidate(tmp_path, "lora_a", tinker="tinker://a/sampler"), PROMOTED)
    champ = reg.champion()
    assert champ == entry
    assert champ["run"] == "lora_a" and champ["kind"] == "candidate"
    assert champ["adapter"] == str(tmp_path / "lora_a" / "final_lora_weights")
    assert champ["tinker"] == "tinker://a/sampler" and champ["metrics"] == {"eval_loss": 1.5}
    assert Decision.from_json(champ["decision"]) == PROMOTED
    assert champ["time"].endswith("+00:00")
    on_disk = json.loads((tmp_path / "registry.json").read_text())
    assert on_disk["champion"] == "lora_a" and on_disk["history"] == [entry]


def test_a_rejected_candidate_is_recorded_and_leaves_the_champion(tmp_path):
    reg = Registry(tmp_path)
    reg.record_candidate(candidate(tmp_path, "lora_a"), PROMOTED)
    reg.record_candidate(candidate(tmp_path, "lora_b"), REJECTED)
    reg.record_candidate(candidate(tmp_path, "lora_c"), None)  # no gate ran: not promoted either
    assert reg.champion()["run"] == "lora_a"
    assert [e["run"] for e in reg.history()] == ["lora_a", "lora_b", "lora_c"]
    assert reg.history()[1]["decision"]["reason"].startswith("rejected: worse than the champion")


def test_a_run_recorded_again_is_not_duplicated(tmp_path):
    reg = Registry(tmp_path)
    first = reg.record_candidate(candidate(tmp_path, "lora_a"), REJECTED)
    assert reg.record_candidate(candidate(tmp_path, "lora_a"), PROMOTED) == first
    assert len(reg.history()) == 1 and reg.champion() is None


def test_promote_and_rollback_are_recorded_with_who_and_why(tmp_path):
    reg = Registry(tmp_path)
    reg.record_candidate(candidate(tmp_path, "lora_a"), PROMOTED)
    reg.record_candidate(candidate(tmp_path, "lora_b"), REJECTED)
    promoted = reg.promote("lora_b", "ana@host1", "the gate's eval set misses tool calls")
    assert reg.champion()["run"] == "lora_b"
    assert promoted["kind"] == "promote" and promoted["from"] == "lora_a"
    assert (promoted["who"], promoted["why"]) == ("ana@host1", "the gate's eval set misses tool calls")
    back = reg.rollback(why="users report worse answers")
    assert reg.champion()["run"] == "lora_a"
    assert (back["kind"], back["run"], back["from"]) == ("rollback", "lora_a", "lora_b")
    assert back["who"] == whoami() and "@" in back["who"]
    assert [e["kind"] for e in reg.history()] == ["candidate", "candidate", "promote", "rollback"]


def test_rollbacks_go_back_through_the_champions_then_refuse(tmp_path):
    reg = Registry(tmp_path)
    for run in ("lora_a", "lora_b", "lora_c"):
        reg.record_candidate(candidate(tmp_path, run), PROMOTED)
    assert reg.rollback("x@y", "one")["run"] == "lora_b"
    assert reg.rollback("x@y", "two")["run"] == "lora_a"  # not back to lora_c
    with pytest.raises(PipelineError, match="no previous champion.*the champion is lora_a"):
        reg.rollback("x@y", "three")
    assert reg.champion()["run"] == "lora_a" and len(reg.history()) == 5


def test_rollback_without_a_previous_champion_is_refused(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(PipelineError, match="no previous champion.*none"):
        reg.rollback("x@y", "why")
    reg.record_candidate(candidate(tmp_path, "lora_a"), PROMOTED)
    with pytest.raises(PipelineError, match="no previous champion"):
        reg.rollback("x@y", "why")
    assert reg.champion()["run"] == "lora_a" and len(reg.history()) == 1


def test_promoting_an_unknown_run_names_the_known_ones(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(PipelineError, match="none yet"):
        reg.promote("lora_zz", "x@y", "why")
    reg.record_candidate(candidate(tmp_path, "lora_a"), PROMOTED)
    reg.record_candidate(candidate(tmp_path, "lora_b"), REJECTED)
    with pytest.raises(PipelineError, match="lora_zz is not a candidate.*lora_a, lora_b"):
        reg.promote("lora_zz", "x@y", "why")
    with pytest.raises(PipelineError, match="already the champion"):
        reg.promote("lora_a", "x@y", "why")
    assert len(reg.history()) == 2


def _record_many(out, tag: str, start) -> None:
    start.wait()
    reg = Registry(out)
    for i in range(20):
        reg.record_candidate(candidate(out, f"lora_{tag}{i}"), PROMOTED if i % 3 == 0 else REJECTED)


def test_two_processes_racing_lose_no_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_record_many, args=(tmp_path, tag, start)) for tag in "xy"]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    reg = Registry(tmp_path)
    runs = [e["run"] for e in reg.history()]
    assert sorted(runs) == sorted(f"lora_{t}{i}" for t in "xy" for i in range(20))
    last_promoted = [e["run"] for e in reg.history() if e["decision"]["promoted"]][-1]
    assert reg.champion()["run"] == last_promoted


@pytest.mark.parametrize("content", ["{\"champion\": \"lora_a\", \"hist", "[]", "{\"history\": [1, 2]}", "\xff\xfe"])
def test_a_damaged_registry_is_refused_not_reset(tmp_path, content):
    reg = Registry(tmp_path)
    (tmp_path / "registry.json").write_bytes(content.encode("latin-1"))
    for attempt in (reg.champion, lambda: reg.record_candidate(candidate(tmp_path, "lora_b"), PROMOTED)):
        with pytest.raises(PipelineError, match=f"{tmp_path / 'registry.json'} .*move it aside"):
            attempt()
    assert (tmp_path / "registry.json").read_bytes() == content.encode("latin-1")


def test_a_registry_of_another_format_is_refused(tmp_path):
    (tmp_path / "registry.json").write_text(json.dumps({"format": 2, "champion": None, "history": []}))
    with pytest.raises(PipelineError, match="format 2"):
        Registry(tmp_path).history()


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path, monkeypatch):
    reg = Registry(tmp_path)
    reg.record_candidate(candidate(tmp_path, "lora_a"), PROMOTED)
    reg.record_candidate(candidate(tmp_path, "lora_b"), REJECTED)
    reg.promote("lora_b", "x@y", "why")
    assert sorted(os.listdir(tmp_path)) == [".registry.lock", "registry.json"]
    before = (tmp_path / "registry.json").read_bytes()

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)  # the write fails at its last step
    with pytest.raises(OSError, match="disk full"):
        reg.rollback("x@y", "why")
    monkeypatch.undo()
    assert (tmp_path / "registry.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [".registry.lock", "registry.json"]
    assert reg.champion()["run"] == "lora_b"


def test_an_entry_that_is_not_plain_json_is_refused(tmp_path):
    reg = Registry(tmp_path)
    with pytest.raises(PipelineError, match="lora_a: .*no NaN"):
        reg.record_candidate(candidate(tmp_path, "lora_a", metrics={"eval_loss": float("nan")}), PROMOTED)
    with pytest.raises(PipelineError, match="run_dir"):
        reg.record_candidate({"run": "lora_a"}, PROMOTED)
    assert reg.history() == []
