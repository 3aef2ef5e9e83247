"""The supervised training loop: batches, steps, checkpoints, and the run folder's layout.

    run_dir/config.json          every parameter (no secrets)
    run_dir/training_log.json    [{"step", "loss", "tokens", "lr", "time_s"}, ...]
    run_dir/checkpoint_step_N/   adapter + optimizer + RNG + step, every `save_every` steps
    run_dir/final_lora_weights/  the adapter to use for inference
    run_dir/training_state/      what resuming needs, as of the last step
"""

import dataclasses
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from tinker import types

from .data import read_chat_jsonl, write_json
from .engines import check_base_model, choose_backend, default_base_model, make_engine
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

    def check(self) -> None:
        for name in ("batch", "rank"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) < 0:
                raise PipelineError(f"--{name.replace('_', '-')} must be 0 or more")
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
    check_base_model(backend, base_model)
    return backend, base_model, conversations


class TrainingRun:
    """One training run: its engine, its examples and its run folder.

    Everything that can be wrong with the inputs is checked before the run folder is made,
    so a bad --data, --backend or --base-model leaves nothing behind.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.backend, self.base_model, conversations = preflight(cfg)
        self.run_dir = Path(cfg.output_dir) / (cfg.run_name or run_folder_name(self.base_model))
        if self.run_dir.exists():
            raise PipelineError(f"{self.run_dir} already exists; choose another --run-name or "
                                "--output-dir")
        self.engine = make_engine(self.backend, self.base_model, cfg.rank, cfg.seed, self.run_dir)
        self.examples, self.render_report = render_conversations(
            conversations, self.engine.renderer, cfg.max_length, cfg.on_overflow)
        if len(self.examples) < cfg.batch:
            raise PipelineError(f"--data {cfg.data}: {len(self.examples)} usable examples, fewer than "
                                f"one batch of {cfg.batch}; lower --batch or add data")
        # The last partial batch of an epoch is dropped: every step then sees `batch` examples,
        # and a step's batch depends only on (data, seed, step), which exact resume relies on.
        self.steps_per_epoch = len(self.examples) // cfg.batch
        self.total_steps = cfg.max_steps or self.steps_per_epoch
        self.log: list[dict] = []
        self.checkpoints: list[str] = []
        self.started = time.monotonic()
        self.run_dir.mkdir(parents=True)
        write_json(self.run_dir / "config.json", {
            **dataclasses.asdict(cfg), "backend_requested": cfg.backend, "backend": self.backend,
            "base_model": self.base_model,
            "run_dir": str(self.run_dir), "examples": len(self.examples),
            "total_steps": self.total_steps, "rendering": self.render_report.summary(),
        })

    def describe(self) -> str:
        return (f"engine {self.backend}, base model {self.base_model}, "
                f"{self.render_report.summary()}; {self.total_steps} steps of {self.cfg.batch}, "
                f"run folder {self.run_dir}")

    def batch(self, step: int) -> list[types.Datum]:
        """The examples of 1-based `step`: a fresh seeded shuffle each epoch."""
        epoch, i = divmod(step - 1, self.steps_per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.examples))
        return [self.examples[j] for j in order[i * self.cfg.batch:(i + 1) * self.cfg.batch]]

    def step(self, step: int) -> dict:
        """One optimizer step; returns and logs its record."""
        cfg = self.cfg
        start = time.monotonic()
        batch = self.batch(step)
        lr = cfg.learning_rate * (1 - (step - 1) / self.total_steps)  # linear decay to ~0
        adam = types.AdamParams(learning_rate=lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
        # Both are submitted before either is awaited: on Tinker they then share a clock cycle.
        fb = self.engine.forward_backward(batch, "cross_entropy")
        opt = self.engine.optim_step(adam)
        out = fb.result()
        opt.result()
        tokens = sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in batch)
        record = {"step": step, "loss": out.metrics["loss:sum"] / tokens, "tokens": int(tokens),
                  "lr": lr, "time_s": round(time.monotonic() - start, 4)}
        self.log.append(record)
        write_json(self.run_dir / "training_log.json", self.log)
        return record

    def save_checkpoint(self, step: int) -> str:
        path = self.engine.save_state(f"checkpoint_step_{step}", {"step": step}).result()
        self.checkpoints.append(path)
        return path

    def finish(self) -> dict:
        final = self.engine.save_weights_for_sampler("final_lora_weights").result()
        self.engine.save_state("training_state", {"step": len(self.log)}).result()
        elapsed = time.monotonic() - self.started
        summary = {
            "run_dir": str(self.run_dir), "final_lora_weights": final, "checkpoints": self.checkpoints,
            "backend": self.backend, "base_model": self.base_model, "steps": len(self.log),
            "first_loss": self.log[0]["loss"], "last_loss": self.log[-1]["loss"],
            "tokens": sum(r["tokens"] for r in self.log), "time_s": round(elapsed, 2),
        }
        write_json(self.run_dir / "summary.json", summary)
        return summary


def train(run: TrainingRun, step=TrainingRun.step, save=TrainingRun.save_checkpoint) -> dict:
    """Train to the end and return the run's summary. `step` and `save` are called as
    `step(run, n)` and `save(run, n)`; the Prefect layer passes tasks here so that each step
    and each checkpoint is a task run of its own."""
    for n in range(1, run.total_steps + 1):
        step(run, n)
        if run.cfg.save_every and n % run.cfg.save_every == 0:
            save(run, n)
    return run.finish()
