"""Crashes, kills and damage: a run continues where it stopped, exactly, and refuses to mix."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_pipeline.errors import PipelineError
from lora_pipeline.run_folder import RunFolder
from lora_pipeline.train import TrainingRun, train
from conftest import SAMPLE
from training import adapter_diff, kill_after_steps, steps_logged, training_settings

pytestmark = pytest.mark.slow  # trains a model or starts a Prefect server

CLI = str(Path(sys.executable).parent / "lora-pipeline")


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def config(tiny):
    """Six steps on the tiny model (what is checked here is the run folder's bookkeeping, the
    same on any model): a crash at step 5 or 6 has the checkpoints of steps 2 and 4 behind it."""
    def settings(data, out, name, **changes):
        return training_settings(data, out, **{"run_name": name, "max_steps": 6, "base_model": str(tiny),
                                               "device": "cpu", **changes})
    return settings


def crashing_at(run: TrainingRun, step_no: int) -> TrainingRun:
    """`run`, whose step `step_no` raises Crash: the process dies there."""
    step = run.step

    def crash(n):
        if n == step_no:
            raise Crash(f"crash in step {n}")
        return step(n)
    run.step = crash
    return run


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "data.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:40]))
    return data


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, clean_data, config):
    """An uninterrupted run to compare against."""
    out = tmp_path_factory.mktemp("clean")
    train(TrainingRun(config(clean_data, out, "clean")).open())
    return clean_data, out / "clean"


def test_a_crashed_run_continues_exactly_where_it_stopped(tmp_path, clean_run, config):
    data, clean = clean_run
    with pytest.raises(Crash):
        train(crashing_at(TrainingRun(config(data, tmp_path, "r")).open(), 5))
    assert steps_logged(tmp_path / "r") == [1, 2, 3, 4]
    run = TrainingRun(config(data, tmp_path, "r")).open()
    assert run.first_step == 5 and "continuing after step 4 of 6" in run.describe()
    train(run)
    assert steps_logged(tmp_path / "r") == [1, 2, 3, 4, 5, 6]
    assert adapter_diff(clean, tmp_path / "r") <= 1e-6


def test_a_damaged_newest_checkpoint_is_reported_and_skipped(tmp_path, clean_run, config):
    data, clean = clean_run
    with pytest.raises(Crash):
        train(crashing_at(TrainingRun(config(data, tmp_path, "r")).open(), 6))
    run_dir = tmp_path / "r"
    adapter = run_dir / "checkpoint_step_4" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:1000])  # truncated, as by a full disk
    (run_dir / ".tmp-checkpoint_step_6-x").mkdir()  # a save cut short by a kill
    with open(run_dir / "checkpoints.jsonl", "a") as f:
        f.write('{"name": "checkpoint_st')  # a registry line cut short
    run = TrainingRun(config(data, tmp_path, "r")).open()
    notes = run.describe()
    assert "checkpoint_step_4 cannot be loaded" in notes and "continuing after step 2" in notes
    assert "removed half-written .tmp-checkpoint_step_6-x" in notes
    assert "checkpoints.jsonl:3 is incomplete" in notes
    train(run)
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    assert adapter_diff(clean, run_dir) <= 1e-6


def test_a_finished_run_is_not_trained_again(tmp_path, clean_run, config):
    data, clean = clean_run
    before = (clean / "summary.json").read_text()
    run = TrainingRun(config(data, clean.parent, "clean")).open()
    assert train(run).to_json() == json.loads(before)
    assert steps_logged(clean) == [1, 2, 3, 4, 5, 6]


def test_other_data_or_settings_are_refused_unless_starting_over(tmp_path, clean_run, config):
    data, clean = clean_run
    with pytest.raises(PipelineError, match=r"learning_rate 0.0005 -> 0.001.*--start-over"):
        TrainingRun(config(data, clean.parent, "clean", learning_rate=1e-3)).open()
    changed = tmp_path / "data.jsonl"
    changed.write_bytes(data.read_bytes().replace(b"Arr!", b"Arr?", 1))  # one byte
    with pytest.raises(PipelineError, match="the content of --data changed"):
        TrainingRun(config(changed, clean.parent, "clean")).open()
    # Held-out data shapes the results too: losses on two held-out sets in one log compare nothing.
    other_val = tmp_path / "other.val.jsonl"
    other_val.write_bytes(b"".join(data.read_bytes().splitlines(keepends=True)[:4]))
    with pytest.raises(PipelineError, match=r"the held-out data \(--val-data\) changed.*--start-over"):
        TrainingRun(config(data, clean.parent, "clean", val_data=str(other_val))).open()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps({"format": 1, "batch": 4}))  # an older version's
    with pytest.raises(PipelineError, match="another version of lora-pipeline"):
        TrainingRun(config(data, tmp_path, "r")).open()
    run = TrainingRun(config(data, tmp_path, "r", start_over=True, max_steps=2)).open()
    assert run.first_step == 1 and not (tmp_path / "r" / "training_log.json").exists()


def _cli_train(data, out, name, *options):
    return [CLI, "train", "--data", str(data), "--batch", "4", "--save-every", "2", "--learning-rate", "5e-4",
            "--output-dir", str(out), "--run-name", name, "--backend", "local", *options]


def _env(**changes) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in ("TINKER_API_KEY", "PREFECT_API_URL")}, **changes}


def test_kill_9_then_the_same_command_continues(tmp_path, clean_data, config, tiny):
    steps = 24  # each a Prefect task run of some tens of ms on the tiny model: time to be killed half-way
    clean = train(TrainingRun(config(clean_data, tmp_path, "clean", max_steps=steps)).open()).run_dir
    cmd = _cli_train(clean_data, tmp_path, "r", "--max-steps", str(steps), "--base-model", str(tiny),
                     "--device", "cpu")
    kill_after = random.Random(2).randint(1, steps - 4)  # seeded: a failure names its kill point, and repeats
    kill_after_steps(cmd, _env(), tmp_path / "r", kill_after)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps_logged(tmp_path / "r") == list(range(1, steps + 1)), kill_after
    assert adapter_diff(clean, tmp_path / "r") <= 1e-6, kill_after


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny model 1024 wide: at --rank 128 its adapter (17 MB) and a checkpoint's optimizer
    state (33 MB) are as large as SmolLM2's at rank 16 (19 and 38 MB), in a fraction of the time."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", width=1024)


@pytest.mark.parametrize("limit_mb", [
    25,  # the adapter fits, a checkpoint's optimizer state does not: torch.save fails
    10,  # the adapter does not: safetensors fails
])
def test_a_full_disk_fails_clearly_and_loses_nothing(tmp_path, clean_data, config, wide, limit_mb):
    import resource

    on_wide = {"base_model": str(wide), "rank": 128}
    clean = train(TrainingRun(config(clean_data, tmp_path, "clean", **on_wide)).open()).run_dir

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_mb * 10**6, limit_mb * 10**6))

    cmd = _cli_train(clean_data, tmp_path, "r", "--max-steps", "6", "--base-model", str(wide), "--rank", "128",
                     "--device", "cpu")
    # A Prefect database of its own: the temporary server shares the command's file size limit.
    env = _env(PREFECT_HOME=str(tmp_path / "prefect-home"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert r.returncode == 1
    [said] = [line for line in r.stderr.splitlines() if line.startswith("lora-pipeline train: error:")]
    assert said.startswith(f"lora-pipeline train: error: {tmp_path}/r/checkpoint_step_2: the write failed (")
    assert "the disk may be full. Free space, or choose another --output-dir." in said
    assert said.endswith("run the same command again to continue from the last checkpoint.")
    assert "Traceback" not in r.stderr and "SafetensorError" not in r.stderr
    run_dir = tmp_path / "r"
    assert steps_logged(run_dir) == [1, 2]
    assert not any(p.name.startswith((".tmp-", "checkpoint_step_")) for p in run_dir.iterdir())

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    assert adapter_diff(clean, run_dir) <= 1e-6


def test_a_log_that_disagrees_with_the_checkpoints_is_not_trusted(tmp_path, clean_run, config):
    data, _ = clean_run
    with pytest.raises(Crash):
        train(crashing_at(TrainingRun(config(data, tmp_path, "r")).open(), 6))
    (tmp_path / "r" / "training_log.json").unlink()  # lost: steps 1-5 now unrecorded
    with pytest.raises(PipelineError, match=r"holds step 4, but training_log.json records steps none: the "
                                            r"records disagree.*--start-over"):
        TrainingRun(config(data, tmp_path, "r")).open()
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith("checkpoint_")) == [
        "checkpoint_step_2", "checkpoint_step_4"]  # nothing was changed


def test_a_checkpoint_that_holds_another_step_is_skipped(tmp_path, clean_run, config):
    data, clean = clean_run
    with pytest.raises(Crash):
        train(crashing_at(TrainingRun(config(data, tmp_path, "r")).open(), 6))
    run_dir = tmp_path / "r"
    shutil.rmtree(run_dir / "checkpoint_step_4")
    shutil.copytree(run_dir / "checkpoint_step_2", run_dir / "checkpoint_step_4")  # step 2's weights, mislabelled
    run = TrainingRun(config(data, tmp_path, "r")).open()
    assert "checkpoint_step_4 is registered as step 4 but holds step 2" in run.describe()
    assert run.first_step == 3
    train(run)
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6] and adapter_diff(clean, run_dir) <= 1e-6


def test_changed_final_weights_of_a_finished_run_are_saved_again(tmp_path, clean_run, config):
    data, clean = clean_run
    run_dir = shutil.copytree(clean, tmp_path / "clean")
    adapter = run_dir / "final_lora_weights" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + bytes(8))  # a few bytes damaged
    run = TrainingRun(config(data, tmp_path, "clean"))
    assert run.config.finished_summary() is None  # not reported as a finished run
    summary = train(run.open())
    assert summary.steps == 6 and steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    assert adapter_diff(clean, run_dir) == 0  # saved again from the final state


def test_a_diverging_run_stops_and_saves_no_non_finite_weights(tmp_path, clean_run, config):
    data, _ = clean_run
    with pytest.raises(PipelineError, match=r"the training loss is (nan|inf).*not a finite number.*Lower --learning-rate"):
        train(TrainingRun(config(data, tmp_path, "r", learning_rate=1e30, save_every=1)).open())
    run_dir = tmp_path / "r"
    assert not (run_dir / "final_lora_weights").exists()
    log = json.loads((run_dir / "training_log.json").read_text())  # valid JSON: no NaN in it
    assert all(math.isfinite(r["loss"]) for r in log)
    for entry in RunFolder(run_dir).registry():
        weights = load_file(str(run_dir / entry.name / "adapter_model.safetensors"))
        assert all(bool(v.isfinite().all()) for v in weights.values()), entry.name


def test_a_resumed_run_keeps_its_held_out_losses_time_and_notes_true(tmp_path, small_data, config):
    """An interruption while a checkpoint's held-out loss was measured lost that loss; a resumed
    summary counted only the last process's time (tokens/s inflated); a stale failure.md stayed."""
    from lora_pipeline.run_folder import checkpoint_name

    data = small_data
    val = tmp_path / "held.val.jsonl"
    val.write_bytes(b"".join(data.read_bytes().splitlines(keepends=True)[-4:]))

    run = TrainingRun(config(data, tmp_path, "r", val_data=str(val))).open()

    def interrupted_while_measuring(n):
        run._save_state(checkpoint_name(n), n, f"checkpoint at step {n}")
        if n == 4:
            raise Crash("interrupted while measuring the held-out loss")
        run.validate(n)
    run.save_checkpoint = interrupted_while_measuring

    with pytest.raises(Crash):
        train(run)
    run_dir = tmp_path / "r"
    assert [r["step"] for r in json.loads((run_dir / "validation_log.json").read_text())] == [0, 2]
    (run_dir / "failure.md").write_text("# lora-pipeline run failed\n")  # as the flow's failure hook leaves it
    summary = train(TrainingRun(config(data, tmp_path, "r", val_data=str(val))).open())
    assert [r["step"] for r in json.loads((run_dir / "validation_log.json").read_text())] == [0, 2, 4, 6]
    assert not (run_dir / "failure.md").exists()
    steps_time = sum(r["time_s"] for r in json.loads((run_dir / "training_log.json").read_text()))
    assert summary.time_s >= steps_time  # all six steps' time, not the last two's
