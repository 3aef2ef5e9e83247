"""The `lora-pipeline-sweep` flow: the data prepared once, then the lora-pipeline flow once per
combination of learning rates and ranks, each a normal run (its own run folder, resumable,
cached), and a comparison of them at the end.

At most `tinker_sessions` of its trainings run on Tinker at once, so a sweep never floods the
service, and `local_trainings` (one by default: a local training uses every core) on the local
engine. In this process the sweep runs that many at once; through a deployment, its runs start
at once on the pool's workers and their trainings hold slots of a Prefect global concurrency
limit of that size (`lora-pipeline-<engine>-trainings`), which the Prefect server takes back
from a worker that died.
"""

import contextvars
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.deployments import run_deployment

from lora_pipeline import settings as S
from lora_pipeline.engines import choose_backend
from lora_pipeline.errors import PipelineError
from lora_pipeline.flows.pipeline import lora_pipeline, parameters, prepare_data_of, trained_on
from lora_pipeline.run_config import RunConfig
from lora_pipeline.run_folder import RunFolder
from lora_pipeline.sweep import COLUMNS, cells, configurations, label, write_sweep_report
from lora_pipeline.tasks import set_limit, training_limit


def _in_process(config: dict) -> str | None:
    """A child flow run in this process; None, or why it failed."""
    state = lora_pipeline(**config, return_state=True)
    return None if state.is_completed() else state.message


def _through(deployment: str):
    def run(config: dict) -> str | None:
        """A run of `deployment`, picked up by any worker of its pool; None, or why it failed."""
        flow_run = run_deployment(deployment, parameters=config, timeout=None, as_subflow=True)
        return None if flow_run.state.is_completed() else f"{flow_run.name}: {flow_run.state.message}"
    return run


@flow(name="lora-pipeline-sweep")
@parameters(S.sweep_fields(), S.PIPELINE_DEFAULTS)
def lora_sweep(**params) -> dict:
    """Train and evaluate one LoRA per combination of learning rates and ranks, and compare them."""
    sweep = S.build(S.SweepSettings, params)
    sweep.check()
    own = {f.name for f in S.fields_of(S.SweepSettings)}
    configs = configurations(sweep, {k: v for k, v in params.items() if k not in own})
    stages = [S.PipelineSettings.of(config) for config in configs]  # every run's settings checked first
    data = prepare_data_of(stages[0])  # each child's own prepare stage then hits the cache
    backend = choose_backend(configs[0]["backend"])
    at_once = sweep.tinker_sessions if backend == "tinker" else sweep.local_trainings
    logger = get_run_logger()
    logger.info("%d runs, %d at a time: %s", len(configs), at_once, "; ".join(label(c) for c in configs))

    if sweep.deployment:
        set_limit(training_limit(backend), at_once)
        configs = [{**c, "concurrency_limit": training_limit(backend)} for c in configs]
        child, threads = _through(sweep.deployment), len(configs)
    else:
        child, threads = _in_process, at_once
    # Each child runs in a copy of this thread's context, taken here: with this flow run in it,
    # the children are its subflows.
    contexts = [contextvars.copy_context() for _ in configs]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sweep") as pool:
        failures = list(pool.map(lambda context, config: context.run(child, config), contexts, configs))

    runs = []
    for config, stage, failure in zip(configs, stages, failures):
        run_dir = RunConfig(trained_on(stage, data)).run_dir
        summary = RunFolder(run_dir).read_summary() if failure is None else None
        if summary is None:
            logger.error("%s failed: %s", label(config), failure or f"no summary.json in {run_dir}")
        else:
            runs.append((label(config), summary))
    key = hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(params["output_dir"]).resolve() / f"sweep_{key}"
    result = write_sweep_report(folder, runs)
    table = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    table += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in result["rows"]]
    create_markdown_artifact(f"# LoRA sweep\n\n{result['verdict']}\n\n" + "\n".join(table) + "\n",
                             key="lora-pipeline-sweep", description=result["verdict"])
    create_link_artifact(Path(result["html_path"]).as_uri(), link_text="sweep_report.html",
                         key="lora-pipeline-sweep-report-link",
                         description=f"{result['html_path']} (open on the machine that ran it)")
    logger.info("%s Report: %s", result["verdict"], result["html_path"])
    failed = len(configs) - len(runs)
    if failed:
        raise PipelineError(f"{failed} of {len(configs)} runs failed (see the log); the others are compared in "
                            f"{result['html_path']}. Running the same sweep again continues the failed ones.")
    return {"report": result["html_path"], "best": result["best"]}
