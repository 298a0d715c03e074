"""Which scores may be compared, and how a comparison is recorded.

Two scores are comparable only when they were computed on the same rows: every scored run tags the digest of the
exact (fname, reference) pairs of its validation and test rows (`dialogsum.val_rows_digest`,
`dialogsum.test_rows_digest`). Ranking a 499-row score against an 8-row one, or a validation score against a
test score, says nothing; such runs are set aside as "not comparable", with the reason. Every comparison the
platform makes (challenger vs champion, ensemble vs its best source, int8 vs fp32) is a paired bootstrap over the
shared rows, logged as the difference with its 95% interval.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dialogsum.stats import Comparison


@dataclass(frozen=True)
class NotComparable:
    run_id: str
    name: str
    reason: str

    def line(self) -> str:
        return f"{self.name} ({self.run_id}): not comparable, {self.reason}"


def split_comparable(
    runs: Sequence[Any],
    digest_tag: str,
    score: Callable[[Any], float | None],
    name: Callable[[Any], str],
    reference: str | None = None,
) -> tuple[list[Any], list[NotComparable], str | None]:
    """(runs scored on the reference rows, the others with why, the reference digest). The reference rows are
    `reference` when given (a pipeline's own validation rows), else the ones most runs were scored on; a tie goes
    to the rows of the best-scoring run."""
    tagged = [r for r in runs if r.data.tags.get(digest_tag)]
    left_out = [NotComparable(r.info.run_id, name(r), f"it records no {digest_tag} (rows unknown)")
                for r in runs if not r.data.tags.get(digest_tag)]  # fmt: skip
    if not tagged:
        return [], left_out, None
    if reference is None:
        counts = Counter(r.data.tags[digest_tag] for r in tagged)
        best_of = {d: max((score(r) or float("-inf")) for r in tagged if r.data.tags[digest_tag] == d) for d in counts}
        reference = max(counts, key=lambda d: (counts[d], best_of[d]))
    kept = [r for r in tagged if r.data.tags[digest_tag] == reference]
    left_out += [
        NotComparable(r.info.run_id, name(r), f"scored on other rows ({digest_tag} {r.data.tags[digest_tag]}, "
                                             f"the compared runs have {reference})")  # fmt: skip
        for r in tagged
        if r.data.tags[digest_tag] != reference
    ]
    return kept, left_out, reference


def comparison_metrics(key: str, comparison: Comparison) -> dict[str, float]:
    """`key` (the mean difference A − B, in final points), `key_ci95_low`, `key_ci95_high`."""
    d = comparison.difference
    return {key: d.mean, f"{key}_ci95_low": d.low, f"{key}_ci95_high": d.high}


def logged_row_finals(run_id: str, artifact: str) -> dict[str, float] | None:
    """fname → per-row `final` of a run's logged predictions table (a failed row scores 0); None without a table."""
    from dialogsum.tracking import load_predictions

    try:
        table = load_predictions(run_id, artifact)
    except Exception:  # no such table logged: the caller says why nothing was compared
        return None
    if "final" not in table.columns:
        return None
    return dict(zip(table["fname"], table["final"].fillna(0.0).astype(float)))


def compare_logged(run_a, name_a: str, run_b, name_b: str, role: str = "test") -> tuple[Comparison | None, str | None]:
    """Paired bootstrap of two runs' per-row `final` on the `role` rows ("val" or "test"): (comparison, None), or
    (None, why not) when they were not scored on the same rows or did not log per-row scores."""
    from dialogsum.stats import compare
    from dialogsum.tracking import PREDICTIONS_ARTIFACT, TEST_PREDICTIONS_ARTIFACT, TEST_ROWS_TAG, VAL_ROWS_TAG

    tag, artifact = (VAL_ROWS_TAG, PREDICTIONS_ARTIFACT) if role == "val" else (TEST_ROWS_TAG, TEST_PREDICTIONS_ARTIFACT)
    a_rows, b_rows = run_a.data.tags.get(tag), run_b.data.tags.get(tag)
    if not a_rows or not b_rows:
        return None, f"{name_a if not a_rows else name_b} has no {role} score (no {tag})"
    if a_rows != b_rows:
        return None, f"{name_a} and {name_b} were scored on different {role} rows ({a_rows} vs {b_rows})"
    a, b = logged_row_finals(run_a.info.run_id, artifact), logged_row_finals(run_b.info.run_id, artifact)
    if a is None or b is None:
        return None, f"{name_a if a is None else name_b} logged no per-row {role} scores ({artifact})"
    fnames = sorted(a)
    return compare(name_a, [a[f] for f in fnames], name_b, [b.get(f, 0.0) for f in fnames]), None
