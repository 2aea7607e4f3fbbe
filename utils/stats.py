"""Paired significance tests and bootstrap confidence intervals for comparing methods on the same test items."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# What "could this test have seen it?" is answered at: a two-sided test at this level, with this power.
MDE_ALPHA, MDE_POWER = 0.05, 0.80


def as_bool(values: Sequence) -> np.ndarray:
    """0/1, True/False or their strings (as read back from a csv) -> a bool array."""
    out = []
    for value in values:
        if isinstance(value, str):
            text = value.strip().lower()
            if text not in ("true", "false", "1", "0", "1.0", "0.0"):
                raise ValueError(f"not a boolean: {value!r}")
            out.append(text in ("true", "1", "1.0"))
        else:
            out.append(bool(value))
    return np.asarray(out, dtype=bool)


def mcnemar_exact(baseline: Sequence, method: Sequence) -> dict:
    """Exact McNemar test on paired 0/1 outcomes: a two-sided binomial test on the discordant pairs.

    b = items the method gets right and the baseline wrong, c = the baseline right and the method wrong.
    Under the null hypothesis (equal accuracy) b ~ Binomial(b + c, 1/2). No discordant pair: p = 1.
    """
    from scipy.stats import binomtest

    base, meth = as_bool(baseline), as_bool(method)
    if base.shape != meth.shape:
        raise ValueError("paired outcomes must have the same length")
    b = int(np.sum(meth & ~base))
    c = int(np.sum(base & ~meth))
    p_value = float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue) if b + c else 1.0
    return {"n": int(base.size), "b": b, "c": c, "n_discordant": b + c, "p_value": p_value}


def mcnemar_mde(n: int, n_discordant: int, alpha: float = MDE_ALPHA, power: float = MDE_POWER) -> float | None:
    """The minimum detectable effect of a paired McNemar test: the smallest difference in accuracy (a share, not
    points) it detects at two-sided level alpha with the given power, on n paired items with the observed share of
    discordant items psi = n_discordant / n. Connor's (1987) sample size for McNemar's test,
        n * delta**2 = (z_(1-alpha/2) * sqrt(psi) + z_power * sqrt(psi - delta**2))**2,
    solved for delta by bisection (its right side falls as delta grows, its left side rises). Worked example (issue
    34): psi 0.12, n 500 -> 0.0433 (4.3 points); n 1147 -> 0.0286. None where no difference can be detected at
    this discordance: no discordant item, or even the largest difference it allows (delta = psi: every discordant
    item one way) falls short of the power."""
    from scipy.stats import norm

    if n < 1 or n_discordant < 1:
        return None
    psi = n_discordant / n
    z_alpha, z_power = norm.ppf(1 - alpha / 2), norm.ppf(power)

    def shortfall(delta: float) -> float:
        return (z_alpha * math.sqrt(psi) + z_power * math.sqrt(max(psi - delta * delta, 0.0))) - math.sqrt(n) * delta

    if shortfall(psi) > 0:
        return None
    low, high = 0.0, psi
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if shortfall(middle) > 0 else (low, middle)
    return high


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(values: Sequence, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap CI of the mean of values (items resampled with replacement, seeded)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    low, high = _interval(means, confidence)
    return {"mean": float(data.mean()), "low": low, "high": high, "n": int(data.size)}


def paired_bootstrap(baseline: Sequence, method: Sequence, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Bootstrap over items (the same resampled items for both): CIs of each mean and of method - baseline."""
    base, meth = np.asarray(baseline, dtype=float), np.asarray(method, dtype=float)
    if base.shape != meth.shape:
        raise ValueError("paired outcomes must have the same length")
    if base.size == 0:
        nan = float("nan")
        return {"baseline": (nan, nan, nan), "method": (nan, nan, nan), "diff": (nan, nan, nan), "n": 0}
    rng = np.random.default_rng(seed)
    index = rng.integers(0, base.size, size=(n_resamples, base.size))
    base_means, meth_means = base[index].mean(axis=1), meth[index].mean(axis=1)
    result = {"n": int(base.size)}
    for name, point, samples in (("baseline", base.mean(), base_means), ("method", meth.mean(), meth_means),
                                 ("diff", meth.mean() - base.mean(), meth_means - base_means)):
        result[name] = (float(point), *_interval(samples, confidence))
    return result
