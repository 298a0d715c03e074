"""`train`: real training steps on the bundled Korean sample (train fits, validation chooses, test reports), logged to a
real SQLite MLflow store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from dialogsum.data import DataError, dataset_rows_digest, read_dialogues, sample_data_path, split_validation
from dialogsum.training.recipe import EPOCH_METRICS, train_model

REPO = Path(__file__).resolve().parents[1]
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def _tiny_bart(**extra):
    return {"training.epochs": 2, "training.learning_rate": 3e-3, "generation.max_new_tokens": 24, **extra}


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def test_kobart_tiny_run_tells_the_whole_story(mlflow_store, monkeypatch):
    """No data given: the sample's train rows, 20% held out by fname hash for validation, its dev rows as the test."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # MLflow's own setting: samples in a short run
    run_id = train_model("kobart-tiny", overrides=_tiny_bart())
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dialogsum.status"] == "succeeded"
    assert run.data.tags["dialogsum.model"] == "kobart-tiny"
    assert run.data.tags["dialogsum.precision"] == "cpu:float32"
    for key in EPOCH_METRICS + ("epoch_time_s",):
        assert [step for step, _ in _history(run_id, key)] == [1, 2], key
    assert _history(run_id, "train_loss"), "training loss is logged every N steps"
    metrics = run.data.metrics
    assert metrics["best_val_final"] == max(v for _, v in _history(run_id, "val_final")), "validation chose the epoch"
    assert metrics["test_final_ci95_low"] <= metrics["test_final"] <= metrics["test_final_ci95_high"]
    assert metrics["best_val_final_ci95_low"] <= metrics["best_val_final"] <= metrics["best_val_final_ci95_high"]
    assert run.data.params["training.epochs"] == "2"
    assert int(run.data.params["model.dialogue_tag_tokens"]) == 15

    train, validation = split_validation(read_dialogues(sample_data_path("train")), 0.2)
    test = read_dialogues(sample_data_path("dev"))
    assert run.data.tags["dialogsum.val_rows_digest"] == dataset_rows_digest(validation)
    assert run.data.tags["dialogsum.test_rows_digest"] == dataset_rows_digest(test)
    assert run.data.params["data.training.rows"] == str(len(train)) and run.data.params["data.validation.rows"] == str(len(validation))
    contexts = {t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
    assert contexts == {"training", "validation", "testing"}

    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "predictions.json", "test_predictions.json", "rouge_curve.png"} <= artifacts
    table = mlflow.load_table("predictions.json", run_ids=[run_id])
    assert list(table.columns[:4]) == ["fname", "dialogue", "reference", "prediction"]
    assert {"rouge1", "rouge2", "rougeL", "final"} <= set(table.columns)
    assert sorted(table["fname"]) == sorted(validation.fnames) and not set(table["fname"]) & set(train.fnames)
    test_table = mlflow.load_table("test_predictions.json", run_ids=[run_id])
    assert list(test_table["fname"]) == test.fnames
    assert metrics["test_final"] == pytest.approx(test_table["final"].mean())

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/kobart-tiny")
    assert model.metadata.run_id == run_id
    assert "max_new_tokens" in [p.name for p in model.metadata.signature.params.params]
    served = model.predict(test_table[["fname", "dialogue"]])
    assert served == list(test_table["prediction"]), "the served model writes exactly the scored test summaries"
    frame = test_table[["fname", "dialogue"]].head(3)
    summaries = model.predict(frame, params={"max_new_tokens": 24})
    assert len(summaries) == 3 and all(isinstance(s, str) and s for s in summaries)
    assert any(HANGUL.search(s) for s in summaries), summaries
    records = [{"dialogue": d} for d in frame["dialogue"]]
    assert model.predict(records, params={"max_new_tokens": 24}) == summaries, "records with a dialogue field work too"
    with pytest.raises(mlflow.exceptions.MlflowException, match="dialogue"):  # validated against predict's type hints
        model.predict(frame.rename(columns={"dialogue": "text"}))
    system = [k for k in metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system, system


def test_rows_shared_between_roles_are_refused_naming_them(mlflow_store):
    train = sample_data_path("train")
    with pytest.raises(DataError, match="train_0") as caught:
        train_model("kobart-tiny", train_path=train, validation_path=train, overrides=_tiny_bart())
    assert "train (" in str(caught.value) and "validation (" in str(caught.value) and "shared row(s)" in str(caught.value)
    with pytest.raises(DataError, match="dev_0"):
        train_model("kobart-tiny", validation_path=sample_data_path("dev"), test_path=sample_data_path("dev"), overrides=_tiny_bart())


def test_qlora_causal_model_trains_in_4bit_on_cpu_and_loss_goes_down(mlflow_store):
    overrides = {
        "training.epochs": 3,
        "training.batch_size": 4,
        "training.max_train_samples": 8,
        "training.max_validation_samples": 2,
        "training.max_test_samples": 2,
        "training.max_source_length": 192,
        "training.log_every_n_steps": 1,
        "training.learning_rate": 5e-3,
        "generation.max_new_tokens": 8,
    }
    run_id = train_model("qwen3-tiny-qlora", overrides=overrides)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    # 2 layers x 7 LoRA targets, each counted once (peft's wrapper of a 4-bit layer is not a second one)
    assert int(run.data.params["model.quantized_linear_layers"]) == 14, "base linear layers are bitsandbytes 4-bit"
    assert run.data.params["quantization"] == "4bit"
    losses = [v for _, v in _history(run_id, "train_loss")]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert [s for s, _ in _history(run_id, "val_final")] == [1, 2, 3]


def test_failure_is_a_failed_run_with_error_artifacts(mlflow_store):
    overrides = {"architecture.hidden_size": 65, "training.max_train_samples": 8}  # 65 is not divisible by 4 heads
    with pytest.raises(Exception, match="hidden size"):
        train_model("llama-tiny", overrides=overrides)
    run = mlflow.search_runs(output_format="list", experiment_names=["dialogsum"])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["dialogsum.status"] == "failed"
    assert run.data.tags["error.stage"] == "load"
    assert run.data.tags["error.type"]
    error = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="errors/error.json")).read_text())
    assert error["stage"] == "load" and "hidden size" in error["message"]
    traceback_path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="errors/traceback.txt")
    assert "Traceback" in Path(traceback_path).read_text()


def test_hub_model_offline_fails_fast_with_a_clear_reason(mlflow_store, monkeypatch, slowdown):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dialogsum", "train", "--model", "KoBART"], capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 1
    assert "weights unreachable" in result.stderr
    run = mlflow.search_runs(output_format="list", experiment_names=["dialogsum"])[0]
    assert run.info.status == "FAILED" and run.data.tags["error.stage"] == "preflight"
    assert elapsed < 60 * slowdown, f"offline failure took {elapsed:.1f} s (bound 60 s × slowdown {slowdown:.2f})"


def test_sigterm_marks_the_run_killed(mlflow_store, slowdown):
    mlflow.set_experiment("dialogsum")  # create the store first: polling a half-migrated SQLite file races
    process = subprocess.Popen(
        [sys.executable, "-m", "dialogsum", "train", "--model", "kobart-tiny", "--epochs", "50",
         "--max-validation-samples", "4", "--set", "training.log_every_n_steps=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240 * slowdown
    while time.monotonic() < deadline:
        runs = mlflow.search_runs(output_format="list", experiment_names=["dialogsum"])
        if runs and mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "train_loss"):
            break
        time.sleep(1)
    else:
        process.kill()
        pytest.fail("training never started logging")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60 * slowdown)
    run = mlflow.get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["dialogsum.status"] == "killed"
    assert run.data.tags["error.type"] == "Terminated"


def test_mlflow_run_entry_point_trains_kobart_tiny(mlflow_store):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "-e", "train", "-P", "model=kobart-tiny", "-P", "epochs=2", "--env-manager", "local",
         "-P", "set=generation.max_new_tokens=8 training.max_validation_samples=4 training.max_test_samples=4"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1, "train logs into the run that `mlflow run` created"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["dialogsum.kind"] == "train"
    assert [s for s, _ in _history(run.info.run_id, "val_final")] == [1, 2]


def test_runs_record_the_commit_of_the_checkout_that_runs(mlflow_store):
    """`dialogsum` is a console script outside the repository, so MLflow cannot see the commit; dialogsum records it
    (and the registry's `git_commit` and the pipeline's children take it from there)."""
    import subprocess

    from dialogsum.tracking import configure_tracking, source_git_tags, tracked_run

    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    assert source_git_tags()["mlflow.source.git.commit"] == head
    configure_tracking("git-tags")
    with tracked_run("tagged", kind="check") as run:
        pass
    assert mlflow.get_run(run.run_id).data.tags["mlflow.source.git.commit"] == head


@pytest.mark.parametrize("keep", ["none", "both"])
def test_a_failed_run_keeps_its_local_checkpoints_only_when_they_can_resume_it(mlflow_store, monkeypatch, keep):
    """The test stage fails (injected: the failure is what is tested). With `checkpoint.keep: none` the folder holding
    the best model is temporary and removed; otherwise it stays for `--resume`."""
    import dialogsum.training.recipe as recipe
    from dialogsum.training.checkpoints import checkpoint_root

    def broken(*args, **kwargs):
        raise RuntimeError("injected test-stage failure")

    monkeypatch.setattr(recipe, "evaluate_saved_model", broken)
    with pytest.raises(RuntimeError, match="injected"):
        train_model("kobart-tiny", overrides={"training.epochs": 1, "training.max_train_samples": 16,
                                              "generation.max_new_tokens": 4, "checkpoint.keep": keep})  # fmt: skip
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and run.data.tags["error.stage"] == "test"
    assert checkpoint_root(run.info.run_id).exists() == (keep != "none")
