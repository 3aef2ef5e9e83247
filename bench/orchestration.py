"""Orchestration overhead: the same local-engine training steps through the
`lora-pipeline-train` flow (a Prefect task run per step, logs, checkpoint registry, final
weights) and through a bare loop over the core engine with no Prefect (model load, rendering,
steps, final weights). Against a Prefect server started once, as when the UI is watched.

    python bench/orchestration.py [--steps 12] [--repeats 2]
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import write  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"


def children_cpu_s() -> float:
    """CPU seconds used so far by this process's children: the Prefect server, which shares
    this machine's cores with training."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # its parent
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def empty_steps_cost(n: int = 40) -> dict:
    """Prefect's own cost of one step, without training: a flow of `n` task runs that each log a
    line and update a progress artifact, as train-step does. Wall time per task run in the
    flow's loop (the flow's start and end left out), and the Prefect server's CPU time per task
    run (start and end included)."""
    from prefect import flow, get_run_logger, task
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.cache_policies import NO_CACHE

    @task(name="empty-step", cache_policy=NO_CACHE)
    def empty_step(k: int) -> int:
        get_run_logger().info("step %d", k)
        return k

    @flow(name="empty-steps")
    def empty_steps() -> float:
        progress = create_progress_artifact(0.0, key="bench-empty-steps")
        start = time.perf_counter()
        for k in range(1, n + 1):
            empty_step(k)
            update_progress_artifact(progress, 100 * k / n)
        return time.perf_counter() - start

    empty_steps()  # warm
    cpu = children_cpu_s()
    loop = empty_steps()
    return {"wall_ms": round(loop / n * 1000, 1), "server_cpu_ms": round((children_cpu_s() - cpu) / n * 1000, 1)}


async def steps_span(flow_run_id) -> float:
    """Seconds from the start of the flow run's first step task run to the end of its last."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    steps = [r for r in runs if r.name.startswith("step-")]
    return (max(r.end_time for r in steps) - min(r.start_time for r in steps)).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness
    from tinker import types

    from lora_pipeline.data import read_chat_jsonl
    from lora_pipeline.engines import make_engine
    from lora_pipeline.flows.pipeline import train as train_flow
    from lora_pipeline.models import SMOLLM2, load_tokenizer
    from lora_pipeline.render import render_conversations, renderer_for
    from lora_pipeline.train import epoch_batches, scheduled_lr

    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(data=str(SAMPLE), batch=8, max_steps=a.steps, save_every=0, backend="local",
                   output_dir=tmp, learning_rate=1e-4)
        # The same batches as the pipeline's, so both loops do the same arithmetic.
        examples, _ = render_conversations(read_chat_jsonl(SAMPLE), renderer_for(SMOLLM2, load_tokenizer(SMOLLM2)),
                                           1024, "truncate")
        order = epoch_batches(len(examples), 8, 0, 0)[:a.steps]
        counter = iter(range(10**6))
        in_steps = {"flow": [], "bare": []}  # seconds spent in the steps' own calls
        steps_wall = {"flow": [], "bare": in_steps["bare"]}  # first step's start to last step's end

        def bare():
            engine = make_engine("local", SMOLLM2, rank=16, seed=0, request_timeout=120,
                                 root=Path(tmp) / f"bare{next(counter)}")
            examples, _ = render_conversations(read_chat_jsonl(SAMPLE), engine.renderer, 1024, "truncate")
            start = time.perf_counter()
            for n, indices in enumerate(order, start=1):
                fb = engine.forward_backward([examples[j] for j in indices], "cross_entropy")
                opt = engine.optim_step(types.AdamParams(learning_rate=scheduled_lr(1e-4, n, a.steps),
                                                         beta1=0.9, beta2=0.95, eps=1e-8))
                fb.result()
                opt.result()
            in_steps["bare"].append(time.perf_counter() - start)
            engine.save_weights_for_sampler("final_lora_weights").result()

        def flow():  # a new run name each time: a cached result would skip the work
            state = train_flow(**cfg, run_name=f"flow{next(counter)}", return_state=True)
            log = json.loads((Path(state.result().run_dir) / "training_log.json").read_text())
            in_steps["flow"].append(sum(r["time_s"] for r in log))
            steps_wall["flow"].append(asyncio.run(steps_span(state.state_details.flow_run_id)))

        with prefect_test_harness(server_startup_timeout=60):
            train_flow(**dict(cfg, max_steps=1), run_name="warmup")  # server, imports, model cache
            empty = empty_steps_cost()
            times = {"flow": [], "bare": []}
            server_cpu = {"flow": [], "bare": []}
            for _ in range(a.repeats):  # alternating, so that the machine's state affects both alike
                for name, run in (("flow", flow), ("bare", bare)):
                    cpu, start = children_cpu_s(), time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
                    server_cpu[name].append(children_cpu_s() - cpu)
    best = {k: min(v) for k, v in times.items()}
    per_step = {k: min(v) / a.steps for k, v in steps_wall.items()}
    write("orchestration", {
        "steps": a.steps, "batch": 8,
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "flow_over_bare_ratio": round(best["flow"] / best["bare"], 3),
        # The training loop alone, from the first step's start to the last one's end: each
        # step's task run, log line, progress update and training_log.json write included.
        "seconds_per_step": {k: round(v, 3) for k, v in per_step.items()},
        "per_step_flow_over_bare_ratio": round(per_step["flow"] / per_step["bare"], 3),
        "overhead_ms_per_step": round((per_step["flow"] - per_step["bare"]) * 1000, 1),
        "all_runs_seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        # Where the overhead goes. The steps' own calls (forward_backward + optim_step) take
        # longer inside the flow: the Prefect server, whose CPU time is below, shares this
        # machine's 2 cores with the training threads. The rest is the flow's bookkeeping (task
        # runs, logs, the run folder's files, the resumable final state).
        "prefect_cost_per_empty_step": empty,
        "seconds_in_step_calls": {k: [round(t, 2) for t in v] for k, v in in_steps.items()},
        "prefect_server_cpu_seconds": {k: [round(t, 2) for t in v] for k, v in server_cpu.items()},
        "steps_wall_seconds": {k: [round(t, 2) for t in v] for k, v in steps_wall.items()},
        "target": {"flow_over_bare_ratio": 1.05},
    })


if __name__ == "__main__":
    main()
