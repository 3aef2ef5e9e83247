"""The training loop on the local engine, without Prefect."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, SAMPLE
from lora_pipeline.errors import PipelineError
from lora_pipeline.evaluate import compare, load_prompts
from lora_pipeline.settings import SampleSettings
from lora_pipeline.engines.local import length_chunks
from lora_pipeline.train import TrainingRun, epoch_batches, normalised, scheduled_lr, train, trained_tokens
from training import adapter_diff, steps_logged, training_settings


@pytest.mark.slow
def test_run_folder_layout_and_log(tmp_path, small_data, tiny, monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", "tml-do-not-leak-this")
    val = tmp_path / "val.jsonl"
    val.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[-10:]))
    summary = train(TrainingRun(training_settings(small_data, tmp_path, run_name="r1", val_data=str(val),
                                                  base_model=str(tiny), device="cpu", learning_rate=3e-3)).open())
    run = tmp_path / "r1"
    assert sorted(p.name for p in run.iterdir()) == [
        "best_lora_weights.json", "checkpoint_step_2", "checkpoint_step_4", "checkpoints.jsonl",
        "config.json", "final_lora_weights", "summary.json", "training_log.json", "training_state",
        "validation_log.json"]
    val_log = json.loads((run / "validation_log.json").read_text())
    assert [r["step"] for r in val_log] == [0, 2, 4]
    assert val_log[-1]["val_loss"] < val_log[0]["val_loss"]  # better than the base on held-out data
    assert summary.val_loss_base == val_log[0]["val_loss"]
    best = json.loads((run / "best_lora_weights.json").read_text())
    assert best["val_loss"] == min(r["val_loss"] for r in val_log[1:])
    log = json.loads((run / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(set(r) == {"step", "loss", "tokens", "lr", "time_s"} for r in log)
    assert log[0]["lr"] == 3e-3 and log[-1]["lr"] < log[0]["lr"]
    config = json.loads((run / "config.json").read_text())
    assert config["backend"] == "local" and config["total_steps"] == 4 and config["batch"] == 4
    assert summary.final_lora_weights == str(run / "final_lora_weights")
    registry = [json.loads(line) for line in (run / "checkpoints.jsonl").read_text().splitlines()]
    assert [(e["name"], e["step"]) for e in registry] == [
        ("checkpoint_step_2", 2), ("checkpoint_step_4", 4), ("final_lora_weights", 4),
        ("training_state", 4)]
    assert registry[0]["state_path"] == str(run / "checkpoint_step_2")
    assert registry[2]["sampler_path"] == str(run / "final_lora_weights")
    for path in run.rglob("*"):
        if path.is_file():
            assert b"do-not-leak" not in path.read_bytes(), path


def test_a_run_folder_is_named_after_its_model_and_key(tmp_path, small_data):
    """The old workflow's name for a run of the default model: lora_<model>_<eight hex digits>."""
    run_dir = Path(TrainingRun(training_settings(small_data, tmp_path, cli_defaults=True)).run_dir)
    assert run_dir.parent == tmp_path
    assert re.fullmatch(r"lora_HuggingFaceTB_SmolLM2-135M-Instruct_[0-9a-f]{8}", run_dir.name), run_dir.name


def test_batches_are_a_function_of_data_seed_and_epoch():
    a, b, c = (epoch_batches(40, 8, seed, 0) for seed in (0, 0, 1))
    assert a == b and a != c
    assert len(a) == 5 and all(len(batch) == 8 for batch in a)  # one epoch of 40 // 8
    assert sorted(j for batch in a for j in batch) == list(range(40))  # every example once per epoch
    assert epoch_batches(40, 8, 0, 1) != a  # and a new order the next
    assert len(epoch_batches(43, 8, 0, 0)) == 5  # the last partial batch is dropped


def test_a_step_is_the_mean_loss_per_trained_token_of_its_batch(tmp_path, small_data, tiny):
    """Each datum's weights are divided by the batch's trained tokens, so the engines' summed
    cross_entropy is the per-token mean (a step's size does not depend on how many tokens its
    batch holds), and the logged loss is that mean."""
    run = TrainingRun(training_settings(small_data, tmp_path, cli_defaults=True, batch=4, max_steps=1,
                                        run_name="mean", base_model=str(tiny), device="cpu")).open()
    try:
        batch = run.batch(1)
        weights = [d.loss_fn_inputs["weights"].to_torch() for d in batch]
        scaled = [d.loss_fn_inputs["weights"].to_torch() for d in normalised(batch)]
        assert sum(float(w.sum()) for w in scaled) == pytest.approx(1.0)
        assert all(((w == 0) == (v == 0)).all() for w, v in zip(weights, scaled))
        mean_nll = run.engine.forward(batch).result().metrics["loss:sum"] / trained_tokens(batch)
        assert run.step(1)["loss"] == pytest.approx(mean_nll, rel=1e-4)
    finally:
        run.close()


def test_length_chunks_split_a_batch_where_padding_costs_more_than_a_call():
    assert length_chunks([10, 10, 10]) == [[0, 1, 2]]  # nothing to save
    assert length_chunks([300, 12, 290, 15], call_cost=32) == [[1, 3], [2, 0]]  # short ones apart
    assert length_chunks([300, 12, 290, 15], call_cost=10**6) == [[1, 3, 2, 0]]  # calls too dear
    lengths = [(37 * i) % 200 + 5 for i in range(8)]
    chunks = length_chunks(lengths)
    assert sorted(i for c in chunks for i in c) == list(range(8))  # every example once
    computed = sum(max(lengths[i] for i in c) * len(c) for c in chunks)
    assert computed + 32 * len(chunks) <= max(lengths) * 8 + 32  # never worse than one padded call


def test_a_batch_computed_in_length_chunks_has_the_whole_batchs_loss_and_gradient(tmp_path, small_data, tiny,
                                                                                   monkeypatch):
    import lora_pipeline.engines.local as local

    run = TrainingRun(training_settings(small_data, tmp_path, cli_defaults=True, batch=8, max_steps=1,
                                        run_name="chunks", base_model=str(tiny), device="cpu")).open()
    try:
        by_length = sorted(run.examples, key=lambda d: d.model_input.length)
        batch = normalised(by_length[:4] + by_length[-4:])  # short and long
        assert len(length_chunks([d.model_input.length for d in batch])) > 1
        lora = [p for p in run.engine.model.parameters() if p.requires_grad]

        def loss_and_grads():
            for p in lora:
                p.grad = None
            out = run.engine.forward_backward(batch).result()
            return out, [p.grad.clone() for p in lora]
        chunked, chunked_grads = loss_and_grads()
        monkeypatch.setattr(local, "length_chunks", lambda lengths: [list(range(len(lengths)))])
        whole, whole_grads = loss_and_grads()
    finally:
        run.close()
    assert chunked.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-5)
    for a, b in zip(chunked.loss_fn_outputs, whole.loss_fn_outputs):  # each example's log-probs, in order
        assert a["logprobs"].to_torch().shape == b["logprobs"].to_torch().shape
        assert torch.allclose(a["logprobs"].to_torch(), b["logprobs"].to_torch(), atol=1e-4)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(chunked_grads, whole_grads))


def test_learning_rate_decays_linearly_from_its_peak():
    assert [scheduled_lr(1e-3, s, 4) for s in (1, 2, 3, 4)] == [1e-3, 7.5e-4, 5e-4, 2.5e-4]


@pytest.mark.parametrize("change, message", [
    ({"data": "missing.jsonl"}, "file not found"),
    ({"backend": "gpu"}, "choose one of auto, local, tinker"),
    ({"base_model": "no/such-model-here"}, "hub cannot be reached"),
    ({"backend": "tinker"}, "Missing TINKER_API_KEY"),
    ({"batch": 0}, r"--batch \(batch\) 0: must be at least 1"),
    ({"batch": 41}, "fewer than one batch"),
])
def test_bad_inputs_fail_before_a_run_folder_exists(tmp_path, small_data, change, message):
    with pytest.raises(PipelineError, match=message):
        TrainingRun(training_settings(small_data, tmp_path / "out", cli_defaults=True, **change)).open()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_persona_is_learned_from_the_sample_data(tmp_path):
    """The demo's promise: a short CPU run makes the LoRA answer as Captain Byte."""
    cfg = training_settings(SAMPLE, tmp_path, batch=8, max_steps=30, save_every=0, run_name="persona")
    summary = train(TrainingRun(cfg).open())
    log = json.loads((tmp_path / "persona" / "training_log.json").read_text())
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < first / 3, (first, last)
    out = compare(summary.final_lora_weights, load_prompts(str(PROMPTS)),
                  SampleSettings(compare_base=True, max_tokens=8, temperature=0))  # "Arr!" opens an answer
    lora = [r["lora_response"].startswith("Arr!") for r in out["results"]]
    base = [r["base_response"].startswith("Arr!") for r in out["results"]]
    assert sum(lora) >= 0.8 * len(lora) and not any(base), out["results"]


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_retried_step_is_applied_exactly_once(tmp_path, small_data, tiny, fail_at):
    """A failure after forward_backward was applied (its gradients are in the engine) and a
    retry: the final adapter equals an uninterrupted run's."""
    on_tiny = dict(base_model=str(tiny), device="cpu")
    train(TrainingRun(training_settings(small_data, tmp_path, run_name="clean", **on_tiny)).open())

    with TrainingRun(training_settings(small_data, tmp_path, run_name="retried", **on_tiny)).open() as run:
        run.validate(0)
        real_optim_step = run.engine.optim_step
        for n in run.steps_left():
            if n == fail_at:
                run.engine.optim_step = lambda adam: (_ for _ in ()).throw(ConnectionError("injected"))
                with pytest.raises(ConnectionError):
                    run.step(n)
                run.engine.optim_step = real_optim_step
            run.step(n)  # the retry, for the failed step
            if run.saves_at(n):
                run.save_checkpoint(n)
        run.finish()

    assert adapter_diff(tmp_path / "clean", tmp_path / "retried") <= 1e-6
    assert steps_logged(tmp_path / "retried") == [1, 2, 3, 4]
