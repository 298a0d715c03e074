"""Model Registry: `register` puts `champion` on the best run's model, moves it when a better run is registered
and keeps the former champion as `previous`; every version says where it came from.

The "tiny pipeline" is one parent run of kind `pipeline` with two child train runs: kobart-tiny models (KoBART
architecture at toy size, random init, the real KoBART tokenizer) trained on real Korean DialogSum rows with
different settings. For `register --parent` that is what a pipeline leaves behind. Which child is better is read
from their logged metrics, so the tests do not depend on how two random tiny models happen to rank.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import mlflow
import pytest
from tracking_server import team_server  # noqa: F401 - a fixture
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.registry import (
    CHAMPION_ALIAS,
    PREVIOUS_ALIAS,
    Candidate,
    RegistryError,
    register_best,
)
from dialogsum.tracking import KIND_TAG, STATUS_TAG, configure_tracking, run_metric, tracked_run

NAME = "dialogsum-ko"


@pytest.fixture(scope="module")
def pipeline(module_store, shared) -> SimpleNamespace:
    """A parent `pipeline` run with two trained children; `better`/`worse` by the registry's own ranking rule."""
    from dialogsum.train import train_model

    labelled = shared("data/dialogsum-ko/labeled.csv")
    base = {"training.epochs": 1, "training.max_train_samples": 32, "training.max_eval_samples": 8,
            "generation.max_new_tokens": 16, "tokenizer.path": str(shared("tokenizers/kobart"))}  # fmt: skip
    configure_tracking()
    with tracked_run(run_name="tiny-pipeline", kind="pipeline") as parent:
        children = [
            train_model("kobart-tiny", train_path=labelled, eval_path=labelled, parent_run_id=parent.run_id,
                        overrides={**base, **settings})  # fmt: skip
            for settings in ({"training.seed": 1}, {"training.seed": 7, "training.learning_rate": 3e-3})
        ]
    runs = [mlflow.get_run(run_id) for run_id in children]
    better, worse = sorted(runs, key=lambda r: (-run_metric(r, "eval_final"), r.info.end_time))
    return SimpleNamespace(parent=parent.run_id, better=better, worse=worse)


def aliases() -> dict[str, str]:
    return {alias: str(version) for alias, version in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


def source_run(version: str) -> str:
    return mlflow.MlflowClient().get_model_version(NAME, version).run_id


def test_register_then_a_better_run_moves_champion_and_keeps_previous(pipeline):
    worse, better = pipeline.worse, pipeline.better
    print(f"\neval_final: better {run_metric(better, 'eval_final'):.3f}, worse {run_metric(worse, 'eval_final'):.3f}")

    result = CliRunner().invoke(app, ["register", "--run", worse.info.run_id, "--name", NAME])
    assert result.exit_code == 0, result.output
    first = aliases()[CHAMPION_ALIAS]
    assert source_run(first) == worse.info.run_id and PREVIOUS_ALIAS not in aliases()

    version, run_id = register_best(parent_run_id=pipeline.parent, name=NAME)
    assert run_id == better.info.run_id and source_run(version) == run_id
    assert aliases() == {CHAMPION_ALIAS: version, PREVIOUS_ALIAS: first}

    again = register_best(parent_run_id=pipeline.parent, name=NAME)
    assert again == (version, run_id), "registering the champion again creates no new version"
    assert aliases() == {CHAMPION_ALIAS: version, PREVIOUS_ALIAS: first}
    champion = mlflow.pyfunc.load_model(f"models:/{NAME}@{CHAMPION_ALIAS}")
    assert champion.metadata.run_id == better.info.run_id


def test_versions_are_tagged_with_metrics_source_data_and_commit(pipeline):
    version, run_id = register_best(parent_run_id=pipeline.parent, name=NAME)
    tags = mlflow.MlflowClient().get_model_version(NAME, version).tags
    run = pipeline.better
    assert tags["source_run_id"] == run_id and tags[KIND_TAG] == "train" and tags["dialogsum.model"] == "kobart-tiny"
    assert float(tags["metric.eval_final"]) == pytest.approx(run_metric(run, "eval_final"), rel=1e-5)
    assert {"metric.eval_rouge1", "metric.eval_rouge2", "metric.eval_rougeL", "metric.eval_loss"} <= set(tags)
    assert tags["data.training.file_digest"] == run.data.params["data.training.file_digest"]
    assert tags["git_commit"] == run.data.tags.get("mlflow.source.git.commit", "unknown")
    assert tags["model.total_params"] == run.data.params["model.total_params"]


def test_register_is_recorded_as_a_child_run_of_the_pipeline(pipeline):
    result = CliRunner().invoke(app, ["register", "--parent", pipeline.parent, "--name", NAME])
    assert result.exit_code == 0, result.output
    assert f"@{CHAMPION_ALIAS}" in result.output
    runs = mlflow.search_runs(
        experiment_ids=[pipeline.better.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{pipeline.parent}' and tags.`{KIND_TAG}` = 'register'",
        output_format="list",
    )
    assert runs and all(r.data.tags[STATUS_TAG] == "succeeded" for r in runs)
    latest = max(runs, key=lambda r: r.info.start_time)
    assert latest.data.params["registry.source_run_id"] == pipeline.better.info.run_id
    assert latest.data.params["registry.version"] == aliases()[CHAMPION_ALIAS]


def test_a_run_without_a_model_is_refused(pipeline):
    with pytest.raises(RegistryError, match="logged no READY 'model' model"):
        register_best(run_id=pipeline.parent, name=NAME)
    result = CliRunner().invoke(app, ["register", "--experiment", "no-such-experiment", "--name", NAME])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_no_candidate_fails_and_records_the_failed_register_run(module_store):
    configure_tracking("registry-empty")
    with tracked_run(run_name="lonely", kind="train"):
        mlflow.log_metric("eval_final", 10.0)  # succeeded, but no model logged
    result = CliRunner().invoke(app, ["register", "--experiment", "registry-empty", "--name", NAME])
    assert result.exit_code == 1 and "no succeeded train run with a logged model" in result.output
    failed = mlflow.search_runs(filter_string=f"tags.`{KIND_TAG}` = 'register'", output_format="list")
    assert [r.data.tags[STATUS_TAG] for r in failed] == ["failed"]


def fake_run(run_id: str, score: float | None, params: int | None, end_time: int) -> Candidate:
    run = SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, end_time=end_time),
        data=SimpleNamespace(params={} if params is None else {"model.total_params": str(params)}),
    )
    return Candidate(run, f"models:/m-{run_id}", score)


def test_ties_go_to_fewer_parameters_then_the_earlier_run():
    candidates = [
        fake_run("late-small", 30.0, 1_000, end_time=3),
        fake_run("early-small", 30.0, 1_000, end_time=2),
        fake_run("big", 30.0, 5_000, end_time=1),
        fake_run("unknown-size", 30.0, None, end_time=0),
        fake_run("best", 31.0, 9_000, end_time=9),
        fake_run("unscored", None, 10, end_time=0),
    ]
    ranked = [c.run_id for c in sorted(candidates, key=Candidate.rank_key)]
    assert ranked == ["best", "early-small", "late-small", "big", "unknown-size", "unscored"]


class Constant(mlflow.pyfunc.PythonModel):
    """A stand-in model (registering does not run it)."""

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        return ["#Person1#은 회의에 갑니다."] * len(model_input)


def test_register_on_the_team_tracking_server(team_server, monkeypatch):
    """The same calls against `mlflow server` (PostgreSQL store, proxied artifacts, basic-auth)."""
    env = {**team_server.client_env(), "MLFLOW_EXPERIMENT_NAME": f"registry-{uuid.uuid4().hex[:8]}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    name = f"dialogsum-ko-{uuid.uuid4().hex[:8]}"
    previous_uri = mlflow.get_tracking_uri()
    try:
        configure_tracking()
        run_ids = []
        for score in (1.0, 2.0):
            with tracked_run(run_name=f"scored-{score}", kind="train") as run:
                mlflow.log_metric("eval_final", score)
                mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
            run_ids.append(run.run_id)
        assert register_best(run_id=run_ids[0], name=name) == ("1", run_ids[0])
        assert register_best(name=name) == ("2", run_ids[1])
        client = mlflow.MlflowClient()
        assert client.get_registered_model(name).aliases == {CHAMPION_ALIAS: "2", PREVIOUS_ALIAS: "1"}
        assert client.get_model_version(name, "2").tags["metric.eval_final"] == "2"
    finally:
        mlflow.set_tracking_uri(previous_uri)


def test_optimize_runs_are_registered_by_run_id_not_ranked_with_training_runs(module_store):
    """An optimize run's ROUGE is measured on its own rows: a high score there does not outrank training runs."""
    name = f"dialogsum-ko-{uuid.uuid4().hex[:8]}"
    configure_tracking("registry-optimize")
    with tracked_run(run_name="pipeline", kind="pipeline") as parent:
        children = {}
        for kind, score in (("train", 20.0), ("optimize", 99.0)):
            with tracked_run(run_name=kind, kind=kind, parent_run_id=parent.run_id) as child:
                mlflow.log_metric("eval_final", score)
                mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
            children[kind] = child.run_id
    assert register_best(parent_run_id=parent.run_id, name=name) == ("1", children["train"])
    assert register_best(run_id=children["optimize"], name=name) == ("2", children["optimize"])
    assert mlflow.MlflowClient().get_model_version(name, "2").tags[KIND_TAG] == "optimize"
