"""`train`: real training steps on real rows with real tokenizers, logged to a real SQLite MLflow store."""

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
import pandas as pd
import pytest

from dialogsum.train import train_model

REPO = Path(__file__).resolve().parents[1]
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def _tiny_bart(shared, **extra):
    return {
        "training.epochs": 2,
        "training.max_train_samples": 48,
        "training.max_eval_samples": 8,
        "training.learning_rate": 3e-3,
        "tokenizer.path": str(shared("tokenizers/kobart")),
        **extra,
    }


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def test_kobart_tiny_run_tells_the_whole_story(mlflow_store, shared):
    labeled = shared("data/dialogsum-ko/labeled.csv")
    run_id = train_model("kobart-tiny", train_path=labeled, eval_path=labeled, overrides=_tiny_bart(shared))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dialogsum.status"] == "succeeded"
    assert run.data.tags["dialogsum.model"] == "kobart-tiny"
    assert run.data.tags["dialogsum.precision"] == "cpu:float32"
    for key in ("eval_loss", "eval_rouge1", "eval_rouge2", "eval_rougeL", "eval_final", "eval_gen_len", "epoch_time_s"):
        assert [step for step, _ in _history(run_id, key)] == [1, 2], key
    assert _history(run_id, "train_loss"), "training loss is logged every N steps"
    assert run.data.params["training.epochs"] == "2"
    assert run.data.params["tokenizer.path"].endswith("tokenizers/kobart")
    assert int(run.data.params["model.dialogue_tag_tokens"]) == 15
    assert int(run.data.params["model.vocab_size"]) == 30000 + 15
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"labeled.csv"}

    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "predictions.json", "rouge_curve.png"} <= artifacts
    table = mlflow.load_table("predictions.json", run_ids=[run_id])
    assert list(table.columns[:4]) == ["fname", "dialogue", "reference", "prediction"]
    assert {"rouge1", "rouge2", "rougeL", "final"} <= set(table.columns)
    assert len(table) == 8 and table["fname"].tolist()[0] == "dev_0"

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert "max_new_tokens" in [p.name for p in model.metadata.signature.params.params]
    frame = table[["fname", "dialogue"]].head(3)
    summaries = model.predict(frame, params={"max_new_tokens": 24})
    assert len(summaries) == 3 and all(isinstance(s, str) and s for s in summaries)
    assert any(HANGUL.search(s) for s in summaries), summaries
    assert model.predict(frame["dialogue"].tolist(), params={"max_new_tokens": 24}) == summaries, "a list of strings works too"


def test_qlora_causal_model_trains_in_4bit_on_cpu_and_loss_goes_down(mlflow_store, shared):
    labeled = shared("data/dialogsum-ko/labeled.csv")
    overrides = {
        "tokenizer.path": str(shared("tokenizers/qwen3")),
        "prompt.format": "chat",
        "training.epochs": 3,
        "training.batch_size": 4,
        "training.max_train_samples": 8,
        "training.max_eval_samples": 2,
        "training.max_source_length": 192,
        "training.log_every_n_steps": 1,
        "training.learning_rate": 5e-3,
        "generation.max_new_tokens": 8,
    }
    run_id = train_model("qwen3-tiny-qlora", train_path=labeled, eval_path=labeled, overrides=overrides)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.params["model.quantized_linear_layers"]) > 0, "base linear layers are bitsandbytes 4-bit"
    assert run.data.params["quantization"] == "4bit"
    losses = [v for _, v in _history(run_id, "train_loss")]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    assert [s for s, _ in _history(run_id, "eval_final")] == [1, 2, 3]


def test_failure_is_a_failed_run_with_error_artifacts(mlflow_store, shared):
    labeled = shared("data/dialogsum-ko/labeled.csv")
    overrides = {"architecture.hidden_size": 65, "training.max_train_samples": 8}  # 65 is not divisible by 4 heads
    with pytest.raises(Exception, match="hidden size"):
        train_model("llama-tiny", train_path=labeled, eval_path=labeled, overrides=overrides)
    run = mlflow.search_runs(output_format="list", experiment_names=["dialogsum"])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["dialogsum.status"] == "failed"
    assert run.data.tags["error.stage"] == "load"
    assert run.data.tags["error.type"]
    error = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="errors/error.json")).read_text())
    assert error["stage"] == "load" and "hidden size" in error["message"]
    traceback_path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="errors/traceback.txt")
    assert "Traceback" in Path(traceback_path).read_text()


def test_hub_model_offline_fails_fast_with_a_clear_reason(mlflow_store, shared, monkeypatch):
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
    assert elapsed < 60, f"offline failure took {elapsed:.1f} s"


def test_sigterm_marks_the_run_killed(mlflow_store, shared):
    labeled = shared("data/dialogsum-ko/labeled.csv")
    mlflow.set_experiment("dialogsum")  # create the store first: polling a half-migrated SQLite file races
    process = subprocess.Popen(
        [sys.executable, "-m", "dialogsum", "train", "--model", "kobart-tiny", "--train-data", str(labeled),
         "--eval-data", str(labeled), "--epochs", "50", "--max-eval-samples", "4",
         "--set", f"tokenizer.path={shared('tokenizers/kobart')}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline:
        runs = mlflow.search_runs(output_format="list", experiment_names=["dialogsum"])
        if runs and mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "train_loss"):
            break
        time.sleep(1)
    else:
        process.kill()
        pytest.fail("training never started logging")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    run = mlflow.get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["dialogsum.status"] == "killed"
    assert run.data.tags["error.type"] == "Terminated"


def test_mlflow_run_entry_point_trains_kobart_tiny(mlflow_store):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    result = subprocess.run(
        ["mlflow", "run", str(REPO), "-e", "train", "-P", "model=kobart-tiny", "--env-manager", "local"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1, "train logs into the run that `mlflow run` created"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["dialogsum.kind"] == "train"
    assert [s for s, _ in _history(run.info.run_id, "eval_final")] == [1, 2]
