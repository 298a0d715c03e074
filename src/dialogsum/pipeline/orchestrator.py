"""The `main` pipeline: one parent run, one child run per model and per later step.

0. Data roles are fixed once for the whole pipeline and logged on the parent (`data/*.csv`): train fits,
   validation chooses, test reports, predict is summarised for the submission. Without a validation file,
   `validation_fraction` of the train rows (by fname hash) become validation; every child reads the same files,
   so every score of the pipeline is on the same rows.
1. Preflight every model at once, on the device the stages will get (this machine's, or the one the Ray cluster
   reports); each blocked model becomes a FAILED child within seconds (no weights loaded). Each model's tokenizer
   measures how many train and validation rows its length limits cut (`dialogsum.truncation`): a table on stderr,
   a warning above `preflight.truncation_warn_share`, the shares logged on the parent run.
2. Each remaining model trains in its own process (a stage), logging into a child run created as it starts
   (`$MLFLOW_RUN_ID`), so a crash, OOM or leaked GPU memory cannot touch another model; a stage that outlives its
   timeout (`timeouts.train`, or the model's own `timeout`) is killed and the child records why. The steps that need
   only the data (tune, kfold, evaluate_solar) are stages of the same round.
3. Then ensemble and optimize, then register, then predict, each round when the one before has ended; a step whose
   preconditions are missing becomes a SKIPPED child (no API key, fewer than two usable sources, no successful model).
4. The parent logs the success/failure matrix, summary metrics and tags, the best model, and the report.

Where stages run is the executor's business (`dialogsum.pipeline.executors`): `local` runs a round's stages here,
one after another on a machine without GPUs, and at once where the GPUs hold them on a GPU machine (each pinned to
its own GPUs, recorded on its child as `dialogsum.gpus`); `ray` runs them as Ray tasks, at once where the cluster's
resources allow. `max_concurrency` caps the trainings running at once with either. Tracking, failure semantics and
resume are the same for both.

`--resume PARENT_RUN_ID` reruns, under the same parent, only the children that failed or never ran; a training
killed, lost or timed out mid-way continues from its last checkpoint in the same child run (`train --resume`), and
when a model newly succeeds, the steps that use the trainings run again as new children (the old ones tagged
`dialogsum.superseded_by`). SIGINT/SIGTERM stops the running stages' process groups (grace period
`timeouts.grace`) and ends their runs KILLED, records the stages not started as skipped, writes the report and
ends the parent KILLED.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from dialogsum.config import ConfigError, PipelineConfig, PipelineModel, load_pipeline_config, parse_config
from dialogsum.data import DataRoles, load_data_roles, read_dialogues, sample_data_path, write_dialogues
from dialogsum.pipeline.executors import DIALOGSUM, LOG_ARTIFACT_DIR, Interrupted, LocalExecutor, Stage, StageProcess
from dialogsum.pipeline.store import (
    SELECTION_METRIC,
    SUPERSEDED_TAG,
    best_train_run,
    find_child,
    gpus_label,
    latest_children,
    succeeded,
)
from dialogsum.preflight import GIB, Verdict, record_truncation, run_preflight
from dialogsum.tracking import (
    Terminated,
    GPUS_TAG,
    KIND_TAG,
    MODEL_TAG,
    STAGE_TAG,
    STATUS_TAG,
    VAL_ROWS_TAG,
    close_run,
    configure_tracking,
    create_child_run,
    log_config,
    run_metric,
    tracked_run,
)
from dialogsum.training.checkpoints import CHECKPOINT_EPOCH_TAG

PIPELINE_CONFIG_ARTIFACT = "pipeline.yaml"
DATA_ARTIFACT_DIR = "data"
ROLE_FILES = ("train", "validation", "test", "predict")
SUBMISSION_FILE = "submission.csv"
INTERRUPTED_REASON = "pipeline interrupted before this stage started"
RESUMABLE_ERRORS = ("ProcessDied", "StageTimeout", "Interrupted", "WorkerLost")  # stopped from outside, mid-training
LATER_STEPS = ("tune", "kfold", "evaluate_solar", "ensemble", "optimize", "register", "predict")


@dataclass
class Skipped:
    """A step whose preconditions are missing: recorded as a SKIPPED child named `name`, with the reason."""

    name: str
    reason: str


@dataclass
class RoleFiles:
    """The CSV each child reads for each data role (validation always exists; test and predict may not)."""

    train: Path
    validation: Path
    test: Path | None
    predict: Path | None


def _set_args(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value, ensure_ascii=False)}")]


def _close_stage(stage: Stage, done: StageProcess) -> str:
    """Close a stage's run as its process left it; close it for the process when it could not. Returns the status."""
    import mlflow

    run_id, kind = stage.run_id, stage.kind
    run = mlflow.MlflowClient().get_run(run_id)
    status = run.data.tags.get(STATUS_TAG, "pending")
    where = run.data.tags.get(STAGE_TAG, kind)
    if done.error is not None:
        close_run(run_id, "failed", where, *done.error)
        return "failed"
    if done.timed_out:
        message = f"{kind} exceeded its {stage.timeout_s:.0f} s timeout and was killed after {done.elapsed_s:.0f} s"
        close_run(run_id, "failed", where, "StageTimeout", message)
        return "failed"
    if run.info.status == "RUNNING" or status in ("pending", "running"):
        if done.returncode == 0:
            close_run(run_id, "succeeded", kind)
            return "succeeded"
        cause = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
        close_run(run_id, "failed", where, "ProcessDied",
                  f"{kind} process ended with {cause} before closing its run; log tail:\n{done.log_tail}")  # fmt: skip
        return "failed"
    return status


def _close_unfinished(stages: list[Stage], status: str, error_type: str, message: str, log_tails: dict[str, str]) -> None:
    """Close the runs of stages that started and never finished (the pipeline was interrupted, or its executor failed)."""
    import mlflow

    for stage in stages:
        run = mlflow.MlflowClient().get_run(stage.run_id)
        tail = log_tails.get(stage.run_id)
        detail = f"log tail:\n{tail}" if tail else f"its log is the run's {LOG_ARTIFACT_DIR}/ artifact"
        close_run(stage.run_id, status, run.data.tags.get(STAGE_TAG, stage.kind), error_type, f"{message}; {detail}")


def _record_blocked(parent_id: str, verdict: Verdict) -> str:
    run_id = create_child_run(parent_id, verdict.model, "train", {MODEL_TAG: verdict.model})
    estimate = {"preflight_memory_estimate_gib": verdict.estimate_gib} if verdict.estimate_gib is not None else {}
    close_run(run_id, "failed", "preflight", "PreflightBlocked", "; ".join(verdict.reasons), estimate)
    return run_id


def _record_skipped(parent_id: str, name: str, kind: str, reason: str) -> str:
    run_id = create_child_run(parent_id, f"{name} (skipped)", kind, {MODEL_TAG: name})
    close_run(run_id, "skipped", kind, message=reason)
    return run_id


# --- data roles ---------------------------------------------------------------------------------------------


def materialize_roles(cfg: PipelineConfig, parent_id: str, folder: Path) -> RoleFiles:
    """Resolve the roles once (splitting validation off the train rows when no file is given), write them as CSVs
    into `folder`, log them to the parent under `data/` with their row counts and digests, and return the paths."""
    import mlflow

    from dialogsum.data import dataset_rows_digest

    d = cfg.data
    no_files = not (d.train or d.validation or d.test)
    roles: DataRoles = load_data_roles(d.train, d.validation, d.test, validation_fraction=d.validation_fraction)
    predict = read_dialogues(d.predict or sample_data_path("test"), require_summary=False) if (d.predict or no_files) else None
    sets = {**roles.sets(), **({"predict": predict} if predict is not None else {})}
    paths = {role: write_dialogues(data, folder / f"{role}.csv") for role, data in sets.items()}
    client = mlflow.MlflowClient()
    for path in paths.values():
        client.log_artifact(parent_id, str(path), DATA_ARTIFACT_DIR)
    params = {f"data.{role}.{key}": value for role, data in sets.items()
              for key, value in (("source", data.report.path), ("rows", len(data)), ("file_digest", data.report.digest),
                                 ("selection", data.report.selection or "all rows"))}  # fmt: skip
    params["data.validation_from"] = f"{d.validation_fraction} of the train rows" if not d.validation else "its own file"
    mlflow.log_params(params)
    mlflow.set_tags({VAL_ROWS_TAG: dataset_rows_digest(roles.validation)})
    return RoleFiles(paths["train"], paths["validation"], paths.get("test"), paths.get("predict"))


def downloaded_roles(parent_id: str, folder: Path) -> RoleFiles:
    """The role files a pipeline logged when it started (for `--resume`)."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path=DATA_ARTIFACT_DIR, dst_path=str(folder)))
    found = {role: local / f"{role}.csv" for role in ROLE_FILES if (local / f"{role}.csv").is_file()}
    return RoleFiles(found["train"], found["validation"], found.get("test"), found.get("predict"))


# --- the pipeline -------------------------------------------------------------------------------------------


INDEPENDENT_STEPS = ("tune", "kfold", "evaluate_solar")  # need only the data: they run beside the trainings
DEPENDENT_STEPS = (("ensemble", "optimize"), ("register",), ("predict",))  # each group waits for the ones before


class Pipeline:
    def __init__(self, cfg: PipelineConfig, parent_id: str, files: RoleFiles, executor, folder: Path):
        self.cfg = cfg
        self.parent_id = parent_id
        self.files = files
        self.folder = folder  # the role files are in folder/data; the submission is written here
        self.executor = executor
        self.unstarted: list[tuple[str, str]] = []  # (kind, name) of the stages not started yet
        self.superseded: dict[str, str] = {}  # stage name -> the run of the step it reruns
        self.in_flight: list[Stage] = []  # started, not finished
        self.changed = False  # a model succeeded in this invocation: the steps that use trainings run again
        self.console = None

    def run(self, resume: bool) -> None:
        """The trainings and the steps that need only the data (tune, kfold, evaluate_solar) first, at once where
        the executor allows; then ensemble and optimize, register, predict, each group when the one before has
        ended. With `resume`, only what did not succeed runs again (a training stopped mid-way continues from its
        checkpoint), and when a model newly succeeds, every step that uses the trainings runs again as a new child
        that supersedes the old one. On SIGINT/SIGTERM the running stages are stopped (their runs end KILLED) and
        the stages not started yet are recorded as skipped."""
        from rich.console import Console

        self.console = Console(stderr=True)
        children = latest_children(self.parent_id) if resume else []
        todo = [m for m in self.cfg.models if not succeeded(find_child(children, "train", self._canonical(m)))]
        train = "train" in self.cfg.steps
        self.unstarted = [("train", self._canonical(m)) for m in todo] if train else []
        self.unstarted += [(_STEP_KIND[s], s) for s in LATER_STEPS if s in self.cfg.steps]
        try:
            stages = self._training_stages(todo, children) if train else []
            self._run_stages(stages + self._step_stages(INDEPENDENT_STEPS, children))
            for group in DEPENDENT_STEPS:
                self._run_stages(self._step_stages(group, latest_children(self.parent_id)))
        except (KeyboardInterrupt, Terminated):
            for kind, name in self.unstarted:
                _record_skipped(self.parent_id, name, kind, INTERRUPTED_REASON)
            self.console.print(f"[red]interrupted[/red]: {len(self.unstarted)} stage(s) not started, recorded as skipped")
            raise

    def _run_stages(self, stages: list[Stage]) -> None:
        """Run `stages` through the executor; whatever stops it, no stage that started is left with a RUNNING run."""
        try:
            self.executor.run_all(stages, self._started, self._finished, self.cfg.max_concurrency)
        except Interrupted as e:
            _close_unfinished(self.in_flight, "killed", "Interrupted", str(e), e.log_tails)
            raise
        except (KeyboardInterrupt, Terminated) as e:  # between two stages
            _close_unfinished(self.in_flight, "killed", "Interrupted", f"pipeline interrupted ({type(e).__name__})", {})
            raise
        except Exception as e:
            _close_unfinished(self.in_flight, "failed", "ExecutorError", f"the {self.cfg.executor} executor failed: "
                              f"{type(e).__name__}: {e}", {})  # fmt: skip
            raise

    def _started(self, stage: Stage) -> None:
        """A stage starts: its child run is created now (a resumed training has its own), the GPUs it was pinned to
        are tagged on it, the run it reruns is marked superseded."""
        import mlflow

        self.unstarted.remove((stage.kind, stage.name if stage.kind == "train" else _STEP_OF_KIND[stage.kind]))
        if stage.run_id is None:
            stage.run_id = create_child_run(self.parent_id, stage.name, stage.kind, {MODEL_TAG: stage.name})
        self.in_flight.append(stage)
        on_gpus = ""
        if stage.gpus is not None:
            held = ",".join(map(str, stage.gpus))
            mlflow.MlflowClient().set_tag(stage.run_id, GPUS_TAG, held)
            on_gpus = f" on {gpus_label(held)}"
        previous = self.superseded.get(stage.name)
        if previous:
            mlflow.MlflowClient().set_tag(previous, SUPERSEDED_TAG, stage.run_id)
        resumed = stage.resumed_from_epoch is not None
        target = f"resuming run {stage.run_id} from epoch {stage.resumed_from_epoch}" if resumed else f"run {stage.run_id}"
        self.console.print(f"[bold]{stage.kind}[/bold] {stage.name} → {target}{on_gpus}")

    def _finished(self, stage: Stage, done: StageProcess) -> None:
        self.in_flight.remove(stage)
        status = _close_stage(stage, done)
        self.changed |= stage.kind == "train" and status == "succeeded"
        self.console.print(f"  {stage.name}: {status}")

    @staticmethod
    def _canonical(model: PipelineModel) -> str:
        from dialogsum.config import model_registry

        try:
            return model_registry().resolve(model.name)
        except ConfigError:
            return model.name

    def _data_args(self) -> list[str]:
        args = ["--train-data", str(self.files.train), "--validation-data", str(self.files.validation)]
        return args + (["--test-data", str(self.files.test)] if self.files.test else [])

    def _training_stages(self, models: list[PipelineModel], children: list) -> list[Stage]:
        """Preflight every model on the executor's device (a blocked one becomes a FAILED child now), and a stage
        for each of the others: a new training, or the resumption of one stopped mid-way."""
        data_paths = [p for p in (self.files.train, self.files.validation, self.files.test) if p]
        measure_on = [read_dialogues(path, require_summary=True) for path in (self.files.train, self.files.validation)]
        warn_share = self.cfg.preflight.truncation_warn_share
        verdicts = run_preflight([m.name for m in models], data_paths, {m.name: m.overrides for m in models},
                                 device=self.executor.device(), measure_on=measure_on, warn_share=warn_share)  # fmt: skip
        record_truncation(self.parent_id, verdicts, warn_share)
        stages = []
        for model, verdict in zip(models, verdicts):
            if not verdict.ok:
                self.unstarted.remove(("train", self._canonical(model)))
                _record_blocked(self.parent_id, verdict)
                self.console.print(f"[red]blocked[/red] {verdict.model}: {'; '.join(verdict.reasons)}")
                continue
            cfg = verdict.config
            assert cfg is not None
            estimate = verdict.estimate_gib * GIB if verdict.estimate_gib is not None else None
            resources = self.executor.resources("train", cfg.resources.gpus, cfg.resources.cpus, estimate)
            previous = find_child(children, "train", cfg.name)
            if resumable(previous):
                run_id, epoch = previous.info.run_id, int(previous.data.tags[CHECKPOINT_EPOCH_TAG])
                command = ["train", "--resume", run_id, *self._data_args()]
            else:
                run_id, epoch = None, None
                command = ["train", "--model", cfg.name, *self._data_args(), *_set_args(model.overrides)]
            timeout = model.timeout or self.cfg.timeouts.train
            stages.append(Stage("train", cfg.name, [*DIALOGSUM, *command], timeout, resources, "train", run_id, epoch))
        return stages

    def _step_stages(self, steps: tuple[str, ...], children: list) -> list[Stage]:
        """A stage for each configured step of `steps` that must run: it never succeeded, or it uses the trainings
        and a model newly succeeded. A step whose preconditions are missing (its builder returns `Skipped`) is
        recorded SKIPPED instead."""
        import mlflow
        from rich.markup import escape

        stages = []
        for step in (s for s in steps if s in self.cfg.steps):
            kind = _STEP_KIND[step]
            previous = find_child(children, kind)
            rerun = self.changed and step not in INDEPENDENT_STEPS
            if succeeded(previous) and not rerun:
                self.unstarted.remove((kind, step))
                continue
            made = getattr(self, f"_step_{step}")(children)
            if isinstance(made, Stage):
                if previous is not None and rerun:
                    self.superseded[made.name] = previous.info.run_id
                stages.append(made)
                continue
            self.unstarted.remove((kind, step))
            skipped_id = _record_skipped(self.parent_id, made.name, kind, made.reason)
            self.console.print(f"[yellow]{step}[/yellow]: skipped, {escape(made.reason)}", highlight=False, soft_wrap=True)
            if previous is not None and rerun:
                mlflow.MlflowClient().set_tag(previous.info.run_id, SUPERSEDED_TAG, skipped_id)
        return stages

    def _step_tune(self, children: list) -> Stage:  # noqa: ARG002 - every step takes the children
        t = self.cfg.tune
        assert t is not None
        command = ["tune", "--model", t.model, "--space", t.space, "--trials", str(t.trials), "--sampler", t.sampler,
                   "--pruner", t.pruner, "--metric", t.metric, "--study", f"pipeline-{self.parent_id}",
                   "--train-data", str(self.files.train), "--validation-data", str(self.files.validation)]  # fmt: skip
        return self._stage(f"tune:{t.model}", "tune", command, self.cfg.timeouts.tune)

    def _step_kfold(self, children: list) -> Stage:  # noqa: ARG002 - every step takes the children
        k = self.cfg.kfold
        assert k is not None
        command = ["kfold", "--model", k.model, "--folds", str(k.folds), "--group-by", k.group_by, "--train-data", str(self.files.train),
                   *_set_args(k.overrides)]  # fmt: skip
        if self.files.test:
            command += ["--test-data", str(self.files.test)]
        return self._stage(f"kfold:{k.model}", "kfold", command, self.cfg.timeouts.kfold)

    def _step_evaluate_solar(self, children: list) -> Stage | Skipped:  # noqa: ARG002 - every step takes the children
        from dialogsum.solar.evaluation import MissingApiKey, api_key_from_env

        try:
            api_key_from_env()
        except MissingApiKey as e:
            return Skipped("solar-api", str(e))
        s = self.cfg.solar
        command = ["evaluate-solar", "--data", str(self.files.validation), "--train-data", str(self.files.train)]
        if self.files.test:
            command += ["--test-data", str(self.files.test)]
        for flag, value in (("--model", s.model), ("--prompt", s.prompt), ("--n-samples", s.n_samples),
                            ("--concurrency", s.concurrency), ("--rpm", s.rpm)):  # fmt: skip
            if value is not None:
                command += [flag, str(value)]
        return self._stage("solar-api", "solar", command, self.cfg.timeouts.evaluate_solar)

    def _step_ensemble(self, children: list) -> Stage | Skipped:
        sources = [r for r in children if r.data.tags.get(KIND_TAG) in ("train", "solar") and succeeded(r)]
        if len(sources) < 2:
            names = ", ".join(r.data.tags.get(MODEL_TAG, "?") for r in sources) or "none"
            return Skipped("ensemble", f"fewer than two usable sources (succeeded: {names}); an ensemble needs at least two")
        command = ["ensemble", "--runs", ",".join(r.info.run_id for r in sources), "--strategy", self.cfg.ensemble.strategy]
        return self._stage("ensemble", "ensemble", command, self.cfg.timeouts.ensemble)

    def _step_optimize(self, children: list) -> Stage | Skipped:
        best = best_train_run(children)
        if best is None:
            return Skipped("optimize", "no successfully trained model to optimise")
        o = self.cfg.optimize
        command = ["optimize", "--run", best.info.run_id, "--quantization", o.quantization,
                   "--batch-sizes", ",".join(map(str, o.batch_sizes)), "--data", str(self.files.validation)]  # fmt: skip
        if self.files.test:
            command += ["--test-data", str(self.files.test)]
        if o.n_samples:
            command += ["--n-samples", str(o.n_samples)]
        return self._stage(f"optimize:{best.data.tags.get(MODEL_TAG)}", "optimize", command, self.cfg.timeouts.optimize)

    def _step_register(self, children: list) -> Stage | Skipped:
        if best_train_run(children) is None:
            return Skipped("register", "no successfully trained model to register")
        r = self.cfg.register_
        command = ["register", "--parent", self.parent_id, "--metric", r.metric, "--name", r.name]
        return self._stage("register", "register", command, self.cfg.timeouts.register_)

    def _step_predict(self, children: list) -> Stage | Skipped:
        if self.files.predict is None:
            return Skipped("predict", "no data.predict file to write a submission for")
        source, why = predict_source(children, self.cfg.register_.name)
        if source is None:
            return Skipped("predict", why)
        out = self.folder / SUBMISSION_FILE
        command = ["predict", *source, "--data", str(self.files.predict), "--out", str(out), "--source-reason", why]
        return self._stage("predict", "predict", command, self.cfg.timeouts.predict)

    def _stage(self, name: str, kind: str, command: list[str], timeout_s: float) -> Stage:
        return Stage(kind, name, [*DIALOGSUM, *command], timeout_s, self.executor.resources(kind, cpus=self.cfg.ray.stage_cpus))


def resumable(run) -> bool:
    """A training child stopped from outside mid-training (killed, timed out, interrupted) after a checkpoint."""
    return (run is not None and run.data.tags.get(STATUS_TAG) in ("failed", "killed")
            and run.data.tags.get("error.type") in RESUMABLE_ERRORS and CHECKPOINT_EPOCH_TAG in run.data.tags)  # fmt: skip


_STEP_KIND = {"tune": "tune", "kfold": "kfold", "evaluate_solar": "solar", "ensemble": "ensemble", "optimize": "optimize",
              "register": "register", "predict": "predict"}  # fmt: skip
_STEP_OF_KIND = {kind: step for step, kind in _STEP_KIND.items()}


def predict_source(children: list, registered_name: str) -> tuple[list[str] | None, str]:
    """What writes the submission: the ensemble when it beats the champion on validation (the same rows), else the
    champion; without a champion, the best training child. Returns (predict arguments, why) or (None, why not)."""
    import mlflow

    from dialogsum.registry import CHAMPION_ALIAS
    from dialogsum.serving.pyfunc import run_model_uri

    champion = None
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(registered_name, CHAMPION_ALIAS)
        champion = (version, mlflow.get_run(version.run_id))
    except mlflow.exceptions.MlflowException:
        pass
    ensemble = find_child(children, "ensemble")
    ensemble = ensemble if succeeded(ensemble) and run_metric(ensemble, SELECTION_METRIC) is not None else None
    if champion is None:
        best = best_train_run(children)
        if best is None:
            return None, f"no {registered_name}@{CHAMPION_ALIAS} and no successfully trained model"
        champion_args = ["--model-uri", run_model_uri(best.info.run_id)]
        label, champion_run = f"the best training child {best.data.tags.get(MODEL_TAG)} (no {registered_name}@{CHAMPION_ALIAS})", best
    else:
        version, champion_run = champion
        champion_args = ["--model-uri", f"models:/{registered_name}/{version.version}"]
        label = f"{registered_name}@{CHAMPION_ALIAS} (version {version.version})"
    if ensemble is None:
        return champion_args, f"{label}: no succeeded ensemble to compare with"
    if ensemble.data.tags.get(VAL_ROWS_TAG) != champion_run.data.tags.get(VAL_ROWS_TAG):
        return champion_args, f"{label}: the ensemble was validated on other rows, so they are not compared"
    ens, champ = run_metric(ensemble, SELECTION_METRIC), run_metric(champion_run, SELECTION_METRIC)
    if champ is None or ens > champ:
        return ["--ensemble-run", ensemble.info.run_id], f"the ensemble (val_final {ens:.2f}) beats {label} (val_final {champ})"
    return champion_args, f"{label} (val_final {champ:.2f}) is not beaten by the ensemble (val_final {ens:.2f})"


def summarize_parent(parent_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """(tags, metrics) of the parent from the latest attempt of each child: counts, the best model and its scores."""
    latest = latest_children(parent_id)
    statuses = [r.data.tags.get(STATUS_TAG) for r in latest]
    counts = {s: statuses.count(s) for s in ("succeeded", "failed", "skipped", "killed")}
    tags = {f"dialogsum.{s}": str(n) for s, n in counts.items()}
    metrics = {f"children_{s}": float(n) for s, n in counts.items()}
    best = best_train_run(latest)
    if best is not None:
        tags.update({"dialogsum.best_model": best.data.tags.get(MODEL_TAG, ""), "dialogsum.best_run": best.info.run_id})
        for key in ("val_final", "val_final_ci95_low", "val_final_ci95_high", "test_final", "test_final_ci95_low", "test_final_ci95_high"):
            value = run_metric(best, key)
            if value is not None:
                metrics[f"best_{key}"] = value
        tags["dialogsum.best_val_final"] = f"{run_metric(best, 'val_final'):.2f}"
    return tags, metrics


def run_pipeline(config_path: str | Path | None = None, resume_run_id: str | None = None, executor: str | None = None,
                 ray_address: str | None = None, max_concurrency: int | None = None) -> str:  # fmt: skip
    """Run (or resume) a pipeline; returns the parent run id. `executor`, `ray_address` and `max_concurrency`
    override the config's.
    The parent ends FINISHED even when children fail: their failures are data, recorded in the matrix and the report."""
    import mlflow

    from dialogsum.pipeline.report import write_report

    if resume_run_id:
        configure_tracking()
        cfg = _config_of(resume_run_id)
    else:
        if config_path is None:
            raise ValueError("give a pipeline config or --resume PARENT_RUN_ID")
        cfg = load_pipeline_config(config_path)
    cfg = with_command_line(cfg, executor, ray_address, max_concurrency)
    runner = make_executor(cfg)
    try:
        _check_optimize_step(cfg, config_path or f"the config of run {resume_run_id}", runner.device().kind)
        configure_tracking(cfg.experiment)
        runner.check_tracking()
        with tempfile.TemporaryDirectory(prefix="dialogsum-pipeline-") as tmp:
            folder = Path(tmp)
            with tracked_run(run_name=cfg.name, kind="pipeline", run_id=resume_run_id) as parent:
                parent.set_stage("data")
                if resume_run_id:
                    files = downloaded_roles(parent.run_id, folder)
                else:
                    log_config(cfg.model_dump(), PIPELINE_CONFIG_ARTIFACT)
                    files = materialize_roles(cfg, parent.run_id, folder / DATA_ARTIFACT_DIR)
                runner.use_folder(parent.run_id, folder)
                parent.set_stage("children")
                try:
                    Pipeline(cfg, parent.run_id, files, runner, folder).run(resume=bool(resume_run_id))
                finally:  # an interrupted pipeline still leaves its matrix and report, then ends KILLED
                    parent.set_stage("report")
                    tags, metrics = summarize_parent(parent.run_id)
                    mlflow.set_tags(tags)
                    mlflow.log_metrics(metrics)
                    write_report(parent.run_id)
    finally:
        runner.close()
    return parent.run_id


def with_command_line(cfg: PipelineConfig, executor: str | None, ray_address: str | None,
                      max_concurrency: int | None) -> PipelineConfig:  # fmt: skip
    """The config with the command line's `--executor` / `--ray-address` / `--max-concurrency` applied (validated
    like the YAML)."""
    data = cfg.model_dump(by_alias=True)
    if executor is not None:
        data["executor"] = executor
    if ray_address is not None:
        data["ray"]["address"] = ray_address
    if max_concurrency is not None:
        data["max_concurrency"] = max_concurrency
    return parse_config(PipelineConfig, data, Path("the command line"))


def make_executor(cfg: PipelineConfig):
    """The executor the config names (a Ray cluster is reached, or started, here)."""
    if cfg.executor == "local":
        return LocalExecutor(cfg.timeouts.grace, cfg.gpus)
    from dialogsum.pipeline.ray_executor import RayExecutor

    return RayExecutor(cfg.timeouts.grace, cfg.ray.address)


def _check_optimize_step(cfg: PipelineConfig, source: str | Path, device_kind: str) -> None:
    """The optimize step's variants must run on the device the stages get: checked before anything trains."""
    if "optimize" not in cfg.steps:
        return
    from dialogsum.quantize import VariantError, resolve_variants

    try:
        resolve_variants(cfg.optimize.quantization, device_kind)
    except VariantError as e:
        raise ConfigError(f"{source}: optimize.quantization: {e}") from e


def _config_of(parent_run_id: str) -> PipelineConfig:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=parent_run_id, artifact_path=PIPELINE_CONFIG_ARTIFACT)
    return parse_config(PipelineConfig, yaml.safe_load(Path(path).read_text(encoding="utf-8")), Path(path))
