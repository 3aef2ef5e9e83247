"""The supervised training loop: the batch schedule, the learning rate, the steps, the
checkpoints, and resuming. The run folder's layout and records are in run_folder.py."""

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tinker import types

from .data import check_input_file, file_sha256, folder_sha256, held_out_beside, read_chat_jsonl, slug
from .engines import EngineTimeout, check_base_model, choose_backend, default_base_model, make_engine
from .errors import PipelineError
from .export import export_run_weights
from .models import check_rank, resolve_device
from .render import render_conversations
from .run_folder import FINAL, FORMAT, STATE, CheckpointRecord, RunFolder, RunSummary, checkpoint_name
from .settings import TrainSettings, resume_keys

# What must match for a run folder to be continued: the data, the held-out data (its losses are
# compared across the run: two held-out sets in one validation log would compare nothing) and
# the settings that shape the steps (marked in settings.py). Where checkpoints go, how often,
# and timeouts may change.
RESUME_KEYS = ("data_sha256", "val_data_sha256", *resume_keys(TrainSettings))
# How a changed key is named to the user, where its name alone would not say.
KEY_NAMES = {"data_sha256": "the content of --data", "val_data_sha256": "the held-out data (--val-data)"}


def run_folder_name(config: dict) -> str:
    """lora_<model>_<key>: the key is eight hex digits of what the run's steps depend on
    (RESUME_KEYS: the data's hash and the settings), so the same command, or the same
    deployment run, finds its own earlier run folder again and continues it."""
    key = hashlib.sha256(json.dumps([config[k] for k in RESUME_KEYS]).encode()).hexdigest()[:8]
    return f"lora_{slug(config['base_model'])}_{key}"


def trained_tokens(data: list[types.Datum]) -> float:
    """How many tokens of `data` carry loss weight: what a summed loss is divided by."""
    return sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in data)


def epoch_batches(examples: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of an epoch, as example indices: a fresh seeded shuffle cut into batches of
    `batch`. Not grouped by length: batching similar lengths together saved padding but made the
    held-out loss 1.7x worse on the sample data (a batch of one length is mostly one kind of
    example; bench/quality.py), and the local engine wins most of the padding back by computing
    a batch in chunks of similar lengths. The last partial batch is dropped: every step sees
    `batch` examples, and a step's batch depends only on (data, seed, step), which exact replay
    relies on."""
    order = np.random.default_rng([seed, epoch]).permutation(examples)
    return [order[i:i + batch].tolist() for i in range(0, examples // batch * batch, batch)]


def normalised(batch: list[types.Datum]) -> list[types.Datum]:
    """The batch with every loss weight divided by the batch's trained tokens. Both engines sum
    weighted token losses (Tinker's cross_entropy), so the sum is then the mean NLL per trained
    token, the loss a step minimises and logs: a step's size does not grow with its batch's
    token count."""
    total = trained_tokens(batch)
    return [dataclasses.replace(d, loss_fn_inputs={
        **d.loss_fn_inputs, "weights": types.TensorData.from_torch(d.loss_fn_inputs["weights"].to_torch().float() / total)})
        for d in batch]


def learning_rate(peak: float, step: int, total_steps: int) -> float:
    """Linear decay from `peak` at step 1 to nearly 0 at the last step."""
    return peak * (1 - (step - 1) / total_steps)


class TrainingRun:
    """One training run: its settings, engine, examples and run folder.

    Making one only resolves names (backend, base model, run folder). `open()` does the work:
    checks the inputs before the run folder is made (so a bad --data, --backend or --base-model
    leaves nothing behind), starts the engine and continues an existing run folder with the
    same data and settings from its newest loadable checkpoint.
    """

    def __init__(self, settings: TrainSettings):
        settings.check()
        self.settings = settings
        self.backend = choose_backend(settings.backend)
        self.base_model = settings.base_model or default_base_model(self.backend)
        self.engine = None
        self.examples: list[types.Datum] = []
        self.val_examples: list[types.Datum] = []
        self.train_sample: list[types.Datum] = []
        self.total_steps = 0
        self.log: list[dict] = []
        self.val_log: list[dict] = []
        self.saved: list[CheckpointRecord] = []  # the registry's usable entries
        self.notes: list[str] = []  # what resuming found and did, for the logs
        self.first_step = 1
        self.done = 0  # the step whose weights the engine holds
        self.dirty = False  # an engine call failed part-way: the engine's state is unknown
        self.queued: dict[int, tuple] = {}  # step -> its submitted (forward_backward, optim_step)
        self._epoch: tuple[int, list[list[int]]] | None = None  # the current epoch's batches
        self.started = time.monotonic()

    @functools.cached_property
    def config(self) -> dict:
        """What config.json records: every setting (less start_over), the data's hash and what
        was resolved (backend, base model, held-out file, run folder)."""
        s = self.settings
        if not Path(s.data).exists():
            read_chat_jsonl(Path(s.data))  # says what is wrong and what to do
        check_input_file(s.data, "--data", empty_ok=True)  # before it is hashed: /dev/zero never ends
        val_data = s.val_data or held_out_beside(s.data)
        if val_data:
            check_input_file(val_data, "--val-data", empty_ok=True)
        # Paths absolute: the command that continues a run works from any folder.
        config = {**dataclasses.asdict(s), "format": FORMAT, "data": os.path.abspath(s.data),
                  "data_sha256": file_sha256(Path(s.data)), "val_data": val_data and os.path.abspath(val_data),
                  "val_data_sha256": val_data and file_sha256(Path(val_data)),
                  "backend_requested": s.backend, "backend": self.backend, "base_model": self.base_model}
        if val_data and config["val_data_sha256"] == config["data_sha256"]:
            raise PipelineError(f"--val-data {val_data}: holds the same conversations as --data {s.data}; a held-out "
                                "loss on training data would say nothing of generalising. Give held-out data "
                                "(prepare splits it off with --val-fraction)")
        del config["start_over"]
        # Absolute, but links not followed: a run folder that is a link is refused, not written through.
        config["run_dir"] = os.path.abspath(Path(s.output_dir) / (s.run_name or run_folder_name(config)))
        return config

    @functools.cached_property
    def folder(self) -> RunFolder:
        return RunFolder(self.config["run_dir"])

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    def check_inputs(self) -> tuple[list, list]:
        """Reads the training and held-out data and checks that the engine can start; returns
        the training and held-out conversations."""
        conversations = read_chat_jsonl(Path(self.settings.data))
        val_data = self.config["val_data"]
        val_conversations = read_chat_jsonl(Path(val_data), "--val-data") if val_data else []
        check_base_model(self.backend, self.base_model)
        if self.backend == "local":
            check_rank(self.base_model, self.settings.rank)
            resolve_device(self.settings.device)  # --device cuda without a GPU fails here
        return conversations, val_conversations

    def open(self, say=None) -> "TrainingRun":
        """Checks the inputs, takes the run folder (waiting up to --lock-wait, `say` told what
        for), and makes or continues it."""
        conversations, val_conversations = self.check_inputs()
        self.folder.lock(self.settings.lock_wait, say)
        try:
            self._open(conversations, val_conversations)
        except BaseException:
            self.close("errored")
            raise
        return self

    def _open(self, conversations: list, val_conversations: list) -> None:
        s = self.settings
        resuming = self._check_existing_folder(self.config)
        self.engine = self._new_engine()
        self.examples, self.render_report = render_conversations(
            conversations, self.engine.renderer, s.max_length, s.on_overflow)
        self.val_examples, _ = render_conversations(val_conversations, self.engine.renderer,
                                                    s.max_length, s.on_overflow)
        # As many training examples as held-out ones, measured alongside them: the gap between
        # the two losses, taken with the same weights, is the overfitting signal.
        picked = np.random.default_rng(s.seed).permutation(len(self.examples))[:len(self.val_examples)]
        self.train_sample = [self.examples[j] for j in sorted(picked)]
        if len(self.examples) < s.batch:
            dropped = self.render_report.dropped
            if any("length" in reason or reason.startswith("longer than") for reason in dropped):
                # The length limit dropped them, not the data's size: say which to change.
                reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
                raise PipelineError(f"--data {s.data}: {len(self.examples)} of {len(conversations)} examples are "
                                    f"usable at --max-length {s.max_length} ({reasons}), fewer than one batch "
                                    f"of {s.batch}; raise --max-length (or keep long examples with --on-overflow "
                                    "truncate)")
            raise PipelineError(f"--data {s.data}: {len(self.examples)} usable examples, fewer than "
                                f"one batch of {s.batch}; lower --batch or add data")
        self.steps_per_epoch = len(self.examples) // s.batch
        self.total_steps = s.max_steps or self.steps_per_epoch
        if resuming:
            self._resume()
            earlier, now = self.folder.read_config().get("placement"), self.placement
            if earlier and now and (earlier["device"], earlier["dtype"]) != (now["device"], now["dtype"]):
                self.notes.append(f"continuing on {now['device']}/{now['dtype']}; the earlier steps ran on "
                                  f"{earlier['device']}/{earlier['dtype']}")
        else:
            self.run_dir.mkdir(parents=True)
            self.folder.write_config({**self.config, "examples": len(self.examples), "total_steps": self.total_steps,
                                      "rendering": self.render_report.summary(), "placement": self.placement})

    def _check_existing_folder(self, config: dict) -> bool:
        """True when the run folder exists and may be continued; refuses one that may not.
        --start-over replaces only a folder that lora-pipeline made: one whose config.json says
        its format, never a symbolic link, never anything else."""
        other = "choose another --run-name or --output-dir"
        if self.run_dir.is_symlink() or (self.run_dir.exists() and not self.run_dir.is_dir()):
            raise PipelineError(f"{self.run_dir} is a symbolic link or a file, not a run folder; {other}")
        if not self.run_dir.exists():
            return False
        try:
            old = self.folder.read_config()
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or "format" not in old:
            raise PipelineError(f"{self.run_dir} exists but holds no lora-pipeline config.json, so it is not a "
                                f"run folder to continue or replace; {other}")
        if self.settings.start_over:
            shutil.rmtree(self.run_dir)
            return False
        again = f"Pass --start-over to replace it, or {other}."
        if old.get("format") != FORMAT:
            raise PipelineError(f"{self.run_dir} was made by another version of lora-pipeline (format "
                                f"{old.get('format', 'none')}, this one writes {FORMAT}) and cannot be "
                                f"continued. {again}")
        changed = [f"{KEY_NAMES[k]} changed" if k in KEY_NAMES else f"{k} {old.get(k)!r} -> {config[k]!r}"
                   for k in RESUME_KEYS if old.get(k) != config[k]]
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
        registry = self.folder.registry(self.notes)
        done, unusable = 0, set()
        for entry in reversed([e for e in registry if e.state_path]):
            held = self.folder.saved_step(entry.name)
            if held != entry.step:  # a mislabelled or replaced checkpoint is not trusted
                unusable.add(entry.name)
                self.notes.append(f"{entry.name} is registered as step {entry.step} but holds step {held}; "
                                  "trying an older one")
                continue
            try:
                self.engine.load_state(entry.state_path)
                done = entry.step
                break
            except Exception as e:  # any damage: a missing, truncated or foreign checkpoint
                unusable.add(entry.name)
                self.notes.append(f"{entry.name} cannot be loaded ({type(e).__name__}: {e}); "
                                  "trying an older one")
        else:
            self.engine.close("errored")
            self.engine = self._new_engine()  # nothing loaded: start from the seed
        self.saved = [e for e in registry if e.step <= done and e.name not in unusable]
        self.log = [r for r in self.folder.read_log() if r["step"] <= done]
        if [r["step"] for r in self.log] != list(range(1, done + 1)):
            raise PipelineError(
                f"{self.run_dir}: the newest usable checkpoint holds step {done}, but training_log.json "
                f"records steps {[r['step'] for r in self.log] or 'none'}: the records disagree, so the run "
                "cannot be continued safely. Pass --start-over to train it again.")
        self.folder.write_log(self.log)
        self.val_log = [r for r in self.folder.read_val_log() if r["step"] <= done]
        self.first_step = done + 1
        self.done = done
        # The summary's time is the training's, not this process's alone (tokens/s read 3x too
        # high after a resume): the earlier processes' steps count, as their log recorded them.
        self.started -= sum(r["time_s"] for r in self.log)
        if any(e.step == done and e.is_checkpoint for e in self.saved):
            self.validate(done)  # an interruption during the checkpoint's measure lost it; no-op if kept
        self.notes.append(f"continuing after step {done} of {self.total_steps}" if done
                          else "no usable checkpoint: starting from step 1")

    def _new_engine(self):
        s = self.settings
        return make_engine(self.backend, self.base_model, rank=s.rank, seed=s.seed,
                           request_timeout=s.request_timeout, root=self.run_dir, device=s.device, dtype=s.dtype)

    @property
    def placement(self) -> dict | None:
        """Where the engine computes and in what precision (the local engine says)."""
        return getattr(self.engine, "placement", None)

    def describe(self) -> str:
        return (f"engine {self.backend}, base model {self.base_model}, "
                f"{self.render_report.summary()}; {self.total_steps} steps of {self.settings.batch}, "
                f"run folder {self.run_dir}" + "".join(f"; {note}" for note in self.notes))

    def trained_before(self) -> RunSummary | None:
        """The summary in this run's folder, if the folder holds this very run (same format,
        data and settings) trained to the end with its final weights as they were saved: a
        rerun returns it without loading anything. None otherwise."""
        try:
            old = self.folder.read_config()
        except (OSError, ValueError):
            return None
        if old.get("format") != FORMAT or any(old.get(k) != self.config[k] for k in RESUME_KEYS):
            return None
        summary = self.folder.read_summary()
        if not summary or summary.steps != old.get("total_steps"):
            return None
        final = self.run_dir / FINAL
        if not final.is_dir() or folder_sha256(final) != summary.final_sha256:
            self.notes.append(f"{FINAL} is missing or changed since it was saved; saving it again")
            return None
        return summary

    def finished(self) -> RunSummary | None:
        """After open(): the summary of a run that already trained to the end (see trained_before)."""
        return self.trained_before() if self.first_step > self.total_steps else None

    def batch_indices(self, step: int) -> list[int]:
        """Which examples 1-based `step` trains on: a function of the data, the seed and the step."""
        epoch, i = divmod(step - 1, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_batches(len(self.examples), self.settings.batch, self.settings.seed, epoch))
        return self._epoch[1][i]

    def batch(self, step: int) -> list[types.Datum]:
        return [self.examples[j] for j in self.batch_indices(step)]

    def learning_rate(self, step: int) -> float:
        return learning_rate(self.settings.learning_rate, step, self.total_steps)

    def saves_at(self, step: int) -> bool:
        return bool(self.settings.save_every) and step % self.settings.save_every == 0

    def _submit(self, step: int, batch: list[types.Datum]) -> tuple:
        s = self.settings
        adam = types.AdamParams(learning_rate=self.learning_rate(step), beta1=s.beta1, beta2=s.beta2,
                                eps=s.eps, weight_decay=s.weight_decay)
        # Both are submitted before either is awaited: on Tinker they then share a clock cycle.
        return self.engine.forward_backward(normalised(batch), "cross_entropy"), self.engine.optim_step(adam)

    def _apply(self, step: int, batch: list[types.Datum]) -> types.ForwardBackwardOutput:
        fb, opt = self.queued.pop(step, None) or self._submit(step, batch)
        # On a remote engine the next step is queued before this one is awaited, so the
        # service has it for its next clock cycle instead of idling while the results travel
        # back (awaiting each call in turn costs three cycles a step). Not past a checkpoint
        # or the end: a save or a held-out measure must see this step's weights.
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
        states = [e for e in self.saved if e.state_path and e.step <= done]
        if states:
            self.engine.load_state(states[-1].state_path)
            start = states[-1].step
        else:
            self.engine.close("errored")
            self.engine = self._new_engine()
            start = 0
        for k in range(start + 1, done + 1):
            self._apply(k, self.batch(k))

    def close(self, status: str = "success") -> None:
        """Ends the engine's session and releases the run folder."""
        if self.engine is not None:
            self.engine.close(status)
            self.engine = None
        self.folder.unlock()

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
        self.done = step
        tokens = trained_tokens(batch)
        loss = out.metrics["loss:sum"]  # the batch's mean NLL per trained token (see normalised)
        if not math.isfinite(loss):
            last = next((f"{e.name} (step {e.step})" for e in reversed(self.saved) if e.state_path), "none")
            raise PipelineError(f"step {step}: the training loss is {loss} (not a finite number): training "
                                f"diverged. Nothing from this step on is saved; the last good checkpoint is {last}. "
                                "Lower --learning-rate and train again with --start-over.")
        record = {"step": step, "loss": loss, "tokens": int(tokens),
                  "lr": self.learning_rate(step), "time_s": round(time.monotonic() - start, 4)}
        self.log.append(record)
        self.folder.write_log(self.log)
        return record

    def _register(self, record: CheckpointRecord) -> CheckpointRecord:
        self.folder.register(record)
        self.saved = [e for e in self.saved if e.name != record.name] + [record]
        return record

    def validate(self, step: int) -> dict | None:
        """Mean per-token loss on the held-out examples, and on as many training examples, with
        the weights after `step` (0: the base model, since a fresh LoRA changes nothing). All
        batches in flight together."""
        if not self.val_examples or any(r["step"] == step for r in self.val_log):
            return None
        size = self.settings.batch

        def measure() -> list[float]:
            # Sorted by length, so that each chunk pads little; the sum does not depend on order.
            calls = [[self.engine.forward(examples[i:i + size]) for i in range(0, len(examples), size)]
                     for examples in (sorted(group, key=lambda d: d.model_input.length)
                                      for group in (self.val_examples, self.train_sample))]
            return [sum(call.result().metrics["loss:sum"] for call in group) for group in calls]
        val_sum, train_sum = self._guarded(step, f"validation at step {step}", measure)
        val_loss = val_sum / trained_tokens(self.val_examples)
        if not math.isfinite(val_loss):
            raise PipelineError(f"the held-out loss after step {step} is {val_loss} (not a finite number): "
                                "training diverged. Lower --learning-rate and train again with --start-over.")
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                  "train_loss": train_sum / trained_tokens(self.train_sample)}
        self.val_log.append(record)
        self.folder.write_val_log(self.val_log)
        return record

    def _save_state(self, name: str, step: int, where: str) -> str:
        """A saved state, marked with its step (checked on resume) before it is registered."""
        path = self._guarded(step, where, lambda: self.engine.save_state(name).result())
        self.folder.record_step(name, step)
        self._register(CheckpointRecord(name, step, state_path=path))
        return path

    def save_checkpoint(self, step: int) -> str:
        path = self._save_state(checkpoint_name(step), step, f"checkpoint at step {step}")
        self.validate(step)
        return path

    def _best(self) -> dict | None:
        """The saved weights with the lowest held-out loss, recorded in best_lora_weights.json."""
        weights = {e.step: (e.name, e.state_path) for e in self.saved if e.is_checkpoint}
        weights[self.done] = (FINAL, str(self.run_dir / FINAL))
        scored = [r for r in self.val_log if r["step"] in weights]
        if not scored:
            return None
        best = min(scored, key=lambda r: r["val_loss"])
        name, path = weights[best["step"]]
        record = {"name": name, "step": best["step"], "val_loss": best["val_loss"], "path": path}
        self.folder.write_best(record)
        return record

    def finish(self) -> RunSummary:
        steps = self.done
        final = self._guarded(steps, "the final weights",
                              lambda: self.engine.save_weights_for_sampler(FINAL).result())
        self._register(CheckpointRecord(FINAL, steps, sampler_path=final))
        self._save_state(STATE, steps, "the final state")
        self.validate(steps)
        best = self._best()
        if self.backend == "tinker":
            # The weights as PEFT adapters, beside their tinker:// records: what serving them
            # anywhere else needs (final_lora_weights/ and the best checkpoint's folder).
            export_run_weights(self.run_dir, self.settings.request_timeout)
        summary = RunSummary(
            run_dir=str(self.run_dir), final_lora_weights=str(self.run_dir / FINAL), checkpoints=list(self.saved),
            backend=self.backend, base_model=self.base_model, steps=steps,
            first_loss=self.log[0]["loss"], last_loss=self.log[-1]["loss"],
            tokens=sum(r["tokens"] for r in self.log),
            val_loss_base=next((r["val_loss"] for r in self.val_log if r["step"] == 0), None),
            val_loss_final=self.val_log[-1]["val_loss"] if self.val_log else None,
            best=best, time_s=round(time.monotonic() - self.started, 2),
            final_sha256=folder_sha256(self.run_dir / FINAL))
        self.folder.write_summary(summary)
        # A failure note of an earlier process no longer holds: the run has finished.
        (self.run_dir / "failure.md").unlink(missing_ok=True)
        return summary


def train(run: TrainingRun, step=TrainingRun.step, save=TrainingRun.save_checkpoint,
          finish=TrainingRun.finish, validate=TrainingRun.validate) -> RunSummary:
    """Train an opened run to the end, close it, and return its summary. `step`, `save`, `finish` and
    `validate` are called as `step(run, n)`, `save(run, n)`, `finish(run)`, `validate(run, 0)`;
    the Prefect layer passes tasks here so that each is a task run of its own, retried on its
    own."""
    try:
        summary = run.finished()
        if not summary:
            validate(run, 0)  # the base model's held-out loss, once
            for n in range(run.first_step, run.total_steps + 1):
                step(run, n)
                if run.saves_at(n):
                    save(run, n)
            summary = finish(run)
    except BaseException:
        run.close("errored")  # the session ends and the run folder is free for the next try
        raise
    run.close()
    return summary
