"""A run folder: its layout and its records, for training, the report and failure notes alike.

    config.json          every setting (no secrets), the data's hash, what was resolved
    training_log.json    [{"step", "loss", "tokens", "lr", "time_s"}, ...]
    checkpoint_step_N/   adapter + optimizer + RNG + step, every `save_every` steps
    final_lora_weights/  the adapter to use for inference
    training_state/      what resuming needs, as of the last step
    checkpoints.jsonl    every saved state and sampler path (tinker:// on Tinker), as made
    validation_log.json  held-out loss before training (the base model), at each checkpoint and
                         at the end, and the loss on as many training examples:
                         [{"step", "val_loss", "val_ppl", "train_loss"}, ...]
    best_lora_weights.json  the saved weights with the lowest held-out loss
    summary.json         paths, first and last loss, tokens, time
    promotion.json       with --eval-data: the gate's decision, its reason and numbers

On Tinker the checkpoint folders hold the tinker:// paths (lora_pipeline.json), not weights.
"""

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .data import read_json, write_json
from .errors import PipelineError

FINAL = "final_lora_weights"
PROMOTION = "promotion.json"
STATE = "training_state"
# Saved in every adapter, state or checkpoint folder by the engine: backend, base model, rank
# (and the tinker:// paths for Tinker runs); and by the training loop, the step it holds.
INFO_FILE = "lora_pipeline.json"
# config.json's layout and the training recipe; a run folder of another format is not continued.
# 2: saved states record their step, summaries the final weights' hash, run folders are named by
# content. 3: the loss is a per-token mean and batches are not length-grouped (continuing a
# format-2 run would change the recipe midway).
FORMAT = 3


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step_{step}"


@dataclass(frozen=True)
class CheckpointRecord:
    """One line of checkpoints.jsonl: a saved training state (to resume from) or sampler
    weights (to answer with), as the engine named it."""
    name: str
    step: int
    state_path: str | None = None
    sampler_path: str | None = None
    time: str = field(default_factory=lambda: datetime.now().isoformat(timespec="seconds"))

    @property
    def path(self) -> str:
        return self.state_path or self.sampler_path or ""

    @property
    def is_checkpoint(self) -> bool:
        return self.name.startswith("checkpoint_step_")


@dataclass
class RunSummary:
    """summary.json: what a finished run made and how it went."""
    run_dir: str
    final_lora_weights: str
    checkpoints: list[CheckpointRecord]
    backend: str
    base_model: str
    steps: int
    first_loss: float
    last_loss: float
    tokens: int
    val_loss_base: float | None
    val_loss_final: float | None
    best: dict | None
    time_s: float
    final_sha256: str = ""  # of the final_lora_weights folder: a changed byte is not "finished"
    # The adapter it started from (--init-from), or None for a fresh LoRA: then step 0's held-out
    # loss, val_loss_base, is that adapter's, not the base model's.
    init_weights: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "RunSummary":
        return cls(**{**obj, "checkpoints": [CheckpointRecord(**e) for e in obj["checkpoints"]]})


class RunFolder:
    """The files of one run, read and written in one place. Every write is atomic.

    A process that works in a run folder holds its lock, `.<name>.lock` beside it (outside, so
    that --start-over can replace the folder while holding it): an OS file lock, released on
    any exit, `kill -9` included. A second process is refused at once, and touches nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(f".{self.path.name}.lock")

    def lock(self, wait: float = 0, say=None) -> None:
        """Takes the run folder's lock. Held by another process: refused at once, or with `wait`
        seconds, waited for, `say(message)` told every 30 s what it waits for (a re-run waits
        for the crashed run it replaces to stop)."""
        # The folders made here, to remove again if the run never makes its folder.
        self._made = [p for p in reversed(self.path.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        started = time.monotonic()
        told = -math.inf
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid, _, host = os.pread(fd, 100, 0).decode(errors="replace").strip().partition(" ")
                holder = f"PID {pid or 'unknown'}" + (f" on {host}" if host else "")
                waited = time.monotonic() - started
                if (pid, host) == (str(os.getpid()), socket.gethostname()):
                    os.close(fd)
                    raise PipelineError(f"{self.path} is already open in this process: close the other "
                                        "TrainingRun first") from None
                if waited >= wait:
                    os.close(fd)
                    raise PipelineError(f"{self.path} is in use by another lora-pipeline process ({holder})"
                                        + (f" and was not released within {wait:g} s" if wait else "")
                                        + "; wait for it to end, or stop it, then run this again") from None
                if say and waited - told >= 30:
                    told = waited
                    say(f"waiting for {self.path}: another lora-pipeline process holds it ({holder}); "
                        f"{waited:.0f} of at most {wait:g} s")
                time.sleep(min(1.0, wait - waited))
        os.ftruncate(fd, 0)
        # Which process on which machine: a folder on shared storage is locked from several.
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Releases the lock; a run that failed before making its folder leaves nothing behind."""
        if self._lock_fd is None:
            return
        if not self.path.exists():
            self.lock_path.unlink(missing_ok=True)
            for folder in reversed(self._made):
                with contextlib.suppress(OSError):  # not empty: not ours alone
                    folder.rmdir()
        os.close(self._lock_fd)  # closing releases the lock
        self._lock_fd = None

    def in_use_elsewhere(self) -> bool:
        """Whether another process holds this folder's lock now."""
        if self._lock_fd is not None or not self.lock_path.exists():
            return False
        fd = os.open(self.lock_path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def remove_half_written(self) -> list[str]:
        """Removes what an interrupted atomic write left (.tmp-*, .old-*); returns their names."""
        leftovers = sorted(self.path.glob(".tmp-*")) + sorted(self.path.glob(".old-*"))
        for leftover in leftovers:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return [leftover.name for leftover in leftovers]

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def name(self) -> str:
        return self.path.name

    def read_config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def write_config(self, config: dict) -> None:
        write_json(self.path / "config.json", config)

    def read_log(self) -> list[dict]:
        return read_json(self.path / "training_log.json", [])

    def write_log(self, log: list[dict]) -> None:
        write_json(self.path / "training_log.json", log)

    def read_val_log(self) -> list[dict]:
        return read_json(self.path / "validation_log.json", [])

    def write_val_log(self, log: list[dict]) -> None:
        write_json(self.path / "validation_log.json", log)

    def registry(self, notes: list[str] | None = None) -> list[CheckpointRecord]:
        """The entries of checkpoints.jsonl, the latest of each name (final weights saved
        again replace the earlier ones), in the order they were made. A line cut short by a
        crash is skipped (and said in `notes`)."""
        path = self.path / "checkpoints.jsonl"
        entries: dict[str, CheckpointRecord] = {}
        for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], start=1):
            try:
                entry = CheckpointRecord(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                if notes is not None:
                    notes.append(f"checkpoints.jsonl:{n} is incomplete; ignored")
                continue
            entries.pop(entry.name, None)
            entries[entry.name] = entry
        return list(entries.values())

    def register(self, record: CheckpointRecord) -> None:
        # Appended, not rewritten: a crash can cut only the last line, which registry() skips.
        with open(self.path / "checkpoints.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(dataclasses.asdict(record)) + "\n")

    def saved_step(self, name: str) -> int | None:
        """The step that the saved `name` (a checkpoint or training_state) says it holds."""
        return read_json(self.path / name / INFO_FILE, {}).get("step")

    def record_step(self, name: str, step: int) -> None:
        write_json(self.path / name / INFO_FILE, {**read_json(self.path / name / INFO_FILE, {}), "step": step})

    def read_summary(self) -> RunSummary | None:
        obj = read_json(self.path / "summary.json", None)
        return RunSummary.from_json(obj) if obj else None

    def write_summary(self, summary: RunSummary) -> None:
        write_json(self.path / "summary.json", summary.to_json())

    def write_best(self, best: dict) -> None:
        write_json(self.path / "best_lora_weights.json", best)
