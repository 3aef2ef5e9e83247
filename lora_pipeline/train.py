"""The supervised training loop: batches, steps, checkpoints, and the run folder's layout.

    run_dir/config.json          every parameter (no secrets)
    run_dir/training_log.json    [{"step", "loss", "tokens", "lr", "time_s"}, ...]
    run_dir/checkpoint_step_N/   adapter + optimizer + RNG + step, every `save_every` steps
    run_dir/final_lora_weights/  the adapter to use for inference
    run_dir/training_state/      what resuming needs, as of the last step
    run_dir/checkpoints.jsonl    every saved state and sampler path (tinker:// on Tinker), as made
    run_dir/validation_log.json  held-out loss before training (the base model), at each
                                 checkpoint and at the end, and the loss on as many training
                                 examples: [{"step", "val_loss", "val_ppl", "train_loss"}, ...]
    run_dir/best_lora_weights.json  the saved weights with the lowest held-out loss

On Tinker the checkpoint folders hold the tinker:// paths (lora_pipeline.json), not weights.
"""

import dataclasses
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from tinker import types

from .data import file_sha256, read_chat_jsonl, read_json, write_json
from .engines import EngineTimeout, check_base_model, choose_backend, default_base_model, make_engine
from .errors import PipelineError
from .render import OVERFLOW_CHOICES, render_conversations


@dataclass
class TrainConfig:
    data: str
    batch: int = 8
    max_steps: int = 0  # 0 = one full epoch
    rank: int = 16
    learning_rate: float = 1e-4
    save_every: int = 25  # 0 = only the final weights
    output_dir: str = "checkpoints"
    backend: str = "auto"
    base_model: str | None = None  # None = the backend's default
    seed: int = 0
    run_name: str | None = None  # None = lora_<model>_<YYYYmmdd_HHMMSS>
    max_length: int = 1024
    on_overflow: str = "truncate"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    request_timeout: float = 120.0  # seconds any one engine call may take (Tinker)
    start_over: bool = False  # replace an existing run folder instead of continuing it
    val_data: str | None = None  # held-out conversations: loss measured at start, checkpoints, end

    def check(self) -> None:
        for name in ("batch", "rank"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) < 0:
                raise PipelineError(f"--{name.replace('_', '-')} must be 0 or more")
        if not self.request_timeout > 0:
            raise PipelineError("--request-timeout must be positive")
        if not self.learning_rate > 0:
            raise PipelineError("--learning-rate must be positive")
        if self.on_overflow not in OVERFLOW_CHOICES:
            raise PipelineError(f"--on-overflow must be one of {', '.join(OVERFLOW_CHOICES)}")


def run_folder_name(base_model: str, now: datetime | None = None) -> str:
    model = re.sub(r"[^A-Za-z0-9.-]+", "_", base_model.strip("/"))
    return f"lora_{model}_{(now or datetime.now()):%Y%m%d_%H%M%S}"


def preflight(cfg: TrainConfig, read_data: bool = True) -> tuple[str, str, list]:
    """Check what can be checked without the model: settings, backend, base model, data file.
    Returns the backend, the base model and the conversations."""
    cfg.check()
    backend = choose_backend(cfg.backend)
    base_model = cfg.base_model or default_base_model(backend)
    conversations = read_chat_jsonl(Path(cfg.data)) if read_data else []
    if read_data and cfg.val_data:
        read_chat_jsonl(Path(cfg.val_data))
    check_base_model(backend, base_model)
    return backend, base_model, conversations


def trained_tokens(data: list[types.Datum]) -> float:
    """How many tokens of `data` carry loss weight: what a summed loss is divided by."""
    return sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in data)


def read_registry(run_dir: Path, notes: list[str] | None = None) -> list[dict]:
    """The entries of run_dir/checkpoints.jsonl. A line cut short by a crash is skipped (and
    said in `notes`)."""
    path = run_dir / "checkpoints.jsonl"
    entries = []
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if notes is not None:
                notes.append(f"checkpoints.jsonl:{n} is incomplete; ignored")
    return entries


# config.json's layout; a run folder of another format is not continued.
FORMAT = 1
# What must match for a run folder to be continued: the data and all that shapes the steps.
# Where checkpoints go, how often, and timeouts may change between tries.
RESUME_KEYS = ("data_sha256", "batch", "max_steps", "rank", "learning_rate", "backend", "base_model",
               "seed", "max_length", "on_overflow", "beta1", "beta2", "eps", "weight_decay")


class TrainingRun:
    """One training run: its engine, its examples and its run folder.

    Everything that can be wrong with the inputs is checked before the run folder is made,
    so a bad --data, --backend or --base-model leaves nothing behind. An existing run folder
    with the same data and settings is continued from its newest loadable checkpoint.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.backend, self.base_model, conversations = preflight(cfg)
        self.run_dir = Path(cfg.output_dir) / (cfg.run_name or run_folder_name(self.base_model))
        self.config = {
            **dataclasses.asdict(cfg), "format": FORMAT, "data_sha256": file_sha256(Path(cfg.data)),
            "backend_requested": cfg.backend, "backend": self.backend, "base_model": self.base_model,
            "run_dir": str(self.run_dir),
        }
        del self.config["start_over"]
        resuming = self._check_existing_folder()
        self.engine = self._new_engine()
        self.examples, self.render_report = render_conversations(
            conversations, self.engine.renderer, cfg.max_length, cfg.on_overflow)
        self.val_examples = []
        if cfg.val_data:
            self.val_examples, _ = render_conversations(read_chat_jsonl(Path(cfg.val_data)), self.engine.renderer,
                                                        cfg.max_length, cfg.on_overflow)
        # As many training examples as held-out ones, measured alongside them: the gap between
        # the two losses, taken with the same weights, is the overfitting signal.
        picked = np.random.default_rng(cfg.seed).permutation(len(self.examples))[:len(self.val_examples)]
        self.train_sample = [self.examples[j] for j in sorted(picked)]
        if len(self.examples) < cfg.batch:
            raise PipelineError(f"--data {cfg.data}: {len(self.examples)} usable examples, fewer than "
                                f"one batch of {cfg.batch}; lower --batch or add data")
        # The last partial batch of an epoch is dropped: every step then sees `batch` examples,
        # and a step's batch depends only on (data, seed, step), which exact replay relies on.
        self.steps_per_epoch = len(self.examples) // cfg.batch
        self.total_steps = cfg.max_steps or self.steps_per_epoch
        self._epochs: dict[int, list[list[int]]] = {}  # the current epoch's batches
        self.log: list[dict] = []
        self.val_log: list[dict] = []
        self.saved: list[dict] = []  # the registry's usable entries, as in checkpoints.jsonl
        self.notes: list[str] = []  # what resuming found and did, for the logs
        self.first_step = 1
        self.dirty = False  # an engine call failed part-way: the engine's state is unknown
        self.queued: dict[int, tuple] = {}  # step -> its submitted (forward_backward, optim_step)
        self.started = time.monotonic()
        if resuming:
            self._resume()
        else:
            self.run_dir.mkdir(parents=True)
            self.config.update(examples=len(self.examples), total_steps=self.total_steps,
                               rendering=self.render_report.summary())
            write_json(self.run_dir / "config.json", self.config)

    def _check_existing_folder(self) -> bool:
        """True when the run folder exists and may be continued; refuses one that may not."""
        if not self.run_dir.exists():
            return False
        if self.cfg.start_over:
            shutil.rmtree(self.run_dir)
            return False
        again = "Pass --start-over to replace it, or choose another --run-name."
        try:
            old = json.loads((self.run_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise PipelineError(f"{self.run_dir} exists but has no readable config.json, so it is not a "
                                f"run folder to continue. {again}") from None
        if old.get("format") != FORMAT:
            raise PipelineError(f"{self.run_dir} was made by another version of lora-pipeline (format "
                                f"{old.get('format', 'none')}, this one writes {FORMAT}) and cannot be "
                                f"continued. {again}")
        changed = [f"{k} {old.get(k)!r} -> {self.config[k]!r}" for k in RESUME_KEYS
                   if old.get(k) != self.config[k]]
        if changed:
            raise PipelineError(f"{self.run_dir} was trained with other data or settings "
                                f"({'; '.join(changed)}); continuing would mix two runs. {again}")
        return True

    def _resume(self) -> None:
        """Continue from the newest checkpoint that loads. Half-written files are removed, a
        checkpoint that does not load is reported and skipped, and the log is cut back to the
        step the run continues from, so no step is logged twice or missing."""
        for leftover in sorted(self.run_dir.glob(".tmp-*")) + sorted(self.run_dir.glob(".old-*")):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            self.notes.append(f"removed half-written {leftover.name}")
        registry = read_registry(self.run_dir, self.notes)
        done, unusable = 0, set()
        for entry in reversed([e for e in registry if e["state_path"]]):
            try:
                self.engine.load_state(entry["state_path"])
                done = entry["step"]
                break
            except Exception as e:  # any damage: a missing, truncated or foreign checkpoint
                unusable.add(entry["name"])
                self.notes.append(f"{entry['name']} cannot be loaded ({type(e).__name__}: {e}); "
                                  "trying an older one")
        else:
            self.engine.close("errored")
            self.engine = self._new_engine()  # nothing loaded: start from the seed
        self.saved = [e for e in registry if e["step"] <= done and e["name"] not in unusable]
        self.log = [r for r in read_json(self.run_dir / "training_log.json", []) if r["step"] <= done]
        write_json(self.run_dir / "training_log.json", self.log)
        self.val_log = [r for r in read_json(self.run_dir / "validation_log.json", []) if r["step"] <= done]
        self.first_step = done + 1
        self.notes.append(f"continuing after step {done} of {self.total_steps}" if done
                          else "no usable checkpoint: starting from step 1")

    def _new_engine(self):
        cfg = self.cfg
        return make_engine(self.backend, self.base_model, cfg.rank, cfg.seed, self.run_dir,
                           cfg.request_timeout)

    def describe(self) -> str:
        return (f"engine {self.backend}, base model {self.base_model}, "
                f"{self.render_report.summary()}; {self.total_steps} steps of {self.cfg.batch}, "
                f"run folder {self.run_dir}" + "".join(f"; {note}" for note in self.notes))

    def finished(self) -> dict | None:
        """The summary of a run that already trained to the end, if this is one."""
        path = self.run_dir / "summary.json"
        if self.first_step > self.total_steps and path.exists():
            summary = json.loads(path.read_text())
            if summary["steps"] == self.total_steps:
                return summary
        return None

    def _epoch(self, epoch: int) -> list[list[int]]:
        """The batches of an epoch, as example indices: a fresh seeded shuffle, then, within
        windows of 16 batches, examples of similar length are batched together and the batches
        shuffled. Padding a batch to its longest example then wastes little compute (the
        local engine pads; see bench/throughput.py), and which examples share a step is still
        random beyond the window."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.cfg.seed, epoch])
            size = self.cfg.batch
            order = rng.permutation(len(self.examples))[:self.steps_per_epoch * size]
            batches = []
            for w in range(0, len(order), 16 * size):
                window = sorted(order[w:w + 16 * size], key=lambda j: self.examples[j].model_input.length)
                batches += [window[i:i + size] for i in range(0, len(window), size)]
            self._epochs = {epoch: [batches[k] for k in rng.permutation(len(batches))]}
        return self._epochs[epoch]

    def batch(self, step: int) -> list[types.Datum]:
        """The examples of 1-based `step`, a function of the data, the seed and the step."""
        epoch, i = divmod(step - 1, self.steps_per_epoch)
        return [self.examples[j] for j in self._epoch(epoch)[i]]

    def learning_rate(self, step: int) -> float:
        return self.cfg.learning_rate * (1 - (step - 1) / self.total_steps)  # linear decay to ~0

    def saves_at(self, step: int) -> bool:
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0

    def _submit(self, step: int, batch: list[types.Datum]) -> tuple:
        cfg = self.cfg
        adam = types.AdamParams(learning_rate=self.learning_rate(step), beta1=cfg.beta1,
                                beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay)
        # Both are submitted before either is awaited: on Tinker they then share a clock cycle.
        return self.engine.forward_backward(batch, "cross_entropy"), self.engine.optim_step(adam)

    def _apply(self, step: int, batch: list[types.Datum]) -> types.ForwardBackwardOutput:
        fb, opt = self.queued.pop(step, None) or self._submit(step, batch)
        # On a remote engine the next step is queued before this one is awaited, so the
        # service has it for its next clock cycle instead of idling while the results travel
        # back (awaiting each call in turn costs three cycles a step, ARCHITECTURE.md). Not past
        # a checkpoint or the end: a save or a held-out measure must see this step's weights.
        if self.engine.remote and step < self.total_steps and not self.saves_at(step):
            self.queued[step + 1] = self._submit(step + 1, self.batch(step + 1))
        out = fb.result()
        opt.result()
        return out

    def _recover(self, done: int) -> None:
        """Bring the engine to the state right after step `done` without trusting it: a failed
        call may have applied forward_backward, or optim_step, or left a Tinker client stuck.
        Restore the newest saved state up to `done` (or start afresh from the seed) and replay
        the steps since, with the same batches."""
        states = [e for e in self.saved if e["state_path"] and e["step"] <= done]
        if states:
            self.engine.load_state(states[-1]["state_path"])
            start = states[-1]["step"]
        else:
            self.engine.close("errored")
            self.engine = self._new_engine()
            start = 0
        for k in range(start + 1, done + 1):
            self._apply(k, self.batch(k))

    def close(self, status: str = "success") -> None:
        self.engine.close(status)

    def _guarded(self, done: int, where: str, action):
        """Run `action()` on an engine in the state after step `done`. If it fails, the engine
        is marked unknown, and the next call (a retry) recovers it first: so each step is
        applied exactly once, whatever failed and wherever."""
        try:
            if self.dirty:
                self.queued.clear()  # submitted to an engine in an unknown state
                self._recover(done)
            self.dirty = True
            result = action()
            self.dirty = False
            return result
        except EngineTimeout as e:
            raise EngineTimeout(e.op, e.seconds, where) from None

    def step(self, step: int) -> dict:
        """One optimizer step; returns and logs its record."""
        start = time.monotonic()
        batch = self.batch(step)
        out = self._guarded(step - 1, f"step {step}", lambda: self._apply(step, batch))
        tokens = trained_tokens(batch)
        record = {"step": step, "loss": out.metrics["loss:sum"] / tokens, "tokens": int(tokens),
                  "lr": self.learning_rate(step), "time_s": round(time.monotonic() - start, 4)}
        self.log.append(record)
        write_json(self.run_dir / "training_log.json", self.log)
        return record

    def _register(self, name: str, step: int, state_path=None, sampler_path=None) -> dict:
        entry = {"name": name, "step": step, "state_path": state_path, "sampler_path": sampler_path,
                 "time": datetime.now().isoformat(timespec="seconds")}
        with open(self.run_dir / "checkpoints.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.saved.append(entry)
        return entry

    def validate(self, step: int) -> dict | None:
        """Mean per-token loss on the held-out examples, and on as many training examples, with
        the weights after `step` (0: the base model, since a fresh LoRA changes nothing). All
        batches in flight together."""
        if not self.val_examples or any(r["step"] == step for r in self.val_log):
            return None
        size = self.cfg.batch

        def measure() -> list[float]:
            # Sorted by length, so that each chunk pads little; the sum does not depend on order.
            calls = [[self.engine.forward(examples[i:i + size]) for i in range(0, len(examples), size)]
                     for examples in (sorted(group, key=lambda d: d.model_input.length)
                                      for group in (self.val_examples, self.train_sample))]
            return [sum(call.result().metrics["loss:sum"] for call in group) for group in calls]
        val_sum, train_sum = self._guarded(step, f"validation at step {step}", measure)
        val_loss = val_sum / trained_tokens(self.val_examples)
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                  "train_loss": train_sum / trained_tokens(self.train_sample)}
        self.val_log.append(record)
        write_json(self.run_dir / "validation_log.json", self.val_log)
        return record

    def save_checkpoint(self, step: int) -> str:
        name = f"checkpoint_step_{step}"
        path = self._guarded(step, f"checkpoint at step {step}", lambda: self.engine.save_state(name).result())
        self._register(name, step, state_path=path)
        self.validate(step)
        return path

    def _best(self) -> dict | None:
        """The saved weights with the lowest held-out loss, recorded in best_lora_weights.json."""
        weights = {e["step"]: e for e in self.saved if e["name"].startswith("checkpoint_step_")}
        weights[len(self.log)] = {"name": "final_lora_weights", "step": len(self.log),
                                  "state_path": str(self.run_dir / "final_lora_weights")}
        scored = [r for r in self.val_log if r["step"] in weights]
        if not scored:
            return None
        best = min(scored, key=lambda r: r["val_loss"])
        entry = weights[best["step"]]
        record = {"name": entry["name"], "step": best["step"], "val_loss": best["val_loss"],
                  "path": entry["state_path"]}
        write_json(self.run_dir / "best_lora_weights.json", record)
        return record

    def finish(self) -> dict:
        steps = len(self.log)
        final = self._guarded(steps, "the final weights",
                              lambda: self.engine.save_weights_for_sampler("final_lora_weights").result())
        self._register("final_lora_weights", steps, sampler_path=final)
        state = self._guarded(steps, "the final state", lambda: self.engine.save_state("training_state").result())
        self._register("training_state", steps, state_path=state)
        self.validate(steps)
        base = next((r["val_loss"] for r in self.val_log if r["step"] == 0), None)
        summary = {
            "run_dir": str(self.run_dir), "final_lora_weights": str(self.run_dir / "final_lora_weights"),
            "checkpoints": self.saved, "backend": self.backend, "base_model": self.base_model,
            "steps": steps, "first_loss": self.log[0]["loss"], "last_loss": self.log[-1]["loss"],
            "tokens": sum(r["tokens"] for r in self.log),
            "val_loss_base": base, "val_loss_final": self.val_log[-1]["val_loss"] if self.val_log else None,
            "best": self._best(),
            "time_s": round(time.monotonic() - self.started, 2),
        }
        write_json(self.run_dir / "summary.json", summary)
        return summary


def train(run: TrainingRun, step=TrainingRun.step, save=TrainingRun.save_checkpoint,
          finish=TrainingRun.finish, validate=TrainingRun.validate) -> dict:
    """Train to the end and return the run's summary. `step`, `save`, `finish` and `validate`
    are called as `step(run, n)`, `save(run, n)`, `finish(run)`, `validate(run, 0)`; the Prefect
    layer passes tasks here so that each is a task run of its own, retried on its own."""
    done = run.finished()
    if done:
        return done
    validate(run, 0)  # the base model's held-out loss, once
    for n in range(run.first_step, run.total_steps + 1):
        step(run, n)
        if run.saves_at(n):
            save(run, n)
    return finish(run)
