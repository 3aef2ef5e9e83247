"""The Prefect flows: `lora-pipeline` (prepare -> train -> evaluate -> report), and one flow per
CLI subcommand. Their parameters are the settings of lora_pipeline.settings, flat, each with
its type, default and help text: the Prefect UI's run form shows them, and `prefect deployment
run -p name=value` sets them."""

import contextlib
import dataclasses
import functools
import json
import os
import re
import shlex
import sys
import traceback
from pathlib import Path

import prefect.runtime.deployment
from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Crashed

from lora_pipeline import settings as S
from lora_pipeline.errors import PipelineError
from lora_pipeline.engines import resolve_engine, retryable
from lora_pipeline.promotion import inputs_key, unchanged_night
from lora_pipeline.report import verdict
from lora_pipeline.run_folder import RunSummary
from lora_pipeline.tasks import slot_of, stored_in, unless_gone
from lora_pipeline.tasks.evaluate import evaluate_adapter
from lora_pipeline.tasks.fence import Fence, Fenced, check_fence
from lora_pipeline.tasks.prepare import prepare_data, show_data_report
from lora_pipeline.tasks.promote import judge_candidate
from lora_pipeline.tasks.report import write_run_report
from lora_pipeline.tasks.train import (TrainingProgress, backstop_s, finish_training, find_finished_training,
                                       save_checkpoint, start_training, train_step, validate_base)


def for_deployment(text: str, fields) -> str:
    """`text` with the command line's flags of `fields` as a deployment run's parameters:
    `--backend local` becomes `-p backend=local`."""
    flags = {S.flag_name(f): f for f in fields}

    def reword(m: re.Match) -> str:
        f, value = flags.get(m.group(1)), m.group(2)
        if f is None:
            return m.group(0)
        if f.type is bool:
            return f"-p {f.name}=true" + (f" {value}" if value else "")
        # A value is a choice of the setting's, or a number: "--run-name or ..." names the flag.
        if value and (value in (S.choices_of(f) or ()) or re.fullmatch(r"[-+.0-9e]+", value)):
            return f"-p {f.name}={value}"
        return f.name + (f" {value}" if value else "")
    return re.sub(r"(--[a-z][a-z0-9-]*)(?: (?!\()([^\s,;)`]+))?", reword, text)


# The exit code of a flow run process that stopped itself (lora_pipeline.tasks.fence).
EXIT_FENCED = 75


def parameters(fields, overrides: dict | None = None):
    """Gives a `**params` flow function the keyword signature and Args docstring of `fields`
    (Prefect reads a flow's parameters, their types, defaults and descriptions from them), and
    words its errors for where it runs: flags on the command line, `-p name=value` for a
    deployment run."""
    def apply(fn):
        @functools.wraps(fn)
        def run(**params):
            deployed = bool(prefect.runtime.deployment.id)
            fence = Fence.for_this_run()
            with fence or contextlib.nullcontext():
                try:
                    return fn(**params)
                except Exception as e:
                    # A run that is not this process's any more (fenced, or failing because it
                    # lost the API): reporting a state would overwrite the Crashed its re-run
                    # follows from. The process just ends, its run folder released, consistent.
                    lost = str(e) if isinstance(e, Fenced) else fence and fence.lost()
                    if lost:
                        print(f"lora-pipeline: stopping this flow run: {lost}", file=sys.stderr, flush=True)
                        os._exit(EXIT_FENCED)
                    if deployed and isinstance(e, PipelineError):
                        raise PipelineError(for_deployment(str(e), fields)) from None
                    # A deployment's run that failed for a reason which may pass (the service
                    # unreachable past every retry) ends Crashed, the state the recover
                    # deployment re-runs; bad input, a rejected key or a bug end Failed.
                    if deployed and retryable(e):
                        get_run_logger().exception("failed for a reason that may pass; ending Crashed, to be re-run")
                        return Crashed(message=f"{type(e).__name__}: {e}")
                    raise
        run.__signature__ = S.signature(fields, overrides)
        run.__doc__ = S.docstring(fn.__doc__, fields)
        return run
    return apply


def _rerun_command(flow, flow_run) -> str | None:
    """For a deployment's run: the `prefect deployment run` command that repeats it, with the
    parameters it was given beyond the deployment's."""
    if not flow_run.deployment_id:
        return None
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(flow_run.deployment_id)
    given = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in flow_run.parameters.items()
             if deployment.parameters.get(k) != v]
    return shlex.join(["prefect", "deployment", "run", f"{flow.name}/{deployment.name}",
                       *[arg for p in given for arg in ("-p", p)]])


def write_failure_note(flow, flow_run, state) -> None:
    """On failure: what failed, the last good checkpoint and how to continue (the command, or
    for a deployment's run, the deployment run), in the run folder and as an artifact on the
    flow run; the traceback goes in the note too."""
    from lora_pipeline.report import write_failure_summary

    params = flow_run.parameters
    since = flow_run.start_time.timestamp() - 1 if flow_run.start_time else 0
    error = state.result(raise_on_failure=False)
    details = "".join(traceback.format_exception(error)) if isinstance(error, BaseException) else ""
    path, markdown = write_failure_summary(params.get("output_dir", "checkpoints"), params.get("run_name"),
                                           state.message or "unknown error", since,
                                           _rerun_command(flow, flow_run), details)
    create_markdown_artifact(markdown, key="lora-pipeline-failure", description=f"written to {path}")
    get_run_logger().error("What failed and how to continue: %s", path)


def _prepared(report: dict) -> list[str]:
    return [report["output"]] + ([report["validation"]] if report["validation"] else [])


def _answered(results_file: str) -> list[str]:
    return [results_file]


def train_adapter(settings: S.TrainSettings) -> RunSummary:
    """The training, a task run per operation (start, the base model's held-out loss, each step
    and checkpoint, the final weights), so that a retried step leaves the others as they were;
    a run folder that already holds it finished is returned as it is. With `concurrency_limit`
    set (a sweep's), it waits for a slot of that limit first."""
    finished = find_finished_training(settings, return_state=True).result()
    if finished is not None:
        return finished
    with slot_of(settings.concurrency_limit), start_training(settings) as run:
        step = train_step.with_options(timeout_seconds=backstop_s(run))
        save = save_checkpoint.with_options(timeout_seconds=backstop_s(run))
        progress = TrainingProgress(run)
        validate_base(run)
        for n in run.steps_left():
            check_fence()  # before each step and save: a re-run may own the run folder now
            progress.show(n, step(run, n))
            if run.saves_at(n):
                check_fence()
                save(run, n)
        check_fence()
        summary = run.finished_before or finish_training(run)
    get_run_logger().info("final LoRA weights: %s", summary.final_lora_weights)
    return summary


def prepare_data_of(stages: S.PipelineSettings) -> dict:
    """The pipeline's first stage after the checks: the engine's readiness (a missing Tinker key
    or an unknown model fails here, not after the data is prepared), then the data prepared
    into the output folder, cached there; returns prepare's report."""
    resolve_engine(stages.train.backend, stages.train.base_model)
    data = unless_gone(stored_in(prepare_data, stages.train.output_dir), _prepared, stages.prepare)
    show_data_report(data)
    return data


def trained_on(stages: S.PipelineSettings, data: dict) -> S.TrainSettings:
    """The training stage's settings: the prepared file, and its held-out split, on which the
    held-out loss is measured during training."""
    return dataclasses.replace(stages.train, data=data["output"], val_data=data["validation"])


@flow(name="lora-pipeline-prepare")
@parameters(S.fields_of(S.PrepareSettings))
def prepare(**params) -> dict:
    """Validated chat JSONL from a dataset of any common shape."""
    settings = S.build(S.PrepareSettings, params)
    data = unless_gone(prepare_data, _prepared, settings)
    show_data_report(data)
    return data


@flow(name="lora-pipeline-train", on_failure=[write_failure_note], on_crashed=[write_failure_note])
@parameters(S.fields_of(S.TrainSettings))
def train(**params) -> RunSummary:
    """Train a LoRA adapter on a prepared chat JSONL file."""
    settings = S.build(S.TrainSettings, params)
    return train_adapter(settings)


@flow(name="lora-pipeline-test")
@parameters(S.fields_of(S.EvaluateSettings))
def test(**params) -> str:
    """Answer test prompts with a LoRA adapter (and its base model)."""
    settings = S.build(S.EvaluateSettings, params)
    return unless_gone(evaluate_adapter, _answered, settings)


@flow(name="lora-pipeline", on_failure=[write_failure_note], on_crashed=[write_failure_note])
@parameters(S.flat_fields(), S.PIPELINE_DEFAULTS)
def lora_pipeline(**params) -> dict:
    """Prepare the data, train a LoRA, answer the test prompts with it and its base, report; with
    an evaluation set, promote the LoRA to champion or reject it."""
    stages = S.PipelineSettings.of(params)
    inputs = inputs_key(stages.prepare.dataset, params) if stages.promotion.eval_data else None
    unchanged = inputs and unchanged_night(stages.train.output_dir, inputs)
    if unchanged:  # the nightly's data has not grown since the last candidate: nothing to do
        get_run_logger().info("%s", unchanged)
        return {"unchanged": unchanged}
    data = prepare_data_of(stages)
    summary = train_adapter(trained_on(stages, data))
    answers = unless_gone(stored_in(evaluate_adapter, stages.train.output_dir), _answered, dataclasses.replace(
        stages.evaluate, lora_weights=summary.final_lora_weights, output=str(Path(summary.run_dir) / "results.json"),
        test_prompts=stages.evaluate.test_prompts or data["validation"]))
    decision = judge_candidate(stages, summary, inputs) if stages.promotion.eval_data else None
    report = write_run_report(summary, answers)
    closing = f"{verdict(summary)} {decision.reason}." if decision else verdict(summary)
    get_run_logger().info("%s Report: %s", closing, report)
    return {"summary": summary, "results": answers, "report": report, "decision": decision and decision.reason}
