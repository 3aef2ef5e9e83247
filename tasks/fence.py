"""Self-fencing: a deployment's training stops by itself once another run may own its work.

A worker's machine cut off from the network keeps its flow run process alive: it trains on,
while the Prefect server, hearing no heartbeat, marks the run Crashed and the recover
deployment re-runs it elsewhere. The run folder's lock keeps the two apart (the re-run waits
for it), and this fence makes the cut-off process let go: between steps, the training stops
when its own flow run is no longer Running (marked Crashed or cancelled), or when the Prefect
API has not answered for LORA_PIPELINE_CRASH_AFTER seconds, the time after which the server
marks a silent run Crashed (prefect.yaml sets both that and the heartbeat for every
deployment run). What it leaves is what any crash leaves: the newest checkpoint, from which
the re-run continues.
"""

import contextvars
import os
import threading
import time

from prefect import get_client
from prefect.client.schemas.objects import StateType

# How often the flow run is read. A fence fires at most this much later than its threshold.
POLL_S = 10


class Fenced(Exception):
    """This process must stop: another run may own its run folder now."""


_current: contextvars.ContextVar["Fence | None"] = contextvars.ContextVar("lora_pipeline_fence", default=None)


class Fence:
    """Reads flow run `flow_run_id` every POLL_S seconds in a thread; `check()` raises Fenced
    when the run is no longer Running, or when the API has not answered for `lost_after`
    seconds (None: never for that)."""

    def __init__(self, flow_run_id, lost_after: float | None, read_state=None):
        """`read_state()`: the run's state type, read from the API (by default through Prefect's
        client); whatever it raises counts as no answer."""
        self.flow_run_id, self.lost_after = flow_run_id, lost_after
        self.read_state = read_state or self._read_state
        self.last_answer = time.monotonic()
        self.state: StateType | None = StateType.RUNNING
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lora-pipeline-fence", daemon=True)

    @classmethod
    def for_this_run(cls) -> "Fence | None":
        """The fence of the current flow run if it is a deployment's (only those are re-run)."""
        import prefect.runtime.deployment
        import prefect.runtime.flow_run

        if not prefect.runtime.deployment.id:
            return None
        lost_after = os.environ.get("LORA_PIPELINE_CRASH_AFTER")
        return cls(prefect.runtime.flow_run.id, float(lost_after) if lost_after else None)

    @staticmethod
    def current() -> "Fence | None":
        """The fence of the flow run this code runs in, if it has one."""
        return _current.get()

    def __enter__(self) -> "Fence":
        self._token = _current.set(self)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        _current.reset(self._token)

    def _read_state(self) -> StateType | None:
        with get_client(sync_client=True, httpx_settings={"timeout": POLL_S}) as client:
            return client.read_flow_run(self.flow_run_id).state_type

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.state = self.read_state()
                self.last_answer = time.monotonic()
            except Exception:  # unreachable, refused, a server error: not an answer
                pass

    @property
    def api_answers(self) -> bool:
        """Whether the API answered the last poll or so: not worth a blocking call otherwise."""
        return time.monotonic() - self.last_answer < 2.5 * POLL_S

    def lost(self) -> str | None:
        """Why this run may no longer be this process's, or None."""
        if self.state not in (StateType.RUNNING, None):
            return f"this flow run is {self.state.value} in Prefect now: its re-run owns the run folder"
        silent = time.monotonic() - self.last_answer
        if self.lost_after is not None and silent > self.lost_after:
            return (f"the Prefect API has not answered for {silent:.0f} s (LORA_PIPELINE_CRASH_AFTER is "
                    f"{self.lost_after:g} s): the server has marked this run Crashed and re-runs it")
        return None

    def check(self) -> None:
        why = self.lost()
        if why:
            raise Fenced(why)


def check_fence() -> None:
    """Raises Fenced if this flow run has a fence and it says stop; else nothing."""
    fence = Fence.current()
    if fence:
        fence.check()
