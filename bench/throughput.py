"""Training throughput of the local engine: trained tokens per second through the pipeline's
training loop (TrainingRun.step) against a plain PyTorch + PEFT loop on the same model, LoRA,
batches and lengths; the share of computed tokens that are padding, with each batch computed in
chunks of similar lengths as the local engine does and padded whole as the plain loop does;
and each loop's peak resident memory (measured in a child process of its own).

    python bench/throughput.py [--steps 10] [--repeats 2]     # on the CPU: bench/results/throughput.json
    python bench/throughput.py --device cuda [--quick]       # on a GPU: bench/results/throughput_gpu.json

On a GPU the engine is timed against a plain loop on batches of 8 x 512 tokens and on the sample
chats, for SmolLM2-135M and a SmolLM2-1.7B-shaped model (bench/gpu_throughput.py); --quick
leaves out the torch.compile variants, which take minutes to compile.
"""

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import write  # noqa: E402
from plain_loop import PlainLoop  # noqa: E402

from lora_pipeline.engines.local import length_chunks  # noqa: E402

from lora_pipeline.settings import TrainSettings  # noqa: E402
from lora_pipeline.train import TrainingRun  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"


def padding(batches: list[list[int]]) -> float:
    real = sum(sum(b) for b in batches)
    computed = sum(max(b) * len(b) for b in batches)
    return 1 - real / computed


def peak_rss_mib(which: str, steps: int, batches: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-of", which, "--steps", str(steps),
                          "--batches", str(batches)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]


def measure_rss(which: str, steps: int, batches: Path) -> None:
    """In a child process: train `steps` steps one way, print the peak resident memory."""
    if which == "plain":
        loop, batches = PlainLoop(), pickle.loads(batches.read_bytes())  # no engine loaded beside it
        for batch in batches[:steps]:
            loop.step(batch)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run = TrainingRun(TrainSettings(data=str(SAMPLE), batch=8, max_steps=steps, save_every=0,
                                          backend="local", device="cpu", output_dir=tmp, run_name="rss")).open()
            for n in range(1, steps + 1):
                run.step(n)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="on a GPU: leave out the torch.compile variants")
    ap.add_argument("--rss-of", choices=["pipeline", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.device == "cuda":
        from gpu_throughput import main as gpu_main

        return gpu_main(a.quick, write)
    if a.rss_of:
        return measure_rss(a.rss_of, a.steps, a.batches)
    with tempfile.TemporaryDirectory() as tmp:
        run = TrainingRun(TrainSettings(data=str(SAMPLE), batch=8, max_steps=a.steps, save_every=0,
                                        backend="local", device="cpu", output_dir=tmp, run_name="bench")).open()
        batches = [run.batch(n) for n in range(1, a.steps + 1)]
        tokens = sum(int(sum(d.loss_fn_inputs["weights"].to_torch().sum() for d in b)) for b in batches)
        (Path(tmp) / "batches.pkl").write_bytes(pickle.dumps(batches))
        rss = {"pipeline": round(peak_rss_mib("pipeline", 3, Path(tmp) / "batches.pkl")),
               "plain_peft_loop": round(peak_rss_mib("plain", 3, Path(tmp) / "batches.pkl"))}
        plain = PlainLoop()
        best = {"pipeline": float("inf"), "plain_peft_loop": float("inf")}
        for _ in range(a.repeats):  # alternating, so that the machine's state affects both alike
            start = time.perf_counter()
            for n in range(1, a.steps + 1):
                run.step(n)
            best["pipeline"] = min(best["pipeline"], time.perf_counter() - start)
            start = time.perf_counter()
            for batch in batches:
                plain.step(batch)
            best["plain_peft_loop"] = min(best["plain_peft_loop"], time.perf_counter() - start)
        whole = [[d.model_input.length for d in run.batch(n)] for n in range(1, run.steps_per_epoch + 1)]
        chunked = [[b[i] for i in chunk] for b in whole for chunk in length_chunks(b)]
        run.close()
    per_second = {k: tokens / v for k, v in best.items()}
    write("throughput", {
        "steps": a.steps, "batch": 8, "trained_tokens": tokens,
        "trained_tokens_per_second": {k: round(v, 1) for k, v in per_second.items()},
        "pipeline_over_plain_ratio": round(per_second["pipeline"] / per_second["plain_peft_loop"], 3),
        "padding_fraction": {"pipeline_length_chunks": round(padding(chunked), 3),
                             "whole_batches": round(padding(whole), 3)},
        "peak_rss_mib": rss,
        "targets": {"pipeline_over_plain_ratio": 0.95, "padding_fraction": 0.10},
    })


if __name__ == "__main__":
    main()
