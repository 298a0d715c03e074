"""MBR ensemble speed: 499 dialogues (the competition's unlabelled test rows), 2 to 8 candidates each.

The candidates are deterministic extractive stand-ins for model outputs (a dialogue turn or two), so the run
needs no model. Reported separately: loading Kiwi, tokenizing every distinct candidate text once, and MBR
selection per candidate count (each distinct unordered pair of a dialogue scored once with rouge-score's
scorer on the memoized Korean tokens).

    python benchmarks/ensemble.py [--data CSV] [--max-candidates 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dialogsum.data import read_dialogues
from types import SimpleNamespace

from dialogsum.ensemble import CandidateSet, PairwiseRouge, Source, Strategy, build_frame, source_weights
from dialogsum.metrics import korean_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dialogsum-ko" / "unlabeled.csv"


def turns(dialogue: str) -> list[str]:
    return [line.split(": ", 1)[-1] for line in dialogue.split("\n") if line.strip()]


CANDIDATES = {
    "first turn": lambda t: t[0],
    "last turn": lambda t: t[-1],
    "longest turn": lambda t: max(t, key=len),
    "first two turns": lambda t: " ".join(t[:2]),
    "middle turn": lambda t: t[len(t) // 2],
    "last two turns": lambda t: " ".join(t[-2:]),
    "second turn": lambda t: t[min(1, len(t) - 1)],
    "shortest turn": lambda t: min(t, key=len),
}


def candidate_set(data, k: int) -> tuple[CandidateSet, list[Source]]:
    names = list(CANDIDATES)[:k]
    texts = [[CANDIDATES[name](turns(d)) for name in names] for d in data.dialogues]
    sources = [Source(SimpleNamespace(info=SimpleNamespace(run_id=f"run-{i}")), name, "train", 1.0, label=name)
               for i, name in enumerate(names)]  # fmt: skip
    return CandidateSet(data.fnames, data.dialogues, None, texts), sources


def timed(action):
    """(result, wall seconds, CPU seconds of this process); CPU time is what a busy shared machine can't inflate."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = action()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-candidates", type=int, default=len(CANDIDATES), choices=range(2, len(CANDIDATES) + 1))
    args = parser.parse_args()

    data = read_dialogues(args.data)
    tokenizer = korean_tokenizer()
    _, kiwi_wall, kiwi_cpu = timed(lambda: tokenizer.prime(["한국어 형태소 분석기를 불러옵니다."]))
    full, _ = candidate_set(data, args.max_candidates)
    distinct = {t for row in full.texts for t in row}
    _, tok_wall, tok_cpu = timed(lambda: tokenizer.prime(distinct))
    print(f"{len(data)} dialogues from {args.data}")
    print(f"load Kiwi: {kiwi_wall:.2f} s wall ({kiwi_cpu:.2f} s CPU)")
    print(f"tokenize {len(distinct)} distinct candidate texts once: {tok_wall:.2f} s wall ({tok_cpu:.2f} s CPU)\n")
    print(f"{'candidates':>10} {'pairs scored':>13} {'pairs max':>10} {'wall s':>7} {'CPU s':>6} {'ms/dialogue':>12} {'µs/pair':>8}")
    for k in range(2, args.max_candidates + 1):
        candidates, sources = candidate_set(data, k)
        pairwise = PairwiseRouge()
        weights = source_weights(sources)
        strategy = Strategy("mbr", sources, weights, 2.0, 5)
        _, wall, cpu = timed(lambda: strategy.choose(build_frame(candidates, sources, pairwise, weights)))
        most = len(data) * k * (k - 1) // 2
        per_pair = 1e6 * cpu / max(pairwise.pairs_scored, 1)
        print(f"{k:>10} {pairwise.pairs_scored:>13} {most:>10} {wall:>7.2f} {cpu:>6.2f} {1e3 * cpu / len(data):>12.2f} {per_pair:>8.0f}")
    print("\npairs max = dialogues × k(k-1)/2; fewer are scored when candidates of a dialogue coincide.")
    print("ms/dialogue and µs/pair are CPU time; MBR itself is single-threaded.")


if __name__ == "__main__":
    main()
