"""How much of the data a model's length limits cut, measured with its tokenizer and prompt format (no weights).

Per row: the full prompt (`features.full_prompt_ids`: the chat template, the instruction template or the seq2seq
input with its special tokens, with the dialogue uncut) against `training.max_source_length`, where training and
generation would cut the dialogue's end; the target (summary + EOS, `features.target_ids`) against
`training.max_target_length`, where training would teach the model to stop mid-summary, and against
`generation.max_new_tokens`, where a generation of the reference would end on the limit instead of EOS. Per limit:
the rows it cuts, their share, the p50/p95/p99 lengths, and the smallest limit that would cut at most 1% of the rows.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from dialogsum.config import ModelConfig
from dialogsum.features import full_prompt_ids, target_ids
from dialogsum.tracking import (
    TRUNCATION_FIT_PARAM,
    TRUNCATION_LIMIT_PARAM,
    TRUNCATION_ROWS_PARAM,
    TRUNCATION_SHARE_METRIC,
    TRUNCATION_WARN_SHARE_PARAM,
)

FIT_SHARE = 0.01  # the share of rows a fitting limit may cut
PERCENTILES = (50, 95, 99)
LIMITS = {"source": "training.max_source_length", "target": "training.max_target_length", "new_tokens": "generation.max_new_tokens"}
MEASURED = {"source": "prompts", "target": "targets", "new_tokens": "targets"}


@dataclass(frozen=True)
class LimitCut:
    """One length limit against the token lengths of the rows."""

    key: str  # a key of LIMITS
    limit: int
    rows: int
    cut: int  # rows longer than the limit
    percentiles: dict[int, float]  # PERCENTILES -> length (linear interpolation)
    fits_99pct: int  # the smallest limit that cuts at most FIT_SHARE of the rows

    @property
    def setting(self) -> str:
        return LIMITS[self.key]

    @property
    def share(self) -> float:
        return self.cut / self.rows if self.rows else 0.0

    def warning(self, warn_share: float) -> str | None:
        """A sentence when this limit cuts more than `warn_share` of the rows, else None."""
        if self.share <= warn_share:
            return None
        return (f"{self.setting} {self.limit} cuts {self.cut}/{self.rows} {MEASURED[self.key]} ({self.share:.1%}, above "
                f"{percent(warn_share)}); {self.fits_99pct} would cut at most {percent(FIT_SHARE)}")  # fmt: skip


@dataclass(frozen=True)
class TruncationReport:
    """A model's three length limits against the same rows."""

    model: str
    rows: int
    source: LimitCut
    target: LimitCut
    new_tokens: LimitCut

    @property
    def limits(self) -> tuple[LimitCut, LimitCut, LimitCut]:
        return self.source, self.target, self.new_tokens

    def warnings(self, warn_share: float) -> list[str]:
        return [w for w in (cut.warning(warn_share) for cut in self.limits) if w]


def percent(share: float) -> str:
    """0.02 -> '2%', 0.025 -> '2.5%'."""
    return f"{share * 100:g}%"


def fitting_limit(lengths: list[int], share: float = FIT_SHARE) -> int:
    """The smallest limit that leaves at most `share` of `lengths` longer than it."""
    ordered = sorted(lengths)
    allowed = math.floor(round(len(ordered) * share, 6))  # rows the limit may cut
    return ordered[len(ordered) - allowed - 1]


def limit_cut(key: str, limit: int, lengths: list[int]) -> LimitCut:
    """`limit` (the setting LIMITS[key]) against the rows' `lengths`; ValueError when there are none."""
    if not lengths:
        raise ValueError("no rows to measure")
    values = np.percentile(lengths, PERCENTILES)
    return LimitCut(key, limit, len(lengths), sum(length > limit for length in lengths),
                    {p: float(v) for p, v in zip(PERCENTILES, values)}, fitting_limit(lengths))  # fmt: skip


def measure_truncation(cfg: ModelConfig, tokenizer, dialogues: list[str], summaries: list[str]) -> TruncationReport:
    """The report of `cfg`'s limits on these rows, with the tokenizer the model trains with."""
    unlimited = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_target_length": sys.maxsize})})
    prompts = [len(full_prompt_ids(cfg, tokenizer, dialogue)) for dialogue in dialogues]
    targets = [len(target_ids(unlimited, tokenizer, summary)) for summary in summaries]
    return TruncationReport(
        cfg.name, len(dialogues),
        limit_cut("source", cfg.training.max_source_length, prompts),
        limit_cut("target", cfg.training.max_target_length, targets),
        limit_cut("new_tokens", cfg.generation.max_new_tokens, targets),
    )  # fmt: skip


def tracking_records(reports: list[TruncationReport], warn_share: float) -> tuple[dict[str, str | int | float], dict[str, float]]:
    """(params, metrics) of the reports for a run: rows, each limit and its ≤ 1% length as params, each limit's
    cut share as a metric (names in `dialogsum.tracking`)."""
    params: dict[str, str | int | float] = {TRUNCATION_WARN_SHARE_PARAM: warn_share}
    metrics: dict[str, float] = {}
    for report in reports:
        params[TRUNCATION_ROWS_PARAM.format(model=report.model)] = report.rows
        for cut in report.limits:
            params[TRUNCATION_LIMIT_PARAM.format(model=report.model, limit=cut.key)] = cut.limit
            params[TRUNCATION_FIT_PARAM.format(model=report.model, limit=cut.key)] = cut.fits_99pct
            metrics[TRUNCATION_SHARE_METRIC.format(model=report.model, limit=cut.key)] = cut.share
    return params, metrics
