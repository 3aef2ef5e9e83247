
import pytest

from lora_pipeline.errors import PipelineError
from lora_pipeline.models import SMOLLM2, load_tokenizer
from lora_pipeline.render import render_conversations, renderer_for

CONVERSATION = [
    {"role": "system", "content": "You are Captain Byte."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "Arr! 4."},
    {"role": "user", "content": "And 3 plus 3?"},
    {"role": "assistant", "content": "Arr! 6."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return renderer_for(SMOLLM2, tokenizer)


def test_rendering_matches_the_models_chat_template(tokenizer, renderer):
    model_input, _ = renderer.build_supervised_example(CONVERSATION)
    template = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # The template ends the last turn with a newline that the model never has to produce.
    assert tokenizer.decode(model_input.to_ints()) == template.rstrip("\n")
    prompt = renderer.build_generation_prompt(CONVERSATION[:2])
    assert tokenizer.decode(prompt.to_ints()) == tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True)


def test_loss_only_on_assistant_tokens_including_end_of_turn(tokenizer, renderer):
    [datum], report = render_conversations([CONVERSATION], renderer, max_length=512)
    targets = datum.loss_fn_inputs["target_tokens"].to_torch().tolist()
    weights = datum.loss_fn_inputs["weights"].to_torch().tolist()
    trained = tokenizer.decode([t for t, w in zip(targets, weights) if w > 0])
    assert trained == "Arr! 4.<|im_end|>Arr! 6.<|im_end|>"
    assert report.trained_tokens == sum(weights)


def test_length_limit_truncates_or_drops_and_counts(renderer):
    long = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]
    only_prompt_fits = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Ok"}]
    data, report = render_conversations([CONVERSATION, long, only_prompt_fits], renderer, 64, "truncate")
    assert (report.kept, report.truncated) == (2, 1)
    assert max(d.model_input.length for d in data) <= 64
    assert report.dropped == {"no assistant tokens within the length limit": 1}
    data, report = render_conversations([CONVERSATION, long, only_prompt_fits], renderer, 64, "drop")
    assert report.kept == 1 and report.dropped == {"longer than 64 tokens": 2}
    assert "2 dropped (longer than 64 tokens)" in report.summary()


def test_unknown_overflow_policy_is_an_error(renderer):
    with pytest.raises(PipelineError, match="on_overflow"):
        render_conversations([CONVERSATION], renderer, 64, "squash")
