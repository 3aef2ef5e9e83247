"""Settings defined once: the CLI's flags, the flows' parameters and config.json all come from
lora_pipeline.settings, and every number is checked before anything runs."""

import dataclasses
import inspect
import subprocess
import sys

import pytest

from lora_pipeline import settings as S
from lora_pipeline.engines import Engine
from lora_pipeline.errors import PipelineError


def _flags(command: str) -> dict:
    from lora_pipeline.flows.cli import parser

    sub = next(a for a in parser()._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions if a.dest != "help"}


@pytest.mark.parametrize("command, cls", [("prepare", S.PrepareSettings), ("train", S.TrainSettings),
                                          ("test", S.EvaluateSettings)])
def test_each_command_has_a_flag_per_setting_with_its_default(command, cls):
    flags = _flags(command)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(flags) == set(fields)
    for name, f in fields.items():
        if f.default is dataclasses.MISSING:
            assert flags[name].required, name
        else:
            assert flags[name].default == f.default, name
        assert tuple(flags[name].choices or ()) == (S.choices_of(f) or ()), name


def test_run_takes_the_pipeline_flows_parameters():
    from lora_pipeline.flows.pipeline import lora_pipeline

    flags = _flags("run")
    schema = lora_pipeline.parameters.model_dump()
    assert set(flags) == set(schema["properties"]) == {f.name for f in S.flat_fields()}
    assert schema["required"] == ["dataset"]
    for name, prop in schema["properties"].items():
        assert prop.get("default") == flags[name].default, name
    assert flags["compare_base"].default is True  # the pipeline compares with the base model


@pytest.mark.parametrize("flow_name, cls", [("prepare", S.PrepareSettings), ("train", S.TrainSettings),
                                            ("test", S.EvaluateSettings)])
def test_flow_parameters_have_the_settings_types_defaults_and_help(flow_name, cls):
    """What the Prefect UI's run form shows for each flow."""
    from lora_pipeline.flows import pipeline

    schema = getattr(pipeline, flow_name).parameters.model_dump()
    for f in dataclasses.fields(cls):
        prop = schema["properties"][f.name]
        assert prop["description"] == f.metadata["help"], f.name
        if f.default is dataclasses.MISSING:
            assert f.name in schema["required"]
        else:
            assert prop["default"] == f.default
    assert schema["properties"]["batch" if cls is S.TrainSettings else "seed"]["type"] == "integer"


@pytest.mark.parametrize("change, said", [
    ({"learning_rate": float("inf")}, "--learning-rate (learning_rate) inf: must be a finite number"),
    ({"learning_rate": float("nan")}, "--learning-rate (learning_rate) nan: must be a finite number"),
    ({"learning_rate": -1e-4}, "--learning-rate (learning_rate) -0.0001: must be above 0"),
    ({"max_length": -5}, "--max-length (max_length) -5: must be at least 1"),
    ({"seed": -1}, "--seed (seed) -1: must be at least 0"),
    ({"seed": 2**64}, "--seed (seed) 18446744073709551616: must be at most 4294967295"),
    ({"request_timeout": 1e300}, "--request-timeout (request_timeout) 1e+300: must be at most 86400"),
    ({"batch": 0}, "--batch (batch) 0: must be at least 1"),
    ({"request_timeout": 0}, "--request-timeout (request_timeout) 0: must be above 0"),
    ({"backend": "gpu"}, "--backend (backend) 'gpu': choose one of auto, local, tinker"),
])
def test_nonsense_numbers_are_refused_naming_the_flag(change, said):
    with pytest.raises(PipelineError) as e:
        S.TrainSettings(data="x.jsonl", **change).check()
    assert str(e.value) == said


def test_prepare_refuses_a_zero_sample_and_a_full_validation_split():
    with pytest.raises(PipelineError, match=r"--max-examples \(max_examples\) 0: must be at least 1"):
        S.PrepareSettings(dataset="d", output="o", max_examples=0).check()
    with pytest.raises(PipelineError, match=r"--val-fraction \(val_fraction\) 1.0: must be below 1"):
        S.PrepareSettings(dataset="d", output="o", val_fraction=1.0).check()


def test_help_answers_without_importing_torch_or_tinker():
    code = ("import sys\nfrom lora_pipeline.flows.cli import parser\nparser().format_help()\n"
            "print(sorted(m for m in ('torch', 'tinker', 'transformers', 'prefect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_both_engines_have_the_engine_interface():
    from lora_pipeline.engines.local import LocalEngine
    from lora_pipeline.engines.tinker_engine import TinkerEngine

    methods = [name for name, value in vars(Engine).items() if inspect.isfunction(value)
               and not name.startswith("_")]
    assert len(methods) == 8
    for cls in (LocalEngine, TinkerEngine):
        assert isinstance(cls.remote, bool)
        for name in methods:
            expected = list(inspect.signature(getattr(Engine, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == expected, (cls, name)


def test_run_and_test_both_take_compare_base_either_way():
    from lora_pipeline.flows.cli import parser

    run = ["run", "--dataset", "d.jsonl"]
    assert parser().parse_args(run).compare_base is True  # the pipeline compares by default
    assert parser().parse_args(run + ["--no-compare-base"]).compare_base is False
    test = ["test", "--lora-weights", "w"]
    assert parser().parse_args(test).compare_base is False  # as the workflow's test script
    assert parser().parse_args(test + ["--compare-base"]).compare_base is True


# Numbers that no check bounds above, because any size is harmless or is checked where its limit
# is known: a step count or length is only as costly as asked, --rank against the model's width,
# --max-tokens against its context. A new unbounded number must be added here knowingly.
UNBOUNDED_OK = {"batch", "max_steps", "rank", "save_every", "max_length", "max_examples", "max_tokens",
                "max_prompts", "learning_rate", "eps", "weight_decay", "temperature", "tinker_sessions",
                "local_trainings", "learning_rates", "ranks"}


@pytest.mark.parametrize("cls", [S.PrepareSettings, S.TrainSettings, S.EvaluateSettings, S.SweepSettings,
                                 S.ExportSettings, S.InspectSettings])
def test_every_number_is_bounded_or_known_to_be_harmless_at_any_size(cls, tmp_path):
    """--seed 2**64 was a traceback from torch; a huge --request-timeout one from the OS's timers."""
    required = {f.name: str(tmp_path / f.name) for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING}
    (tmp_path / "dataset").mkdir()  # an input that is there: the numbers are what is tried
    (tmp_path / "dataset" / "rows.jsonl").write_text("{}\n")
    passed = set()
    for f in dataclasses.fields(cls):
        kind = f.type if f.type in (int, float) else next(
            (t for t in getattr(f.type, "__args__", ()) if t in (int, float)), None)
        if kind is None or f.type is bool:
            continue
        huge = 2**64 if kind is int else 1e300
        try:
            cls(**required, **{f.name: (huge,) if cls is S.SweepSettings and f.name in ("rank", "learning_rate")
                               else huge}).check()
            passed.add(f.name)
        except PipelineError as e:
            assert "must be" in str(e) and "\n" not in str(e)
    assert passed <= UNBOUNDED_OK, passed - UNBOUNDED_OK


def test_every_deployment_gives_only_parameters_its_flow_takes():
    """A parameter the flow does not take crashes every run of the deployment before it starts
    (Prefect's SignatureMismatchError): a YAML merge can leave one behind."""
    import importlib

    import yaml
    from conftest import ROOT

    for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]:
        path, name = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module("lora_pipeline." + path.removesuffix(".py").replace("/", ".")), name)
        assert set(d.get("parameters", {})) <= set(inspect.signature(flow.fn).parameters), d["name"]
