"""Training quality: the held-out loss of the pipeline's adapters against TRL's SFTTrainer +
PEFT trained on the same token ids, loss masks and settings, for several seeds, on the persona
demo and on a larger Alpaca-shaped set (data/sample/alpaca_tasks.jsonl); with each run's trained
tokens per second and peak resident memory.

A control shows where a difference comes from: on the first seed, TRL also trains on the
pipeline's very draws (its batches, in order, and its initial LoRA weights). With nothing random
left to differ, the two held-out losses agree to float error if the recipes are the same; the
seeds' runs then differ by their draws only.

Every adapter is scored by bench/heldout_loss.py, which shares no code with either trainer.
Each training run is a child process of its own, so that its peak memory is its own; the
pipeline and TRL take turns going first, so that the machine's load falls on both alike. TRL's
defaults that differ from the shared settings are overridden, and listed in the JSON.

    pip install -e '.[bench]'      # TRL, for this benchmark only (make bench does it)
    python bench/quality.py [--seeds 0 1 2] [--datasets persona alpaca] [--ablation] [--threads N]

Figures: bench/results/quality.json (bench/results/quality_<data sets>.json for some of them).

--ablation also trains the pipeline with its recipe as it was before issue 14 (the loss summed
over each batch's tokens; length-grouped batches within windows of 16), one change at a time.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean as mean

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import write  # noqa: E402
from heldout_loss import heldout_loss, read_tokens  # noqa: E402

DATASETS = {  # name: (rows, share held out)
    "persona": (ROOT / "data" / "sample" / "persona_train.jsonl", 0.05),  # as `lora-pipeline run` splits it
    "alpaca": (ROOT / "data" / "sample" / "alpaca_tasks.jsonl", 0.1),  # 48 held-out rows, ~950 tokens
}
# The recipe both trainers follow. The local engine's LoRA is alpha 32, dropout 0, on every linear
# projection (lora_pipeline/engines/local.py); TRL is given the same LoraConfig.
SETTINGS = {"batch": 8, "steps": 30, "learning_rate": 5e-4, "schedule": "linear decay to 0, no warmup",
            "rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
            "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": None,
            "dtype": "float32", "max_length": 1024, "loss": "mean NLL per trained token of each batch"}
# Pipeline variants for --ablation: what each changes back to the recipe before issue 14.
ABLATION = {"pipeline_summed_loss": ["summed"], "pipeline_length_grouped": ["grouped"],
            "pipeline_before_issue14": ["summed", "grouped"]}
CHANGES = {"summed": "the loss summed over the batch's trained tokens, not their mean",
           "grouped": "batches of similar lengths (sorted within windows of 16 batches), not random ones"}


def grouped_batches(lengths: list[int]):
    """epoch_batches as it was before issue 14, for examples of these lengths: a seeded shuffle,
    then, within windows of 16 batches, examples of similar length batched together, and the
    batches shuffled."""
    def epoch_batches(examples: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(examples)[:examples // batch * batch]
        batches = []
        for w in range(0, len(order), 16 * batch):
            window = sorted(order[w:w + 16 * batch], key=lambda j: lengths[j])
            batches += [window[i:i + batch] for i in range(0, len(window), batch)]
        return [batches[k] for k in rng.permutation(len(batches))]
    return epoch_batches


def tokens_file(datums, path: Path) -> None:
    """The examples as bench/heldout_loss.py and TRL read them: whole token sequences, with
    labels -100 wherever the pipeline puts no loss weight."""
    with open(path, "w") as f:
        for d in datums:
            ids = d.model_input.to_ints()
            targets = d.loss_fn_inputs["target_tokens"].to_torch().tolist()
            weights = d.loss_fn_inputs["weights"].to_torch().tolist()
            labels = [-100] + [t if w > 0 else -100 for t, w in zip(targets, weights)]
            f.write(json.dumps({"input_ids": ids + targets[-1:], "labels": labels}) + "\n")


def trl_config(out: str, seed: int, steps: int):
    """TRL's SFTConfig at the shared settings, and the defaults it overrides."""
    from trl import SFTConfig

    chosen = dict(
        per_device_train_batch_size=SETTINGS["batch"], gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=SETTINGS["learning_rate"], lr_scheduler_type="linear", warmup_steps=0,
        adam_beta1=SETTINGS["beta1"], adam_beta2=SETTINGS["beta2"], adam_epsilon=SETTINGS["eps"],
        weight_decay=SETTINGS["weight_decay"], max_grad_norm=0.0,  # 0: no clipping
        bf16=False, fp16=False,
        # Recomputes activations in the backward pass: slower, the same gradients.
        gradient_checkpointing=False,
        max_length=SETTINGS["max_length"], loss_type="nll", packing=False, padding_free=False,
        train_sampling_strategy="random", seed=seed, data_seed=seed,
        save_strategy="no", report_to="none", dataloader_num_workers=0, use_cpu=True,
    )
    config = SFTConfig(output_dir=out, **chosen)
    defaults = SFTConfig(output_dir=out, use_cpu=True)  # on CPU, as here; its bf16 default needs it
    overridden = {k: {"trl_default": getattr(defaults, k), "used": getattr(config, k)} for k in chosen
                  if getattr(defaults, k) != getattr(config, k) and k not in ("seed", "data_seed", "max_steps")}
    return config, overridden


def train_trl(train_tokens: Path, base: str, seed: int, steps: int, out: Path, draws: Path | None = None) -> dict:
    """TRL's own run; or, given the pipeline's `draws` for this seed (draws.json: its batches
    in order and its initial LoRA weights), TRL trained on exactly those: then nothing random
    differs, and any difference in held-out loss is a difference of recipe."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    args, _ = trl_config(str(out), seed, steps)
    rows = read_tokens(train_tokens)
    if draws:
        drawn = json.loads(draws.read_text())
        rows = [rows[i] for batch in drawn["batches"] for i in batch]
        args.train_sampling_strategy = "sequential"  # the rows are in the pipeline's batch order
    tokenizer = AutoTokenizer.from_pretrained(base)
    set_seed(seed)  # before the LoRA's initialisation, which the trainer does
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batches = []  # (trained, real, computed) tokens of each batch, in the order they are used

    def counting(examples):
        b = collate(examples)
        batches.append((int((b["labels"] != -100).sum()), int(b["attention_mask"].sum()),
                        b["attention_mask"].numel()))
        return b
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock["start"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *args, **kwargs):
            clock["end"] = time.perf_counter(), time.process_time()
    lora = LoraConfig(r=SETTINGS["rank"], lora_alpha=SETTINGS["lora_alpha"], lora_dropout=SETTINGS["lora_dropout"],
                      target_modules=SETTINGS["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=lora, data_collator=counting,
                         callbacks=[Clock()])
    if draws:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        loaded = set_peft_model_state_dict(trainer.model, load_file(str(Path(drawn["initial"]) / "adapter_model.safetensors")))
        assert not loaded.unexpected_keys, loaded.unexpected_keys
    trainer.train()
    trainer.model.save_pretrained(str(out / "adapter"))
    used = batches[:steps]  # the trainer fetches one batch ahead of the last step
    return {"adapter": str(out / "adapter"), "trained_tokens": sum(b[0] for b in used),
            "train_s": clock["end"][0] - clock["start"][0], "cpu_s": clock["end"][1] - clock["start"][1],
            "padding": 1 - sum(b[1] for b in used) / sum(b[2] for b in used)}


def train_pipeline(train_chat: Path, seed: int, steps: int, out: Path, summed=False, grouped=False) -> dict:
    import lora_pipeline.train as recipe
    from lora_pipeline.engines.local import length_chunks
    from lora_pipeline.settings import TrainSettings
    from lora_pipeline.train import TrainingRun, trained_tokens

    run = TrainingRun(TrainSettings(
        data=str(train_chat), batch=SETTINGS["batch"], max_steps=steps, rank=SETTINGS["rank"],
        learning_rate=SETTINGS["learning_rate"], save_every=0, backend="local", seed=seed,
        output_dir=str(out), run_name="pipeline", max_length=SETTINGS["max_length"], beta1=SETTINGS["beta1"],
        beta2=SETTINGS["beta2"], eps=SETTINGS["eps"], weight_decay=SETTINGS["weight_decay"])).open()
    if summed:  # the loss summed over the batch's tokens (its logged loss is then that sum)
        recipe.normalised = lambda batch: batch
    if grouped:
        recipe.epoch_batches = grouped_batches([d.model_input.length for d in run.examples])
    batches = [run.batch(n) for n in range(1, steps + 1)]
    # What this seed drew, for the TRL run on the same draws: the batches (as indices of the
    # examples, which are in the token file's order) and the initial LoRA weights.
    (out / "draws.json").write_text(json.dumps({
        "batches": [run.batch_indices(n) for n in range(1, steps + 1)],
        "initial": run.engine.save_weights_for_sampler("initial").result()}))
    start, cpu = time.perf_counter(), time.process_time()
    for n in range(1, steps + 1):
        run.step(n)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    summary = run.finish()
    run.close()
    # Padding as the local engine computes a batch: in chunks of similar lengths.
    lengths = [[b[i].model_input.length for i in chunk] for b in batches
               for chunk in length_chunks([d.model_input.length for d in b])]
    return {"adapter": summary.final_lora_weights, "trained_tokens": int(sum(map(trained_tokens, batches))),
            "train_s": seconds, "cpu_s": cpu, "padding": 1 - sum(map(sum, lengths)) / sum(max(b) * len(b) for b in lengths)}


def child(a) -> None:
    """In a child process: one training run; prints its figures, peak memory included."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.child in ("trl", "trl_same_draws"):
        result = train_trl(Path(a.tokens), a.base, a.seed, a.steps, out, a.draws and Path(a.draws))
    else:
        result = train_pipeline(Path(a.chat), a.seed, a.steps, out, **{c: True for c in ABLATION.get(a.child, [])})
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_child(trainer: str, data: dict, seed: int, steps: int, threads: int | None, out: Path,
              draws: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", trainer, "--chat", str(data["chat"]), "--tokens",
           str(data["tokens"]), "--base", data["base"], "--seed", str(seed), "--steps", str(steps),
           "--out", str(out)] + (["--threads", str(threads)] if threads else []) + (["--draws", str(draws)] if draws else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{trainer} seed {seed} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepared(name: str, tmp: Path) -> dict:
    """The data set split by `lora-pipeline prepare`, rendered by the pipeline's renderer, and
    written as token files: the one source of token ids and masks for both trainers."""
    from lora_pipeline.data import read_chat_jsonl
    from lora_pipeline.models import SMOLLM2, load_tokenizer, resolve_local_model
    from lora_pipeline.prepare import prepare
    from lora_pipeline.render import render_conversations, renderer_for

    rows, val_fraction = DATASETS[name]
    chat = tmp / f"{name}.jsonl"
    report = prepare(str(rows), "train", chat, val_fraction=val_fraction)
    renderer = renderer_for(SMOLLM2, load_tokenizer(SMOLLM2))
    files = {}
    for split, path in (("train", chat), ("val", Path(report["validation"]))):
        datums, _ = render_conversations(read_chat_jsonl(path), renderer, SETTINGS["max_length"])
        files[split] = tmp / f"{name}.{split}.tokens.jsonl"
        tokens_file(datums, files[split])
    return {"chat": chat, "tokens": files["train"], "val_tokens": files["val"],
            "base": resolve_local_model(SMOLLM2), "train_examples": report["train"], "val_examples": report["val"]}


def measure(name: str, trainers: list[str], seeds: list[int], steps: int, threads: int | None, tmp: Path) -> dict:
    data = prepared(name, tmp)
    val = read_tokens(data["val_tokens"])
    runs = []
    for i, seed in enumerate(seeds):
        turn = trainers[i % len(trainers):] + trainers[:i % len(trainers)]
        for trainer in turn:
            r = run_child(trainer, data, seed, steps, threads, tmp / f"{name}-{trainer}-{seed}")
            loss = heldout_loss(data["base"], r["adapter"], val)
            runs.append({"trainer": trainer, "seed": seed, "heldout_loss": round(loss["loss"], 6),
                         "trained_tokens": r["trained_tokens"], "train_s": round(r["train_s"], 1),
                         "trained_tokens_per_s": round(r["trained_tokens"] / r["train_s"], 1),
                         "trained_tokens_per_cpu_s": round(r["trained_tokens"] / r["cpu_s"], 1),
                         "padding": round(r["padding"], 3), "peak_rss_mib": round(r["peak_rss_mib"]),
                         "load_avg_1min": round(os.getloadavg()[0], 1)})
            print(json.dumps({"dataset": name, **runs[-1]}), flush=True)
    # The control: TRL on the first seed's very draws (the pipeline's batches and initial LoRA).
    seed = seeds[0]
    same = run_child("trl_same_draws", data, seed, steps, threads, tmp / f"{name}-trl_same_draws-{seed}",
                     draws=tmp / f"{name}-pipeline-{seed}" / "draws.json")
    pipeline = next(r["heldout_loss"] for r in runs if r["trainer"] == "pipeline" and r["seed"] == seed)
    same_loss = heldout_loss(data["base"], same["adapter"], val)["loss"]
    by = {t: [r for r in runs if r["trainer"] == t] for t in trainers}
    loss = {t: round(mean(r["heldout_loss"] for r in rs), 4) for t, rs in by.items()}
    speed = {t: round(mean(r["trained_tokens_per_s"] for r in rs), 1) for t, rs in by.items()}
    per_cpu_s = {t: round(mean(r["trained_tokens_per_cpu_s"] for r in rs), 1) for t, rs in by.items()}
    base = heldout_loss(data["base"], None, val)
    return {
        "train_examples": data["train_examples"], "heldout_examples": data["val_examples"],
        "heldout_trained_tokens": base["tokens"], "base_model_heldout_loss": round(base["loss"], 4),
        "heldout_loss_mean": loss,
        "heldout_loss_sd": {t: round(float(np.std([r["heldout_loss"] for r in rs], ddof=1)), 4) for t, rs in by.items()},
        "heldout_loss_ratio_pipeline_over_trl": round(loss["pipeline"] / loss["trl"], 3),
        "trained_tokens_per_s_mean": speed,
        "tokens_per_s_ratio_pipeline_over_trl": round(speed["pipeline"] / speed["trl"], 3),
        "trained_tokens_per_cpu_s_mean": per_cpu_s,
        "tokens_per_cpu_s_ratio_pipeline_over_trl": round(per_cpu_s["pipeline"] / per_cpu_s["trl"], 3),
        "peak_rss_mib_max": {t: max(r["peak_rss_mib"] for r in rs) for t, rs in by.items()},
        "padding_mean": {t: round(mean(r["padding"] for r in rs), 3) for t, rs in by.items()},
        "same_draws": {"seed": seed, "pipeline": pipeline, "trl": round(same_loss, 6),
                       "heldout_loss_ratio_pipeline_over_trl": round(pipeline / same_loss, 4)},
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["persona", "alpaca"])
    ap.add_argument("--steps", type=int, default=SETTINGS["steps"])
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads in each training run (default: torch's)")
    for hidden in ("--child", "--chat", "--tokens", "--base", "--out", "--draws"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    from importlib.metadata import version

    trainers = ["pipeline", "trl"] + (list(ABLATION) if a.ablation else [])
    with tempfile.TemporaryDirectory() as tmp:
        figures = {name: measure(name, trainers, a.seeds, a.steps, a.threads, Path(tmp)) for name in a.datasets}
        _, overridden = trl_config(tmp, 0, a.steps)
    # A run on some of the data sets only (e.g. more seeds on one) keeps the whole run's figures.
    write("quality" if set(a.datasets) == set(DATASETS) else "quality_" + "_".join(a.datasets), {
        "settings": {**SETTINGS, "steps": a.steps}, "seeds": a.seeds, "trl_version": version("trl"),
        "torch_threads": a.threads or "torch's default",
        "trl_defaults_overridden": overridden,
        "same_inputs": "both trainers get the token ids and loss masks the pipeline's renderer makes; TRL "
                       "gets them pre-tokenized (input_ids, labels -100 outside the trained tokens)",
        "same_draws": "the control: TRL trained on the first seed's batches, in the pipeline's order, from the "
                      "pipeline's initial LoRA weights",
        "timed": "pipeline: its step loop; TRL: trainer.train() from on_train_begin to on_train_end; wall "
                 "time, and the process's CPU time (steadier on a shared machine)",
        **({"ablation": {k: [CHANGES[c] for c in v] for k, v in ABLATION.items()}} if a.ablation else {}),
        **figures,
        "targets": {"heldout_loss_ratio_pipeline_over_trl": "<= 1.0", "tokens_per_s_ratio_pipeline_over_trl": ">= 1.2"},
    })


if __name__ == "__main__":
    main()
