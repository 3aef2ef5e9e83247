"""tinker-cookbook's own supervised loop (``tinker_cookbook/supervised/train.py``, unmodified)
against tests/tinker_server.py: evidence that the server speaks the protocol as the service's
own clients use it, not only as this project does."""

import asyncio
import json

import pytest
import tinker
from tinker_cookbook import tokenizer_utils
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.data import FromConversationFileBuilder
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

from conftest import SAMPLE
from lora_pipeline.models import SMOLLM2, load_tokenizer
from tinker_server import TinkerTestServer

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture
def local_tokenizer():
    """The cookbook loads tokenizers from the hub, which is unreachable here; its registry takes
    a factory instead."""
    tokenizer = load_tokenizer(SMOLLM2)
    tokenizer_utils.register_tokenizer(SMOLLM2, lambda: tokenizer)
    yield tokenizer
    tokenizer_utils.unregister_tokenizer(SMOLLM2)


@pytest.fixture
def stop_its_heartbeats():
    """The cookbook's loop never closes its ServiceClient, so its sessions' heartbeats would go
    on in this test process after the server is gone (and the SDK warns of each for as long as
    the process lives). Afterwards, every Tinker client left open here stops them."""
    yield
    import gc

    from tinker.lib.internal_client_holder import InternalClientHolder

    for holder in [o for o in gc.get_objects() if isinstance(o, InternalClientHolder)]:
        holder.close()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cookbook_supervised_loop_trains_evaluates_saves_and_resumes(tmp_path, monkeypatch, local_tokenizer,
                                                                   stop_its_heartbeats):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:12]))
    log_path = tmp_path / "log"

    def config(max_steps: int) -> train.Config:
        return train.Config(
            log_path=str(log_path), model_name=SMOLLM2, recipe_name="lora_pipeline_test",
            renderer_name="qwen3_instruct", lora_rank=8, learning_rate=1e-4,
            dataset_builder=FromConversationFileBuilder(
                file_path=str(data), test_size=4,
                common_config=ChatDatasetBuilderCommonConfig(
                    model_name_for_tokenizer=SMOLLM2, renderer_name="qwen3_instruct",
                    max_length=256, batch_size=4)),
            num_epochs=2, save_every=2, eval_every=2, max_steps=max_steps, base_url=server.base_url,
        )

    with TinkerTestServer(models=[SMOLLM2]) as server:
        monkeypatch.setenv("TINKER_API_KEY", server.api_key)
        # The third step fails on the service's side: the loop stops with the error...
        server.fault("forward_backward", "fail", times=1, after=2)
        with pytest.raises(tinker.RequestFailedError, match="injected failure for forward_backward"):
            asyncio.run(train.main(config(max_steps=4)))
        # ...and the same command continues from its last saved state, to the end.
        asyncio.run(train.main(config(max_steps=4)))

    first, resumed = sorted(server.runs.values(), key=lambda r: r.created)
    assert first.rank == resumed.rank == 8
    assert resumed.optimizer_restored and resumed.resumed_from.startswith(f"tinker://{first.run_id}/weights/")
    assert resumed.steps >= 4  # the cookbook may replay a batch after resuming

    metrics = read_jsonl(log_path / "metrics.jsonl")
    nll = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert nll[0] > nll[-1]
    assert any("test/nll" in m for m in metrics)  # its evaluator sampled with prompt logprobs
    saved = read_jsonl(log_path / "checkpoints.jsonl")
    assert saved[-1]["name"] == "final"
    assert saved[-1]["sampler_path"].startswith(f"tinker://{resumed.run_id}/sampler_weights/")
    # Every token the cookbook's renderer produced passed the server's vocabulary and length checks.
    assert server.count("forward_backward") >= 4
