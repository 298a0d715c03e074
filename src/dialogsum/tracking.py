"""MLflow conventions shared by every command: store location, run lifecycle, failure capture, tables.

Every dialogsum run carries `dialogsum.status` (running/succeeded/failed/killed/skipped) and `dialogsum.stage`
tags, so `mlflow.search_runs(filter_string="tags.`dialogsum.status` = 'failed'")` finds failures. An exception
inside `tracked_run` ends the run FAILED with `errors/traceback.txt`, `errors/error.json` and `error.*` tags;
Ctrl-C or SIGTERM ends it KILLED. No run is left RUNNING.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random

from dialogsum.config import flatten

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "dialogsum"
PREDICTIONS_ARTIFACT = "predictions.json"
STATUS_TAG = "dialogsum.status"
STAGE_TAG = "dialogsum.stage"
KIND_TAG = "dialogsum.kind"
MODEL_TAG = "dialogsum.model"
REASON_TAG = "dialogsum.reason"
VAL_ROWS_TAG = "dialogsum.val_rows_digest"  # digest of the exact (fname, reference) pairs a val_* score is over
TEST_ROWS_TAG = "dialogsum.test_rows_digest"
TEST_PREDICTIONS_ARTIFACT = "test_predictions.json"
PARAM_VALUE_LIMIT = 6000
# MLflow 3's UI opens an experiment by its kind: without this tag it guesses, and a dialogsum experiment opened on
# the GenAI overview (traces, tokens) instead of the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "workflowType=machine_learning"  # the UI's model-training mode
SYSTEM_METRICS_ENV = "DIALOGSUM_SYSTEM_METRICS"
# A pipeline's id in the environment of every process it starts (stages, a Ray started for it and Ray's workers),
# set by `dialogsum pipeline` on itself first: how the processes it leaves behind are found.
PIPELINE_ENV = "DIALOGSUM_PIPELINE"
SOURCE_NAME_TAG = "mlflow.source.name"
NOTE_TAG = "mlflow.note.content"
INHERITED_TAGS = ("mlflow.user", "mlflow.source.type", "mlflow.source.git.commit", "mlflow.source.git.branch",
                  "mlflow.source.git.repoURL")  # fmt: skip
SERVER_PROBE_TIMEOUT_S = (3, 5)  # (connect, read) seconds
CLOSE_BUDGET_ENV = "DIALOGSUM_CLOSE_BUDGET_S"
DEFAULT_CLOSE_BUDGET_S = 120.0  # how long a finishing run waits for an unreachable store to come back
MLFLOW_STATUS = {"succeeded": "FINISHED", "skipped": "FINISHED", "killed": "KILLED", "failed": "FAILED", "pruned": "KILLED"}
PRUNED_AT_TAG = "dialogsum.pruned_at_epoch"
STARTED_AT_TAG = "dialogsum.started_at"  # epoch ms when a stage queued on a Ray cluster got its resources and started
GPUS_TAG = "dialogsum.gpus"  # the GPUs (nvidia-smi indices, "2,3") the local executor pinned a stage to while it ran
# Preflight's truncation report, logged on a pipeline's parent run per model and limit (`dialogsum.truncation`:
# limit "source" = training.max_source_length, "target" = training.max_target_length, "new_tokens" =
# generation.max_new_tokens), over the pipeline's train and validation rows.
TRUNCATION_WARN_SHARE_PARAM = "truncation.warn_share"  # the share above which preflight warns
TRUNCATION_ROWS_PARAM = "truncation.{model}.rows"  # rows measured
TRUNCATION_LIMIT_PARAM = "truncation.{model}.{limit}.limit"  # the configured length
TRUNCATION_FIT_PARAM = "truncation.{model}.{limit}.fits_99pct"  # the smallest length that cuts at most 1% of the rows
TRUNCATION_SHARE_METRIC = "truncation.{model}.{limit}.cut_share"  # share of the rows longer than the configured length


class RunPruned(Exception):
    """A sweep's pruner stopped this training after `epoch`: the run ends KILLED with `dialogsum.status=pruned`."""

    def __init__(self, epoch: int):
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, refused credentials); `run_id` names the run it
    left open, if any."""

    def __init__(self, message: str, run_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated(f"received signal {signum}")


def configure_tracking(experiment: str | None = None) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI (default: ./mlflow.db), fail fast on an unreachable server.

    MLflow retries HTTP calls for minutes by default; the retry budget is bounded here (unless the user set
    their own) and an http(s) server must answer `GET /health` within seconds before any MLflow call, so a
    refused port and a server that accepts connections but never answers both fail in under 10 s.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _probe_server(uri)
    elif scheme == "sqlite":
        _initialize_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    if experiment or not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        try:
            found = mlflow.set_experiment(name)
            # When another process creates the experiment at the same moment, MLflow returns it without making it
            # active, and this process's runs would land in "Default"; activating it by id is always safe.
            mlflow.set_experiment(experiment_id=found.experiment_id)
            if EXPERIMENT_KIND_TAG not in found.tags:
                _tag_experiment_kind(found.experiment_id)
        except Exception as e:
            if "401" in str(e) or "403" in str(e) or "Unauthorized" in str(e):
                raise TrackingError(f"MLflow tracking server {uri} refused the credentials: {e}") from e
            raise
    return uri


def active_experiment_id() -> str:
    """The experiment `configure_tracking` made active (or the one `mlflow run` named)."""
    import mlflow

    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    return mlflow.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT).experiment_id


def _tag_experiment_kind(experiment_id: str) -> None:
    """Open the experiment on the runs table in the MLflow UI; a concurrent process setting the same tag is fine.

    A tracking server on PostgreSQL inserts experiment tags, so two stages tagging a new experiment at the same
    moment make one of them fail on the primary key; the tag is then there, which is all that was asked.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except MlflowException:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            raise


def _probe_server(uri: str) -> None:
    """Any HTTP answer from `<uri>/health` (an open route, also under basic-auth) proves the server is up."""
    import requests
    from mlflow.environment_variables import MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH

    verify = not MLFLOW_TRACKING_INSECURE_TLS.get() and (MLFLOW_TRACKING_SERVER_CERT_PATH.get() or True)
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=SERVER_PROBE_TIMEOUT_S, verify=verify)
    except requests.RequestException as e:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(e).__name__}: {e}); start it or fix MLFLOW_TRACKING_URI"
        ) from e


def _initialize_sqlite_store(uri: str) -> None:
    """Create or migrate a SQLite store's tables under an inter-process lock.

    MLflow creates a new store's tables on first use without a lock, so two commands starting together on a fresh
    mlflow.db collide ("table ... already exists"); here the second one waits for the first.
    """
    from filelock import FileLock
    from mlflow import MlflowClient
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:":
        return
    key = hashlib.sha256(str(Path(database).resolve()).encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"dialogsum-sqlite-init-{key}.lock"):
        MlflowClient(uri).search_experiments(max_results=1)


@dataclass
class RunContext:
    """The run a command logs into, with its current stage (recorded as the failing stage on error)."""

    run_id: str
    stage: str = "setup"
    timings: dict[str, float] = field(default_factory=dict)

    def set_stage(self, stage: str) -> None:
        import mlflow

        self.stage = stage
        mlflow.set_tag(STAGE_TAG, stage)

    @contextmanager
    def stage_of(self, stage: str) -> Iterator[None]:
        self.set_stage(stage)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


@contextmanager
def tracked_run(
    run_name: str | None = None,
    kind: str = "run",
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[RunContext]:
    """Start (or resume, with `run_id` or $MLFLOW_RUN_ID) a run and guarantee a final status.

    Succeeded → FINISHED; exception → FAILED with error artifacts; Ctrl-C/SIGTERM → KILLED; `RunPruned` → KILLED
    with `dialogsum.status=pruned`. `system_metrics` turns
    on MLflow's system metrics (CPU, memory, disk, network, and GPU when present) unless $DIALOGSUM_SYSTEM_METRICS
    is false (`dialogsum --no-system-metrics ...`).
    """
    import mlflow

    all_tags = {KIND_TAG: kind, STATUS_TAG: "running", **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if not (run_id or os.environ.get("MLFLOW_RUN_ID")):  # a run opened by `mlflow run` or a pipeline keeps its source
        all_tags = {**source_git_tags(), **all_tags, SOURCE_NAME_TAG: f"dialogsum {kind}"}
    previous_handler = None
    try:
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not in the main thread
        pass
    nested = mlflow.active_run() is not None
    monitor = system_metrics and system_metrics_enabled()
    if monitor:
        _configure_system_metrics()
    run = mlflow.start_run(run_id=run_id, run_name=run_name if not run_id else None, tags=all_tags, nested=nested,
                           log_system_metrics=monitor)  # fmt: skip
    ctx = RunContext(run.info.run_id)
    try:
        if run_id or os.environ.get("MLFLOW_RUN_ID"):
            mlflow.set_tags(all_tags)
        yield ctx
    except (KeyboardInterrupt, Terminated) as e:
        _close(ctx, "killed", e)
        raise
    except RunPruned as e:
        mlflow.set_tag(PRUNED_AT_TAG, str(e.epoch))
        _close(ctx, "pruned")
        raise
    except BaseException as e:
        _close(ctx, "failed", e)
        raise
    else:
        _close(ctx, "succeeded")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def close_budget_s() -> float:
    return float(os.environ.get(CLOSE_BUDGET_ENV, DEFAULT_CLOSE_BUDGET_S))


def _close(ctx: RunContext, status: str, error: BaseException | None = None) -> None:
    """Record the outcome and end the run. The store may be what failed (a tracking server restarting): the
    closing calls are retried for `close_budget_s()` seconds, then a TrackingError names the run left RUNNING."""
    import mlflow
    from tenacity import Retrying, stop_after_delay, wait_fixed

    if error is not None:
        _log_error_artifacts(error, ctx.stage)
    tags = {STATUS_TAG: status, STAGE_TAG: "finished"} if error is None else _error_tags(error, ctx.stage, status)
    try:
        for attempt in Retrying(stop=stop_after_delay(close_budget_s()), wait=wait_fixed(2), reraise=True):
            with attempt:
                mlflow.set_tags(tags)
                _log_timings(ctx)
                mlflow.end_run(MLFLOW_STATUS[status])
    except Exception as e:
        raise TrackingError(f"run {ctx.run_id} could not be ended {status}: the tracking store did not answer for "
                            f"{close_budget_s():.0f} s ({type(e).__name__}: {e}); it stays RUNNING there", ctx.run_id) from (error or e)  # fmt: skip


@lru_cache(maxsize=1)
def source_git_tags() -> dict[str, str]:
    """The commit and branch of the dialogsum checkout that runs, when it runs from one. MLflow records them only
    for a script inside the repository; `dialogsum ...` is a console script outside it, so runs (and the registry
    versions made from them) said "unknown"."""
    import subprocess

    folder = str(Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=5, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:  # the package's own files must be tracked there (a venv inside some other repository is not a checkout)
        commit = git("rev-parse", "HEAD") if git("ls-files", "--error-unmatch", "__init__.py") else ""
        branch = git("rev-parse", "--abbrev-ref", "HEAD") if commit else ""
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        return {}
    if not commit:  # an installed wheel: not a checkout
        return {}
    return {"mlflow.source.git.commit": commit, **({"mlflow.source.git.branch": branch} if branch and branch != "HEAD" else {})}


def system_metrics_enabled() -> bool:
    return os.environ.get(SYSTEM_METRICS_ENV, "true").strip().lower() not in ("0", "false", "no", "off")


def _configure_system_metrics() -> None:
    """Sample every 5 s and log each sample (MLflow: every 10 s, in batches), so minute-long runs get curves too;
    MLflow's own environment variables win when set."""
    import mlflow

    if "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL" not in os.environ:
        mlflow.set_system_metrics_sampling_interval(5)
    if "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING" not in os.environ:
        mlflow.set_system_metrics_samples_before_logging(1)


def stage_time_metric(stage: str) -> str:
    """`time/<stage>_s`: the UI groups the `time/` metrics into a section of their own, apart from the scores."""
    return f"time/{stage}_s"


def _log_timings(ctx: RunContext) -> None:
    """Seconds spent in each stage, as `time/<stage>_s` metrics (the report's timeline)."""
    import mlflow

    if ctx.timings:
        mlflow.log_metrics({stage_time_metric(stage): seconds for stage, seconds in ctx.timings.items()})


def _log_error_artifacts(error: BaseException, stage: str) -> None:
    """`errors/traceback.txt` and `errors/error.json`; best effort, since the artifact store may be what failed
    (a full disk): the error tags still say what happened."""
    import mlflow

    try:
        mlflow.log_text("".join(traceback.format_exception(error)), "errors/traceback.txt")
        mlflow.log_dict(error_info(error, stage), "errors/error.json")
    except Exception:
        pass


def _error_tags(error: BaseException, stage: str, status: str) -> dict[str, str]:
    info = error_info(error, stage)
    return {STATUS_TAG: status, "error.type": info["type"], "error.stage": stage,
            "error.message": info["message"][:PARAM_VALUE_LIMIT]}  # fmt: skip


def error_info(error: BaseException, stage: str) -> dict[str, Any]:
    return {
        "type": type(error).__name__,
        "message": str(error) or type(error).__name__,
        "stage": stage,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def log_config(config: dict[str, Any], artifact_file: str = "config.yaml") -> None:
    """Log a nested config as flattened params and as a YAML artifact.

    Values over MLflow's 6000-character param limit are logged cut, ending in a pointer to the artifact,
    so no key is ever dropped.
    """
    import mlflow

    params = {}
    for key, value in flatten(config).items():
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            marker = f"...[truncated; full value in {artifact_file}]"
            text = text[: PARAM_VALUE_LIMIT - len(marker)] + marker
        params[key] = text
    mlflow.log_params(params)
    mlflow.log_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), artifact_file)


def _lost_dataset_insert_race(error: BaseException) -> bool:
    """Two runs logged the same new dataset at once: MLflow's SQL store looks the dataset up, then inserts it,
    so the slower run hits the unique key (PostgreSQL: UniqueViolation on `dataset_pk`; SQLite: UNIQUE
    constraint failed). Logging again finds the dataset the other run inserted."""
    from mlflow.exceptions import MlflowException

    text = str(error)
    return isinstance(error, MlflowException) and any(s in text for s in ("UniqueViolation", "UNIQUE constraint failed"))


@retry(
    retry=retry_if_exception(_lost_dataset_insert_race), stop=stop_after_attempt(3), wait=wait_random(0.05, 0.5), reraise=True
)
def log_dataset_input(dataset, context: str) -> None:
    """`mlflow.log_input`, retried when a concurrent run inserted the same dataset first."""
    import mlflow

    mlflow.log_input(dataset, context=context)


def log_predictions(rows: list[dict[str, Any]], artifact_file: str = PREDICTIONS_ARTIFACT) -> None:
    """Log a predictions table (fname, dialogue, reference, prediction, per-row ROUGE, ...) for the UI."""
    import mlflow
    import pandas as pd

    mlflow.log_table(pd.DataFrame(rows), artifact_file=artifact_file)


def load_predictions(run_id: str, artifact_file: str = PREDICTIONS_ARTIFACT):
    """A run's predictions table as a DataFrame."""
    import mlflow
    import pandas as pd

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_file)
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    return pd.DataFrame(table["data"], columns=table["columns"])


def run_url(server: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI at `server`, in model-training mode."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{UI_QUERY}"


def ui_hint(run_id: str) -> str:
    import mlflow

    uri = mlflow.get_tracking_uri()
    run = mlflow.get_run(run_id)
    if uri.startswith(("http://", "https://")):
        return run_url(uri, run.info.experiment_id, run_id)
    return f"mlflow ui --backend-store-uri {uri}  →  {run_url('http://127.0.0.1:5000', run.info.experiment_id, run_id)}"


def run_metric(run, name: str) -> float | None:
    """A run's score for `name`: its `best_<name>` summary when it logged one (train logs per-epoch curves and
    the best epoch's value), else the latest value of `name`."""
    metrics = run.data.metrics
    return metrics.get(f"best_{name}", metrics.get(name))


def create_child_run(parent_run_id: str, name: str, kind: str, tags: dict[str, str] | None = None) -> str:
    """A RUNNING child run that a stage process will log into (through $MLFLOW_RUN_ID), with the parent's user, source
    and git commit (MLflow records those only for runs its fluent API starts)."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items() if k in INHERITED_TAGS}
    all_tags = {**inherited, SOURCE_NAME_TAG: f"dialogsum {kind}", "mlflow.parentRunId": parent_run_id, KIND_TAG: kind,
                STATUS_TAG: "pending", **(tags or {})}  # fmt: skip
    return client.create_run(parent.info.experiment_id, tags=all_tags, run_name=name).info.run_id


def close_run(
    run_id: str,
    status: str,
    stage: str,
    error_type: str | None = None,
    message: str | None = None,
    metrics: dict[str, float] | None = None,
) -> None:
    """End a run that its own process could not end: record status, stage and (for failures) the reason as the
    same error tags and `errors/error.json` artifact a failing run writes itself, in one batch."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    client = mlflow.MlflowClient()
    tags = {STATUS_TAG: status, STAGE_TAG: stage}
    if message:
        tags[REASON_TAG] = message[:PARAM_VALUE_LIMIT]
        tags[NOTE_TAG] = f"**{status}**: {message}"[:PARAM_VALUE_LIMIT]  # the run page's description
    if error_type:
        tags.update({"error.type": error_type, "error.stage": stage, "error.message": (message or "")[:PARAM_VALUE_LIMIT]})
        client.log_dict(run_id, {"type": error_type, "message": message, "stage": stage,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, "errors/error.json")  # fmt: skip
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, MLFLOW_STATUS.get(status, "FAILED"))
