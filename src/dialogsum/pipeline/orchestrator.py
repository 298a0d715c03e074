"""The `main` pipeline: one parent run, one child run per model and per later step.

1. Preflight every model at once; each blocked model becomes a FAILED child within seconds (no weights loaded).
2. Each remaining model trains in its own subprocess, logging into a child run created here
   (`$MLFLOW_RUN_ID`), so a crash, OOM or leaked GPU memory cannot touch the next model; a stage that outlives
   its timeout is killed and the child records why.
3. Later steps (evaluate_solar, ensemble, optimize, register) run the same way, or become SKIPPED children when
   their preconditions are missing (no API key, fewer than two usable sources, no successful model).
4. The parent logs the success/failure matrix, count tags, the best model, and the generated report.

`--resume PARENT_RUN_ID` reruns, under the same parent, only the children that failed or never ran.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from dialogsum.config import ConfigError, PipelineConfig, PipelineModel, load_pipeline_config, parse_config
from dialogsum.preflight import Verdict, run_preflight
from dialogsum.pipeline.report import latest_children
from dialogsum.tracking import (
    KIND_TAG,
    MODEL_TAG,
    STAGE_TAG,
    STATUS_TAG,
    close_run,
    configure_tracking,
    create_child_run,
    log_config,
    run_metric,
    tracked_run,
)

PIPELINE_CONFIG_ARTIFACT = "pipeline.yaml"
KILL_GRACE_S = 15


@dataclass
class StageOutcome:
    run_id: str
    status: str


def _data_args(cfg: PipelineConfig) -> list[str]:
    args = []
    if cfg.data.train:
        args += ["--train-data", cfg.data.train]
    if cfg.data.eval:
        args += ["--eval-data", cfg.data.eval]
    return args


def _set_args(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value, ensure_ascii=False)}")]


def _run_stage_process(run_id: str, stage: str, command: list[str], timeout_s: float, log_dir: Path) -> StageOutcome:
    """Run `python -m dialogsum <command>` logging into `run_id`; close the run if the process could not."""
    import mlflow

    log_path = log_dir / f"{stage}-{run_id}.log"
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dialogsum", *command], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            returncode = _stop_process_group(process)
    client = mlflow.MlflowClient()
    client.log_artifact(run_id, str(log_path), "logs")
    run = client.get_run(run_id)
    status = run.data.tags.get(STATUS_TAG, "pending")
    if timed_out:
        message = f"{stage} exceeded its {timeout_s:.0f} s timeout and was killed after {time.perf_counter() - start:.0f} s"
        close_run(run_id, "failed", run.data.tags.get(STAGE_TAG, stage), "StageTimeout", message)
        return StageOutcome(run_id, "failed")
    if run.info.status == "RUNNING" or status in ("pending", "running"):
        if returncode == 0:
            close_run(run_id, "succeeded", stage)
            return StageOutcome(run_id, "succeeded")
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        cause = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        close_run(run_id, "failed", run.data.tags.get(STAGE_TAG, stage), "ProcessDied",
                  f"{stage} process ended with {cause} before closing its run; log tail:\n{tail}")  # fmt: skip
        return StageOutcome(run_id, "failed")
    return StageOutcome(run_id, status)


def _stop_process_group(process: subprocess.Popen) -> int:
    """SIGTERM (the run records KILLED), then SIGKILL after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()
    except ProcessLookupError:
        return process.wait()


def _record_blocked(parent_id: str, verdict: Verdict) -> str:
    run_id = create_child_run(parent_id, verdict.model, "train", {MODEL_TAG: verdict.model})
    estimate = {"preflight_memory_estimate_gib": verdict.estimate_gib} if verdict.estimate_gib is not None else {}
    close_run(run_id, "failed", "preflight", "PreflightBlocked", "; ".join(verdict.reasons), estimate)
    return run_id


def _record_skipped(parent_id: str, name: str, kind: str, reason: str) -> str:
    run_id = create_child_run(parent_id, f"{name} (skipped)", kind, {MODEL_TAG: name})
    close_run(run_id, "skipped", kind, message=reason)
    return run_id


def _find(children: list, kind: str, name: str | None = None):
    """The latest attempt of a step (and model) among a pipeline's children, or None."""
    for run in reversed(children):
        if run.data.tags.get(KIND_TAG) == kind and (name is None or run.data.tags.get(MODEL_TAG) == name):
            return run
    return None


def _succeeded(run) -> bool:
    return run is not None and run.data.tags.get(STATUS_TAG) == "succeeded"


class Pipeline:
    def __init__(self, cfg: PipelineConfig, parent_id: str, log_dir: Path):
        self.cfg = cfg
        self.parent_id = parent_id
        self.log_dir = log_dir

    def run(self, resume: bool) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        children = latest_children(self.parent_id) if resume else []
        todo = [m for m in self.cfg.models if not (resume and _succeeded(_find(children, "train", self._canonical(m))))]
        if "train" in self.cfg.steps:
            self._train_models(todo, console)
        children = latest_children(self.parent_id)
        for step in ("evaluate_solar", "ensemble", "optimize", "register"):
            if step in self.cfg.steps and not (resume and _succeeded(_find(children, _STEP_KIND[step]))):
                console.print(f"[bold]{step}[/bold] ...")
                getattr(self, f"_step_{step}")(children)
                children = latest_children(self.parent_id)

    @staticmethod
    def _canonical(model: PipelineModel) -> str:
        from dialogsum.config import model_registry

        try:
            return model_registry().resolve(model.name)
        except ConfigError:
            return model.name

    def _train_models(self, models: list[PipelineModel], console) -> None:
        data_paths = [p for p in (self.cfg.data.train, self.cfg.data.eval) if p]
        verdicts = run_preflight([m.name for m in models], data_paths, {m.name: m.overrides for m in models})
        for verdict in verdicts:
            if not verdict.ok:
                _record_blocked(self.parent_id, verdict)
                console.print(f"[red]blocked[/red] {verdict.model}: {'; '.join(verdict.reasons)}")
        for model, verdict in zip(models, verdicts):
            if not verdict.ok:
                continue
            name = verdict.config.name if verdict.config else model.name
            run_id = create_child_run(self.parent_id, name, "train", {MODEL_TAG: name})
            console.print(f"[bold]train[/bold] {name} → run {run_id}")
            command = ["train", "--model", name, *_data_args(self.cfg), *_set_args(model.overrides)]
            outcome = _run_stage_process(run_id, "train", command, self.cfg.timeouts.train, self.log_dir)
            console.print(f"  {name}: {outcome.status}")

    def _step_evaluate_solar(self, children: list) -> None:
        from dialogsum.solar.evaluation import MissingApiKey, api_key_from_env

        try:
            api_key_from_env()
        except MissingApiKey as e:
            _record_skipped(self.parent_id, "solar-api", "solar", str(e))
            return
        s = self.cfg.solar
        command = ["evaluate-solar", "--data", self.cfg.data.eval or str(_sample("dev"))]
        for flag, value in (("--model", s.model), ("--prompt", s.prompt), ("--n-samples", s.n_samples),
                            ("--concurrency", s.concurrency), ("--rpm", s.rpm)):  # fmt: skip
            if value is not None:
                command += [flag, str(value)]
        if self.cfg.data.train:
            command += ["--train-data", self.cfg.data.train]
        self._spawn("solar-api", "solar", command, self.cfg.timeouts.evaluate_solar)

    def _step_ensemble(self, children: list) -> None:
        sources = [r for r in children if r.data.tags.get(KIND_TAG) in ("train", "solar") and _succeeded(r)]
        if len(sources) < 2:
            names = ", ".join(r.data.tags.get(MODEL_TAG, "?") for r in sources) or "none"
            _record_skipped(self.parent_id, "ensemble", "ensemble",
                            f"fewer than two usable sources (succeeded: {names}); an ensemble needs at least two")  # fmt: skip
            return
        command = ["ensemble", "--runs", ",".join(r.info.run_id for r in sources), "--strategy", self.cfg.ensemble.strategy]
        self._spawn("ensemble", "ensemble", command, self.cfg.timeouts.ensemble)

    def _step_optimize(self, children: list) -> None:
        best = _best_train_run(children, self.cfg.register_.metric)
        if best is None:
            _record_skipped(self.parent_id, "optimize", "optimize", "no successfully trained model to optimise")
            return
        o = self.cfg.optimize
        command = ["optimize", "--run", best.info.run_id, "--quantization", o.quantization,
                   "--batch-sizes", ",".join(map(str, o.batch_sizes))]  # fmt: skip
        if self.cfg.data.eval:
            command += ["--data", self.cfg.data.eval]
        if o.n_samples:
            command += ["--n-samples", str(o.n_samples)]
        self._spawn(f"optimize:{best.data.tags.get(MODEL_TAG)}", "optimize", command, self.cfg.timeouts.optimize)

    def _step_register(self, children: list) -> None:
        if _best_train_run(children, self.cfg.register_.metric) is None:
            _record_skipped(self.parent_id, "register", "register", "no successfully trained model to register")
            return
        r = self.cfg.register_
        command = ["register", "--parent", self.parent_id, "--metric", r.metric, "--name", r.name]
        self._spawn("register", "register", command, self.cfg.timeouts.register_)

    def _spawn(self, name: str, kind: str, command: list[str], timeout_s: float) -> StageOutcome:
        run_id = create_child_run(self.parent_id, name, kind, {MODEL_TAG: name})
        return _run_stage_process(run_id, kind, command, timeout_s, self.log_dir)


_STEP_KIND = {"evaluate_solar": "solar", "ensemble": "ensemble", "optimize": "optimize", "register": "register"}


def _sample(split: str) -> Path:
    from dialogsum.data import sample_data_path

    return sample_data_path(split)


def _best_train_run(children: list, metric: str):
    scored = [(run_metric(r, metric), r) for r in children if r.data.tags.get(KIND_TAG) == "train" and _succeeded(r)]
    scored = [(v, r) for v, r in scored if v is not None]
    return max(scored, key=lambda vr: vr[0])[1] if scored else None


def _summarize_parent(parent_id: str) -> dict[str, str]:
    """Count tags and the best model, from the latest attempt of each child in the store."""
    latest = latest_children(parent_id)
    statuses = [r.data.tags.get(STATUS_TAG) for r in latest]
    tags = {f"dialogsum.{s}": str(statuses.count(s)) for s in ("succeeded", "failed", "skipped")}
    best = _best_train_run(latest, "eval_final")
    if best is not None:
        tags["dialogsum.best_model"] = best.data.tags.get(MODEL_TAG, "")
        tags["dialogsum.best_run"] = best.info.run_id
        tags["dialogsum.best_eval_final"] = f"{run_metric(best, 'eval_final'):.2f}"
    return tags


def run_pipeline(config_path: str | Path | None = None, resume_run_id: str | None = None) -> str:
    """Run (or resume) a pipeline; returns the parent run id. The parent ends FINISHED even when children fail:
    their failures are data, recorded in the matrix and the report."""
    import mlflow

    from dialogsum.pipeline.report import write_report

    if resume_run_id:
        configure_tracking()
        cfg = _config_of(resume_run_id)
    else:
        if config_path is None:
            raise ValueError("give a pipeline config or --resume PARENT_RUN_ID")
        cfg = load_pipeline_config(config_path)
    _check_optimize_step(cfg, config_path or f"the config of run {resume_run_id}")
    configure_tracking(cfg.experiment)
    with tempfile.TemporaryDirectory(prefix="dialogsum-pipeline-") as tmp:
        with tracked_run(run_name=cfg.name, kind="pipeline", run_id=resume_run_id) as parent:
            if not resume_run_id:
                log_config(cfg.model_dump(), PIPELINE_CONFIG_ARTIFACT)
            parent.set_stage("children")
            Pipeline(cfg, parent.run_id, Path(tmp)).run(resume=bool(resume_run_id))
            parent.set_stage("report")
            mlflow.set_tags(_summarize_parent(parent.run_id))
            write_report(parent.run_id)
    return parent.run_id


def _check_optimize_step(cfg: PipelineConfig, source: str | Path) -> None:
    """The optimize step's variants must run on this device: checked before anything trains, not hours later."""
    if "optimize" not in cfg.steps:
        return
    from dialogsum.precision import detect_device
    from dialogsum.quantize import VariantError, resolve_variants

    try:
        resolve_variants(cfg.optimize.quantization, detect_device().kind)
    except VariantError as e:
        raise ConfigError(f"{source}: optimize.quantization: {e}") from e


def _config_of(parent_run_id: str) -> PipelineConfig:
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=parent_run_id, artifact_path=PIPELINE_CONFIG_ARTIFACT)
    return parse_config(PipelineConfig, yaml.safe_load(Path(path).read_text(encoding="utf-8")), Path(path))
