"""The service under load: N trial-sized runs of the pipeline at once, on backend tinker (the
local Tinker-protocol server, with clock cycles), through the `lora-pipeline` work pool's two
workers, with the Prefect server on PostgreSQL and then on SQLite. All must complete, none be
lost; figures: wall time from the first submission to the last completion, and the Prefect
server's CPU time (PostgreSQL's included), for each database.

    python bench/service.py [--runs 20] [--steps 4]
"""

import argparse
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
from common import write  # noqa: E402
from service_stack import ServiceStack  # noqa: E402
from tinker_server import TinkerTestServer  # noqa: E402

from lora_pipeline.models import SMOLLM2, load_tokenizer  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            for q in [p, *p.children(recursive=True)]:
                t = q.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def database_pids(stack: ServiceStack) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].endswith("postgres") and str(stack.root) in " ".join(p.info["cmdline"])]


def load(database: str, runs: int, steps: int, tinker: TinkerTestServer) -> dict:
    env = {"TINKER_API_KEY": tinker.api_key, "TINKER_BASE_URL": tinker.base_url}
    with ServiceStack(database, workers=2, env=env) as stack:
        small = stack.root / "small.jsonl"
        small.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:60]))
        servers = [stack.server.pid, *database_pids(stack)]
        cpu, start = cpu_seconds(servers), time.perf_counter()
        # Distinct seeds: distinct runs, none answered from another's cache.
        ids = [stack.run("lora-pipeline/trial", backend="tinker", base_model=SMOLLM2, dataset=str(small), batch=4,
                         max_steps=steps, save_every=0, max_tokens=8, seed=i, output_dir=str(stack.root / "out"))
               for i in range(runs)]
        states = [stack.wait(i, timeout=1800)["type"] for i in ids]
        wall = time.perf_counter() - start
        server_cpu = cpu_seconds(servers) - cpu
        finished = len(list((stack.root / "out").glob("lora_*/summary.json")))
    return {"runs": runs, "completed": states.count("COMPLETED"), "states": sorted(set(states)),
            "run_folders_finished": finished, "wall_s": round(wall, 1), "server_cpu_s": round(server_cpu, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    answer = load_tokenizer(SMOLLM2).encode("Arr! Ahoy there.", add_special_tokens=False) + [2]
    figures = {}
    with TinkerTestServer(models=[SMOLLM2], sample_tokens=answer, tick=0.05) as tinker:
        for database in ("postgresql", "sqlite"):
            figures[database] = load(database, a.runs, a.steps, tinker)
            print(database, figures[database], flush=True)
    write("service", {"runs": a.runs, "steps": a.steps, "workers": 2, "by_database": figures,
                      "none_lost": all(f["completed"] == f["run_folders_finished"] == a.runs for f in figures.values())})


if __name__ == "__main__":
    main()
