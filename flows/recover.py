"""The `lora-pipeline-recover` flow: a crashed run of a deployment, run again by itself.

prefect.yaml's `recover` deployment runs this flow whenever a deployment's run of the
lora-pipeline flow ends Crashed: its machine or worker died (the server marks a run whose
heartbeats stop Crashed), or the remote service stayed unreachable past every retry. The
re-run has the crashed run's parameters, so it prepares nothing new (cached), finds the same
run folder by its key, and continues after the newest checkpoint. Each re-run is named and
tagged with its attempt and its first run, so the UI shows which attempt it is of what. Past
`attempts` runs in all, the crashed run is marked Failed instead, which the alert automation
reports (a crash that repeats is not something another run fixes).
"""

from datetime import datetime, timedelta, UTC

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                            TaskRunFilterStateType)
from prefect.states import Crashed, Failed

ATTEMPT = "attempt:"  # tag "attempt:2/3": the second run of three at most
FIRST_RUN = "first-run:"  # tag "first-run:NAME": the run that crashed first


def attempt_of(tags: list[str]) -> int:
    """Which attempt a run is: 1 unless it is a re-run."""
    return next((int(t[len(ATTEMPT):].split("/")[0]) for t in tags if t.startswith(ATTEMPT)), 1)


def first_run_of(name: str, tags: list[str]) -> str:
    return next((t[len(FIRST_RUN):] for t in tags if t.startswith(FIRST_RUN)), name)


@flow(name="lora-pipeline-recover", log_prints=False)
def rerun_crashed(flow_run: str, attempts: int = 3, backoff_s: float = 120) -> str | None:
    """Run a crashed deployment run again with its parameters, up to `attempts` runs in all.

    Args:
        flow_run: the crashed flow run's id (or its event resource id, prefect.flow-run.ID)
        attempts: runs in all, the first included, before a crash is reported as a failure
        backoff_s: the first re-run starts at once (a dead machine's work goes on elsewhere);
            each later one waits this much longer than the one before, for an outage to pass
    """
    logger = get_run_logger()
    run_id = flow_run.removeprefix("prefect.flow-run.")
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_run(run_id)
        if crashed.state_type != StateType.CRASHED:
            logger.info("%s is %s now, not Crashed: nothing to re-run", crashed.name, crashed.state_name)
            return None
        if crashed.deployment_id is None:
            logger.info("%s was not started from a deployment: run its command again to continue", crashed.name)
            return None
        # Its task runs that were running when it died would show as running for ever.
        for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[crashed.id])),
                                              task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                                                  type=TaskRunFilterStateType(any_=[StateType.RUNNING])))):
            client.set_task_run_state(task_run.id, Crashed(message=f"its flow run {crashed.name} crashed"), force=True)
        deployment = client.read_deployment(crashed.deployment_id)
        name = f"{client.read_flow(crashed.flow_id).name}/{deployment.name}"
        attempt, first = attempt_of(crashed.tags), first_run_of(crashed.name, crashed.tags)
        why = crashed.state.message or "no message"
        if attempt >= attempts:
            message = (f"Crashed on attempt {attempt} of {attempts} ({why}); not re-run again. Find the cause in "
                       f"its logs, then: prefect deployment run {name} with the same parameters")
            client.set_flow_run_state(run_id, Failed(message=message))
            logger.error("%s: %s", crashed.name, message)
            return None
    delay = backoff_s * (attempt - 1)
    again = run_deployment(
        name, parameters=crashed.parameters, timeout=0, as_subflow=False,
        scheduled_time=datetime.now(UTC) + timedelta(seconds=delay),
        flow_run_name=f"{first}-attempt-{attempt + 1}",
        tags=[f"{ATTEMPT}{attempt + 1}/{attempts}", f"{FIRST_RUN}{first}"],
        # The same crash seen twice starts one re-run.
        idempotency_key=f"lora-pipeline-recover-{run_id}")
    logger.info("%s crashed (%s): re-run as %s, attempt %d of %d, %s", crashed.name, why, again.name,
                attempt + 1, attempts, f"in {delay:g} s" if delay else "now")
    return str(again.id)
