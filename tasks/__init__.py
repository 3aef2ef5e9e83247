"""Prefect tasks: thin wrappers over lora_pipeline that add names, retries, logging, artifacts.

Retries are configured here, in one place. Only failures that may pass on their own are
retried (timeouts, lost connections, 429, 5xx: lora_pipeline.engines.retryable); a bad key or a
bad request fails at once. LORA_PIPELINE_RETRIES and LORA_PIPELINE_RETRY_DELAY (seconds before
the first retry; doubled each time, with jitter) tune them, e.g. for tests.
"""

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
    """The Prefect global concurrency limit that trainings on `backend` take a slot of."""
    return f"lora-pipeline-{backend}-trainings"


def set_training_limits(tinker: int | None = None, local: int | None = None) -> None:
    """Makes the training limits exist: with the given sizes, or, for one not given, with its
    default (SweepSettings') unless it already exists. Sizes can be changed in the UI too."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from lora_pipeline.settings import SweepSettings

    defaults = SweepSettings()
    with get_client(sync_client=True) as client:
        for backend, size, default in (("tinker", tinker, defaults.tinker_sessions),
                                       ("local", local, defaults.local_trainings)):
            if size is None:
                try:
                    client.read_global_concurrency_limit_by_name(training_limit(backend))
                    continue
                except ObjectNotFound:
                    size = default
            client.upsert_global_concurrency_limit_by_name(training_limit(backend), size)


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
