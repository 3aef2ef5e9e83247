"""Evaluation on the local engine, two ways:

- batching: 32 prompts answered by the LoRA and by its base model, in one batch each against
  one prompt at a time, with the same engine, greedy decoding and token budget;
- at the nightly's answer settings (the 18 test prompts, 150 tokens, sampling at 0.7, LoRA and
  base): the pipeline's evaluation (`lora_pipeline.evaluate.compare`, as `lora-pipeline test`
  runs it: batches of 8, progress after each) against plain transformers + PEFT, the tokenizer's
  own chat template and one batched `model.generate` per model, with the same settings. Both
  load the model and the adapter inside the timing; the answers differ (sampling), so the figure
  is generated tokens per second, up to each answer's end-of-turn token.

    python bench/evaluate.py [--prompts 32] [--max-tokens 32] [--repeats 2]
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
from lora_pipeline.evaluate import adapter_info, compare, load_prompts  # noqa: E402
from lora_pipeline.models import SMOLLM2, load_model, load_tokenizer  # noqa: E402
from lora_pipeline.settings import SampleSettings, TrainSettings  # noqa: E402
from lora_pipeline.train import TrainingRun, train  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"
PROMPTS = ROOT / "data" / "sample" / "test_prompts.json"
NIGHTLY = SampleSettings(max_tokens=150, temperature=0.7, compare_base=True, seed=0)  # prefect.yaml's nightly


def plain_generate(adapter: str, prompts: list, s: SampleSettings) -> int:
    """The LoRA's and the base model's answers with plain transformers + PEFT, each model's
    prompts in one left-padded batch; the answers' tokens, up to the end-of-turn token."""
    import torch
    from peft import PeftModel

    tokenizer = load_tokenizer(SMOLLM2)
    model = PeftModel.from_pretrained(load_model(SMOLLM2), adapter).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template([p["messages"] for p in prompts], add_generation_prompt=True, padding=True,
                                          return_tensors="pt", return_dict=True)
    kwargs = dict(max_new_tokens=s.max_tokens, do_sample=True, temperature=s.temperature, top_p=1.0, top_k=0,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokens = 0
    torch.manual_seed(s.seed)
    with torch.no_grad():
        for lora in (True, False):
            if lora:
                out = model.generate(**batch, **kwargs)
            else:
                with model.disable_adapter():
                    out = model.generate(**batch, **kwargs)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                tokens += row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
    return tokens


def nightly_settings(adapter: str, repeats: int) -> dict:
    prompts = load_prompts(str(PROMPTS))[:100]
    runs = {"pipeline": lambda: sum(r["lora_tokens"] + r["base_tokens"]
                                    for r in compare(adapter, prompts, NIGHTLY)["results"]),
            "plain_generate": lambda: plain_generate(adapter, prompts, NIGHTLY)}
    figures = {name: [] for name in runs}
    for _ in range(repeats):  # alternating, so that the machine's state affects both alike
        for name, run in runs.items():
            start = time.perf_counter()
            tokens = run()
            figures[name].append({"tokens": tokens, "seconds": round(time.perf_counter() - start, 2),
                                  "tokens_per_s": round(tokens / (time.perf_counter() - start), 1)})
    best = {name: max(r["tokens_per_s"] for r in rs) for name, rs in figures.items()}
    return {"prompts": len(prompts), "answers": 2 * len(prompts), "max_tokens": NIGHTLY.max_tokens,
            "temperature": NIGHTLY.temperature, "runs": figures, "best_tokens_per_s": best,
            "pipeline_over_plain_ratio": round(best["pipeline"] / best["plain_generate"], 3),
            "target": ">= 0.9"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
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
        nightly = nightly_settings(summary.final_lora_weights, a.repeats)
    tokens = {k: sum(len(s.tokens) for group in v for s in group) for k, v in answers.items()}
    write("evaluate", {
        "prompts": a.prompts, "answers": 2 * a.prompts, "max_tokens": a.max_tokens,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "generated_tokens": tokens,
        "batched_over_one_at_a_time_speedup": round(times["one_at_a_time"] / times["batched"], 2),
        "nightly_settings": nightly,
    })


if __name__ == "__main__":
    main()
