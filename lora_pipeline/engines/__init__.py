"""Training engines, shaped like Tinker's TrainingClient so the pipeline runs the same code on
both: `forward_backward`, `optim_step`, `forward`, `sample`, `save_state`, `load_state`,
`save_weights_for_sampler`. Calls return futures (`.result()`), as Tinker's do, so that a step
can submit `forward_backward` and `optim_step` before waiting on either.
"""

import os

from ..errors import PipelineError
from ..models import DEFAULT_TINKER_MODEL, SMOLLM2

BACKENDS = ("local", "tinker", "auto")
# Saved beside every adapter, state or checkpoint record: backend, base model, rank (and the
# tinker:// paths for Tinker runs).
INFO_FILE = "lora_pipeline.json"


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


def check_base_model(backend: str, base_model: str) -> None:
    """Fail before any work when the engine cannot start."""
    if backend == "tinker":
        check_tinker_ready()
    else:
        from ..models import check_local_model

        check_local_model(base_model)


def make_engine(backend: str, base_model: str, rank: int, seed: int, root, request_timeout: float,
                device: str = "auto"):
    """`device` ("auto", "cpu", "cuda") places the local engine; Tinker ignores it."""
    if backend == "tinker":
        check_tinker_ready()
        from .tinker_engine import TinkerEngine

        return TinkerEngine(base_model, rank, seed, root, request_timeout)
    from .local import LocalEngine

    return LocalEngine(base_model, rank, seed, root=root, device=device)


def check_tinker_ready() -> None:
    if not os.environ.get("TINKER_API_KEY"):
        raise PipelineError("Missing TINKER_API_KEY in environment: `export TINKER_API_KEY=...` "
                            "(and TINKER_BASE_URL or TINKER_API_BASE for a non-default service), "
                            "or train on this machine with --backend local")


def open_sampler(info: dict, base_model: str, seed: int, request_timeout: float, device: str = "auto"):
    """An engine to answer prompts with saved LoRA weights (`info` is the lora_pipeline.json
    saved beside them) and with their base model."""
    if info["backend"] == "tinker":
        check_tinker_ready()
        from .tinker_engine import TinkerEngine

        return TinkerEngine(base_model, info["rank"], seed, None, request_timeout,
                            sampler_path=info["sampler_path"])
    from .local import LocalEngine

    return LocalEngine(base_model, info["rank"], seed, adapter=info["folder"], device=device)
