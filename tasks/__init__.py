"""Prefect tasks: thin wrappers over lora_pipeline that add names, retries, logging, artifacts.

Retries are configured here, in one place. Only failures that may pass on their own are
retried (timeouts, lost connections, 429, 5xx: lora_pipeline.engines.retryable); a bad key or a
bad request fails at once. LORA_PIPELINE_RETRIES and LORA_PIPELINE_RETRY_DELAY (seconds before
the first retry; doubled each time, with jitter) tune them, e.g. for tests.
"""

import os

from prefect.tasks import exponential_backoff

from lora_pipeline.engines import retryable

RETRIES = int(os.environ.get("LORA_PIPELINE_RETRIES", "3"))
_FIRST_DELAY = float(os.environ.get("LORA_PIPELINE_RETRY_DELAY", "10"))


def _retry_if_transient(task, task_run, state) -> bool:
    return retryable(state.result(raise_on_failure=False))


RETRY = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=_FIRST_DELAY),
             retry_jitter_factor=0.5, retry_condition_fn=_retry_if_transient)
