"""Rerun and resume: the time of a second identical `lora-pipeline` flow run over the first
(its stages come from Prefect's cache), with a Prefect server up; and, after `kill -9` of
`lora-pipeline train` at random steps, how many already-finished steps the same command,
run again, had to redo (it continues from the newest checkpoint).

    python bench/rerun.py [--steps 12] [--save-every 4] [--kills 3]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import write  # noqa: E402

from lora_pipeline.run_folder import RunFolder  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"
CLI = str(Path(sys.executable).parent / "lora-pipeline")


def logged_steps(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in json.loads((run_dir / "training_log.json").read_text())]
    except (OSError, json.JSONDecodeError):
        return []


def rerun_ratio(tmp: Path, steps: int) -> dict:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    from lora_pipeline.flows.pipeline import lora_pipeline

    params = dict(dataset=str(SAMPLE), batch=8, max_steps=steps, save_every=0, backend="local",
                  output_dir=str(tmp / "flow"), max_tokens=16, learning_rate=5e-4)
    with prefect_test_harness(server_startup_timeout=60):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            lora_pipeline(**params)
            times.append(time.perf_counter() - start)
    return {"first_s": round(times[0], 2), "second_s": round(times[1], 2),
            "second_over_first": round(times[1] / times[0], 3)}


def kill_and_resume(tmp: Path, steps: int, save_every: int, at: int, delay: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_API_KEY", "PREFECT_API_URL")}
    cmd = [CLI, "train", "--data", str(SAMPLE), "--batch", "8", "--max-steps", str(steps), "--save-every",
           str(save_every), "--backend", "local", "--output-dir", str(tmp / "kill"), "--run-name", f"k{at}"]
    run_dir = tmp / "kill" / f"k{at}"
    # Its own process group, so that the kill takes Prefect's temporary server with it, as a crash would.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None and len(logged_steps(run_dir)) < at:
        time.sleep(0.05)
    time.sleep(delay)  # somewhere in the next step (or the save after this one)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = max(logged_steps(run_dir), default=0)
    saved = max((e.step for e in RunFolder(run_dir).registry()), default=0)
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert logged_steps(run_dir) == list(range(1, steps + 1))
    # Finished steps after the newest checkpoint are lost and redone; a kill during the save at
    # step N loses all `save_every` steps since the one before, the worst case.
    return {"killed_after_step": done, "newest_checkpoint": saved, "steps_redone": done - saved}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--kills", type=int, default=3)
    a = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        ratio = rerun_ratio(Path(tmp), a.steps)
        kills = [kill_and_resume(Path(tmp), a.steps, a.save_every, rng.randint(2, a.steps - 1), rng.uniform(0, 1))
                 for _ in range(a.kills)]
    write("rerun", {
        "rerun": ratio, "steps": a.steps, "save_every": a.save_every, "kills": kills,
        "max_steps_redone": max(k["steps_redone"] for k in kills),
        "targets": {"second_over_first": 0.10, "steps_redone_below": a.save_every},
    })


if __name__ == "__main__":
    main()
