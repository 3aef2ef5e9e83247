"""Weights out of Tinker: a Tinker run against tests/tinker_server.py (real SDK), exported with
lora_pipeline.export, loaded with plain PEFT; and the ways a download goes wrong."""

import json
import time

import pytest
import torch
from peft import PeftModel

from conftest import SAMPLE
from lora_pipeline.engines import EngineTimeout
from lora_pipeline.errors import PipelineError
from lora_pipeline.export import DownloadError, _check_adapter, export, export_run_weights
from lora_pipeline.models import SMOLLM2, load_model, load_tokenizer
import dataclasses

from lora_pipeline.run_folder import RunFolder
from lora_pipeline.train import TrainingRun, train
from tinker_server import TinkerTestServer, service_client
from training import training_settings

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TIMEOUT = 20.0


@pytest.fixture(scope="module")
def tinker_run(tmp_path_factory):
    """One three-step Tinker run (checkpoint at step 2) for the module: (server, run folder)."""
    tmp = tmp_path_factory.mktemp("tinker-run")
    data = tmp / "small.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:40]))
    with TinkerTestServer(models=[SMOLLM2]) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINKER_API_KEY", server.api_key)
        mp.setenv("TINKER_BASE_URL", server.base_url)
        run = TrainingRun(training_settings(data, tmp / "runs", backend="tinker", base_model=SMOLLM2, rank=8,
                                            max_steps=3, learning_rate=1e-4, run_name="t", request_timeout=60)).open()
        train(run)
        yield server, run.run_dir


@pytest.fixture
def server(tinker_run, monkeypatch):
    server, _ = tinker_run
    monkeypatch.setenv("TINKER_API_KEY", server.api_key)
    monkeypatch.setenv("TINKER_BASE_URL", server.base_url)
    yield server
    server.clear_faults()
    server.extra_external_files.clear()


@pytest.fixture
def run_dir(tinker_run, tmp_path):
    """A copy of the run folder, so that a test's exports do not change the next test's run."""
    import shutil

    return shutil.copytree(tinker_run[1], tmp_path / "t")


def adapter_bytes(folder):
    return (folder / "adapter_model.safetensors").read_bytes()


def temporary_exports(server) -> list[str]:
    """The exporter's own external-weights exports still on the server (it deletes them)."""
    return [c.path for r in server.runs.values() for c in r.checkpoints
            if c.type == "external" and c.name.startswith("export-")]


def leftovers(parent) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".tmp-export-") or p.name.startswith(".old-")]


@pytest.mark.slow  # the first adapter build loads SmolLM2 on the server; the test loads it again
def test_final_weights_become_a_peft_adapter_that_loads_and_generates(server, run_dir):
    final = run_dir / "final_lora_weights"
    # A Tinker training ends by downloading its adapter, so the run folder serves anywhere.
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lora_pipeline.json"]
    record_before = json.loads((final / "lora_pipeline.json").read_text())
    trained = adapter_bytes(final)

    assert export_run_weights(run_dir, timeout=TIMEOUT) == [final]
    assert adapter_bytes(final) == trained  # exporting again gives the same weights
    record = json.loads((final / "lora_pipeline.json").read_text())
    # The tinker:// path stays beside the adapter, and says what was downloaded.
    assert record["sampler_path"] == record_before["sampler_path"]
    states = {e.name: e.state_path for e in RunFolder(run_dir).registry() if e.state_path}
    assert record["exported_from"] == states["training_state"]  # the state saved at the same step
    assert record["files"]["adapter_model.safetensors"] == len(adapter_bytes(final))
    assert (record["base_model"], record["rank"]) == (SMOLLM2, 8)
    assert temporary_exports(server) == []  # the temporary export was deleted

    tokenizer = load_tokenizer(SMOLLM2)
    model = PeftModel.from_pretrained(load_model(SMOLLM2), str(final)).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
        with model.disable_adapter():
            base_logits = model(**prompt).logits
        lora_logits = model(**prompt).logits
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]).strip()
    assert not torch.allclose(base_logits, lora_logits)  # a trained adapter, not an identity


def test_the_best_checkpoint_folder_gets_its_adapter_too(server, run_dir):
    (run_dir / "best_lora_weights.json").write_text(json.dumps({"name": "checkpoint_step_2", "step": 2}))
    written = export_run_weights(run_dir, timeout=TIMEOUT)
    assert written == [run_dir / "final_lora_weights", run_dir / "checkpoint_step_2"]
    best = run_dir / "checkpoint_step_2"
    assert json.loads((best / "lora_pipeline.json").read_text())["state_path"].endswith("/weights/step_0002")
    assert adapter_bytes(best) != adapter_bytes(run_dir / "final_lora_weights")


@pytest.mark.slow
def test_every_checkpoint_in_the_registry_exports(server, run_dir, tmp_path):
    entries = RunFolder(run_dir).registry()
    assert [e.name for e in entries] == ["checkpoint_step_2", "final_lora_weights", "training_state"]
    out = {e.name: export(run_dir / e.name, tmp_path / "out" / e.name, timeout=TIMEOUT) for e in entries}
    for folder in out.values():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 8, SMOLLM2)
        assert json.loads((folder / "lora_pipeline.json").read_text())["backend"] == "tinker"
    # The final sampler weights and the final state are the same weights; step 2's differ.
    assert adapter_bytes(out["final_lora_weights"]) == adapter_bytes(out["training_state"])
    assert adapter_bytes(out["checkpoint_step_2"]) != adapter_bytes(out["training_state"])
    # A state's tinker:// path gives what its folder gives, and records where it came from.
    by_path = export(entries[0].state_path, tmp_path / "by-path", timeout=TIMEOUT)
    assert adapter_bytes(by_path) == adapter_bytes(out["checkpoint_step_2"])
    record = json.loads((by_path / "lora_pipeline.json").read_text())
    assert record["state_path"] == record["exported_from"] == entries[0].state_path
    assert (record["base_model"], record["rank"]) == (SMOLLM2, 8)  # asked of Tinker
    # The run folder itself means its final weights.
    assert adapter_bytes(export(run_dir, tmp_path / "run", timeout=TIMEOUT)) == adapter_bytes(out["training_state"])
    assert temporary_exports(server) == [] and leftovers(tmp_path / "out") == []


def test_external_weights_path_exports_directly(server, tmp_path):
    with service_client(server) as service:
        client = service.create_lora_training_client(SMOLLM2, rank=4, seed=7).result(timeout=10)
        path = client.save_weights_external("mine").result(timeout=10).path
        folder = export(path, tmp_path / "ext", timeout=TIMEOUT)
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
        assert json.loads((folder / "lora_pipeline.json").read_text())["external_path"] == path
        assert path in [c.path for r in server.runs.values() for c in r.checkpoints]  # the user's own, kept


@pytest.mark.parametrize("kind", ["truncate", "short"])
def test_a_cut_short_download_is_refused_and_nothing_is_half_written(server, run_dir, kind):
    final = run_dir / "final_lora_weights"
    export(final, final, timeout=TIMEOUT)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    server.fault("download", kind, times=1, after=1)  # the weights file, after the config
    with pytest.raises(DownloadError, match="cut short|bytes, Tinker lists"):
        export(final, final, timeout=TIMEOUT)
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # the earlier export, untouched
    assert leftovers(run_dir) == [] and temporary_exports(server) == []
    fresh = run_dir.parent / "fresh"
    server.fault("download", kind, times=1, after=1)
    with pytest.raises(DownloadError):
        export(final, fresh, timeout=TIMEOUT)
    assert not fresh.exists() and leftovers(run_dir.parent) == []


def test_a_safetensors_file_shorter_than_its_header_says_is_refused(server, run_dir, tmp_path):
    folder = export(run_dir / "training_state", tmp_path / "a", timeout=TIMEOUT)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(DownloadError, match="its header says"):
        _check_adapter(folder, {"rank": 8}, "tinker://x/weights/y")
    with pytest.raises(PipelineError, match="the adapter's rank is 8, the run's 16"):
        _check_adapter(folder, {"rank": 16}, "tinker://x/weights/y")


@pytest.mark.parametrize("kind", ["hang", "stall"])
def test_a_hung_download_fails_within_its_deadline(server, run_dir, tmp_path, kind):
    start = time.monotonic()
    export(run_dir / "training_state", tmp_path / "baseline", timeout=TIMEOUT)
    baseline = time.monotonic() - start  # the calls around the download, on this machine now
    server.fault("download", kind)
    start = time.monotonic()
    with pytest.raises(EngineTimeout, match=r"Tinker did not answer the download of adapter_config.json "
                                            r"for the export of tinker://.* within 2 s"):
        export(run_dir / "training_state", tmp_path / "out", timeout=2.0)
    elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < baseline + 2.0 + 2.0, (elapsed, baseline)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert temporary_exports(server) == []


def test_hostile_or_encrypted_file_names_are_refused(server, run_dir, tmp_path):
    server.extra_external_files["../escape.txt"] = b"outside"
    with pytest.raises(PipelineError, match=r"unsafe file name '../escape.txt'"):
        export(run_dir / "training_state", tmp_path / "out" / "a", timeout=TIMEOUT)
    assert not (tmp_path / "out" / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()
    server.extra_external_files.clear()
    server.extra_external_files["/etc/evil"] = b"x"
    with pytest.raises(PipelineError, match="unsafe file name"):
        export(run_dir / "training_state", tmp_path / "out" / "a", timeout=TIMEOUT)
    server.extra_external_files.clear()
    server.extra_external_files["adapter_model.safetensors.age"] = b"x"
    with pytest.raises(PipelineError, match="age-encrypted"):
        export(run_dir / "training_state", tmp_path / "out" / "a", timeout=TIMEOUT)
    assert not (tmp_path / "out" / "a").exists() and temporary_exports(server) == []


def test_sources_and_outputs_that_are_refused(server, run_dir, tmp_path, monkeypatch):
    sampler = next(e.sampler_path for e in RunFolder(run_dir).registry() if e.sampler_path)
    with pytest.raises(PipelineError, match="cannot download sampler weights"):
        export(sampler, tmp_path / "x")
    with pytest.raises(PipelineError, match="not a Tinker checkpoint path"):
        export("tinker://nonsense", tmp_path / "x")
    with pytest.raises(PipelineError, match="not a run folder .* nor a checkpoint folder"):
        export(tmp_path, tmp_path / "x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="exists and is not an earlier export"):
        export(run_dir / "training_state", mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    # A sampler-only folder whose run records no state at its step cannot be exported.
    (run_dir / "checkpoints.jsonl").write_text(
        "".join(json.dumps(dataclasses.asdict(e)) + "\n" for e in RunFolder(run_dir).registry()
                if e.name != "training_state"))
    with pytest.raises(PipelineError, match="holds only sampler weights .* no state saved at the same step"):
        export(run_dir / "final_lora_weights", tmp_path / "y")
    monkeypatch.delenv("TINKER_API_KEY")
    with pytest.raises(PipelineError, match="Missing TINKER_API_KEY"):
        export(run_dir / "checkpoint_step_2", tmp_path / "z")
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_a_local_adapter_is_copied(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "adapter_config.json").write_text("{}")
    (local / "adapter_model.safetensors").write_bytes(b"weights")
    (local / "training_state.pt").write_bytes(b"optimizer")
    (local / "lora_pipeline.json").write_text(json.dumps({"backend": "local", "base_model": SMOLLM2, "rank": 8}))
    out = export(local, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lora_pipeline.json"]
    assert export(local, local) == local and (local / "training_state.pt").exists()  # in place: nothing to do


def test_an_unreachable_service_is_one_line_within_the_deadline(tmp_path):
    """Making a RestClient opens a session without a deadline: export waited 312 s, then printed a
    traceback. (inspect's case: tests/test_cli.py.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lora_pipeline.processes import free_port

    env = {**os.environ, "TINKER_API_KEY": "tml-unreachable", "TINKER_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    r = subprocess.run([str(Path(sys.executable).parent / "lora-pipeline"), "export", "tinker://run-1/weights/final",
                        "--output", "exp", "--request-timeout", "1"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 40
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "within 1 s" in r.stderr and "Traceback" not in r.stderr and "Warning" not in r.stderr
    assert not (tmp_path / "exp").exists()
