"""Ensembles of summaries from tracked runs: MBR consensus, score-weighted MBR, and a learned stacking selector.

Sources are runs of kind `train`, `solar` or `ensemble` that logged a validation predictions table
(`predictions.json`) on the same rows (the same `dialogsum.val_rows_digest`); a run scored on other rows is set
aside as not comparable. Every strategy selects one source's candidate per dialogue; none writes new text:

- `mbr`: the candidate with the highest mean Korean ROUGE ((R1+R2+RL)/3 F1) against the other candidates
  (minimum Bayes risk with ROUGE as the utility).
- `weighted_mbr`: the same mean, each other candidate weighted by its source's weight: a softmax over the
  sources' validation scores, `exp((score − best) / τ)` normalised, τ = `temperature` points (logged). A source
  τ points behind the best counts e⁻¹ ≈ 0.37 times as much.
- `stacking`: a gradient-boosting regressor predicts each candidate's ROUGE against the reference (relative to
  the dialogue's candidate mean) from per-candidate features, the source's validation score among them; the
  highest prediction wins. It learns from validation rows only: its validation score is out-of-fold
  (`cross_val_predict` with `GroupKFold` by dialogue), and the selector fit on all validation rows picks on the
  test rows and on a `--data` file.

Data roles: validation chooses (weights, the selector) and is scored `val_*`; the sources' test tables (or a
labelled `--data` file, which then replaces them) are scored `test_*` and never choose anything. An unlabelled
`--data` file (what the pipeline's `predict` step summarises) gets predictions only. The ensemble is compared with
its best source (by validation) on the same rows by a paired bootstrap (`{val,test}_diff_vs_best_source`). The
oracle (per dialogue, the candidate closest to the reference) is logged as `oracle_*`: an upper bound that needs
the reference, not an achievable score. Ties go to the earlier source.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dialogsum.comparison import NotComparable, comparison_metrics, split_comparable
from dialogsum.data import DialogueSet, read_dialogues, rows_digest
from dialogsum.metrics import ROUGE_TYPES, TextStats, TokenMode, korean_tokenizer, pair_fmeasures, score_rows
from dialogsum.stats import bootstrap_mean, compare
from dialogsum.tracking import (
    KIND_TAG,
    MODEL_TAG,
    PREDICTIONS_ARTIFACT,
    STATUS_TAG,
    TEST_PREDICTIONS_ARTIFACT,
    TEST_ROWS_TAG,
    VAL_ROWS_TAG,
    load_predictions,
    log_config,
    log_predictions,
    run_metric,
    tracked_run,
)

STRATEGIES = ("mbr", "weighted_mbr", "stacking")
SOURCE_KINDS = ("train", "solar", "ensemble")
DEFAULT_METRIC = "val_final"
DEFAULT_TEMPERATURE = 2.0
MIN_WEIGHT = 1e-12
SOURCES_ARTIFACT = "ensemble/sources.json"
SUMMARY_ARTIFACT = "ensemble/summary.json"
DATA_PREDICTIONS_ARTIFACT = "data_predictions.json"
STRATEGY_TAG = "dialogsum.ensemble.strategy"
SOURCES_TAG = "dialogsum.ensemble.sources"
SOURCE_MODELS_TAG = "dialogsum.ensemble.source_models"
STACKING_FEATURES = ("consensus", "consensus_gap", "length_ratio", "tokens", "source_score", "n_candidates")
STACKING_PARAMS = {"n_estimators": 100, "max_depth": 3, "learning_rate": 0.05, "random_state": 0}
ORACLE_NOTE = (
    "UPPER BOUND, not an achievable score: per dialogue the candidate closest to the reference, "
    "chosen by looking at the reference."
)
SCORE_COLUMNS = (*ROUGE_TYPES, "final")


class NotEnoughSources(RuntimeError):
    """Fewer than two usable sources; raised before any run is created. `unusable` lists (run id, reason)."""

    def __init__(self, usable: list[str], unusable: list[tuple[str, str]]):
        self.usable = usable
        self.unusable = unusable
        reasons = "".join(f"\n  {run_id}: {reason}" for run_id, reason in unusable)
        super().__init__(f"an ensemble needs at least two usable sources, got {len(usable)}{reasons}")


@dataclass
class Source:
    """One source run: its model name, validation score, metric label and its validation and test tables."""

    run: Any = field(repr=False)
    model: str
    kind: str
    score: float | None
    label: str = ""
    val_table: pd.DataFrame | None = field(default=None, repr=False)
    test_table: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def describe(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "model": self.model, "label": self.label, "kind": self.kind, "score": self.score}


@dataclass
class CandidateSet:
    """Per dialogue, each source's candidate summary (None where that source has no usable one)."""

    fnames: list[str]
    dialogues: list[str]
    references: list[str] | None
    texts: list[list[str | None]]

    @property
    def labelled(self) -> bool:
        return self.references is not None

    @property
    def digest(self) -> str | None:
        return rows_digest(self.fnames, self.references) if self.references is not None else None


# --- choosing sources ---------------------------------------------------------------------------------------


def _source_name(run) -> str:
    return run.data.tags.get(MODEL_TAG) or run.info.run_name or run.info.run_id[:8]


def _ranked(runs: list, metric: str) -> list:
    return sorted(runs, key=lambda r: (run_metric(r, metric) is None, -(run_metric(r, metric) or 0.0), r.info.start_time))


def source_runs_of_parent(parent_run_id: str, metric: str = DEFAULT_METRIC) -> list[str]:
    """The succeeded train/solar child runs of a parent, best `metric` first (runs without it last)."""
    import mlflow

    parent = mlflow.get_run(parent_run_id)
    runs = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{STATUS_TAG}` = 'succeeded'",
        output_format="list",
    )
    return [r.info.run_id for r in _ranked([r for r in runs if r.data.tags.get(KIND_TAG) in ("train", "solar")], metric)]


def top_k_source_runs(k: int, metric: str = DEFAULT_METRIC) -> tuple[list[str], list[NotComparable]]:
    """The k succeeded train/solar runs of the active experiment with the best `metric`, among the runs scored on
    the same validation rows; the runs scored on other rows are returned as not comparable."""
    import mlflow

    runs = mlflow.search_runs(filter_string=f"tags.`{STATUS_TAG}` = 'succeeded'", output_format="list")
    scored = [r for r in runs if r.data.tags.get(KIND_TAG) in ("train", "solar") and run_metric(r, metric) is not None]
    comparable, left_out, _ = split_comparable(scored, VAL_ROWS_TAG, lambda r: run_metric(r, metric), _source_name)
    return [r.info.run_id for r in _ranked(comparable, metric)[:k]], left_out


# --- loading sources ----------------------------------------------------------------------------------------


def usable_table(run_id: str, artifact: str = PREDICTIONS_ARTIFACT) -> pd.DataFrame:
    """A run's predictions table with a `usable` column: no error and a prediction text."""
    try:
        table = load_predictions(run_id, artifact)
    except Exception as e:  # a missing artifact surfaces as different MLflow/OS errors per store
        raise ValueError(f"no predictions table {artifact} ({type(e).__name__})") from e
    missing = [c for c in ("fname", "dialogue", "prediction") if c not in table.columns]
    if missing:
        raise ValueError(f"its {artifact} lacks column(s) {', '.join(missing)}")
    repeated = sorted(set(table["fname"][table["fname"].duplicated()]))
    if repeated:
        raise ValueError(f"its {artifact} repeats fname(s) {', '.join(repeated[:10])}")
    errors = table["error"] if "error" in table.columns else pd.Series([None] * len(table))
    no_error = errors.isna().to_numpy() | (errors.astype(str).str.strip() == "").to_numpy()
    has_text = table["prediction"].map(lambda p: isinstance(p, str)).to_numpy()
    table["usable"] = no_error & has_text
    if not table["usable"].any():
        raise ValueError(f"its {artifact} has no usable row (every row has an error or no prediction)")
    return table


def table_of_its_rows(run, artifact: str, digest_tag: str) -> pd.DataFrame:
    """`usable_table`, checked to hold exactly the rows the run's digest tag names (so aligning by fname is safe)."""
    table = usable_table(run.info.run_id, artifact)
    tagged = run.data.tags.get(digest_tag)
    references = table["reference"] if "reference" in table.columns else [None] * len(table)
    if tagged and rows_digest(list(table["fname"]), list(references)) != tagged:
        raise ValueError(f"its {artifact} does not hold the rows its {digest_tag} names ({tagged})")
    return table


def has_model(run_id: str) -> None:
    """Raise unless the run logged a model (reads only its metadata)."""
    from dialogsum.serving.pyfunc import NoLoggedModel, run_model_uri

    try:
        run_model_uri(run_id)
    except NoLoggedModel as e:
        raise ValueError(str(e)) from e


def resolve_sources(run_ids: Sequence[str], metric: str, need_model: bool) -> tuple[list[Source], list[tuple[str, str]]]:
    """Usable sources (validation table loaded, test table when logged, model present when `need_model`), all
    scored on the same validation rows, and (run id, reason) for the rest."""
    import mlflow

    sources: list[Source] = []
    unusable: list[tuple[str, str]] = []
    for run_id in dict.fromkeys(run_ids):
        try:
            run = mlflow.get_run(run_id)
            source = Source(run, _source_name(run), run.data.tags.get(KIND_TAG, ""), run_metric(run, metric))
            if need_model:
                has_model(run_id)
            source.val_table = table_of_its_rows(run, PREDICTIONS_ARTIFACT, VAL_ROWS_TAG)
            try:
                source.test_table = table_of_its_rows(run, TEST_PREDICTIONS_ARTIFACT, TEST_ROWS_TAG)
            except ValueError:
                source.test_table = None
        except Exception as e:  # any run that cannot serve as a source is reported, not fatal
            unusable.append((run_id, str(e) or type(e).__name__))
            continue
        sources.append(source)
    runs = [s.run for s in sources]
    comparable, left_out, _ = split_comparable(runs, VAL_ROWS_TAG, lambda r: run_metric(r, metric), _source_name)
    unusable += [(n.run_id, n.reason) for n in left_out]
    kept = {r.info.run_id for r in comparable}
    sources = [s for s in sources if s.run_id in kept]
    assign_labels(sources)
    return sources, unusable


def assign_labels(sources: list[Source]) -> None:
    """Each source's name in metrics: its model name, suffixed with the run id's start when models repeat."""
    counts = Counter(s.model for s in sources)
    for s in sources:
        s.label = s.model if counts[s.model] == 1 else f"{s.model}-{s.run_id[:8]}"


def test_tables_usable(sources: list[Source]) -> str | None:
    """None when every source logged a test table on the same rows; else why the ensemble gets no test score."""
    lacking = [s.label for s in sources if s.test_table is None]
    if lacking:
        return f"no test predictions from {', '.join(lacking)}"
    digests = {s.run.data.tags.get(TEST_ROWS_TAG) for s in sources}
    if len(digests) != 1 or None in digests:
        return f"the sources were tested on different rows ({TEST_ROWS_TAG}: {sorted(str(d) for d in digests)})"
    return None


# --- candidates ---------------------------------------------------------------------------------------------


def candidates_from_tables(sources: list[Source], attribute: str) -> CandidateSet:
    """Align the sources' tables (`val_table` or `test_table`) by fname, in the first source's order."""
    first = getattr(sources[0], attribute)
    by_source = [getattr(s, attribute).set_index("fname") for s in sources]
    fnames = list(first["fname"])
    texts = [[t.at[f, "prediction"] if t.at[f, "usable"] else None for t in by_source] for f in fnames]
    return CandidateSet(fnames, list(first["dialogue"]), reference_column(first), texts)


def reference_column(table: pd.DataFrame) -> list[str] | None:
    """The table's references when every row has one, else None (unlabelled)."""
    if "reference" not in table.columns:
        return None
    refs = table["reference"]
    if not refs.map(lambda r: isinstance(r, str) and bool(r.strip())).all():
        return None
    return list(refs)


def generate_predictions(source: Source, dialogues: list[str]) -> list[str]:
    """The source's logged pyfunc model's summaries for the dialogues."""
    import mlflow

    from dialogsum.serving.pyfunc import predict_summaries, run_model_uri

    model = mlflow.pyfunc.load_model(run_model_uri(source.run_id))
    try:
        return predict_summaries(model, dialogues)
    except ValueError as e:
        raise ValueError(f"{source.label}: {e}") from e


def candidates_from_models(sources: list[Source], dataset: DialogueSet) -> CandidateSet:
    per_source = [generate_predictions(s, dataset.dialogues) for s in sources]
    references = dataset.summaries if dataset.report.labelled else None
    return CandidateSet(dataset.fnames, dataset.dialogues, references, [list(row) for row in zip(*per_source)])


# --- consensus ----------------------------------------------------------------------------------------------


class PairwiseRouge:
    """Symmetric similarity (R1+R2+RL)/3 F1 between candidate texts, scored as `dialogsum.metrics` scores ROUGE.

    ROUGE F1 is symmetric, so each distinct unordered pair of a dialogue is scored once (`pairs_scored` counts
    them); identical texts score 1 (0 when empty) without scoring. Each distinct text is tokenized once by the
    shared memoizing Korean tokenizer (prime it with all texts first) and gets its n-gram counts built once.
    """

    def __init__(self, mode: TokenMode = "morpheme"):
        self.tokenizer = korean_tokenizer(mode)
        self._stats: dict[str, TextStats] = {}
        self.pairs_scored = 0

    def stats(self, text: str) -> TextStats:
        if text not in self._stats:
            self._stats[text] = TextStats.of(self.tokenizer.tokenize(text))
        return self._stats[text]

    def similarity(self, a: str, b: str) -> float:
        self.pairs_scored += 1
        scores = pair_fmeasures(self.stats(a), self.stats(b))
        return sum(scores[t] for t in ROUGE_TYPES) / len(ROUGE_TYPES)

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        """The texts' pairwise similarities (n × n)."""
        distinct = list(dict.fromkeys(texts))
        sim = np.zeros((len(distinct), len(distinct)))
        for a, text in enumerate(distinct):
            sim[a, a] = 1.0 if self.stats(text).tokens else 0.0
            for b in range(a + 1, len(distinct)):
                sim[a, b] = sim[b, a] = self.similarity(text, distinct[b])
        position = {text: i for i, text in enumerate(distinct)}
        index = [position[t] for t in texts]
        return sim[np.ix_(index, index)]


def consensus(similarity: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each candidate's weighted mean similarity to the other candidates (0 for a lone candidate)."""
    if len(weights) < 2:
        return np.zeros(len(weights))
    others = similarity * weights[None, :]
    np.fill_diagonal(others, 0.0)
    return others.sum(axis=1) / (weights.sum() - weights)


def source_weights(sources: list[Source], temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """weighted_mbr's rule: softmax over the validation scores, exp((score − best) / temperature), normalised to
    sum to 1 (a source without a score counts as the worst one)."""
    if temperature <= 0:
        raise ValueError(f"the weighting temperature must be positive, got {temperature}")
    scores = np.array([s.score if s.score is not None else np.nan for s in sources], dtype=float)
    scores = np.where(np.isnan(scores), np.nanmin(scores) if not np.isnan(scores).all() else 0.0, scores)
    weights = np.maximum(np.exp((scores - scores.max()) / temperature), MIN_WEIGHT)  # no vote is exactly zero
    return weights / weights.sum()


def build_frame(candidates: CandidateSet, sources: list[Source], pairwise: PairwiseRouge, weights: np.ndarray) -> pd.DataFrame:
    """One row per candidate: dialogue row, source index, text, consensus features and (labelled) its ROUGE."""
    pairwise.tokenizer.prime(t for row in candidates.texts for t in row if t is not None)
    records = []
    for row, (texts, dialogue) in enumerate(zip(candidates.texts, candidates.dialogues)):
        present = [i for i, t in enumerate(texts) if t is not None]
        row_texts = [texts[i] for i in present]
        sim = pairwise.matrix(row_texts)
        plain = consensus(sim, np.ones(len(present)))
        weighted = consensus(sim, weights[present])
        for k, i in enumerate(present):
            records.append(
                {
                    "row": row,
                    "source": i,
                    "text": row_texts[k],
                    "consensus": plain[k],
                    "weighted_consensus": weighted[k],
                    "consensus_gap": plain[k] - plain.max(),
                    "length_ratio": len(row_texts[k]) / max(len(dialogue), 1),
                    "tokens": len(pairwise.stats(row_texts[k]).tokens),
                    "source_score": sources[i].score or 0.0,
                    "n_candidates": len(present),
                }
            )
    frame = pd.DataFrame.from_records(records)
    if candidates.labelled and len(frame):
        scores = score_rows(list(frame["text"]), [candidates.references[r] for r in frame["row"]], pairwise.tokenizer.mode)
        frame = pd.concat([frame, pd.DataFrame(scores, index=frame.index)], axis=1)
    return frame


# --- selection ----------------------------------------------------------------------------------------------


def pick_highest(frame: pd.DataFrame, column: str) -> pd.Index:
    """Per dialogue row, the frame index of the candidate with the highest `column` (ties: earlier source)."""
    return pd.Index(frame.groupby("row", sort=True)[column].idxmax())


def stacking_matrix(frame: pd.DataFrame, n_sources: int) -> np.ndarray:
    """Numeric features plus a one-hot of the source."""
    onehot = (frame["source"].to_numpy()[:, None] == np.arange(n_sources)[None, :]).astype(float)
    return np.hstack([frame[list(STACKING_FEATURES)].to_numpy(float), onehot])


def stacking_feature_names(sources: list[Source]) -> list[str]:
    return [*STACKING_FEATURES, *(f"source={s.label}" for s in sources)]


def relative_target(frame: pd.DataFrame) -> np.ndarray:
    """Each candidate's ROUGE `final` minus its dialogue's candidate mean (only the ranking within a dialogue matters)."""
    return (frame["final"] - frame.groupby("row")["final"].transform("mean")).to_numpy()


def new_selector():
    from sklearn.ensemble import GradientBoostingRegressor

    return GradientBoostingRegressor(**STACKING_PARAMS)


def out_of_fold_predictions(features: np.ndarray, target: np.ndarray, groups: np.ndarray, folds: int) -> tuple[np.ndarray, int]:
    """scikit-learn's `cross_val_predict` with `GroupKFold`: each prediction from a selector that never saw its
    dialogue; returns (predictions, folds used)."""
    from sklearn.model_selection import GroupKFold, cross_val_predict

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"stacking needs at least two labelled dialogues to cross-validate, got {n_groups}")
    n_splits = min(folds, n_groups)
    return cross_val_predict(new_selector(), features, target, groups=groups, cv=GroupKFold(n_splits=n_splits)), n_splits


@dataclass
class Selection:
    picks: pd.Index
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Strategy:
    """A strategy made ready on the validation rows: the weights and, for stacking, the fitted selector."""

    name: str
    sources: list[Source]
    weights: np.ndarray
    temperature: float
    folds: int
    selector: Any = None
    params: dict[str, Any] = field(default_factory=dict)

    def choose_validation(self, frame: pd.DataFrame) -> Selection:
        """Picks on the validation rows; stacking's are out-of-fold and its selector is then fit on all of them."""
        if self.name != "stacking":
            return self.choose(frame)
        if "final" not in frame.columns:
            raise ValueError("stacking trains its selector on labelled validation rows (the sources' tables have no references)")
        n = len(self.sources)
        features, target = stacking_matrix(frame, n), relative_target(frame)
        predicted, used = out_of_fold_predictions(features, target, frame["row"].to_numpy(), self.folds)
        self.selector = new_selector().fit(features, target)
        self.params.update({"features": stacking_feature_names(self.sources), "model": "GradientBoostingRegressor",
                            "model_params": STACKING_PARAMS, "folds": used,
                            "target": "candidate ROUGE final minus the dialogue's candidate mean",
                            "validation_scored": "out-of-fold (cross_val_predict, GroupKFold by dialogue)",
                            "trained_on": "the sources' validation prediction tables"})  # fmt: skip
        return Selection(pick_highest(frame.assign(stacking=predicted), "stacking"))

    def choose(self, frame: pd.DataFrame) -> Selection:
        """Picks on rows that chose nothing (test rows, a --data file)."""
        if self.name == "mbr":
            return Selection(pick_highest(frame, "consensus"))
        if self.name == "weighted_mbr":
            return Selection(pick_highest(frame, "weighted_consensus"))
        if self.name == "stacking":
            if self.selector is None:
                raise ValueError("stacking picks with a selector fit on validation rows: choose on them first")
            return Selection(pick_highest(frame.assign(stacking=self.selector.predict(stacking_matrix(frame, len(self.sources)))), "stacking"))
        raise ValueError(f"unknown strategy '{self.name}' ({', '.join(STRATEGIES)})")

    def describe(self) -> dict[str, Any]:
        params: dict[str, Any] = {"utility": "mean (R1+R2+RL)/3 F1 vs the other candidates"}
        if self.name == "weighted_mbr":
            params.update({"weights": {s.label: float(w) for s, w in zip(self.sources, self.weights)},
                           "weight_rule": "softmax over validation scores: exp((score - best) / temperature), normalised",
                           "temperature": self.temperature})  # fmt: skip
        return {**params, **self.params}


# --- results ------------------------------------------------------------------------------------------------


def row_finals(frame: pd.DataFrame, picks: pd.Index, n_rows: int) -> np.ndarray:
    """Per dialogue, the chosen candidate's ROUGE final; 0 for a dialogue without any candidate."""
    finals = np.zeros(n_rows)
    chosen = frame.loc[picks]
    finals[chosen["row"].to_numpy()] = chosen["final"].to_numpy()
    return finals


def source_row_finals(frame: pd.DataFrame, source: int, n_rows: int) -> np.ndarray:
    finals = np.zeros(n_rows)
    own = frame[frame["source"] == source]
    finals[own["row"].to_numpy()] = own["final"].to_numpy()
    return finals


def mean_scores(chosen: pd.DataFrame, n_rows: int) -> dict[str, float]:
    """Mean ROUGE over all n_rows dialogues; a dialogue without a chosen candidate scores 0."""
    return {c: float(chosen[c].sum()) / n_rows for c in SCORE_COLUMNS}


def metric_name(label: str) -> str:
    return re.sub(r"[^\w.\- /:]", "_", label)


def best_source_index(sources: list[Source]) -> int:
    """The source with the best validation score (the first on ties or when none is scored)."""
    scores = [s.score if s.score is not None else float("-inf") for s in sources]
    return int(np.argmax(scores))


def role_metrics(prefix: str, frame: pd.DataFrame, picks: pd.Index, sources: list[Source], n_rows: int) -> dict[str, float]:
    """`prefix`_* scores of the ensemble, the oracle and each source on the same rows, the ensemble's interval,
    and the paired-bootstrap difference to the best source (by validation)."""
    metrics: dict[str, float] = {f"{prefix}_rows": float(n_rows)}
    if "final" not in frame.columns:
        return metrics
    ensemble = mean_scores(frame.loc[picks], n_rows)
    oracle = mean_scores(frame.loc[pick_highest(frame, "final")], n_rows)
    finals = row_finals(frame, picks, n_rows)
    interval = bootstrap_mean(finals)
    metrics.update({f"{prefix}_{c}": ensemble[c] for c in SCORE_COLUMNS})
    metrics.update({f"oracle_{prefix}_{c}": oracle[c] for c in SCORE_COLUMNS})
    metrics.update({f"{prefix}_final_ci95_low": interval.low, f"{prefix}_final_ci95_high": interval.high})
    for i, s in enumerate(sources):
        metrics[f"source_{metric_name(s.label)}_{prefix}_final"] = float(source_row_finals(frame, i, n_rows).mean())
    best = best_source_index(sources)
    comparison = compare("ensemble", finals, sources[best].label, source_row_finals(frame, best, n_rows))
    metrics.update(comparison_metrics(f"{prefix}_diff_vs_best_source", comparison))
    return metrics


def win_shares(frame: pd.DataFrame, picks: pd.Index, sources: list[Source], n_rows: int) -> dict[str, float]:
    won = frame.loc[picks, "source"].value_counts()
    return {f"win_share_{metric_name(s.label)}": float(won.get(i, 0)) / n_rows for i, s in enumerate(sources)}


def prediction_rows(candidates: CandidateSet, frame: pd.DataFrame, picks: pd.Index, sources: list[Source]) -> list[dict[str, Any]]:
    """The ensemble's predictions table: one row per dialogue with the chosen text and its source."""
    chosen = frame.loc[picks].set_index("row")
    oracle = frame.loc[pick_highest(frame, "final")].set_index("row") if "final" in frame.columns else None
    rows = []
    for r, (fname, dialogue) in enumerate(zip(candidates.fnames, candidates.dialogues)):
        has = r in chosen.index
        row: dict[str, Any] = {"fname": fname, "dialogue": dialogue}
        if candidates.labelled:
            row["reference"] = candidates.references[r]
        row["prediction"] = chosen.at[r, "text"] if has else ""
        if oracle is not None:
            row.update({c: float(chosen.at[r, c]) if has else 0.0 for c in SCORE_COLUMNS})
            row["oracle_source"] = sources[oracle.at[r, "source"]].label if has else ""
            row["oracle_final"] = float(oracle.at[r, "final"]) if has else 0.0
        row["source"] = sources[chosen.at[r, "source"]].label if has else ""
        row["consensus"] = float(chosen.at[r, "consensus"]) if has else 0.0
        row["n_candidates"] = int(chosen.at[r, "n_candidates"]) if has else 0
        rows.append(row)
    return rows


def summary_document(strategy: Strategy, metrics: dict[str, float], no_test: str | None) -> dict[str, Any]:
    per_source = {
        s.label: {
            "run_id": s.run_id,
            "validation_score": s.score,
            **{f"{p}_final_on_these_rows": metrics.get(f"source_{metric_name(s.label)}_{p}_final") for p in ("val", "test")},
            "win_share": metrics.get(f"win_share_{metric_name(s.label)}"),
        }
        for s in strategy.sources
    }
    document: dict[str, Any] = {"strategy": strategy.name, "sources": per_source, "strategy_params": strategy.describe()}
    for prefix in ("val", "test"):
        if f"{prefix}_final" in metrics:
            document[prefix] = {c: metrics[f"{prefix}_{c}"] for c in SCORE_COLUMNS}
            document[f"oracle_{prefix}"] = {"note": ORACLE_NOTE, **{c: metrics[f"oracle_{prefix}_{c}"] for c in SCORE_COLUMNS}}
    if no_test:
        document["test"] = f"not scored: {no_test}"
    return document


def description(strategy: Strategy, metrics: dict[str, float]) -> str:
    lines = [f"Ensemble `{strategy.name}` of {len(strategy.sources)} sources.", "",
             "| source | run | val_final (same rows) | test_final (same rows) | win share |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for s in strategy.sources:
        cells = [metrics.get(f"source_{metric_name(s.label)}_{p}_final") for p in ("val", "test")]
        shown = [f"{c:.2f}" if c is not None else "-" for c in cells]
        lines.append(f"| {s.label} | {s.run_id} | {shown[0]} | {shown[1]} | {metrics.get(f'win_share_{metric_name(s.label)}', 0):.2f} |")
    for prefix in ("val", "test"):
        if f"{prefix}_final" in metrics:
            lines += ["", f"Ensemble {prefix}_final: {metrics[f'{prefix}_final']:.2f} "
                      f"[{metrics[f'{prefix}_final_ci95_low']:.2f}, {metrics[f'{prefix}_final_ci95_high']:.2f}]; vs the best "
                      f"source {metrics[f'{prefix}_diff_vs_best_source']:+.2f} [{metrics[f'{prefix}_diff_vs_best_source_ci95_low']:+.2f}, "
                      f"{metrics[f'{prefix}_diff_vs_best_source_ci95_high']:+.2f}]. Oracle {prefix}_final: "
                      f"{metrics[f'oracle_{prefix}_final']:.2f} ({ORACLE_NOTE})"]  # fmt: skip
    return "\n".join(lines)


# --- the tracked run ----------------------------------------------------------------------------------------


def ensemble_config(strategy: Strategy, metric: str, mode: str, data_path: str | Path | None) -> dict[str, Any]:
    """The run's parameters, under `ensemble.` so they never collide with the MLproject entry point's own."""
    return {
        "ensemble": {
            "strategy": strategy.name,
            "metric": metric,
            "token_mode": mode,
            "data": str(data_path) if data_path else "the sources' logged prediction tables",
            "sources": {s.label: s.run_id for s in strategy.sources},
            strategy.name: strategy.describe(),
        }
    }


def prepare_sources(
    run_ids: Sequence[str], strategy: str, data_path: str | Path | None, metric: str, folds: int
) -> tuple[list[Source], list[tuple[str, str]], DialogueSet | None]:
    """Resolve and check sources and data before any run exists (NotEnoughSources, DataError, ValueError)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}' ({', '.join(STRATEGIES)})")
    if strategy == "stacking" and folds < 2:
        raise ValueError(f"stacking cross-validates with at least 2 folds, got {folds}")
    sources, unusable = resolve_sources(run_ids, metric, need_model=data_path is not None)
    if len(sources) < 2:
        raise NotEnoughSources([s.run_id for s in sources], unusable)
    if strategy == "weighted_mbr":
        unscored = [f"{s.label} ({s.run_id})" for s in sources if s.score is None]
        if unscored:
            raise ValueError(f"weighted_mbr weighs sources by '{metric}', which these did not log: {', '.join(unscored)}")
    if strategy == "stacking" and reference_column(sources[0].val_table) is None:
        raise ValueError("stacking trains its selector on labelled validation rows, but the sources' tables have no references")
    dataset = read_dialogues(data_path) if data_path else None
    return sources, unusable, dataset


@dataclass
class RoleResult:
    candidates: CandidateSet
    frame: pd.DataFrame
    picks: pd.Index


def run_ensemble(
    run_ids: Sequence[str],
    strategy: str = "mbr",
    *,
    data_path: str | Path | None = None,
    parent_run_id: str | None = None,
    metric: str = DEFAULT_METRIC,
    folds: int = 5,
    temperature: float = DEFAULT_TEMPERATURE,
    run_name: str | None = None,
    mode: TokenMode = "morpheme",
) -> str:
    """Ensemble the sources' summaries in a new tracked run and return its run id.

    Raises NotEnoughSources (fewer than two usable sources, or fewer than two scored on the same validation rows),
    DataError or ValueError (unusable settings) before creating any run.
    """
    import mlflow

    sources, unusable, dataset = prepare_sources(run_ids, strategy, data_path, metric, folds)
    plan = Strategy(strategy, sources, source_weights(sources, temperature), temperature, folds)
    no_test = "a labelled --data file is the test rows" if dataset is not None and dataset.report.labelled else test_tables_usable(sources)
    tags = {  # no model tag: a pipeline's stage run keeps the name it was opened with
        STRATEGY_TAG: strategy,
        SOURCES_TAG: ",".join(s.run_id for s in sources),
        SOURCE_MODELS_TAG: ",".join(s.label for s in sources),
    }
    with tracked_run(run_name=run_name or f"ensemble-{strategy}", kind="ensemble", tags=tags, parent_run_id=parent_run_id) as ctx:
        mlflow.log_dict({"metric": metric, "sources": [s.describe() for s in sources],
                         "unusable": [{"run_id": r, "reason": why} for r, why in unusable]}, SOURCES_ARTIFACT)  # fmt: skip
        pairwise = PairwiseRouge(mode)
        results: dict[str, RoleResult] = {}
        with ctx.stage_of("validation"):
            candidates = candidates_from_tables(sources, "val_table")
            frame = build_frame(candidates, sources, pairwise, plan.weights)
            results["val"] = RoleResult(candidates, frame, plan.choose_validation(frame).picks)
        with ctx.stage_of("select"):
            if no_test is None:
                candidates = candidates_from_tables(sources, "test_table")
                frame = build_frame(candidates, sources, pairwise, plan.weights)
                results["test"] = RoleResult(candidates, frame, plan.choose(frame).picks)
            if dataset is not None:
                candidates = candidates_from_models(sources, dataset)
                frame = build_frame(candidates, sources, pairwise, plan.weights)
                results["test" if candidates.labelled else "data"] = RoleResult(candidates, frame, plan.choose(frame).picks)
        with ctx.stage_of("log"):
            log_config(ensemble_config(plan, metric, mode, data_path))
            val = results["val"]
            metrics = win_shares(val.frame, val.picks, sources, len(val.candidates.fnames))
            metrics["n_sources"] = float(len(sources))
            for prefix in ("val", "test"):
                if prefix in results:
                    r = results[prefix]
                    metrics.update(role_metrics(prefix, r.frame, r.picks, sources, len(r.candidates.fnames)))
            mlflow.log_metrics(metrics)
            digests = {VAL_ROWS_TAG: val.candidates.digest, TEST_ROWS_TAG: results["test"].candidates.digest if "test" in results else None}
            mlflow.set_tags({k: v for k, v in digests.items() if v})
            if no_test:
                mlflow.set_tag("dialogsum.ensemble.test", f"not scored: {no_test}")
            mlflow.log_dict(summary_document(plan, metrics, no_test), SUMMARY_ARTIFACT)
            mlflow.set_tag("mlflow.note.content", description(plan, metrics))
            artifacts = {"val": PREDICTIONS_ARTIFACT, "test": TEST_PREDICTIONS_ARTIFACT, "data": DATA_PREDICTIONS_ARTIFACT}
            for prefix, r in results.items():
                log_predictions(prediction_rows(r.candidates, r.frame, r.picks, sources), artifacts[prefix])
        return ctx.run_id


def ensemble_summaries(ensemble_run_id: str, dataset: DialogueSet) -> list[str]:
    """The summaries a logged ensemble run (its strategy, sources, weights and validation-fit selector) writes for
    `dataset`'s dialogues, in order: what `dialogsum predict --ensemble-run` submits."""
    import mlflow

    run = mlflow.get_run(ensemble_run_id)
    params = run.data.params
    sources, _ = resolve_sources(run.data.tags[SOURCES_TAG].split(","), params.get("ensemble.metric", DEFAULT_METRIC), need_model=True)
    temperature = float(params.get("ensemble.weighted_mbr.temperature", DEFAULT_TEMPERATURE))
    folds = int(params.get("ensemble.stacking.folds", 5))
    plan = Strategy(run.data.tags[STRATEGY_TAG], sources, source_weights(sources, temperature), temperature, folds)
    pairwise = PairwiseRouge(params.get("ensemble.token_mode", "morpheme"))
    plan.choose_validation(build_frame(candidates_from_tables(sources, "val_table"), sources, pairwise, plan.weights))
    candidates = candidates_from_models(sources, dataset)
    candidates.references = None  # summaries only: a labelled file's references play no part
    frame = build_frame(candidates, sources, pairwise, plan.weights)
    return [row["prediction"] for row in prediction_rows(candidates, frame, plan.choose(frame).picks, sources)]
