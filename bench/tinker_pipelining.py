"""Tinker pipelining: training steps per second of the pipeline's Tinker engine, through the
real SDK, against the local Tinker-protocol server simulating the service's clock cycles
(tests/tinker_server.py with `tick`), against the ideal of one step per cycle and against
loops written by hand on the same SDK: awaiting each call in turn (the naive loop), and
submitting forward_backward and optim_step together before awaiting them.

    python bench/tinker_pipelining.py [--steps 20] [--tick 0.2] [--repeats 2]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
from common import best_of, write  # noqa: E402
from tinker_server import TinkerTestServer  # noqa: E402

import tinker  # noqa: E402
from tinker import types  # noqa: E402

from lora_pipeline.models import SMOLLM2  # noqa: E402
from lora_pipeline.settings import TrainSettings  # noqa: E402
from lora_pipeline.train import TrainingRun  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tick", type=float, default=0.2, help="seconds per simulated clock cycle")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with TinkerTestServer(models=[SMOLLM2], tick=a.tick) as server, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(TINKER_API_KEY=server.api_key, TINKER_BASE_URL=server.base_url)
        run = TrainingRun(TrainSettings(data=str(SAMPLE), backend="tinker", base_model=SMOLLM2, batch=8,
                                      max_steps=a.steps, save_every=0, output_dir=tmp, run_name="bench")).open()
        batches = [run.batch(n) for n in range(1, a.steps + 1)]
        adam = types.AdamParams(learning_rate=1e-4)
        client = tinker.ServiceClient(base_url=server.base_url).create_lora_training_client(
            base_model=SMOLLM2, rank=16).result()

        def pipeline():
            for n in range(1, a.steps + 1):
                run.step(n)

        def naive():  # what a first loop looks like: each call awaited before the next
            for batch in batches:
                client.forward_backward(batch, "cross_entropy").result()
                client.optim_step(adam).result()

        def submit_both():  # the SDK docs' advice, step by step
            for batch in batches:
                fb = client.forward_backward(batch, "cross_entropy")
                opt = client.optim_step(adam)
                fb.result()
                opt.result()

        loops = {"pipeline": pipeline, "naive_await_each": naive, "submit_both_then_await": submit_both}
        best = best_of(loops, a.repeats)
        run.close()
    per_second = {k: a.steps / v for k, v in best.items()}
    ideal = 1 / a.tick
    write("tinker_pipelining", {
        "steps": a.steps, "tick_s": a.tick,
        "steps_per_second": {k: round(v, 3) for k, v in per_second.items()} | {"ideal": round(ideal, 3)},
        "cycles_per_step": {k: round(ideal / v, 2) for k, v in per_second.items()},
        "pipeline_fraction_of_ideal": round(per_second["pipeline"] / ideal, 3),
        "pipeline_over_naive_speedup": round(per_second["pipeline"] / per_second["naive_await_each"], 2),
        "targets": {"fraction_of_ideal": 0.9, "over_naive": 2.5},
    })


if __name__ == "__main__":
    main()
