"""The local engine really trains, deterministically, and saves what it claims to save."""

import json

import peft
import pytest
import torch
from tinker import types

from conftest import SAMPLE
from lora_pipeline.data import read_chat_jsonl
from lora_pipeline.engines.local import LocalEngine
from lora_pipeline.errors import PipelineError
from lora_pipeline.models import SMOLLM2, load_model
from lora_pipeline.render import render_conversations

pytestmark = pytest.mark.slow  # trains the real model

ADAM = types.AdamParams(learning_rate=5e-4)


def make(tmp_path, seed=0):
    return LocalEngine(SMOLLM2, rank=8, seed=seed, root=tmp_path)


def batches(engine, n, size=4):
    data, _ = render_conversations(read_chat_jsonl(SAMPLE)[: n * size], engine.renderer, 256)
    return [data[i * size:(i + 1) * size] for i in range(n)]


def step(engine, batch) -> float:
    fb = engine.forward_backward(batch)
    engine.optim_step(ADAM).result()
    tokens = sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in batch)
    return fb.result().metrics["loss:sum"] / tokens


def lora_weights(engine) -> dict:
    return {k: v.detach().clone() for k, v in engine.model.named_parameters() if "lora_" in k}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_loss_falls_when_training_on_the_same_batch(tmp_path):
    engine = make(tmp_path)
    [batch] = batches(engine, 1)
    losses = [step(engine, batch) for _ in range(5)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_forward_matches_forward_backward_and_changes_nothing(tmp_path):
    engine = make(tmp_path)
    [batch] = batches(engine, 1)
    before = lora_weights(engine)
    out = engine.forward(batch).result()
    assert max_diff(before, lora_weights(engine)) == 0
    fb = engine.forward_backward(batch).result()
    for a, b in zip(out.loss_fn_outputs, fb.loss_fn_outputs):
        assert torch.allclose(a["logprobs"].to_torch(), b["logprobs"].to_torch(), atol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-5)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = []
    for seed in (0, 0, 1):
        engine = make(tmp_path / str(len(runs)), seed=seed)
        for batch in batches(engine, 2):
            step(engine, batch)
        runs.append(lora_weights(engine))
    assert max_diff(runs[0], runs[1]) == 0
    assert max_diff(runs[0], runs[2]) > 1e-3


def test_save_state_then_load_state_continues_exactly(tmp_path):
    engine = make(tmp_path / "a")
    b1, b2, b3, b4 = batches(engine, 4)
    step(engine, b1), step(engine, b2)
    saved = engine.save_state("checkpoint_step_2").result()
    step(engine, b3), step(engine, b4)
    uninterrupted = lora_weights(engine)

    resumed = make(tmp_path / "b", seed=123)  # a different init, overwritten by the load
    resumed.load_state(saved)
    step(resumed, b3), step(resumed, b4)
    assert max_diff(uninterrupted, lora_weights(resumed)) <= 1e-6


def test_load_state_refuses_another_rank(tmp_path):
    engine = make(tmp_path)
    saved = engine.save_state("s").result()
    other = LocalEngine(SMOLLM2, rank=4, seed=0)
    with pytest.raises(PipelineError, match="rank 8"):
        other.load_state(saved)


def test_sampler_weights_load_with_peft(tmp_path):
    engine = make(tmp_path)
    for batch in batches(engine, 2):
        step(engine, batch)
    path = engine.save_weights_for_sampler("final").result()
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2
    model = peft.PeftModel.from_pretrained(load_model(SMOLLM2), path)
    ids = torch.tensor([engine.tokenizer.encode("Arr! The capital of France be Paris.")])
    with torch.no_grad():
        expected = engine.model(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)


def test_sample_is_batched_seeded_and_stops(tmp_path):
    engine = make(tmp_path)
    prompts = [engine.renderer.build_generation_prompt([{"role": "user", "content": q}])
               for q in ("What is the capital of France?", "Write a long story about the sea.")]
    params = types.SamplingParams(max_tokens=12, temperature=0.8, seed=5)
    rng = torch.get_rng_state()
    first = engine.sample(prompts, params).result()
    assert torch.equal(rng, torch.get_rng_state())  # sampling leaves the training RNG alone
    again = engine.sample(prompts, params).result()
    assert [s.tokens for s in first] == [s.tokens for s in again]
    assert len(first) == 2 and all(len(s.tokens) <= 12 for s in first)
    story = first[1]
    assert story.stop_reason == "length" and len(story.tokens) == 12
    [greedy] = engine.sample(prompts[:1], types.SamplingParams(max_tokens=40, temperature=0)).result()
    assert greedy.stop_reason == "stop" and engine.stop_tokens[0] not in greedy.tokens

    # Progress as it generates, one report a position: answers finished, tokens so far.
    reports = []
    both = engine.sample([prompts[0], prompts[0], prompts[1]], types.SamplingParams(max_tokens=40, temperature=0),
                         progress=lambda *r: reports.append(r)).result()
    assert [steps for _, _, steps in reports] == list(range(1, len(reports) + 1))
    assert reports[-1][:2] == (2, sum(len(s.tokens) for s in both))  # the short answers ended, the story did not
    assert [done for done, _, _ in reports] == sorted(done for done, _, _ in reports)
    assert reports[len(greedy.tokens) - 1][0] == 0 and reports[len(greedy.tokens)][0] == 2
