"""The adapter registry on the shared output folder, `<output_dir>/registry.json`:

    {"format": 1, "champion": RUN or null, "history": [entry, ...]}

Entries, oldest first: every candidate a run produced ({"kind": "candidate", "run", "run_dir",
"adapter", "tinker", "data_sha256", "metrics", "decision", "time"}) and every override a person
made ({"kind": "promote" | "rollback", "run", "from", "who", "why", "time"}). "champion" is the
run whose adapter to serve; the history is the record of how it got there.
"""

import contextlib
import fcntl
import getpass
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from .data import write_json
from .errors import PipelineError
from .run_folder import FINAL

FORMAT = 1


def whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry and no $USER
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    def __init__(self, output_dir: str | Path):
        self.dir = Path(output_dir)
        self.path = self.dir / "registry.json"
        self.lock_path = self.dir / ".registry.lock"

    def read(self) -> dict:
        """The registry as written last (an empty one before the first candidate). Needs no lock:
        writes replace the file in one rename."""
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"format": FORMAT, "champion": None, "history": []}
        except (ValueError, OSError) as e:
            raise self._corrupt(f"cannot be read as JSON ({e})") from None
        if not (isinstance(obj, dict) and isinstance(obj.get("history"), list)
                and all(isinstance(e, dict) and "run" in e for e in obj["history"])):
            raise self._corrupt("is not a registry (no history list of entries)")
        if obj.get("format") != FORMAT:
            raise PipelineError(f"{self.path} has format {obj.get('format')!r}, this lora-pipeline reads {FORMAT}: "
                                "use the lora-pipeline version that wrote it")
        return obj

    def _corrupt(self, what: str) -> PipelineError:
        # Never start afresh silently: the history is the only record of who promoted what.
        return PipelineError(f"{self.path} {what}: restore it from a backup, or move it aside to start a new "
                             "registry (the run folders are not affected)")

    def champion(self) -> dict | None:
        """The champion's candidate entry (its adapter, tinker path, metrics), or None."""
        reg = self.read()
        return self._candidate(reg, reg["champion"]) if reg["champion"] else None

    def history(self) -> list[dict]:
        return self.read()["history"]

    @contextlib.contextmanager
    def _update(self):
        """Read-modify-write under an exclusive lock on a sidecar file (never on registry.json, which
        each write replaces): two nightly runs finishing together both get their entry in."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            reg = self.read()
            yield reg
            write_json(self.path, reg)
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _candidate(reg: dict, run: str) -> dict | None:
        return next((e for e in reg["history"] if e.get("kind") == "candidate" and e["run"] == run), None)

    def record_candidate(self, entry: dict, decision=None) -> dict:
        """Appends a run's candidate entry (`run_dir` at least; `run` and `adapter` follow from it)
        and, if `decision` (a gate.Decision, its to_json(), or None) promoted it, makes it the
        champion. A run recorded before is not recorded again: its first entry is returned."""
        if "run_dir" not in entry:
            raise PipelineError("a registry candidate needs its run_dir")
        decision = decision.to_json() if hasattr(decision, "to_json") else decision
        new = {"run": Path(entry["run_dir"]).name, "adapter": Path(entry["run_dir"]) / FINAL, "tinker": None,
               "data_sha256": None, "metrics": {}, **entry, "kind": "candidate", "decision": decision, "time": _now()}
        new["run_dir"], new["adapter"] = str(new["run_dir"]), str(new["adapter"])
        try:
            json.dumps(new, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise PipelineError(f"{new['run']}: its registry entry is not plain JSON ({e}): "
                                "pass numbers, strings and paths, and no NaN") from None
        with self._update() as reg:
            if old := self._candidate(reg, new["run"]):
                return old  # a retried task: the decision was taken and recorded already
            reg["history"].append(new)
            if decision and decision.get("promoted"):
                reg["champion"] = new["run"]
        return new

    def promote(self, run: str, who: str | None = None, why: str = "") -> dict:
        """A person makes a recorded candidate the champion, whatever the gate said."""
        with self._update() as reg:
            if not self._candidate(reg, run):
                known = [e["run"] for e in reg["history"] if e.get("kind") == "candidate"]
                raise PipelineError(f"{run} is not a candidate in {self.path}; the known runs are: "
                                    + (", ".join(known) or "none yet (a run records itself when it ends)"))
            if reg["champion"] == run:
                raise PipelineError(f"{run} is already the champion; nothing to promote")
            entry = {"kind": "promote", "run": run, "from": reg["champion"], "who": who or whoami(), "why": why,
                     "time": _now()}
            reg["history"].append(entry)
            reg["champion"] = run
        return entry

    def rollback(self, who: str | None = None, why: str = "") -> dict:
        """The champion goes back to the one before it. Promotions stack and rollbacks pop, so two
        rollbacks go back two champions (not back and forth between the last two)."""
        with self._update() as reg:
            stack = []
            for e in reg["history"]:
                if e.get("kind") == "promote" or (e.get("kind") == "candidate" and (e.get("decision") or {}).get("promoted")):
                    stack.append(e["run"])
                elif e.get("kind") == "rollback" and stack:
                    stack.pop()
            if len(stack) < 2:
                raise PipelineError(f"no previous champion to roll back to in {self.path} (the champion is "
                                    f"{reg['champion'] or 'none'}); promote a run by name instead")
            entry = {"kind": "rollback", "run": stack[-2], "from": reg["champion"], "who": who or whoami(), "why": why,
                     "time": _now()}
            reg["history"].append(entry)
            reg["champion"] = stack[-2]
        return entry
