"""`dialogsum tune`: Optuna studies of kobart-tiny (real training steps on the bundled sample) as an MLflow parent
with one child training run per trial; pruning per epoch, failures that stay failures, resume by study name, and
workers sharing one study through PostgreSQL, one of them killed with `kill -9`."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.config import ConfigError, load_model_config
from dialogsum.sweeps.space import load_space
from dialogsum.sweeps.tune import (
    BEST_OVERRIDES_ARTIFACT,
    BEST_SET_LINE_ARTIFACT,
    HISTORY_PLOT,
    METRIC_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    TRIALS_TABLE,
    TuneSettings,
    run_study,
)
from dialogsum.tracking import KIND_TAG, PRUNED_AT_TAG, STATUS_TAG

# Trials are short: 24 training rows, 8 validation rows, 3 epochs, 4 new tokens. At this size every summary scores
# ROUGE 0, so the studies optimise (and prune on) the validation loss, which the learning rate moves a lot.
SPACE = """\
model: kobart-tiny
fixed: {training.max_train_samples: 24, training.max_validation_samples: 8, training.max_test_samples: 2, training.epochs: 3,
        generation.max_new_tokens: 4, generation.num_beams: 1, checkpoint.keep: none}
params:
  training.learning_rate: {type: float, low: 1.0e-5, high: 3.0e-2, log: true}
  training.warmup_steps: {type: int, low: 0, high: 4}
"""
STATES = {"COMPLETE": ("FINISHED", "succeeded"), "PRUNED": ("KILLED", "pruned"), "FAIL": ("FAILED", "failed")}


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(SPACE, encoding="utf-8")
    return path


def _children(parent: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list")


def _study(name: str, storage) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def test_a_pruned_study_records_every_trial_as_a_child_whose_status_matches_optuna(space_file, module_store, third_training_fails):
    journal = module_store / "study.journal"
    settings = TuneSettings(model="kobart-tiny", space=str(space_file), trials=6, study="pruning", storage=f"journal:{journal}",
                            pruner="median", sampler="random", seed=3, metric="val_loss")  # fmt: skip
    parent = run_study(settings)

    run = mlflow.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags[KIND_TAG] == "tune" and run.data.tags[STUDY_TAG] == "pruning"
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = _study("pruning", JournalStorage(JournalFileBackend(str(journal))))
    trials = {t.number: t for t in study.get_trials()}
    children = {int(c.data.tags[TRIAL_TAG]): c for c in _children(parent)}
    assert set(children) == set(trials), "one child run per trial"
    for number, trial in trials.items():
        child = children[number]
        status, tag = STATES[trial.state.name]
        assert child.info.status == status and child.data.tags[STATUS_TAG] == tag, (number, trial.state, child.info.status)
        assert child.data.tags[KIND_TAG] == "train" and child.data.tags[STUDY_TAG] == "pruning"
        if trial.state.name == "PRUNED":
            assert child.data.tags[PRUNED_AT_TAG] == str(max(trial.intermediate_values))
        if trial.state.name == "FAIL":
            assert child.data.tags["error.type"] == "RuntimeError", "a failure is never reported as pruned"
    pruned = [t for t in trials.values() if t.state.name == "PRUNED"]
    assert pruned, {n: t.state.name for n, t in trials.items()}
    assert [t.state.name for t in trials.values()].count("FAIL") == 1
    assert len([t for t in trials.values() if t.state.name in ("COMPLETE", "PRUNED")]) == 6

    metrics = run.data.metrics
    assert metrics["trials_pruned"] == len(pruned) and metrics["trials_failed"] == 1
    best = study.best_trial
    assert metrics["best_val_loss"] == pytest.approx(best.value) and metrics["best_trial"] == best.number
    overrides = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{parent}/{BEST_OVERRIDES_ARTIFACT}"))
    assert overrides == {**yaml.safe_load(SPACE)["fixed"], **best.params}, "everything the best trial trained with"
    assert "--set training.learning_rate=" in mlflow.artifacts.load_text(f"runs:/{parent}/{BEST_SET_LINE_ARTIFACT}")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "plots")}
    assert HISTORY_PLOT in artifacts
    table = mlflow.load_table(TRIALS_TABLE, run_ids=[parent])
    assert sorted(table["trial"]) == sorted(trials)
    report = CliRunner().invoke(app, ["report", parent])
    assert report.exit_code == 0, report.output
    html = mlflow.artifacts.load_text(f"runs:/{parent}/report.html")
    assert "Best trial: " in html and "data:image/png;base64," in html and "PRUNED" in html and "FAIL" in html
    assert run.data.tags[METRIC_TAG] == "val_loss" and f"val_loss = {best.value:.4f}" in html, "the report names the study's metric"
    assert f"{len(pruned)} pruned, 1 failed" in html

    third_training_fails()  # restore the real training
    again = run_study(TuneSettings(**{**settings.__dict__, "trials": 7}))
    assert again == parent, "the same --study continues the study under its parent"
    assert len([c for c in _children(parent) if c.data.tags[STATUS_TAG] in ("succeeded", "pruned")]) == 7


def test_a_space_key_that_the_model_does_not_have_is_refused_naming_file_and_key(tmp_path):
    cfg = load_model_config("kobart-tiny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  training.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-3, lgo: true}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*key 'params\.training\.learning_rate\.lgo': unknown key"):
        load_space(bad, cfg)
    bad.write_text("params:\n  lora.r: {type: categorical, choices: [8, 16]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'params\.lora\.r' = 8"):
        load_space(bad, cfg)
    for shipped in ("kobart", "kobart-tiny", "qwen3-4b"):
        assert load_space(shipped, load_model_config(shipped)).params


GENERATION_SPACE = """\
model: kobart-tiny
fixed: {generation.max_new_tokens: 6}
params:
  generation.num_beams: {type: int, low: 1, high: 3}
  generation.no_repeat_ngram_size: {type: categorical, choices: [0, 2]}
"""


def test_generation_settings_are_tuned_on_a_trained_model_without_training(mlflow_store, tmp_path):
    from dialogsum.training.recipe import train_model
    from dialogsum.tracking import VAL_ROWS_TAG

    source = train_model("kobart-tiny", overrides={"training.epochs": 1, "training.max_train_samples": 24, "training.max_validation_samples": 6,
                                                   "training.max_test_samples": 2, "generation.max_new_tokens": 6, "checkpoint.keep": "none"})  # fmt: skip
    space = tmp_path / "generation.yaml"
    space.write_text(GENERATION_SPACE, encoding="utf-8")
    with pytest.raises(Exception, match="--from-run"):
        run_study(TuneSettings(model="kobart-tiny", space=str(space), trials=3))
    parent = run_study(TuneSettings(model="kobart-tiny", space=str(space), trials=3, from_run=source, sampler="random", seed=1))
    children = _children(parent)
    assert len(children) == 3 and all(c.data.tags[KIND_TAG] == "generate" for c in children)
    digest = mlflow.get_run(source).data.tags[VAL_ROWS_TAG]
    assert all(c.data.tags[VAL_ROWS_TAG] == digest and "val_final" in c.data.metrics for c in children), "scored on the source's validation rows"
    trained = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{KIND_TAG}` = 'train'", output_format="list")
    assert [r.info.run_id for r in trained] == [source], "no trial trained"
    assert "--set generation.num_beams=" in mlflow.artifacts.load_text(f"runs:/{parent}/{BEST_SET_LINE_ARTIFACT}")
