"""Evaluation: 32 prompts answered by the LoRA and by its base model on the local engine, all
in one batch each (as `lora-pipeline test` does) against one prompt at a time, with the same
engine, greedy decoding and token budget.

    python bench/evaluate.py [--prompts 32] [--max-tokens 32]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import write  # noqa: E402

from tinker import types  # noqa: E402

from lora_pipeline.engines import make_engine  # noqa: E402
from lora_pipeline.evaluate import adapter_info  # noqa: E402
from lora_pipeline.models import SMOLLM2  # noqa: E402
from lora_pipeline.settings import TrainSettings  # noqa: E402
from lora_pipeline.train import TrainingRun, train  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    conversations = [json.loads(line)["messages"] for line in SAMPLE.read_text().splitlines()]
    prompts = [c[:-1] for c in conversations[-a.prompts:]]
    with tempfile.TemporaryDirectory() as tmp:
        run = TrainingRun(TrainSettings(data=str(SAMPLE), batch=8, max_steps=2, save_every=0, backend="local",
                                        output_dir=tmp, run_name="adapter", learning_rate=5e-4)).open()
        summary = train(run)
        info = adapter_info(summary.final_lora_weights)
        engine = make_engine("local", SMOLLM2, rank=info["rank"], seed=0, request_timeout=120, weights=info)
        inputs = [engine.renderer.build_generation_prompt(p) for p in prompts]
        params = types.SamplingParams(max_tokens=a.max_tokens, temperature=0.0, seed=0)

        def batched():
            return [engine.sample(inputs, params, lora=lora).result() for lora in (True, False)]

        def one_at_a_time():
            return [[engine.sample([x], params, lora=lora).result()[0] for x in inputs] for lora in (True, False)]

        times, answers = {}, {}
        for name, fn in (("batched", batched), ("one_at_a_time", one_at_a_time)):
            start = time.perf_counter()
            answers[name] = fn()
            times[name] = time.perf_counter() - start
    tokens = {k: sum(len(s.tokens) for group in v for s in group) for k, v in answers.items()}
    write("evaluate", {
        "prompts": a.prompts, "answers": 2 * a.prompts, "max_tokens": a.max_tokens,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "generated_tokens": tokens,
        "batched_over_one_at_a_time_speedup": round(times["one_at_a_time"] / times["batched"], 2),
    })


if __name__ == "__main__":
    main()
