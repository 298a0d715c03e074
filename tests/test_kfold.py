"""`dialogsum kfold`: 3 folds of kobart-tiny on the bundled sample's training rows (real training steps), the
out-of-fold table covering every row once, and `--resume` training only the fold that failed."""

from __future__ import annotations

import mlflow
import pytest
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.data import read_dialogues, sample_data_path
from dialogsum.sweeps.kfold import FOLD_TAG, OOF_ARTIFACT, OOF_ROWS_TAG, KFoldError, fold_assignment
from dialogsum.tracking import KIND_TAG, STATUS_TAG, load_predictions

SETTINGS = ["--set", "training.epochs=1", "--set", "generation.max_new_tokens=4", "--set", "generation.num_beams=1",
            "--set", "checkpoint.keep=none"]  # fmt: skip


def _children(parent: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'", output_format="list")


def test_three_folds_give_three_children_and_out_of_fold_predictions_for_every_row_once(mlflow_store, third_training_fails):
    first = CliRunner().invoke(app, ["kfold", "--model", "kobart-tiny", "--folds", "3", *SETTINGS])
    assert first.exit_code == 1 and "injected failure in training 3" in str(first.exception)
    [parent] = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{KIND_TAG}` = 'kfold'", output_format="list")
    assert parent.info.status == "FAILED"

    third_training_fails()  # restore the real training
    resumed = CliRunner().invoke(app, ["kfold", "--model", "kobart-tiny", "--folds", "3", "--resume", parent.info.run_id, *SETTINGS])
    assert resumed.exit_code == 0, resumed.output
    assert "3-fold val_final" in resumed.output
    children = _children(parent.info.run_id)
    succeeded = sorted(int(c.data.tags[FOLD_TAG]) for c in children if c.data.tags[STATUS_TAG] == "succeeded")
    assert succeeded == [0, 1, 2] and len(children) == 4, "the resume trained only the failed fold"
    assert all(c.data.tags[KIND_TAG] == "train" for c in children)

    run = mlflow.get_run(parent.info.run_id)
    assert run.info.status == "FINISHED"
    data = read_dialogues(sample_data_path("train"))
    oof = load_predictions(parent.info.run_id, OOF_ARTIFACT)
    assert list(oof["fname"]) == data.fnames, "every training row once, in file order"
    assert sorted(set(oof["fold"])) == [0, 1, 2]
    for fold, run_id in oof.groupby("fold")["run_id"].first().items():  # each row predicted by the fold that held it out
        train_rows = mlflow.get_run(run_id).data.params["data.training.rows"]
        assert int(train_rows) == len(data) - (oof["fold"] == fold).sum()
    m = run.data.metrics
    assert m["oof_rows"] == len(data) and m["oof_final"] == pytest.approx(oof["final"].mean())
    assert m["cv_val_final_std"] >= 0 and OOF_ROWS_TAG in run.data.tags


def test_topic_folds_keep_each_topic_in_one_fold_and_bad_folds_are_refused():
    data = read_dialogues(sample_data_path("train"))
    assignment = fold_assignment(data, 3, "topic")
    by_topic = {}
    for row, fold in zip(data.rows, assignment):
        by_topic.setdefault(row.topic, set()).add(fold)
    assert all(len(folds) == 1 for folds in by_topic.values())
    with pytest.raises(KFoldError, match="at least 2"):
        fold_assignment(data, 1, "fname")


def test_logit_average_of_the_fold_models_is_scored_on_the_shared_test_rows_and_served_as_one_pyfunc(mlflow_store, tmp_path):
    """Fold models validate on different rows but share the test rows: the logit average is scored there, and its
    pyfunc (holding every fold's model) writes the same summaries as the run's test table. The folds share one
    tokenizer, as real KoBART folds share the hub's (a tiny model otherwise trains its own on each fold's rows)."""
    from dialogsum.config import load_model_config
    from dialogsum.models import train_tokenizer

    rows = read_dialogues(sample_data_path("train"))
    shared = tmp_path / "tokenizer"
    train_tokenizer(rows.dialogues + rows.summaries, load_model_config("kobart-tiny")).save_pretrained(shared)
    test = sample_data_path("dev")
    result = CliRunner().invoke(app, ["kfold", "--model", "kobart-tiny", "--folds", "2", "--test-data", str(test), *SETTINGS,
                                      "--set", "training.max_test_samples=3", "--set", f"tokenizer.path={shared}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    [parent] = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{KIND_TAG}` = 'kfold'", output_format="list")
    folds = [c.info.run_id for c in _children(parent.info.run_id)]
    averaged = CliRunner().invoke(app, ["ensemble", "--runs", ",".join(folds), "--strategy", "logit_avg"])
    assert averaged.exit_code == 0, averaged.output
    [run] = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`dialogsum.ensemble.strategy` = 'logit_avg'", output_format="list")
    assert run.info.status == "FINISHED" and "test_final" in run.data.metrics and "val_final" not in run.data.metrics
    table = load_predictions(run.info.run_id, "test_predictions.json")
    assert len(table) == 3
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/ensemble-logit_avg")
    assert len(model.unwrap_python_model().members) == 2
    assert model.predict([{"dialogue": d} for d in table["dialogue"]]) == list(table["prediction"])
