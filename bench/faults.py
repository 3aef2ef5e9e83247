"""Faults at random moments, across hosts: trial-sized runs through the multi-host stack of the
fault tests (PostgreSQL and the Prefect server on one network namespace, a worker on each of
two others, the output folder shared), one at a time, each hit by a fault drawn at random
(a worker and its flow run killed, a worker host cut off past the crash threshold, the Prefect
server killed and restarted 30 s later, PostgreSQL restarted) after a random number of steps.
The baseline is the same trial uninterrupted, the clean twin (same seed, same settings).
Figures: runs completed / started, steps logged twice or missing (target 0), adapters that
differ from the clean twin (target 0), and the median and worst time from the fault to the
first step trained after it and to the run's completion. Needs root.

    python bench/faults.py [--runs 6] [--seed 0]
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
import hosts  # noqa: E402
from common import write  # noqa: E402
from service_stack import ServiceStack, adapter, largest_difference, training_log  # noqa: E402

from lora_pipeline import processes  # noqa: E402
from lora_pipeline.models import SMOLLM2  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"
PROMPTS = ROOT / "data" / "sample" / "test_prompts.json"
TRIAL = dict(batch=4, max_steps=12, save_every=3, max_tokens=4, test_prompts=str(PROMPTS), base_model=SMOLLM2,
             backend="local")
FAULTS = ("kill -9", "link cut", "server restart", "postgres restart")


def inject(fault: str, stack: ServiceStack, net: hosts.Network) -> float:
    """Injects `fault` into the stack; returns when it is over (the time it ended)."""
    if fault == "kill -9":
        name = stack.worker_running_a_flow()
        stack.kill_worker(name)
        stack.start_worker(name)
    elif fault == "link cut":
        name = stack.worker_running_a_flow()
        net.cut(name)
        time.sleep(120)  # past the crash threshold (90 s)
        net.restore(name)
    elif fault == "server restart":
        stack.stop_server(kill=True)
        time.sleep(30)
        stack.start_server()
    else:
        stack.db.stop()
        stack.db.start()
    return time.monotonic()


def first_step_after(stack: ServiceStack, line: list[dict], wall_at_since: float) -> float | None:
    """Seconds from `wall_at_since` (time.time()) to the start of the first training step of
    `line`'s runs after it."""
    from datetime import datetime

    starts = [datetime.fromisoformat(t["start_time"]).timestamp()
              for t in stack.api.post("/task_runs/filter", json={
                  "flow_runs": {"id": {"any_": [r["id"] for r in line]}},
                  "task_runs": {"name": {"like_": "step-"}}}).json() if t["start_time"]]
    after = [s - wall_at_since for s in starts if s > wall_at_since]
    return round(min(after), 1) if after else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0, help="draws the faults and their moments")
    a = ap.parse_args()
    if hosts.available():
        sys.exit(f"bench/faults.py: {hosts.available()}")
    draw = random.Random(a.seed)
    results = []
    with hosts.Network(["server", "worker-0", "worker-1"]) as net, \
            ServiceStack("postgresql", workers=2, network=net) as stack:
        data = stack.root / "small.jsonl"
        data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:60]))
        twin_out = stack.root / "clean"
        twin = stack.run("lora-pipeline/trial", dataset=str(data), output_dir=str(twin_out), **TRIAL)
        assert stack.wait(twin, 600)["type"] == "COMPLETED"
        clean = adapter(twin_out)
        for i in range(a.runs):
            fault, after_steps = draw.choice(FAULTS), draw.randint(1, TRIAL["max_steps"] - 2)
            out = stack.root / f"run-{i}"
            run = stack.run("lora-pipeline/trial", dataset=str(data), output_dir=str(out), **TRIAL)
            processes.wait_until("the fault's moment", lambda out=out, n=after_steps: len(training_log(out)) >= n,
                                 600, every=0.1)
            started, wall = time.monotonic(), time.time()
            ended = inject(fault, stack, net)
            try:
                line = stack.wait_for_line(run, 900)
                completed = True
            except TimeoutError:
                line, completed = stack.line_of(run), False
            done = time.monotonic()
            steps = training_log(out)
            record = {"fault": fault, "after_steps": after_steps, "completed": completed, "runs": len(line),
                      "states": [r["state"]["type"] for r in line],
                      "steps_twice": len(steps) - len(set(steps)),
                      "steps_missing": len(set(range(1, TRIAL["max_steps"] + 1)) - set(steps)),
                      "adapter_differs": (not completed) or largest_difference(adapter(out), clean) >= 1e-5,
                      "fault_s": round(ended - started, 1),
                      "to_next_step_s": first_step_after(stack, line, wall),
                      "to_completed_s": round(done - started, 1)}
            print(record, flush=True)
            results.append(record)
    next_step = [r["to_next_step_s"] for r in results if r["to_next_step_s"] is not None]
    total = [r["to_completed_s"] for r in results if r["completed"]]
    write("faults", {
        "runs_started": len(results), "runs_completed": sum(r["completed"] for r in results),
        "steps_applied_twice": sum(r["steps_twice"] for r in results),
        "steps_missing": sum(r["steps_missing"] for r in results),
        "adapters_differing_from_clean_twin": sum(r["adapter_differs"] for r in results),
        "fault_to_next_step_s": {"median": statistics.median(next_step) if next_step else None,
                                 "worst": max(next_step, default=None)},
        "fault_to_completed_s": {"median": statistics.median(total) if total else None, "worst": max(total, default=None)},
        "trial": {k: v for k, v in TRIAL.items() if k != "test_prompts"}, "seed": a.seed, "runs": results})


if __name__ == "__main__":
    main()
