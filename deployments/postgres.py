"""A local PostgreSQL for the Prefect server, for development and tests: loopback only, in a
folder of its own, in the foreground, stopped with its command (Ctrl-C, or its parent's end).

    make postgres        # = python -m lora_pipeline.deployments.postgres [--dir .postgres] [--port 5432]

It prints the PREFECT_API_DATABASE_CONNECTION_URL that `make server` then uses. The database
trusts connections from 127.0.0.1 and listens nowhere else: it is for one machine's
development, not for a shared deployment. Uses the PostgreSQL server programs on the PATH,
else Debian's (apt-get install postgresql). PostgreSQL refuses to run as root: as root, the
folder is given to the `postgres` user and the server runs as that user.
"""

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from lora_pipeline.errors import PipelineError
from lora_pipeline.processes import start, stop, wait_until

DATABASE = "prefect"
SERVER_USER = "postgres"  # who runs the server when we are root: Debian's package makes this user


def server_programs() -> Path:
    """The folder of initdb and postgres."""
    found = shutil.which("initdb") or shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if debian:
        return Path(debian[-1]).parent
    raise PipelineError("PostgreSQL's server programs (initdb, postgres) were not found: install them "
                        "(Debian: `apt-get install postgresql`), or leave PREFECT_API_DATABASE_CONNECTION_URL "
                        "unset to keep Prefect's SQLite database")


class LocalPostgres:
    """A PostgreSQL server on 127.0.0.1:`port` with its data in `folder`, made on first use."""

    def __init__(self, folder: str | Path, port: int = 5432, netns: str | None = None):
        # netns: the network namespace to listen in (a host of its own, in the fault tests).
        self.folder, self.port, self.netns = Path(folder).resolve(), port, netns
        self.bin = server_programs()
        self.user = SERVER_USER if os.geteuid() == 0 else None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args) -> None:
        r = subprocess.run([str(self.bin / args[0]), *map(str, args[1:])], capture_output=True, text=True,
                           user=self.user)
        if r.returncode:
            raise PipelineError(f"{args[0]} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")

    def _init(self) -> None:
        if (self.folder / "PG_VERSION").exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user:
            shutil.chown(self.folder, self.user, self.user)
        # Trust, as the server listens on loopback only and its socket lies in its own folder.
        self._run("initdb", "-D", self.folder, "-U", "postgres", "--auth=trust", "--encoding=UTF8")

    def start(self, timeout: float = 60) -> "LocalPostgres":
        self._init()
        log = open(self.folder / "server.log", "ab")
        # SIGINT is PostgreSQL's fast shutdown: clients are disconnected, the data stays whole.
        self.process = start([self.bin / "postgres", "-D", self.folder, "-p", self.port,
                              "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.folder}"],
                             death_signal=signal.SIGINT, user=self.user, netns=self.netns, stdout=log,
                             stderr=subprocess.STDOUT)
        log.close()
        # The client programs use the server's socket in its folder: a path, reachable from any
        # network namespace.
        at = ["-h", self.folder, "-p", self.port]

        def ready() -> bool:
            return subprocess.run([str(self.bin / "pg_isready"), *map(str, at)], capture_output=True).returncode == 0
        wait_until(f"PostgreSQL on port {self.port} (log: {self.folder / 'server.log'})", ready, timeout, self.process)
        exists = subprocess.run([str(self.bin / "psql"), *map(str, at), "-U", "postgres",
                                 "-Atc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
                                capture_output=True, text=True)
        if exists.stdout.strip() != "1":
            self._run("createdb", *at, "-U", "postgres", DATABASE)
        return self

    def stop(self) -> None:
        if self.process:
            stop(self.process, timeout=30, sig=signal.SIGINT)
            self.process = None

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make postgres", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=".postgres", help="the data folder (default .postgres)")
    ap.add_argument("--port", type=int, default=5432)
    a = ap.parse_args(argv)
    try:
        db = LocalPostgres(a.dir, a.port).start()
    except (PipelineError, RuntimeError, TimeoutError) as e:
        print(f"make postgres: error: {e}", file=sys.stderr)
        return 1
    print(f"PostgreSQL is up on 127.0.0.1:{a.port}, data in {db.folder}. In the server's shell:\n\n"
          f"    export PREFECT_API_DATABASE_CONNECTION_URL={db.url}\n    make server\n\nCtrl-C stops it.",
          flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        db.process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        db.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
