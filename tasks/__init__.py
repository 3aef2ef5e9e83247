"""Prefect tasks: thin wrappers over lora_pipeline that add names, retries, logging, artifacts.

Retries are configured here, in one place. Only failures that may pass on their own are
retried (timeouts, lost connections, 429, 5xx: lora_pipeline.engines.retryable); a bad key or a
bad request fails at once. LORA_PIPELINE_RETRIES and LORA_PIPELINE_RETRY_DELAY (seconds before
the first retry; doubled each time, with jitter) tune them, e.g. for tests.
"""

import functools
import os

from prefect import get_run_logger
from prefect.tasks import exponential_backoff

from lora_pipeline.engines import retryable
from lora_pipeline.engines.tinker_engine import take_sdk_retries

RETRIES = int(os.environ.get("LORA_PIPELINE_RETRIES", "3"))
_FIRST_DELAY = float(os.environ.get("LORA_PIPELINE_RETRY_DELAY", "10"))


def _retry_if_transient(task, task_run, state) -> bool:
    return retryable(state.result(raise_on_failure=False))


RETRY = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=_FIRST_DELAY),
             retry_jitter_factor=0.5, retry_condition_fn=_retry_if_transient)


def sdk_retries_logged(fn):
    """Logs the retries the Tinker SDK made by itself during `fn` (it does not say)."""
    @functools.wraps(fn)
    def logged(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            retries = take_sdk_retries()
            if retries:
                get_run_logger().warning("Tinker SDK retried on its own %d time(s): %s",
                                         len(retries), "; ".join(retries))
    return logged
