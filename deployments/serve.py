"""`lora-pipeline serve`: the nightly deployment served by this one long-running process, the
way to run it without a work pool or workers. Its schedule and parameters are read from the
`nightly` deployment of prefect.yaml, so the two ways to deploy it never drift apart.

It registers `lora-pipeline/nightly` with the Prefect server in PREFECT_API_URL and runs what
that schedules, or what `prefect deployment run lora-pipeline/nightly` asks for. Stopping it
(Ctrl-C or SIGTERM) pauses the schedule.
"""

import os
import signal
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


def _stop_on_sigterm() -> None:
    """SIGTERM stops the runner as Ctrl-C does; if it is stuck (a Prefect server that went
    away keeps it retrying), the process exits anyway after STOP_GRACE_S seconds."""
    def stop(signum, frame):
        threading.Timer(STOP_GRACE_S, lambda: os._exit(128 + signum)).start()
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)


def serve() -> None:
    from prefect.schedules import Cron

    from lora_pipeline.flows.pipeline import lora_pipeline

    nightly = nightly_definition()
    _stop_on_sigterm()
    lora_pipeline.serve(name="nightly", description=nightly["description"], parameters=nightly["parameters"],
                        schedules=[Cron(s["cron"], timezone=s["timezone"]) for s in nightly["schedules"]])
