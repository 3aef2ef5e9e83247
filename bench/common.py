"""Shared by the benchmarks: the machine, the versions, and writing figures to JSON."""

import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# BENCH_RESULTS: another folder, e.g. one that a remote machine hands back even when cut short.
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).parent / "results")


def machine() -> dict:
    with open("/proc/meminfo") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "platform": platform.platform(),
            "python": sys.version.split()[0],
            "versions": {p: installed(p) for p in ("torch", "transformers", "peft", "tinker", "prefect", "datasets")}}


def installed(package: str) -> str | None:
    """The package's version; None where it is not installed (a GPU machine may lack some)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write(name: str, figures: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"benchmark": name, "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": machine(), **figures}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return path


def best_of(runs: dict, repeats: int) -> dict:
    """Each run's best wall time in seconds over `repeats` rounds; the runs alternate within a
    round, so that the machine's state affects them all alike."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
