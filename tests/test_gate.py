"""The promotion gate on synthetic per-example losses (nats/token, lower is better)."""

import json
import time

import numpy as np
import pytest

from lora_pipeline.errors import PipelineError
from lora_pipeline.gate import Comparison, Decision, compare, decide

N = 300


def losses(seed: int = 1):
    """Per-example base losses that vary a lot between examples (easy and hard ones), and a
    generator for the small per-example noise of a model close to another."""
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 0.5, N).clip(0.1), rng


def near(model, shift: float, rng, noise: float = 0.05):
    """`model` shifted by exactly `shift` on average, with zero-mean per-example noise."""
    e = rng.normal(0, noise, N)
    return model + shift + (e - e.mean())


def test_a_clear_win_is_promoted():
    base, rng = losses()
    champion = near(base, -0.5, rng)
    candidate = near(champion, -0.1, rng)
    d = decide(candidate, base, champion, margin=0.01, champion_name="lora_old")
    assert d.promoted, d.reason
    vs_base, vs_champ = d.comparisons
    assert (vs_base.name, vs_champ.name) == ("vs base", "vs champion")
    assert vs_base.high < 0 and vs_champ.high < 0
    assert vs_champ.mean_diff == pytest.approx(-0.1)
    assert d.reason.startswith("promoted: better than the base model by 0.600 nats/token")
    assert "better than the champion lora_old by 0.100" in d.reason and "margin" not in d.reason


def test_the_first_candidate_needs_only_to_beat_the_base():
    base, rng = losses()
    d = decide(near(base, -0.2, rng), base, margin=0.0)
    assert d.promoted and len(d.comparisons) == 1 and "no champion yet" in d.reason


def test_a_clear_loss_against_the_champion_is_rejected_with_its_numbers():
    base, rng = losses()
    champion = near(base, -0.5, rng)
    candidate = near(champion, 0.041, rng, noise=0.1)
    d = decide(candidate, base, champion, margin=0.01, champion_name="lora_x")
    vs_champ = d.comparisons[1]
    assert not d.promoted
    assert vs_champ.low > 0.01  # the whole interval is beyond the margin
    assert d.reason == (f"rejected: worse than the champion lora_x by 0.041 nats/token "
                        f"(95% CI {vs_champ.low:.3f} to {vs_champ.high:.3f}), beyond the margin 0.01")


def test_pairing_finds_a_difference_smaller_than_the_spread_between_examples():
    base, rng = losses()
    champion = near(base, -0.5, rng)
    candidate = near(champion, -0.02, rng, noise=0.01)
    # Each model's mean alone has a standard error larger than the difference between them ...
    assert champion.std() / np.sqrt(N) > 0.02
    # ... and the per-example differences still show it clearly.
    c = compare(candidate, champion, name="vs champion")
    assert c.high < 0 and c.mean_diff == pytest.approx(-0.02)


def test_a_tie_within_noise_is_promoted_within_the_margin_and_rejected_with_margin_zero():
    base, rng = losses()
    champion = near(base, -0.5, rng)
    tie = near(champion, 0.0, rng)
    d = decide(tie, base, champion, margin=0.02, champion_name="lora_x")
    assert d.promoted, d.reason
    assert d.comparisons[1].low < 0 < d.comparisons[1].high <= 0.02
    assert "within the margin 0.02" in d.reason
    # Margin 0, as documented: the candidate must be at least as good for certain.
    d0 = decide(tie, base, champion, margin=0.0, champion_name="lora_x")
    assert not d0.promoted
    assert d0.reason.startswith("rejected: possibly worse than the champion lora_x by up to")
    assert "beyond the margin 0" in d0.reason
    slightly_worse = near(champion, 0.003, rng)
    assert not decide(slightly_worse, base, champion, margin=0.0).promoted
    assert decide(slightly_worse, base, champion, margin=0.02).promoted


def test_not_better_than_the_base_is_rejected():
    base, rng = losses()
    for candidate in (near(base, 0.0, rng), near(base, 0.3, rng), base.copy()):
        d = decide(candidate, base, margin=0.01)
        assert not d.promoted
        assert d.reason.startswith("rejected: not clearly better than the base model"), d.reason
    # Even when it matches the champion, a champion that did not beat the base is no excuse.
    same = near(base, 0.0, rng)
    assert not decide(same, base, same, margin=0.01).promoted


def test_the_interval_has_the_width_of_a_mean_of_n_differences():
    rng = np.random.default_rng(3)
    diff = rng.normal(0, 1, N)
    c = compare(diff, np.zeros(N), name="x")
    expected = 2 * 1.96 * diff.std(ddof=1) / np.sqrt(N)
    assert c.high - c.low == pytest.approx(expected, rel=0.1)
    assert c.low < c.mean_diff < c.high and c.n == N
    narrower = compare(diff, np.zeros(N), name="x", confidence=0.5)
    assert narrower.high - narrower.low < 0.5 * (c.high - c.low)


def test_the_same_seed_gives_the_same_decision():
    base, rng = losses()
    candidate = near(base, -0.005, rng)
    a = decide(candidate, base, margin=0.0, seed=7)
    assert a == decide(list(candidate), list(base), margin=0.0, seed=7)
    other = compare(candidate, base, name="vs base", seed=8)
    assert (other.low, other.high) != (a.comparisons[0].low, a.comparisons[0].high)
    assert other.low == pytest.approx(a.comparisons[0].low, abs=0.002)


def test_a_decision_survives_json():
    base, rng = losses()
    d = decide(near(base, -0.2, rng), base, near(base, -0.1, rng), margin=0.01, champion_name="lora_x")
    back = Decision.from_json(json.loads(json.dumps(d.to_json(), allow_nan=False)))
    assert back == d and isinstance(back.comparisons[0], Comparison)


def test_ten_thousand_resamples_of_five_hundred_examples_are_quick():
    rng = np.random.default_rng(0)
    a, b = rng.normal(2, 0.5, 500), rng.normal(2, 0.5, 500)
    compare(a, b, name="warm-up", resamples=100)
    started = time.perf_counter()
    compare(a, b, name="x", resamples=10000)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("candidate, other, words", [
    ([1.0, 2.0, 3.0], [1.0, 2.0], "3 candidate scores against 2"),
    ([], [], "0 evaluation example"),
    ([1.0], [2.0], "needs at least 2"),
    ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], "NaN or infinite"),
    ([1.0, 2.0, 3.0], [1.0, float("inf"), 3.0], "NaN or infinite"),
])
def test_scores_that_cannot_be_compared_are_refused(candidate, other, words):
    with pytest.raises(PipelineError, match=words):
        compare(candidate, other, name="vs base")
    with pytest.raises(PipelineError, match=words):
        decide(candidate, other, margin=0.01)


def test_a_bad_margin_or_confidence_is_refused():
    with pytest.raises(PipelineError, match="margin"):
        decide([1.0, 2.0], [2.0, 3.0], margin=-0.1)
    with pytest.raises(PipelineError, match="margin"):
        decide([1.0, 2.0], [2.0, 3.0], margin=float("nan"))
    with pytest.raises(PipelineError, match="confidence"):
        compare([1.0, 2.0], [2.0, 3.0], name="x", confidence=95)
