"""Ensembles of summaries from tracked runs: MBR consensus, score-weighted MBR, and a learned stacking selector.

Sources are runs of kind `train` or `solar`. Their candidates are the prediction tables those runs logged, or,
with a data CSV, the summaries their logged pyfunc models (`runs:/<id>/model`) generate for it. Every strategy
selects one source's candidate per dialogue; none writes new text:

- `mbr`: the candidate with the highest mean Korean ROUGE ((R1+R2+RL)/3 F1) against the other candidates
  (minimum Bayes risk with ROUGE as the utility).
- `weighted_mbr`: the same mean, each other candidate weighted by its source's validation score.
- `stacking`: a gradient-boosting regressor predicts each candidate's ROUGE against the reference (relative to
  the dialogue's candidate mean) from per-candidate features; the highest prediction wins. On labelled rows it
  is cross-validated with GroupKFold by fname and the reported score is out-of-fold only; on unlabelled rows
  the selector is trained on the sources' logged (labelled) prediction tables.

The oracle (per dialogue, the candidate closest to the reference) is logged as `oracle_eval_*`: an upper bound
that needs the reference, not an achievable score. Ties go to the earlier source.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from dialogsum.data import DialogueSet, read_dialogues
from dialogsum.metrics import ROUGE_TYPES, TokenMode, pair_fmeasures, TextStats, korean_tokenizer, score_rows
from dialogsum.tracking import (
    KIND_TAG,
    MODEL_TAG,
    PREDICTIONS_ARTIFACT,
    STATUS_TAG,
    load_predictions,
    log_config,
    log_predictions,
    run_metric,
    tracked_run,
)

STRATEGIES = ("mbr", "weighted_mbr", "stacking")
SOURCE_KINDS = ("train", "solar")
SOURCES_ARTIFACT = "ensemble/sources.json"
SUMMARY_ARTIFACT = "ensemble/summary.json"
STRATEGY_TAG = "dialogsum.ensemble.strategy"
SOURCES_TAG = "dialogsum.ensemble.sources"
SOURCE_MODELS_TAG = "dialogsum.ensemble.source_models"
MIN_WEIGHT = 1e-6
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


class FnameMismatch(ValueError):
    """Sources whose prediction tables cover different dialogues; `missing` maps source → fnames it lacks."""

    def __init__(self, missing: dict[str, list[str]]):
        self.missing = missing
        lines = [
            f"\n  {name} lacks {len(fnames)}: {', '.join(fnames[:10])}{' ...' if len(fnames) > 10 else ''}"
            for name, fnames in missing.items()
        ]
        super().__init__("the sources' prediction tables cover different fnames:" + "".join(lines))


@dataclass
class Source:
    """One source run: its model name, validation score, metric label and (when loaded) its predictions."""

    run_id: str
    model: str
    kind: str
    score: float | None
    label: str = ""
    table: pd.DataFrame | None = field(default=None, repr=False)

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


# --- choosing sources ---------------------------------------------------------------------------------------


def source_runs_of_parent(parent_run_id: str, metric: str = "eval_final") -> list[str]:
    """The succeeded train/solar child runs of a parent, best `metric` first (runs without it last)."""
    import mlflow

    parent = mlflow.get_run(parent_run_id)
    runs = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{STATUS_TAG}` = 'succeeded'",
        output_format="list",
    )
    children = [r for r in runs if r.data.tags.get(KIND_TAG) in SOURCE_KINDS]
    children.sort(key=lambda r: (run_metric(r, metric) is None, -(run_metric(r, metric) or 0.0), r.info.start_time))
    return [r.info.run_id for r in children]


def top_k_source_runs(k: int, metric: str = "eval_final") -> list[str]:
    """The k succeeded train/solar runs of the active experiment with the best `metric`."""
    import mlflow

    runs = mlflow.search_runs(filter_string=f"tags.`{STATUS_TAG}` = 'succeeded'", output_format="list")
    scored = [r for r in runs if r.data.tags.get(KIND_TAG) in SOURCE_KINDS and run_metric(r, metric) is not None]
    scored.sort(key=lambda r: run_metric(r, metric), reverse=True)
    return [r.info.run_id for r in scored[:k]]


# --- loading sources ----------------------------------------------------------------------------------------


def describe_run(run_id: str, metric: str) -> Source:
    import mlflow

    run = mlflow.get_run(run_id)
    tags = run.data.tags
    model = tags.get(MODEL_TAG) or run.info.run_name or run_id[:8]
    return Source(run_id, model, tags.get(KIND_TAG, ""), run_metric(run, metric))


def usable_table(run_id: str) -> pd.DataFrame:
    """A run's predictions table with a `usable` column: no error and a prediction text."""
    try:
        table = load_predictions(run_id)
    except Exception as e:  # a missing artifact surfaces as different MLflow/OS errors per store
        raise ValueError(f"no predictions table {PREDICTIONS_ARTIFACT} ({type(e).__name__})") from e
    missing = [c for c in ("fname", "dialogue", "prediction") if c not in table.columns]
    if missing:
        raise ValueError(f"its predictions table lacks column(s) {', '.join(missing)}")
    repeated = sorted(set(table["fname"][table["fname"].duplicated()]))
    if repeated:
        raise ValueError(f"its predictions table repeats fname(s) {', '.join(repeated[:10])}")
    errors = table["error"] if "error" in table.columns else pd.Series([None] * len(table))
    no_error = errors.isna().to_numpy() | (errors.astype(str).str.strip() == "").to_numpy()
    has_text = table["prediction"].map(lambda p: isinstance(p, str)).to_numpy()
    table["usable"] = no_error & has_text
    if not table["usable"].any():
        raise ValueError("its predictions table has no usable row (every row has an error or no prediction)")
    return table


def has_model(run_id: str) -> None:
    """Raise unless the run logged a model under `model` (reads only the model's metadata)."""
    import mlflow

    from dialogsum.serving import MODEL_ARTIFACT_PATH

    try:
        mlflow.models.get_model_info(f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}")
    except Exception as e:
        raise ValueError(f"no model logged at runs:/{run_id}/{MODEL_ARTIFACT_PATH} ({type(e).__name__})") from e


def resolve_sources(run_ids: Sequence[str], metric: str, need_model: bool) -> tuple[list[Source], list[tuple[str, str]]]:
    """Usable sources (prediction table loaded, or model present when `need_model`) and (run id, reason) for the rest."""
    sources: list[Source] = []
    unusable: list[tuple[str, str]] = []
    for run_id in dict.fromkeys(run_ids):
        try:
            source = describe_run(run_id, metric)
            if need_model:
                has_model(run_id)
            else:
                source.table = usable_table(run_id)
        except Exception as e:  # any run that cannot serve as a source is reported, not fatal
            unusable.append((run_id, str(e) or type(e).__name__))
            continue
        sources.append(source)
    assign_labels(sources)
    return sources, unusable


def assign_labels(sources: list[Source]) -> None:
    """Each source's name in metrics: its model name, suffixed with the run id's start when models repeat."""
    counts = Counter(s.model for s in sources)
    for s in sources:
        s.label = s.model if counts[s.model] == 1 else f"{s.model}-{s.run_id[:8]}"


def load_tables(sources: list[Source]) -> None:
    """Load every source's predictions table (for stacking's selector on unlabelled rows)."""
    problems = []
    for s in sources:
        try:
            s.table = usable_table(s.run_id)
        except Exception as e:  # collected and reported together
            problems.append(f"{s.label} ({s.run_id}): {e}")
    if problems:
        raise ValueError(
            "stacking on unlabelled rows trains its selector on the sources' labelled prediction tables, "
            "which are not available:\n  " + "\n  ".join(problems)
        )


def check_fnames(sources: list[Source]) -> None:
    """Raise FnameMismatch unless every source's table covers the same fnames."""
    covered = {s.label: set(s.table["fname"]) for s in sources}
    union = set().union(*covered.values())
    missing = {f"{label} ({s.run_id})": sorted(union - covered[label]) for s, label in zip(sources, covered)}
    missing = {name: fnames for name, fnames in missing.items() if fnames}
    if missing:
        raise FnameMismatch(missing)


# --- candidates ---------------------------------------------------------------------------------------------


def candidates_from_tables(sources: list[Source]) -> CandidateSet:
    """Align the sources' tables by fname (in the first source's order)."""
    first = sources[0].table
    by_source = [s.table.set_index("fname") for s in sources]
    fnames = list(first["fname"])
    texts = [[t.at[f, "prediction"] if t.at[f, "usable"] else None for t in by_source] for f in fnames]
    references = reference_column(first)
    return CandidateSet(fnames, list(first["dialogue"]), references, texts)


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

    from dialogsum.serving import MODEL_ARTIFACT_PATH, predict_summaries

    model = mlflow.pyfunc.load_model(f"runs:/{source.run_id}/{MODEL_ARTIFACT_PATH}")
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


def source_weights(sources: list[Source]) -> np.ndarray:
    """weighted_mbr's weights: each source's validation score (a missing or non-positive one counts ~0)."""
    return np.array([max(s.score or 0.0, MIN_WEIGHT) for s in sources])


def build_frame(candidates: CandidateSet, sources: list[Source], pairwise: PairwiseRouge) -> pd.DataFrame:
    """One row per candidate: dialogue row, source index, text, consensus features and (labelled) its ROUGE."""
    pairwise.tokenizer.prime(t for row in candidates.texts for t in row if t is not None)
    weights = source_weights(sources)
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


def out_of_fold_predictions(
    features: np.ndarray, target: np.ndarray, groups: np.ndarray, folds: int, new_estimator: Callable[[], Any] = new_selector
) -> tuple[np.ndarray, int]:
    """Predictions for every sample from a model that never saw its group (GroupKFold); returns (predictions, folds used)."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"stacking needs at least two labelled dialogues to cross-validate, got {n_groups}")
    n_splits = min(folds, n_groups)
    predictions = np.empty(len(target))
    for train_index, test_index in GroupKFold(n_splits=n_splits).split(features, target, groups):
        model = new_estimator().fit(features[train_index], target[train_index])
        predictions[test_index] = model.predict(features[test_index])
    return predictions, n_splits


@dataclass
class Selection:
    picks: pd.Index
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def out_of_fold_picks(frame: pd.DataFrame, n_sources: int, folds: int, what: str) -> tuple[pd.Index, int]:
    """Per dialogue, the candidate a selector trained on the other folds' dialogues ranks highest."""
    if "final" not in frame.columns:
        raise ValueError(f"{what} needs labelled rows (a reference per dialogue)")
    features, target = stacking_matrix(frame, n_sources), relative_target(frame)
    predicted, used = out_of_fold_predictions(features, target, frame["row"].to_numpy(), folds)
    return pick_highest(frame.assign(stacking=predicted), "stacking"), used


def select_stacking(
    frame: pd.DataFrame, sources: list[Source], folds: int, training_frame: pd.DataFrame | None
) -> Selection:
    """Out-of-fold stacking on labelled rows; on unlabelled rows, a selector trained on `training_frame`."""
    params = {
        "features": stacking_feature_names(sources),
        "model": "GradientBoostingRegressor",
        "model_params": STACKING_PARAMS,
        "target": "candidate ROUGE final minus the dialogue's candidate mean",
    }
    n = len(sources)
    if training_frame is None:
        picks, used = out_of_fold_picks(frame, n, folds, "stacking")
        return Selection(picks, {**params, "folds": used, "scored": "out-of-fold (GroupKFold by fname)"})
    oof_picks, used = out_of_fold_picks(training_frame, n, folds, "stacking's selector")
    selector = new_selector().fit(stacking_matrix(training_frame, n), relative_target(training_frame))
    applied = frame.assign(stacking=selector.predict(stacking_matrix(frame, n)))
    return Selection(
        pick_highest(applied, "stacking"),
        {**params, "folds": used, "trained_on": "the sources' logged prediction tables"},
        {"selector_oof_eval_final": float(training_frame.loc[oof_picks, "final"].mean())},
    )


def select(
    frame: pd.DataFrame, strategy: str, sources: list[Source], *, folds: int = 5, training_frame: pd.DataFrame | None = None
) -> Selection:
    """The chosen candidate per dialogue for a strategy."""
    if strategy == "mbr":
        return Selection(pick_highest(frame, "consensus"), {"utility": "mean (R1+R2+RL)/3 F1 vs the other candidates"})
    if strategy == "weighted_mbr":
        weights = {s.label: float(w) for s, w in zip(sources, source_weights(sources))}
        return Selection(pick_highest(frame, "weighted_consensus"), {"utility": "score-weighted mean (R1+R2+RL)/3 F1", "weights": weights})
    if strategy == "stacking":
        return select_stacking(frame, sources, folds, training_frame)
    raise ValueError(f"unknown strategy '{strategy}' ({', '.join(STRATEGIES)})")


# --- results ------------------------------------------------------------------------------------------------


def mean_scores(chosen: pd.DataFrame, n_rows: int) -> dict[str, float]:
    """Mean ROUGE over all n_rows dialogues; a dialogue without a chosen candidate scores 0."""
    return {c: float(chosen[c].sum()) / n_rows for c in SCORE_COLUMNS}


def metric_name(label: str) -> str:
    return re.sub(r"[^\w.\- /:]", "_", label)


def result_metrics(frame: pd.DataFrame, picks: pd.Index, sources: list[Source], n_rows: int) -> dict[str, float]:
    """Ensemble, oracle and per-source scores on the same rows, and each source's share of rows won."""
    won = frame.loc[picks, "source"].value_counts()
    metrics = {f"win_share_{metric_name(s.label)}": float(won.get(i, 0)) / n_rows for i, s in enumerate(sources)}
    metrics.update({"n_rows": float(n_rows), "n_sources": float(len(sources)),
                    "rows_without_candidates": float(n_rows - frame["row"].nunique())})
    if "final" not in frame.columns:
        return metrics
    ensemble = mean_scores(frame.loc[picks], n_rows)
    oracle = mean_scores(frame.loc[pick_highest(frame, "final")], n_rows)
    for c in SCORE_COLUMNS:
        metrics[f"eval_{c}"] = ensemble[c]
        metrics[f"oracle_eval_{c}"] = oracle[c]
    for i, s in enumerate(sources):
        metrics[f"source_{metric_name(s.label)}_eval_final"] = mean_scores(frame[frame["source"] == i], n_rows)["final"]
    return metrics


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


def summary_document(strategy: str, metrics: dict[str, float], sources: list[Source], selection: Selection) -> dict[str, Any]:
    scored = "eval_final" in metrics
    per_source = {
        s.label: {
            "run_id": s.run_id,
            "validation_score": s.score,
            "eval_final_on_these_rows": metrics.get(f"source_{metric_name(s.label)}_eval_final"),
            "win_share": metrics[f"win_share_{metric_name(s.label)}"],
        }
        for s in sources
    }
    document: dict[str, Any] = {"strategy": strategy, "rows": int(metrics["n_rows"]), "sources": per_source}
    if scored:
        document["ensemble"] = {c: metrics[f"eval_{c}"] for c in SCORE_COLUMNS}
        document["ensemble_score_kind"] = selection.params.get("scored", "selection without references")
        document["oracle"] = {"note": ORACLE_NOTE, **{c: metrics[f"oracle_eval_{c}"] for c in SCORE_COLUMNS}}
    return document


def description(strategy: str, metrics: dict[str, float], sources: list[Source]) -> str:
    lines = [f"Ensemble `{strategy}` of {len(sources)} sources over {int(metrics['n_rows'])} dialogues.", "",
             "| source | run | eval_final (same rows) | win share |", "| --- | --- | --- | --- |"]
    for s in sources:
        final = metrics.get(f"source_{metric_name(s.label)}_eval_final")
        shown = f"{final:.2f}" if final is not None else "-"
        lines.append(f"| {s.label} | {s.run_id} | {shown} | {metrics[f'win_share_{metric_name(s.label)}']:.2f} |")
    if "eval_final" in metrics:
        lines += ["", f"Ensemble eval_final: {metrics['eval_final']:.2f}.",
                  f"Oracle eval_final: {metrics['oracle_eval_final']:.2f} ({ORACLE_NOTE})"]
    return "\n".join(lines)


# --- the tracked run ----------------------------------------------------------------------------------------


def ensemble_config(
    strategy: str, metric: str, mode: str, data_path: str | Path | None, sources: list[Source], selection: Selection
) -> dict[str, Any]:
    """The run's parameters, under `ensemble.` so they never collide with the MLproject entry point's own."""
    return {
        "ensemble": {
            "strategy": strategy,
            "metric": metric,
            "token_mode": mode,
            "candidates": str(data_path) if data_path else "the sources' logged prediction tables",
            "sources": {s.label: s.run_id for s in sources},
            strategy: selection.params,
        }
    }


def check_stacking_labels(sources: list[Source], dataset: DialogueSet | None) -> None:
    """Stacking learns from labelled rows: the data CSV's, else the sources' tables (loaded here for an unlabelled CSV)."""
    if dataset is not None and dataset.report.labelled:
        return
    if dataset is not None:
        load_tables(sources)
        check_fnames(sources)
    if reference_column(sources[0].table) is None:
        raise ValueError("stacking trains its selector on labelled rows, but the sources' prediction tables have no references")


def prepare_sources(
    run_ids: Sequence[str], strategy: str, data_path: str | Path | None, metric: str, folds: int
) -> tuple[list[Source], list[tuple[str, str]], DialogueSet | None]:
    """Resolve and check sources and data before any run exists (NotEnoughSources, FnameMismatch, ...)."""
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
    dataset = read_dialogues(data_path) if data_path else None
    if dataset is None:
        check_fnames(sources)
    if strategy == "stacking":
        check_stacking_labels(sources, dataset)
    return sources, unusable, dataset


def run_ensemble(
    run_ids: Sequence[str],
    strategy: str = "mbr",
    *,
    data_path: str | Path | None = None,
    parent_run_id: str | None = None,
    metric: str = "eval_final",
    folds: int = 5,
    run_name: str | None = None,
    mode: TokenMode = "morpheme",
) -> str:
    """Ensemble the sources' summaries in a new tracked run and return its run id.

    Raises NotEnoughSources (fewer than two usable sources), FnameMismatch, DataError or ValueError (unusable
    settings) before creating any run.
    """
    import mlflow

    sources, unusable, dataset = prepare_sources(run_ids, strategy, data_path, metric, folds)
    tags = {  # no model tag: a pipeline's stage run keeps the name it was opened with
        STRATEGY_TAG: strategy,
        SOURCES_TAG: ",".join(s.run_id for s in sources),
        SOURCE_MODELS_TAG: ",".join(s.label for s in sources),
    }
    with tracked_run(run_name=run_name or f"ensemble-{strategy}", kind="ensemble", tags=tags, parent_run_id=parent_run_id) as ctx:
        mlflow.log_dict({"metric": metric, "sources": [s.describe() for s in sources],
                         "unusable": [{"run_id": r, "reason": why} for r, why in unusable]}, SOURCES_ARTIFACT)
        pairwise = PairwiseRouge(mode)
        with ctx.stage_of("candidates"):
            candidates = candidates_from_models(sources, dataset) if dataset else candidates_from_tables(sources)
            training_frame = None
            if strategy == "stacking" and not candidates.labelled:
                training_frame = build_frame(candidates_from_tables(sources), sources, pairwise)
        with ctx.stage_of("consensus"):
            frame = build_frame(candidates, sources, pairwise)
        with ctx.stage_of("select"):
            selection = select(frame, strategy, sources, folds=folds, training_frame=training_frame)
        with ctx.stage_of("log"):
            log_config(ensemble_config(strategy, metric, mode, data_path, sources, selection))
            metrics = result_metrics(frame, selection.picks, sources, len(candidates.fnames))
            mlflow.log_metrics({**metrics, **selection.metrics})
            mlflow.log_dict(summary_document(strategy, metrics, sources, selection), SUMMARY_ARTIFACT)
            mlflow.set_tag("mlflow.note.content", description(strategy, metrics, sources))
            log_predictions(prediction_rows(candidates, frame, selection.picks, sources))
        return ctx.run_id
