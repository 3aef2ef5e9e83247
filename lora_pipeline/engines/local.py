"""The local engine: PyTorch + PEFT LoRA on a small chat model, no network, no API key."""

import errno
import json
import math
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
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..data import replace_dir, umask_mode
from ..errors import PipelineError
from ..models import base_weights, load_model, load_tokenizer, resolve_device, resolve_dtype
from ..render import renderer_for
from . import INFO_FILE

ADAPTER_FILE = "adapter_model.safetensors"


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


# What one more forward and backward call costs, in padded tokens' worth of compute: about 200 ms
# against 7.5 ms a token, measured on SmolLM2-135M with LoRA on the CPU.
CALL_COST_TOKENS = 32


def length_chunks(lengths: list[int], call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Indices of a batch's examples, sorted by length and cut into consecutive chunks so that
    the computed tokens (each chunk padded to its longest example) plus `call_cost` a chunk are
    fewest. Batches are drawn at random, not by length, since batches of similar lengths train
    worse (lora_pipeline/train.py); computing such a batch in chunks of similar lengths keeps
    most of the padding saving that grouping gave, at no cost in quality."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cost, cut = [0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):  # cost[j]: the cheapest split of the j shortest
        for i in range(j):
            c = cost[i] + (j - i) * lengths[order[j - 1]] + call_cost
            if c < cost[j]:
                cost[j], cut[j] = c, i
    chunks, j = [], len(order)
    while j:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def _until_stop(generated: torch.Tensor, stop_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of generated tokens: whether it holds a stop token, and how many tokens
    come before its first one (all of them if none)."""
    stopped = torch.isin(generated, torch.tensor(stop_tokens, device=generated.device))
    ended = stopped.any(dim=1)
    return ended, torch.where(ended, stopped.int().argmax(dim=1), generated.shape[1])


class _Progress(StoppingCriteria):
    """Reports generation as it goes, and stops nothing: one batch for all the prompts is
    several times faster than batches small enough to report on one by one."""

    def __init__(self, width: int, stop_tokens: list[int], report):
        self.width, self.stop_tokens, self.report = width, stop_tokens, report

    def __call__(self, input_ids, scores, **kwargs):
        # Read back at every position: on a GPU that waits for the device, but transformers'
        # sampling loop already waits there once a step (it asks whether any row is unfinished).
        ended, lengths = _until_stop(input_ids[:, self.width:], self.stop_tokens)
        self.report(int(ended.sum()), int(lengths.sum()), input_ids.shape[1] - self.width)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _batch_tensors(data: list[types.Datum], pad_id: int, pack: bool) -> tuple:
    """The model's inputs, the targets, the loss weights (on the CPU) and the forward's other
    arguments for `data`: right-padded rows, or with `pack` one row of every sequence."""
    lengths = [d.model_input.length for d in data]
    tokens = [d.model_input.to_ints() for d in data]
    if pack:
        # One row, each sequence's positions counting from 0: transformers then lets no token
        # attend across a sequence boundary (it reads the boundaries from the positions only
        # without a KV cache), and nothing is spent on padding.
        inputs = torch.tensor([t for row in tokens for t in row])[None]
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        targets = torch.cat([d.loss_fn_inputs["target_tokens"].to_torch().long() for d in data])[None]
        weights = torch.cat([d.loss_fn_inputs["weights"].to_torch().float() for d in data])[None]
        return inputs, targets, weights, {"position_ids": positions, "use_cache": False}
    width = max(lengths)
    inputs = torch.full((len(data), width), pad_id, dtype=torch.long)
    targets = torch.zeros((len(data), width), dtype=torch.long)
    weights = torch.zeros((len(data), width))
    mask = torch.zeros((len(data), width), dtype=torch.long)
    for i, (d, n) in enumerate(zip(data, lengths)):
        inputs[i, :n] = torch.tensor(tokens[i])
        targets[i, :n] = d.loss_fn_inputs["target_tokens"].to_torch().long()
        weights[i, :n] = d.loss_fn_inputs["weights"].to_torch().float()
        mask[i, :n] = 1
    # Without padding there is no mask to pass: the attention is then plainly causal, as it
    # would be with an all-ones mask, without transformers checking on the GPU that the mask is
    # all ones (a wait for the GPU before every forward).
    return inputs, targets, weights, {"attention_mask": None if min(lengths) == width else mask}


class LocalEngine:
    remote = False  # calls compute when made: queueing the next step ahead would gain nothing

    def __init__(self, base_model: str, rank: int, seed: int, root: Path | None = None,
                 adapter: Path | None = None, device: str = "auto", dtype: str = "auto",
                 pack: bool = False, compile_mode: str | None = None):
        """A LoRA of `rank` on `base_model`, freshly initialised from `seed`, or loaded from a
        saved `adapter` folder. Saved states and weights go under `root`.

        `device` is "auto" (the GPU when there is one), "cpu" or "cuda"; `dtype` is the base
        weights' ("auto": bfloat16 on a GPU that has it, float32 otherwise). The LoRA weights and
        the optimizer state are float32 whatever the base (bench/precision.py measures why).
        `pack` puts a batch's sequences end to end in one row instead of padding them (the
        same losses and gradients, bench/throughput.py times both). `compile_mode` is a
        torch.compile mode ("default", "reduce-overhead": CUDA graphs) for training and
        scoring; sampling stays eager."""
        self.base_model, self.rank, self.seed = base_model, rank, seed
        self.root = Path(root) if root else None
        self.device = torch.device(resolve_device(device))
        self.dtype = getattr(torch, resolve_dtype(self.device.type, dtype))
        self.pack = pack
        self.tokenizer = load_tokenizer(base_model)
        # tinker-cookbook looks renderers up by "org/name" and refuses a bare folder name such
        # as "my-model"; by its absolute path a folder is simply a model it does not know.
        folder = Path(base_model).expanduser()
        self.renderer = renderer_for(str(folder.resolve()) if folder.is_dir() else base_model, self.tokenizer)
        self.stop_tokens = [t for t in self.renderer.get_stop_sequences() if isinstance(t, int)]
        base = load_model(base_model, str(self.dtype).removeprefix("torch."))
        base.generation_config = GenerationConfig()  # no sampling defaults carried from the hub
        self.context_length = getattr(base.config, "max_position_embeddings", None)
        # The LoRA is made on the CPU and then moved, so that a seed gives the same initial
        # weights on every device.
        torch.manual_seed(seed)
        if adapter:
            try:
                self.model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
            except (RuntimeError, ValueError, KeyError) as e:  # PEFT's way of saying "other layer sizes"
                raise PipelineError(f"--lora-weights {adapter}: does not fit the base model {base_model} "
                                    f"({str(e).strip().splitlines()[-1].strip()[:200]}); it was trained for another "
                                    "model: pass that one with --base-model") from None
        else:
            config = LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                task_type="CAUSAL_LM")
            self.model = get_peft_model(base, config)
        self.model.to(self.device)
        # Recorded in adapter_config.json, so `test` knows the base without being told.
        self.model.peft_config["default"].base_model_name_or_path = base_model
        params = [p for p in self.model.parameters() if p.requires_grad]
        # LoRA weights (and so Adam's moments) in float32 under a bfloat16 base: in bfloat16 the
        # updates, a learning rate times an Adam step, round away (bench/precision.py: the 10th
        # step of the demo's schedule left 38% of bfloat16 LoRA weights unchanged). PEFT does
        # this by default; a no-op then, and on a float32 base.
        for p in params:
            p.data = p.data.float()
        # On the GPU the fused AdamW updates every LoRA tensor in one kernel; the CPU keeps the
        # default implementation it always had. Its hyperparameters are left at torch's
        # defaults here: every optim_step sets them from the AdamParams it is given, as Tinker
        # takes them with each step, before they are used.
        self.optimizer = torch.optim.AdamW(params, fused=True if self.device.type == "cuda" else None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._forward = torch.compile(self.model, mode=compile_mode) if compile_mode else self.model

    @property
    def placement(self) -> dict:
        """Where and in what precision this engine computes, for config.json and the report."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": self.device.type, "device_name": name,
                "dtype": str(self.dtype).removeprefix("torch."), "lora_dtype": "float32",
                "pack": self.pack}

    def close(self, status: str = "success") -> None:
        """Nothing to release; here so that both engines can be closed alike."""

    # -- training --------------------------------------------------------------------------
    def _logprobs(self, data: list[types.Datum]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the targets (float32) and the weights, both shaped as the
        model's input: batch x longest, right-padded, or 1 x all tokens when packed."""
        lengths = [d.model_input.length for d in data]
        inputs, targets, weights, kwargs = _batch_tensors(data, self.pad_id, self.pack)
        # The batch goes to the device once, the log-probs come back once (_rows); on the CPU
        # both are no-ops.
        kwargs = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
        weights = weights.to(self.device, non_blocking=True)
        try:
            logits = self._forward(input_ids=inputs.to(self.device, non_blocking=True), **kwargs).logits
            # The log-softmax over the vocabulary in float32: taken in bfloat16 a token's log-prob
            # is off by up to 0.02 (bench/precision.py). A no-op when the model computes in float32.
            # And over the vocabulary as it lies in memory: on the (batch, vocab, time) view the
            # softmax sums 49k exponentials with a stride, off by up to 2e-4 nats a token.
            logprobs = -F.cross_entropy(logits.float().flatten(0, 1), targets.to(self.device, non_blocking=True).flatten(),
                                        reduction="none").view_as(targets)
        except torch.cuda.OutOfMemoryError:
            raise PipelineError(f"the GPU ran out of memory on {len(data)} sequences of up to {max(lengths)} "
                                "tokens; lower --batch or --max-length") from None
        return logprobs, weights

    def _rows(self, logprobs, lengths: list[int]) -> list[torch.Tensor]:
        # Called after the backward pass is queued, so that the copy to the host, which waits
        # for the GPU, does not hold the backward's launch back.
        host = logprobs.detach().cpu()
        return list(host[0].split(lengths)) if self.pack else [host[i, :n] for i, n in enumerate(lengths)]

    def _run(self, data: list[types.Datum], backward: bool) -> types.ForwardBackwardOutput:
        """The weighted token NLL summed over `data` (Tinker's cross_entropy), with its gradient
        added to the accumulated ones if `backward`. Padded batches are computed in chunks of
        similar lengths (length_chunks): the sum and its gradient are the whole batch's, only
        padding is saved."""
        lengths = [d.model_input.length for d in data]
        rows, total = [None] * len(data), 0.0
        for chunk in [list(range(len(data)))] if self.pack else length_chunks(lengths):
            logprobs, weights = self._logprobs([data[i] for i in chunk])
            loss = -(logprobs * weights).sum()
            if backward:
                try:
                    loss.backward()
                except torch.cuda.OutOfMemoryError:
                    raise PipelineError(f"the GPU ran out of memory computing the gradients of {len(chunk)} "
                                        "sequences; lower --batch or --max-length") from None
            total += float(loss.detach())
            for i, row in zip(chunk, self._rows(logprobs, [lengths[i] for i in chunk])):
                rows[i] = {"logprobs": types.TensorData.from_torch(row.clone())}
        return types.ForwardBackwardOutput(loss_fn_output_type="cross_entropy", loss_fn_outputs=rows,
                                           metrics={"loss:sum": total})

    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy") -> Future:
        """Adds the gradient of the weighted token NLL summed over the batch (Tinker's
        cross_entropy) to the accumulated gradients."""
        if loss_fn != "cross_entropy":
            raise PipelineError(f"the local engine supports loss_fn='cross_entropy', not {loss_fn!r}")
        self.model.train()
        return _done(self._run(data, backward=True))

    def forward(self, data: list[types.Datum], loss_fn: str = "cross_entropy") -> Future:
        self.model.eval()
        with torch.no_grad():
            return _done(self._run(data, backward=False))

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
               lora: bool = True, progress=None) -> Future:
        """One completion per prompt, all prompts in one batch. Stops at the end-of-turn token
        (not included in the tokens) or after `max_tokens`. Seeded: the same seed and prompts
        give the same answers, and sampling does not disturb the training RNG. `progress(done,
        tokens, steps)`, if given, is called after every generated position: answers finished,
        tokens generated so far, positions generated."""
        rows = [p.to_ints() for p in prompts]
        width = max(map(len, rows))
        # Left padding, so every prompt's last token sits in the same column for generation.
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows]).to(self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]).to(self.device)
        greedy = not params.temperature
        kwargs = dict(max_new_tokens=params.max_tokens or 128, do_sample=not greedy,
                      eos_token_id=self.stop_tokens, pad_token_id=self.pad_id)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k if params.top_k and params.top_k > 0 else 0)
        if progress:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Progress(width, self.stop_tokens, progress)])
        self.model.eval()
        gpu = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpu), torch.no_grad():
            torch.manual_seed(self.seed if params.seed is None else params.seed)
            if lora:
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            else:
                with self.model.disable_adapter():
                    out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        generated = out[:, width:]
        ended, lengths = _until_stop(generated, self.stop_tokens)
        return _done([types.SampledSequence(stop_reason="stop" if stop else "length", sequence_id=str(i),
                                            tokens_np=row[:n].cpu().numpy().astype(np.int64))
                      for i, (row, stop, n) in enumerate(zip(generated, ended.tolist(), lengths.tolist()))])

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
            info = {"backend": "local", "base_model": self.base_model, "rank": self.rank,
                    "base_weights": base_weights(self.base_model, str(self.dtype).removeprefix("torch."))}
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
            rng = {"rng": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            torch.save({"optimizer": self.optimizer.state_dict(), **rng}, tmp / "training_state.pt")
        return _done(self._write(name, write))

    def load_state(self, path: str | Path) -> None:
        """Restore adapter, optimizer and RNG saved by `save_state`, on this engine's device
        whichever device saved them."""
        path = Path(path)
        if not (path / "training_state.pt").exists():
            raise PipelineError(f"{path}: not a saved training state (no training_state.pt)")
        info = json.loads((path / INFO_FILE).read_text())
        if (info["base_model"], info["rank"]) != (self.base_model, self.rank):
            raise PipelineError(f"{path}: saved for {info['base_model']} rank {info['rank']}, "
                                f"not {self.base_model} rank {self.rank}")
        set_peft_model_state_dict(self.model, load_file(str(path / ADAPTER_FILE)))
        # Read onto the CPU (a state saved on a GPU loads where there is none); the optimizer
        # then casts and moves its moments to its parameters' device and dtype.
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)  # gradients of an unfinished step are not state
        torch.set_rng_state(state["rng"])
        # A state saved on the CPU leaves the GPU's generator as seeded; training draws nothing
        # from it (no dropout), only sampling does, and that is seeded per call.
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
