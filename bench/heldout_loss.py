"""Held-out loss of a PEFT LoRA adapter: mean negative log-likelihood per trained token.

Deliberately independent of lora_pipeline: plain transformers + peft, one example at a time
(no padding, so no attention mask or padding side can change the figure), so the pipeline's
adapters and TRL's are scored by the same code, which shares nothing with either trainer.

The data is JSONL, one example a line: {"input_ids": [...], "labels": [...]}, labels being the
token ids with -100 where no loss is taken (the Hugging Face convention: labels[k] is predicted
from input_ids[:k]).

    python bench/heldout_loss.py --base-model MODEL_FOLDER --data val.tokens.jsonl ADAPTER [ADAPTER ...]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM


def read_tokens(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def heldout_loss(base_model: str, adapter: str | None, examples: list[dict]) -> dict:
    """Mean NLL per trained token of `examples` under `base_model` plus `adapter` (None: the
    base model alone)."""
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logits = model(input_ids=ids).logits[0, :-1].double()
            keep = labels != -100
            total += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return {"loss": total / count, "tokens": count, "examples": len(examples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-model", required=True, help="a transformers model folder")
    ap.add_argument("--data", type=Path, required=True, help="JSONL of input_ids and labels")
    ap.add_argument("adapters", nargs="*", help="PEFT adapter folders (none: the base model)")
    a = ap.parse_args()
    examples = read_tokens(a.data)
    for adapter in a.adapters or [None]:
        print(json.dumps({"adapter": adapter, **heldout_loss(a.base_model, adapter, examples)}))


if __name__ == "__main__":
    main()
