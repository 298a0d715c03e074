"""Korean ROUGE speed: `dialogsum.metrics.score_rows` against a plain per-pair `RougeScorer` loop, side by side.

Pairs come from the real data (../shared/data/dialogsum-ko/labeled.csv): each reference summary is paired, in
rotation, with another dialogue's summary, the first turn of a dialogue, or the first sentence of a summary, at
a different offset on every pass over the rows, so pairs do not repeat while each text recurs as it does in
evaluation and ensembling. The baseline is what a plain implementation does: one `RougeScorer(tokenizer=...)` call per
pair with a tokenizer that applies the same token rules but remembers nothing, so it tokenizes both texts of
every pair. Every per-pair score of the two must be identical.

    python benchmarks/metric.py [--pairs 10000] [--baseline-budget-s 120]

The baseline stops after --baseline-budget-s seconds; its time for all pairs is then extrapolated from the
pairs it scored (labelled as such; any prefix of the pairs mixes the three kinds evenly).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from rouge_score import rouge_scorer

from dialogsum.data import read_dialogues
from dialogsum.metrics import ROUGE_TYPES, KoreanTokenizer, score_rows

LABELLED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum-ko" / "labeled.csv"
TARGET_RATIO = 8.0


class ForgetfulTokenizer:
    """dialogsum's token rules without its memo: every call tokenizes the text from scratch."""

    def __init__(self, mode: str = "morpheme"):
        self.mode = mode

    def tokenize(self, text: str) -> list[str]:
        return KoreanTokenizer(self.mode).tokenize(text)


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.?!])\s", text, maxsplit=1)[0]


def build_pairs(n_pairs: int) -> tuple[list[str], list[str]]:
    """(predictions, references): pair k scores reference i = k % rows against a text of another dialogue."""
    data = read_dialogues(LABELLED)
    summaries = data.summaries
    kinds = [
        summaries,
        [d.split("\n", 1)[0] for d in data.dialogues],
        [first_sentence(s) for s in summaries],
    ]
    rows = len(summaries)
    predictions, references = [], []
    for k in range(n_pairs):
        i, passes = k % rows, k // rows
        predictions.append(kinds[(i // 3 + passes) % len(kinds)][(i + passes + 1) % rows])
        references.append(summaries[i])
    return predictions, references


def baseline_rows(predictions: list[str], references: list[str], budget_s: float) -> list[dict[str, float]]:
    """Per-pair F1 from a plain `RougeScorer` loop, for as many leading pairs as fit in the time budget."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=ForgetfulTokenizer())
    deadline = time.perf_counter() + budget_s
    rows = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        rows.append({t: scores[t].fmeasure for t in ROUGE_TYPES})
        if time.perf_counter() > deadline:
            break
    return rows


def timed(fn, *args):
    """(result, wall seconds, CPU seconds of this process incl. Kiwi's threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def report(name: str, wall: float, cpu: float, pairs: int, label: str) -> None:
    print(f"{name:29s}: {wall:8.2f} s wall {cpu:8.2f} s CPU {pairs / wall:8.0f} pairs/s  ({label})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--baseline-budget-s", type=float, default=120.0, help="stop the baseline after this long")
    args = parser.parse_args()
    if not LABELLED.exists():
        print(f"missing shared data: {LABELLED}", file=sys.stderr)
        return 2
    predictions, references = build_pairs(args.pairs)
    distinct_texts = len(set(predictions) | set(references))
    distinct_pairs = len(set(zip(predictions, references)))
    print(f"{args.pairs} pairs from {LABELLED.name}: {distinct_pairs} distinct pairs, {distinct_texts} distinct texts")

    KoreanTokenizer().tokenize("형태소 분석기를 미리 불러 둡니다.")  # load Kiwi's model outside both timings
    ours, ours_wall, ours_cpu = timed(score_rows, predictions, references)
    plain, plain_wall, plain_cpu = timed(baseline_rows, predictions, references, args.baseline_budget_s)

    done = len(plain)
    mismatches = [i for i, (a, b) in enumerate(zip(ours, plain)) if any(a[t] != b[t] for t in ROUGE_TYPES)]
    assert not mismatches, f"{len(mismatches)} per-pair scores differ, first at pair {mismatches[0]}"
    print(f"identical per-pair ROUGE-1/2/L F1 on all {done} pairs the baseline scored")

    scale = args.pairs / done
    label = "measured" if done == args.pairs else f"EXTRAPOLATED from its first {done} pairs (time budget)"
    base_wall, base_cpu = plain_wall * scale, plain_cpu * scale
    report("dialogsum.metrics.score_rows", ours_wall, ours_cpu, args.pairs, "measured")
    report("per-pair RougeScorer loop", base_wall, base_cpu, args.pairs, label)
    ratio = base_wall / ours_wall
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    cpu_ratio = base_cpu / ours_cpu
    print(f"speed ratio: {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU (target >= {TARGET_RATIO:.0f}x wall: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
