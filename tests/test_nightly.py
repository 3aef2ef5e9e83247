"""Nights of the lora-pipeline flow on a growing data folder, with a fixed evaluation set: the
gate promotes a better adapter, rejects a harmful one, and a night without new data does
nothing; the registry's commands override it."""

import json
import random

import pytest
from conftest import SAMPLE

from lora_pipeline.flows.cli import main
from lora_pipeline.flows.pipeline import lora_pipeline
from lora_pipeline.registry import Registry


def _night(folder, name: str, rows: list[str]) -> None:
    (folder / f"{name}.jsonl").write_text("".join(rows))


def _harmful(rows: list[str], seed: int) -> list[str]:
    """The same questions, answered with the answer's letters shuffled: data that teaches the
    model nonsense. (Shuffled words were not harmful enough: a tiny model learns which tokens
    come, not yet in which order.)"""
    rng = random.Random(seed)
    out = []
    for row in rows:
        chat = json.loads(row)
        letters = list(chat["messages"][-1]["content"])
        rng.shuffle(letters)
        chat["messages"][-1]["content"] = "".join(letters)
        out.append(json.dumps(chat) + "\n")
    return out


@pytest.mark.slow  # trains a model under a Prefect test server
def test_three_nights_promote_the_better_reject_the_harmful_and_a_fourth_does_nothing(
        prefect_harness, tmp_path, tiny, capsys):
    rows = SAMPLE.read_text().splitlines(keepends=True)
    eval_set, pool = tmp_path / "eval.jsonl", rows[:200]
    # Answer checks on some rows: scored on each model's greedy answer, recorded beside the losses.
    checked = [json.dumps({**json.loads(row), "checks": {"contains": "Arr!"}}) + "\n" for row in rows[200:204]]
    eval_set.write_text("".join(checked + rows[204:240]))
    nights, out = tmp_path / "nights", tmp_path / "runs"
    nights.mkdir()
    # One epoch a night, so that more data is more training: night 2 has 3x night 1's.
    params = dict(dataset=str(nights), eval_data=str(eval_set), promotion_margin=0.02, base_model=str(tiny),
                  device="cpu", backend="local", batch=4, max_steps=0, save_every=0, learning_rate=3e-3,
                  val_fraction=0.1, output_dir=str(out), test_prompts=None, max_prompts=2, max_tokens=4,
                  compare_base=False)

    def night() -> dict:
        state = lora_pipeline(**params, return_state=True)
        assert state.is_completed(), state
        return state.result()

    _night(nights, "1", pool[:30])
    first = night()
    assert first["decision"].startswith("promoted: ") and "no champion yet" in first["decision"]
    registry = Registry(out)
    assert registry.champion()["run"] == first["summary"].run_dir.rsplit("/", 1)[-1]

    _night(nights, "2", pool[30:120])
    second = night()
    assert second["decision"].startswith("promoted: "), second["decision"]
    champion = registry.champion()
    assert champion["adapter"] == second["summary"].final_lora_weights
    metrics = champion["metrics"]
    assert metrics["eval_loss_candidate"] < metrics["eval_loss_champion"] < metrics["eval_loss_base"]
    assert {"checks_candidate", "checks_base", "checks_champion"} <= set(metrics)
    assert "; answer checks passed: candidate " in second["decision"]

    _night(nights, "3", _harmful(pool[120:200] * 2, seed=3))
    third = night()
    assert third["decision"].startswith("rejected: "), third["decision"]
    assert f"the champion {champion['run']}" in third["decision"]
    assert registry.champion()["run"] == champion["run"]
    run_dir = third["summary"].run_dir
    assert json.load(open(f"{run_dir}/promotion.json"))["promoted"] is False
    assert "rejected: " in open(f"{run_dir}/report.html").read()

    fourth = night()  # no new data
    assert fourth == {"unchanged": fourth["unchanged"]}
    assert fourth["unchanged"].startswith("no new data since ")
    assert fourth["unchanged"].endswith(f"the champion stays {champion['run']}")
    assert len([e for e in registry.history() if e["kind"] == "candidate"]) == 3

    # The adapter to serve, for a script: its path on the first line.
    assert main(["champion", "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == second["summary"].final_lora_weights
    # A person overrides, and takes it back; both are recorded with who and why.
    third_run = run_dir.rsplit("/", 1)[-1]
    assert main(["promote", third_run, "--why", "checking the override", "--output-dir", str(out)]) == 0
    assert registry.champion()["run"] == third_run
    assert main(["rollback", "--why", "it was harmful", "--output-dir", str(out)]) == 0
    assert registry.champion()["run"] == champion["run"]
    overrides = [e for e in registry.history() if e["kind"] != "candidate"]
    assert [(e["kind"], e["why"]) for e in overrides] == [("promote", "checking the override"),
                                                          ("rollback", "it was harmful")]
    page = (out / "nightly.html").read_text()
    assert page.count("<tr") == 1 + 3 + 2  # the header, three nights, two overrides
    capsys.readouterr()
    assert main(["rollback", "--output-dir", str(out)]) == 0  # back past the second night's: the first's
    assert main(["rollback", "--output-dir", str(out)]) == 1
    assert "no previous champion" in capsys.readouterr().err


def test_answer_checks_are_read_strictly_and_scored_on_the_answer(tmp_path):
    from lora_pipeline.errors import PipelineError
    from lora_pipeline.promotion import passes, read_checks

    assert passes("Arr! 5 be 5.", {"contains": "Arr!", "regex": r"be \d+"})
    assert not passes("Ahoy! 5 be 5.", {"contains": "Arr!"})
    assert not passes("5 be five", {"regex": r"be \d+"})
    assert passes('{"name": "x"}', {"json": True}) and not passes("{name: x}", {"json": True})
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert read_checks("e.jsonl", [chat, {**chat, "checks": {"json": True}}]) == [None, {"json": True}]
    with pytest.raises(PipelineError, match=r"e.jsonl: conversation 2: checks \['contain'\]: give an object of "):
        read_checks("e.jsonl", [chat, {**chat, "checks": {"contain": "x"}}])
    with pytest.raises(PipelineError, match=r"conversation 1: regex: "):
        read_checks("e.jsonl", [{**chat, "checks": {"regex": "("}}])
