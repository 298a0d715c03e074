"""Bootstrap intervals and paired comparisons: seeded, vectorised, equal to a plain percentile bootstrap, and the
sentences the report prints."""

from __future__ import annotations

import numpy as np
import pytest

from dialogsum.stats import Comparison, Interval, bootstrap_many, bootstrap_mean, compare, paired_difference, resample_indices


def plain_bootstrap(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The textbook loop: resample the rows with replacement, take the mean, then the 2.5th and 97.5th percentiles."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(values), size=(resamples, len(values)))
    means = [float(np.mean(values[index[r]])) for r in range(resamples)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_interval_matches_a_plain_percentile_bootstrap_and_is_seeded():
    values = np.random.default_rng(1).uniform(0, 60, size=120)
    interval = bootstrap_mean(values)
    assert (interval.low, interval.high) == pytest.approx(plain_bootstrap(values, 1000, 0))
    assert interval.mean == pytest.approx(values.mean()) and interval.low < interval.mean < interval.high
    assert bootstrap_mean(values) == interval, "the same rows give the same interval"
    assert bootstrap_mean(values, seed=5) != interval


def test_many_systems_share_the_row_resamples():
    scores = np.random.default_rng(2).uniform(0, 50, size=(3, 80))
    intervals = bootstrap_many(scores)
    for row, interval in zip(scores, intervals):
        assert (interval.low, interval.high) == pytest.approx(plain_bootstrap(row, 1000, 0))
    assert resample_indices(80).shape == (1000, 80)
    with pytest.raises(ValueError, match="at least one row"):
        resample_indices(0)


def test_paired_difference_sees_what_unpaired_intervals_cannot():
    rng = np.random.default_rng(3)
    hard = rng.uniform(0, 60, size=200)  # rows vary a lot in difficulty
    a, b = hard + 1.0, hard  # A is one point better on every row
    assert bootstrap_mean(a).contains(b.mean()), "each mean's own interval overlaps the other"
    difference = paired_difference(a, b)
    assert difference.mean == pytest.approx(1.0) and difference.low == pytest.approx(1.0) == difference.high
    assert compare("A", a, "B", b).sentence() == "A beats B by 1.00 [1.00, 1.00]"
    with pytest.raises(ValueError, match="the same rows"):
        paired_difference(a, b[:-1])


def test_comparison_sentences():
    assert Comparison("A", "B", Interval(2.0, 0.5, 3.5)).sentence() == "A beats B by 2.00 [0.50, 3.50]"
    assert Comparison("A", "B", Interval(-2.0, -3.5, -0.5)).sentence() == "B beats A by 2.00 [0.50, 3.50]"
    tie = Comparison("A", "B", Interval(0.3, -0.4, 1.0))
    assert not tie.distinguishable and not tie.a_wins
    assert tie.sentence() == "A and B are not distinguishable: difference +0.30 [-0.40, +1.00] contains 0"
