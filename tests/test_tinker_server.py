"""The real tinker SDK (0.38) against tests/tinker_server.py: the happy path and every fault kind.

The fault tests also pin down what the SDK itself does (its own retries, what blocks, what
a timeout leaves running), which the engine's deadline handling relies on. Measured with
default SDK settings against this server (too slow to be tests):

- hung create_session / client_config: the first ``create_*`` call blocks the caller's
  thread ~716 s (11 attempts x 60 s read timeout + backoff), then ``APITimeoutError``.
- 500/429/drop forever on create_session: 11 attempts, ~56-61 s, then
  ``InternalServerError`` / ``RateLimitError`` / ``APIConnectionError``.
- 500 forever on optim_step (forward_backward alike) submission: ~302 s (5 rounds of
  11 HTTP attempts), then ``InternalServerError`` from ``result()``; on save_state
  (``max_retries=0``): 15 attempts, 300 s. On sample: never gives up (a new 300 s round
  follows each), bounded only by the 120 min stuck-detection.
- hang forever on optim_step submission: ~719 s (11 attempts), then ``APITimeoutError``;
  meanwhile later ops on that TrainingClient are not submitted.
- hang once on a submission: the SDK resubmits after 60.5 s; hang once on retrieve_future:
  re-polled after 46 s (45 s timeout + 1 s backoff).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import tinker
import torch
from tinker_server import DEFAULT_SAMPLE_TOKENS, TinkerTestServer, service_client

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # deprecated-but-supported SDK calls

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QWEN = "Qwen/Qwen3-8B"


def make_datum(tokens: list[int]) -> tinker.Datum:
    inputs, targets = tokens[:-1], tokens[1:]
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(inputs),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_torch(torch.tensor(targets, dtype=torch.int64)),
            "weights": tinker.TensorData.from_torch(torch.ones(len(targets), dtype=torch.float32)),
        },
    )


DATA = [make_datum([1, 2, 3, 4, 5, 6]), make_datum([7, 8, 9])]  # target lengths 5 and 2


def mean_nll(out: tinker.ForwardBackwardOutput) -> float:
    total = sum(float(o["logprobs"].to_torch().sum()) for o in out.loss_fn_outputs)
    return -total / sum(len(d.loss_fn_inputs["target_tokens"].data) for d in DATA)


def counts(server: TinkerTestServer, op: str, since: float) -> int:
    return sum(1 for o, t in server.requests if o == op and t >= since)


@pytest.fixture
def server():
    with TinkerTestServer() as s:
        yield s


@pytest.fixture
def service(server):
    with service_client(server) as sc:
        yield sc


@pytest.fixture
def trainer(service):
    return service.create_lora_training_client(SMOL, rank=8, seed=3).result(timeout=10)


# ----- happy path -------------------------------------------------------------------------


def test_capabilities_default_and_configured(server, service):
    names = [m.model_name for m in service.get_server_capabilities().supported_models]
    assert SMOL in names and QWEN in names
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    assert [m.model_name for m in rest.get_server_capabilities().result(timeout=10).supported_models] == names

    with TinkerTestServer(models=["acme/tiny-1"]) as other, service_client(other) as sc:
        caps = sc.get_server_capabilities()
        assert [m.model_name for m in caps.supported_models] == ["acme/tiny-1"]
        assert caps.supported_models[0].trainable and caps.supported_models[0].sampleable


def test_service_client_does_no_io_until_first_create(server):
    tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
    assert server.requests == []


def test_training_steps_loss_falls_and_checkpoints(server, service, trainer):
    assert server.count("create_session") == 1
    run = server.runs[trainer.model_id]
    assert (run.base_model, run.rank, run.seed, run.steps) == (SMOL, 8, 3, 0)
    info = trainer.get_info()
    assert info.model_id == trainer.model_id and info.lora_rank == 8
    assert info.model_data.model_name == SMOL

    # Submit all three steps before waiting for any.
    futures = [
        (trainer.forward_backward(DATA, "cross_entropy"), trainer.optim_step(tinker.AdamParams(learning_rate=1e-4)))
        for _ in range(3)
    ]
    outs = [(fb.result(timeout=10), opt.result(timeout=10)) for fb, opt in futures]
    losses = [mean_nll(fb) for fb, _ in outs]
    assert losses[0] > losses[1] > losses[2]
    assert losses[0] == pytest.approx(3.0)
    for fb, _ in outs:
        assert [o["logprobs"].shape for o in fb.loss_fn_outputs] == [[5], [2]]
        assert fb.metrics["loss:sum"] == pytest.approx(-sum(float(o["logprobs"].to_torch().sum()) for o in fb.loss_fn_outputs))
    assert run.steps == 3
    assert run.last_optim_params["learning_rate"] == pytest.approx(1e-4)

    fwd = trainer.forward(DATA, "cross_entropy").result(timeout=10)
    assert mean_nll(fwd) == pytest.approx(3.0 * 0.9**3, rel=1e-5)
    assert run.steps == 3  # forward does not train

    state = trainer.save_state("step-3").result(timeout=10)
    assert state.path == f"tinker://{trainer.model_id}/weights/step-3"
    sampler = trainer.save_weights_for_sampler("step-3").result(timeout=10)
    assert sampler.path == f"tinker://{trainer.model_id}/sampler_weights/step-3"
    assert [(c.name, c.type, c.path, c.step) for c in run.checkpoints] == [
        ("step-3", "training", state.path, 3),
        ("step-3", "sampler", sampler.path, 3),
    ]

    rest = service.create_rest_client()
    runs = rest.list_training_runs().result(timeout=10)
    assert [r.training_run_id for r in runs.training_runs] == [trainer.model_id]
    assert runs.training_runs[0].lora_rank == 8 and runs.training_runs[0].base_model == SMOL
    assert runs.training_runs[0].last_checkpoint.tinker_path == state.path
    ckpts = rest.list_checkpoints(trainer.model_id).result(timeout=10)
    assert [(c.checkpoint_type, c.tinker_path) for c in ckpts.checkpoints] == [
        ("training", state.path),
        ("sampler", sampler.path),
    ]
    assert rest.get_training_run(trainer.model_id).result(timeout=10).training_run_id == trainer.model_id


def test_resume_from_state_with_optimizer_and_sample(server, service, trainer):
    for _ in range(2):
        trainer.forward_backward(DATA, "cross_entropy")
        trainer.optim_step(tinker.AdamParams(learning_rate=1e-4))
    state = trainer.save_state("mid").result(timeout=10)
    sampler_path = trainer.save_weights_for_sampler("mid").result(timeout=10).path

    resumed = service.create_training_client_from_state_with_optimizer(state.path).result(timeout=10)
    assert resumed.model_id != trainer.model_id
    new_run = server.runs[resumed.model_id]
    assert (new_run.steps, new_run.resumed_from, new_run.optimizer_restored) == (2, state.path, True)
    assert (new_run.base_model, new_run.rank) == (SMOL, 8)
    loss_before = mean_nll(resumed.forward_backward(DATA, "cross_entropy").result(timeout=10))
    resumed.optim_step(tinker.AdamParams()).result(timeout=10)
    loss_after = mean_nll(resumed.forward(DATA, "cross_entropy").result(timeout=10))
    assert loss_before == pytest.approx(3.0 * 0.9**2, rel=1e-5) and loss_after < loss_before

    with pytest.raises(tinker.RequestFailedError):
        service.create_training_client_from_state_with_optimizer(
            f"tinker://{trainer.model_id}/weights/missing"
        ).result(timeout=10)

    prompt = tinker.ModelInput.from_ints([1, 2, 3])
    sc = service.create_sampling_client(model_path=sampler_path).result(timeout=10)
    short = sc.sample(prompt, 2, tinker.SamplingParams(max_tokens=3, temperature=0.7)).result(timeout=10)
    assert len(short.sequences) == 2
    for seq in short.sequences:
        assert seq.tokens == server.sample_tokens[:3] and seq.stop_reason == "length"
        assert seq.logprobs == pytest.approx([-3.0 * 0.9**2] * 3, rel=1e-5)
    full = sc.sample(prompt, 1, tinker.SamplingParams(max_tokens=50)).result(timeout=10)
    assert full.sequences[0].tokens == server.sample_tokens and full.sequences[0].stop_reason == "stop"

    base = service.create_sampling_client(base_model=QWEN).result(timeout=10)
    out = base.sample(prompt, 1, tinker.SamplingParams(max_tokens=50)).result(timeout=10)
    assert out.sequences[0].logprobs == pytest.approx([-3.0] * len(server.sample_tokens))

    quick = trainer.save_weights_and_get_sampling_client().result(timeout=10)
    assert quick.sample(prompt, 1, tinker.SamplingParams(max_tokens=2)).result(timeout=10).sequences[0].tokens == (
        server.sample_tokens[:2]
    )


def test_async_variants(server):
    async def main() -> list[float]:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        tc = await sc.create_lora_training_client(SMOL, rank=4)  # session creation blocks this loop
        losses = []
        for _ in range(2):
            fb = tc.forward_backward(DATA, "cross_entropy")
            opt = tc.optim_step(tinker.AdamParams())
            losses.append(mean_nll(await fb))
            await opt.result_async(timeout=10)
        path = (await tc.save_weights_for_sampler("a")).path
        sampler = await sc.create_sampling_client(model_path=path)
        res = await sampler.sample(tinker.ModelInput.from_ints([1]), 1, tinker.SamplingParams(max_tokens=4))
        assert res.sequences[0].tokens == server.sample_tokens[:4]
        await sc.close("success")
        return losses

    losses = asyncio.run(main())
    assert losses[0] > losses[1]


def test_unknown_base_model_is_bad_request(service):
    with pytest.raises(tinker.BadRequestError, match="not supported"):
        service.create_lora_training_client("nope/unknown-model").result(timeout=10)
    with pytest.raises(tinker.BadRequestError):
        service.create_sampling_client(base_model="nope/unknown-model").result(timeout=10)


# ----- faults -----------------------------------------------------------------------------


def test_hang_on_submission_times_out_caller_and_blocks_the_clients_queue(server, trainer):
    server.fault("optim_step", "hang", times=1)
    t0 = time.monotonic()
    hung = trainer.optim_step(tinker.AdamParams())
    with pytest.raises(TimeoutError):
        hung.result(timeout=2)
    assert 1.9 < time.monotonic() - t0 < 4
    # Requests on one TrainingClient are submitted in order: the next one waits behind the
    # hung submission (the SDK only retries it after its 60 s read timeout).
    nxt = trainer.forward(DATA, "cross_entropy")
    with pytest.raises(TimeoutError):
        nxt.result(timeout=1)
    assert counts(server, "optim_step", t0) == 1 and counts(server, "forward", t0) == 0
    # Stopping the server does not wait for the hung request.
    t1 = time.monotonic()
    server.stop()
    assert time.monotonic() - t1 < 1.5


def test_hang_on_create_session_blocks_the_callers_thread(server, service):
    sc = service
    server.fault("create_session", "hang")
    outcome: list[object] = []

    def create() -> None:
        try:
            outcome.append(sc.create_lora_training_client(SMOL))  # blocks here, no future yet
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=create, daemon=True)
    t.start()
    t.join(timeout=3)
    assert t.is_alive() and outcome == []
    assert server.count("create_session") == 1  # no SDK retry before its 60 s read timeout
    t1 = time.monotonic()
    server.stop()
    assert time.monotonic() - t1 < 1.5


def test_slow_answer(server, trainer):
    server.fault("optim_step", "slow", delay=1.5, times=1)
    t0 = time.monotonic()
    fut = trainer.optim_step(tinker.AdamParams())
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.5)
    fut.result(timeout=10)
    assert time.monotonic() - t0 >= 1.5
    assert counts(server, "optim_step", t0) == 1


@pytest.mark.parametrize("status", ["500", "429"])
def test_transient_status_on_submission_is_retried_by_sdk(server, trainer, status):
    server.fault("optim_step", status, times=2)
    t0 = time.monotonic()
    trainer.optim_step(tinker.AdamParams()).result(timeout=20)
    assert counts(server, "optim_step", t0) == 3  # the SDK's HTTP layer retried twice itself
    assert time.monotonic() - t0 < 5  # backoff 0.5 s, 1 s (x0.75..1 jitter)
    assert server.runs[trainer.model_id].steps == 1


def test_500_on_create_session_is_retried_by_sdk(server, service):
    server.fault("create_session", "500", times=2)
    sc = service
    t0 = time.monotonic()
    tc = sc.create_lora_training_client(SMOL).result(timeout=20)
    assert server.count("create_session") == 3 and time.monotonic() - t0 < 5
    assert tc.model_id in server.runs


def test_500_on_retrieve_future_is_repolled(server, trainer):
    server.fault("retrieve_future:optim_step", "500", times=3)
    t0 = time.monotonic()
    trainer.optim_step(tinker.AdamParams()).result(timeout=10)
    assert counts(server, "retrieve_future", t0) == 4  # re-polled at once, no backoff
    assert time.monotonic() - t0 < 2


def test_drop_is_retried_by_sdk(server, trainer):
    server.fault("optim_step", "drop", times=1)
    t0 = time.monotonic()
    trainer.optim_step(tinker.AdamParams()).result(timeout=20)
    assert counts(server, "optim_step", t0) == 2
    assert server.runs[trainer.model_id].steps == 1


def test_try_again_then_result(server, trainer):
    server.fault("optim_step", "try_again", times=5)
    t0 = time.monotonic()
    trainer.optim_step(tinker.AdamParams()).result(timeout=10)
    assert counts(server, "retrieve_future", t0) == 6
    assert counts(server, "optim_step", t0) == 1


def test_try_again_forever_sync_timeout_keeps_polling_async_timeout_cancels(server, trainer):
    server.fault("optim_step", "try_again")
    fut = trainer.optim_step(tinker.AdamParams())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        fut.result(timeout=1)
    assert time.monotonic() - t0 < 2
    # result(timeout) only stops waiting: the SDK keeps polling in the background.
    t1 = time.monotonic()
    time.sleep(0.6)
    assert counts(server, "retrieve_future", t1) >= 3
    assert not fut.future().done()

    async def wait_async() -> None:
        await fut.result_async(timeout=0.5)

    with pytest.raises(TimeoutError):
        asyncio.run(wait_async())
    # result_async(timeout) cancels the operation: polling stops and the future is cancelled.
    assert fut.future().cancelled()
    time.sleep(0.3)
    t2 = time.monotonic()
    time.sleep(0.5)
    assert counts(server, "retrieve_future", t2) == 0
    # The client stays usable.
    server.clear_faults()
    trainer.optim_step(tinker.AdamParams()).result(timeout=10)


def test_fail_resolves_future_with_request_failed(server, trainer):
    server.fault("optim_step", "fail", times=1)
    with pytest.raises(tinker.RequestFailedError, match="injected failure"):
        trainer.optim_step(tinker.AdamParams()).result(timeout=10)
    assert server.runs[trainer.model_id].steps == 0
    trainer.optim_step(tinker.AdamParams()).result(timeout=10)
    assert server.runs[trainer.model_id].steps == 1


def test_401_fault_raises_authentication_error_without_retry(server, trainer):
    server.fault("optim_step", "401", times=1)
    t0 = time.monotonic()
    with pytest.raises(tinker.AuthenticationError):
        trainer.optim_step(tinker.AdamParams()).result(timeout=10)
    assert counts(server, "optim_step", t0) == 1


def test_rejected_key_fails_first_create_call_synchronously(server):
    server.reject_key = "tml-revoked"
    sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-revoked")
    with pytest.raises(tinker.AuthenticationError):
        sc.create_lora_training_client(SMOL)  # raised by the call itself: no future
    assert server.requests and [op for op, _ in server.requests] == ["client_config"]
    assert server.request_log[0].api_key == "tml-revoked"


def test_sample_faults(server, service):
    sc = service.create_sampling_client(base_model=SMOL).result(timeout=10)
    prompt = tinker.ModelInput.from_ints([1, 2])
    server.fault("sample", "429", times=2)
    t0 = time.monotonic()
    sc.sample(prompt, 1, tinker.SamplingParams(max_tokens=2)).result(timeout=20)
    assert counts(server, "sample", t0) == 3  # 429 on sample: SDK backs off ~1 s and resubmits
    server.fault("sample", "hang", times=1)
    with pytest.raises(TimeoutError):
        sc.sample(prompt, 1, tinker.SamplingParams(max_tokens=2)).result(timeout=1)


def test_stop_is_prompt_with_many_hung_requests():
    server = TinkerTestServer().start()
    server.fault("get_server_capabilities", "hang")
    rest = tinker.RestClient(base_url=server.base_url, api_key=server.api_key)
    futures = [rest.get_server_capabilities() for _ in range(5)]
    deadline = time.monotonic() + 5
    while server.count("get_server_capabilities") < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.count("get_server_capabilities") == 5
    assert not any(f.future().done() for f in futures)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 1.5


def test_cancelling_a_queued_training_op_wedges_the_client(server, trainer):
    """SDK 0.38 fact: a TrainingClient op cancelled while queued behind an unfinished
    submission (``future().cancel()``, or ``result_async(timeout)`` expiring) never gives up
    its turn, so no later op on that client is ever submitted. Cancelling the in-flight
    submission itself is fine. A deadline wrapper must not cancel queued ops."""
    server.fault("optim_step", "slow", delay=1.0, times=1)
    slow = trainer.optim_step(tinker.AdamParams())
    queued = trainer.forward(DATA, "cross_entropy")
    time.sleep(0.2)
    assert queued.future().cancel()
    slow.result(timeout=5)
    later = trainer.optim_step(tinker.AdamParams())
    with pytest.raises(TimeoutError):
        later.result(timeout=1.5)
    assert server.count("forward") == 0 and server.count("optim_step") == 1
    later.future().cancel()  # release the stuck task


# ----- validation, as the service's ---------------------------------------------------------


def datum(tokens: list[int], loss_fn: str = "cross_entropy", **inputs: torch.Tensor) -> tinker.Datum:
    """A datum for `loss_fn` with its usual inputs (ones), any of them replaced by `inputs`;
    an input given as None is left out."""
    n = len(tokens) - 1
    defaults = {"target_tokens": torch.tensor(tokens[1:], dtype=torch.int64)}
    if loss_fn == "cross_entropy":
        defaults["weights"] = torch.ones(n)
    else:
        defaults.update(logprobs=torch.zeros(n), advantages=torch.ones(n))
    merged = {**defaults, **inputs}
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={k: tinker.TensorData.from_torch(v) for k, v in merged.items() if v is not None},
    )


@pytest.mark.parametrize("rank", [0, -4, 129])
def test_lora_rank_outside_the_range_is_a_bad_request(server, service, rank):
    with pytest.raises(tinker.BadRequestError, match="LoRA rank must be an integer from 1 to 128"):
        service.create_lora_training_client(SMOL, rank=rank).result(timeout=10)
    assert server.runs == {}
    assert service.create_lora_training_client(SMOL, rank=128).result(timeout=10).model_id in server.runs


@pytest.mark.parametrize("params, message", [
    (dict(learning_rate=-1e-4), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=0.0), "learning_rate must be a finite number > 0"),
    (dict(beta1=1.0), "beta1 must be in"),
    (dict(eps=0.0), "eps must be a finite number > 0"),
    (dict(weight_decay=-0.1), "weight_decay must be"),
])
def test_adam_parameters_out_of_range_are_refused_and_not_applied(server, trainer, params, message):
    with pytest.raises(tinker.BadRequestError, match=message):
        trainer.optim_step(tinker.AdamParams(**params)).result(timeout=10)
    assert server.runs[trainer.model_id].steps == 0
    trainer.optim_step(tinker.AdamParams(learning_rate=1e-4)).result(timeout=10)  # the client still works
    assert server.runs[trainer.model_id].steps == 1


def test_unknown_loss_fn_is_a_bad_request(trainer):
    with pytest.raises(tinker.BadRequestError, match="Unknown loss_fn 'nonsense'"):
        trainer.forward_backward(DATA, "nonsense").result(timeout=10)
    with pytest.raises(tinker.BadRequestError, match="'ppo' is not simulated"):  # Tinker's, not ours
        trainer.forward(DATA, "ppo").result(timeout=10)
    trainer.forward(DATA, "cross_entropy").result(timeout=10)


def user_error(future, match: str) -> tinker.RequestFailedError:
    with pytest.raises(tinker.RequestFailedError, match=match) as raised:
        future.result(timeout=10)
    assert raised.value.category == tinker.types.RequestErrorCategory.User
    return raised.value


def test_token_ids_outside_the_vocabulary_fail_as_user_errors(server, service, trainer):
    user_error(trainer.forward_backward([datum([1, 2, 3]), datum([5, 49152, 7])], "cross_entropy"),
               r"datum 1: model_input: token id 49152 at position 1 is outside the vocabulary of "
               r"HuggingFaceTB/SmolLM2-135M-Instruct \(49152 ids\)")
    user_error(trainer.forward(
        [datum([1, 2, 3], target_tokens=torch.tensor([2, -1]))], "cross_entropy"), "target_tokens: token id -1")
    sampler = service.create_sampling_client(base_model=SMOL).result(timeout=10)
    user_error(sampler.sample(tinker.ModelInput.from_ints([1, 60000]), 1, tinker.SamplingParams(max_tokens=2)),
               "prompt: token id 60000")
    # Qwen3's vocabulary is larger: the same id is fine there.
    qwen = service.create_sampling_client(base_model=QWEN).result(timeout=10)
    qwen.sample(tinker.ModelInput.from_ints([1, 60000]), 1, tinker.SamplingParams(max_tokens=2)).result(timeout=10)


@pytest.mark.parametrize("data, match", [
    ([datum([1, 2, 3, 4], weights=torch.ones(2))], "datum 0: weights has 2 values for 3 model input tokens"),
    ([datum([1, 2, 3], weights=None)], r"loss_fn_inputs for cross_entropy are target_tokens, weights; missing \['weights'\]"),
    ([datum([1, 2, 3], mask=torch.ones(2))], r"unexpected \['mask'\]"),
    ([datum([1, 2, 3], target_tokens=torch.tensor([2.0, 3.0]))], "target_tokens must be integers"),
    ([datum([1, 2, 3], "importance_sampling")], "loss_fn_inputs for cross_entropy"),  # inputs for another loss
])
def test_loss_fn_inputs_of_the_wrong_shape_fail_as_user_errors(server, trainer, data, match):
    user_error(trainer.forward_backward(data, "cross_entropy"), match)
    assert server.runs[trainer.model_id].steps == 0


def test_sequences_longer_than_the_context_fail_as_user_errors():
    with TinkerTestServer(max_context_length=8) as server, service_client(server) as sc:
        tc = sc.create_lora_training_client(SMOL, rank=4).result(timeout=10)
        tc.forward([datum(list(range(1, 10)))], "cross_entropy").result(timeout=10)  # 8 input tokens fit
        user_error(tc.forward([datum(list(range(1, 11)))], "cross_entropy"),
                   "9 tokens exceed the context length of HuggingFaceTB/SmolLM2-135M-Instruct \\(8\\)")
        sampler = sc.create_sampling_client(base_model=SMOL).result(timeout=10)
        prompt = tinker.ModelInput.from_ints([1, 2, 3, 4, 5])
        sampler.sample(prompt, 1, tinker.SamplingParams(max_tokens=3)).result(timeout=10)
        user_error(sampler.sample(prompt, 1, tinker.SamplingParams(max_tokens=4)), "5 tokens plus 4 to sample exceed")
        sc.close("success").result(timeout=5)


# ----- loss functions ----------------------------------------------------------------------------


def test_cross_entropy_weighs_each_token(trainer):
    half = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0])
    out = trainer.forward([datum([1, 2, 3, 4, 5, 6], weights=half)], "cross_entropy").result(timeout=10)
    assert out.metrics["loss:sum"] == pytest.approx(3.0 * float(half.sum()))
    assert out.loss_fn_outputs[0]["logprobs"].to_torch().tolist() == pytest.approx([-3.0] * 5)


def test_importance_sampling_weighs_advantages_by_the_probability_ratio(server, trainer):
    lp = -3.0  # the simulated logprob of every target token before training
    sampler_lp = torch.tensor([lp, lp + math.log(2.0), lp - math.log(4.0)])
    advantages = torch.tensor([1.0, -2.0, 0.5])
    data = [datum([5, 6, 7, 8], "importance_sampling", logprobs=sampler_lp, advantages=advantages)]
    out = trainer.forward_backward(data, "importance_sampling").result(timeout=10)
    # ratios exp(lp - sampler_lp): 1, 1/2, 4
    assert out.metrics["loss:sum"] == pytest.approx(-(1.0 * 1 + 0.5 * -2.0 + 4.0 * 0.5), rel=1e-5)
    assert out.loss_fn_outputs[0]["logprobs"].to_torch().tolist() == pytest.approx([lp] * 3)
    user_error(trainer.forward_backward([datum([5, 6, 7])], "importance_sampling"),
               r"missing \['advantages', 'logprobs'\]; unexpected \['weights'\]")


# ----- sampling --------------------------------------------------------------------------------


def sample(client, n=1, prompt=(1, 2, 3), **params) -> tinker.SampleResponse:
    return client.sample(tinker.ModelInput.from_ints(list(prompt)), n, tinker.SamplingParams(**params)).result(timeout=10)


@pytest.fixture
def base_sampler(service):
    return service.create_sampling_client(base_model=SMOL).result(timeout=10)


def test_stop_token_ids_strings_and_none(server, service):
    from lora_pipeline.models import load_tokenizer

    tok = load_tokenizer(SMOL)
    answer = tok.encode("Arr! The sea be calm.", add_special_tokens=False) + [2]
    with TinkerTestServer(sample_tokens=answer) as other, service_client(other) as sc:
        sampler = sc.create_sampling_client(base_model=SMOL).result(timeout=10)
        default = sample(sampler, max_tokens=40).sequences[0]  # stop=None: the answer, then its end
        assert (default.tokens, default.stop_reason) == (answer, "stop")
        at_id = sample(sampler, max_tokens=40, stop=[answer[2]]).sequences[0]  # the stop token is kept
        assert (at_id.tokens, at_id.stop_reason) == (answer[:3], "stop")
        at_text = sample(sampler, max_tokens=40, stop=["sea"]).sequences[0]
        assert tok.decode(at_text.tokens).endswith("The sea") and at_text.stop_reason == "stop"
        never = sample(sampler, max_tokens=40, stop=[]).sequences[0]  # no stop, not even the end
        assert (len(never.tokens), never.stop_reason) == (40, "length")
        assert never.tokens[: 2 * len(answer)] == answer + answer
        cut = sample(sampler, max_tokens=3).sequences[0]
        assert (cut.tokens, cut.stop_reason) == (answer[:3], "length")
        qwen = sc.create_sampling_client(base_model=QWEN).result(timeout=10)
        with pytest.raises(tinker.BadRequestError, match="text stop sequences need Qwen/Qwen3-8B's tokenizer"):
            sample(qwen, max_tokens=5, stop=["sea"])
        sc.close("success").result(timeout=5)


def test_num_samples_and_seeded_temperature(base_sampler):
    greedy = sample(base_sampler, 4, max_tokens=6, temperature=0.0)
    assert [s.tokens for s in greedy.sequences] == [list(DEFAULT_SAMPLE_TOKENS)] * 4
    cool = sample(base_sampler, 4, max_tokens=6, temperature=0.7)  # far below the margin: the answer
    assert [s.tokens for s in cool.sequences] == [list(DEFAULT_SAMPLE_TOKENS)] * 4

    hot = sample(base_sampler, 3, max_tokens=6, temperature=50.0, seed=11)
    tokens = [s.tokens for s in hot.sequences]
    assert len(tokens) == 3 and len({tuple(t) for t in tokens}) == 3  # one draw each
    assert any(t != list(DEFAULT_SAMPLE_TOKENS) for t in tokens)
    assert [s.tokens for s in sample(base_sampler, 3, max_tokens=6, temperature=50.0, seed=11).sequences] == tokens
    assert [s.tokens for s in sample(base_sampler, 3, max_tokens=6, temperature=50.0, seed=12).sequences] != tokens
    for seq in hot.sequences:  # tokens off the answer are reported less likely
        for i, (token, lp) in enumerate(zip(seq.tokens, seq.logprobs)):
            assert lp == pytest.approx(-3.0 if token == DEFAULT_SAMPLE_TOKENS[i] else -23.0)


@pytest.mark.parametrize("n, params, message", [
    (0, dict(max_tokens=4), "num_samples must be an integer >= 1"),
    (1, dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (1, dict(max_tokens=4, temperature=-0.5), "temperature must be a finite number >= 0"),
    (1, dict(max_tokens=4, top_p=0.0), "top_p must be in"),
    (1, dict(max_tokens=4, top_k=0), "top_k must be -1 or an integer >= 1"),
])
def test_sampling_parameters_out_of_range_are_bad_requests(base_sampler, n, params, message):
    with pytest.raises(tinker.BadRequestError, match=message):
        sample(base_sampler, n, **params)


def test_prompt_logprobs_and_topk(base_sampler):
    prompt = [7, 8, 9, 10]
    res = base_sampler.sample(tinker.ModelInput.from_ints(prompt), 1, tinker.SamplingParams(max_tokens=2),
                              include_prompt_logprobs=True, topk_prompt_logprobs=3).result(timeout=10)
    assert res.prompt_logprobs == [None, -3.0, -3.0, -3.0]
    topk = res.topk_prompt_logprobs
    assert topk[0] is None and len(topk) == len(prompt)
    for token, entries in zip(prompt[1:], topk[1:]):
        assert [t for t, _ in entries] == [token, token + 1, token + 2]  # the prompt's own token first
        assert [lp for _, lp in entries] == pytest.approx([-3.0, -4.0, -5.0])
    plain = sample(base_sampler, max_tokens=2)
    assert plain.topk_prompt_logprobs is None and plain.prompt_logprobs is None


def test_sampling_waits_on_retrieve_futures(server, base_sampler):
    before = server.count("retrieve_futures")
    results = [base_sampler.sample(tinker.ModelInput.from_ints([1]), 1, tinker.SamplingParams(max_tokens=3))
               for _ in range(4)]
    assert [r.result(timeout=10).sequences[0].tokens for r in results] == [list(DEFAULT_SAMPLE_TOKENS[:3])] * 4
    assert server.count("retrieve_futures") > before
    # The client tells the server what it has retrieved, and the server drops those payloads.
    sample(base_sampler, max_tokens=1)
    deadline = time.monotonic() + 5
    while any(f.op == "sample" for f in server._futures.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(f.op == "sample" for f in server._futures.values())
    # A failed sample is reported as such by the poll, then raised by the SDK.
    server.fault("sample", "fail", times=1)
    with pytest.raises(tinker.RequestFailedError, match="injected failure for sample"):
        sample(base_sampler, max_tokens=1)
    # The SDK waits on the poll: while it hangs, no result arrives even though one is ready.
    server.fault("retrieve_futures", "hang")
    pending = base_sampler.sample(tinker.ModelInput.from_ints([1]), 1, tinker.SamplingParams(max_tokens=1))
    with pytest.raises(TimeoutError):
        pending.result(timeout=1.5)
    pending.future().cancel()


def test_without_retrieve_futures_the_sdk_polls_each_future():
    with TinkerTestServer(retrieve_futures=False) as server:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key=server.api_key)
        sampler = sc.create_sampling_client(base_model=SMOL).result(timeout=10)
        assert sample(sampler, max_tokens=2).sequences[0].tokens == list(DEFAULT_SAMPLE_TOKENS[:2])
        assert server.count("retrieve_futures") == 0 and server.count("retrieve_future") >= 1
        sc.close("success").result(timeout=5)


# ----- external weights -----------------------------------------------------------------------


def test_external_weights_are_a_real_peft_adapter_behind_signed_urls(server, service, trainer):
    import httpx
    from safetensors.torch import load as load_safetensors

    rest = service.create_rest_client()
    fresh = trainer.save_weights_external("fresh").result(timeout=10).path
    assert fresh == f"tinker://{trainer.model_id}/external_weights/fresh"
    for _ in range(3):
        trainer.forward_backward(DATA, "cross_entropy")
        trainer.optim_step(tinker.AdamParams(learning_rate=1e-4)).result(timeout=10)
    trained = trainer.save_weights_external("trained").result(timeout=10).path

    def listed_size(path):
        ckpts = rest.list_checkpoints(trainer.model_id).result(timeout=10).checkpoints
        return next(c.size_bytes for c in ckpts if c.tinker_path == path and c.checkpoint_type == "external")

    assert listed_size(trained) is None  # built when first asked for
    files = {}
    for path in (fresh, trained):
        urls = rest.get_external_weights_urls(path).result(timeout=60).urls
        assert sorted(urls) == ["adapter_config.json", "adapter_model.safetensors"]
        files[path] = {name: httpx.get(url, timeout=10) for name, url in urls.items()}  # no API key
        assert all(r.status_code == 200 for r in files[path].values())
        assert listed_size(path) == sum(len(r.content) for r in files[path].values())

    config = files[trained]["adapter_config.json"].json()
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 8, SMOL)
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    tensors = {p: load_safetensors(files[p]["adapter_model.safetensors"].content) for p in (fresh, trained)}
    name_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert tuple(tensors[trained][name_b].shape) == (576, 8)
    assert len(tensors[trained]) == 30 * 7 * 2  # A and B for every projection of every layer
    assert float(tensors[fresh][name_b].abs().max()) == 0.0  # a fresh LoRA changes nothing
    assert float(tensors[trained][name_b].abs().max()) > 0.0
    name_a = name_b.replace("lora_B", "lora_A")
    assert torch.equal(tensors[fresh][name_a], tensors[trained][name_a])  # both from the run's seed


def test_external_weights_refusals(server, service, trainer):
    with pytest.raises(tinker.BadRequestError, match="age-encrypted"):
        trainer.save_weights_external("x", age_encryption_recipients=["age1qqq"]).result(timeout=10)
    trainer.save_weights_external("once").result(timeout=10)
    user_error(trainer.save_weights_external("once"), "already exists")
    qwen = service.create_lora_training_client(QWEN, rank=4).result(timeout=10)
    user_error(qwen.save_weights_external("q"), "exports weights of .*SmolLM2.* only, not Qwen/Qwen3-8B")
    rest = service.create_rest_client()
    with pytest.raises(tinker.NotFoundError):
        rest.get_external_weights_urls(f"tinker://{trainer.model_id}/external_weights/missing").result(timeout=10)


def test_download_faults_and_deleted_exports(server, service, trainer):
    import httpx

    rest = service.create_rest_client()
    path = trainer.save_weights_external("e").result(timeout=10).path
    url = rest.get_external_weights_urls(path).result(timeout=60).urls["adapter_model.safetensors"]
    full = httpx.get(url, timeout=10).content
    server.fault("download", "short", times=1)
    short = httpx.get(url, timeout=10)
    assert short.headers["content-length"] == str(len(short.content)) == str(len(full) // 2)
    server.fault("download", "truncate", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url, timeout=10)
    server.fault("download", "stall", times=1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=1)
    with pytest.raises(ValueError, match="applies to 'download' only"):
        server.fault("sample", "truncate")
    rest.delete_checkpoint_from_tinker_path(path).result(timeout=10)
    assert httpx.get(url, timeout=10).status_code == 404
