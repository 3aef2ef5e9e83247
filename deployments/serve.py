"""`lora-pipeline serve`: the nightly deployment served by this one long-running process, the
way to run it without a work pool or workers. Its schedule and parameters are read from the
`nightly` deployment of prefect.yaml, so the two ways to deploy it never drift apart.

It registers `lora-pipeline/nightly` with the Prefect server in PREFECT_API_URL and runs what
that schedules, or what `prefect deployment run lora-pipeline/nightly` asks for. Stopping it
(Ctrl-C or SIGTERM) pauses the schedule.
"""

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import yaml

from lora_pipeline.errors import PipelineError

PROJECT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10  # after SIGTERM, how long the runner may take to stop before the process exits


def nightly_definition(project: Path = PROJECT) -> dict:
    """The `nightly` entry of the project's prefect.yaml."""
    path = project / "prefect.yaml"
    if not path.is_file():
        raise PipelineError(f"{path} not found: `lora-pipeline serve` runs from the project's checkout")
    return next(d for d in yaml.safe_load(path.read_text())["deployments"] if d["name"] == "nightly")


def serve() -> None:
    from prefect.runner import Runner
    from prefect.schedules import Cron

    from lora_pipeline.flows.pipeline import lora_pipeline

    nightly = nightly_definition()
    # Its runs send heartbeats and fence themselves as a worker's do (prefect.yaml's job variables).
    os.environ.update(nightly["work_pool"].get("job_variables", {}).get("env", {}))
    runner = Runner(name="lora-pipeline-nightly")  # pauses the schedule when it stops
    runner.add_flow(lora_pipeline, name="nightly", description=nightly["description"],
                    parameters=nightly["parameters"],
                    schedules=[Cron(s["cron"], timezone=s["timezone"]) for s in nightly["schedules"]])
    # The runner works in a thread of its own, so that SIGTERM and Ctrl-C come here rather than
    # to Prefect's handler, which waits for the server to answer, forever if it has gone away.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    working = threading.Thread(target=asyncio.run, args=(runner.start(),), name="runner", daemon=True)
    working.start()
    print("Serving lora-pipeline/nightly, on its schedule and on demand: "
          "prefect deployment run lora-pipeline/nightly. Ctrl-C stops it.", flush=True)
    while working.is_alive() and not stop.wait(1):
        pass
    if stop.is_set() and working.is_alive():
        print("Stopping: pausing the schedule, cancelling runs in progress.", flush=True)
        runner.execute_in_background(runner.astop)
        working.join(STOP_GRACE_S)
        if working.is_alive():
            print(f"The runner did not stop within {STOP_GRACE_S} s (is the Prefect server gone?); exiting.",
                  file=sys.stderr, flush=True)
            os._exit(1)
