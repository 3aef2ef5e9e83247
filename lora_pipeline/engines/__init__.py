"""Training engines, shaped like Tinker's TrainingClient so the pipeline runs the same code on
both: `forward_backward`, `optim_step`, `forward`, `sample`, `save_state`, `load_state`,
`save_weights_for_sampler`. Calls return futures (`.result(timeout)`), as Tinker's do, so that
a step can submit `forward_backward` and `optim_step` before waiting on either.
"""

import os

from ..errors import PipelineError
from ..models import DEFAULT_TINKER_MODEL, SMOLLM2

BACKENDS = ("local", "tinker", "auto")


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


def make_engine(backend: str, base_model: str, rank: int, seed: int, root):
    if backend == "tinker":
        check_tinker_ready()
    from .local import LocalEngine

    return LocalEngine(base_model, rank, seed, root=root)


def check_tinker_ready() -> None:
    if not os.environ.get("TINKER_API_KEY"):
        raise PipelineError("Missing TINKER_API_KEY in environment: `export TINKER_API_KEY=...` "
                            "(and TINKER_BASE_URL or TINKER_API_BASE for a non-default service), "
                            "or train on this machine with --backend local")
    raise PipelineError("the tinker backend is not available in this version yet; "
                        "use --backend local")
