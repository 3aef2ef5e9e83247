"""Which precision for the local engine on a GPU: the demo's training (SmolLM2-135M, batch 8,
learning rate 5e-4 decaying linearly, r 16) run three ways on the same batches:

- float32 everywhere (the CPU's setting);
- bfloat16 base weights, float32 LoRA weights and Adam state (the engine's GPU setting);
- bfloat16 everywhere, LoRA weights and Adam state included.

For each: the training loss per step, the held-out loss before and after, how far each is from
float32's, and the share of LoRA weights that the last step left unchanged although Adam moved
them (an update smaller than half a unit in the last place is lost). Also the error of a
log-softmax taken in bfloat16 rather than in float32 on the same logits, which is why the engine
upcasts the logits before the loss.

    python bench/precision.py [--device cpu|cuda] [--steps 30]
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tinker import types

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import write  # noqa: E402

from lora_pipeline.data import read_chat_jsonl  # noqa: E402
from lora_pipeline.engines.local import LocalEngine  # noqa: E402
from lora_pipeline.models import SMOLLM2  # noqa: E402
from lora_pipeline.render import render_conversations  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"
HELD_OUT = 16


def per_token(out: types.ForwardBackwardOutput, data) -> float:
    return out.metrics["loss:sum"] / sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in data)


def held_out_loss(engine: LocalEngine, data) -> float:
    return sum(engine.forward(data[i:i + 8]).result().metrics["loss:sum"] for i in range(0, len(data), 8)) \
        / sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in data)


def train(device: str, setting: str, steps: int) -> dict:
    engine = LocalEngine(SMOLLM2, rank=16, seed=0, device=device,
                         dtype="float32" if setting == "float32" else "bfloat16")
    if setting == "bfloat16_everywhere":
        params = [p for p in engine.model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.bfloat16()
        engine.optimizer = torch.optim.AdamW(params, lr=1e-4)
    data, _ = render_conversations(read_chat_jsonl(SAMPLE), engine.renderer, 1024)
    held_out, train_data = data[:HELD_OUT], data[HELD_OUT:]
    record = {"val_loss_before": held_out_loss(engine, held_out), "train_loss": []}
    for step in range(1, steps + 1):
        batch = train_data[(step - 1) * 8:step * 8]
        lr = 5e-4 * (1 - (step - 1) / steps)
        out = engine.forward_backward(batch).result()
        if step == steps:
            before = [p.detach().clone() for p in engine.optimizer.param_groups[0]["params"]]
        engine.optim_step(types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-8)).result()
        record["train_loss"].append(per_token(out, batch))
        print(setting, step, round(record["train_loss"][-1], 4), flush=True)
    after = engine.optimizer.param_groups[0]["params"]
    unchanged = sum(int((a == b).sum()) for a, b in zip(after, before))
    record["last_step_left_unchanged"] = unchanged / sum(p.numel() for p in after)
    record["val_loss_after"] = held_out_loss(engine, held_out)
    if setting == "bfloat16_base":
        record["log_softmax_error"] = log_softmax_error(engine, held_out)
    return record


def log_softmax_error(engine: LocalEngine, data) -> dict:
    """Per-token log-prob of the targets from the same bfloat16 logits, with the log-softmax in
    bfloat16 and in float32."""
    errors = []
    engine.model.eval()
    with torch.no_grad():
        for d in data:
            ids = torch.tensor([d.model_input.to_ints()], device=engine.device)
            targets = d.loss_fn_inputs["target_tokens"].to_torch().long()[None].to(engine.device)
            logits = engine.model(input_ids=ids).logits
            low = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").float()
            high = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
            errors.append((low - high).abs().flatten())
    errors = torch.cat(errors)
    return {"mean": float(errors.mean()), "max": float(errors.max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    runs = {s: train(a.device, s, a.steps) for s in ("float32", "bfloat16_base", "bfloat16_everywhere")}
    reference = runs["float32"]["train_loss"]
    for run in runs.values():
        run["max_train_loss_diff_from_float32"] = max(abs(x - y) for x, y in zip(run["train_loss"], reference))
        run["val_loss_after_diff_from_float32"] = run["val_loss_after"] - runs["float32"]["val_loss_after"]
    write(f"precision_{a.device}", {"device": a.device, "steps": a.steps, "batch": 8, "learning_rate": 5e-4,
                                    "rank": 16, "held_out_examples": HELD_OUT, "runs": runs})


if __name__ == "__main__":
    main()
