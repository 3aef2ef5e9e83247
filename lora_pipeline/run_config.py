"""What identifies a training run: its settings, the hashes of its data, the backend and base
model they resolve to, and the run folder named after all of it. Whether an existing folder may
be continued, and whether it holds this very run finished, are decided here; the stepping is
in train.py."""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from .data import check_input_file, file_sha256, folder_sha256, held_out_beside, read_chat_jsonl, slug
from .engines import check_base_model, choose_backend, default_base_model
from .errors import PipelineError
from .models import check_rank, resolve_device
from .registry import Registry
from .run_folder import FINAL, FORMAT, INFO_FILE, STATE, RunFolder, RunSummary
from .settings import TrainSettings, resume_keys

# What must match for a run folder to be continued: the data, the held-out data (its losses are
# compared across the run: two held-out sets in one validation log would compare nothing) and
# the settings that shape the steps (marked in settings.py). Where checkpoints go, how often,
# and timeouts may change.
RESUME_KEYS = ("data_sha256", "val_data_sha256", "init_from_sha256", *resume_keys(TrainSettings))
# How a changed key is named to the user, where its name alone would not say.
KEY_NAMES = {"data_sha256": "the content of --data", "val_data_sha256": "the held-out data (--val-data)",
             "init_from_sha256": "the weights of --init-from"}


def initial_weights(init_from: str | None, output_dir: str, backend: str, rank: int) -> tuple:
    """What `--init-from` names, as the engine loads it (a PEFT adapter folder locally, a
    tinker:// state path on Tinker), and what identifies its content; (None, None) for a fresh
    LoRA, and for `champion` while the output folder has none."""
    if not init_from:
        return None, None
    if init_from == "champion":
        champion = Registry(output_dir).champion()
        if not champion:
            return None, None
        init_from = champion["run_dir"]
    if init_from.startswith("tinker://"):
        if backend != "tinker":
            raise PipelineError(f"--init-from {init_from}: a Tinker state trains on --backend tinker; to train "
                                "locally, export it (lora-pipeline export) and give the folder")
        return init_from, init_from
    source = Path(init_from)
    run = RunFolder(source)
    config = run.read_config() if (source / "config.json").is_file() else None
    if backend == "tinker":
        state = json.loads((source / STATE / INFO_FILE).read_text()).get("state_path") \
            if (source / STATE / INFO_FILE).is_file() else None
        if not (state or "").startswith("tinker://"):
            raise PipelineError(f"--init-from {init_from}: not a finished Tinker run folder (no tinker:// "
                                f"{STATE}); give a Tinker run folder or a tinker:// state path")
        return state, state
    adapter = source / FINAL if config else source
    if not (adapter / "adapter_config.json").is_file():
        raise PipelineError(f"--init-from {init_from}: neither a finished run folder nor a PEFT adapter folder "
                            "(no adapter_config.json)")
    held = json.loads((adapter / "adapter_config.json").read_text()).get("r")
    if held != rank:
        raise PipelineError(f"--init-from {init_from}: a rank-{held} adapter; pass --rank {held}")
    return str(adapter.resolve()), folder_sha256(adapter)


def run_folder_name(values: dict) -> str:
    """lora_<model>_<key>: the key is eight hex digits of what the run's steps depend on
    (RESUME_KEYS: the data's hash and the settings), so the same command, or the same
    deployment run, finds its own earlier run folder again and continues it."""
    # --init-from counts only when given: the folders of runs made before it existed keep their names.
    keyed = [values[k] for k in RESUME_KEYS if not (k == "init_from_sha256" and values[k] is None)]
    key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:8]
    return f"lora_{slug(values['base_model'])}_{key}"


class RunConfig:
    """A training run's identity. Making one checks the settings and resolves the backend and
    base model; the data is read and hashed when `values` is first asked for."""

    def __init__(self, settings: TrainSettings):
        settings.check()
        self.settings = settings
        self.backend = choose_backend(settings.backend)
        self.base_model = settings.base_model or default_base_model(self.backend)

    @functools.cached_property
    def values(self) -> dict:
        """What config.json records: every setting (less start_over), the data's hash and what
        was resolved (backend, base model, held-out file, run folder)."""
        s = self.settings
        if not Path(s.data).exists():
            read_chat_jsonl(Path(s.data))  # says what is wrong and what to do
        check_input_file(s.data, "--data", empty_ok=True)  # before it is hashed: /dev/zero never ends
        val_data = s.val_data or held_out_beside(s.data)
        if val_data:
            check_input_file(val_data, "--val-data", empty_ok=True)
        # Paths absolute: the command that continues a run works from any folder.
        values = {**dataclasses.asdict(s), "format": FORMAT, "data": os.path.abspath(s.data),
                  "data_sha256": file_sha256(Path(s.data)), "val_data": val_data and os.path.abspath(val_data),
                  "val_data_sha256": val_data and file_sha256(Path(val_data)),
                  "backend_requested": s.backend, "backend": self.backend, "base_model": self.base_model}
        values["init_weights"], values["init_from_sha256"] = initial_weights(s.init_from, s.output_dir,
                                                                            self.backend, s.rank)
        if val_data and values["val_data_sha256"] == values["data_sha256"]:
            raise PipelineError(f"--val-data {val_data}: holds the same conversations as --data {s.data}; a held-out "
                                "loss on training data would say nothing of generalising. Give held-out data "
                                "(prepare splits it off with --val-fraction)")
        del values["start_over"]
        # Absolute, but links not followed: a run folder that is a link is refused, not written through.
        values["run_dir"] = os.path.abspath(Path(s.output_dir) / (s.run_name or run_folder_name(values)))
        return values

    @functools.cached_property
    def folder(self) -> RunFolder:
        return RunFolder(self.values["run_dir"])

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    def read_inputs(self) -> tuple[list, list]:
        """Reads the training and held-out data and checks that the engine can start; returns
        the training and held-out conversations."""
        conversations = read_chat_jsonl(Path(self.settings.data))
        val_data = self.values["val_data"]
        val_conversations = read_chat_jsonl(Path(val_data), "--val-data") if val_data else []
        check_base_model(self.backend, self.base_model)
        if self.backend == "local":
            check_rank(self.base_model, self.settings.rank)
            resolve_device(self.settings.device)  # --device cuda without a GPU fails here
        return conversations, val_conversations

    def may_continue(self) -> bool:
        """True when the run folder exists and may be continued; refuses one that may not.
        --start-over replaces only a folder that lora-pipeline made: one whose config.json says
        its format, never a symbolic link, never anything else."""
        run_dir, other = self.run_dir, "choose another --run-name or --output-dir"
        if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
            raise PipelineError(f"{run_dir} is a symbolic link or a file, not a run folder; {other}")
        if not run_dir.exists():
            return False
        try:
            old = self.folder.read_config()
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or "format" not in old:
            raise PipelineError(f"{run_dir} exists but holds no lora-pipeline config.json, so it is not a "
                                f"run folder to continue or replace; {other}")
        if self.settings.start_over:
            shutil.rmtree(run_dir)
            return False
        again = f"Pass --start-over to replace it, or {other}."
        if old.get("format") != FORMAT:
            raise PipelineError(f"{run_dir} was made by another version of lora-pipeline (format "
                                f"{old.get('format', 'none')}, this one writes {FORMAT}) and cannot be "
                                f"continued. {again}")
        changed = [f"{KEY_NAMES[k]} changed" if k in KEY_NAMES else f"{k} {old.get(k)!r} -> {self.values[k]!r}"
                   for k in RESUME_KEYS if old.get(k) != self.values[k]]
        if changed:
            raise PipelineError(f"{run_dir} was trained with other data or settings "
                                f"({'; '.join(changed)}); continuing would mix two runs. {again}")
        return True

    def finished_summary(self, say=None) -> RunSummary | None:
        """The summary in this run's folder, if the folder holds this very run (same format,
        data and settings) trained to the end with its final weights as they were saved: a
        rerun returns it without loading anything. None otherwise (`say` told why, where the
        folder looked finished)."""
        try:
            old = self.folder.read_config()
        except (OSError, ValueError):
            return None
        if old.get("format") != FORMAT or any(old.get(k) != self.values[k] for k in RESUME_KEYS):
            return None
        summary = self.folder.read_summary()
        if not summary or summary.steps != old.get("total_steps"):
            return None
        final = self.run_dir / FINAL
        if not final.is_dir() or folder_sha256(final) != summary.final_sha256:
            if say:
                say(f"{FINAL} is missing or changed since it was saved; saving it again")
            return None
        return summary
