"""The promotion gate: is a candidate adapter better than the base model, and not worse than the
champion, on the same evaluation examples? Scores are per example (held-out loss in nats/token,
lower is better), aligned by example index. Paired: examples differ in difficulty far more than
two adapters differ from each other, and the per-example difference cancels the difficulty; two
means, each with its own interval, would overlap and hide a real improvement or regression."""

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .errors import PipelineError

# Bounds the memory of one bootstrap batch (index and value arrays of this many elements).
_CHUNK = 2_000_000


@dataclass(frozen=True)
class Comparison:
    name: str  # "vs base", "vs champion"
    mean_diff: float  # candidate minus other: negative means the candidate is better
    low: float  # confidence interval of mean_diff
    high: float
    n: int
    confidence: float = 0.95

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str  # one line, with the numbers
    comparisons: list[Comparison]

    def to_json(self) -> dict:
        return asdict(self)  # the comparisons too

    @classmethod
    def from_json(cls, obj: dict) -> "Decision":
        return cls(bool(obj["promoted"]), obj["reason"], [Comparison(**c) for c in obj["comparisons"]])


def compare(candidate: Sequence[float], other: Sequence[float], *, name: str, confidence: float = 0.95,
            resamples: int = 10000, seed: int = 0) -> Comparison:
    """The mean of the paired differences `candidate - other` and its bootstrap confidence interval."""
    cand, oth = np.asarray(candidate, dtype=float), np.asarray(other, dtype=float)
    if cand.ndim != 1 or oth.ndim != 1 or len(cand) != len(oth):
        raise PipelineError(f"{name}: {cand.size} candidate scores against {oth.size}: score both models on the "
                            "same evaluation examples, in the same order")
    if len(cand) < 2:
        raise PipelineError(f"{name}: {len(cand)} evaluation example(s); a confidence interval needs at least 2 "
                            "(a few hundred for a useful one): add examples to the evaluation set")
    if not (np.isfinite(cand).all() and np.isfinite(oth).all()):
        raise PipelineError(f"{name}: a per-example score is NaN or infinite (a diverged model or an empty "
                            "example): fix the evaluation before comparing")
    if not 0 < confidence < 1 or resamples < 1:
        raise PipelineError(f"{name}: confidence must lie between 0 and 1 and resamples be at least 1 "
                            f"(got {confidence}, {resamples})")
    diff = cand - oth
    n = len(diff)
    # The statistic is a mean over a few hundred examples: its bootstrap distribution is nearly
    # symmetric and unbiased, where the plain percentile interval is as good as BCa and simpler.
    # Seeded, so the same scores always give the same decision.
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK // n)
    means = np.concatenate([diff[rng.integers(0, n, size=(min(rows, resamples - i), n))].mean(axis=1)
                            for i in range(0, resamples, rows)])
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return Comparison(name, float(diff.mean()), float(low), float(high), n, confidence)


def _num(x: float) -> str:
    return f"{x + 0.0:.3f}".replace("-0.000", "0.000")


def _said(c: Comparison, who: str) -> str:
    """'better than WHO by X nats/token (95% CI a to b)', the interval in the same direction."""
    level = f"{c.confidence * 100:g}% CI"
    if _num(c.mean_diff) == "0.000":
        return f"no different from {who} on average ({level} of the difference {_num(c.low)} to {_num(c.high)})"
    if c.mean_diff < 0:
        return f"better than {who} by {_num(-c.mean_diff)} nats/token ({level} {_num(-c.high)} to {_num(-c.low)})"
    return f"worse than {who} by {_num(c.mean_diff)} nats/token ({level} {_num(c.low)} to {_num(c.high)})"


def decide(candidate: Sequence[float], base: Sequence[float], champion: Sequence[float] | None = None, *,
           margin: float, champion_name: str | None = None, confidence: float = 0.95, seed: int = 0) -> Decision:
    """Promoted iff the whole interval vs the base lies below 0 (a clear improvement) and, when there
    is a champion, the interval's upper end vs the champion is at most `margin` (the candidate may
    be worse than the champion, but provably by no more than `margin`). With margin 0 a tie within
    noise is rejected: the champion stays unless the candidate is at least as good for certain."""
    if not (math.isfinite(margin) and margin >= 0):
        raise PipelineError(f"the promotion margin must be a number >= 0 (nats/token), not {margin}")
    vs_base = compare(candidate, base, name="vs base", confidence=confidence, seed=seed)
    comparisons, failed, passed = [vs_base], [], []
    if vs_base.high < 0:
        passed.append(_said(vs_base, "the base model"))
    else:
        failed.append(f"not clearly better than the base model: {_said(vs_base, 'it')}")
    if champion is None:
        passed.append("no champion yet")
    else:
        who = f"the champion {champion_name}" if champion_name else "the champion"
        vs_champ = compare(candidate, champion, name="vs champion", confidence=confidence, seed=seed)
        comparisons.append(vs_champ)
        if vs_champ.high < 0:  # clearly better: the margin did not come into it
            passed.append(_said(vs_champ, who))
        elif vs_champ.high <= margin:
            passed.append(_said(vs_champ, who) + f", within the margin {margin:g}")
        elif vs_champ.low > margin:
            failed.append(_said(vs_champ, who) + f", beyond the margin {margin:g}")
        else:  # inconclusive: it may be worse by more than the margin, and the champion stays
            failed.append(f"possibly worse than {who} by up to {_num(vs_champ.high)} nats/token, beyond the margin "
                          f"{margin:g} (mean {_num(vs_champ.mean_diff)}, {confidence * 100:g}% CI "
                          f"{_num(vs_champ.low)} to {_num(vs_champ.high)})")
    reason = ("rejected: " + "; ".join(failed)) if failed else ("promoted: " + "; ".join(passed))
    return Decision(not failed, reason, comparisons)
