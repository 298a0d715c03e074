"""Reading a pipeline's children back from the MLflow store: the latest attempt of each step, and the best one."""

from __future__ import annotations

from dialogsum.tracking import GPUS_TAG, KIND_TAG, MODEL_TAG, STARTED_AT_TAG, STATUS_TAG, run_metric

SELECTION_METRIC = "val_final"
SUPERSEDED_TAG = "dialogsum.superseded_by"  # on a step's child that a resumed pipeline ran again


def latest_children(parent_id: str) -> list:
    """The parent's children, keeping the latest attempt per (kind, model) and leaving out superseded ones, in
    start order."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )
    latest = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        if SUPERSEDED_TAG in r.data.tags:
            continue
        latest[(r.data.tags.get(KIND_TAG), r.data.tags.get(MODEL_TAG))] = r
    return sorted(latest.values(), key=lambda r: r.info.start_time)


def find_child(children: list, kind: str, name: str | None = None):
    """The latest attempt of a step (and model) among a pipeline's children, or None."""
    for run in reversed(children):
        if run.data.tags.get(KIND_TAG) == kind and (name is None or run.data.tags.get(MODEL_TAG) == name):
            return run
    return None


def succeeded(run) -> bool:
    return run is not None and run.data.tags.get(STATUS_TAG) == "succeeded"


def best_train_run(children: list, metric: str = SELECTION_METRIC):
    """The succeeded training child with the best validation `metric` (all children share the validation rows)."""
    scored = [(run_metric(r, metric), r) for r in children if r.data.tags.get(KIND_TAG) == "train" and succeeded(r)]
    scored = [(v, r) for v, r in scored if v is not None]
    return max(scored, key=lambda vr: vr[0])[1] if scored else None


def started_ms(run) -> int:
    """When a stage started working: its run's start, or, for a stage queued on a Ray cluster, when it got its
    resources (`dialogsum.started_at`)."""
    return int(run.data.tags.get(STARTED_AT_TAG, run.info.start_time))


def duration_s(run) -> float | None:
    """Seconds a stage worked (from `started_ms`), None while it runs."""
    return None if run.info.end_time is None else (run.info.end_time - started_ms(run)) / 1000


def held_gpus(run) -> str | None:
    """The GPUs the local executor pinned a stage to (`gpus_label`), or None when it was not pinned (a machine
    without GPUs, a Ray task)."""
    gpus = run.data.tags.get(GPUS_TAG)
    return None if gpus is None else gpus_label(gpus)


def gpus_label(gpus: str) -> str:
    """`GPU 3`, `GPUs 2,3` or `no GPU` for a `dialogsum.gpus` value (`3`, `2,3`, empty)."""
    if not gpus:
        return "no GPU"
    return f"GPU{'s' if ',' in gpus else ''} {gpus}"
