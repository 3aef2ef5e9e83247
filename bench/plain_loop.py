"""The baseline the local engine is measured against: what one writes by hand with transformers
and PEFT, on the same model, LoRA, optimizer and batches: right-padded batches, the summed
weighted token loss, AdamW, the loss read each step. On a GPU its base weights take the dtype
the engine would (bfloat16 where the GPU has it)."""

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from lora_pipeline.models import SMOLLM2, load_model, resolve_dtype


class PlainLoop:
    def __init__(self, base_model: str = SMOLLM2, device: str = "cpu"):
        torch.manual_seed(0)
        config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                            task_type="CAUSAL_LM")
        self.device = device
        self.model = get_peft_model(load_model(base_model, resolve_dtype(device)).to(device), config)
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def step(self, batch) -> float:
        width = max(d.model_input.length for d in batch)
        inputs = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.zeros((len(batch), width), dtype=torch.long)
        weights = torch.zeros((len(batch), width))
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, d in enumerate(batch):
            n = d.model_input.length
            inputs[i, :n] = torch.tensor(d.model_input.to_ints())
            targets[i, :n] = d.loss_fn_inputs["target_tokens"].to_torch().long()
            weights[i, :n] = d.loss_fn_inputs["weights"].to_torch().float()
            mask[i, :n] = 1
        inputs, targets, weights, mask = (t.to(self.device) for t in (inputs, targets, weights, mask))
        logits = self.model(input_ids=inputs, attention_mask=mask).logits
        loss = (F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * weights).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()
