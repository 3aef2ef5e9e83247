"""Training engines, shaped like Tinker's TrainingClient so the pipeline runs the same code on
both: `forward_backward`, `optim_step`, `forward`, `sample`, `save_state`, `load_state`,
`save_weights_for_sampler`. Calls return futures (`.result()`), as Tinker's do, so that a step
can submit `forward_backward` and `optim_step` before waiting on either. `Engine` states the
contract; `make_engine` is the one place that picks and builds an engine.
"""

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tinker import types

from ..errors import PipelineError
from ..models import DEFAULT_TINKER_MODEL, SMOLLM2
from ..run_folder import INFO_FILE
from ..settings import BACKENDS

__all__ = ["INFO_FILE", "Engine", "EngineTimeout", "make_engine", "resolve_engine", "retryable"]


class Result(Protocol):
    def result(self) -> Any: ...


@runtime_checkable
class Engine(Protocol):
    """What the training loop and the evaluation need of an engine. Every call that computes
    returns a `Result` at once; `.result()` waits for it (and raises its failure)."""

    remote: bool  # calls queue on a service: the loop submits the next step before awaiting
    tokenizer: Any
    renderer: Any  # turns chat messages into tokens and loss weights (lora_pipeline.render)
    stop_tokens: list[int]
    context_length: int | None  # tokens a prompt and its answer may take together, where known

    def forward_backward(self, data: list[types.Datum], loss_fn: str = "cross_entropy") -> Result:
        """Adds the gradient of the summed weighted token NLL to the accumulated gradients;
        the result is a ForwardBackwardOutput with metrics["loss:sum"]."""

    def forward(self, data: list[types.Datum], loss_fn: str = "cross_entropy") -> Result:
        """The same loss and log-probs, without gradients."""

    def optim_step(self, adam: types.AdamParams) -> Result:
        """One AdamW step on the accumulated gradients, which it then clears."""

    def save_state(self, name: str) -> Result:
        """Weights and optimizer state, for resuming; the result is its path."""

    def load_state(self, path: str) -> None:
        """Restore what `save_state` saved; any unfinished step's gradients are discarded."""

    def save_weights_for_sampler(self, name: str) -> Result:
        """The adapter for inference; the result is its path."""

    def sample(self, prompts: list[types.ModelInput], params: types.SamplingParams,
               lora: bool = True, progress=None) -> Result:
        """One completion per prompt, from the LoRA or its base: a list of SampledSequence.
        `progress(done, tokens, positions)` is called while the answers are generated, by an
        engine that can see them coming (the local one)."""

    def close(self, status: str = "success") -> None:
        """Release the session, if any."""


class EngineTimeout(PipelineError, TimeoutError):
    """An engine call that did not finish within its deadline; `where` is, say, "step 12"."""

    def __init__(self, op: str, seconds: float, where: str | None = None):
        self.op, self.seconds, self.where = op, seconds, where
        at = f" for {where}" if where else ""
        super().__init__(f"Tinker did not answer {op}{at} within {seconds:g} s")

    def __reduce__(self):  # Prefect pickles a failed task's exception
        return EngineTimeout, (self.op, self.seconds, self.where)


def retryable(e: BaseException) -> bool:
    """Failures that may pass on their own: timeouts, lost connections, rate limits, server
    errors. Authentication, bad requests and unknown models are final."""
    import tinker

    if isinstance(e, (TimeoutError, ConnectionError, tinker.APIConnectionError)):
        return True
    if isinstance(e, tinker.APIStatusError):
        return e.status_code in (408, 409, 429) or e.status_code >= 500
    if isinstance(e, tinker.RequestFailedError):
        return str(e.category).lower() == "server"
    return False


def choose_backend(backend: str) -> str:
    """`auto` means tinker when a Tinker API key is set, else local."""
    if backend not in BACKENDS:
        raise PipelineError(f"--backend {backend!r}: unknown backend; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "tinker" if os.environ.get("TINKER_API_KEY") else "local"
    return backend


def default_base_model(backend: str) -> str:
    return DEFAULT_TINKER_MODEL if backend == "tinker" else SMOLLM2


def resolve_engine(backend: str, base_model: str | None) -> tuple[str, str]:
    """The backend and base model a run will use, checked: a run whose engine cannot start
    fails before any work."""
    backend = choose_backend(backend)
    base_model = base_model or default_base_model(backend)
    check_base_model(backend, base_model)
    return backend, base_model


def check_base_model(backend: str, base_model: str) -> None:
    """Fail before any work when the engine cannot start."""
    if backend == "tinker":
        check_tinker_ready()
        from ..models import load_tokenizer

        load_tokenizer(base_model)  # from the hub: said at once when it cannot be reached
    else:
        from ..models import check_local_model

        check_local_model(base_model)


def check_tinker_ready() -> None:
    if not os.environ.get("TINKER_API_KEY"):
        raise PipelineError("Missing TINKER_API_KEY in environment: `export TINKER_API_KEY=...` "
                            "(and TINKER_BASE_URL or TINKER_API_BASE for a non-default service), "
                            "or train on this machine with --backend local")


def make_engine(backend: str, base_model: str, *, rank: int, seed: int, request_timeout: float,
                root: str | Path | None = None, weights: dict | None = None, device: str = "auto",
                dtype: str = "auto", init_from: str | None = None) -> Engine:
    """The engine of `backend`: a fresh LoRA of `rank` whose saves go under `root` (or one
    starting from the saved weights `init_from`, a PEFT adapter folder locally, a tinker://
    state path on Tinker, with a fresh optimizer), or, given `weights` (the lora_pipeline.json
    info saved beside an adapter), one that samples from those saved weights and from their
    base. `device` and `dtype` place the local engine (settings.Placement); Tinker's runs on
    the service."""
    if backend == "tinker":
        check_tinker_ready()
        from .tinker_engine import TinkerEngine

        return TinkerEngine(base_model, rank, seed, root, request_timeout,
                            sampler_path=weights["sampler_path"] if weights else None, init_from=init_from)
    from .local import LocalEngine

    return LocalEngine(base_model, rank, seed, root=root, adapter=weights["folder"] if weights else init_from,
                       device=device, dtype=dtype)
