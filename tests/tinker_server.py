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
decay=0.9, try_again_delay=0.1, tick=None, max_rank=128, vocab_sizes=None,
max_context_length=32768, sample_margin=20.0, retrieve_futures=True, tokenizers=None)``; also
``start()`` / ``stop()`` instead of ``with``. ``tokenizers`` maps a model to a callable
returning its tokenizer (for text stop sequences); SmolLM2's is the project's own.
With ``tick`` (seconds), training ops answer in simulated clock cycles (see ``_ready_at``), for
benchmarks of how a training loop keeps the service busy.

Operation names (what ``requests`` records and what ``fault`` targets): ``client_config``,
``client_dynamic_config``, ``create_session``, ``session_heartbeat``, ``finish_session``,
``telemetry``, ``get_server_capabilities``, ``create_model``, ``get_info``,
``forward_backward``, ``forward``, ``optim_step``, ``save_weights`` (save_state),
``save_weights_for_sampler``, ``load_weights`` (create_training_client_from_state*),
``create_sampling_session``, ``get_sampler``, ``sample``, ``retrieve_future``,
``retrieve_futures``, ``cancel_future``, ``list_training_runs``, ``get_training_run``,
``list_checkpoints``, ``delete_checkpoint``, ``list_user_checkpoints``, ``weights_info``,
``healthz``, ``save_weights_external``, ``external_weights_urls``, ``download``.

Faults, ``server.fault(op, kind, times=None, delay=0.0, after=0)``; ``times=None`` means
forever, otherwise the fault applies to the next ``times`` matching requests and then expires;
``after`` lets that many matching requests pass first.
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
``save_weights_for_sampler``, ``save_weights_external``, ``load_weights``, ``sample``):

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

What the server checks, modelled on the service (a rule broken is refused before it has any
effect). Which rule the service answers in which of the two shapes the SDK raises is an
assumption here; the shapes themselves are the SDK's:

- HTTP 400 (``tinker.BadRequestError``, not retried) for a bad request: an unsupported base
  model, a LoRA rank outside 1..``max_rank``, Adam parameters out of range (learning rate not
  > 0, betas outside [0, 1), eps not > 0, negative weight decay or clip norm), an unknown
  ``loss_fn`` (or one of Tinker's that this server does not simulate), no data, sampling
  parameters out of range (``num_samples`` < 1, ``max_tokens`` < 1, negative temperature,
  ``top_p`` outside (0, 1], ``top_k`` other than -1 or >= 1, negative ``topk_prompt_logprobs``),
  text stop sequences for a model whose tokenizer the server lacks, and external weights
  encrypted to age recipients.
- A failed future, category ``user`` (``tinker.RequestFailedError``, ``.category`` ``User``),
  for data the request carries: token ids outside the model's vocabulary (``vocab_sizes``),
  sequences longer than ``max_context_length`` (prompt plus ``max_tokens`` for sampling), empty
  inputs, non-text chunks, and ``loss_fn_inputs`` with missing or unexpected keys, lengths other
  than the model input's, or non-integer target tokens. Also a missing checkpoint to load and a
  checkpoint name saved twice.

Training is simulated: results are computed at submission (the SDK submits one training
client's requests in order), futures complete at once. Each target token's logprob is
``-initial_nll * decay ** steps`` where ``steps`` counts the run's optimizer steps, so the
loss falls as training goes on. ``loss_fn`` is honoured with the inputs the SDK and the
cookbook give it: ``cross_entropy`` (``target_tokens``, ``weights``): ``loss:sum`` is
``sum(-logprob * weight)``; ``importance_sampling`` (``target_tokens``, ``logprobs`` of the
sampler, ``advantages``): ``loss:sum`` is ``sum(-exp(logprob - sampler_logprob) * advantage)``.

Sampling: the model's greedy answer is ``sample_tokens``. At temperature 0 (or ``top_k`` 1)
each sequence is that answer; at temperature T each token is instead drawn uniformly from the
vocabulary with probability ``(V-1)e^(-m/T) / (1 + (V-1)e^(-m/T))`` (``m`` is
``sample_margin``, V the vocabulary), from a generator seeded with ``sampling_params.seed``, so
a seed repeats its samples and ``num_samples`` sequences differ once T is high. Reported
logprobs are the trained logprob for answer tokens and ``sample_margin`` less for others.
Stopping: ``stop=None`` ends at the end of the answer (``stop_reason`` "stop"); a list of token
ids or strings (strings are matched on the decoded text, with the model's tokenizer) replaces
that, the answer then repeating until a stop sequence is produced (included) or
``max_tokens``; ``stop=[]`` never stops early; ``max_tokens`` cuts (``stop_reason`` "length").
``prompt_logprobs`` and ``topk_prompt_logprobs`` (k entries a position, the prompt's own token
first; position 0 has none) are answered. With ``retrieve_futures=True`` (the default) the
client config tells sampling clients to wait on ``POST /api/v1/retrieve_futures`` (a long poll
of a sampling session's completions, with a cursor) and fetch each payload after, as SDK 0.38
does when the service enables it.

Run ids are ``"<session_id>:train:<n>"``, as the real service's; checkpoint paths
``tinker://<run_id>/weights/<name>``, ``tinker://<run_id>/sampler_weights/<name>`` and
``tinker://<run_id>/external_weights/<name>``.

External weights (``TrainingClient.save_weights_external``, ``RestClient
.get_external_weights_urls``): the export is a real PEFT LoRA adapter for a model the project
has on disk (``LOCAL_WEIGHTS``: SmolLM2), ``adapter_config.json`` and
``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes them: all linear
projections at the run's rank, initialised from the run's seed, with ``lora_B`` drawn from the
seed and the step (zero at step 0, as a fresh LoRA). It is built when its URLs are first asked
for (the base model is loaded once per process); until then its listed ``size_bytes`` is null.
Each file has its own signed URL, ``/signed/<token>/<file>`` on this server, fetched without an
API key (operation ``download``). Download-only fault kinds: ``truncate`` (the full
Content-Length, half the body, then the connection closes), ``short`` (half the body with a
matching Content-Length, as a truncated stored object), ``stall`` (the full Content-Length,
half the body, then nothing until the server stops). ``server.extra_external_files`` maps more
file names to contents served with every export (to test a client against hostile names).
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import socket
import sys
import tempfile
import threading
import time
import typing
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np
import tinker
from tinker.proto import tinker_public_pb2 as pb
from tinker.types import LossFnType

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODELS = (SMOLLM2, "Qwen/Qwen3-8B")
DEFAULT_SAMPLE_TOKENS = (40, 41, 42, 43, 44, 2)
DEFAULT_API_KEY = "tml-test-key"
# Embedding rows of the real models: the ids a request may use.
DEFAULT_VOCAB_SIZES = {SMOLLM2: 49152, "Qwen/Qwen3-8B": 151936}
OTHER_VOCAB_SIZE = 32768
# Models whose weights the project has on disk, so that their exports are real adapters.
LOCAL_WEIGHTS = frozenset({SMOLLM2})

FAULT_KINDS = frozenset(
    {"hang", "slow", "500", "429", "401", "drop", "try_again", "fail", "truncate", "short", "stall"}
)
_DOWNLOAD_KINDS = frozenset({"truncate", "short", "stall"})
_SUBMIT_KINDS = frozenset({"hang", "slow", "500", "429", "401", "drop", "fail"})
_POLLED_OPS = frozenset(
    {
        "create_model",
        "forward_backward",
        "forward",
        "optim_step",
        "save_weights",
        "save_weights_for_sampler",
        "save_weights_external",
        "load_weights",
        "sample",
    }
)

KNOWN_LOSS_FNS = typing.get_args(LossFnType)
LOSS_FN_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LONG_POLL_S = 30.0  # the longest a retrieve_futures poll is held, as the service's
MASK_LOGPROB = -99999.0  # the SDK's filler for top-k entries that have no value


def _now() -> datetime:
    return datetime.now(UTC)


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
    after: int = 0  # matching requests to let pass before it applies


@dataclass
class Checkpoint:
    name: str
    type: str  # "training" | "sampler" | "external"
    path: str
    time: datetime
    step: int
    user_metadata: dict[str, str] | None = None
    files: dict[str, bytes] | None = None  # an external export's files, once built

    @property
    def checkpoint_id(self) -> str:
        return self.path.split("/", 3)[3]

    @property
    def size_bytes(self) -> int | None:
        if self.type != "external":
            return 1024
        return None if self.files is None else sum(len(b) for b in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint_id": self.checkpoint_id,
            "checkpoint_type": self.type,
            "time": self.time.isoformat(),
            "tinker_path": self.path,
            "size_bytes": self.size_bytes,
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
        super().__init__((owner.host, 0), _Handler)

    def process_request(self, request, client_address):  # type: ignore[override]
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):  # type: ignore[override]
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        # A client that exits with a kept-alive connection open resets it: that is how clients
        # leave, not an error of the server's, so it prints no traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

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

    def log_message(self, format: str, *args: Any) -> None:
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
        max_rank: int = 128,
        vocab_sizes: dict[str, int] | None = None,
        max_context_length: int = 32768,
        sample_margin: float = 20.0,
        retrieve_futures: bool = True,
        tokenizers: dict[str, Callable[[], Any]] | None = None,
        host: str = "127.0.0.1",  # another address: reachable from the fault tests' hosts
    ):
        self.host = host
        self.models: list[str] = list(models if models is not None else DEFAULT_MODELS)
        self.max_rank = max_rank
        self.vocab_sizes = {**DEFAULT_VOCAB_SIZES, **(vocab_sizes or {})}
        self.max_context_length = max_context_length
        self.sample_margin = sample_margin
        self.retrieve_futures = retrieve_futures
        self.tokenizers: dict[str, Callable[[], Any]] = {SMOLLM2: _smollm2_tokenizer, **(tokenizers or {})}
        self.extra_external_files: dict[str, bytes] = {}
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
        self._completed = threading.Condition(self._lock)  # a sampling future completed
        # (sampling_session_id, cloned_sampler_id) -> [(cursor, completion)] not yet trimmed
        self._completions: dict[tuple[str, int], list[tuple[int, dict[str, Any]]]] = {}
        self._cursor = 0
        self._signed: dict[str, tuple[str, str]] = {}  # URL token -> (checkpoint path, file name)
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
        with self._completed:
            self._completed.notify_all()
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
        return f"http://{self.host}:{self.port}"

    # ----- test controls ---------------------------------------------------------------

    def fault(self, op: str, kind: str | int, times: int | None = None, delay: float = 0.0,
              after: int = 0) -> None:
        kind = str(kind)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if kind in _DOWNLOAD_KINDS and op != "download":
            raise ValueError(f"fault kind {kind!r} applies to 'download' only")
        if times is not None and times < 1:
            raise ValueError("times must be None (forever) or at least 1")
        with self._lock:
            self._faults.setdefault(op, []).append(Fault(kind, times, delay, after))

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
                    if f.after:
                        f.after -= 1
                        continue
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
            # Signed URLs carry their own authority, as storage's do: no API key.
            if op != "download" and (key is None or key == self.reject_key):
                self._record(op, path, key, None)
                self._send_json(h, 401, {"detail": "Invalid API key"})
                return
            if op == "retrieve_future":
                fault = self._retrieval_fault(parsed.get("request_id"))
            elif op == "download":
                fault = self._take_fault(op, (_SUBMIT_KINDS - {"fail"}) | _DOWNLOAD_KINDS)
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
            if op == "download":
                self._send_download(h, result, fault)
            elif isinstance(result, bytes):
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
        return False  # try_again / fail / download kinds: handled by the operation

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

    def _send_download(self, h: _Handler, payload: bytes, fault: Fault | None) -> None:
        kind = fault.kind if fault is not None else None
        if kind is None or kind not in _DOWNLOAD_KINDS:
            self._send(h, 200, payload, "application/octet-stream")
            return
        half = payload[: len(payload) // 2]
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(half) if kind == "short" else len(payload)))
        h.end_headers()
        h.wfile.write(half)
        h.wfile.flush()
        if kind == "stall":
            self._stop.wait()
        if kind != "short":
            raise _Drop()

    # ----- routing ---------------------------------------------------------------------

    def _route(self, method: str, path: str, body: bytes, headers: Any):
        p = path.rstrip("/")
        if method == "GET" and p.startswith("/signed/"):
            return "download", self._download, None
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
            "save_weights_external": ("save_weights_external", self._save_external),
            "load_weights": ("load_weights", self._load_weights),
            "create_sampling_session": ("create_sampling_session", self._create_sampling_session),
            "asample": ("sample", self._sample),
            "retrieve_future": ("retrieve_future", self._retrieve_future),
            "retrieve_futures": ("retrieve_futures", self._retrieve_futures),
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
            if method == "GET" and len(parts) == 6 and parts[2:4] == ["checkpoints", "external_weights"] \
                    and parts[5] == "external_weights_urls":
                return "external_weights_urls", self._external_weights_urls, None
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
                    run_id: str | None = None, target: tuple[str, int] | None = None):
        """A future with its answer; `target` (sampling session, clone) also reports its
        completion to that session's retrieve_futures polls."""
        request_id = f"req-{uuid.uuid4().hex[:16]}"
        if fault is not None and fault.kind == "fail":
            payload, proto = {"error": f"injected failure for {op}", "category": "server"}, False
        with self._lock:
            self._futures[request_id] = _Future(request_id, op, payload, proto, self._ready_at(op, run_id))
            if target is not None:
                failed = isinstance(payload, dict) and "error" in payload
                completion: dict[str, Any] = {"state": "failed" if failed else "finished", "request_id": request_id}
                if not failed:
                    completion["response_payload_uncompressed_size"] = len(payload) if proto else None
                self._cursor += 1
                self._completions.setdefault(target, []).append((self._cursor, completion))
                self._completed.notify_all()
        return request_id

    def _user_error(self, op: str, message: str, **kwargs) -> str:
        """A future that fails as the service's do for bad data: category "user"."""
        return self._new_future(op, {"error": message, "category": "user"}, **kwargs)

    def _vocab(self, model: str) -> int:
        return self.vocab_sizes.get(model, OTHER_VOCAB_SIZE)

    def _check_ids(self, ids: np.ndarray, model: str, what: str) -> str | None:
        """Why `ids` cannot be fed to `model`, or None."""
        vocab = self._vocab(model)
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            return (f"{what}: token id {int(ids[bad[0]])} at position {int(bad[0])} is outside the "
                    f"vocabulary of {model} ({vocab} ids)")
        return None

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
            "sample_use_retrieve_futures": self.retrieve_futures,
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
        rank = lora.get("rank", 32)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= self.max_rank:
            raise _HTTPError(400, f"LoRA rank must be an integer from 1 to {self.max_rank}, got {rank!r}")
        if fault is None or fault.kind != "fail":
            with self._lock:
                self.runs.setdefault(
                    run_id,
                    Run(
                        run_id=run_id,
                        session_id=session_id,
                        base_model=base_model,
                        rank=rank,
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
        if msg.loss_fn not in KNOWN_LOSS_FNS:
            raise _HTTPError(400, f"Unknown loss_fn {msg.loss_fn!r}; Tinker's are {', '.join(KNOWN_LOSS_FNS)}")
        if msg.loss_fn not in LOSS_FN_INPUTS:
            raise _HTTPError(400, f"loss_fn {msg.loss_fn!r} is not simulated by this test server "
                                  f"(it simulates {', '.join(LOSS_FN_INPUTS)})")
        if not msg.data:
            raise _HTTPError(400, f"{op} needs at least one datum")
        with self._lock:
            lp = self._logprob(run.steps)
        arrays: list[np.ndarray] = []
        loss_sum = 0.0
        for i, datum in enumerate(msg.data):
            inputs, problem = self._datum_inputs(datum, msg.loss_fn, run.base_model, f"datum {i}")
            if problem:
                rid = self._user_error(op, problem, fault=fault, run_id=run.run_id)
                return 200, {"request_id": rid, "model_id": run.run_id}
            n = inputs["target_tokens"].size
            logprobs = np.full(n, lp, dtype=np.float32)
            if msg.loss_fn == "cross_entropy":
                loss_sum += float(-(logprobs * inputs["weights"]).sum())
            else:
                ratio = np.exp(logprobs.astype(np.float64) - inputs["logprobs"])
                loss_sum += float(-(ratio * inputs["advantages"]).sum())
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

    def _datum_inputs(self, datum: pb.Datum, loss_fn: str, model: str,
                      what: str) -> tuple[dict[str, np.ndarray], str | None]:
        """The datum's loss_fn_inputs as arrays, or why the service would refuse them."""
        tokens, problem = self._chunk_tokens(datum.model_input, model, f"{what}: model_input")
        if problem:
            return {}, problem
        expected = LOSS_FN_INPUTS[loss_fn]
        given = set(datum.loss_fn_inputs)
        if given != set(expected):
            missing, extra = sorted(set(expected) - given), sorted(given - set(expected))
            return {}, (f"{what}: loss_fn_inputs for {loss_fn} are {', '.join(expected)}"
                        + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        inputs: dict[str, np.ndarray] = {}
        for name in expected:
            tensor = datum.loss_fn_inputs[name]
            if tensor.HasField("sparse_csr"):
                return {}, f"{what}: {name} is sparse; this test server simulates dense inputs only"
            values = _tensor_values(tensor)
            if values.size != tokens.size:
                return {}, (f"{what}: {name} has {values.size} values for {tokens.size} model input "
                            "tokens; they must be as long")
            inputs[name] = values
        if inputs["target_tokens"].dtype.kind != "i":
            return {}, f"{what}: target_tokens must be integers, not {inputs['target_tokens'].dtype}"
        return inputs, self._check_ids(inputs["target_tokens"], model, f"{what}: target_tokens")

    def _chunk_tokens(self, chunks, model: str, what: str) -> tuple[np.ndarray, str | None]:
        """The token ids of a protobuf model input, or why the service would refuse them."""
        parts = []
        for chunk in chunks:
            if chunk.WhichOneof("chunk") != "encoded_text":
                return np.empty(0, np.int64), f"{what}: only text chunks are simulated by this test server"
            parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32))
        tokens = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
        return tokens, self._check_sequence(tokens, model, what)

    def _check_sequence(self, tokens: np.ndarray, model: str, what: str, extra: int = 0) -> str | None:
        if tokens.size == 0:
            return f"{what} is empty"
        if tokens.size + extra > self.max_context_length:
            longer = f" plus {extra} to sample" if extra else ""
            return (f"{what}: {tokens.size} tokens{longer} exceed the context length of {model} "
                    f"({self.max_context_length})")
        return self._check_ids(tokens, model, what)

    def _optim_step(self, body, query, path, key, h, fault):
        run = self._run(body.get("model_id"))
        params = body.get("adam_params") or body.get("optim_params") or {}
        _check_optim_params(params)
        with self._lock:
            if fault is None or fault.kind != "fail":
                run.steps += 1
            steps = run.steps
        run.last_optim_params = params
        rid = self._new_future(
            "optim_step", {"metrics": {"step:max": float(steps), "learning_rate:mean": params["learning_rate"]}},
            fault=fault, run_id=run.run_id,
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

    def _save_external(self, body, query, path, key, h, fault):
        run = self._run(body.get("model_id"))
        if body.get("age_encryption_recipients"):
            raise _HTTPError(400, "age-encrypted exports are not simulated by this test server")
        ckpt_path = f"tinker://{run.run_id}/external_weights/{body.get('path')}"
        payload: dict[str, Any] = {"path": ckpt_path, "type": "save_weights_external"}
        if run.base_model not in LOCAL_WEIGHTS:
            payload = {"error": f"this test server exports weights of {sorted(LOCAL_WEIGHTS)} only, "
                                f"not {run.base_model}", "category": "user"}
        elif fault is None or fault.kind != "fail":
            with self._lock:
                if run.checkpoint(ckpt_path) is not None:
                    payload = {"error": f"Checkpoint {ckpt_path} already exists", "category": "user"}
                else:
                    run.put(Checkpoint(str(body.get("path")), "external", ckpt_path, _now(), run.steps))
        rid = self._new_future("save_weights_external", payload, fault=fault)
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
            steps, model = sampler.steps, sampler.base_model
        elif body.get("model_path"):
            found = self._find_checkpoint(body["model_path"])
            if found is None:
                raise _HTTPError(404, f"Model path {body['model_path']!r} not found")
            steps, model = found[1].step, found[0].base_model
        else:
            model = self._check_model(body.get("base_model"))
            steps = 0
        params = body.get("sampling_params") or {}
        num_samples = body.get("num_samples", 1)
        topk = body.get("topk_prompt_logprobs") or 0
        _check_sampling(params, num_samples, topk)
        stop = params.get("stop")
        if (isinstance(stop, str) or (isinstance(stop, list) and any(isinstance(x, str) for x in stop))) \
                and model not in self.tokenizers:
            raise _HTTPError(400, f"text stop sequences need {model}'s tokenizer, which this test server "
                                  "lacks; give stop token ids")
        target = (sampler_id, int(body.get("seq_id") or 0) // 1_000_000_000) if sampler_id else None
        prompt = np.asarray([t for c in (body.get("prompt") or {}).get("chunks", []) for t in c.get("tokens", [])],
                            dtype=np.int64)
        max_tokens = params.get("max_tokens")
        problem = self._check_sequence(prompt, model, "prompt", extra=max_tokens or 0)
        if problem:
            rid = self._user_error("sample", problem, fault=fault, target=target)
            return 200, {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(num_samples)]}
        limit = max_tokens if max_tokens is not None else self.max_context_length - prompt.size
        lp = self._logprob(steps)
        rng = np.random.default_rng(params.get("seed"))
        resp = pb.SampleResponse()
        for _ in range(num_samples):
            tokens, logprobs, reason = self._generate(model, params, limit, lp, rng)
            seq = resp.sequences.add()
            seq.stop_reason = reason
            seq.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
            seq.logprobs = np.asarray(logprobs, dtype=np.float32).tobytes()
        if body.get("prompt_logprobs"):
            prompt_lp = np.full(prompt.size, lp, dtype=np.float32)
            prompt_lp[0] = np.nan  # the first token has no context to be scored in
            resp.prompt_logprobs = prompt_lp.tobytes()
        if topk:
            # The prompt's own token first, then its neighbours in the vocabulary, each less likely.
            ids = (prompt[:, None] + np.arange(topk)[None, :]) % self._vocab(model)
            lps = np.full((prompt.size, topk), lp, dtype=np.float32) - np.arange(topk, dtype=np.float32)
            ids[0], lps[0] = 0, MASK_LOGPROB
            resp.topk_prompt_logprobs.token_ids = ids.astype(np.int32).tobytes()
            resp.topk_prompt_logprobs.logprobs = lps.tobytes()
            resp.topk_prompt_logprobs.k = topk
            resp.topk_prompt_logprobs.length = prompt.size
        rid = self._new_future("sample", resp.SerializeToString(), proto=True, fault=fault, target=target)
        return 200, {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(num_samples)]}

    def _generate(self, model: str, params: dict[str, Any], limit: int, lp: float,
                  rng: np.random.Generator) -> tuple[list[int], list[float], int]:
        """One sequence: tokens, their logprobs, the stop reason (see the module docstring)."""
        answer, vocab = self.sample_tokens, self._vocab(model)
        temperature = float(params.get("temperature", 1.0))
        if temperature == 0 or params.get("top_k") == 1:
            off_answer = 0.0
        else:
            odds = (vocab - 1) * math.exp(-self.sample_margin / temperature)
            off_answer = odds / (1 + odds)
        stop = params.get("stop")
        stop_ids = {x for x in stop if isinstance(x, int)} if isinstance(stop, list) else set()
        stop_strs = [stop] if isinstance(stop, str) else [x for x in stop or [] if isinstance(x, str)]
        tokenizer = self.tokenizers[model]() if stop_strs else None
        tokens: list[int] = []
        logprobs: list[float] = []
        if stop is None:  # the answer's end is the model's end of sequence
            limit = min(limit, len(answer))
        while len(tokens) < limit:
            scripted = answer[len(tokens) % len(answer)]
            if off_answer and rng.random() < off_answer:
                token = int((scripted + rng.integers(1, vocab)) % vocab)  # any token but the answer's
                logprobs.append(lp - self.sample_margin)
            else:
                token = scripted
                logprobs.append(lp)
            tokens.append(token)
            if token in stop_ids or (stop_strs and any(t in tokenizer.decode(tokens) for t in stop_strs)):
                return tokens, logprobs, pb.STOP_REASON_STOP
        ended = stop is None and len(tokens) == len(answer)
        return tokens, logprobs, pb.STOP_REASON_STOP if ended else pb.STOP_REASON_LENGTH

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

    def _retrieve_futures(self, body, *_):
        """A sampling session's completions after ``prev_cursor``; held (up to ``timeout``, at
        most ``LONG_POLL_S``) until there is one. Retrieved requests' payloads are dropped and
        completions at or before ``prev_cursor`` trimmed, as the service does."""
        t = body.get("target") or {}
        target = (t.get("sampling_session_id"), int(t.get("cloned_sampler_id", 0)))
        prev = int(body.get("prev_cursor", 0))
        wait = body.get("timeout")
        deadline = time.monotonic() + min(LONG_POLL_S if wait is None else float(wait), LONG_POLL_S)
        with self._completed:
            for request_id in body.get("retrieved_request_ids") or []:
                self._futures.pop(request_id, None)
            events = self._completions.setdefault(target, [])
            events[:] = [(c, e) for c, e in events if c > prev]
            while not events and not self._stop.is_set() and time.monotonic() < deadline:
                self._completed.wait(deadline - time.monotonic())
                events = self._completions[target]
            cursor = events[-1][0] if events else prev
            return 200, {"completions": [e for _, e in events], "cursor": cursor}

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

    def _external_weights_urls(self, body, query, path, key, h, fault):
        parts = path.rstrip("/").split("/")  # /api/v1/training_runs/<run>/checkpoints/external_weights/<name>/...
        ckpt_path = f"tinker://{parts[4]}/external_weights/{parts[7]}"
        found = self._find_checkpoint(ckpt_path)
        if found is None:
            raise _HTTPError(404, f"checkpoint {ckpt_path!r} not found")
        run, ckpt = found
        files = self._export_files(run, ckpt)
        urls = {}
        with self._lock:
            for name in [*files, *self.extra_external_files]:
                token = secrets.token_urlsafe(16)
                self._signed[token] = (ckpt_path, name)
                urls[name] = f"{self.base_url}/signed/{token}/{quote(name, safe='')}"
        return 200, {"urls": urls, "expires": (_now() + timedelta(hours=1)).isoformat()}

    def _export_files(self, run: Run, ckpt: Checkpoint) -> dict[str, bytes]:
        with self._lock:
            if ckpt.files is not None:
                return ckpt.files
        files = peft_adapter_files(run.base_model, run.rank, run.seed or 0, ckpt.step)
        with self._lock:
            if ckpt.files is None:
                ckpt.files = files
            return ckpt.files

    def _download(self, body, query, path, *_):
        token = path.split("/")[2]
        with self._lock:
            signed = self._signed.get(token)
        found = self._find_checkpoint(signed[0]) if signed else None
        if found is None or found[1].files is None:
            raise _HTTPError(404, "no such object (the URL is unknown, or its checkpoint was deleted)")
        name = signed[1]
        return 200, found[1].files.get(name, self.extra_external_files.get(name, b""))

    def _weights_info(self, body, *_):
        found = self._find_checkpoint(body.get("tinker_path") or "")
        if found is None:
            raise _HTTPError(404, f"checkpoint {body.get('tinker_path')!r} not found")
        run = found[0]
        return 200, {"base_model": run.base_model, "is_lora": True, "lora_rank": run.rank}


@contextlib.contextmanager
def service_client(server: TinkerTestServer):
    """A tinker.ServiceClient of `server`, whose session is finished while the server is still
    up: otherwise its heartbeats outlive the server, and the SDK warns of them for as long as
    the test process lives. Closing runs in a helper thread, bounded: a test may leave the
    session's creation hung."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    try:
        yield sc
    finally:
        server.clear_faults()
        if server.running:
            closing = threading.Thread(target=lambda: sc.close("success").result(timeout=5), daemon=True)
            closing.start()
            closing.join(timeout=6)


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


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_optim_params(params: dict[str, Any]) -> None:
    rules = {
        "learning_rate": ("a finite number > 0", lambda v: _finite(v) and v > 0),
        "beta1": ("in [0, 1)", lambda v: _finite(v) and 0 <= v < 1),
        "beta2": ("in [0, 1)", lambda v: _finite(v) and 0 <= v < 1),
        "eps": ("a finite number > 0", lambda v: _finite(v) and v > 0),
        "weight_decay": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),
        "grad_clip_norm": ("a finite number >= 0", lambda v: _finite(v) and v >= 0),
    }
    for name, (rule, ok) in rules.items():
        if (name == "learning_rate" or name in params) and not ok(params.get(name)):
            raise _HTTPError(400, f"{name} must be {rule}, got {params.get(name)!r}")


def _check_sampling(params: dict[str, Any], num_samples: Any, topk: Any) -> None:
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    temperature, top_p, top_k = params.get("temperature", 1.0), params.get("top_p", 1.0), params.get("top_k", -1)
    stop = params.get("stop")
    checks = [
        ("num_samples", num_samples, "an integer >= 1", positive_int(num_samples)),
        ("max_tokens", params.get("max_tokens"), "an integer >= 1",
         params.get("max_tokens") is None or positive_int(params.get("max_tokens"))),
        ("temperature", temperature, "a finite number >= 0", _finite(temperature) and temperature >= 0),
        ("top_p", top_p, "in (0, 1]", _finite(top_p) and 0 < top_p <= 1),
        ("top_k", top_k, "-1 or an integer >= 1", top_k == -1 or positive_int(top_k)),
        ("topk_prompt_logprobs", topk, "an integer >= 0", topk == 0 or positive_int(topk)),
        ("stop", stop, "a string, a list of strings or a list of token ids",
         stop is None or isinstance(stop, str) or (isinstance(stop, list) and (
             all(isinstance(x, str) for x in stop) or all(_finite(x) and isinstance(x, int) for x in stop)))),
    ]
    for name, value, rule, ok in checks:
        if not ok:
            raise _HTTPError(400, f"{name} must be {rule}, got {value!r}")


def _smollm2_tokenizer():
    from lora_pipeline.models import load_tokenizer

    return _cached(("tokenizer", SMOLLM2), lambda: load_tokenizer(SMOLLM2))


_cache: dict[Any, Any] = {}
_cache_lock = threading.Lock()
_build_lock = threading.Lock()  # one adapter at a time: each is built on the one cached base model


def _cached(key: Any, make: Callable[[], Any]) -> Any:
    with _cache_lock:
        if key not in _cache:
            _cache[key] = make()
        return _cache[key]


def peft_adapter_files(base_model: str, rank: int, seed: int, step: int) -> dict[str, bytes]:
    """A real PEFT LoRA adapter for `base_model`, as ``save_pretrained`` writes it: every linear
    projection at `rank`, initialised from `seed`; ``lora_B`` (zero in a fresh LoRA) drawn from
    the seed and `step`, so that checkpoints differ and step 0 changes nothing."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_pipeline.models import load_model

    with _build_lock:
        base = _cached(("model", base_model), lambda: load_model(base_model))
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
        try:
            model.peft_config["default"].base_model_name_or_path = base_model  # not the local cache path
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0.0, 1e-3 * min(step, 10), generator=generator)
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder, save_embedding_layers=False)
                return {name: (Path(folder) / name).read_bytes() for name in ADAPTER_FILES}
        finally:
            model.unload()  # the cached base model without LoRA layers, for the next build
