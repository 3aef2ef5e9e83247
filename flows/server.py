"""The temporary Prefect server a command uses when no PREFECT_API_URL is set.

Prefect would start one of its own, but give up after its default startup timeout on a busy
machine, with a traceback, and leave it running after a `kill -9` of the command. This one is
Prefect's own temporary server (the same uvicorn command, no UI), started with a deadline that
suits a busy machine, tied to the command so that it dies with it however it ends, and when it
cannot start, the command says in one line what to do instead.
"""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from lora_pipeline.errors import PipelineError
from lora_pipeline.processes import free_port, start, stop, wait_until

# Seconds to wait for the server; a 2-core machine under load took over a minute.
STARTUP_TIMEOUT = float(os.environ.get("LORA_PIPELINE_SERVER_TIMEOUT", "180"))


# How many times a temporary server that dies mid-run is started again before the command gives up.
RESTARTS = 3


@contextlib.contextmanager
def temporary_server():
    """Sets PREFECT_API_URL to a temporary server for the duration, unless one is set, and
    yields `ready`: call it before the first call to the server, which it waits for. The server
    starts while the command imports Prefect, torch and the flows (each takes seconds), instead
    of before. Enter it before Prefect is imported: Prefect reads its settings from the
    environment then. A server that dies mid-run is started again (see _TemporaryServer.watch)."""
    if os.environ.get("PREFECT_API_URL"):
        check_api_url(os.environ["PREFECT_API_URL"])
        yield lambda: None
        return
    assert "prefect" not in sys.modules, "temporary_server() must run before Prefect is imported"
    server = _TemporaryServer()
    server.launch()
    os.environ["PREFECT_API_URL"] = server.url
    stopping = threading.Event()
    # The watchdog starts the server again, so it must outlive it: a child started with a
    # death signal gets it when the *thread* that started it ends.
    watchdog = threading.Thread(target=server.watch, args=(stopping,), name="prefect-server-watchdog", daemon=True)

    def ready() -> None:
        server.wait_until_it_answers()
        watchdog.start()
    try:
        yield ready
    except KeyboardInterrupt:
        if server.failed:  # the watchdog interrupted the command: say why, not "interrupted"
            raise PipelineError(server.failed) from None
        raise
    finally:
        if watchdog.is_alive() and not server.failed:
            _send_pending_logs()
        del os.environ["PREFECT_API_URL"]
        stopping.set()
        with server.lock:
            stop(server.proc, 10, signal.SIGTERM)
        if watchdog.is_alive():
            watchdog.join(10)


class _TemporaryServer:
    """Prefect's own temporary server (the same uvicorn command, no UI) on a port of its own,
    its database under PREFECT_HOME as Prefect's is."""

    def __init__(self):
        import importlib.util

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        # As Prefect runs its own temporary server: no UI, the services a short-lived server needs.
        self.env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1"}
        self.site = Path(importlib.util.find_spec("prefect").origin).parent.parent
        self.proc: subprocess.Popen | None = None
        self.errors = None  # the server's stderr: the line that says why it did not start
        self.failed: str | None = None  # why the watchdog gave up, for the command's last line
        self.lock = threading.Lock()  # the watchdog's restart against the command's stop

    def start(self) -> None:
        self.launch()
        self.wait_until_it_answers()

    def launch(self) -> None:
        self.errors = tempfile.TemporaryFile()
        self.proc = start([sys.executable, "-m", "uvicorn", "--app-dir", self.site, "--factory",
                           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", self.port,
                           "--log-level", "error", "--lifespan", "on"],
                          env=self.env, stdout=subprocess.DEVNULL, stderr=self.errors)

    def wait_until_it_answers(self) -> None:
        """A server that cannot start is one line of what to do instead."""
        import httpx

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        try:
            wait_until("a temporary Prefect server", healthy, STARTUP_TIMEOUT, self.proc, every=0.2)
        except (TimeoutError, RuntimeError) as e:
            stop(self.proc, 5)
            self.errors.seek(0)
            said = self.errors.read().decode(errors="replace").strip().splitlines()
            # The line that names the cause (an unwritable database under PREFECT_HOME, say), else the last.
            cause = next((line for line in reversed(said) if line.startswith(("sqlalchemy.exc.", "PermissionError",
                                                                               "OSError"))), said[-1] if said else "")
            why = ("a busy machine can be slow to start one" if isinstance(e, TimeoutError) else
                   f"it keeps its database under PREFECT_HOME ({prefect_home()}): check that it can be written, or "
                   "set PREFECT_HOME to a folder that can")
            raise PipelineError(f"{e}{f' ({cause.strip()})' if cause else ''}; {why}. Or start a Prefect server "
                                "with `make server`, `export PREFECT_API_URL=http://127.0.0.1:4200/api`, and run "
                                "this again") from None
        finally:
            self.errors.close()

    def watch(self, stopping: threading.Event) -> None:
        """A server killed mid-run (by hand, by the OOM killer) left the command stalled for
        minutes in Prefect's client retries, then a traceback. It is started again on the same
        port and database instead: the client's retries (connection refused is retried once it
        has connected) carry the run's calls over the gap, and the run goes on. After RESTARTS,
        or if it cannot start, the command is interrupted and ends with why."""
        import _thread

        restarts = 0
        while not stopping.wait(1):
            with self.lock:
                code = self.proc.poll()
                if code is None or stopping.is_set():
                    continue
                if restarts == RESTARTS:
                    self.failed = (f"the temporary Prefect server stopped {restarts + 1} times (exit code {code} last); "
                                   "the run folder is intact: run the same command again to continue, or start a "
                                   "server with `make server` and set PREFECT_API_URL")
                else:
                    restarts += 1
                    print(f"lora-pipeline: the temporary Prefect server stopped (exit code {code}); starting it "
                          "again", file=sys.stderr, flush=True)
                    try:
                        self.start()
                        continue
                    except PipelineError as e:
                        self.failed = (f"the temporary Prefect server stopped mid-run and could not start again "
                                       f"({e}); the run folder is intact: run the same command again to continue")
            _thread.interrupt_main()
            return


def prefect_home() -> str:
    """Where Prefect keeps its database and settings, as Prefect reads it (PREFECT_HOME)."""
    return os.environ.get("PREFECT_HOME") or os.path.join(os.path.expanduser("~"), ".prefect")


def check_api_url(url: str, timeout: float = 10) -> None:
    """One line, at once, when nothing answers at PREFECT_API_URL: Prefect's client would retry
    for minutes and then print a long traceback. Any HTTP answer counts as a server (a Prefect
    Cloud workspace may answer /health with an error of its own)."""
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except (httpx.TransportError, httpx.InvalidURL, ValueError) as e:
        raise PipelineError(f"PREFECT_API_URL {url}: no Prefect server answers there ({type(e).__name__}); start it "
                            "(`make server`), correct the URL, or unset PREFECT_API_URL to let each command start "
                            "a temporary server") from None


def _send_pending_logs() -> None:
    """Logs and events still queued for the server, sent before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=5)
    EventsWorker.drain_all(timeout=5)
