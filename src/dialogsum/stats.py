"""Uncertainty of scores: percentile bootstrap intervals over rows, and paired differences between two systems.

A score is the mean of per-row scores (ROUGE `final` per dialogue). Its 95% interval comes from resampling the
rows with replacement (1,000 resamples, seeded, so the same rows always give the same interval). Two systems
scored on the same rows are compared by resampling the rows once for both (a paired bootstrap): the interval of
the difference of their means. When that interval contains 0 the two are not distinguishable on these rows.

Everything is vectorised: one index matrix of shape (resamples, rows) serves every system scored on the same
rows (`benchmarks/bootstrap.py` measures it against a plain loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval."""

    mean: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.mean:.2f} [{self.low:.2f}, {self.high:.2f}]"


def resample_indices(n_rows: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n_rows) row indices drawn with replacement; the same seed gives the same draws."""
    if n_rows < 1:
        raise ValueError("a bootstrap needs at least one row")
    return np.random.default_rng(seed).integers(0, n_rows, size=(resamples, n_rows))


def _bounds(means: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=-1)
    return low, high


def bootstrap_many(scores: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> list[Interval]:
    """Intervals for several systems scored on the same rows: `scores` is (systems, rows)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    index = resample_indices(scores.shape[1], resamples, seed)
    means = np.stack([row[index].mean(axis=1) for row in scores])  # (systems, resamples)
    low, high = _bounds(means, level)
    return [Interval(float(m), float(lo), float(hi)) for m, lo, hi in zip(scores.mean(axis=1), low, high)]


def bootstrap_mean(values, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """The mean of per-row `values` with its percentile bootstrap interval."""
    return bootstrap_many(np.asarray(values, dtype=float)[None, :], resamples, seed, level)[0]


def paired_difference(a, b, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """mean(a) − mean(b) over the same rows, with the interval of a paired bootstrap (rows resampled together)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same rows: {a.shape} vs {b.shape}")
    return bootstrap_mean(a - b, resamples, seed, level)


@dataclass(frozen=True)
class Comparison:
    """A beats B by `difference` (mean and interval), or they are not distinguishable on these rows."""

    a: str
    b: str
    difference: Interval

    @property
    def distinguishable(self) -> bool:
        return not self.difference.contains(0.0)

    @property
    def a_wins(self) -> bool:
        return self.distinguishable and self.difference.mean > 0

    def sentence(self) -> str:
        d = self.difference
        if not self.distinguishable:
            return (f"{self.a} and {self.b} are not distinguishable: difference {d.mean:+.2f} "
                    f"[{d.low:+.2f}, {d.high:+.2f}] contains 0")  # fmt: skip
        winner, loser, sign = (self.a, self.b, 1) if d.mean > 0 else (self.b, self.a, -1)
        lo, hi = sorted((sign * d.low, sign * d.high))
        return f"{winner} beats {loser} by {sign * d.mean:.2f} [{lo:.2f}, {hi:.2f}]"


def compare(name_a: str, a, name_b: str, b, resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    return Comparison(name_a, name_b, paired_difference(a, b, resamples, seed))
