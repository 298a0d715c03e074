"""Bootstrap intervals for a pipeline's report: 10 runs × 499 rows × 1,000 resamples (the competition's test size),
computed by `dialogsum.stats.bootstrap_many` against a reference percentile bootstrap written plainly here, side by
side in one run. Target: under 2 s, and the same intervals.

    python benchmarks/bootstrap.py [--runs 10] [--rows 499] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dialogsum.stats import SEED, bootstrap_many


def reference_intervals(scores: np.ndarray, resamples: int, seed: int) -> list[tuple[float, float]]:
    """Per run: draw `resamples` sets of rows with replacement (the same draws for every run, as the platform
    does), take each set's mean with a Python loop, then the 2.5th and 97.5th percentiles."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, scores.shape[1], size=(resamples, scores.shape[1]))
    intervals = []
    for run in scores:
        means = []
        for draw in draws:
            total = 0.0
            for row in draw:
                total += run[row]
            means.append(total / len(draw))
        intervals.append((float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))))
    return intervals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rows", type=int, default=499)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    # Per-row ROUGE finals look like this: many rows near a model's mean, a long tail of zeros and good rows.
    rng = np.random.default_rng(7)
    scores = np.clip(rng.normal(loc=rng.uniform(20, 45, size=(args.runs, 1)), scale=12, size=(args.runs, args.rows)), 0, 100)

    start = time.perf_counter()
    fast = bootstrap_many(scores, resamples=args.resamples, seed=SEED)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = reference_intervals(scores, args.resamples, SEED)
    plain_s = time.perf_counter() - start

    largest = max(max(abs(f.low - p[0]), abs(f.high - p[1])) for f, p in zip(fast, plain))
    print(f"{args.runs} runs x {args.rows} rows x {args.resamples} resamples")
    print(f"  dialogsum.stats.bootstrap_many : {fast_s:8.3f} s   (target < 2 s: {'met' if fast_s < 2 else 'MISSED'})")
    print(f"  plain reference loop           : {plain_s:8.3f} s   ({plain_s / fast_s:.0f}x slower)")
    print(f"  largest difference in a bound  : {largest:.2e} points ({'same intervals' if largest < 1e-9 else 'DIFFERENT'})")
    for i, (f, p) in enumerate(zip(fast[:3], plain[:3])):
        print(f"  run {i}: {f}   reference [{p[0]:.2f}, {p[1]:.2f}]")


if __name__ == "__main__":
    main()
