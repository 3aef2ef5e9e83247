"""Nothing lost, nothing wrong in silence: run folders stay inside --output-dir, --start-over
replaces only what lora-pipeline made, one process per run folder, commands written for the
user are quoted, and each file error gets the message that fits it."""

import errno
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import SAMPLE
from lora_pipeline.errors import PipelineError
from lora_pipeline.flows.cli import os_error_message
from lora_pipeline.report import resume_command, write_failure_summary
from lora_pipeline.run_folder import RunFolder
from lora_pipeline.settings import TrainSettings
from lora_pipeline.train import TrainingRun
from training import training_settings


@pytest.fixture
def workspace(tmp_path):
    """An output folder inside a folder of the user's, each with files that must survive."""
    (tmp_path / "precious.txt").write_text("the user's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's too")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:12]))
    return tmp_path, out, data


def untouched(tmp_path):
    return (tmp_path / "precious.txt").read_text() == "the user's" and \
        (tmp_path / "out" / "notes.txt").read_text() == "the user's too"


@pytest.mark.parametrize("name", ["..", ".", "/etc", "../escape", "a/b", ".hidden", "", "x" * 101])
def test_a_run_name_is_one_folder_name(workspace, name):
    tmp_path, out, data = workspace
    with pytest.raises(PipelineError, match=r"--run-name \(run_name\) .*: must be one folder name"):
        TrainingRun(training_settings(data, out, cli_defaults=True, run_name=name, start_over=True)).open()
    assert untouched(tmp_path)


def test_start_over_replaces_only_a_run_folder(workspace):
    tmp_path, out, data = workspace
    mine = out / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(PipelineError, match="holds no lora-pipeline config.json, so it is not a run folder"):
        TrainingRun(training_settings(data, out, cli_defaults=True, run_name="mine", start_over=True)).open()
    assert (mine / "thesis.tex").read_text() == "years of work" and untouched(tmp_path)


def test_a_symbolic_link_is_never_followed_or_replaced(workspace):
    tmp_path, out, data = workspace
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(PipelineError, match="is a symbolic link or a file, not a run folder"):
        TrainingRun(training_settings(data, out, cli_defaults=True, run_name="link", start_over=True)).open()
    assert untouched(tmp_path)


def _hold_lock(folder) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a running training does."""
    code = ("import sys, time\nfrom lora_pipeline.run_folder import RunFolder\n"
            f"RunFolder({str(folder)!r}).lock()\nprint('locked', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_on_a_run_folder_is_refused_and_touches_nothing(workspace):
    tmp_path, out, data = workspace
    run = out / "r"
    run.mkdir()
    (run / "config.json").write_text('{"format": 2}')
    (run / ".tmp-checkpoint_step_4-abc").mkdir()  # the other process's save in flight
    holder = _hold_lock(run)
    try:
        holding = rf"{run} is in use by another lora-pipeline process \(PID {holder.pid} on {socket.gethostname()}\)"
        with pytest.raises(PipelineError, match=holding):
            TrainingRun(training_settings(data, out, cli_defaults=True, run_name="r", start_over=True)).open()
        assert (run / ".tmp-checkpoint_step_4-abc").is_dir() and (run / "config.json").exists()
        # Its failure note goes beside the folder, not into the other process's folder.
        path, _ = write_failure_summary(str(out), "r", "in use", time.time())
        assert path == out / "last_failure.md" and not (run / "failure.md").exists()
    finally:
        holder.kill()
        holder.wait()
    # Released when its holder dies, however it dies.
    folder = RunFolder(run)
    folder.lock()
    folder.unlock()


def test_a_rerun_waits_for_the_run_folder_and_says_what_it_waits_for(tmp_path):
    run = tmp_path / "r"
    holder = _hold_lock(run)
    said = []
    try:
        folder = RunFolder(run)
        with pytest.raises(PipelineError, match=r"in use by another lora-pipeline process .* not released within 1 s"):
            folder.lock(wait=1)
        # The holder stops after 2 s; a wait of 30 s takes the folder then, and said why it waited.
        threading.Timer(2, holder.kill).start()
        started = time.monotonic()
        folder.lock(wait=30, say=said.append)
        assert 1.5 < time.monotonic() - started < 20
        folder.unlock()
    finally:
        holder.kill()
        holder.wait()
    assert len(said) == 1 and f"(PID {holder.pid} on {socket.gethostname()})" in said[0] and "of at most 30 s" in said[0]


def test_the_resume_command_is_quoted_for_the_shell(tmp_path):
    config = {"data": str(tmp_path / "my data; echo PWNED.jsonl"), "batch": 4, "learning_rate": 5e-4,
              "run_dir": str(tmp_path / "out dir" / "r1"), "start_over": False}
    command = resume_command(config)
    assert shlex.split(command) == ["lora-pipeline", "train", "--data", config["data"], "--batch", "4",
                                    "--learning-rate", "0.0005", "--output-dir", str(tmp_path / "out dir"),
                                    "--run-name", "r1"]
    out = subprocess.run(["bash", "-c", f"echo {command}"], capture_output=True, text=True).stdout
    assert "PWNED" in out and out.count("\n") == 1  # printed as text, not run


@pytest.mark.parametrize("code, command, said", [
    (errno.ENOSPC, "train", "the disk is full. Free space, or choose another --output-dir. Earlier files"),
    (errno.EEXIST, "prepare", "something that is not a folder is already there. Choose another --output."),
    (errno.ENOTDIR, "prepare", "part of that path is a file, not a folder. Choose another --output."),
    (errno.ELOOP, "train", "a symbolic link is in the way, which lora-pipeline does not follow"),
    (errno.EACCES, "run", "permission denied. Choose a folder you can write to with --output-dir."),
    (errno.EROFS, "test", "the file system is read-only. Choose another --output."),
])
def test_each_file_error_gets_its_own_message(code, command, said):
    message = os_error_message(command, OSError(code, os.strerror(code), "/data/out.jsonl"))
    assert message.startswith("/data/out.jsonl: ") and said in message
    assert ("continue from the last checkpoint" in message) == (command in ("train", "run", "sweep"))


# -- `test`: prompts answered whole, none past the model's context, adapters checked -----------
@pytest.fixture(scope="module")
def tiny_adapter(tiny, tmp_path_factory):
    """A fresh LoRA of the tiny model, saved as `train` saves final_lora_weights/."""
    from lora_pipeline.engines.local import LocalEngine

    root = tmp_path_factory.mktemp("adapter")
    return LocalEngine(str(tiny), rank=4, seed=0, root=root, device="cpu").save_weights_for_sampler(
        "final_lora_weights").result()


def test_a_prompt_file_is_answered_whole_and_a_limit_is_said(tmp_path, tiny_adapter):
    from lora_pipeline.evaluate import limit_note, run_test
    from lora_pipeline.settings import EvaluateSettings

    forty = tmp_path / "forty.jsonl"
    forty.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                      {"role": "assistant", "content": "Arr!"}]}) + "\n"
                             for i in range(40)))
    settings = dict(lora_weights=tiny_adapter, test_prompts=str(forty), max_tokens=2, device="cpu",
                    output=str(tmp_path / "results.json"))
    result = run_test(EvaluateSettings(**settings))
    assert len(result["results"]) == 40 and limit_note(result) is None  # before: 16, without a word
    result = run_test(EvaluateSettings(**settings, max_prompts=16))
    assert len(result["results"]) == 16
    assert limit_note(result) == ("Answered the first 16 of 40 test prompts (--max-prompts 16); "
                                  "--max-prompts 0 answers all")


def test_a_prompt_longer_than_the_models_context_is_refused(tmp_path, tiny_adapter):
    from lora_pipeline.evaluate import run_test
    from lora_pipeline.settings import EvaluateSettings

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Hello!", "Arr matey " * 2000]))  # the tiny model's context: 2048 tokens
    with pytest.raises(PipelineError, match=r"test prompt 2 of 2 is \d+ tokens: with --max-tokens 5 it does "
                                            r"not fit .*'s context of 2048 tokens"):
        run_test(EvaluateSettings(lora_weights=tiny_adapter, test_prompts=str(prompts), max_tokens=5, device="cpu",
                                  output=str(tmp_path / "results.json")))
    assert not (tmp_path / "results.json").exists()


@pytest.fixture
def damaged_models(tiny, tmp_path):
    """Copies of the tiny model folder, each damaged in one way a user's folder can be."""
    import shutil

    made = {}
    for name in ("other_sizes", "no_weights", "broken_config"):
        made[name] = shutil.copytree(tiny, tmp_path / name)
    config = json.loads((tiny / "config.json").read_text())
    (made["other_sizes"] / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    for weights in made["no_weights"].glob("*.safetensors"):
        weights.unlink()
    (made["broken_config"] / "config.json").write_text('{"model_type": "llama", ')
    return made


@pytest.mark.parametrize("damage, said", [
    ("other_sizes", "the model folder's weights cannot be loaded .*config.json does not match its files"),
    ("no_weights", "the folder has a config.json but no weights"),
    ("broken_config", "the model folder's config.json cannot be loaded"),
])
def test_a_damaged_model_folder_is_said_as_such(workspace, damaged_models, damage, said):
    """Before: a traceback of size mismatches; "a file: ... choose another --output-dir"; "not a
    local folder nor in the Hugging Face cache"."""
    tmp_path, out, data = workspace
    with pytest.raises(PipelineError, match=rf"--base-model {damaged_models[damage]}: {said}"):
        run = TrainingRun(training_settings(data, out, cli_defaults=True, base_model=str(damaged_models[damage]),
                                            device="cpu", batch=2, max_steps=1))
        run.open()
        run.close()
    assert untouched(tmp_path) and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_rank_beyond_the_models_width_is_refused_before_any_allocation(workspace, tiny):
    tmp_path, out, data = workspace
    with pytest.raises(PipelineError, match=r"--rank 100000: more than .* can take: .* \(64 here\); give --rank 64 or less"):
        TrainingRun(training_settings(data, out, cli_defaults=True, base_model=str(tiny), rank=100000)).open()
    assert untouched(tmp_path)


@pytest.mark.parametrize("damage, said", [
    ({"lora_pipeline.json": "{not json"}, "lora_pipeline.json cannot be read"),
    ({"lora_pipeline.json": "{}", "adapter_config.json": None}, "lora_pipeline.json records neither"),
    ({"lora_pipeline.json": "[]"}, "lora_pipeline.json is not a JSON object"),
    ({"lora_pipeline.json": "{}", "adapter_config.json": '{"peft_type": "LORA"}'}, "adapter_config.json has no LoRA rank"),
])
def test_a_damaged_adapter_folder_is_said_as_such(tmp_path, tiny_adapter, damage, said):
    import shutil

    from lora_pipeline.evaluate import adapter_info

    folder = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    for name, text in damage.items():
        (folder / name).unlink()
        if text is not None:
            (folder / name).write_text(text)
    with pytest.raises(PipelineError, match=f"--lora-weights {folder}: {said}"):
        adapter_info(str(folder))


def test_an_adapter_with_only_its_peft_files_still_works(tmp_path, tiny_adapter):
    import shutil

    from lora_pipeline.evaluate import adapter_info

    folder = shutil.copytree(tiny_adapter, tmp_path / "adapter")
    (folder / "lora_pipeline.json").write_text("{}")
    assert adapter_info(str(folder))["rank"] == 4


def test_an_adapter_for_another_base_model_or_a_missing_one_is_one_error(tmp_path, tiny_adapter, tiny, monkeypatch):
    from lora_pipeline.evaluate import compare, load_prompts
    from lora_pipeline.settings import SampleSettings
    from tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", width=32)  # the same tokenizer, other layer shapes
    prompts = load_prompts(None)[:1]
    with pytest.raises(PipelineError, match=rf"--lora-weights .*: does not fit the base model {other} .*pass that one "
                                            "with --base-model"):
        compare(tiny_adapter, prompts, SampleSettings(base_model=str(other), max_tokens=2, device="cpu"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="--base-model /nonexistent/model: not a local folder, its config.json is "
                                            "not in the Hugging Face cache, and the hub cannot be reached"):
        compare(tiny_adapter, prompts, SampleSettings(base_model="/nonexistent/model", max_tokens=2, device="cpu"))


def test_a_cache_that_cannot_be_written_names_the_variable_and_keeps_the_users_file(tmp_path, monkeypatch):
    """Before: "something is already there. Remove it" of the user's own file."""
    from lora_pipeline.models import _smollm2_dir

    mine = tmp_path / "my-file"
    mine.write_text("the user's")
    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(mine))
    with pytest.raises(PipelineError, match=rf"the model cache {mine} cannot be written .*set LORA_PIPELINE_CACHE"):
        _smollm2_dir()
    assert mine.read_text() == "the user's"


def test_a_refused_rerun_leaves_a_finished_run_folder_as_it_was(workspace):
    """Its note goes beside the folder: failure.md inside would say that the finished run failed."""
    tmp_path, out, data = workspace
    run = out / "done"
    run.mkdir()
    (run / "config.json").write_text('{"format": 3}')
    (run / "summary.json").write_text("{}")
    finished_at = time.time() - 60
    os.utime(run / "summary.json", (finished_at, finished_at))
    path, markdown = write_failure_summary(str(out), "done", "other data or settings", time.time() - 1)
    assert path == out / "last_failure.md" and not (run / "failure.md").exists()
    assert "had finished before this attempt and is intact" in markdown


def test_a_length_limit_that_leaves_no_batch_says_to_raise_it(workspace, tiny):
    """Before: "lower --batch or add data", for data that was plenty."""
    tmp_path, out, data = workspace
    with pytest.raises(PipelineError, match=r"0 of 12 examples are usable at --max-length 1 .*raise --max-length"):
        TrainingRun(training_settings(data, out, cli_defaults=True, base_model=str(tiny), device="cpu", batch=2,
                                      max_length=1, run_name="r")).open()
    assert not (out / "r").exists()


def test_tinker_with_its_tokenizer_out_of_reach_is_said_at_once(monkeypatch):
    """Before: ~80 s of the hub client's retries, then "a file: ... choose another --output-dir"."""
    from lora_pipeline.engines import resolve_engine

    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"--base-model Qwen/Qwen3-8B: not a local folder, its tokenizer is not "
                                            r"in the Hugging Face cache, and the hub cannot be reached"):
        resolve_engine("tinker", None)  # the default model
    assert time.monotonic() - started < 10


# The settings that may differ when a run folder is continued: where it goes, how often it saves,
# where it computes, how long a call or a wait may take (--data, --val-data and --init-from count
# by content). Every other setting shapes the results, and a resume must refuse a change of it.
MAY_CHANGE_ON_RESUME = {"data", "val_data", "init_from", "output_dir", "run_name", "start_over", "save_every", "device",
                        "dtype", "request_timeout", "concurrency_limit", "lock_wait"}


def test_every_setting_is_checked_on_resume_or_known_not_to_shape_results():
    import dataclasses

    from lora_pipeline.settings import resume_keys

    unchecked = {f.name for f in dataclasses.fields(TrainSettings)} - set(resume_keys(TrainSettings))
    assert unchecked <= MAY_CHANGE_ON_RESUME, unchecked - MAY_CHANGE_ON_RESUME


def test_a_change_of_any_setting_that_shapes_results_is_refused_on_resume(workspace, tiny):
    import dataclasses
    import shutil

    from lora_pipeline.settings import resume_keys

    tmp_path, out, data = workspace
    other_model = shutil.copytree(tiny, tmp_path / "other-model")
    changed = {"base_model": str(other_model), "seed": 1, "max_length": 512, "on_overflow": "drop", "batch": 3,
               "max_steps": 7, "rank": 8, "learning_rate": 2e-4, "beta1": 0.8, "beta2": 0.9, "eps": 1e-7,
               "weight_decay": 0.01}
    # The backend is recorded as resolved: "auto" without a key is "local", the same engine.
    assert set(changed) | {"backend"} == set(resume_keys(TrainSettings))
    first = training_settings(data, out, cli_defaults=True, run_name="r", base_model=str(tiny), device="cpu", batch=2,
                              max_steps=3)
    TrainingRun(first).open().close()
    for key, value in changed.items():
        with pytest.raises(PipelineError, match=rf"was trained with other data or settings \({key} .*--start-over"):
            TrainingRun(dataclasses.replace(first, **{key: value})).open()


@pytest.mark.parametrize("output_dir", ["precious.txt", "precious.txt/runs", "/dev/null"])
def test_an_output_dir_that_is_a_file_or_under_one_is_refused_without_remove_it(workspace, output_dir):
    """Before: "something is already there. Remove it", of the user's own file (or /dev/null)."""
    tmp_path, out, data = workspace
    with pytest.raises(PipelineError, match=r"--output-dir .*(is|lies under .*, which is) a (file|device), "
                                            r"not a folder; choose another --output-dir"):
        TrainingRun(training_settings(data, tmp_path / output_dir if output_dir[0] != "/" else output_dir,
                                      cli_defaults=True)).open()
    assert untouched(tmp_path)


def test_held_out_data_that_is_the_training_data_is_refused(workspace):
    """A held-out loss measured on the training data would say the LoRA generalises when it may not."""
    tmp_path, out, data = workspace
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    for val in (data, copy):
        with pytest.raises(PipelineError, match="holds the same conversations as --data"):
            TrainingRun(training_settings(data, out, cli_defaults=True, val_data=str(val))).open()
    assert untouched(tmp_path) and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
