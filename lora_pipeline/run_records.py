"""What a training run has done: its step log, its held-out log and its saved checkpoints, kept
in memory and written to the run folder at each change, and the summary made from them."""

import time

from .data import folder_sha256
from .errors import PipelineError
from .run_folder import FINAL, CheckpointRecord, RunFolder, RunSummary


class RunRecords:
    def __init__(self, folder: RunFolder):
        self.folder = folder
        self.log: list[dict] = []  # one record per step: step, loss, tokens, lr, time_s
        self.val_log: list[dict] = []  # one per measure: step, val_loss, val_ppl, train_loss
        self.saved: list[CheckpointRecord] = []  # the registry's usable entries

    def add_step(self, record: dict) -> None:
        self.log.append(record)
        self.folder.write_log(self.log)

    def add_validation(self, record: dict) -> None:
        self.val_log.append(record)
        self.folder.write_val_log(self.val_log)

    def validated(self, step: int) -> bool:
        return any(r["step"] == step for r in self.val_log)

    def register(self, record: CheckpointRecord) -> None:
        self.folder.register(record)
        self.saved = [e for e in self.saved if e.name != record.name] + [record]

    def last_state(self, up_to: int) -> CheckpointRecord | None:
        """The newest saved training state of a step up to `up_to`."""
        return next((e for e in reversed(self.saved) if e.state_path and e.step <= up_to), None)

    def cut_back(self, done: int, usable: list[CheckpointRecord]) -> None:
        """Resuming after step `done`: the records of later steps go, so that no step is
        recorded twice or missing; refused where the step log has a gap."""
        self.saved = [e for e in usable if e.step <= done]
        self.log = [r for r in self.folder.read_log() if r["step"] <= done]
        if [r["step"] for r in self.log] != list(range(1, done + 1)):
            raise PipelineError(
                f"{self.folder.path}: the newest usable checkpoint holds step {done}, but training_log.json "
                f"records steps {[r['step'] for r in self.log] or 'none'}: the records disagree, so the run "
                "cannot be continued safely. Pass --start-over to train it again.")
        self.folder.write_log(self.log)
        self.val_log = [r for r in self.folder.read_val_log() if r["step"] <= done]

    def steps_time(self) -> float:
        """Seconds the logged steps took, whichever process took them."""
        return sum(r["time_s"] for r in self.log)

    def _best(self, done: int) -> dict | None:
        """The saved weights with the lowest held-out loss, recorded in best_lora_weights.json."""
        weights = {e.step: (e.name, e.state_path) for e in self.saved if e.is_checkpoint}
        weights[done] = (FINAL, str(self.folder / FINAL))
        scored = [r for r in self.val_log if r["step"] in weights]
        if not scored:
            return None
        best = min(scored, key=lambda r: r["val_loss"])
        name, path = weights[best["step"]]
        record = {"name": name, "step": best["step"], "val_loss": best["val_loss"], "path": path}
        self.folder.write_best(record)
        return record

    def summarize(self, backend: str, base_model: str, init_weights: str | None, steps: int,
                  started: float) -> RunSummary:
        """The run's summary once its final weights are saved, written to summary.json.
        `started`: the monotonic time the training began, earlier processes' steps included."""
        final = self.folder / FINAL
        summary = RunSummary(
            run_dir=str(self.folder.path), final_lora_weights=str(final), checkpoints=list(self.saved),
            backend=backend, base_model=base_model, steps=steps,
            first_loss=self.log[0]["loss"], last_loss=self.log[-1]["loss"], tokens=sum(r["tokens"] for r in self.log),
            val_loss_base=next((r["val_loss"] for r in self.val_log if r["step"] == 0), None),
            val_loss_final=self.val_log[-1]["val_loss"] if self.val_log else None,
            best=self._best(steps), time_s=round(time.monotonic() - started, 2), final_sha256=folder_sha256(final),
            init_weights=init_weights)
        self.folder.write_summary(summary)
        # A failure note of an earlier process no longer holds: the run has finished.
        (self.folder / "failure.md").unlink(missing_ok=True)
        return summary
