"""Model Registry: validation chooses the candidate among runs scored on the same rows; the test rows guard
`@champion` (a candidate that does not beat the champion on them becomes `@challenger`, with the reason);
`--force` promotes and rolls back; every version says where it came from and why it holds its alias.

Two kinds of runs: a real tiny pipeline (a parent with two kobart-tiny children trained on the bundled sample's
training rows, validated on rows held out of them and tested on its dev rows), and "scored runs" logged here with
hand-written per-row scores and a stand-in pyfunc (the registry reads scores and registers models; it never runs
them), so a strong and a weak run can be made to order.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
from tracking_server import team_server  # noqa: F401 - a fixture
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.data import rows_digest
from dialogsum.registry import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    PREVIOUS_ALIAS,
    REGISTERED_MODEL_DESCRIPTION,
    Candidate,
    RegistryError,
    register,
)
from dialogsum.tracking import (
    KIND_TAG,
    STATUS_TAG,
    TEST_PREDICTIONS_ARTIFACT,
    TEST_ROWS_TAG,
    VAL_ROWS_TAG,
    configure_tracking,
    log_predictions,
    run_metric,
    tracked_run,
)


class Constant(mlflow.pyfunc.PythonModel):
    """A stand-in model (registering does not run it)."""

    def predict(self, context, model_input, params=None):  # noqa: ARG002
        return ["#Person1#은 회의에 갑니다."] * len(model_input)


def _table(prefix: str, finals: list[float]) -> list[dict]:
    return [{"fname": f"{prefix}_{i}", "dialogue": "#Person1#: 안녕.", "reference": f"요약 {i}", "prediction": "요약",
             "final": f} for i, f in enumerate(finals)]  # fmt: skip


def scored_run(name: str, val: list[float], test: list[float] | None, *, parent: str | None = None, val_prefix: str = "v",
               kind: str = "train") -> str:  # fmt: skip
    """A succeeded run that logged per-row validation (and test) scores, their digests and a model."""
    tags = {VAL_ROWS_TAG: rows_digest([f"{val_prefix}_{i}" for i in range(len(val))], [f"요약 {i}" for i in range(len(val))])}
    if test is not None:
        tags[TEST_ROWS_TAG] = rows_digest([f"t_{i}" for i in range(len(test))], [f"요약 {i}" for i in range(len(test))])
    with tracked_run(run_name=name, kind=kind, tags={"dialogsum.model": name, **tags}, parent_run_id=parent) as run:
        mlflow.log_metric("best_val_final", float(np.mean(val)))
        log_predictions(_table(val_prefix, val))
        if test is not None:
            mlflow.log_metrics({"test_final": float(np.mean(test)), "test_final_ci95_low": float(np.mean(test)) - 1,
                                "test_final_ci95_high": float(np.mean(test)) + 1})  # fmt: skip
            log_predictions(_table("t", test), TEST_PREDICTIONS_ARTIFACT)
        mlflow.pyfunc.log_model(name=name, python_model=Constant(), pip_requirements=[])
    return run.run_id


def aliases(name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


def source_run(name: str, version: str) -> str:
    return mlflow.MlflowClient().get_model_version(name, version).run_id


@pytest.fixture
def experiment(module_store, monkeypatch) -> str:
    name = f"registry-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    configure_tracking()
    return name


STRONG_TEST = [40.0 + (i % 5) for i in range(40)]
WEAK_TEST = [20.0 + (i % 7) for i in range(40)]


def test_a_weak_run_becomes_challenger_and_force_moves_the_champion(experiment):
    name = f"m-{uuid.uuid4().hex[:8]}"
    strong = scored_run("strong", [30.0] * 10, STRONG_TEST)
    first = register(run_id=strong, name=name)
    assert first.alias == CHAMPION_ALIAS and "first champion" in first.reason

    weak = scored_run("weak", [35.0] * 10, WEAK_TEST)  # better on validation, clearly worse on the test rows
    second = register(run_id=weak, name=name)
    assert second.alias == CHALLENGER_ALIAS and not second.promoted
    assert aliases(name) == {CHAMPION_ALIAS: first.version, CHALLENGER_ALIAS: second.version}
    assert f"champion version {first.version} (strong) beats version {second.version} (weak) by" in second.reason
    version = mlflow.MlflowClient().get_model_version(name, second.version)
    assert "@challenger: not promoted" in version.description and f"test_final {np.mean(WEAK_TEST):.2f}" in version.description
    assert version.tags["dialogsum.registry_decision"].startswith("@challenger")

    forced = register(run_id=weak, name=name, force=True)
    assert forced.promoted and forced.version == second.version and "--force" in forced.reason
    assert aliases(name) == {CHAMPION_ALIAS: second.version, PREVIOUS_ALIAS: first.version}

    rolled_back = CliRunner().invoke(app, ["register", "--run", strong, "--name", name, "--force"])
    assert rolled_back.exit_code == 0, rolled_back.output
    assert aliases(name) == {CHAMPION_ALIAS: first.version, PREVIOUS_ALIAS: second.version}
    assert mlflow.MlflowClient().get_registered_model(name).description == REGISTERED_MODEL_DESCRIPTION


def test_a_clearly_better_run_is_promoted_and_a_tie_is_not(experiment):
    name = f"m-{uuid.uuid4().hex[:8]}"
    register(run_id=scored_run("weak", [20.0] * 10, WEAK_TEST), name=name)
    strong = register(run_id=scored_run("strong", [30.0] * 10, STRONG_TEST), name=name)
    assert strong.promoted and "beats champion version 1 (weak) by" in strong.reason
    noisy = [s + (1.0 if i % 2 else -1.0) for i, s in enumerate(STRONG_TEST)]  # the same on average: indistinguishable
    tie = register(run_id=scored_run("same", [31.0] * 10, noisy), name=name)
    assert tie.alias == CHALLENGER_ALIAS and "not distinguishable" in tie.reason
    assert aliases(name)[CHAMPION_ALIAS] == strong.version


def test_runs_scored_on_other_rows_are_never_ranked_together(experiment):
    name = f"m-{uuid.uuid4().hex[:8]}"
    with tracked_run(run_name="pipeline", kind="pipeline") as parent:
        kept = scored_run("on-the-rows", [25.0] * 10, STRONG_TEST, parent=parent.run_id)
        small = scored_run("eight-rows", [90.0] * 8, STRONG_TEST, parent=parent.run_id, val_prefix="other")
        mlflow.set_tag(VAL_ROWS_TAG, mlflow.get_run(kept).data.tags[VAL_ROWS_TAG])  # a pipeline tags its validation rows
    done = register(parent_run_id=parent.run_id, name=name)
    assert done.run_id == kept and done.candidates == 1, "the 90-point run on other rows does not outrank it"
    assert [n.run_id for n in done.not_comparable] == [small]
    assert "scored on other rows" in done.not_comparable[0].reason
    result = CliRunner().invoke(app, ["register", "--parent", parent.run_id, "--name", name])
    assert result.exit_code == 0 and f"eight-rows ({small}): not comparable, scored on other rows" in result.output
    scored_run("also-on-the-rows", [20.0] * 10, STRONG_TEST)
    done = register(experiment=experiment, name=f"{name}-x")
    assert done.run_id == kept and [n.run_id for n in done.not_comparable] == [small], "the rows most runs share decide"


def test_a_champion_tested_on_other_rows_is_not_replaced_and_the_reason_says_so(experiment):
    name = f"m-{uuid.uuid4().hex[:8]}"
    register(run_id=scored_run("untested", [20.0] * 10, None), name=name)
    done = register(run_id=scored_run("tested", [30.0] * 10, STRONG_TEST), name=name)
    assert done.alias == CHALLENGER_ALIAS and "has no test score" in done.reason


def test_optimize_runs_are_registered_by_run_id_not_ranked_with_training_runs(experiment):
    """An optimize run's ROUGE is measured on its own rows: a high score there does not outrank training runs."""
    name = f"m-{uuid.uuid4().hex[:8]}"
    with tracked_run(run_name="pipeline", kind="pipeline") as parent:
        trained = scored_run("train", [20.0] * 10, WEAK_TEST, parent=parent.run_id)
        optimized = scored_run("optimize", [99.0] * 10, STRONG_TEST, parent=parent.run_id, kind="optimize")
    assert register(parent_run_id=parent.run_id, name=name).run_id == trained
    done = register(run_id=optimized, name=name)
    assert done.run_id == optimized and mlflow.MlflowClient().get_model_version(name, done.version).tags[KIND_TAG] == "optimize"


def test_no_candidate_fails_and_records_the_failed_register_run(experiment):
    with tracked_run(run_name="lonely", kind="train"):
        mlflow.log_metric("val_final", 10.0)  # succeeded, but no model logged
    result = CliRunner().invoke(app, ["register", "--experiment", experiment, "--name", "nobody"])
    assert result.exit_code == 1 and "no succeeded train run with a logged model" in result.output
    failed = mlflow.search_runs(filter_string=f"tags.`{KIND_TAG}` = 'register'", output_format="list")
    assert [r.data.tags[STATUS_TAG] for r in failed] == ["failed"]
    with pytest.raises(RegistryError, match="logged no READY model"):
        register(run_id=failed[0].info.run_id, name="nobody")
    result = CliRunner().invoke(app, ["register", "--experiment", "no-such-experiment", "--name", "nobody"])
    assert result.exit_code == 1 and "does not exist" in result.output


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


@pytest.fixture(scope="module")
def pipeline(module_store) -> SimpleNamespace:
    """A parent `pipeline` run with two trained kobart-tiny children; `better`/`worse` by validation."""
    from dialogsum.training.recipe import train_model

    base = {"training.epochs": 1, "training.max_train_samples": 24, "training.max_validation_samples": 8,
            "training.max_test_samples": 8, "generation.max_new_tokens": 8}  # fmt: skip
    configure_tracking("registry-pipeline")
    with tracked_run(run_name="tiny-pipeline", kind="pipeline") as parent:
        children = [train_model("kobart-tiny", parent_run_id=parent.run_id, overrides={**base, **settings})
                    for settings in ({"training.seed": 1}, {"training.seed": 7, "training.learning_rate": 3e-3})]  # fmt: skip
    runs = [mlflow.get_run(run_id) for run_id in children]
    better, worse = sorted(runs, key=lambda r: (-run_metric(r, "val_final"), r.info.end_time))
    return SimpleNamespace(parent=parent.run_id, better=better, worse=worse)


def test_trained_children_register_by_validation_with_tags_and_a_servable_champion(pipeline, module_store):
    name = f"m-{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(app, ["register", "--parent", pipeline.parent, "--name", name])
    assert result.exit_code == 0, result.output
    assert f"@{CHAMPION_ALIAS}" in result.output
    version = aliases(name)[CHAMPION_ALIAS]
    assert source_run(name, version) == pipeline.better.info.run_id
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    run = pipeline.better
    assert tags["source_run_id"] == run.info.run_id and tags[KIND_TAG] == "train" and tags["dialogsum.model"] == "kobart-tiny"
    assert float(tags["metric.val_final"]) == pytest.approx(run_metric(run, "val_final"), rel=1e-5)
    assert {"metric.test_final", "metric.test_final_ci95_low", "metric.val_final_ci95_high"} <= set(tags)
    assert tags[VAL_ROWS_TAG] == run.data.tags[VAL_ROWS_TAG] and tags[TEST_ROWS_TAG] == run.data.tags[TEST_ROWS_TAG]
    assert tags["data.training.file_digest"] == run.data.params["data.training.file_digest"]
    assert tags["git_commit"] == run.data.tags.get("mlflow.source.git.commit", "unknown")
    champion = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION_ALIAS}")
    assert champion.metadata.run_id == run.info.run_id
    register_runs = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                       filter_string=f"tags.mlflow.parentRunId = '{pipeline.parent}' and tags.`{KIND_TAG}` = 'register'")  # fmt: skip
    assert register_runs[0].data.params["registry.source_run_id"] == run.info.run_id
    assert register_runs[0].data.params["registry.alias"] == CHAMPION_ALIAS


def test_register_on_the_team_tracking_server(team_server, monkeypatch):
    """The same guard against `mlflow server` (PostgreSQL store, proxied artifacts, basic-auth)."""
    env = {**team_server.client_env(), "MLFLOW_EXPERIMENT_NAME": f"registry-{uuid.uuid4().hex[:8]}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    name = f"dialogsum-ko-{uuid.uuid4().hex[:8]}"
    previous_uri = mlflow.get_tracking_uri()
    try:
        configure_tracking()
        strong, weak = scored_run("strong", [30.0] * 10, STRONG_TEST), scored_run("weak", [35.0] * 10, WEAK_TEST)
        assert register(run_id=strong, name=name).alias == CHAMPION_ALIAS
        assert register(name=name).alias == CHALLENGER_ALIAS, "the best by validation (weak) loses on the test rows"
        client = mlflow.MlflowClient()
        assert client.get_registered_model(name).aliases == {CHAMPION_ALIAS: "1", CHALLENGER_ALIAS: "2"}
        assert source_run(name, "2") == weak
        assert client.get_model_version(name, "2").tags["metric.val_final"] == "35"
    finally:
        mlflow.set_tracking_uri(previous_uri)
