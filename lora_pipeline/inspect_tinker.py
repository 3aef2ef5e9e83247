"""What the workflow's inspect_tinker_api.py showed: the SDK, its methods and, with a key,
what the service offers and the user's recent runs. Never prints the key."""

import os

import tinker

from .engines.tinker_engine import run_with_deadline
from .models import DEFAULT_TINKER_MODEL, SMOLLM2


def _public_methods(cls) -> str:
    return ", ".join(m for m in dir(cls) if not m.startswith("_") and callable(getattr(cls, m)))


def inspect(timeout: float = 30.0, runs: int = 5) -> list[str]:
    lines = [f"tinker SDK {tinker.__version__}"]
    for cls in (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient):
        lines.append(f"{cls.__name__}: {_public_methods(cls)}")
    base_url = os.environ.get("TINKER_BASE_URL") or os.environ.get("TINKER_API_BASE")
    lines.append(f"base URL: {base_url or 'the SDK default'}")
    lines.append(f"local engine: {SMOLLM2} (default for --backend local); tinker default: {DEFAULT_TINKER_MODEL}")
    if not os.environ.get("TINKER_API_KEY"):
        lines.append("TINKER_API_KEY is not set: server capabilities, models and runs not queried. "
                     "`export TINKER_API_KEY=...` to see them.")
        return lines
    lines.append("TINKER_API_KEY: set")
    service = tinker.ServiceClient(base_url=base_url) if base_url else tinker.ServiceClient()
    try:
        caps = run_with_deadline("get_server_capabilities", timeout, service.get_server_capabilities)
        models = [m.model_name for m in caps.supported_models]
        lines.append(f"server models ({len(models)}): {', '.join(models)}")
        rest = service.create_rest_client()
        listed = run_with_deadline("list_training_runs", timeout,
                                   lambda: rest.list_training_runs(limit=runs).result(timeout))
        lines.append(f"recent training runs ({len(listed.training_runs)}):")
        for run in listed.training_runs:
            lines.append(f"  {run.training_run_id}  {run.base_model}  rank {run.lora_rank}  "
                         f"last request {run.last_request_time:%Y-%m-%d %H:%M}")
            checkpoints = run_with_deadline("list_checkpoints", timeout, lambda r=run: rest.list_checkpoints(
                r.training_run_id).result(timeout)).checkpoints
            for c in checkpoints:
                lines.append(f"    {c.checkpoint_type}  {c.tinker_path}  {c.time:%Y-%m-%d %H:%M}")
    except Exception as e:  # inspect reports what it could not see, and goes on
        lines.append(f"server: could not query ({type(e).__name__}: {e})")
    return lines
