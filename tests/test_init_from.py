"""--init-from: a run starts from an existing adapter's weights with a fresh optimizer, on both
engines; the weights are part of the run's identity, and a killed run still continues exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training import adapter_diff, kill_after_steps, steps_logged, training_settings

from lora_pipeline.errors import PipelineError
from lora_pipeline.report import verdict
from lora_pipeline.train import TrainingRun, train

pytestmark = pytest.mark.slow  # trains a model


CLI = str(Path(sys.executable).parent / "lora-pipeline")
STEPS = 24  # long enough (each step a Prefect task run) to be killed half-way


@pytest.fixture
def source(tmp_path, small_data, tiny):
    """A finished run to start from, on the tiny model, with held-out data."""
    val = tmp_path / "held.val.jsonl"
    val.write_bytes(b"".join(small_data.read_bytes().splitlines(keepends=True)[-8:]))
    settings = training_settings(small_data, tmp_path / "runs", run_name="source", val_data=str(val),
                                 base_model=str(tiny), device="cpu", learning_rate=3e-3)
    return train(TrainingRun(settings).open()), settings


def test_a_run_starts_from_the_adapter_it_is_given_and_is_keyed_on_its_weights(tmp_path, source):
    summary, settings = source
    again = settings.__class__(**{**settings.__dict__, "run_name": None, "init_from": summary.run_dir})
    continued = train(TrainingRun(again).open())
    config = json.loads(open(f"{continued.run_dir}/config.json").read())
    assert config["init_weights"] == summary.final_lora_weights and config["init_from_sha256"]
    # Step 0 is measured with the weights it starts from: the source's last held-out loss, said so.
    assert continued.val_loss_base == pytest.approx(summary.val_loss_final, abs=1e-5)
    assert continued.init_weights == summary.final_lora_weights
    assert " the LoRA beat the adapter it started from: " in verdict(continued) or \
        " the LoRA did not beat the adapter it started from: " in verdict(continued)
    fresh = train(TrainingRun(settings.__class__(**{**settings.__dict__, "run_name": None})).open())
    assert fresh.init_weights is None and " the base model: " in verdict(fresh)
    assert fresh.run_dir != continued.run_dir  # the starting weights are part of the run's key
    assert fresh.val_loss_base > summary.val_loss_final

    with pytest.raises(PipelineError, match=r"--init-from .*: a rank-16 adapter; pass --rank 16"):
        TrainingRun(settings.__class__(**{**again.__dict__, "rank": 8})).open()
    with pytest.raises(PipelineError, match="neither a finished run folder nor a PEFT adapter folder"):
        TrainingRun(settings.__class__(**{**again.__dict__, "init_from": str(tmp_path)})).open()
    # `champion` with no champion yet: a fresh LoRA, the very run folder of no --init-from.
    first_night = TrainingRun(settings.__class__(**{**settings.__dict__, "run_name": None, "init_from": "champion"}))
    assert first_night.run_dir == TrainingRun(settings.__class__(**{**settings.__dict__, "run_name": None})).run_dir


def test_a_run_from_an_adapter_killed_with_sigkill_continues_exactly(tmp_path, source):
    """`lora-pipeline train --init-from RUN`, killed (SIGKILL) after its first checkpoints, then
    the same command again: it continues after its last checkpoint, not from the adapter it
    started from, each step once, to the weights of a run never killed."""
    summary, settings = source
    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_API_KEY", "PREFECT_API_URL")}

    def command(name):
        return [CLI, "train", "--data", settings.data, "--base-model", settings.base_model, "--device", "cpu",
                "--backend", "local", "--batch", "4", "--max-steps", str(STEPS), "--save-every", "2",
                "--learning-rate", "3e-3", "--init-from", summary.run_dir, "--output-dir", str(tmp_path / "cli"),
                "--run-name", name]

    clean = train(TrainingRun(settings.__class__(**{
        **settings.__dict__, "run_name": "clean", "output_dir": str(tmp_path / "cli"), "val_data": None,
        "max_steps": STEPS, "init_from": summary.run_dir})).open())
    killed = tmp_path / "cli" / "killed"
    kill_after_steps(command("killed"), env, killed, 5)  # checkpoints at steps 2 and 4 behind it
    continued = subprocess.run(command("killed"), env=env, capture_output=True, text=True, timeout=300)
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "continuing after step" in continued.stdout + continued.stderr
    assert steps_logged(killed) == list(range(1, STEPS + 1))
    assert adapter_diff(clean.run_dir, killed) <= 1e-6


def test_a_tinker_run_starts_from_a_tinker_run_with_a_fresh_optimizer(tmp_path, small_data, monkeypatch):
    from tinker_server import SMOLLM2, TinkerTestServer

    with TinkerTestServer(models=[SMOLLM2]) as server:
        monkeypatch.setenv("TINKER_API_KEY", server.api_key)
        monkeypatch.setenv("TINKER_BASE_URL", server.base_url)
        settings = training_settings(small_data, tmp_path / "runs", run_name="first", backend="tinker",
                                     base_model=SMOLLM2, rank=8, max_steps=3, request_timeout=30)
        first = train(TrainingRun(settings).open())
        state = json.loads(open(f"{first.run_dir}/training_state/lora_pipeline.json").read())["state_path"]
        second = train(TrainingRun(settings.__class__(**{**settings.__dict__, "run_name": "second",
                                                         "init_from": first.run_dir})).open())
        # (The SDK's from-state call loads the weights in a session of its own, too.)
        loaded = [r for r in server.runs.values() if r.resumed_from == state]
        assert loaded and not any(r.optimizer_restored for r in loaded)
        assert sorted(r.steps for r in loaded)[-1] == 3 + 3  # its weights' 3 steps, then 3 more
        assert json.loads(open(f"{second.run_dir}/config.json").read())["init_weights"] == state
        with pytest.raises(PipelineError, match="a Tinker state trains on --backend tinker"):
            TrainingRun(settings.__class__(**{**settings.__dict__, "backend": "local", "init_from": state})).open()
