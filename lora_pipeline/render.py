"""Conversations -> token ids with per-token loss weights, exactly as the base model's own chat
template renders them.

An adapter is served elsewhere through `tokenizer.apply_chat_template`, so training and sampling
use that template's token ids, not a re-implementation of it: a default system prompt the
template inserts, its newline after the last end-of-turn token, a Qwen3 empty think block, all
are trained on as the model will see them. The loss weights are found by rendering prefixes:
the conversation up to an assistant turn with the generation prompt added must be a token
prefix of the whole conversation; the tokens from there up to and including the end-of-turn
token are what the model produces when served, and carry weight 1. Everything else, the
template's newline after an end-of-turn token included, has weight 0.
"""

import bisect
import json
from collections import Counter
from dataclasses import dataclass, field

import tinker
import torch
from tinker_cookbook.supervised.common import datum_from_model_input_weights

from .errors import PipelineError
from .settings import OVERFLOW_CHOICES

# What a template without a tool-call format of its own is given instead (see tool_fallback).
# The wording is Qwen3's (and Hermes'), so one adapter's tool calls read the same on either.
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_CLOSING = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                 "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                 '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


class Unrenderable(ValueError):
    """A conversation this template cannot render as training data; the message is the reason."""


def tool_call_text(call: dict) -> str:
    function = call["function"]
    return ("<tool_call>\n" + json.dumps({"name": function["name"], "arguments": function["arguments"]},
                                         ensure_ascii=False) + "\n</tool_call>")


def tool_fallback(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Tool calls for a chat template that has no format for them: plain role/content messages.

    The tool list goes into the system message (after its text, if any); an assistant's tool
    calls become `<tool_call>{"name": ..., "arguments": ...}</tool_call>` lines after its text;
    the results of consecutive tool messages become one user turn of `<tool_response>` blocks.
    This is how Qwen3's template writes them. To serve an adapter trained this way, pass the
    same messages through this function before `apply_chat_template`.
    """
    out = []
    if tools:
        listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        system = messages[0]["content"] + "\n\n" if messages and messages[0]["role"] == "system" else ""
        out.append({"role": "system", "content": system + TOOLS_PREAMBLE + listed + TOOLS_CLOSING})
        if system:
            messages = messages[1:]
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            parts = ([m["content"]] if m["content"] else []) + [tool_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif m["role"] == "tool":
            block = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if out and out[-1].get("from_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "from_tool": True})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return [{"role": m["role"], "content": m["content"]} for m in out]


# A conversation that any chat template must render with the prefix property; checked once per
# tokenizer, so that a template this renderer cannot follow fails before any data is read.
_PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
          {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 plus 3?"},
          {"role": "assistant", "content": "6."}]
_TOOL_PROBE_NAME, _TOOL_PROBE_RESULT = "probe_lookup_7f3a", "probe-result-5c1e"
_TOOL_PROBE = [{"role": "user", "content": "Look it up."},
               {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                   "name": _TOOL_PROBE_NAME, "arguments": {"q": "x"}}}]},
               {"role": "tool", "content": _TOOL_PROBE_RESULT},
               {"role": "assistant", "content": "Found it."}]
_TOOL_PROBE_TOOLS = [{"type": "function", "function": {
    "name": _TOOL_PROBE_NAME, "description": "probe", "parameters": {"type": "object", "properties": {}}}}]


class ChatTemplateRenderer:
    """The interface the engines use (`build_supervised_example`, `build_generation_prompt`,
    `get_stop_sequences`), on the tokenizer's own chat template."""

    def __init__(self, tokenizer, name: str = "this model"):
        self.tokenizer, self.name = tokenizer, name
        if not getattr(tokenizer, "chat_template", None):
            raise PipelineError(f"{name}: its tokenizer has no chat template; use an instruction-tuned "
                                "model whose tokenizer_config.json has one")
        self.end_of_turn = tokenizer.eos_token_id
        if self.end_of_turn is None:
            raise PipelineError(f"{name}: its tokenizer names no end-of-sequence token, so the end of an "
                                "assistant turn cannot be found")
        # Text that the tokenizer turns into control tokens: in a message it would end a turn early.
        self.control_texts = [t for t in tokenizer.all_special_tokens if t]
        self.added_ids = set(tokenizer.added_tokens_decoder)
        self.native_tools = self._renders_tools()
        probes = [{"messages": _PROBE}, {"messages": _PROBE[1:]}, {"messages": _TOOL_PROBE, "tools": _TOOL_PROBE_TOOLS}]
        for probe in probes:
            try:
                self.encode([probe], strict=True)
            except Unrenderable as e:
                raise PipelineError(f"{name}: its chat template cannot be followed token for token ({e}); "
                                    "training on it would not match what the model is served with") from None

    def _renders_tools(self) -> bool:
        try:
            text = self.tokenizer.apply_chat_template(_TOOL_PROBE, tools=_TOOL_PROBE_TOOLS, tokenize=False)
        except Exception:  # a template that rejects tool messages (Jinja raises anything)
            return False
        return all(s in text for s in (_TOOL_PROBE_NAME + '"', _TOOL_PROBE_RESULT, '"description": "probe"'))

    def _text(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
        if not self.native_tools and (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)):
            messages, tools = tool_fallback(messages, tools), None
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _texts(self, conversation: dict) -> list[str]:
        """The whole conversation, then each assistant turn's prompt."""
        messages, tools = conversation["messages"], conversation.get("tools")
        for text in _strings(conversation):
            for control in self.control_texts:
                if control in text:
                    raise Unrenderable(f"text contains the model's control token {control}")
        try:
            return [self._text(messages, tools, False)] + [
                self._text(messages[:i], tools, True) for i, m in enumerate(messages) if m["role"] == "assistant"]
        except Exception as e:  # Jinja templates refuse what they do not support with any error
            raise Unrenderable(f"the chat template refused it ({type(e).__name__}: {str(e)[:200]})") from None

    def encode(self, conversations: list[dict], strict: bool = False) -> list[tuple[list[int], list[int]] | str]:
        """For each conversation (`{"messages": [...], "tools": [...]}`), its token ids and 0/1
        loss weights, or the reason it cannot be rendered (`strict` raises Unrenderable).

        The conversations are tokenized in one batch. Of each assistant turn's prompt only the
        text after its last added token (`assistant\\n` after `<|im_start|>`) is tokenized
        again: a tokenizer splits text at added tokens before anything else, so up to there
        the prompt's tokens are the whole conversation's. That the rest agrees too is checked."""
        rendered = []  # (whole text, where each assistant turn's prompt ends) or a reason
        for conversation in conversations:
            try:
                whole, *prompts = self._texts(conversation)
                if not all(whole.startswith(p) for p in prompts):
                    raise Unrenderable("the chat template writes an earlier turn differently once later turns follow")
                rendered.append((whole, [len(p) for p in prompts]))
            except Unrenderable as e:
                if strict:
                    raise
                rendered.append(str(e))
        texts = [r for r in rendered if not isinstance(r, str)]
        encoded = self.tokenizer([t for t, _ in texts], add_special_tokens=False,
                                 return_offsets_mapping=True) if texts else {"input_ids": []}
        tails = []  # per prompt: (conversation, token index where its last segment starts, segment)
        for n, (text, prompt_ends) in enumerate(texts):
            ids, offsets = encoded["input_ids"][n], encoded["offset_mapping"][n]
            token_ends = [end for _, end in offsets]
            for prompt_end in prompt_ends:
                i = bisect.bisect_right(token_ends, prompt_end) - 1
                while i >= 0 and ids[i] not in self.added_ids:
                    i -= 1
                tails.append((n, i + 1, text[token_ends[i] if i >= 0 else 0:prompt_end]))
        tail_ids = iter(self.tokenizer([t for _, _, t in tails], add_special_tokens=False)["input_ids"] if tails else [])
        starts = [[] for _ in texts]
        for (n, first, _), tail in zip(tails, tail_ids):
            ids = encoded["input_ids"][n]
            starts[n].append(first + len(tail) if ids[first:first + len(tail)] == tail else None)
        results, n = [], 0
        for r in rendered:
            if not isinstance(r, str):
                try:
                    r = self._weights(encoded["input_ids"][n], starts[n])
                except Unrenderable as e:
                    if strict:
                        raise
                    r = str(e)
                n += 1
            results.append(r)
        return results

    def _weights(self, ids: list[int], starts: list[int | None]) -> tuple[list[int], list[int]]:
        """Weight 1 from where each assistant turn's prompt ends through its end-of-turn token."""
        weights = [0] * len(ids)
        for start in starts:
            if start is None:
                raise Unrenderable("an assistant turn's first characters merge with the template's own tokens "
                                   "(leading whitespace?)")
            try:
                end = ids.index(self.end_of_turn, start)
            except ValueError:
                raise Unrenderable("an assistant turn has no end-of-turn token") from None
            weights[start:end + 1] = [1] * (end + 1 - start)
        return ids, weights

    # -- the interface the engines and the training loop use --------------------------------
    def build_supervised_example(self, messages: list[dict], tools: list[dict] | None = None):
        """(ModelInput, weights): the template's token ids, weight 1 on what the model says."""
        try:
            [(ids, weights)] = self.encode([{"messages": messages, "tools": tools}], strict=True)
        except Unrenderable as e:
            raise PipelineError(f"cannot render this conversation for {self.name}: {e}") from None
        return tinker.ModelInput.from_ints(ids), torch.tensor(weights, dtype=torch.float32)

    def build_generation_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> tinker.ModelInput:
        """What `apply_chat_template(messages, add_generation_prompt=True)` gives, as tokens."""
        text = self._text(messages, tools, True)
        return tinker.ModelInput.from_ints(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_stop_sequences(self) -> list[int]:
        return [self.end_of_turn]


def _strings(value):
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def renderer_for(base_model: str, tokenizer) -> ChatTemplateRenderer:
    return ChatTemplateRenderer(tokenizer, base_model)


@dataclass
class RenderReport:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        text = f"{self.kept}/{self.examples} examples, {self.tokens} tokens ({self.trained_tokens} trained)"
        if self.truncated:
            text += f", {self.truncated} truncated"
        for reason, n in self.dropped.items():
            text += f", {n} dropped ({reason})"
        return text


def fit(encoded, max_length: int, on_overflow: str) -> tuple[str | None, bool, int]:
    """(why it is dropped or None, whether it is cut, trained tokens) for one conversation's
    `encode` result under the length limit. The last token is never a training input (nothing
    follows it to predict), so its weight does not count; prepare and training agree on this."""
    if isinstance(encoded, str):
        return encoded, False, 0
    ids, weights = encoded
    too_long = len(ids) > max_length
    if too_long and on_overflow == "drop":
        return f"longer than {max_length} tokens", True, 0
    trained = sum(weights[1:max_length])
    if trained == 0:
        return "no assistant tokens within the length limit", too_long, 0
    return None, too_long, trained


def render_conversations(conversations, renderer, max_length: int, on_overflow: str = "truncate",
                         chunk: int = 256):
    """Datums for training (loss on every assistant turn, end-of-turn token included) and a
    report that accounts for every conversation.

    A conversation longer than `max_length` tokens is cut at the limit or dropped, per
    `on_overflow`; one whose cut leaves no assistant token to learn from is dropped either way,
    and so is one the chat template cannot render (the report says why).
    """
    if on_overflow not in OVERFLOW_CHOICES:
        raise PipelineError(f"on_overflow must be one of {OVERFLOW_CHOICES}, not {on_overflow!r}")
    report = RenderReport()
    datums: list[tinker.Datum] = []
    for start in range(0, len(conversations), chunk):
        for encoded in renderer.encode(conversations[start:start + chunk]):
            report.examples += 1
            reason, cut, trained = fit(encoded, max_length, on_overflow)
            if reason:
                report.dropped[reason] += 1
                continue
            ids, weights = encoded
            datum = datum_from_model_input_weights(tinker.ModelInput.from_ints(ids),
                                                   torch.tensor(weights, dtype=torch.float32), max_length=max_length)
            report.truncated += cut
            report.kept += 1
            report.tokens += datum.model_input.length
            report.trained_tokens += trained
            datums.append(datum)
    return datums, report
