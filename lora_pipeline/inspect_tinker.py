"""What the workflow's inspect_tinker_api.py showed: the SDK, its methods and, with a key,
what the service offers and the user's recent runs. Never prints the key."""

import os

import tinker

from .engines.tinker_engine import run_with_deadline
from .errors import PipelineError
from .models import DEFAULT_TINKER_MODEL, SMOLLM2


def _public_methods(cls) -> str:
    return ", ".join(m for m in dir(cls) if not m.startswith("_") and callable(getattr(cls, m)))


def inspect(timeout: float = 30.0, runs: int = 5):
    """The lines to show, as they are learnt: a service that cannot be queried is an error
    (PipelineError) after what could be seen."""
    yield f"tinker SDK {tinker.__version__}"
    for cls in (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient):
        yield f"{cls.__name__}: {_public_methods(cls)}"
    base_url = os.environ.get("TINKER_BASE_URL") or os.environ.get("TINKER_API_BASE")
    yield f"base URL: {base_url or 'the SDK default'}"
    yield f"local engine: {SMOLLM2} (default for --backend local); tinker default: {DEFAULT_TINKER_MODEL}"
    if not os.environ.get("TINKER_API_KEY"):
        yield ("TINKER_API_KEY is not set: server capabilities, models and runs not queried. "
               "`export TINKER_API_KEY=...` to see them.")
        return
    yield "TINKER_API_KEY: set"
    try:
        # Every call under the deadline, the session a RestClient opens on creation included.
        rest = run_with_deadline("the session request", timeout, lambda: tinker.RestClient(base_url=base_url))
        caps = run_with_deadline("get_server_capabilities", timeout,
                                 lambda: rest.get_server_capabilities().result(timeout))
        models = [m.model_name for m in caps.supported_models]
        yield f"server models ({len(models)}): {', '.join(models)}"
        listed = run_with_deadline("list_training_runs", timeout,
                                   lambda: rest.list_training_runs(limit=runs).result(timeout))
        yield f"recent training runs ({len(listed.training_runs)}):"
        for run in listed.training_runs:
            yield (f"  {run.training_run_id}  {run.base_model}  rank {run.lora_rank}  "
                   f"last request {run.last_request_time:%Y-%m-%d %H:%M}")
            checkpoints = run_with_deadline("list_checkpoints", timeout, lambda r=run: rest.list_checkpoints(
                r.training_run_id).result(timeout)).checkpoints
            for c in checkpoints:
                yield f"    {c.checkpoint_type}  {c.tinker_path}  {c.time:%Y-%m-%d %H:%M}"
    except Exception as e:  # what it saw is shown; the command then fails with what it could not see
        raise PipelineError(f"the Tinker service at {base_url or 'the SDK default'} could not be queried "
                            f"({type(e).__name__}: {e}); check the network, TINKER_BASE_URL and the key") from None
