"""The TrainSettings of the tests' trainings, written once, and what the tests read back from a
run folder."""

import json
from pathlib import Path

from lora_pipeline.settings import TrainSettings

# Small, fast trainings: 4 steps of 4 examples with a checkpoint half-way, at a rate that moves
# the loss within those few steps.
SHORT_RUN = {"batch": 4, "max_steps": 4, "save_every": 2, "learning_rate": 5e-4}


def training_settings(data: str | Path, output_dir: str | Path, /, *, cli_defaults: bool = False,
                      **changes) -> TrainSettings:
    """A run of `data` into `output_dir` on the local engine (a test may set TINKER_API_KEY without
    meaning Tinker): SHORT_RUN, or with `cli_defaults` TrainSettings' own defaults (what a command
    that sets none of them gets, for the tests of refusals), then `changes`, `data` among them if
    a test gives another."""
    return TrainSettings(**{"data": str(data), "output_dir": str(output_dir), "backend": "local",
                            **({} if cli_defaults else SHORT_RUN), **changes})


def steps_logged(run_dir: str | Path) -> list[int]:
    """The steps in the run's training_log.json, in order: each once when nothing was repeated."""
    return [r["step"] for r in json.loads((Path(run_dir) / "training_log.json").read_text())]


def adapter_diff(a: str | Path, b: str | Path) -> float:
    """The largest difference between two runs' final LoRA weights."""
    from safetensors.torch import load_file

    x, y = (load_file(str(Path(d) / "final_lora_weights" / "adapter_model.safetensors")) for d in (a, b))
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def kill_after_steps(cmd: list[str], env: dict, run_dir: Path, steps: int) -> None:
    """Start the command `cmd` and SIGKILL it once its run in `run_dir` has logged `steps`
    steps; fails if the command ended first (it was not killed half-way)."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = Path(run_dir) / "training_log.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(json.loads(log.read_text() or "[]")) >= steps:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the command ended ({proc.returncode}) before step {steps}"
    assert not (Path(run_dir) / "final_lora_weights").exists(), f"killed after step {steps}, but the run had finished"
