"""The Tinker engine: the real `tinker` SDK, every call behind a deadline of our own.

The SDK alone can block the calling thread for minutes (session creation against an
unreachable server) or poll a future forever (a server answering `try_again`). Each call here
runs under `request_timeout`: submissions in a helper thread that we stop waiting for, results
with `result(timeout)`, after which the SDK's background polling is cancelled. Past the deadline
the call raises EngineTimeout naming the operation, which the Prefect layer retries.
"""

import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path

import tinker
from tinker import types

from ..data import write_json
from ..errors import PipelineError
from ..models import load_tokenizer
from ..render import renderer_for
from . import INFO_FILE, EngineTimeout



# The SDK retries 5xx, 429 and lost connections by itself, and logs that only at DEBUG. A filter
# on its logger keeps those retries (and shows nothing it did not show before) for the pipeline
# to report. Its telemetry uploads are left out: they are not the pipeline's calls.
_sdk_retries: deque = deque(maxlen=200)


def _watch_sdk_retries() -> None:
    logger = logging.getLogger("tinker._base_client")
    if any(getattr(f, "lora_pipeline", False) for f in logger.filters):
        return
    shown_from = logger.getEffectiveLevel()
    reason = {"why": "a lost connection or timeout"}

    def keep_retries(record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Retrying due to status code %i"):
            reason["why"] = f"HTTP {record.args[0]}"
        elif record.msg == "Retrying request to %s in %f seconds":
            url, delay = record.args
            if not str(url).endswith("/telemetry"):
                _sdk_retries.append(f"{url} after {reason['why']}, again in {delay:.1f} s")
            reason["why"] = "a lost connection or timeout"
        return record.levelno >= shown_from  # what was silent before stays silent

    keep_retries.lora_pipeline = True
    logger.addFilter(keep_retries)
    logger.setLevel(logging.DEBUG)


def take_sdk_retries() -> list[str]:
    """The SDK's own retries since the last call, e.g. "/api/v1/optim_step after HTTP 500,
    again in 0.5 s"."""
    taken = []
    while _sdk_retries:
        taken.append(_sdk_retries.popleft())
    return taken


def service_url() -> str | None:
    """The Tinker service to use: TINKER_BASE_URL (the SDK's name), else the workflow's
    TINKER_API_BASE; None lets the SDK pick its default."""
    return os.environ.get("TINKER_BASE_URL") or os.environ.get("TINKER_API_BASE") or None


def tinker_name(name: str) -> str:
    """Tinker checkpoint names as the workflow made them: step_0025, final."""
    if name.startswith("checkpoint_step_"):
        return f"step_{int(name.removeprefix('checkpoint_step_')):04d}"
    return "final"


def final_error(op: str, e: Exception) -> Exception:
    """A clear message for failures that retrying cannot fix; others are passed through."""
    if isinstance(e, tinker.AuthenticationError):
        return PipelineError(f"Tinker rejected the API key during {op} (401): check TINKER_API_KEY")
    if isinstance(e, tinker.PermissionDeniedError):
        return PipelineError(f"Tinker refused {op} (403): the API key may not use this model or run")
    if isinstance(e, (tinker.BadRequestError, tinker.NotFoundError, tinker.UnprocessableEntityError)):
        detail = getattr(e, "message", str(e))
        return PipelineError(f"Tinker refused {op} ({e.status_code}): {detail}")
    return e


class Call:
    """A submitted Tinker call: `result()` waits at most until the call's deadline."""

    def __init__(self, op: str, future, started: float, timeout: float, then=None):
        self.op, self.future, self.started, self.timeout, self.then = op, future, started, timeout, then

    def result(self):
        remaining = self.started + self.timeout - time.monotonic()
        try:
            value = self.future.result(timeout=max(remaining, 0.01))
        except TimeoutError:
            self.future.future().cancel()  # stops the SDK polling for an answer in the background
            raise EngineTimeout(self.op, self.timeout) from None
        except tinker.TinkerError as e:
            raise final_error(self.op, e) from e
        return self.then(value) if self.then else value


def run_with_deadline(op: str, timeout: float, fn):
    """fn() in a helper thread; raises EngineTimeout if it has not returned in time. The thread
    is left behind (a daemon), blocked in the SDK: Python cannot interrupt it."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the waiting thread
            box["error"] = e

    thread = threading.Thread(target=target, name=f"tinker-{op}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise EngineTimeout(op, timeout)
    if "error" in box:
        e = box["error"]
        raise (final_error(op, e) if isinstance(e, tinker.TinkerError) else e) from e
    return box["value"]


class TinkerEngine:
    remote = True  # calls queue on the service, which runs them in lock-step clock cycles

    def __init__(self, base_model: str, rank: int, seed: int, root: Path | None,
                 request_timeout: float = 120.0, sampler_path: str | None = None, init_from: str | None = None):
        """A new LoRA training run on `base_model` (starting from the weights of the tinker://
        state `init_from`, with a fresh optimizer, if given); or, given the `sampler_path` of
        saved weights, an engine that only samples (from those weights or from the base)."""
        self.base_model, self.rank, self.seed = base_model, rank, seed
        self.sampler_path = sampler_path
        self.root = Path(root) if root else None
        self.timeout = request_timeout
        _watch_sdk_retries()
        # The SDK reads TINKER_API_KEY itself; the key never passes through our code.
        self.service = tinker.ServiceClient(base_url=service_url())
        self.tokenizer = load_tokenizer(base_model)
        self.renderer = renderer_for(base_model, self.tokenizer)
        self.stop_tokens = [t for t in self.renderer.get_stop_sequences() if isinstance(t, int)]
        # The service does not say; the tokenizer's limit is the model's where it is set (it is
        # a huge placeholder where it is not).
        self.context_length = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 1 << 24 else None
        self.client = None
        if not sampler_path:
            try:
                if init_from:
                    self.client = self._create("create_training_client_from_state",
                                               lambda: self.service.create_training_client_from_state(init_from))
                else:
                    self.client = self._create("create_lora_training_client", lambda: self.service.create_lora_training_client(
                        base_model, rank=rank, seed=seed))
            except BaseException:
                self.close("errored")
                raise

    def _create(self, op: str, make):
        """Session and client creation block the calling thread: they get a helper thread."""
        return run_with_deadline(op, self.timeout, lambda: make().result(timeout=self.timeout))

    def _submit(self, op: str, submit, then=None) -> Call:
        started = time.monotonic()
        future = run_with_deadline(op, self.timeout, submit)
        return Call(op, future, started, self.timeout, then)

    def close(self, status: str = "success") -> None:
        """End the Tinker session (its heartbeats stop). In a helper thread: closing waits for a
        session creation that may itself be hung, and nothing should wait on that."""
        threading.Thread(target=lambda: self.service.close(status), name="tinker-close", daemon=True).start()

    # -- training --------------------------------------------------------------------------
    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy") -> Call:
        return self._submit("forward_backward", lambda: self.client.forward_backward(data, loss_fn))

    def forward(self, data: list[types.Datum], loss_fn: str = "cross_entropy") -> Call:
        return self._submit("forward", lambda: self.client.forward(data, loss_fn))

    def optim_step(self, adam: types.AdamParams) -> Call:
        return self._submit("optim_step", lambda: self.client.optim_step(adam))

    # -- saving and loading ----------------------------------------------------------------
    def _record(self, name: str, **paths) -> str:
        """The run folder's `name/` holds the tinker:// path: the same layout as local runs."""
        write_json(self.root / name / INFO_FILE, {"backend": "tinker", "base_model": self.base_model,
                                                 "rank": self.rank, **paths})
        return next(iter(paths.values()))

    def save_state(self, name: str) -> Call:
        # overwrite: a retried save of the same checkpoint must not fail on its own first try.
        return self._submit("save_state", lambda: self.client.save_state(tinker_name(name), overwrite=True),
                            then=lambda r: self._record(name, state_path=r.path))

    def save_weights_for_sampler(self, name: str) -> Call:
        def done(response) -> str:
            self.sampler_path = response.path
            return self._record(name, sampler_path=response.path)
        return self._submit("save_weights_for_sampler",
                            lambda: self.client.save_weights_for_sampler(tinker_name(name)), then=done)

    def load_state(self, path: str | Path) -> None:
        """Continue from a saved state (weights and optimizer), as a new Tinker training run."""
        path = str(path)
        if not path.startswith("tinker://"):
            path = json.loads((Path(path) / INFO_FILE).read_text())["state_path"]
        self.client = self._create("create_training_client_from_state_with_optimizer",
                                   lambda: self.service.create_training_client_from_state_with_optimizer(path))

    # -- sampling --------------------------------------------------------------------------
    def sample(self, prompts: list[types.ModelInput], params: types.SamplingParams,
               lora: bool = True, progress=None) -> "Gather":
        """One completion per prompt from the saved LoRA weights (or the base model), all
        requests in flight together. The end-of-turn token is not included in the tokens. The
        service returns each answer whole, so there is no `progress` to report before then."""
        model_path = self.sampler_path if lora else None
        if lora and not model_path:
            raise PipelineError("no LoRA weights to sample from yet: save_weights_for_sampler first")
        client = self._create("create_sampling_client", lambda: self.service.create_sampling_client(
            model_path=model_path, base_model=None if model_path else self.base_model))
        return Gather([self._submit("sample", lambda p=p: client.sample(p, 1, params)) for p in prompts],
                      self.stop_tokens)


class Gather:
    """The answers of several sample calls, each under its own deadline."""

    def __init__(self, calls: list[Call], stop_tokens: list[int]):
        self.calls, self.stop_tokens = calls, stop_tokens

    def result(self) -> list[types.SampledSequence]:
        sequences = []
        for call in self.calls:
            seq = call.result().sequences[0]
            if seq.tokens and seq.tokens[-1] in self.stop_tokens:
                seq = types.SampledSequence(stop_reason=seq.stop_reason, sequence_id=seq.sequence_id,
                                            tokens_np=seq.tokens_np[:-1])
            sequences.append(seq)
        return sequences
