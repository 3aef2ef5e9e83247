"""The local engine on each device, on a tiny model the tests build: the CPU everywhere, the GPU
where there is one (`pytest -m gpu` runs those alone). Resuming is exact, states move between
devices, packing changes nothing but the speed, sampling is batched and seeded, and a missing
GPU or a full one is a clear error."""

import io
import zipfile

import pytest
import torch
from tinker import types

from conftest import SAMPLE
from lora_pipeline.data import read_chat_jsonl
from lora_pipeline.engines.local import LocalEngine
from lora_pipeline.errors import PipelineError
from lora_pipeline.models import resolve_device, resolve_dtype
from lora_pipeline.render import render_conversations
from tiny_model import DEVICES

ADAM = types.AdamParams(learning_rate=1e-2)
# Two runs of the same steps agree to float rounding on the CPU; on a GPU, where attention's
# backward may add in a varying order, and between devices, more loosely. A step applied twice
# or lost moves the LoRA weights by about the learning rate, 1e-2, far beyond either.
SAME = {"cpu": 1e-6, "cuda": 1e-3}
CLOSE = {"cpu": 1e-4, "cuda": 1e-3}


def make(model, device, root=None, seed=0, **kwargs) -> LocalEngine:
    return LocalEngine(str(model), rank=4, seed=seed, root=root, device=device, **kwargs)


def batches(engine, n=4, size=4):
    """`n` batches of `size` sample chats of different lengths."""
    data, _ = render_conversations(read_chat_jsonl(SAMPLE)[: n * size], engine.renderer, 256)
    return [data[i * size:(i + 1) * size] for i in range(n)]


def step(engine, batch) -> float:
    out = engine.forward_backward(batch)
    engine.optim_step(ADAM).result()
    return out.result().metrics["loss:sum"]


def lora_weights(engine) -> dict:
    return {k: v.detach().float().cpu().clone() for k, v in engine.model.named_parameters() if "lora_" in k}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("device", DEVICES)
def test_engine_is_placed_on_its_device_and_says_so(tiny, device):
    engine = make(tiny, device)
    expected = resolve_dtype(device)
    assert expected == ("bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported(False) else "float32")
    assert engine.placement | {"device_name": None} == {
        "device": device, "device_name": None, "dtype": expected, "lora_dtype": "float32", "pack": False}
    for name, p in engine.model.named_parameters():
        assert p.device.type == device
        assert p.dtype == (torch.float32 if p.requires_grad else getattr(torch, expected)), name


@pytest.mark.parametrize("device", DEVICES)
def test_load_state_continues_exactly_and_drops_unfinished_gradients(tiny, tmp_path, device):
    engine = make(tiny, device, tmp_path / "a")
    b1, b2, b3, b4 = batches(engine)
    step(engine, b1), step(engine, b2)
    saved = engine.save_state("checkpoint_step_2").result()
    step(engine, b3), step(engine, b4)
    uninterrupted = lora_weights(engine)

    resumed = make(tiny, device, tmp_path / "b", seed=123)  # another init, overwritten by the load
    resumed.forward_backward(b4).result()  # a step that failed before its optim_step
    resumed.load_state(saved)
    step(resumed, b3), step(resumed, b4)
    assert max_diff(uninterrupted, lora_weights(resumed)) <= SAME[device]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("first,then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_state_continues_on_the_other_device(tiny, tmp_path, first, then):
    # float32 on both, so that the two devices' runs can be compared closely.
    engine = make(tiny, first, tmp_path / "a", dtype="float32")
    b1, b2, b3, b4 = batches(engine)
    step(engine, b1), step(engine, b2)
    saved = engine.save_state("s").result()
    step(engine, b3), step(engine, b4)

    moved = make(tiny, then, tmp_path / "b", seed=123, dtype="float32")
    moved.load_state(saved)
    moments = [t for s in moved.optimizer.state.values() for k, t in s.items() if k != "step"]
    assert moments and all(t.device.type == then and t.dtype == torch.float32 for t in moments)
    step(moved, b3), step(moved, b4)
    assert max_diff(lora_weights(engine), lora_weights(moved)) <= CLOSE["cuda"]


def as_if_saved_on_a_gpu(path) -> None:
    """Rewrite a training_state.pt saved on the CPU so that its tensors say they were on cuda:0,
    as a GPU run's would, and add the GPU's RNG state that such a run saves."""
    state = torch.load(path, weights_only=False)
    state["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, path)
    with zipfile.ZipFile(path) as z:
        files = {info: z.read(info.filename) for info in z.infolist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info, data in files.items():
            if info.filename.endswith("/data.pkl"):
                # The storages' location, a pickled string (torch saves with protocol 2).
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            z.writestr(info, data)
    path.write_bytes(out.getvalue())


def test_a_state_saved_on_a_gpu_loads_on_the_cpu(tiny, tmp_path):
    engine = make(tiny, "cpu", tmp_path / "a")
    b1, b2, b3, _ = batches(engine)
    step(engine, b1), step(engine, b2)
    saved = engine.save_state("s").result()
    step(engine, b3)
    as_if_saved_on_a_gpu(tmp_path / "a" / "s" / "training_state.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does here
            torch.load(tmp_path / "a" / "s" / "training_state.pt", weights_only=False)

    resumed = make(tiny, "cpu", tmp_path / "b", seed=123)
    resumed.load_state(saved)
    step(resumed, b3)
    assert max_diff(lora_weights(engine), lora_weights(resumed)) <= SAME["cpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_packed_batches_give_the_padded_losses_and_gradients(tiny, device):
    """One row with positions restarting at each sequence against right-padded rows."""
    results = []
    for pack in (False, True):
        engine = make(tiny, device, dtype="float32", pack=pack)
        batch = batches(engine, n=1, size=6)[0]
        assert len({d.model_input.length for d in batch}) > 1  # the padded path really pads
        out = engine.forward_backward(batch).result()
        grads = {k: p.grad.cpu() for k, p in engine.model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (padded, padded_grads), (packed, packed_grads) = results
    assert packed.metrics["loss:sum"] == pytest.approx(padded.metrics["loss:sum"], abs=1e-4)
    for a, b in zip(padded.loss_fn_outputs, packed.loss_fn_outputs):
        assert a["logprobs"].shape == b["logprobs"].shape
        assert torch.allclose(a["logprobs"].to_torch(), b["logprobs"].to_torch(), atol=1e-4)
    assert max_diff(padded_grads, packed_grads) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_packed_training_follows_padded_training(tiny, device):
    runs = []
    for pack in (False, True):
        engine = make(tiny, device, dtype="float32", pack=pack)
        for batch in batches(engine, n=3):
            step(engine, batch)
        runs.append(lora_weights(engine))
    assert max_diff(*runs) <= CLOSE[device]


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_is_batched_seeded_and_leaves_the_training_rng(tiny, device):
    engine = make(tiny, device, dtype="float32")
    prompts = [engine.renderer.build_generation_prompt([{"role": "user", "content": q}])
               for q in ("Hi", "What is the capital of France, and why is it famous?")]
    params = types.SamplingParams(max_tokens=10, temperature=0.8, seed=5)
    cpu_rng = torch.get_rng_state()
    gpu_rng = torch.cuda.get_rng_state() if device == "cuda" else None
    first = engine.sample(prompts, params).result()
    assert torch.equal(cpu_rng, torch.get_rng_state())
    if device == "cuda":
        assert torch.equal(gpu_rng, torch.cuda.get_rng_state())
    again = engine.sample(prompts, params).result()
    assert [s.tokens for s in first] == [s.tokens for s in again]
    assert all(len(s.tokens) <= 10 for s in first)
    # Left-padded in one batch, each prompt is answered as it would be alone.
    greedy = types.SamplingParams(max_tokens=10, temperature=0)
    together = engine.sample(prompts, greedy).result()
    alone = [engine.sample([p], greedy).result()[0] for p in prompts]
    assert [s.tokens for s in together] == [s.tokens for s in alone]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_matches_eager(tiny, mode):
    # torch.compile takes minutes on a small CPU, so this runs on the GPU only; on the CPU the
    # engine never compiles unless asked.
    losses = []
    for compile_mode in (None, mode):
        engine = make(tiny, "cuda", dtype="float32", compile_mode=compile_mode)
        losses.append([step(engine, batch) for batch in batches(engine)])
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tiny):
    assert resolve_device("auto") == "cpu"
    with pytest.raises(PipelineError, match="--device cuda: no CUDA device"):
        make(tiny, "cuda")


def test_unknown_device_or_dtype_is_a_clear_error(tiny):
    with pytest.raises(PipelineError, match="choose one of auto, cpu, cuda"):
        make(tiny, "gpu")
    with pytest.raises(PipelineError, match="choose one of auto, float32, bfloat16"):
        make(tiny, "cpu", dtype="float16")


def test_running_out_of_gpu_memory_says_what_to_lower(tiny, monkeypatch):
    engine = make(tiny, "cpu")

    def full(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(engine, "_forward", full)
    with pytest.raises(PipelineError, match="ran out of memory on 4 sequences .* lower --batch or --max-length"):
        engine.forward_backward(batches(engine, n=1)[0])
