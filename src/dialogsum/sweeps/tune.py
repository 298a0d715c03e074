"""`dialogsum tune`: an Optuna study over a search space, as one MLflow parent run (`dialogsum.kind=tune`) whose
children are the trials: ordinary training runs (`dialogsum.kind=train`) tagged `dialogsum.study` and
`dialogsum.trial`, so the registry, ensembles and reports treat them like any other training. A space of
`generation.*` keys only is searched with `--from-run RUN_ID` instead: each trial re-generates that run's validation
rows with its logged model and the trial's settings (a child of kind `generate`), with no training.

Each trial reports its validation score after every epoch and the pruner decides: a pruned trial ends KILLED with
`dialogsum.status=pruned` and the epoch it stopped after; a trial that raises ends FAILED with its error
artifacts and is FAIL in Optuna, never "pruned". The nested runs are written here (optuna-integration's
MLflowCallback is deprecated and logs no intermediate values).

Storage: in memory for one process without `--study`; a journal file (`dialogsum-studies/<study>.journal`) when
a study is named, so the same `--study` continues it and several processes on one host share it; an RDB URL
(PostgreSQL across machines) for any number of workers. With an RDB, workers send heartbeats: the trial of a
worker that died is marked FAIL by the next worker to ask for a trial, its child run is closed FAILED
(`WorkerLost`), and the trial is retried once with its parameters. `--trials` is a cap over all workers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dialogsum.config import load_model_config
from dialogsum.sweeps.space import SearchSpace, load_space

STUDY_TAG = "dialogsum.study"
TRIAL_TAG = "dialogsum.trial"
METRIC_TAG = "dialogsum.study.metric"  # on the parent: the metric the study optimizes
BEST_RUN_TAG = "dialogsum.best_trial_run"
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
OVER_CAP_ATTR = "over_cap"
HEARTBEAT_S = int(os.environ.get("DIALOGSUM_TUNE_HEARTBEAT_S", "5"))  # RDB workers' heartbeat, and how long a silent
GRACE_S = int(os.environ.get("DIALOGSUM_TUNE_GRACE_S", "20"))  # worker is waited for before its trial is failed
STUDIES_DIR = Path("dialogsum-studies")
BEST_OVERRIDES_ARTIFACT = "best_overrides.yaml"
BEST_SET_LINE_ARTIFACT = "best_set_line.txt"
TRIALS_TABLE = "trials.json"
HISTORY_PLOT = "plots/optimization_history.png"
IMPORTANCE_PLOT = "plots/param_importances.png"


class TuneError(ValueError):
    """A study that cannot start: a bad storage, sampler or pruner, or a space that does not fit the model."""


@dataclass
class TuneSettings:
    model: str
    space: str
    trials: int
    study: str | None = None
    storage: str | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    metric: str = "val_final"
    seed: int | None = None
    train_path: str | None = None
    validation_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    from_run: str | None = None  # generation-only spaces: re-generate with this run's model, no training

    @property
    def direction(self) -> str:
        return "minimize" if "loss" in self.metric else "maximize"


def journal_path(storage: str | None, study_name: str) -> Path | None:
    """The journal file a `--storage` names: `journal:PATH` or a `.journal`/`.log` path, and by default (none given)
    `dialogsum-studies/<study>.journal`; None for an RDB URL."""
    if storage is None:
        return STUDIES_DIR / f"{study_name}.journal"
    if storage.startswith("journal:") or storage.endswith((".journal", ".log")):
        return Path(storage.removeprefix("journal:"))
    return None


def storage_for(settings: TuneSettings, study_name: str):
    """The Optuna storage the settings name (see the module docstring); None is in-memory."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryFailedTrialCallback
    from optuna.storages.journal import JournalFileBackend

    url = settings.storage
    if url is None and settings.study is None:
        return None
    path = journal_path(url, study_name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    assert url is not None
    if "://" not in url:
        raise TuneError(f"--storage '{url}': give an RDB URL (postgresql://…, sqlite:///…) or journal:PATH")
    retry = RetryFailedTrialCallback(max_retry=1)

    def worker_lost(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        close_lost_trial_run(study.study_name, trial.number)
        retry(study, trial)

    try:
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, failed_trial_callback=worker_lost)
    except Exception as e:
        raise TuneError(f"--storage {url}: cannot open the study database ({type(e).__name__}: {e})") from e


def trial_runs(study_name: str, number: int) -> list:
    """The child runs of trial `number` of the study (found by tags: a worker may die before it records the id)."""
    import mlflow

    query = f"tags.`{STUDY_TAG}` = '{study_name}' and tags.`{TRIAL_TAG}` = '{number}'"
    return mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list")


def close_lost_trial_run(study_name: str, number: int) -> None:
    """The child run of a trial whose worker died (no heartbeat): closed FAILED with `error.type=WorkerLost`."""
    import mlflow

    from dialogsum.tracking import STATUS_TAG

    client = mlflow.MlflowClient()
    message = f"the worker running trial {number} stopped sending heartbeats (killed or lost); the trial is retried once"
    for run in trial_runs(study_name, number):
        if run.info.status != "RUNNING":
            continue
        for key, value in {STATUS_TAG: "failed", "error.type": "WorkerLost", "error.stage": "train", "error.message": message}.items():
            client.set_tag(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FAILED")


def sampler_for(name: str, seed: int | None):
    import optuna

    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed), "random": lambda: optuna.samplers.RandomSampler(seed=seed)}
    if name not in samplers:
        raise TuneError(f"--sampler {name}: choose {' or '.join(samplers)}")
    return samplers[name]()


def pruner_for(name: str):
    import optuna

    pruners = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
               "hyperband": lambda: optuna.pruners.HyperbandPruner(), "none": lambda: optuna.pruners.NopPruner()}  # fmt: skip
    if name not in pruners:
        raise TuneError(f"--pruner {name}: choose {', '.join(pruners)}")
    return pruners[name]()


def study_parent(study, storage, settings: TuneSettings) -> str:
    """The study's MLflow parent run: created by the first worker, found by the others through the study's user
    attributes (two workers racing both create one; the one stored last wins and the other is deleted)."""
    import mlflow
    import optuna

    from dialogsum.tracking import KIND_TAG, MODEL_TAG, STATUS_TAG, active_experiment_id, source_git_tags

    existing = study.user_attrs.get(PARENT_ATTR)
    if existing:
        return existing
    given = os.environ.pop("MLFLOW_RUN_ID", None)  # a pipeline's tune step (or `mlflow run`) opened the parent
    if given:
        mlflow.MlflowClient().set_tag(given, STUDY_TAG, study.study_name)
        study.set_user_attr(PARENT_ATTR, given)
        return given
    client = mlflow.MlflowClient()
    tags = {**source_git_tags(), KIND_TAG: "tune", STUDY_TAG: study.study_name, MODEL_TAG: settings.model, STATUS_TAG: "running"}
    run = client.create_run(active_experiment_id(), run_name=f"tune-{study.study_name}", tags=tags)
    client.log_param(run.info.run_id, "study.space", settings.space)
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    time.sleep(0.5)  # let a racing worker's write land before reading back who won
    reloaded = optuna.load_study(study_name=study.study_name, storage=storage) if storage is not None else study
    winner = reloaded.user_attrs[PARENT_ATTR]
    if winner != run.info.run_id:
        client.delete_run(run.info.run_id)
    return winner


def _trial_value(run_id: str, metric: str) -> float:
    import mlflow

    value = mlflow.get_run(run_id).data.metrics.get(f"best_{metric}")
    if value is None:
        raise RuntimeError(f"trial run {run_id} logged no best_{metric}")
    return value


def make_objective(settings: TuneSettings, space: SearchSpace, parent_run_id: str):
    import mlflow
    import optuna

    from dialogsum.tracking import RunPruned
    from dialogsum.training.recipe import train_model

    def objective(trial: optuna.Trial) -> float:
        live = counted_trials(trial.study, (*finished_states(), optuna.trial.TrialState.RUNNING))
        if len(live) > settings.trials:  # another worker took the last one
            trial.set_user_attr(OVER_CAP_ATTR, True)
            trial.study.stop()
            raise optuna.TrialPruned("over the study's trial cap")

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if epoch == 1:
                trial.set_user_attr(RUN_ATTR, mlflow.active_run().info.run_id)
            trial.report(metrics[settings.metric], epoch)
            if trial.should_prune():
                raise RunPruned(epoch)

        overrides = {**settings.overrides, **space.suggest(trial)}
        try:
            run_id = train_model(settings.model, train_path=settings.train_path, validation_path=settings.validation_path,
                                 overrides=overrides, parent_run_id=parent_run_id, run_name=f"{settings.model}-trial-{trial.number}",
                                 tags={STUDY_TAG: trial.study.study_name, TRIAL_TAG: str(trial.number)}, on_epoch=report)  # fmt: skip
        except RunPruned as e:
            raise optuna.TrialPruned(str(e)) from e
        trial.set_user_attr(RUN_ATTR, run_id)
        return _trial_value(run_id, settings.metric)

    return objective


def make_generation_objective(settings: TuneSettings, space: SearchSpace, parent_run_id: str):
    """Trials that re-generate the source run's validation rows with its logged model (loaded once, as served) and
    the trial's generation settings: no training. Each trial is a child run of kind `generate` with the settings,
    the `val_*` scores on the source's validation rows (same digest) and the predictions table."""
    import mlflow
    import optuna

    from dialogsum.generate import summarize
    from dialogsum.metrics import role_scores
    from dialogsum.serving import saved_model
    from dialogsum.serving.pyfunc import logged_model_dir, run_model_uri
    from dialogsum.tracking import MODEL_TAG, VAL_ROWS_TAG, load_predictions, log_predictions, tracked_run

    from dialogsum.config import model_registry

    source = mlflow.get_run(settings.from_run)
    model, tokenizer, cfg = saved_model.load(logged_model_dir(run_model_uri(settings.from_run)))
    if cfg.name != model_registry().resolve(settings.model):
        raise TuneError(f"--from-run {settings.from_run} trained '{cfg.name}', not '{settings.model}'")
    rows = load_predictions(settings.from_run)[["fname", "dialogue", "reference"]]
    digest = source.data.tags.get(VAL_ROWS_TAG, "")

    def objective(trial: optuna.Trial) -> float:
        overrides = space.suggest(trial)
        generation = {k.removeprefix("generation."): v for k, v in overrides.items() if k.startswith("generation.")}
        tags = {STUDY_TAG: trial.study.study_name, TRIAL_TAG: str(trial.number), MODEL_TAG: cfg.name,
                "dialogsum.source_run": settings.from_run, VAL_ROWS_TAG: digest}  # fmt: skip
        with tracked_run(run_name=f"{cfg.name}-trial-{trial.number}", kind="generate", tags=tags, parent_run_id=parent_run_id) as run:
            trial.set_user_attr(RUN_ATTR, run.run_id)
            mlflow.log_params({**overrides, "source_run": settings.from_run})
            predictions = summarize(model, tokenizer, cfg, list(rows["dialogue"]), cfg.training.eval_batch_size, generation)
            metrics, scored = role_scores("val", predictions, list(rows["reference"]))
            mlflow.log_metrics(metrics)
            log_predictions([{**r, "prediction": p, **s} for r, p, s in zip(rows.to_dict("records"), predictions, scored)])
        if settings.metric not in metrics:
            raise TuneError(f"--metric {settings.metric}: a generation trial logs {', '.join(sorted(metrics))}")
        return metrics[settings.metric]

    return objective


def run_study(settings: TuneSettings) -> str:
    """Run (or join, or continue) the study; returns the parent run id. This worker works inside the parent run
    (RUNNING while it works, then FINISHED, or FAILED/KILLED with the reason) and stops when the study holds
    `settings.trials` finished trials (complete or pruned)."""
    import optuna

    from dialogsum.tracking import configure_tracking, tracked_run

    cfg = load_model_config(settings.model, settings.overrides or None)
    space = load_space(settings.space, cfg)
    if space.generation_only != bool(settings.from_run):
        raise TuneError(f"{settings.space}: every key is a generation setting; give --from-run RUN_ID to re-generate with "
                        "that run's model instead of training" if space.generation_only else
                        f"{settings.space}: --from-run re-generates without training, but the space has training keys "
                        f"({', '.join(k for k in space.params if not k.startswith('generation.'))})")  # fmt: skip
    configure_tracking()
    name = settings.study or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = storage_for(settings, name)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction=settings.direction,
                                sampler=sampler_for(settings.sampler, settings.seed), pruner=pruner_for(settings.pruner))  # fmt: skip
    parent = study_parent(study, storage, settings)
    with tracked_run(kind="tune", run_id=parent):
        objective = (make_generation_objective if settings.from_run else make_objective)(settings, space, parent)
        while True:  # failed trials do not count: run until the cap of finished ones, or as many failures
            trials = counted_trials(study)
            remaining = settings.trials - sum(t.state in finished_states() for t in trials)
            if remaining <= 0 or sum(t.state == optuna.trial.TrialState.FAIL for t in trials) >= settings.trials:
                break
            study.optimize(objective, n_trials=remaining, catch=(Exception,), gc_after_trial=True,
                           callbacks=[optuna.study.MaxTrialsCallback(settings.trials, states=finished_states())])  # fmt: skip
        log_study_summary(study, settings, space)
        from dialogsum.sweeps.report import write_study_report

        write_study_report(parent)
    return parent


def finished_states() -> tuple:
    """The trial states that count toward `--trials`: complete and pruned (a failed trial does not)."""
    import optuna

    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def counted_trials(study, states=None) -> list:
    """The study's trials (in `states`, default all) without the ones a worker started over the cap (they never
    trained)."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(OVER_CAP_ATTR)]


def log_study_summary(study, settings: TuneSettings, space: SearchSpace) -> None:
    """On the parent run: the trials table, the counts, the best trial's overrides (`best_overrides.yaml` and a
    ready `--set` line: every override the best trial trained with, the command line's, the space's fixed ones and
    its sampled values), and Optuna's optimization-history and parameter-importance plots."""
    import mlflow
    import optuna
    import pandas as pd
    import yaml

    from dialogsum.tracking import STATUS_TAG

    trials = counted_trials(study)
    state = optuna.trial.TrialState
    rows = [{"trial": t.number, "state": t.state.name, settings.metric: t.value, "run_id": t.user_attrs.get(RUN_ATTR, ""),
             "last_epoch": max(t.intermediate_values, default=None), **t.params} for t in trials]  # fmt: skip
    mlflow.log_table(pd.DataFrame(rows), artifact_file=TRIALS_TABLE)
    counts = {name: sum(t.state == s for t in trials) for name, s in (("complete", state.COMPLETE), ("pruned", state.PRUNED), ("failed", state.FAIL))}
    mlflow.log_metrics({f"trials_{k}": v for k, v in counts.items()})
    complete = [t for t in trials if t.state == state.COMPLETE]
    mlflow.set_tag(STATUS_TAG, "succeeded" if complete else "failed")
    if not complete:
        return
    best = study.best_trial
    mlflow.log_metrics({f"best_{settings.metric}": best.value, "best_trial": best.number})
    mlflow.set_tags({METRIC_TAG: settings.metric, BEST_RUN_TAG: best.user_attrs.get(RUN_ATTR, "")})
    overrides = {**settings.overrides, **space.fixed, **best.params}
    mlflow.log_text(yaml.safe_dump(overrides, allow_unicode=True, sort_keys=True), BEST_OVERRIDES_ARTIFACT)
    mlflow.log_text(" ".join(f"--set {k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in sorted(overrides.items())),
                    BEST_SET_LINE_ARTIFACT)  # fmt: skip
    _log_plots(study)


def _log_plots(study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from optuna.visualization import matplotlib as optuna_plots

    with tempfile.TemporaryDirectory() as tmp:
        for artifact, draw in ((HISTORY_PLOT, optuna_plots.plot_optimization_history), (IMPORTANCE_PLOT, optuna_plots.plot_param_importances)):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError):  # importances need two complete trials with varied parameters
                continue
            path = Path(tmp) / Path(artifact).name
            axes.figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(axes.figure)
            mlflow.log_artifact(str(path), str(Path(artifact).parent))
