"""`dialogsum kfold`: K-fold cross-validation as a parent run (`dialogsum.kind=kfold`) with one child training run
per fold (`dialogsum.kind=train`, tagged `dialogsum.fold`).

The labelled training rows are split by scikit-learn's `GroupKFold`, grouped by `fname` (every row its own group) or
by `topic` (no topic in two folds). Fold i trains on the other folds and validates on fold i; its validation
predictions of the chosen epoch are the out-of-fold (OOF) predictions of fold i's rows, so the parent's
`oof_predictions.json` holds every training row exactly once, with its fold and per-row ROUGE. The parent logs
the mean and standard deviation of the folds' `best_val_final` and the OOF score over all rows with its 95%
interval and row digest. (Each fold's epoch was chosen on its own validation rows, so the OOF score leans
optimistic by that choice, as any validation score does.) Every fold's model is logged, so the folds can be
ensembled. `--resume PARENT_RUN_ID` reruns only the folds without a succeeded child.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from dialogsum.data import DialogueSet, read_dialogues, rows_digest, sample_data_path, write_dialogues

FOLD_TAG = "dialogsum.fold"
FOLDS_TAG = "dialogsum.folds"
OOF_ARTIFACT = "oof_predictions.json"
OOF_ROWS_TAG = "dialogsum.oof_rows_digest"
FOLDS_DIR = Path("dialogsum-kfold")
GroupBy = Literal["fname", "topic"]


class KFoldError(ValueError):
    """Folds that cannot be made (too few rows or groups, rows without a topic for --group-by topic)."""


def fold_assignment(data: DialogueSet, folds: int, group_by: GroupBy) -> list[int]:
    """The fold of every row, in row order."""
    from sklearn.model_selection import GroupKFold

    if folds < 2:
        raise KFoldError(f"--folds {folds}: need at least 2")
    if group_by == "topic":
        missing = [i + 1 for i, r in enumerate(data.rows) if not r.topic]
        if missing:
            raise KFoldError(f"{data.report.path}: --group-by topic, but row(s) {missing[:10]} have no 'topic'")
    groups = [r.topic if group_by == "topic" else r.fname for r in data.rows]
    if len(set(groups)) < folds:
        raise KFoldError(f"{data.report.path}: {len(set(groups))} {group_by} group(s) for {folds} folds")
    assignment = [0] * len(data)
    for fold, (_, held_out) in enumerate(GroupKFold(n_splits=folds).split(data.rows, groups=groups)):
        for i in held_out:
            assignment[i] = fold
    return assignment


def write_folds(data: DialogueSet, assignment: list[int], folds: int, folder: Path) -> list[tuple[Path, Path]]:
    """(train CSV, validation CSV) per fold under `folder` (kept: the fold runs' dataset inputs point at them)."""
    paths = []
    for fold in range(folds):
        train = data.subset([r for r, f in zip(data.rows, assignment) if f != fold], f"folds other than {fold}")
        held_out = data.subset([r for r, f in zip(data.rows, assignment) if f == fold], f"fold {fold}")
        paths.append((write_dialogues(train, folder / f"fold-{fold}" / "train.csv"),
                      write_dialogues(held_out, folder / f"fold-{fold}" / "validation.csv")))  # fmt: skip
    return paths


def finished_folds(parent_run_id: str) -> dict[int, str]:
    """fold → run id of its succeeded child (the latest one)."""
    import mlflow

    from dialogsum.tracking import STATUS_TAG

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{STATUS_TAG}` = 'succeeded'")  # fmt: skip
    return {int(r.data.tags[FOLD_TAG]): r.info.run_id for r in runs if FOLD_TAG in r.data.tags}


def run_kfold(
    model: str,
    folds: int = 5,
    group_by: GroupBy = "fname",
    *,
    train_path: str | Path | None = None,
    test_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    resume_run_id: str | None = None,
) -> str:
    """Train the folds (all, or with `resume_run_id` the unfinished ones) and log the cross-validation; returns the
    parent run id."""
    import mlflow

    from dialogsum.config import load_model_config
    from dialogsum.tracking import MODEL_TAG, configure_tracking, tracked_run
    from dialogsum.training.recipe import train_model

    cfg = load_model_config(model, overrides)
    path = Path(train_path or sample_data_path("train"))
    data = read_dialogues(path, require_summary=True)
    assignment = fold_assignment(data, folds, group_by)
    configure_tracking()
    tags = {MODEL_TAG: cfg.name, FOLDS_TAG: str(folds), "dialogsum.group_by": group_by}
    with tracked_run(run_name=f"{cfg.name}-kfold-{folds}", kind="kfold", tags=tags, run_id=resume_run_id) as run:
        if resume_run_id is None:
            mlflow.log_params({"kfold.folds": folds, "kfold.group_by": group_by, "data.training.file_digest": data.report.digest,
                               "data.training.rows": len(data), "model": cfg.name, **{f"set.{k}": v for k, v in (overrides or {}).items()}})  # fmt: skip
        elif mlflow.get_run(run.run_id).data.params.get("data.training.file_digest") != data.report.digest:
            raise KFoldError(f"--resume {resume_run_id}: {path} is not the training file the folds were made from")
        done = finished_folds(run.run_id)
        with run.stage_of("folds"):
            paths = write_folds(data, assignment, folds, FOLDS_DIR / run.run_id)
            for fold, (fold_train, fold_validation) in enumerate(paths):
                if fold in done:
                    continue
                done[fold] = train_model(cfg.name, train_path=fold_train, validation_path=fold_validation, test_path=test_path,
                                         overrides=overrides, parent_run_id=run.run_id, run_name=f"{cfg.name}-fold-{fold}",
                                         tags={FOLD_TAG: str(fold)})  # fmt: skip
        with run.stage_of("cross-validation"):
            log_cross_validation(data, done)
    return run.run_id


def log_cross_validation(data: DialogueSet, fold_runs: dict[int, str]) -> None:
    """On the active (parent) run: the OOF table (every training row once), the folds' mean ± std and the OOF score."""
    import mlflow
    import numpy as np
    import pandas as pd

    from dialogsum.stats import bootstrap_mean
    from dialogsum.tracking import load_predictions, log_predictions

    tables = []
    for fold, run_id in sorted(fold_runs.items()):
        table = load_predictions(run_id)
        tables.append(table.assign(fold=fold, run_id=run_id))
    oof = pd.concat(tables, ignore_index=True)
    order = {r.fname: i for i, r in enumerate(data.rows)}
    if sorted(oof["fname"], key=order.get) != data.fnames or oof["fname"].duplicated().any():
        raise KFoldError("the folds' validation tables do not cover every training row exactly once")
    oof = oof.sort_values("fname", key=lambda column: column.map(order)).reset_index(drop=True)
    log_predictions(oof.to_dict("records"), OOF_ARTIFACT)
    finals = np.array([mlflow.get_run(run_id).data.metrics["best_val_final"] for _, run_id in sorted(fold_runs.items())])
    interval = bootstrap_mean(list(oof["final"]))
    mlflow.log_metrics({"cv_val_final_mean": float(finals.mean()), "cv_val_final_std": float(finals.std(ddof=1)),
                        "oof_final": float(oof["final"].mean()), "oof_final_ci95_low": interval.low,
                        "oof_final_ci95_high": interval.high, "oof_rows": len(oof)})  # fmt: skip
    mlflow.set_tag(OOF_ROWS_TAG, rows_digest(list(oof["fname"]), list(oof["reference"])))
