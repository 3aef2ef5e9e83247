"""Prefect tasks: thin wrappers over lora_pipeline that add names, retries, logging, artifacts.

Retries are configured here, in one place. Only failures that may pass on their own are
retried (timeouts, lost connections, 429, 5xx: lora_pipeline.engines.retryable); a bad key or a
bad request fails at once. LORA_PIPELINE_RETRIES and LORA_PIPELINE_RETRY_DELAY (seconds before
the first retry; doubled each time, with jitter) tune them, e.g. for tests.
"""

import contextlib
import functools
import hashlib
import os
from pathlib import Path

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy
from prefect.tasks import exponential_backoff

from lora_pipeline.data import file_sha256, folder_sha256

from lora_pipeline.engines import retryable
from lora_pipeline.engines.tinker_engine import take_sdk_retries

RETRIES = int(os.environ.get("LORA_PIPELINE_RETRIES", "3"))
_FIRST_DELAY = float(os.environ.get("LORA_PIPELINE_RETRY_DELAY", "10"))


def _retry_if_transient(task, task_run, state) -> bool:
    return retryable(state.result(raise_on_failure=False))


RETRY = dict(retries=RETRIES, retry_delay_seconds=exponential_backoff(backoff_factor=_FIRST_DELAY),
             retry_jitter_factor=0.5, retry_condition_fn=_retry_if_transient)


def training_limit(backend: str) -> str:
    """The Prefect global concurrency limit that a sweep's trainings on `backend` hold a slot of."""
    return f"lora-pipeline-{backend}-trainings"


def set_limit(name: str, size: int) -> None:
    """Creates the global concurrency limit `name`, or sets its size."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, size)


@contextlib.contextmanager
def slot_of(limit: str | None, wait_log_s: float = 60):
    """Holds a slot of the global concurrency limit `limit` (none: nothing to hold) for the
    duration, and says so while it waits for one, every `wait_log_s` seconds: a training that
    waits its turn is not silent. The slot's lease is renewed while held; if the process dies,
    the Prefect server takes it back when the lease expires."""
    if not limit:
        yield
        return
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    while True:
        entered = False
        try:
            with concurrency(limit, occupy=1, timeout_seconds=wait_log_s, strict=True):
                entered = True
                logger.info("holding a slot of %s", limit)
                yield
            return
        except TimeoutError:
            if entered:  # the work itself timed out, not the wait
                raise
            logger.info("waiting for a slot of %s: all in use", limit)


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


def cached_on_content(files):
    """A cache policy: the task's source, its parameters, and the content of the files or
    folders that `files(parameters)` names. (Prefect hashes a path parameter as its text, so
    an edited file would otherwise hit the old cache.) A path that does not exist, such as a hub
    dataset id, counts by its name alone."""
    def content_key(context, parameters) -> str:
        digest = hashlib.sha256()
        for name in files(parameters):
            path = Path(name) if name else None
            if path is None or not path.exists():
                continue
            digest.update(f"{path.name}:{folder_sha256(path) if path.is_dir() else file_sha256(path)}".encode())
        return digest.hexdigest()
    return TASK_SOURCE + INPUTS + CacheKeyFnPolicy(cache_key_fn=content_key)


def stored_in(task, output_dir: str):
    """`task` with its results and cache records in `output_dir`/.prefect-results, beside the
    run folders and the prepared data: workers that share the output folder (a mounted
    volume) share the cache too, and a run resumed elsewhere finds its finished stages."""
    return task.with_options(result_storage=Path(output_dir).resolve() / ".prefect-results")


def unless_gone(task, produced, *args):
    """`task(*args)`, run again with a refreshed cache if the files its result names are gone:
    a cached result outlives the files it describes when they are deleted, or when another
    checkout runs with the same relative paths."""
    result = task(*args)
    if not all(Path(p).exists() for p in produced(result)):
        get_run_logger().info("%s: cached result names missing files; running it again", task.name)
        result = task.with_options(refresh_cache=True)(*args)
    return result
