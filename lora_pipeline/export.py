"""Weights out of Tinker as PEFT adapter folders (adapter_config.json + adapter_model.safetensors).

Tinker SDK 0.38 has one download route: `TrainingClient.save_weights_external(name)` writes the
weights in an external (Hugging Face PEFT) format as `tinker://<run>/external_weights/<name>`,
and `RestClient.get_external_weights_urls(path)` signs one URL per file, fetched with plain
HTTP GETs. There is no route for sampler weights (the checkpoint-archive route that
tinker-cookbook 0.5.8 calls is gone), and only a training client can save external weights. So
a state (`tinker://<run>/weights/<name>`) is exported by loading it into a new training client,
saving it as external weights (expiring in an hour), downloading the files and deleting that
export. A folder that holds only a sampler path (`final_lora_weights/`) is exported from the
state its run saved at the same step.

Every remote call and every file download has its own deadline, `timeout` seconds. Sizes are
checked three ways: each file against its Content-Length, the total against the size Tinker lists
for the export, and the safetensors file against its own header. Nothing is written to
`output_dir` until every file is in and checked: files go to a temporary folder beside it, which
then replaces it, holding the adapter and a lora_pipeline.json that keeps the tinker:// paths.
"""

import json
import logging
import shutil
import struct
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path, PurePosixPath

import httpx
import tinker
from tinker.lib.base_url import resolve_base_url

from .data import read_json, replace_dir, umask_mode, write_json
from .engines import INFO_FILE, EngineTimeout, check_tinker_ready
from .engines.tinker_engine import Call, run_with_deadline, service_url
from .errors import PipelineError
from .run_folder import RunFolder

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The temporary export of a state outlives a failed delete by at most this long.
EXPORT_TTL_S = 3600


class DownloadError(PipelineError, ConnectionError):
    """A download that failed on the way (cut short, refused, connection lost). A new export
    signs new URLs, so it may pass on a retry: it is a ConnectionError for the retry logic."""


def export(source: str | Path, output_dir: str | Path, timeout: float = 120.0) -> Path:
    """Write the PEFT adapter of `source` to `output_dir` and return `output_dir`.

    `source` is a run folder (its final_lora_weights), a checkpoint folder holding
    lora_pipeline.json (final_lora_weights/, checkpoint_step_N/, training_state/), or a
    tinker:// path of a state or of external weights. `output_dir` may be the source folder
    itself: the adapter then joins its lora_pipeline.json and its other files. Any other existing
    `output_dir` is replaced only if it is empty or an earlier export. A local-engine folder is
    already an adapter: it is copied.
    """
    output_dir = Path(output_dir)
    info, tinker_path, folder = _source_info(source)
    in_place = folder is not None and output_dir.exists() and output_dir.resolve() == folder.resolve()
    if in_place and info["backend"] == "local":
        return output_dir
    _check_output(output_dir, in_place)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".tmp-export-{output_dir.name}-"))
    try:
        staging.chmod(umask_mode(0o777))  # mkdtemp's folder is private; an adapter folder is not
        if info["backend"] == "local":
            _copy_adapter(folder, staging)
        else:
            check_tinker_ready()
            info = _Exporter(timeout).download(info, tinker_path, staging)
        write_json(staging / INFO_FILE, info)
        if in_place:  # the folder's other files stay; the adapter's are the new ones
            for item in folder.iterdir():
                if not (staging / item.name).exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        replace_dir(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def export_run_weights(run_dir: str | Path, timeout: float = 120.0) -> list[Path]:
    """After a Tinker run: put the PEFT adapter into final_lora_weights/ and into the folder of
    the best checkpoint (best_lora_weights.json), beside their lora_pipeline.json. Returns the
    folders written. A local run's folders are adapters already: nothing is done."""
    run_dir = Path(run_dir)
    if read_json(run_dir / "config.json", {}).get("backend") != "tinker":
        return []
    names = ["final_lora_weights"]
    best = read_json(run_dir / "best_lora_weights.json", None)
    if best and best["name"] not in names:
        names.append(best["name"])
    return [export(run_dir / name, run_dir / name, timeout) for name in names]


def _source_info(source: str | Path) -> tuple[dict, str | None, Path | None]:
    """What `source` names: its lora_pipeline.json record, the tinker:// path to export (a state
    or external weights; None for a local adapter) and its folder, if it is one."""
    text = str(source)
    if text.startswith("tinker://"):
        return {"backend": "tinker", f"{_path_kind(text)}_path": text}, text, None
    folder = Path(source)
    if not (folder / INFO_FILE).exists() and (folder / "checkpoints.jsonl").exists():
        folder = folder / "final_lora_weights"  # a run folder: its final weights
    if not (folder / INFO_FILE).exists():
        raise PipelineError(f"{source}: not a run folder (checkpoints.jsonl) nor a checkpoint folder "
                            f"({INFO_FILE}); give one of those or a tinker:// path")
    info = json.loads((folder / INFO_FILE).read_text())
    if info.get("backend") != "tinker":
        return info, None, folder
    path = info.get("external_path") or info.get("state_path") or _state_at_sampler_step(folder, info)
    return info, path, folder


def _path_kind(path: str) -> str:
    try:
        kind = tinker.ParsedCheckpointTinkerPath.from_tinker_path(path).checkpoint_type
    except ValueError:
        raise PipelineError(f"{path}: not a Tinker checkpoint path (tinker://<run>/weights/<name>, "
                            "tinker://<run>/external_weights/<name>)") from None
    if kind == "sampler":
        raise PipelineError(f"{path}: Tinker's SDK (0.38) cannot download sampler weights; export "
                            "the state saved with them (tinker://<run>/weights/<name>) or the run folder")
    return "state" if kind == "training" else "external"


def _state_at_sampler_step(folder: Path, info: dict) -> str:
    """The state its run saved at the same step as the sampler weights of `folder`: the same
    weights, in a form Tinker can export."""
    entries = RunFolder(folder.parent).registry()
    step = next((e.step for e in reversed(entries)
                 if e.name == folder.name and e.sampler_path == info.get("sampler_path")), None)
    state = next((e.state_path for e in reversed(entries) if e.step == step and e.state_path), None)
    if step is None or state is None:
        raise PipelineError(
            f"{folder}: holds only sampler weights ({info.get('sampler_path')}), which Tinker's SDK (0.38) "
            f"cannot download, and {folder.parent / 'checkpoints.jsonl'} records no state saved at the "
            "same step; export a state path (tinker://<run>/weights/<name>) instead")
    return state


def _check_output(output_dir: Path, in_place: bool) -> None:
    """Replace only what is ours: the source folder, an earlier export or an empty folder."""
    if not output_dir.exists() or in_place:
        return
    earlier = read_json(output_dir / INFO_FILE, {}) if output_dir.is_dir() else {}
    if not output_dir.is_dir() or not ("exported_from" in earlier or not any(output_dir.iterdir())):
        raise PipelineError(f"--output {output_dir}: exists and is not an earlier export; "
                            "give a new folder (it is created) or remove that one")


def _copy_adapter(folder: Path, staging: Path) -> None:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).exists():
            raise PipelineError(f"{folder}: no {name}; it is not a complete adapter")
        shutil.copyfile(folder / name, staging / name)


class _Exporter:
    """One export's Tinker session and calls, each under the deadline."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        # The key comes from TINKER_API_KEY, read by the SDK.
        self.service = tinker.ServiceClient(base_url=service_url())
        # Making a RestClient opens a session and waits for it without a deadline: an
        # unreachable service held the export for minutes. So the service is asked first, within
        # the deadline (any answer will do). The RestClient is then made in this thread: made in
        # a helper thread beside a training's open session, it sometimes never returned.
        url = resolve_base_url(service_url())
        try:
            httpx.get(url, timeout=timeout)
        except httpx.HTTPError:
            raise EngineTimeout(f"the session request to {url}", timeout) from None
        self.rest = tinker.RestClient(base_url=service_url())

    def _create(self, op: str, make):
        """Client creation blocks the calling thread (session set-up): it gets a helper thread."""
        try:
            return run_with_deadline(op, self.timeout, lambda: make().result(timeout=self.timeout))
        except EngineTimeout:
            raise
        except TimeoutError as e:  # the SDK's own wait ran out first
            raise EngineTimeout(op, self.timeout) from e

    def _call(self, op: str, submit):
        started = time.monotonic()
        return Call(op, run_with_deadline(op, self.timeout, submit), started, self.timeout).result()

    def download(self, info: dict, source: str, staging: Path) -> dict:
        """Fetch the adapter of tinker:// path `source` into `staging`; returns `info` with the
        base model, rank and what was fetched."""
        status = "errored"
        try:
            if info.get("base_model") is None or info.get("rank") is None:
                weights = self._call("get_weights_info", lambda: self.rest.get_weights_info_by_tinker_path(source))
                info = {"base_model": weights.base_model, "rank": weights.lora_rank, **info}
            if "/external_weights/" in source:
                files = self._fetch(source, staging)
            else:
                files = self._fetch_state(source, staging)
            _check_adapter(staging, info, source)
            status = "success"
        except EngineTimeout as e:
            raise EngineTimeout(e.op, e.seconds, f"the export of {source}") from None
        finally:
            # Closing waits for calls that may be hung: not on this thread.
            threading.Thread(target=lambda: self.service.close(status), name="tinker-close", daemon=True).start()
        return {**info, "exported_from": source, "exported_at": datetime.now().isoformat(timespec="seconds"),
                "files": files}

    def _fetch_state(self, state_path: str, staging: Path) -> dict[str, int]:
        client = self._create("create_training_client_from_state", lambda: self.service.create_training_client_from_state(
            state_path, user_metadata={"created_by": "lora_pipeline.export"}))
        name = f"export-{uuid.uuid4().hex[:12]}"
        external = self._call("save_weights_external",
                              lambda: client.save_weights_external(name, ttl_seconds=EXPORT_TTL_S)).path
        try:
            return self._fetch(external, staging)
        finally:
            try:
                self._call("delete_checkpoint", lambda: self.rest.delete_checkpoint_from_tinker_path(external))
            except Exception as e:  # the export expires on its own
                log.warning("could not delete the temporary export %s (%s); it expires within %d s",
                            external, e, EXPORT_TTL_S)

    def _fetch(self, external_path: str, staging: Path) -> dict[str, int]:
        urls = self._call("get_external_weights_urls", lambda: self.rest.get_external_weights_urls(external_path)).urls
        run_id = tinker.ParsedCheckpointTinkerPath.from_tinker_path(external_path).training_run_id
        listed = self._call("list_checkpoints", lambda: self.rest.list_checkpoints(run_id)).checkpoints
        expected = next((c.size_bytes for c in listed if c.tinker_path == external_path), None)
        targets = {name: _safe_destination(staging, name, external_path) for name in urls}
        if len(set(targets.values())) != len(targets):
            raise PipelineError(f"{external_path}: two file names lead to one file ({sorted(targets)}); refused")
        for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if required not in targets:
                raise PipelineError(f"{external_path}: has no {required} (files: {sorted(targets)}); it is "
                                    "not a PEFT adapter")
        sizes = {}
        for name, dest in targets.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            sizes[name] = run_with_deadline(f"the download of {name}", self.timeout,
                                            lambda url=urls[name], dest=dest, name=name: _get(url, dest, name, self.timeout))
        if expected is not None and sum(sizes.values()) != expected:
            raise DownloadError(f"{external_path}: downloaded {sum(sizes.values())} bytes, Tinker lists "
                                f"{expected}; export again")
        return sizes


def _safe_destination(staging: Path, name: str, where: str) -> Path:
    """Where file `name` goes: inside `staging`, whatever the name says."""
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or PurePosixPath(name).is_absolute() or any(p in ("..", ".") for p in parts):
        raise PipelineError(f"{where}: unsafe file name {name!r} (absolute, or leaving the folder); refused")
    if name.endswith(".age"):
        raise PipelineError(f"{where}: {name} is age-encrypted; decrypt it with `age -d` before use")
    dest = staging.joinpath(*parts)
    if not dest.resolve().is_relative_to(staging.resolve()):
        raise PipelineError(f"{where}: unsafe file name {name!r}; refused")
    return dest


def _get(url: str, dest: Path, name: str, timeout: float) -> int:
    """Stream `url` into `dest`; the bytes written, equal to the Content-Length."""
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise DownloadError(f"the download of {name} was refused (HTTP {response.status_code}); "
                                    "the signed URL may have expired: export again")
            declared = response.headers.get("content-length")
            if declared is None:
                raise DownloadError(f"the download of {name} has no Content-Length: its size cannot be checked")
            written = 0
            with open(dest, "xb") as f:  # x: never through a file or link already there
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
                    written += len(chunk)
    except httpx.TimeoutException:
        raise EngineTimeout(f"the download of {name}", timeout) from None
    except httpx.RemoteProtocolError as e:  # the connection closed before Content-Length bytes came
        raise DownloadError(f"the download of {name} was cut short ({e}); export again") from e
    except httpx.HTTPError as e:
        raise DownloadError(f"the download of {name} failed ({type(e).__name__}: {e}); export again") from e
    if written != int(declared):
        raise DownloadError(f"the download of {name} was cut short: {written} of {declared} bytes; export again")
    return written


def _check_adapter(folder: Path, info: dict, source: str) -> None:
    """A PEFT LoRA config and a safetensors file whose size is what its header says."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise PipelineError(f"{source}: {ADAPTER_CONFIG} is not JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise PipelineError(f"{source}: {ADAPTER_CONFIG} is not a PEFT LoRA config; convert the files with "
                            "tinker_cookbook.weights.build_lora_adapter")
    if info.get("rank") is not None and config.get("r") != info["rank"]:
        raise PipelineError(f"{source}: the adapter's rank is {config.get('r')}, the run's {info['rank']}")
    weights = folder / ADAPTER_WEIGHTS
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        try:
            header = json.loads(f.read(header_len)) if header_len and header_len < size else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise PipelineError(f"{source}: {ADAPTER_WEIGHTS} is not a safetensors file")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise DownloadError(f"{source}: {ADAPTER_WEIGHTS} is {size} bytes, its header says "
                            f"{8 + header_len + end}; export again")
