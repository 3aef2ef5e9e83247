"""A local fake of the Tinker service that the real ``tinker`` SDK (0.38) talks to unmodified.

Stdlib HTTP server (``ThreadingHTTPServer``, one thread per connection) speaking the wire
protocol the SDK uses: JSON bodies, ``X-API-Key`` auth, submit-then-poll futures over
``POST /api/v1/retrieve_future``, and the protobuf (``tinker.proto.tinker_public_pb2``)
encodings of forward_backward requests and of forward_backward / sample results.

Test API::

    with TinkerTestServer(models=[...]) as server:  # 127.0.0.1, a free port, background thread
        server.base_url                          # "http://127.0.0.1:PORT"
        server.api_key                           # a key the server accepts ("tml-test-key")
        server.fault("optim_step", "hang", times=1)
        server.fault("sample", "slow", delay=2.0)
        server.clear_faults()                    # or clear_faults("optim_step")
        server.reject_key = "tml-revoked"        # requests with this X-API-Key get 401
        server.requests                          # [(operation, time.monotonic()), ...] seen
        server.count("optim_step")               # how many requests of that operation
        server.request_log                       # [RequestRecord(op, time, path, api_key, fault)]
        server.runs                              # {run_id: Run}: base_model, rank, steps, checkpoints
        server.samplers                          # {sampling_session_id: Sampler}
        server.sessions                          # {session_id: {...}}
        server.running                           # False once stopped

``TinkerTestServer(models=None, *, reject_key=None, sample_tokens=..., initial_nll=3.0,
decay=0.9, try_again_delay=0.1, tick=None)``; also ``start()`` / ``stop()`` instead of ``with``.
With ``tick`` (seconds), training ops answer in simulated clock cycles (see ``_ready_at``), for
benchmarks of how a training loop keeps the service busy.

Operation names (what ``requests`` records and what ``fault`` targets): ``client_config``,
``client_dynamic_config``, ``create_session``, ``session_heartbeat``, ``finish_session``,
``telemetry``, ``get_server_capabilities``, ``create_model``, ``get_info``,
``forward_backward``, ``forward``, ``optim_step``, ``save_weights`` (save_state),
``save_weights_for_sampler``, ``load_weights`` (create_training_client_from_state*),
``create_sampling_session``, ``get_sampler``, ``sample``, ``retrieve_future``,
``cancel_future``, ``list_training_runs``, ``get_training_run``, ``list_checkpoints``,
``delete_checkpoint``, ``list_user_checkpoints``, ``weights_info``, ``healthz``.

Faults, ``server.fault(op, kind, times=None, delay=0.0)``; ``times=None`` means forever,
otherwise the fault applies to the next ``times`` matching requests and then expires.
Several faults on one operation queue up: the first unexpired one of a fitting kind applies.

- ``hang``: never answer; the request is held open until the server stops (then its
  connection is dropped). Other requests and ``stop()`` are not blocked.
- ``slow``: answer normally after ``delay`` seconds.
- ``500`` / ``429`` / ``401``: answer with that HTTP status (JSON ``{"detail": ...}``).
- ``drop``: read the request, then close the connection without an answer.
- ``try_again``: the future answers ``{"type": "try_again"}`` to ``times`` polls.
- ``fail``: the future resolves to a failed request (``{"error", "category": "server"}``,
  which the SDK raises as ``tinker.RequestFailedError``); the operation has no effect.

Where a fault applies for submitted-then-polled operations (``create_model``,
``forward_backward``, ``forward``, ``optim_step``, ``save_weights``,
``save_weights_for_sampler``, ``load_weights``, ``sample``):

- ``hang``/``slow``/``500``/``429``/``401``/``drop``/``fail`` named by the operation apply at
  **submission** (the ``POST /api/v1/<op>`` request). A submission answered by
  ``hang``/``500``/``429``/``401``/``drop`` is not processed (no future, no state change);
  ``slow`` is processed after the delay; ``fail`` gets a future that fails, with no effect.
- ``try_again`` named by the operation applies at **retrieval**: each
  ``retrieve_future`` poll of a future of that operation consumes one.
- To fault the retrieval of one operation's futures with any kind, name it
  ``"retrieve_future:<op>"`` (e.g. ``server.fault("retrieve_future:optim_step", "500")``);
  ``"retrieve_future"`` faults every poll. Retrieval faults are checked in that order:
  ``retrieve_future:<op>``, then ``<op>`` (``try_again`` only), then ``retrieve_future``.

For other operations ``try_again`` and ``fail`` do nothing. Auth (missing key or
``reject_key``) is checked before faults. Every request is recorded, faulted or not.

Training is simulated: results are computed at submission (the SDK submits one training
client's requests in order), futures complete at once. Each target token's logprob is
``-initial_nll * decay ** steps`` where ``steps`` counts the run's optimizer steps, so the
loss falls as training goes on. ``loss:sum`` is ``sum(-logprob * weight)``. Sampling returns
``sample_tokens`` truncated at ``max_tokens`` (``stop_reason`` "stop" if the list fits,
"length" otherwise), each with that logprob for the sampler's weights. Run ids are
``"<session_id>:train:<n>"``, as the real service's; checkpoint paths
``tinker://<run_id>/weights/<name>`` and ``tinker://<run_id>/sampler_weights/<name>``.
An unsupported base model is refused at submission with HTTP 400 (``tinker.BadRequestError``).
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

DEFAULT_MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen3-8B")
DEFAULT_SAMPLE_TOKENS = (40, 41, 42, 43, 44, 2)
DEFAULT_API_KEY = "tml-test-key"

FAULT_KINDS = frozenset({"hang", "slow", "500", "429", "401", "drop", "try_again", "fail"})
_SUBMIT_KINDS = frozenset({"hang", "slow", "500", "429", "401", "drop", "fail"})
_POLLED_OPS = frozenset(
    {
        "create_model",
        "forward_backward",
        "forward",
        "optim_step",
        "save_weights",
        "save_weights_for_sampler",
        "load_weights",
        "sample",
    }
)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class RequestRecord(NamedTuple):
    op: str
    time: float  # time.monotonic()
    path: str
    api_key: str | None
    fault: str | None  # the fault kind applied to this request, if any


@dataclass
class Fault:
    kind: str
    remaining: int | None  # None: forever
    delay: float = 0.0


@dataclass
class Checkpoint:
    name: str
    type: str  # "training" | "sampler"
    path: str
    time: datetime
    step: int
    user_metadata: dict[str, str] | None = None

    @property
    def checkpoint_id(self) -> str:
        return self.path.split("/", 3)[3]

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_type": self.type,
            "time": self.time.isoformat(),
            "tinker_path": self.path,
            "size_bytes": 1024,
            "public": False,
            "user_metadata": self.user_metadata,
            "expires_at": None,
        }


@dataclass
class Run:
    run_id: str
    session_id: str
    base_model: str
    rank: int
    seed: int | None = None
    steps: int = 0
    checkpoints: list[Checkpoint] = field(default_factory=list)
    created: datetime = field(default_factory=_now)
    last_request_time: datetime = field(default_factory=_now)
    user_metadata: dict[str, str] | None = None
    resumed_from: str | None = None
    optimizer_restored: bool = False
    last_optim_params: dict[str, Any] | None = None

    def checkpoint(self, path: str) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.path == path), None)

    def put(self, checkpoint: Checkpoint) -> None:
        """Add a checkpoint, replacing one saved earlier at the same path."""
        self.checkpoints = [c for c in self.checkpoints if c.path != checkpoint.path] + [checkpoint]

    def to_json(self) -> dict[str, Any]:
        def last(kind: str) -> dict[str, Any] | None:
            found = [c for c in self.checkpoints if c.type == kind]
            return found[-1].to_json() if found else None

        return {
            "training_run_id": self.run_id,
            "base_model": self.base_model,
            "model_owner": "test-user",
            "is_lora": True,
            "corrupted": False,
            "lora_rank": self.rank,
            "last_request_time": self.last_request_time.isoformat(),
            "last_checkpoint": last("training"),
            "last_sampler_checkpoint": last("sampler"),
            "user_metadata": self.user_metadata,
        }


@dataclass
class Sampler:
    sampler_id: str
    base_model: str
    model_path: str | None
    steps: int  # optimizer steps of the weights it samples from


@dataclass
class _Future:
    request_id: str
    op: str
    payload: Any  # dict (JSON) or bytes (protobuf)
    proto: bool = False
    ready_at: float = 0.0  # time.monotonic() when a poll gets the answer (with ``tick``)


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, owner: TinkerTestServer):
        self.owner = owner
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):  # type: ignore[override]
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[override]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def drop_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self.server.owner._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.owner._handle(self, "POST")

    def do_DELETE(self) -> None:
        self.server.owner._handle(self, "DELETE")

    def do_PUT(self) -> None:
        self.server.owner._handle(self, "PUT")


class _Drop(Exception):
    """Close the connection without answering."""


class TinkerTestServer:
    """A fake Tinker service on 127.0.0.1 for tests; see the module docstring."""

    def __init__(
        self,
        models: list[str] | tuple[str, ...] | None = None,
        *,
        reject_key: str | None = None,
        sample_tokens: list[int] | tuple[int, ...] = DEFAULT_SAMPLE_TOKENS,
        initial_nll: float = 3.0,
        decay: float = 0.9,
        try_again_delay: float = 0.1,
        tick: float | None = None,
    ):
        self.models: list[str] = list(models if models is not None else DEFAULT_MODELS)
        self.reject_key = reject_key
        self.api_key = DEFAULT_API_KEY
        self.sample_tokens = list(sample_tokens)
        self.initial_nll = initial_nll
        self.decay = decay
        self.try_again_delay = try_again_delay
        self.tick = tick
        self._t0 = time.monotonic()
        self._cycles: dict[tuple[str, str], int] = {}  # (run_id, phase) -> its latest cycle

        self.runs: dict[str, Run] = {}
        self.samplers: dict[str, Sampler] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.request_log: list[RequestRecord] = []

        self._futures: dict[str, _Future] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle -------------------------------------------------------------------

    def start(self) -> TinkerTestServer:
        self._stop.clear()
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="tinker-test-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: hung requests are released (their connections dropped)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()
        httpd.shutdown()
        httpd.drop_all_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> TinkerTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----- test controls ---------------------------------------------------------------

    def fault(self, op: str, kind: str | int, times: int | None = None, delay: float = 0.0) -> None:
        kind = str(kind)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if times is not None and times < 1:
            raise ValueError("times must be None (forever) or at least 1")
        with self._lock:
            self._faults.setdefault(op, []).append(Fault(kind, times, delay))

    def clear_faults(self, op: str | None = None) -> None:
        with self._lock:
            if op is None:
                self._faults.clear()
            else:
                self._faults.pop(op, None)

    @property
    def requests(self) -> list[tuple[str, float]]:
        with self._lock:
            return [(r.op, r.time) for r in self.request_log]

    def count(self, op: str) -> int:
        with self._lock:
            return sum(1 for r in self.request_log if r.op == op)

    # ----- request handling --------------------------------------------------------------

    def _take_fault(self, op: str, kinds: frozenset[str]) -> Fault | None:
        with self._lock:
            for f in self._faults.get(op, []):
                if f.kind in kinds and f.remaining != 0:
                    if f.remaining is not None:
                        f.remaining -= 1
                    return f
        return None

    def _handle(self, h: _Handler, method: str) -> None:
        try:
            length = int(h.headers.get("Content-Length") or 0)
            body = h.rfile.read(length) if length else b""
            url = urlsplit(h.path)
            path = unquote(url.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            key = h.headers.get("X-API-Key")
            try:
                op, handler, parsed = self._route(method, path, body, h.headers)
            except _HTTPError as e:
                self._record("unknown", path, key, None)
                self._send_json(h, e.status, {"detail": e.detail})
                return

            fault: Fault | None = None
            if key is None or key == self.reject_key:
                self._record(op, path, key, None)
                self._send_json(h, 401, {"detail": "Invalid API key"})
                return
            if op == "retrieve_future":
                fault = self._retrieval_fault(parsed.get("request_id"))
            else:
                kinds = _SUBMIT_KINDS if op in _POLLED_OPS else _SUBMIT_KINDS - {"fail"}
                fault = self._take_fault(op, kinds)
            self._record(op, path, key, fault.kind if fault else None)
            if fault is not None and self._apply_http_fault(h, fault, op):
                return
            try:
                status, result = handler(parsed, query, path, key, h, fault)
            except _HTTPError as e:
                self._send_json(h, e.status, {"detail": e.detail})
                return
            if isinstance(result, bytes):
                self._send(h, status, result, "application/x-protobuf")
            else:
                self._send_json(h, status, result)
        except _Drop:
            self._drop(h)
        except (ConnectionError, OSError):
            h.close_connection = True

    def _apply_http_fault(self, h: _Handler, fault: Fault, op: str) -> bool:
        """Act on a transport-level fault; True if the request was answered (or dropped)."""
        if fault.kind == "hang":
            self._stop.wait()
            self._drop(h)
            return True
        if fault.kind == "slow":
            if self._stop.wait(fault.delay):
                self._drop(h)
                return True
            return False
        if fault.kind == "drop":
            self._drop(h)
            return True
        if fault.kind in ("500", "429", "401"):
            status = int(fault.kind)
            self._send_json(h, status, {"detail": f"injected {status} for {op}"})
            return True
        return False  # try_again / fail: handled by the operation

    def _record(self, op: str, path: str, key: str | None, fault: str | None) -> None:
        with self._lock:
            self.request_log.append(RequestRecord(op, time.monotonic(), path, key, fault))

    @staticmethod
    def _drop(h: _Handler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def _send(h: _Handler, status: int, payload: bytes, content_type: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)
        h.wfile.flush()

    def _send_json(self, h: _Handler, status: int, obj: Any) -> None:
        self._send(h, status, json.dumps(obj).encode(), "application/json")

    # ----- routing ---------------------------------------------------------------------

    def _route(self, method: str, path: str, body: bytes, headers: Any):
        p = path.rstrip("/")
        if not p.startswith("/api/v1/"):
            raise _HTTPError(404, f"no route {method} {path}")
        rest = p[len("/api/v1/") :]

        if method == "POST" and rest == "forward_backward":
            if headers.get("Content-Encoding") == "zstd":
                import zstandard

                body = zstandard.ZstdDecompressor().decompress(body)
            msg = pb.ForwardBackwardRequest()
            msg.ParseFromString(body)
            return ("forward" if msg.forward_only else "forward_backward"), self._forward_backward, msg

        simple_post = {
            "client/config": ("client_config", self._client_config),
            "client/dynamic_config": ("client_dynamic_config", self._dynamic_config),
            "create_session": ("create_session", self._create_session),
            "session_heartbeat": ("session_heartbeat", self._heartbeat),
            "telemetry": ("telemetry", self._telemetry),
            "create_model": ("create_model", self._create_model),
            "get_info": ("get_info", self._get_info),
            "optim_step": ("optim_step", self._optim_step),
            "save_weights": ("save_weights", self._save_weights),
            "save_weights_for_sampler": ("save_weights_for_sampler", self._save_for_sampler),
            "load_weights": ("load_weights", self._load_weights),
            "create_sampling_session": ("create_sampling_session", self._create_sampling_session),
            "asample": ("sample", self._sample),
            "retrieve_future": ("retrieve_future", self._retrieve_future),
            "cancel_future": ("cancel_future", self._empty),
            "weights_info": ("weights_info", self._weights_info),
        }
        simple_get = {
            "get_server_capabilities": ("get_server_capabilities", self._capabilities),
            "healthz": ("healthz", lambda *a: (200, {"status": "ok"})),
            "training_runs": ("list_training_runs", self._list_training_runs),
            "checkpoints": ("list_user_checkpoints", self._list_user_checkpoints),
        }
        if method == "POST" and rest in simple_post:
            op, fn = simple_post[rest]
            return op, fn, self._json(body)
        if method == "GET" and rest in simple_get:
            op, fn = simple_get[rest]
            return op, fn, None
        parts = rest.split("/")
        if method == "POST" and len(parts) == 3 and parts[0] == "sessions" and parts[2] == "finish":
            return "finish_session", self._empty, self._json(body)
        if method == "GET" and len(parts) == 2 and parts[0] == "samplers":
            return "get_sampler", self._get_sampler, None
        if parts[0] == "training_runs" and len(parts) >= 2:
            if method == "GET" and len(parts) == 2:
                return "get_training_run", self._get_training_run, None
            if method == "GET" and len(parts) == 3 and parts[2] == "checkpoints":
                return "list_checkpoints", self._list_checkpoints, None
            if method == "DELETE" and len(parts) >= 4 and parts[2] == "checkpoints":
                return "delete_checkpoint", self._delete_checkpoint, None
        raise _HTTPError(404, f"no route {method} {path}")

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        if not body:
            return {}
        try:
            return json.loads(body)
        except ValueError as e:
            raise _HTTPError(400, f"invalid JSON body: {e}") from e

    # ----- helpers -----------------------------------------------------------------------

    def _logprob(self, steps: int) -> float:
        return -self.initial_nll * self.decay**steps

    def _ready_at(self, op: str, run_id: str | None) -> float:
        """With ``tick``, when a training op's answer is ready, in the service's lock-step clock
        cycles (one each ``tick`` seconds from the server's start). A cycle runs a
        forward-backward phase, then an optimizer phase, each half a tick; an op runs in the first
        phase of its kind that starts after it arrives, a run gets one forward_backward and one
        optim_step per cycle, and an optim_step not before the cycle of its run's
        forward_backward. The answer is ready when its phase ends. So awaiting each call in turn
        costs three cycles a step, submitting both before awaiting two, and keeping the next step
        queued one. Other ops answer at once."""
        if not self.tick or op not in ("forward_backward", "forward", "optim_step"):
            return 0.0
        now = (time.monotonic() - self._t0) / self.tick  # in cycles
        with self._lock:
            if op == "optim_step":
                cycle = max(math.floor(now - 0.5) + 1, self._cycles.get((run_id, "forward_backward"), 0),
                            self._cycles.get((run_id, "optim_step"), -1) + 1)
                ends = cycle + 1.0
            else:
                cycle = math.floor(now) + 1
                if op == "forward_backward":
                    cycle = max(cycle, self._cycles.get((run_id, op), -1) + 1)
                ends = cycle + 0.5
            if op != "forward":
                self._cycles[(run_id, op)] = cycle
        return self._t0 + ends * self.tick

    def _new_future(self, op: str, payload: Any, *, proto: bool = False, fault: Fault | None = None,
                    run_id: str | None = None):
        request_id = f"req-{uuid.uuid4().hex[:16]}"
        if fault is not None and fault.kind == "fail":
            payload, proto = {"error": f"injected failure for {op}", "category": "server"}, False
        with self._lock:
            self._futures[request_id] = _Future(request_id, op, payload, proto, self._ready_at(op, run_id))
        return request_id

    def _run(self, run_id: str | None) -> Run:
        with self._lock:
            run = self.runs.get(run_id or "")
        if run is None:
            raise _HTTPError(404, f"training run {run_id!r} not found")
        run.last_request_time = _now()
        return run

    def _find_checkpoint(self, path: str) -> tuple[Run, Checkpoint] | None:
        if not path.startswith("tinker://"):
            return None
        run_id = path[len("tinker://") :].split("/", 1)[0]
        with self._lock:
            run = self.runs.get(run_id)
            ckpt = run.checkpoint(path) if run else None
        return (run, ckpt) if run and ckpt else None

    def _arch(self, model: str) -> str:
        name = model.split("/")[-1].lower()
        return "llama" if "smollm" in name or "llama" in name else name.split("-")[0]

    # ----- service endpoints -------------------------------------------------------------

    def _client_config(self, body, *_):
        return 200, {
            "use_pyqwest_transport": False,
            "pjwt_auth_enabled": False,
            "proto_compress_fwdbwd": False,
            "sample_use_retrieve_futures": False,
            "sample_join_sampling_session": False,
            "custom_loss_server_side": False,
        }

    def _dynamic_config(self, body, *_):
        return 200, {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    def _create_session(self, body, query, path, key, h, fault):
        session_id = f"sess-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self.sessions[session_id] = {
                "tags": body.get("tags"),
                "user_metadata": body.get("user_metadata"),
                "sdk_version": body.get("sdk_version"),
                "api_key": key,
                "created": _now(),
                "finished": False,
            }
        return 200, {"type": "create_session", "session_id": session_id}

    def _heartbeat(self, body, *_):
        return 200, {"type": "session_heartbeat"}

    def _telemetry(self, body, *_):
        return 200, {"status": "accepted"}

    def _empty(self, body, query, path, *_):
        if path.endswith("/finish"):
            session_id = path.rstrip("/").split("/")[-2]
            with self._lock:
                if session_id in self.sessions:
                    self.sessions[session_id]["finished"] = True
        return 200, {}

    def _capabilities(self, *_):
        return 200, {
            "supported_models": [
                {"model_name": m, "max_context_length": 32768, "trainable": True, "sampleable": True}
                for m in self.models
            ]
        }

    def _check_model(self, base_model: str | None) -> str:
        if base_model not in self.models:
            raise _HTTPError(
                400,
                f"Base model {base_model!r} is not supported. Supported models: {self.models}",
            )
        return base_model

    # ----- training ----------------------------------------------------------------------

    def _create_model(self, body, query, path, key, h, fault):
        base_model = self._check_model(body.get("base_model"))
        session_id = body["session_id"]
        run_id = f"{session_id}:train:{body['model_seq_id']}"
        lora = body.get("lora_config") or {}
        if fault is None or fault.kind != "fail":
            with self._lock:
                self.runs.setdefault(
                    run_id,
                    Run(
                        run_id=run_id,
                        session_id=session_id,
                        base_model=base_model,
                        rank=int(lora.get("rank", 32)),
                        seed=lora.get("seed"),
                        user_metadata=body.get("user_metadata"),
                    ),
                )
        rid = self._new_future("create_model", {"model_id": run_id, "type": "create_model"}, fault=fault)
        return 200, {"request_id": rid, "model_id": run_id}

    def _get_info(self, body, *_):
        run = self._run(body.get("model_id"))
        return 200, {
            "type": "get_info",
            "model_data": {
                "arch": self._arch(run.base_model),
                "model_name": run.base_model,
                "tokenizer_id": run.base_model,
            },
            "model_id": run.run_id,
            "optimizer_config": {"type": "adamw"},
            "is_lora": True,
            "lora_rank": run.rank,
            "model_name": run.base_model,
        }

    def _forward_backward(self, msg: pb.ForwardBackwardRequest, query, path, key, h, fault):
        run = self._run(msg.model_id)
        op = "forward" if msg.forward_only else "forward_backward"
        with self._lock:
            lp = self._logprob(run.steps)
        arrays: list[np.ndarray] = []
        loss_sum = 0.0
        for datum in msg.data:
            n = _tensor_len(datum.loss_fn_inputs["target_tokens"]) if "target_tokens" in datum.loss_fn_inputs else 0
            logprobs = np.full(n, lp, dtype=np.float32)
            if "weights" in datum.loss_fn_inputs:
                weights = _tensor_values(datum.loss_fn_inputs["weights"]).astype(np.float32)
                if weights.size != n:
                    weights = np.ones(n, dtype=np.float32)
            else:
                weights = np.ones(n, dtype=np.float32)
            loss_sum += float(-(logprobs * weights).sum())
            arrays.append(logprobs)
        out = pb.ForwardBackwardOutput()
        out.loss_fn_output_type = "ArrayRecord"
        record = out.loss_fn_outputs.add()
        record.type_tag = "ArrayRecord"
        record.num_datums = len(arrays)
        bt = record.fields["logprobs"]
        bt.dtype = pb.DTYPE_FLOAT32
        bt.data = b"".join(a.tobytes() for a in arrays)
        bt.offsets = np.cumsum([0] + [a.nbytes for a in arrays], dtype=np.int64).tobytes()
        out.metrics["loss:sum"] = loss_sum
        rid = self._new_future(op, out.SerializeToString(), proto=True, fault=fault, run_id=run.run_id)
        return 200, {"request_id": rid, "model_id": run.run_id}

    def _optim_step(self, body, query, path, key, h, fault):
        run = self._run(body.get("model_id"))
        with self._lock:
            if fault is None or fault.kind != "fail":
                run.steps += 1
            steps = run.steps
        params = body.get("adam_params") or body.get("optim_params") or {}
        run.last_optim_params = params
        lr = float(params.get("learning_rate", 0.0))
        rid = self._new_future(
            "optim_step", {"metrics": {"step:max": float(steps), "learning_rate:mean": lr}}, fault=fault,
            run_id=run.run_id,
        )
        return 200, {"request_id": rid, "model_id": run.run_id}

    def _save_weights(self, body, query, path, key, h, fault):
        run = self._run(body.get("model_id"))
        name = body.get("path") or f"step-{run.steps:06d}"
        ckpt_path = f"tinker://{run.run_id}/weights/{name}"
        payload: dict[str, Any] = {"path": ckpt_path, "type": "save_weights"}
        if fault is None or fault.kind != "fail":
            with self._lock:
                existing = run.checkpoint(ckpt_path)
                if existing is not None and not body.get("overwrite"):
                    payload = {"error": f"Checkpoint {ckpt_path} already exists", "category": "user"}
                else:
                    run.put(Checkpoint(name, "training", ckpt_path, _now(), run.steps, body.get("user_metadata")))
        rid = self._new_future("save_weights", payload, fault=fault)
        return 200, {"request_id": rid, "model_id": run.run_id}

    def _save_for_sampler(self, body, query, path, key, h, fault):
        run = self._run(body.get("model_id"))
        name = body.get("path")
        failed = fault is not None and fault.kind == "fail"
        if name is None:
            # save_weights_and_get_sampling_client: an ephemeral sampler, no listed checkpoint.
            sampler_id = f"{run.session_id}:sample:{body.get('sampling_session_seq_id', 0)}"
            if not failed:
                with self._lock:
                    self.samplers[sampler_id] = Sampler(sampler_id, run.base_model, None, run.steps)
            payload: dict[str, Any] = {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
        else:
            ckpt_path = f"tinker://{run.run_id}/sampler_weights/{name}"
            payload = {"path": ckpt_path, "type": "save_weights_for_sampler"}
            if not failed:
                with self._lock:
                    run.put(Checkpoint(name, "sampler", ckpt_path, _now(), run.steps, body.get("user_metadata")))
        rid = self._new_future("save_weights_for_sampler", payload, fault=fault)
        return 200, {"request_id": rid, "model_id": run.run_id}

    def _load_weights(self, body, query, path, key, h, fault):
        ckpt_path = body.get("path") or ""
        found = self._find_checkpoint(ckpt_path)
        failed = fault is not None and fault.kind == "fail"
        if body.get("session_id") is not None:
            run_id = f"{body['session_id']}:train:{body.get('model_seq_id', 0)}"
        else:
            run_id = self._run(body.get("model_id")).run_id
        if found is None or found[1].type != "training":
            payload: dict[str, Any] = {
                "error": f"Checkpoint {ckpt_path!r} not found (a tinker://<run>/weights/<name> path is needed)",
                "category": "user",
            }
        else:
            src_run, ckpt = found
            payload = {"path": ckpt_path, "model_id": run_id, "type": "load_weights"}
            if not failed:
                with self._lock:
                    run = self.runs.get(run_id)
                    if run is None:
                        run = self.runs[run_id] = Run(
                            run_id=run_id,
                            session_id=body["session_id"],
                            base_model=body.get("base_model") or src_run.base_model,
                            rank=src_run.rank,
                            seed=src_run.seed,
                            user_metadata=body.get("user_metadata"),
                        )
                    run.steps = ckpt.step
                    run.resumed_from = ckpt_path
                    run.optimizer_restored = bool(body.get("optimizer"))
        rid = self._new_future("load_weights", payload, fault=fault)
        return 200, {"request_id": rid, "model_id": run_id}

    # ----- sampling ----------------------------------------------------------------------

    def _create_sampling_session(self, body, *_):
        sampler_id = f"{body.get('session_id')}:sample:{body.get('sampling_session_seq_id', 0)}"
        model_path = body.get("model_path")
        if model_path:
            found = self._find_checkpoint(model_path)
            if found is None:
                raise _HTTPError(404, f"Model path {model_path!r} not found")
            sampler = Sampler(sampler_id, found[0].base_model, model_path, found[1].step)
        else:
            sampler = Sampler(sampler_id, self._check_model(body.get("base_model")), None, 0)
        with self._lock:
            self.samplers[sampler_id] = sampler
        return 200, {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    def _get_sampler(self, body, query, path, *_):
        sampler_id = path.rstrip("/").split("/")[-1]
        with self._lock:
            sampler = self.samplers.get(sampler_id)
        if sampler is None:
            raise _HTTPError(404, f"sampler {sampler_id!r} not found")
        return 200, {
            "sampler_id": sampler.sampler_id,
            "base_model": sampler.base_model,
            "model_path": sampler.model_path,
        }

    def _sample(self, body, query, path, key, h, fault):
        sampler_id = body.get("sampling_session_id")
        if sampler_id is not None:
            with self._lock:
                sampler = self.samplers.get(sampler_id)
            if sampler is None:
                raise _HTTPError(404, f"sampler {sampler_id!r} not found")
            steps = sampler.steps
        elif body.get("model_path"):
            found = self._find_checkpoint(body["model_path"])
            if found is None:
                raise _HTTPError(404, f"Model path {body['model_path']!r} not found")
            steps = found[1].step
        else:
            self._check_model(body.get("base_model"))
            steps = 0
        params = body.get("sampling_params") or {}
        max_tokens = params.get("max_tokens")
        tokens = self.sample_tokens if max_tokens is None else self.sample_tokens[: int(max_tokens)]
        stop = pb.STOP_REASON_STOP if len(tokens) == len(self.sample_tokens) else pb.STOP_REASON_LENGTH
        lp = self._logprob(steps)
        num_samples = int(body.get("num_samples", 1))
        resp = pb.SampleResponse()
        for _ in range(num_samples):
            seq = resp.sequences.add()
            seq.stop_reason = stop
            seq.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
            seq.logprobs = np.full(len(tokens), lp, dtype=np.float32).tobytes()
        if body.get("prompt_logprobs"):
            n = sum(len(c.get("tokens", [])) for c in (body.get("prompt") or {}).get("chunks", []))
            prompt_lp = np.full(n, lp, dtype=np.float32)
            if n:
                prompt_lp[0] = np.nan
            resp.prompt_logprobs = prompt_lp.tobytes()
        rid = self._new_future("sample", resp.SerializeToString(), proto=True, fault=fault)
        return 200, {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(num_samples)]}

    # ----- futures -----------------------------------------------------------------------

    def _retrieve_future(self, body, query, path, key, h, fault):
        request_id = body.get("request_id")
        with self._lock:
            fut = self._futures.get(request_id)
        if fut is None:
            raise _HTTPError(404, f"future {request_id!r} not found")
        if fault is not None and fault.kind == "try_again":
            self._stop.wait(self.try_again_delay)
            return 200, {"type": "try_again", "request_id": request_id, "queue_state": "active"}
        if fault is not None and fault.kind == "fail":
            return 200, {"error": f"injected failure for {fut.op}", "category": "server"}
        self._stop.wait(max(fut.ready_at - time.monotonic(), 0.0))  # a long poll, as the service's
        return 200, fut.payload

    def _retrieval_fault(self, request_id: str | None) -> Fault | None:
        with self._lock:
            fut = self._futures.get(request_id or "")
        if fut is None:
            return self._take_fault("retrieve_future", FAULT_KINDS)
        return (
            self._take_fault(f"retrieve_future:{fut.op}", FAULT_KINDS)
            or self._take_fault(fut.op, frozenset({"try_again"}))
            or self._take_fault("retrieve_future", FAULT_KINDS)
        )

    # ----- REST --------------------------------------------------------------------------

    def _list_training_runs(self, body, query, *_):
        limit, offset = int(query.get("limit", 20)), int(query.get("offset", 0))
        with self._lock:
            runs = sorted(self.runs.values(), key=lambda r: r.created)
            page = [r.to_json() for r in runs[offset : offset + limit]]
        return 200, {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}

    def _get_training_run(self, body, query, path, *_):
        run_id = path.rstrip("/").split("/")[-1]
        with self._lock:
            return 200, self._run(run_id).to_json()

    def _list_checkpoints(self, body, query, path, *_):
        run_id = path.rstrip("/").split("/")[-2]
        with self._lock:
            return 200, {"checkpoints": [c.to_json() for c in self._run(run_id).checkpoints]}

    def _list_user_checkpoints(self, body, query, *_):
        with self._lock:
            ckpts = [c.to_json() for r in self.runs.values() for c in r.checkpoints]
        return 200, {"checkpoints": ckpts, "cursor": {"offset": 0, "limit": len(ckpts), "total_count": len(ckpts)}}

    def _delete_checkpoint(self, body, query, path, *_):
        parts = path.rstrip("/").split("/")  # /api/v1/training_runs/<run>/checkpoints/<type>/<name>
        run_id, checkpoint_id = parts[4], "/".join(parts[6:])
        with self._lock:
            run = self._run(run_id)
            ckpt = next((c for c in run.checkpoints if c.checkpoint_id == checkpoint_id), None)
            if ckpt is None:
                raise _HTTPError(404, f"checkpoint {checkpoint_id!r} not found")
            run.checkpoints.remove(ckpt)
        return 200, {}

    def _weights_info(self, body, *_):
        found = self._find_checkpoint(body.get("tinker_path") or "")
        if found is None:
            raise _HTTPError(404, f"checkpoint {body.get('tinker_path')!r} not found")
        run = found[0]
        return 200, {"base_model": run.base_model, "is_lora": True, "lora_rank": run.rank}


def _tensor_len(t: pb.Tensor) -> int:
    if len(t.shape):
        return int(t.shape[0])
    return _tensor_values(t).size


def _tensor_values(t: pb.Tensor) -> np.ndarray:
    dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}.get(
        t.dtype, np.float32
    )
    raw = t.sparse_csr.values if t.HasField("sparse_csr") else t.dense
    return np.frombuffer(raw, dtype=dtype)
