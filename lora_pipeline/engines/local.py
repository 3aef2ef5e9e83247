"""The local engine: PyTorch + PEFT LoRA on a small chat model, no network, no API key."""

import errno
import json
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from tinker import types
from transformers import GenerationConfig

from ..data import replace_dir, umask_mode
from ..errors import PipelineError
from ..models import load_model, load_tokenizer
from ..render import renderer_for
from . import INFO_FILE

ADAPTER_FILE = "adapter_model.safetensors"


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class LocalEngine:
    remote = False  # calls compute when made: queueing the next step ahead would gain nothing

    def __init__(self, base_model: str, rank: int, seed: int, root: Path | None = None,
                 adapter: Path | None = None):
        """A LoRA of `rank` on `base_model`, freshly initialised from `seed`, or loaded from a
        saved `adapter` folder. Saved states and weights go under `root`."""
        self.base_model, self.rank, self.seed = base_model, rank, seed
        self.root = Path(root) if root else None
        self.tokenizer = load_tokenizer(base_model)
        self.renderer = renderer_for(base_model, self.tokenizer)
        self.stop_tokens = [t for t in self.renderer.get_stop_sequences() if isinstance(t, int)]
        base = load_model(base_model)
        base.generation_config = GenerationConfig()  # no sampling defaults carried from the hub
        torch.manual_seed(seed)
        if adapter:
            self.model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        else:
            config = LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                task_type="CAUSAL_LM")
            self.model = get_peft_model(base, config)
        # Recorded in adapter_config.json, so `test` knows the base without being told.
        self.model.peft_config["default"].base_model_name_or_path = base_model
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def close(self, status: str = "success") -> None:
        """Nothing to release; here so that both engines can be closed alike."""

    # -- training --------------------------------------------------------------------------
    def _logprobs(self, data: list[types.Datum]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Per-token log-probs of the targets (batch x longest, right-padded) and the weights."""
        lengths = [d.model_input.length for d in data]
        width = max(lengths)
        inputs = torch.full((len(data), width), self.pad_id, dtype=torch.long)
        targets = torch.zeros((len(data), width), dtype=torch.long)
        weights = torch.zeros((len(data), width))
        mask = torch.zeros((len(data), width), dtype=torch.long)
        for i, (d, n) in enumerate(zip(data, lengths)):
            inputs[i, :n] = torch.tensor(d.model_input.to_ints())
            targets[i, :n] = d.loss_fn_inputs["target_tokens"].to_torch().long()
            weights[i, :n] = d.loss_fn_inputs["weights"].to_torch().float()
            mask[i, :n] = 1
        logits = self.model(input_ids=inputs, attention_mask=mask).logits
        logprobs = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return logprobs, weights, lengths

    def _output(self, logprobs, lengths, loss) -> types.ForwardBackwardOutput:
        rows = [{"logprobs": types.TensorData.from_torch(logprobs[i, :n].detach().clone())}
                for i, n in enumerate(lengths)]
        return types.ForwardBackwardOutput(loss_fn_output_type="cross_entropy", loss_fn_outputs=rows,
                                           metrics={"loss:sum": float(loss.detach())})

    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy") -> Future:
        """Adds the gradient of the weighted token NLL summed over the batch (Tinker's
        cross_entropy) to the accumulated gradients."""
        if loss_fn != "cross_entropy":
            raise PipelineError(f"the local engine supports loss_fn='cross_entropy', not {loss_fn!r}")
        self.model.train()
        logprobs, weights, lengths = self._logprobs(data)
        loss = -(logprobs * weights).sum()
        loss.backward()
        return _done(self._output(logprobs, lengths, loss))

    def forward(self, data: list[types.Datum], loss_fn: str = "cross_entropy") -> Future:
        self.model.eval()
        with torch.no_grad():
            logprobs, weights, lengths = self._logprobs(data)
        return _done(self._output(logprobs, lengths, -(logprobs * weights).sum()))

    def optim_step(self, adam: types.AdamParams) -> Future:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if adam.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
        for group in self.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _done(types.OptimStepResponse(metrics=None))

    # -- sampling --------------------------------------------------------------------------
    def sample(self, prompts: list[types.ModelInput], params: types.SamplingParams,
               lora: bool = True) -> Future:
        """One completion per prompt, all prompts in one batch. Stops at the end-of-turn token
        (not included in the tokens) or after `max_tokens`. Seeded: the same seed and prompts
        give the same answers, and sampling does not disturb the training RNG."""
        rows = [p.to_ints() for p in prompts]
        width = max(map(len, rows))
        # Left padding, so every prompt's last token sits in the same column for generation.
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        greedy = not params.temperature
        kwargs = dict(max_new_tokens=params.max_tokens or 128, do_sample=not greedy,
                      eos_token_id=self.stop_tokens, pad_token_id=self.pad_id)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k and params.top_k > 0 else 0)
        self.model.eval()
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(self.seed if params.seed is None else params.seed)
            if lora:
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            else:
                with self.model.disable_adapter():
                    out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        sequences = []
        for i, row in enumerate(out[:, width:].tolist()):
            stop_at = next((j for j, t in enumerate(row) if t in self.stop_tokens), None)
            tokens = row if stop_at is None else row[:stop_at]
            sequences.append(types.SampledSequence(
                stop_reason="length" if stop_at is None else "stop", sequence_id=str(i),
                tokens_np=np.asarray(tokens, dtype=np.int64)))
        return _done(sequences)

    # -- saving and loading ----------------------------------------------------------------
    def _write(self, name: str, write) -> str:
        if self.root is None:
            raise PipelineError("this engine was made without a folder to save into")
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters() if p.requires_grad):
            raise PipelineError(f"{name}: the LoRA weights are not finite numbers (training diverged), so they "
                                "are not saved; lower --learning-rate and train again with --start-over")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{name}-"))
        try:
            tmp.chmod(umask_mode(0o777))
            # save_embedding_layers=False: PEFT would otherwise look the base model up on the hub.
            self.model.save_pretrained(str(tmp), save_embedding_layers=False)
            info = {"backend": "local", "base_model": self.base_model, "rank": self.rank}
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            write(tmp)
            replace_dir(tmp, self.root / name)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            # torch.save and safetensors report a failed write (a full disk) as their own errors.
            if isinstance(e, (RuntimeError, SafetensorError)):
                raise OSError(errno.EIO, f"the write failed ({str(e).strip().splitlines()[-1]})",
                              str(self.root / name)) from e
            raise
        return str(self.root / name)

    def save_weights_for_sampler(self, name: str) -> Future:
        """A PEFT adapter folder, loadable with `peft.PeftModel.from_pretrained`."""
        return _done(self._write(name, lambda tmp: None))

    def save_state(self, name: str) -> Future:
        """The adapter plus what resuming needs: optimizer and RNG state. Written whole or not
        at all."""
        def write(tmp: Path) -> None:
            torch.save({"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()},
                       tmp / "training_state.pt")
        return _done(self._write(name, write))

    def load_state(self, path: str | Path) -> None:
        """Restore adapter, optimizer and RNG saved by `save_state`."""
        path = Path(path)
        if not (path / "training_state.pt").exists():
            raise PipelineError(f"{path}: not a saved training state (no training_state.pt)")
        info = json.loads((path / INFO_FILE).read_text())
        if (info["base_model"], info["rank"]) != (self.base_model, self.rank):
            raise PipelineError(f"{path}: saved for {info['base_model']} rank {info['rank']}, "
                                f"not {self.base_model} rank {self.rank}")
        set_peft_model_state_dict(self.model, load_file(str(path / ADAPTER_FILE)))
        state = torch.load(path / "training_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)  # gradients of an unfinished step are not state
        torch.set_rng_state(state["rng"])
