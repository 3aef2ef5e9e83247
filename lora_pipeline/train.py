"""The supervised training loop's operations: the batch schedule, the learning rate, a step,
a checkpoint, the final weights, and resuming. The loop itself is the caller's: the Prefect
layer makes each operation a task run (flows/pipeline.py, train_adapter), and `train` below
runs them plainly. A run's identity and folder checks are in run_config.py, its files in
run_folder.py."""

import dataclasses
import functools
import math
import time

import numpy as np
from tinker import types

from .engines import EngineTimeout, make_engine
from .errors import PipelineError
from .export import export_run_weights
from .render import render_conversations
from .run_config import RunConfig
from .run_folder import FINAL, STATE, CheckpointRecord, RunFolder, RunSummary, checkpoint_name
from .run_records import RunRecords
from .settings import TrainSettings


def trained_tokens(data: list[types.Datum]) -> float:
    """How many tokens of `data` carry loss weight: what a summed loss is divided by."""
    return sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in data)


@functools.lru_cache(maxsize=2)  # a step asks for its epoch's; an epoch has many steps
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


def scheduled_lr(learning_rate: float, step: int, total_steps: int) -> float:
    """The learning rate of 1-based `step`: linear decay from the peak `learning_rate` at step 1
    to nearly 0 at the last step."""
    return learning_rate * (1 - (step - 1) / total_steps)


def rendered_examples(s: TrainSettings, conversations: list, val_conversations: list, renderer) -> tuple:
    """The training and held-out examples as the engine takes them, the sample of training
    examples measured beside the held-out ones, and the rendering's report; refused if fewer
    than a batch remain."""
    examples, report = render_conversations(conversations, renderer, s.max_length, s.on_overflow)
    val_examples, _ = render_conversations(val_conversations, renderer, s.max_length, s.on_overflow)
    # As many training examples as held-out ones, measured alongside them: the gap between the
    # two losses, taken with the same weights, is the overfitting signal.
    picked = np.random.default_rng(s.seed).permutation(len(examples))[:len(val_examples)]
    train_sample = [examples[j] for j in sorted(picked)]
    if len(examples) < s.batch:
        if any("length" in reason or reason.startswith("longer than") for reason in report.dropped):
            # The length limit dropped them, not the data's size: say which to change.
            reasons = ", ".join(f"{n} {reason}" for reason, n in report.dropped.items())
            raise PipelineError(f"--data {s.data}: {len(examples)} of {len(conversations)} examples are "
                                f"usable at --max-length {s.max_length} ({reasons}), fewer than one batch "
                                f"of {s.batch}; raise --max-length (or keep long examples with --on-overflow "
                                "truncate)")
        raise PipelineError(f"--data {s.data}: {len(examples)} usable examples, fewer than "
                            f"one batch of {s.batch}; lower --batch or add data")
    return examples, val_examples, train_sample, report


def summed_losses(engine, groups: list[list[types.Datum]], size: int) -> list[float]:
    """Each group's summed weighted token loss, by forward passes of `size` examples, all in
    flight together."""
    # Sorted by length, so that each chunk pads little; the sum does not depend on order.
    calls = [[engine.forward(examples[i:i + size]) for i in range(0, len(examples), size)]
             for examples in (sorted(group, key=lambda d: d.model_input.length) for group in groups)]
    return [sum(call.result().metrics["loss:sum"] for call in group) for group in calls]


def load_newest_state(engine, folder: RunFolder, registry: list[CheckpointRecord], notes: list[str]) -> tuple:
    """Loads into `engine` the newest saved state that holds the step it is registered as and
    loads; returns that step (0: none did) and the names of the states passed over, each with
    its reason in `notes`."""
    unusable = set()
    for entry in reversed([e for e in registry if e.state_path]):
        held = folder.saved_step(entry.name)
        if held != entry.step:  # a mislabelled or replaced checkpoint is not trusted
            unusable.add(entry.name)
            notes.append(f"{entry.name} is registered as step {entry.step} but holds step {held}; trying an older one")
            continue
        try:
            engine.load_state(entry.state_path)
            return entry.step, unusable
        except Exception as e:  # any damage: a missing, truncated or foreign checkpoint
            unusable.add(entry.name)
            notes.append(f"{entry.name} cannot be loaded ({type(e).__name__}: {e}); trying an older one")
    return 0, unusable


class TrainingRun:
    """One training run in progress: its engine, examples and records. Making one only resolves
    names (its `config`: backend, base model, run folder). `open()` checks the inputs before the
    run folder is made (bad input leaves nothing behind), starts the engine and continues an
    existing folder of the same data and settings from its newest loadable checkpoint. As a
    context manager it is closed on the way out, as failed if an exception passes."""

    def __init__(self, settings: TrainSettings):
        self.config = RunConfig(settings)
        self.settings = settings
        self.backend, self.base_model = self.config.backend, self.config.base_model
        self.engine = None
        self.examples: list[types.Datum] = []
        self.val_examples: list[types.Datum] = []
        self.train_sample: list[types.Datum] = []
        self.total_steps = 0
        self.records = RunRecords(self.config.folder)
        self.notes: list[str] = []  # what resuming found and did, for the logs
        self.first_step = 1
        self.done = 0  # the step whose weights the engine holds
        self.dirty = False  # an engine call failed part-way: the engine's state is unknown
        self.queued: dict[int, tuple] = {}  # step -> its submitted (forward_backward, optim_step)
        self.started = time.monotonic()
        # Set by open() when the folder already held this run finished (another process
        # finished it while this one waited for the folder): nothing is left to do.
        self.finished_before: RunSummary | None = None

    @property
    def folder(self) -> RunFolder:
        return self.config.folder

    @property
    def run_dir(self):
        return self.config.run_dir

    def open(self, say=None) -> "TrainingRun":
        """Checks the inputs, takes the run folder (waiting up to --lock-wait, `say` told what
        for), and makes or continues it."""
        conversations, val_conversations = self.config.read_inputs()
        self.folder.lock(self.settings.lock_wait, say)
        try:
            self._open(conversations, val_conversations)
        except BaseException:
            self.close("errored")
            raise
        return self

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        # The session ends and the run folder is free for the next try.
        self.close("errored" if kind else "success")

    def _open(self, conversations: list, val_conversations: list) -> None:
        s = self.settings
        resuming = self.config.may_continue()
        self.engine = self._new_engine()
        self.examples, self.val_examples, self.train_sample, self.render_report = rendered_examples(
            s, conversations, val_conversations, self.engine.renderer)
        self.steps_per_epoch = len(self.examples) // s.batch
        self.total_steps = s.max_steps or self.steps_per_epoch
        if resuming:
            self._resume()
            earlier, now = self.folder.read_config().get("placement"), self.placement
            if earlier and now and (earlier["device"], earlier["dtype"]) != (now["device"], now["dtype"]):
                self.notes.append(f"continuing on {now['device']}/{now['dtype']}; the earlier steps ran on "
                                  f"{earlier['device']}/{earlier['dtype']}")
            if self.first_step > self.total_steps:
                self.finished_before = self.config.finished_summary(say=self.notes.append)
        else:
            self.run_dir.mkdir(parents=True)
            self.folder.write_config({**self.config.values, "examples": len(self.examples),
                                      "total_steps": self.total_steps, "rendering": self.render_report.summary(),
                                      "placement": self.placement})

    def _resume(self) -> None:
        """Continue from the newest checkpoint that loads. Half-written files are removed, a
        checkpoint that does not load is reported and skipped, and the log is cut back to the
        step the run continues from, so no step is logged twice or missing."""
        self.notes += [f"removed half-written {name}" for name in self.folder.remove_half_written()]
        registry = self.folder.registry(self.notes)
        done, unusable = load_newest_state(self.engine, self.folder, registry, self.notes)
        if not done:
            self.engine.close("errored")
            self.engine = self._new_engine()  # nothing loaded (maybe half of something): start from the seed
        self.records.cut_back(done, [e for e in registry if e.name not in unusable])
        self.first_step = done + 1
        self.done = done
        # The summary's time is the training's, not this process's alone (tokens/s read 3x too
        # high after a resume): the earlier processes' steps count, as their log recorded them.
        self.started -= self.records.steps_time()
        if any(e.step == done and e.is_checkpoint for e in self.records.saved):
            self.validate(done)  # an interruption during the checkpoint's measure lost it; no-op if kept
        self.notes.append(f"continuing after step {done} of {self.total_steps}" if done
                          else "no usable checkpoint: starting from step 1")

    def _new_engine(self):
        s = self.settings
        return make_engine(self.backend, self.base_model, rank=s.rank, seed=s.seed, request_timeout=s.request_timeout,
                           root=self.run_dir, device=s.device, dtype=s.dtype, init_from=self.config.values["init_weights"])

    @property
    def placement(self) -> dict | None:
        """Where the engine computes and in what precision (the local engine says)."""
        return getattr(self.engine, "placement", None)

    def describe(self) -> str:
        return (f"engine {self.backend}, base model {self.base_model}, "
                f"{self.render_report.summary()}; {self.total_steps} steps of {self.settings.batch}, "
                f"run folder {self.run_dir}" + "".join(f"; {note}" for note in self.notes))

    def steps_left(self) -> range:
        """The steps this run has still to take, after open()."""
        return range(self.first_step, self.total_steps + 1)

    def batch_indices(self, step: int) -> list[int]:
        """Which examples 1-based `step` trains on: a function of the data, the seed and the step."""
        epoch, i = divmod(step - 1, self.steps_per_epoch)
        return epoch_batches(len(self.examples), self.settings.batch, self.settings.seed, epoch)[i]

    def batch(self, step: int) -> list[types.Datum]:
        return [self.examples[j] for j in self.batch_indices(step)]

    def lr(self, step: int) -> float:
        return scheduled_lr(self.settings.learning_rate, step, self.total_steps)

    def saves_at(self, step: int) -> bool:
        return bool(self.settings.save_every) and step % self.settings.save_every == 0

    def _submit(self, step: int, batch: list[types.Datum]) -> tuple:
        s = self.settings
        adam = types.AdamParams(learning_rate=self.lr(step), beta1=s.beta1, beta2=s.beta2, eps=s.eps,
                                weight_decay=s.weight_decay)
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
        state = self.records.last_state(done)
        if state:
            self.engine.load_state(state.state_path)
            start = state.step
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
            state = self.records.last_state(step)
            last = f"{state.name} (step {state.step})" if state else "none"
            raise PipelineError(f"step {step}: the training loss is {loss} (not a finite number): training "
                                f"diverged. Nothing from this step on is saved; the last good checkpoint is {last}. "
                                "Lower --learning-rate and train again with --start-over.")
        record = {"step": step, "loss": loss, "tokens": int(tokens), "lr": self.lr(step),
                  "time_s": round(time.monotonic() - start, 4)}
        self.records.add_step(record)
        return record

    def validate(self, step: int) -> dict | None:
        """Mean per-token loss on the held-out examples, and on as many training examples, with
        the weights after `step` (0: the base model, since a fresh LoRA changes nothing). All
        batches in flight together."""
        if not self.val_examples or self.records.validated(step):
            return None
        val_sum, train_sum = self._guarded(step, f"validation at step {step}", lambda: summed_losses(
            self.engine, [self.val_examples, self.train_sample], self.settings.batch))
        val_loss = val_sum / trained_tokens(self.val_examples)
        if not math.isfinite(val_loss):
            raise PipelineError(f"the held-out loss after step {step} is {val_loss} (not a finite number): "
                                "training diverged. Lower --learning-rate and train again with --start-over.")
        record = {"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
                  "train_loss": train_sum / trained_tokens(self.train_sample)}
        self.records.add_validation(record)
        return record

    def _save_state(self, name: str, step: int, where: str) -> str:
        """A saved state, marked with its step (checked on resume) before it is registered."""
        path = self._guarded(step, where, lambda: self.engine.save_state(name).result())
        self.folder.record_step(name, step)
        self.records.register(CheckpointRecord(name, step, state_path=path))
        return path

    def save_checkpoint(self, step: int) -> str:
        path = self._save_state(checkpoint_name(step), step, f"checkpoint at step {step}")
        self.validate(step)
        return path

    def finish(self) -> RunSummary:
        """The final weights (and, on Tinker, their PEFT export) and state, their held-out loss,
        and the run's summary."""
        steps = self.done
        final = self._guarded(steps, "the final weights",
                              lambda: self.engine.save_weights_for_sampler(FINAL).result())
        self.records.register(CheckpointRecord(FINAL, steps, sampler_path=final))
        self._save_state(STATE, steps, "the final state")
        self.validate(steps)
        if self.backend == "tinker":
            # The weights as PEFT adapters, beside their tinker:// records: what serving them
            # anywhere else needs (final_lora_weights/ and the best checkpoint's folder).
            export_run_weights(self.run_dir, self.settings.request_timeout)
        return self.records.summarize(self.backend, self.base_model, self.config.values["init_weights"], steps,
                                      self.started)


def train(run: TrainingRun) -> RunSummary:
    """Train an opened run to the end without Prefect (the library's own use: tests, benchmarks),
    close it, and return its summary. train_adapter in flows/pipeline.py takes the same steps,
    each as a task run."""
    with run:
        run.validate(0)  # the base model's held-out loss, once
        for n in run.steps_left():
            run.step(n)
            if run.saves_at(n):
                run.save_checkpoint(n)
        return run.finished_before or run.finish()
