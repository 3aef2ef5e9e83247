"""What the workflow's inspect_tinker_api.py showed: the SDK, its methods, and (with a key)
what the service offers. Never prints the key."""

import os
import threading

import tinker

from .models import DEFAULT_TINKER_MODEL, SMOLLM2


def _public_methods(cls) -> str:
    return ", ".join(m for m in dir(cls) if not m.startswith("_") and callable(getattr(cls, m)))


def _with_deadline(fn, seconds: float):
    """fn() or an exception; the SDK can block for minutes on an unreachable server."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except Exception as e:  # reported to the user, not swallowed
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def inspect(timeout: float = 30.0) -> list[str]:
    lines = [f"tinker SDK {tinker.__version__}"]
    for cls in (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient):
        lines.append(f"{cls.__name__}: {_public_methods(cls)}")
    base_url = os.environ.get("TINKER_BASE_URL") or os.environ.get("TINKER_API_BASE")
    lines.append(f"base URL: {base_url or 'the SDK default'}")
    lines.append(f"local engine: {SMOLLM2} (default for --backend local); tinker default: {DEFAULT_TINKER_MODEL}")
    if not os.environ.get("TINKER_API_KEY"):
        lines.append("TINKER_API_KEY is not set: server capabilities and models not queried. "
                     "`export TINKER_API_KEY=...` to see them.")
        return lines
    lines.append("TINKER_API_KEY: set")
    try:
        client = tinker.ServiceClient(base_url=base_url) if base_url else tinker.ServiceClient()
        caps = _with_deadline(client.get_server_capabilities, timeout)
        models = [m.model_name for m in caps.supported_models]
        lines.append(f"server models ({len(models)}): {', '.join(models)}")
    except Exception as e:
        lines.append(f"server: could not query ({type(e).__name__}: {e})")
    return lines
