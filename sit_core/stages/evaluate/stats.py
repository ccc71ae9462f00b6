"""Uncertainty for every score, and paired comparisons between variants.

Every variant is scored on the same items, so a difference between two variants is judged on
the per-item differences (a paired bootstrap and an exact sign test), never on whether two
intervals overlap. A difference is called significant only when both agree at 95%: the
bootstrap interval of the mean difference excludes zero and the sign test's p < 0.05. The
bootstrap alone is too sure of itself on a handful of items; the sign test needs at least
SIGN_TEST_MIN items that all differ in one direction before it can say anything.

The intervals cover the noise of the examples only: each variant was trained once, with one
seed, so the spread between training runs is not in them.
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959964
ITERATIONS = 2000
# 2 * 0.5**k < 0.05 first holds at k = 6: fewer items that differ can never be significant.
SIGN_TEST_MIN = 6


def _rng(seed: int):
    import numpy as np

    return np.random.default_rng(seed)


def mean_interval(values: Sequence[float], seed: int, stderr: float | None = None) -> dict:
    """Mean, standard error and 95% interval over items. With `stderr` given (lm-eval's own),
    the interval is the normal one around it; otherwise a percentile bootstrap over items."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return {"value": None, "stderr": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(x.mean())
    if stderr is not None:  # a normal interval, kept within the values' range (a proportion stays in [0, 1])
        return {"value": mean, "stderr": stderr, "ci_low": max(float(x.min()), mean - Z95 * stderr),
                "ci_high": min(float(x.max()), mean + Z95 * stderr), "n": n}
    means = x[_rng(seed).integers(0, n, (ITERATIONS, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"value": mean, "stderr": float(means.std(ddof=1)), "ci_low": float(low), "ci_high": float(high), "n": n}


def sign_test(positive: int, negative: int) -> float:
    """Two-sided exact binomial p-value of `positive` vs `negative` non-zero differences."""
    n = positive + negative
    if n == 0:
        return 1.0
    k = min(positive, negative)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def resolution(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The smallest mean difference these items could show to be significant: for outcomes in
    steps (accuracy 0/1, win/tie/loss 1/0.5/0), SIGN_TEST_MIN items moved by one step out of n;
    for continuous values, the half-width of a normal interval of the mean difference. None
    when there are fewer than SIGN_TEST_MIN items: no difference could be significant."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(x)
    if n < SIGN_TEST_MIN:
        return None
    both = np.concatenate([x, y])
    if np.all(np.isin(both, (0.0, 0.5, 1.0))):
        step = 0.5 if np.any(both == 0.5) else 1.0
        return SIGN_TEST_MIN * step / n
    return float(Z95 * (x - y).std(ddof=1) / math.sqrt(n))


def paired(a: Sequence[float], b: Sequence[float], seed: int) -> dict:
    """Variant a minus variant b over the same items: the mean difference with its paired
    bootstrap interval, the sign test, whether the difference is significant at 95%, and the
    smallest difference the items could resolve."""
    import numpy as np

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    interval = mean_interval(d, seed)
    positive, negative = int((d > 1e-12).sum()), int((d < -1e-12).sum())
    p = sign_test(positive, negative)
    significant = bool(interval["n"] and p < 0.05 and (interval["ci_low"] > 0 or interval["ci_high"] < 0))
    return {"n": interval["n"], "diff": interval["value"], "ci_low": interval["ci_low"],
            "ci_high": interval["ci_high"], "a_better_items": positive, "b_better_items": negative,
            "p_value": p, "significant": significant, "resolution": resolution(a, b)}


def outcomes(scores: Sequence[float], base_scores: Sequence[float], tie_margin: float) -> list[float]:
    """Per item, 1 (win), 0.5 (tie) or 0 (loss) against base: a win needs the variant's score to
    beat base's by at least `tie_margin`, the margin the preference stage asks of a chosen answer."""
    return [1.0 if s - b >= tie_margin else 0.0 if b - s >= tie_margin else 0.5
            for s, b in zip(scores, base_scores)]


def length_controlled(results: Sequence[float], length_diffs: Sequence[float], seed: int) -> dict:
    """AlpacaEval 2's idea on a small scale: a logistic regression of the outcome on the
    (squashed) length difference to base's answer, read at a difference of zero, i.e. the win
    rate had the answers been as long as base's. A ridge penalty keeps it finite when every
    item went one way. None, with the reason, where it cannot be fitted."""
    import numpy as np

    y = np.asarray(results, dtype=float)
    d = np.asarray(length_diffs, dtype=float)
    n = len(y)
    if n < SIGN_TEST_MIN:
        return {"value": None, "reason": f"{n} items; a length regression needs at least {SIGN_TEST_MIN}"}
    if d.std() == 0:
        return {"value": None, "reason": "every answer is as long as base's, so length explains nothing: "
                                         "the win rate needs no length control"}
    x = np.tanh(d / d.std())

    def fit(yy, xx) -> float:
        a = b = 0.0
        for _ in range(25):  # Newton steps on the penalized log-likelihood
            p = 1 / (1 + np.exp(-(a + b * xx)))
            w = p * (1 - p)
            grad = np.array([np.sum(yy - p) - a, np.sum((yy - p) * xx) - b])
            hess = np.array([[np.sum(w) + 1, np.sum(w * xx)], [np.sum(w * xx), np.sum(w * xx * xx) + 1]])
            a, b = np.array([a, b]) + np.linalg.solve(hess, grad)
        return float(1 / (1 + np.exp(-a)))

    value = fit(y, x)
    idx = _rng(seed).integers(0, n, (ITERATIONS // 4, n))
    fits = [fit(y[i], x[i]) for i in idx]
    low, high = np.percentile(fits, [2.5, 97.5])
    return {"value": value, "ci_low": float(low), "ci_high": float(high), "n": n}
