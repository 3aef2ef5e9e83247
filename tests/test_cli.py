"""The CLI as a user runs it: the installed `lora-pipeline` command, in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_pipeline.errors import PipelineError


CLI = str(Path(sys.executable).parent / "lora-pipeline")


def in_process(*args, cwd, monkeypatch) -> int:
    """The command's exit code, run by main() in this process, offline as `cli` runs it: for
    mistakes found before any server or flow starts, where a new process costs seconds."""
    from lora_pipeline.flows.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return main([str(a) for a in args])


def cli(*args, cwd, timeout=600):
    # Offline, whatever the machine: a hub id then fails at once rather than after a download.
    env = {**{k: v for k, v in os.environ.items() if k not in ("TINKER_API_KEY", "PREFECT_API_URL")},
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([CLI, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.jsonl"], "--data missing.jsonl: file not found"),
    (["--data", "bad.jsonl"], "bad.jsonl:2: not valid JSON"),
    (["--data", "good.jsonl", "--base-model", "no/such-model-here"], "hub cannot be reached"),
    (["--data", "good.jsonl", "--backend", "tinker"], "Missing TINKER_API_KEY"),
])
def test_train_input_errors_are_one_line_and_leave_nothing(tmp_path, args, message):
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}\n'
    (tmp_path / "good.jsonl").write_text(good)
    (tmp_path / "bad.jsonl").write_text(good + "{not json\n")
    r = cli("train", *args, "--output-dir", "out", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_flag_outside_its_choices_is_a_usage_error(tmp_path):
    r = cli("train", "--data", "good.jsonl", "--backend", "gpu", cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice: 'gpu' (choose from 'auto', 'local', 'tinker')" in r.stderr


def test_inspect_without_a_key_says_so(tmp_path):
    r = cli("inspect", cwd=tmp_path)
    assert r.returncode == 0
    assert "tinker SDK 0.38" in r.stdout and "TrainingClient: " in r.stdout
    assert "TINKER_API_KEY is not set" in r.stdout


@pytest.mark.slow
def test_train_then_test_give_the_workflows_layout(tmp_path, small_data, tiny):
    r = cli("train", "--data", small_data, "--batch", 4, "--max-steps", 4, "--save-every", 2,
            "--learning-rate", 5e-4, "--output-dir", "checkpoints", "--base-model", tiny, "--device", "cpu",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    [run] = (tmp_path / "checkpoints").glob("lora_*")
    for name in ("config.json", "training_log.json", "checkpoint_step_2", "checkpoint_step_4",
                 "final_lora_weights", "training_state"):
        assert (run / name).exists(), name
    assert f"Final LoRA weights: {run}/final_lora_weights" in r.stdout  # absolute: it works from anywhere
    assert "step 4/4" in r.stdout + r.stderr  # progress, step by step

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["What is 2 plus 3?", [{"role": "user", "content": "Hello!"}]]))
    r = cli("test", "--lora-weights", run / "final_lora_weights", "--compare-base",
            "--test-prompts", prompts, "--max-tokens", 20, "--output", "comparison.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "comparison.json").read_text())
    assert out["base_model"] == str(tiny)  # read from the adapter
    assert out["lora_weights"] == str(run / "final_lora_weights")
    assert [r["prompt"] for r in out["results"]] == [
        [{"role": "user", "content": "What is 2 plus 3?"}], [{"role": "user", "content": "Hello!"}]]
    for row in out["results"]:
        assert row["lora_response"] and row["base_response"]
        assert 0 < row["lora_tokens"] <= 20 and row["lora_stop_reason"] in ("stop", "length")


def test_test_rejects_a_folder_that_is_not_an_adapter(tmp_path):
    r = cli("test", "--lora-weights", tmp_path, "--output", "x.json", cwd=tmp_path)
    assert r.returncode == 1 and "not LoRA weights" in r.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_run_does_the_whole_pipeline_from_the_command_line(tmp_path, small_data, tiny):
    """The demo's command (make run), on less data and the tiny model: prepare, train, test, report."""
    r = cli("run", "--dataset", small_data, "--batch", 4, "--max-steps", 2, "--save-every", 0,
            "--max-tokens", 8, "--output-dir", "runs", "--run-name", "demo", "--base-model", tiny, "--device", "cpu",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    assert r.stdout.rstrip().endswith(f"Report: {run}/report.html") and (run / "report.html").exists()
    assert "On held-out data the LoRA" in r.stdout
    results = json.loads((run / "results.json").read_text())["results"]
    assert results and all("base_response" in row for row in results)  # held-out prompts, compared


@pytest.mark.slow
def test_a_killed_command_takes_its_temporary_prefect_server_with_it(tmp_path, small_data):
    import psutil

    from lora_pipeline.processes import wait_until

    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_API_KEY", "PREFECT_API_URL")}
    proc = subprocess.Popen([CLI, "train", "--data", small_data, "--batch", "2", "--max-steps", "50",
                             "--output-dir", tmp_path / "out"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        [server] = wait_until("the temporary Prefect server", lambda: [
            c for c in psutil.Process(proc.pid).children() if "uvicorn" in " ".join(c.cmdline())], 180, proc)
    finally:
        proc.kill()
        proc.wait()
    wait_until("the server to go", lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, 15)


def test_a_temporary_server_that_cannot_start_is_one_line_of_what_to_do(tmp_path, small_data):
    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_API_KEY", "PREFECT_API_URL")}
    env["LORA_PIPELINE_SERVER_TIMEOUT"] = "0.001"  # as on a machine too busy to start one in time
    r = subprocess.run([CLI, "train", "--data", small_data, "--output-dir", "out"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert "temporary Prefect server: not ready after 0.001 s" in r.stderr
    assert "make server" in r.stderr and "PREFECT_API_URL=http://127.0.0.1:4200/api" in r.stderr


@pytest.mark.parametrize("dataset, output, message", [
    ("mine.jsonl", "mine.jsonl", "--output mine.jsonl: is the input mine.jsonl; writing it would lose the input"),
    ("mine.val.jsonl", "mine.jsonl", "--output (its held-out split) mine.val.jsonl: is the input"),
    ("mine.jsonl", "folder", "--output folder: is a folder; give the path of a new or regular file"),
    ("/dev/zero", "out.jsonl", "--dataset /dev/zero: is a device, not a regular file"),
    ("zero.jsonl", "out.jsonl", "--dataset zero.jsonl: is a device, not a regular file"),
    ("pipe.jsonl", "out.jsonl", "--dataset pipe.jsonl: is a named pipe (FIFO), not a regular file"),
    ("folder", "out.jsonl", "--dataset folder/part.jsonl: is a named pipe (FIFO), not a regular file"),
])
def test_prepare_refuses_inputs_that_hang_and_outputs_that_lose_data(tmp_path, dataset, output, message):
    """Before the fix these overwrote the input, or read /dev/zero (hashing it for the cache) forever."""
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}\n'
    for name in ("mine.jsonl", "mine.val.jsonl"):
        (tmp_path / name).write_text(good * 3)
    (tmp_path / "zero.jsonl").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "folder" / "part.jsonl")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("prepare", "--dataset", dataset, "--output", output, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "mine.jsonl").read_text() == good * 3


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "good.jsonl", "--seed", "18446744073709551616"],
     "--seed (seed) 18446744073709551616: must be at most 4294967295"),
    (["run", "--dataset", "good.jsonl", "--test-prompts", "/nonexistent.json"],
     "--test-prompts /nonexistent.json: file not found"),
    (["test", "--lora-weights", "adapter", "--base-model", "/nonexistent/model"],
     "--base-model /nonexistent/model: not a local folder, its config.json is not in the Hugging Face cache"),
    (["test", "--lora-weights", "adapter", "--output", "adapter"], "--output adapter: is a folder"),
    (["train", "--data", "good.jsonl", "--val-data", "empty.jsonl"], "empty.jsonl: the file holds no conversations"),
    (["train", "--data", "/dev/zero"], "--data /dev/zero: is a device, not a regular file"),
    (["train", "--data", "."], "--data .: is a folder, not a regular file"),
])
def test_input_mistakes_found_before_any_work_are_one_line(tmp_path, tiny, args, message, monkeypatch, capsys):
    """Before: tracebacks, "file not found" for a device or a folder, an empty --val-data named as
    --data, and a missing --test-prompts found only after preparing and training. (In this
    process: these end before any server or flow, and a new process per case cost seconds.)"""
    from lora_pipeline.engines.local import LocalEngine

    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr!"}]}\n'
    (tmp_path / "good.jsonl").write_text(good * 8)
    (tmp_path / "empty.jsonl").write_text("")
    LocalEngine(str(tiny), rank=4, seed=0, root=tmp_path, device="cpu").save_weights_for_sampler("adapter").result()
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # the adapter's making is not the command's output
    assert in_process(*args, "--output-dir" if args[0] in ("train", "run") else "--max-tokens",
                      "out" if args[0] in ("train", "run") else "2", cwd=tmp_path, monkeypatch=monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_prefect_api_url_where_nothing_listens_is_one_line(tmp_path):
    from lora_pipeline.processes import free_port

    (tmp_path / "in.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}, '
                                       '{"role": "assistant", "content": "Arr!"}]}\n')
    env = {**{k: v for k, v in os.environ.items() if k != "TINKER_API_KEY"},
           "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    r = subprocess.run([CLI, "prepare", "--dataset", "in.jsonl", "--output", "out.jsonl"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr[-2000:]
    assert "no Prefect server answers there" in r.stderr and "unset PREFECT_API_URL" in r.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow  # starts a server (which cannot start)
def test_a_server_that_cannot_open_its_database_names_prefect_home(tmp_path, monkeypatch):
    """With an unwritable HOME (or PREFECT_HOME): before, "a busy machine can be slow to start
    one", for a server that could not open its database. (The model cache's case, which an
    unwritable HOME meets first: tests/test_safety.py.)"""
    from lora_pipeline.flows.server import _TemporaryServer

    (tmp_path / "home").write_text("a file, not a folder")
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(PipelineError) as e:
        _TemporaryServer().start()
    assert f"it keeps its database under PREFECT_HOME ({tmp_path}/home/.prefect): check that it can be written" \
        in str(e.value) and "\n" not in str(e.value)


def test_the_terminal_shows_a_mistake_and_prepares_summary_once():
    """Before: prepare --strict showed its error five times (task failed, task finished, flow
    failed, flow finished, the command's line), and its summary twice (logged, then printed)."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from lora_pipeline.flows.cli import _tracebacks_off_the_console, said_once

    def shown(level, text) -> bool:
        return said_once(logging.LogRecord("prefect.task_runs", level, __file__, 1, text, None, None))
    assert not shown(logging.ERROR, "Task run failed with exception: PipelineError('d.jsonl:21: no known chat shape')")
    assert not shown(logging.INFO, "Finished in state Failed('Task run encountered an exception PipelineError: x')")
    assert not shown(logging.INFO, "Kept 20 of 21 rows: 19 -> o.jsonl, 1 -> o.val.jsonl\n  report: o.jsonl.report.json")
    assert shown(logging.INFO, "step 1/4  loss 3.7")  # progress and retries are still shown
    assert shown(logging.ERROR, "Task run failed with exception: EngineTimeout('Tinker did not answer') - Retry 1/2")
    with _tracebacks_off_the_console():
        consoles = [h for name in ("prefect", "") for h in logging.getLogger(name).handlers
                    if isinstance(h, PrefectConsoleHandler)]
        assert consoles and all(said_once in h.filters for h in consoles)
    assert not any(said_once in h.filters for h in consoles)


def test_sigterm_ends_a_command_with_its_line(tmp_path):
    """Before: SIGTERM ended a command without a word (and without its `finally` clauses)."""
    import signal
    import time

    from lora_pipeline.processes import free_port

    env = {**os.environ, "TINKER_API_KEY": "tml-unreachable", "TINKER_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    proc = subprocess.Popen([CLI, "inspect", "--timeout", "60"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:  # the key is set: it now waits for the service
        if line.startswith("TINKER_API_KEY: set"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err.strip() == "lora-pipeline inspect: terminated (SIGTERM)", err


@pytest.mark.slow
def test_a_temporary_server_killed_mid_run_is_started_again_and_the_run_goes_on(tmp_path, tiny, small_data):
    """Before: about 4 minutes of stall in Prefect's client retries, an httpx traceback, and
    "Finished in state Running()"."""
    import psutil

    from lora_pipeline.processes import wait_until

    env = {k: v for k, v in os.environ.items() if k not in ("TINKER_API_KEY", "PREFECT_API_URL")}
    proc = subprocess.Popen([CLI, "train", "--data", small_data, "--base-model", tiny, "--device", "cpu",
                             "--batch", "2", "--max-steps", "6", "--save-every", "3", "--output-dir", "out",
                             "--run-name", "r"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the run is under way
            if "step 2/6" in line:
                break
        [server] = [c for c in psutil.Process(proc.pid).children() if "uvicorn" in " ".join(c.cmdline())]
        server.kill()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "the temporary Prefect server stopped (exit code -9); starting it again" in err
    assert "Traceback" not in err and "Final LoRA weights:" in out
    assert [r["step"] for r in json.loads((tmp_path / "out" / "r" / "training_log.json").read_text())] == \
        list(range(1, 7))
    wait_until("no server left", lambda: not [c for c in psutil.Process().children(recursive=True)
                                              if "uvicorn" in " ".join(c.cmdline())], 15)


@pytest.mark.parametrize("args, message", [
    (["export", "tinker://r/weights/x", "--output", "e", "--request-timeout", "inf"],
     "--request-timeout (request_timeout) inf: must be a finite number"),
    (["export", "tinker://r/weights/x", "--output", "e", "--request-timeout", "1e300"],
     "--request-timeout (request_timeout) 1e+300: must be at most 86400"),
    (["inspect", "--timeout", "inf"], "--timeout (timeout) inf: must be a finite number"),
    (["inspect", "--timeout", "0"], "--timeout (timeout) 0.0: must be above 0"),
])
def test_export_and_inspect_deadlines_are_checked_like_every_setting(tmp_path, args, message, monkeypatch,
                                                                     capsys):
    """Before: an OverflowError traceback from the OS's timers (export), or a query error (inspect)."""
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    monkeypatch.setenv("TINKER_BASE_URL", "http://127.0.0.1:9")
    assert in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch) == 1
    assert capsys.readouterr().err.strip() == f"lora-pipeline {args[0]}: error: {message}"


def test_inspect_with_the_service_out_of_reach_fails_within_its_deadline(tmp_path):
    """Before: it said it could not query, with the SDK's FutureWarnings, and exited 0. In a
    process of its own: the SDK goes on retrying the unreachable service in the background for
    about 5 minutes after the command has answered, and in the test process that held the next
    Tinker session up as long (test_export's module set-up took 300 s in every full run)."""
    import time

    from lora_pipeline.processes import free_port

    env = {**os.environ, "TINKER_API_KEY": "tml-unreachable", "TINKER_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    env.pop("PREFECT_API_URL", None)
    started = time.monotonic()
    r = subprocess.run([CLI, "inspect", "--timeout", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and time.monotonic() - started < 15 and "TINKER_API_KEY: set" in r.stdout
    err = r.stderr.strip()
    assert err.splitlines() == [err] and "could not be queried" in err and "within 1 s" in err
