"""A tiny randomly initialised chat model that the tests build and save themselves: a Llama of
hidden size 64 and 2 layers, with a byte-level BPE tokenizer trained on the sample chats that
carries SmolLM2's chat template. It is an ordinary transformers model folder, so it exercises
`--base-model FOLDER`; it needs no download nor the SmolLM2 weights package (which GPU machines
may lack), and a training step takes milliseconds on any device."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import SAMPLE

# SmolLM2-135M-Instruct's own template (test_models checks that it still is).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2

# Tests parametrised over devices run on the CPU everywhere and on the GPU where there is one
# (`pytest -m gpu` runs those alone).
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]


def chat_tokenizer() -> PreTrainedTokenizerFast:
    texts = [m["content"] for line in SAMPLE.read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + ["system user assistant"], trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=SMOLLM2_CHAT_TEMPLATE)


def build_tiny_model(folder: Path, seed: int = 0, width: int = 64) -> Path:
    """Write the model and its tokenizer to `folder`, the same for the same seed; `width`, its
    hidden size, for the tests that need larger LoRA files or another shape."""
    tokenizer = chat_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """One tiny model folder per test session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
