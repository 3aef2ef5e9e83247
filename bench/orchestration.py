"""Orchestration overhead: the same local-engine training steps through the
`lora-pipeline-train` flow (a Prefect task run per step, logs, checkpoint registry, final
weights) and through a bare loop over the core engine with no Prefect (model load, rendering,
steps, final weights). Against a Prefect server started once, as when the UI is watched.

    python bench/orchestration.py [--steps 12] [--repeats 2]
"""

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness
    from tinker import types

    from flows.pipeline import train as train_flow
    from lora_pipeline.data import read_chat_jsonl
    from lora_pipeline.engines import make_engine
    from lora_pipeline.models import SMOLLM2
    from lora_pipeline.render import render_conversations
    from lora_pipeline.train import TrainConfig, TrainingRun

    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(data=str(SAMPLE), batch=8, max_steps=a.steps, save_every=0, backend="local",
                   output_dir=tmp, learning_rate=1e-4)
        # The same batches as the pipeline's, so both loops do the same arithmetic.
        plan = TrainingRun(TrainConfig(**cfg, run_name="plan"))
        order = [[plan.examples.index(d) for d in plan.batch(n)] for n in range(1, a.steps + 1)]
        plan.close()
        counter = iter(range(10**6))

        def bare():
            engine = make_engine("local", SMOLLM2, 16, 0, Path(tmp) / f"bare{next(counter)}", 120)
            examples, _ = render_conversations(read_chat_jsonl(SAMPLE), engine.renderer, 1024, "truncate")
            for n, indices in enumerate(order, start=1):
                lr = 1e-4 * (1 - (n - 1) / a.steps)
                fb = engine.forward_backward([examples[j] for j in indices], "cross_entropy")
                opt = engine.optim_step(types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8))
                fb.result()
                opt.result()
            engine.save_weights_for_sampler("final_lora_weights").result()

        def flow():  # a new run name each time: a cached result would skip the work
            train_flow(dict(cfg, run_name=f"flow{next(counter)}"))

        with prefect_test_harness(server_startup_timeout=60):
            train_flow(dict(cfg, max_steps=1, run_name="warmup"))  # server, imports, model cache
            times = {"flow": [], "bare": []}
            server_cpu = {"flow": [], "bare": []}
            for _ in range(a.repeats):  # alternating, so that the machine's state affects both alike
                for name, run in (("flow", flow), ("bare", bare)):
                    cpu, start = children_cpu_s(), time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
                    server_cpu[name].append(children_cpu_s() - cpu)
    best = {k: min(v) for k, v in times.items()}
    write("orchestration", {
        "steps": a.steps, "batch": 8,
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "bare_seconds_per_step": round(best["bare"] / a.steps, 3),
        "flow_over_bare_ratio": round(best["flow"] / best["bare"], 3),
        "overhead_ms_per_step": round((best["flow"] - best["bare"]) / a.steps * 1000, 1),
        "all_runs_seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
        # The Prefect server's CPU time during each run: on this 2-core machine it competes
        # with the training threads, which is most of the overhead.
        "prefect_server_cpu_seconds": {k: [round(t, 2) for t in v] for k, v in server_cpu.items()},
        "target": {"flow_over_bare_ratio": 1.05},
    })


if __name__ == "__main__":
    main()
