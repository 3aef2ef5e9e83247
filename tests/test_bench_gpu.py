"""The GPU benchmark runs end to end on the CPU, on tiny models (its DRY_RUN): a GPU machine's
time then goes to measuring, not to finding a mistake in the benchmark."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_throughput


@pytest.mark.slow
def test_the_gpu_benchmark_runs_every_variant_but_compiled_ones_on_the_cpu():
    written = {}
    record = gpu_throughput.main(quick=True, write=lambda name, r: written.update({name: r}),
                                 setup=gpu_throughput.DRY_RUN)
    assert list(written) == ["throughput_gpu_dry_run"]  # never the GPU figures' file
    small, large = record["models"]["smollm2-135m"], record["models"]["smollm2-1.7b-shape"]
    measured = [*small["variants"].values(), *small["chats"]["variants"].values(), *large["variants"].values()]
    assert set(small["variants"]) == {"plain_peft_loop", "engine", "engine_batch_4", "engine_batch_8"}
    assert set(small["chats"]["variants"]) == {"plain_peft_loop", "engine", "engine_packed", "pipeline"}
    for figures in measured:
        assert "error" not in figures, figures.get("traceback")
        assert figures["trained_tokens_per_s"] > 0 and figures["tflops"] >= 0
    # The same model and batches: the same loss before any update, however computed.
    for group in (small["variants"], small["chats"]["variants"], large["variants"]):
        first = [v["first_loss_per_token"] for k, v in group.items() if k in ("plain_peft_loop", "engine", "engine_packed")]
        assert max(first) - min(first) < 1e-4, first
    assert small["generation"]["batched"]["tokens"] > 0 and small["generation"]["speedup"] > 0
    assert all(r is not None for r in (small["engine_over_plain"], large["engine_over_plain"],
                                        small["chats"]["packed_over_padded"]))
