"""Every setting of every stage, defined once: its type, default, help text and valid range.

The CLI's flags, the Prefect flows' parameters (what the UI's run form shows) and a run's
config.json are all derived from these dataclasses, so a new setting is one field here plus
its use. This module imports nothing heavy: `lora-pipeline --help` reads it without torch.

Settings that several stages share (the base model, the seed, the length limit, the
deadline of a remote call) live in small mixins, so that they too are defined once.
"""

import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import PipelineError

# Settings with fixed choices are typed as such: the CLI offers them as choices, and the Prefect
# UI's run form as a drop-down (Prefect reads the type into the parameter schema as an enum).
Backend = Literal["auto", "local", "tinker"]
Overflow = Literal["truncate", "drop"]
Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16"]
Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "question_answer", "columns"]
BACKENDS, OVERFLOW_CHOICES, DEVICES, DTYPES, FORMATS = (typing.get_args(t) for t in (Backend, Overflow, Device, Dtype, Format))


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The values a setting may take, if its type is a Literal."""
    return typing.get_args(f.type) if typing.get_origin(f.type) is Literal else None


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
            min: float | None = None, above: float | None = None,
            max: float | None = None, below: float | None = None, pattern: tuple[str, str] | None = None,
            shapes_training: bool = False):
    """A dataclass field with what the CLI and the checks need: help text, an optional flag
    name other than the field's, bounds (`min`/`max` inclusive, `above`/`below` exclusive;
    numbers must also be finite) and, for text, a (regex, rule in words) pattern. Its choices,
    if any, are its Literal type's. `shapes_training`: a training setting that changes the
    steps' arithmetic, so a run folder is continued only with the same value, and its name is
    keyed on it (see resume_keys)."""
    metadata = {"help": help, "flag": flag, "pattern": pattern, "shapes_training": shapes_training,
                "bounds": {k: v for k, v in (("min", min), ("above", above), ("max", max), ("below", below))
                           if v is not None}}
    return field(default=default, metadata=metadata)


# A run folder's name: one path component, so that the folder is always inside --output-dir.
FOLDER_NAME = (r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}",
               "one folder name: letters, digits, '.', '_' and '-', starting with a letter or digit, "
               "at most 100 characters")


def resume_keys(cls) -> tuple[str, ...]:
    """The settings of `cls` that shape a training's steps (setting(shapes_training=True))."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("shapes_training"))


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _check_field(obj, f: dataclasses.Field) -> None:
    value = getattr(obj, f.name)
    if isinstance(value, (list, tuple)):  # a sweep's values: each is checked, and one is needed
        if not value:
            raise PipelineError(f"{flag_name(f)} ({f.name}): give at least one value")
        for item in value:
            _check_value(f, item)
    elif value is not None:
        _check_value(f, value)


def _check_value(f: dataclasses.Field, value) -> None:
    where = f"{flag_name(f)} ({f.name})"
    choices = choices_of(f)
    if choices and value not in choices:
        raise PipelineError(f"{where} {value!r}: choose one of {', '.join(choices)}")
    pattern = f.metadata.get("pattern")
    if pattern and not re.fullmatch(pattern[0], value):
        raise PipelineError(f"{where} {value!r}: must be {pattern[1]}")
    bounds = f.metadata.get("bounds") or {}
    if not bounds or isinstance(value, bool):
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PipelineError(f"{where} {value!r}: must be a finite number")
    rules = {"min": (lambda b: value >= b, "at least"), "above": (lambda b: value > b, "above"),
             "max": (lambda b: value <= b, "at most"), "below": (lambda b: value < b, "below")}
    for name, bound in bounds.items():
        ok, words = rules[name]
        if not ok(bound):
            raise PipelineError(f"{where} {value!r}: must be {words} {bound if isinstance(bound, int) else f'{bound:g}'}")


class Checked:
    """Checks every field against its choices and bounds; call before anything runs."""

    def check(self) -> None:
        for f in dataclasses.fields(self):
            _check_field(self, f)


# -- settings shared by several stages --------------------------------------------------------
@dataclass(kw_only=True)
class BaseModelChoice:
    base_model: str | None = setting(
        None, "the base model: a hub id or a transformers model folder (default: SmolLM2-135M-Instruct "
              "locally, Qwen/Qwen3-8B on tinker; `test`: the base recorded with the adapter)", shapes_training=True)


@dataclass(kw_only=True)
class Seeded:
    # At most 2**32 - 1: what every generator it seeds takes (torch refused 2**64 with a traceback).
    seed: int = setting(0, "random seed: data sample and split, LoRA initialisation, batch order, sampling",
                        min=0, max=2**32 - 1, shapes_training=True)


@dataclass(kw_only=True)
class LengthLimit:
    max_length: int = setting(1024, "token limit per example", min=1, shapes_training=True)
    on_overflow: Overflow = setting("truncate", "what to do with longer examples", shapes_training=True)


@dataclass(kw_only=True)
class Placement:
    device: Device = setting("auto", "where the local engine computes: a CUDA GPU when there is one (auto), cpu "
                                     "or cuda")
    dtype: Dtype = setting("auto", "the local engine's base weights: bfloat16 on a GPU that has it (auto), float32 "
                                   "elsewhere; the LoRA always trains in float32")


@dataclass(kw_only=True)
class Deadline:
    # At most a day: a longer wait is no deadline, and the OS's timers refuse a huge one.
    request_timeout: float = setting(120.0, "seconds any one Tinker call may take before it is retried",
                                     above=0, max=86400)


# -- the stages ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class PrepareSettings(Checked, BaseModelChoice, Seeded, LengthLimit):
    """Any common dataset shape in, validated chat JSONL out."""
    dataset: str = setting(help="hub dataset id, or a local .jsonl/.json/.parquet/.csv file or folder")
    output: str = setting(help="the chat JSONL file to write (the held-out split goes beside it, .val.jsonl)")
    split: str = setting("train", "dataset split (hub datasets)")
    config_name: str | None = setting(None, "the hub dataset's configuration, if it has several")
    max_examples: int | None = setting(None, "a seeded random sample of N rows (the first N with --first)",
                                       min=1)
    first: bool = setting(False, "with --max-examples: the first N rows instead of a random sample")
    val_fraction: float = setting(0.05, "share of kept rows held out for validation", min=0, below=1)
    fmt: Format = setting("auto", "row shape (auto: detected per row)", flag="--format")
    prompt_column: str | None = setting(None, "with --format columns: the user turn's column")
    response_column: str | None = setting(None, "with --format columns: the assistant turn's column")
    system_column: str | None = setting(None, "with --format columns: an optional system prompt column")
    strict: bool = setting(False, "fail on the first bad row instead of dropping it")

    def check(self) -> None:
        """The numbers and choices, and then the paths: a local input that is not a regular file
        (a device, a FIFO) would hang the first read or hash of it, and an output that is the
        input, or a device, would lose it. (A pipeline checks before its output is known: "".)"""
        super().check()
        from .prepare import check_paths

        check_paths(self.dataset, self.output)


@dataclass(kw_only=True)
class TrainSettings(Checked, BaseModelChoice, Seeded, LengthLimit, Placement, Deadline):
    """A LoRA training run. Its fields, less `start_over`, are recorded in config.json."""
    data: str = setting(help="chat JSONL from `prepare`")
    val_data: str | None = setting(
        None, "held-out chat JSONL for the validation loss (default: the .val.jsonl beside --data, if any)")
    batch: int = setting(8, "examples per step", min=1, shapes_training=True)
    max_steps: int = setting(0, "training steps (0: one full epoch)", min=0, shapes_training=True)
    rank: int = setting(16, "LoRA rank", min=1, shapes_training=True)
    learning_rate: float = setting(1e-4, "peak learning rate, decayed linearly", above=0, shapes_training=True)
    save_every: int = setting(25, "checkpoint every N steps (0: only the final weights)", min=0)
    output_dir: str = setting("checkpoints", "where run folders go")
    run_name: str | None = setting(
        None, "run folder name, inside --output-dir (default lora_<model>_<key of the data and settings>); an "
              "existing run of that name with the same data and settings is continued from its last checkpoint",
        pattern=FOLDER_NAME)
    start_over: bool = setting(False, "replace an existing run folder of that name instead of continuing it")
    lock_wait: float = setting(0.0, "seconds to wait while another process holds the run folder (0: refuse at "
                                    "once); a re-run of a crashed run waits for the crashed process to stop",
                               min=0, max=86400)
    backend: Backend = setting("auto", "local, tinker, or auto (tinker when TINKER_API_KEY is set)",
                               shapes_training=True)
    beta1: float = setting(0.9, "AdamW beta1", min=0, below=1, shapes_training=True)
    beta2: float = setting(0.95, "AdamW beta2", min=0, below=1, shapes_training=True)
    eps: float = setting(1e-8, "AdamW epsilon", above=0, shapes_training=True)
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0, shapes_training=True)
    init_from: str | None = setting(
        None, "start from an existing adapter's LoRA weights, with a fresh optimizer, instead of a fresh LoRA: "
              "`champion` (the champion of --output-dir; a fresh LoRA while there is none), a run folder, an "
              "adapter folder (local), or a tinker:// state path (tinker)")
    concurrency_limit: str | None = setting(
        None, "a Prefect global concurrency limit to hold a slot of while training (a sweep through a "
              "deployment sets it, so that its trainings on the workers are bounded)")

    def check(self) -> None:
        """The numbers and choices, and that --output-dir is a folder or can be one."""
        super().check()
        from .data import check_output_folder

        check_output_folder(self.output_dir, "--output-dir")


@dataclass(kw_only=True)
class SampleSettings(Checked, BaseModelChoice, Seeded, Placement, Deadline):
    """Answers of a LoRA (and of its base) to test prompts."""
    test_prompts: str | None = setting(
        None, "JSON list of strings or message lists, or a chat .jsonl (its prompts); `run` defaults to "
              "the held-out split's prompts")
    max_tokens: int = setting(150, "token limit per answer", min=1)
    max_prompts: int = setting(0, "answer only the first N test prompts, and say so (0: all of them)", min=0)
    temperature: float = setting(0.7, "sampling temperature (0: greedy)", min=0)
    compare_base: bool = setting(False, "also answer with the base model, side by side")

    def check(self) -> None:
        """The numbers and choices, and that a --test-prompts file is a file: a pipeline checks
        this before it prepares and trains, not after."""
        super().check()
        if self.test_prompts:
            from .data import check_input_file

            check_input_file(self.test_prompts, "--test-prompts")


@dataclass(kw_only=True)
class EvaluateSettings(SampleSettings):
    """`lora-pipeline test`: the sampling settings, plus which adapter and where to write."""
    lora_weights: str = setting(help="a run's final_lora_weights/ or checkpoint folder")
    output: str = setting("lora_test_results.json", "the results JSON to write")


@dataclass(kw_only=True)
class PromotionSettings(Checked):
    """The nightly's gate: with an evaluation set, a pipeline run's adapter becomes the champion
    of its output folder only if it beats its base model and is not worse than the champion."""
    eval_data: str | None = setting(
        None, "a fixed chat JSONL on which every run's adapter, its base model and the champion are scored the "
              "same way; with it, a run is promoted to champion or rejected (<output-dir>/registry.json), and a run "
              "on the same data and settings as an earlier one does nothing")
    promotion_margin: float = setting(
        0.01, "how much worse than the champion a candidate may be, in nats/token (the upper end of the 95% "
              "interval of the paired per-example difference), and still be promoted", min=0, max=10)

    def check(self) -> None:
        super().check()
        if self.eval_data:
            from .data import check_input_file

            check_input_file(self.eval_data, "--eval-data")


@dataclass(kw_only=True)
class SweepSettings(Checked):
    """`lora-pipeline sweep`: the pipeline once per combination of these values, compared."""
    learning_rates: tuple[float, ...] = setting((1e-4,), "peak learning rates to try (on the command line: "
                                                "comma-separated, e.g. 1e-4,5e-4)", above=0)
    ranks: tuple[int, ...] = setting((16,), "LoRA ranks to try (e.g. 8,16)", min=1)
    deployment: str | None = setting(
        None, "run each training as a run of this deployment of the lora-pipeline flow (e.g. "
              "lora-pipeline/training), so that the work pool's workers share them; default: in this process")
    tinker_sessions: int = setting(4, "at most this many of its trainings on Tinker at once", min=1)
    local_trainings: int = setting(1, "at most this many of its trainings on the local engine at once (a "
                                      "local training uses every core)", min=1)


@dataclass(kw_only=True)
class ExportSettings(Checked, Deadline):
    """`lora-pipeline export`: the deadline of each call and download (its source and --output
    are the command's own arguments)."""


@dataclass(kw_only=True)
class InspectSettings(Checked):
    """`lora-pipeline inspect`."""
    timeout: float = setting(30.0, "seconds to wait for the service", above=0, max=86400)


# The pipeline flow and `lora-pipeline run` take the stages' settings flat, less what
# one stage hands the next (the prepared files, the adapter, where answers go). The pipeline's
# reason to exist is comparing the LoRA with its base, so it does by default.
PIPELINE_STAGES = (PrepareSettings, TrainSettings, EvaluateSettings, PromotionSettings)
PIPELINE_INTERNAL = frozenset({"output", "data", "val_data", "lora_weights"})
PIPELINE_DEFAULTS = {"compare_base": True}


def fields_of(cls) -> list[dataclasses.Field]:
    """A settings class's fields, its own first (they matter most in --help), then the shared."""
    own = set(cls.__dict__.get("__annotations__", {}))
    every = dataclasses.fields(cls)
    return [f for f in every if f.name in own] + [f for f in every if f.name not in own]


def flat_fields(classes=PIPELINE_STAGES, internal=PIPELINE_INTERNAL) -> list[dataclasses.Field]:
    """The fields of `classes`, each name once (shared ones come from the same mixin)."""
    seen: dict[str, dataclasses.Field] = {}
    for cls in classes:
        for f in fields_of(cls):
            if f.name not in internal:
                seen.setdefault(f.name, f)
    return list(seen.values())


def default_of(f: dataclasses.Field, overrides: dict | None = None):
    if overrides and f.name in overrides:
        return overrides[f.name]
    return inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default


# The pipeline setting that each of a sweep's lists gives values of.
SWEPT = {"learning_rates": "learning_rate", "ranks": "rank"}


def sweep_fields() -> list[dataclasses.Field]:
    """A sweep's parameters: its own, and the pipeline's less those it sweeps."""
    return fields_of(SweepSettings) + [f for f in flat_fields() if f.name not in SWEPT.values()]


@dataclass(frozen=True)
class PipelineSettings:
    """A pipeline run's stages' settings, from its flat parameters. What one stage hands the
    next is filled in by the flow as it becomes known: prepare's output is where the pipeline
    keeps prepared data; train's data and evaluate's adapter and output are empty until then."""
    prepare: PrepareSettings
    train: TrainSettings
    evaluate: EvaluateSettings
    promotion: PromotionSettings

    @classmethod
    def of(cls, params: dict) -> "PipelineSettings":
        """Every stage's settings, checked before any work."""
        from .prepare import prepared_path

        stages = [build(stage, params, **{name: "" for name in PIPELINE_INTERNAL}) for stage in PIPELINE_STAGES]
        for stage in stages:
            stage.check()
        prepare, train, evaluate, promotion = stages
        output = prepared_path(train.output_dir, prepare.dataset, prepare.split, prepare.max_examples)
        return cls(dataclasses.replace(prepare, output=output), dataclasses.replace(train, val_data=None), evaluate,
                   promotion)


def build(cls, params: dict, **given):
    """A `cls` from flat parameters (those it has), and `given`: what the stage receives from
    another (e.g. data=...)."""
    values = {**params, **given}
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def signature(fields: list[dataclasses.Field], overrides: dict | None = None) -> inspect.Signature:
    """A keyword-only signature of `fields`: Prefect builds a flow's parameter schema (the UI's
    run form, with types and defaults) and validates runs' parameters from its function's
    signature."""
    return inspect.Signature([inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                                default=default_of(f, overrides)) for f in fields])


def _comma_list(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(item) for item in text.split(",") if item.strip())
    parse.__name__ = f"comma-separated {kind.__name__}s"  # what argparse says of a bad value
    return parse


def docstring(summary: str, fields: list[dataclasses.Field]) -> str:
    """`summary` and a Google-style Args section, which Prefect shows beside each parameter."""
    return summary + "\n\nArgs:\n" + "".join(f"    {f.name}: {f.metadata['help']}\n" for f in fields)


def add_flags(parser, fields: list[dataclasses.Field], overrides: dict | None = None) -> None:
    """One argparse flag per field: its type, default, choices and help."""
    for f in fields:
        default = default_of(f, overrides)
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        choices = choices_of(f)
        base = str if choices else f.type if f.type in (bool, int, float, str) else next(
            t for t in getattr(f.type, "__args__", (str,)) if t is not type(None))
        if typing.get_origin(f.type) is tuple:
            kwargs["type"] = _comma_list(base)
        elif base is bool:
            import argparse

            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if choices:
                kwargs["choices"] = choices
        if default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if default is not None and default is not False:
                kwargs["help"] += f" (default {default})"
        parser.add_argument(flag_name(f), **kwargs)
