"""The team tracking server (tests/tracking_server.py): `mlflow server` on a fresh PostgreSQL database with proxied
artifacts and basic-auth. Two tiny pipelines at once against it, and two against one SQLite file, lose nothing and
log the same runs, metrics and artifacts; credentials are enforced; an unreachable server fails any command within
seconds."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from tracking_server import TrackingServer, free_port, query, team_server  # noqa: F401 - team_server is a fixture

from dialogsum.config import ROW_LIMITS
from dialogsum.data import read_dialogues, sample_data_path, write_dialogues
from dialogsum.tracking import SERVER_PROBE_TIMEOUT_S, STATUS_TAG, TrackingError, configure_tracking, load_predictions, tracked_run
from dialogsum.training.recipe import EPOCH_METRICS

EPOCHS = 2
TRAIN_ROWS = 16
VALIDATION_ROWS = 4
STEPS = (TRAIN_ROWS // 8) * EPOCHS  # kobart-tiny's batch size is 8, train_loss is logged every step
PIPELINES_TIMEOUT_S = 900


def _tiny_overrides() -> dict[str, object]:
    return {"training.epochs": EPOCHS, "training.max_train_samples": TRAIN_ROWS, "training.max_validation_samples": VALIDATION_ROWS,
            "training.max_test_samples": 4, "generation.max_new_tokens": 16, "training.log_every_n_steps": 1}  # fmt: skip


def _train_command() -> list[str]:
    sets = [arg for key, value in _tiny_overrides().items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "dialogsum", "train", "--model", "kobart-tiny", *sets]


def _write_pipeline_config(folder: Path, experiment: str) -> Path:
    """The bundled sample's train rows; 4 dev rows validate and 4 others test (a pipeline takes its validation and
    test rows from its data files, never from per-model limits)."""
    dev = read_dialogues(sample_data_path("dev"))
    validation = write_dialogues(dev.head(VALIDATION_ROWS), folder / "validation.csv")
    test = write_dialogues(dev.subset(dev.rows[VALIDATION_ROWS:VALIDATION_ROWS + 4], "4 more dev rows"), folder / "test.csv")
    overrides = {k: v for k, v in _tiny_overrides().items() if k not in ROW_LIMITS}
    config = {"name": "tiny", "experiment": experiment,
              "data": {"train": str(sample_data_path("train")), "validation": str(validation), "test": str(test)},
              "models": [{"name": "kobart-tiny", "overrides": overrides}],
              "steps": ["train"], "timeouts": {"train": PIPELINES_TIMEOUT_S}}  # fmt: skip
    path = folder / "tiny-pipeline.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def _client_env(**overrides: str) -> dict[str, str]:
    """This process's environment without MLflow run/experiment/credential variables, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"OMP_NUM_THREADS": "1"} | overrides


@dataclass
class Store:
    """One tracking store that two pipelines wrote to at the same time."""

    uri: str
    env: dict[str, str]
    experiment: str

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def experiment_id(self) -> str:
        return self.client().get_experiment_by_name(self.experiment).experiment_id

    def runs(self):
        return self.client().search_runs([self.experiment_id()], order_by=["attributes.start_time ASC"])

    def pipelines(self) -> list[tuple]:
        """(parent, its children) per pipeline."""
        runs = self.runs()
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return [(p, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]) for p in parents]


def _wait_all(processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + PIPELINES_TIMEOUT_S
    try:
        for process in processes:
            out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert process.returncode == 0, f"pipeline exited with {process.returncode}:\n{out[-4000:]}"
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def concurrent_pipelines(team_server: TrackingServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Store]:  # noqa: F811
    """Two `dialogsum pipeline` processes against the server and two against one SQLite file, all four at once;
    each pair creates the same new experiment (the server is shared with other test modules)."""
    sqlite_folder = tmp_path_factory.mktemp("sqlite-store")
    experiment = f"concurrent-{secrets.token_hex(4)}"
    config = _write_pipeline_config(tmp_path_factory.mktemp("pipeline-config"), experiment)
    stores = {
        "server": Store(team_server.uri, team_server.client_env(), experiment),
        "sqlite": Store(f"sqlite:///{sqlite_folder / 'mlflow.db'}", {"MLFLOW_TRACKING_URI": f"sqlite:///{sqlite_folder / 'mlflow.db'}"}, experiment),
    }
    command = [sys.executable, "-m", "dialogsum", "pipeline", "--config", str(config)]
    processes = [
        subprocess.Popen(command, cwd=tmp_path_factory.mktemp(f"{name}-client"), env=_client_env(**store.env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for name, store in stores.items()
        for _ in range(2)
    ]
    _wait_all(processes)
    return stores


@pytest.fixture(autouse=True)
def bounded_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """configure_tracking's HTTP defaults, undone after each test."""
    for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)


@pytest.fixture
def server_client(team_server: TrackingServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> TrackingServer:  # noqa: F811
    """This process logs to the team server with the admin credentials."""
    for name, value in team_server.client_env().items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(team_server.uri)
    return team_server


def _use_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(store.uri)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    paths = []
    for entry in client.list_artifacts(run_id, folder):
        paths += _artifact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return sorted(paths)


@pytest.mark.parametrize("store_name", ["server", "sqlite"])
def test_concurrent_pipelines_lose_no_run_metric_or_artifact(concurrent_pipelines: dict[str, Store], store_name, monkeypatch):
    store = concurrent_pipelines[store_name]
    _use_store(store, monkeypatch)
    client = store.client()
    pipelines = store.pipelines()
    assert len(pipelines) == 2 and len(store.runs()) == 4, [(r.info.run_id, r.info.run_name) for r in store.runs()]
    for parent, children in pipelines:
        assert parent.info.status == "FINISHED" and {"matrix.csv", "report.md"} <= set(_artifact_paths(client, parent.info.run_id))
        assert len(children) == 1
        run_id = children[0].info.run_id
        assert children[0].info.status == "FINISHED" and children[0].data.tags[STATUS_TAG] == "succeeded"
        for key in EPOCH_METRICS:
            assert _steps(client, run_id, key) == list(range(1, EPOCHS + 1)), key
            assert f"best_{key}" in children[0].data.metrics
        assert _steps(client, run_id, "train_loss") == list(range(1, STEPS + 1))
        assert {"config.yaml", "predictions.json", "test_predictions.json", "rouge_curve.png"} <= set(_artifact_paths(client, run_id))
        predictions = load_predictions(run_id)
        assert len(predictions) == VALIDATION_ROWS and {"fname", "reference", "prediction"} <= set(predictions.columns)
        assert "python_function" in mlflow.models.get_model_info(f"runs:/{run_id}/kobart-tiny").flavors


def test_server_stores_runs_in_postgresql_and_serves_artifacts(concurrent_pipelines, server_client: TrackingServer):
    """The runs are rows of the PostgreSQL database; the model comes back through the server's artifact proxy."""
    store = concurrent_pipelines["server"]
    run_ids = {r.info.run_id for r in store.runs()}
    rows = query(server_client.backend_uri, "SELECT run_uuid, status FROM runs")
    assert {(run_id, "FINISHED") for run_id in run_ids} <= set(rows)
    assert len(list((server_client.artifacts / store.experiment_id()).rglob("predictions.json"))) == 2
    child = next(children[0] for _, children in store.pipelines())
    model = mlflow.pyfunc.load_model(f"runs:/{child.info.run_id}/kobart-tiny")
    summaries = model.predict(pd.DataFrame({"dialogue": ["#Person1#: 안녕하세요.\n#Person2#: 네, 무엇을 도와드릴까요?"]}))
    assert len(summaries) == 1 and isinstance(summaries[0], str)


def _same_run(server: tuple[MlflowClient, object], local: tuple[MlflowClient, object]) -> None:
    """Same params, metric keys with the same steps (system metrics aside: their samples follow the clock), tag keys
    and artifact paths."""
    (server_client, server_run), (local_client, local_run) = server, local
    assert server_run.data.params == local_run.data.params
    keys = {k for k in server_run.data.metrics if not k.startswith("system/")}
    assert keys == {k for k in local_run.data.metrics if not k.startswith("system/")}
    for key in keys:
        steps = _steps(server_client, server_run.info.run_id, key)
        assert steps == _steps(local_client, local_run.info.run_id, key), key
    tags = {k for k in server_run.data.tags if not k.startswith("mlflow.")}
    assert tags == {k for k in local_run.data.tags if not k.startswith("mlflow.")}
    server_paths, local_paths = (
        [path.replace(run.info.run_id, "<run_id>") for path in _artifact_paths(client, run.info.run_id)]  # logs/train-<run_id>.log
        for client, run in (server, local)
    )
    assert server_paths == local_paths


def test_pipeline_on_the_server_matches_the_pipeline_on_sqlite(concurrent_pipelines: dict[str, Store], monkeypatch):
    """Same tiny pipeline, same record: parent and child runs, params, metrics with their steps, artifacts, and the
    same scores (the training is deterministic)."""
    _use_store(concurrent_pipelines["server"], monkeypatch)  # the server's credentials
    (server_parent, [server_child]), (local_parent, [local_child]) = (
        concurrent_pipelines[name].pipelines()[0] for name in ("server", "sqlite")
    )
    clients = {name: store.client() for name, store in concurrent_pipelines.items()}
    _same_run((clients["server"], server_parent), (clients["sqlite"], local_parent))
    _same_run((clients["server"], server_child), (clients["sqlite"], local_child))
    for key in EPOCH_METRICS:
        assert server_child.data.metrics[f"best_{key}"] == pytest.approx(local_child.data.metrics[f"best_{key}"], rel=1e-4), key


def test_losing_the_experiment_creation_race_still_logs_into_the_experiment(mlflow_store, monkeypatch):
    """Two commands creating the experiment at once: MLflow's loser gets RESOURCE_ALREADY_EXISTS and returns the
    experiment without activating it; configure_tracking activates it, so the run does not land in "Default"."""
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    winner_id = MlflowClient().create_experiment("dialogsum")  # the other command's insert
    lookup = TrackingServiceClient.get_experiment_by_name
    calls = []

    def before_the_insert(self, name):  # this command's first lookup ran just before the other's insert
        calls.append(name)
        return None if len(calls) == 1 else lookup(self, name)

    monkeypatch.setattr(TrackingServiceClient, "get_experiment_by_name", before_the_insert)
    configure_tracking()
    with tracked_run("race", kind="check") as run:
        pass
    assert mlflow.get_run(run.run_id).info.experiment_id == winner_id


def test_losing_the_experiment_tag_race_still_opens_the_runs_table(mlflow_store, monkeypatch):
    """Two stages tagging a new experiment at once: a PostgreSQL-backed server inserts the tag for both and one
    gets a unique-key error (seen in CI). The race cannot be timed here, so the other stage's insert lands just
    before this one's and the server's error is raised; configure_tracking finds the tag there and goes on."""
    from mlflow.exceptions import MlflowException

    experiment_id = MlflowClient().create_experiment("tag-race")
    real_set_tag = MlflowClient.set_experiment_tag

    def lose_the_race(self, experiment_id, key, value):
        real_set_tag(self, experiment_id, key, value)  # the other stage's insert
        raise MlflowException('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique '
                              'constraint "experiment_tag_pk"')  # fmt: skip

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", lose_the_race)
    configure_tracking("tag-race")
    assert MlflowClient().get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    def refuse(self, experiment_id, key, value):
        raise MlflowException("PERMISSION_DENIED: read-only experiment")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    with pytest.raises(MlflowException, match="read-only"):
        configure_tracking("tag-race-refused")


def test_basic_auth_refuses_a_client_without_credentials(team_server: TrackingServer):  # noqa: F811
    done = subprocess.run(_train_command(), env=_client_env(**team_server.client_env(with_credentials=False)),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert f"MLflow tracking server {team_server.uri} refused the credentials" in " ".join(output.split())
    assert "Traceback" not in output


def test_basic_auth_refuses_a_wrong_password_without_echoing_it(server_client: TrackingServer, monkeypatch):
    wrong = "not-the-password-" + "x" * 8
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", wrong)
    with pytest.raises(TrackingError, match="refused the credentials") as refused:
        configure_tracking()
    assert wrong not in str(refused.value)


def test_basic_auth_accepts_credentials_for_runs_metrics_and_artifacts(server_client: TrackingServer):
    configure_tracking("auth-check")
    with tracked_run("auth-check", kind="check") as run:
        mlflow.log_param("check", "yes")
        mlflow.log_metrics({"value": 1.5}, step=3)
        mlflow.log_text("proxied", "notes/check.txt")
    stored = mlflow.get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.data.params == {"check": "yes"}
    assert stored.data.metrics == {"value": 1.5}
    assert mlflow.artifacts.load_text(f"runs:/{run.run_id}/notes/check.txt") == "proxied"
    assert server_client.credentials.password not in str(stored.data.to_dictionary())


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts TCP connections (kernel backlog) but never answers HTTP."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["closed port", "silent server"])
def test_unreachable_server_fails_within_seconds(kind, silent_server, monkeypatch, slowdown):
    uri = silent_server if kind == "silent server" else f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.perf_counter()
    with pytest.raises(TrackingError, match="unreachable") as failed:
        configure_tracking()
    assert time.perf_counter() - start < SERVER_PROBE_TIMEOUT_S[1] + 5 * slowdown  # the probe's read timeout, then CPU
    assert uri in str(failed.value) and "MLFLOW_TRACKING_URI" in str(failed.value)


def test_cli_names_the_unreachable_server(silent_server, slowdown):
    """The whole command, interpreter start-up and imports included, ends with one clear line instead of MLflow's
    minutes of retries (the network wait itself is bounded to seconds above)."""
    start = time.perf_counter()
    done = subprocess.run(_train_command(), env=_client_env(MLFLOW_TRACKING_URI=silent_server),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    elapsed = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert f"MLflow tracking server {silent_server} is unreachable" in " ".join(output.split())
    assert "Traceback" not in output
    assert elapsed < 90 * slowdown, f"{elapsed:.1f} s (bound 90 s × slowdown {slowdown:.2f})"


def test_a_dataset_insert_lost_to_a_concurrent_run_is_logged_again(mlflow_store, monkeypatch):
    """Two runs logging the same new dataset at once can make MLflow's SQL store raise a unique-key error on the
    server (seen in the concurrent-pipelines test). The race cannot be timed here, so the first `log_input` call
    raises the server's error, then the real call runs: the dataset is logged once, nothing lost."""
    from mlflow.exceptions import MlflowException

    from dialogsum.tracking import log_dataset_input

    real_log_input = mlflow.log_input
    calls: list[int] = []

    def lose_the_race_once(dataset, context=None, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates unique '
                                  'constraint "dataset_pk"')  # fmt: skip
        return real_log_input(dataset, context=context, **kwargs)

    def fail_otherwise(dataset, context=None, **kwargs):
        calls.append(1)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'x' not found")

    dataset = mlflow.data.from_pandas(pd.DataFrame({"fname": ["a"], "dialogue": ["#Person1#: 안녕"]}), name="rows.csv")
    configure_tracking("dataset-race")
    with tracked_run(run_name="dataset", kind="train") as run:
        monkeypatch.setattr(mlflow, "log_input", lose_the_race_once)
        log_dataset_input(dataset, context="training")
        assert len(calls) == 2
        monkeypatch.setattr(mlflow, "log_input", fail_otherwise)
        with pytest.raises(MlflowException, match="not found"):
            log_dataset_input(dataset, context="evaluation")
        assert len(calls) == 3, "any other error is raised at once, not retried"
    inputs = mlflow.get_run(run.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["rows.csv"]
