"""--init-from: a run starts from an existing adapter's weights with a fresh optimizer, on both
engines; the weights are part of the run's identity, and a crashed run still continues exactly."""

import json

import pytest
from safetensors.torch import load_file
from training import training_settings

from lora_pipeline.errors import PipelineError
from lora_pipeline.train import TrainingRun, train

pytestmark = pytest.mark.slow  # trains a model


class Crash(Exception):
    pass


@pytest.fixture
def source(tmp_path, small_data, tiny):
    """A finished run to start from, on the tiny model, with held-out data."""
    val = tmp_path / "held.val.jsonl"
    val.write_bytes(b"".join(small_data.read_bytes().splitlines(keepends=True)[-8:]))
    settings = training_settings(small_data, tmp_path / "runs", run_name="source", val_data=str(val),
                                 base_model=str(tiny), device="cpu", learning_rate=3e-3)
    return train(TrainingRun(settings).open()), settings


def _adapter(run_dir) -> dict:
    return load_file(f"{run_dir}/final_lora_weights/adapter_model.safetensors")


def test_a_run_starts_from_the_adapter_it_is_given_and_is_keyed_on_its_weights(tmp_path, source):
    summary, settings = source
    again = settings.__class__(**{**settings.__dict__, "run_name": None, "init_from": summary.run_dir})
    continued = train(TrainingRun(again).open())
    config = json.loads(open(f"{continued.run_dir}/config.json").read())
    assert config["init_weights"] == summary.final_lora_weights and config["init_from_sha256"]
    # Step 0 is measured with the weights it starts from: the source's last held-out loss.
    assert continued.val_loss_base == pytest.approx(summary.val_loss_final, abs=1e-5)
    fresh = train(TrainingRun(settings.__class__(**{**settings.__dict__, "run_name": None})).open())
    assert fresh.run_dir != continued.run_dir  # the starting weights are part of the run's key
    assert fresh.val_loss_base > summary.val_loss_final

    with pytest.raises(PipelineError, match=r"--init-from .*: a rank-16 adapter; pass --rank 16"):
        TrainingRun(settings.__class__(**{**again.__dict__, "rank": 8})).open()
    with pytest.raises(PipelineError, match="neither a finished run folder nor a PEFT adapter folder"):
        TrainingRun(settings.__class__(**{**again.__dict__, "init_from": str(tmp_path)})).open()
    # `champion` with no champion yet: a fresh LoRA, the very run folder of no --init-from.
    first_night = TrainingRun(settings.__class__(**{**settings.__dict__, "run_name": None, "init_from": "champion"}))
    assert first_night.run_dir == TrainingRun(settings.__class__(**{**settings.__dict__, "run_name": None})).run_dir


def test_a_crashed_run_from_an_adapter_continues_exactly(tmp_path, source):
    summary, settings = source
    start = dict(settings.__dict__, init_from=summary.run_dir, max_steps=6)
    clean = train(TrainingRun(settings.__class__(**{**start, "run_name": "clean"})).open())

    run = TrainingRun(settings.__class__(**{**start, "run_name": "crashed"})).open()
    step = run.step

    def crash(n):
        if n == 4:
            raise Crash("the process dies in step 4")
        return step(n)
    run.step = crash
    with pytest.raises(Crash):
        train(run)
    resumed = TrainingRun(settings.__class__(**{**start, "run_name": "crashed"})).open()
    assert resumed.first_step == 3  # after the checkpoint of step 2, not from the adapter again
    train(resumed)
    a, b = _adapter(clean.run_dir), _adapter(resumed.run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


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
