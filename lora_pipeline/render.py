"""Chat messages -> token sequences with per-token loss weights, via tinker-cookbook renderers."""

from collections import Counter
from dataclasses import dataclass, field

import tinker
from tinker_cookbook import model_info, renderers
from tinker_cookbook.exceptions import ConfigurationError
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised.common import datum_from_model_input_weights

from .errors import PipelineError
from .settings import OVERFLOW_CHOICES


def renderer_for(base_model: str, tokenizer):
    """The cookbook's recommended renderer for models it knows (Qwen3, Llama 3, ...).

    Others, such as SmolLM2, are taken to speak ChatML when the tokenizer has ChatML's markers;
    cookbook's `qwen3_instruct` renders exactly ChatML (tests/test_render.py checks it against
    SmolLM2's own chat template).
    """
    try:
        name = model_info.get_recommended_renderer_name(base_model)
    except ConfigurationError:
        if tokenizer.convert_tokens_to_ids("<|im_start|>") in (None, tokenizer.unk_token_id):
            raise PipelineError(f"no chat renderer known for {base_model}: it neither is a model "
                                "tinker-cookbook knows nor uses ChatML") from None
        name = "qwen3_instruct"
    return renderers.get_renderer(name, tokenizer)


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


def render_conversations(conversations, renderer, max_length: int, on_overflow: str = "truncate"):
    """Datums for training (loss on every assistant message, end-of-turn token included) and a
    report that accounts for every conversation.

    A conversation longer than `max_length` tokens is cut at the limit or dropped, per
    `on_overflow`; one whose cut leaves no assistant token to learn from is dropped either way.
    """
    if on_overflow not in OVERFLOW_CHOICES:
        raise PipelineError(f"on_overflow must be one of {OVERFLOW_CHOICES}, not {on_overflow!r}")
    report = RenderReport()
    datums: list[tinker.Datum] = []
    for messages in conversations:
        report.examples += 1
        model_input, weights = renderer.build_supervised_example(
            messages, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES
        )
        too_long = model_input.length > max_length
        if too_long and on_overflow == "drop":
            report.dropped[f"longer than {max_length} tokens"] += 1
            continue
        datum = datum_from_model_input_weights(model_input, weights, max_length=max_length)
        trained = int(sum(datum.loss_fn_inputs["weights"].data))
        if trained == 0:
            report.dropped["no assistant tokens within the length limit"] += 1
            continue
        report.truncated += too_long
        report.kept += 1
        report.tokens += datum.model_input.length
        report.trained_tokens += trained
        datums.append(datum)
    return datums, report

