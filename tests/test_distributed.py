"""`accelerate launch` with two CPU processes (torchrun, gloo) trains with DDP and logs exactly one MLflow run from
the main process, with the same metric and param keys as a single-process training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tracking_server import free_port

from dialogsum.data import sample_data_path
from dialogsum.training.recipe import EPOCH_METRICS

PROCESSES = 2
EPOCHS = 2
TRAIN_ROWS = 32
EVAL_ROWS = 4
BATCHES = TRAIN_ROWS // 8  # kobart-tiny's batch size is 8
TIMEOUT_S = 900


def _train_args() -> list[str]:
    return ["-m", "dialogsum", "train", "--model", "kobart-tiny", "--train-data", str(sample_data_path("train")),
            "--validation-data", str(sample_data_path("dev")), "--epochs", str(EPOCHS), "--max-train-samples", str(TRAIN_ROWS),
            "--max-validation-samples", str(EVAL_ROWS), "--set", "generation.max_new_tokens=16",
            "--set", "training.log_every_n_steps=1", "--set", "training.warmup_steps=0"]  # fmt: skip


def _launch(command: list[str], folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # CPU processes (gloo) even on a GPU machine, so the test means the same everywhere.
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, deadline: float) -> str:
    try:
        out, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, f"exited with {process.returncode}:\n{out[-5000:]}"
    return out


@pytest.fixture(scope="module")
def trainings(tmp_path_factory: pytest.TempPathFactory, slowdown: float) -> dict[str, tuple[MlflowClient, str]]:
    """The same tiny training launched on 2 processes and, at the same time, on one; each in its own SQLite store."""
    args = _train_args()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]  # fmt: skip
    folders = {"distributed": tmp_path_factory.mktemp("ddp"), "single": tmp_path_factory.mktemp("single")}
    processes = {
        "distributed": _launch(launcher + args, folders["distributed"]),
        "single": _launch([sys.executable, *args], folders["single"]),
    }
    deadline = time.monotonic() + TIMEOUT_S * slowdown
    outputs = {name: _finish(process, deadline) for name, process in processes.items()}
    return {name: (MlflowClient(f"sqlite:///{folders[name] / 'mlflow.db'}"), outputs[name]) for name in processes}


def _only_run(client: MlflowClient):
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1, [(r.info.run_id, r.info.run_name) for r in runs]
    return runs[0]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_two_process_training_logs_exactly_one_run(trainings):
    client, output = trainings["distributed"]
    run = _only_run(client)
    assert run.info.status == "FINISHED" and run.data.tags["dialogsum.status"] == "succeeded"
    assert run.data.params["runtime.num_processes"] == str(PROCESSES)
    assert output.count("per-epoch validation") == 1  # the summary is printed by the main process only


def test_two_process_training_logs_per_epoch_rouge_once_per_epoch(trainings):
    client, _ = trainings["distributed"]
    run_id = _only_run(client).info.run_id
    for key in EPOCH_METRICS:
        assert [step for step, _ in _history(client, run_id, key)] == list(range(1, EPOCHS + 1)), key
    steps_per_process = BATCHES // PROCESSES * EPOCHS
    assert [step for step, _ in _history(client, run_id, "train_loss")] == list(range(1, steps_per_process + 1))
    table = json.loads(Path(client.download_artifacts(run_id, "predictions.json")).read_text(encoding="utf-8"))
    assert len(table["data"]) == EVAL_ROWS


def test_two_process_learning_rate_decays_over_the_whole_training(trainings):
    """The prepared scheduler steps once per process per optimizer step; it must still reach 0 only at the end."""
    client, _ = trainings["distributed"]
    rates = [value for _, value in _history(client, _only_run(client).info.run_id, "learning_rate")]
    assert all(rate > 0 for rate in rates[:-1]) and rates[-1] == pytest.approx(0.0), rates
    assert rates == sorted(rates, reverse=True)


def test_two_process_run_has_the_single_process_schema(trainings):
    (ddp_client, _), (single_client, _) = trainings["distributed"], trainings["single"]
    ddp, single = _only_run(ddp_client), _only_run(single_client)
    assert ddp.data.metrics.keys() == single.data.metrics.keys()
    assert ddp.data.params.keys() == single.data.params.keys()
    assert single.data.params["runtime.num_processes"] == "1"
    assert {a.path for a in ddp_client.list_artifacts(ddp.info.run_id)} == {a.path for a in single_client.list_artifacts(single.info.run_id)}


def test_validation_is_split_between_processes_and_scores_as_one_process_does(trainings, tmp_path):
    """Each process generated half of the validation rows; the gathered scores of the last epoch equal a
    single-process validation of the same weights (the run's last checkpoint) on the same rows."""
    from accelerate import Accelerator
    from rich.progress import Progress
    from safetensors.torch import load_file

    from dialogsum.data import load_data_roles
    from dialogsum.features import build_collator, tokenize_rows
    from dialogsum.serving import saved_model
    from dialogsum.training.recipe import validate

    client, _ = trainings["distributed"]
    run = _only_run(client)
    assert run.data.params["runtime.generation_rows_per_process"] == f"{EVAL_ROWS // 2},{EVAL_ROWS // 2}"
    folder = Path(client.download_artifacts(run.info.run_id, "checkpoints", str(tmp_path)))
    model, tokenizer, cfg = saved_model.load(folder / "best")
    missing, unexpected = model.load_state_dict(load_file(folder / "last" / "state" / "model.safetensors"), strict=False)
    assert not unexpected and all("embed_tokens" in k or "lm_head" in k for k in missing), missing  # tied to `shared`
    roles = load_data_roles(sample_data_path("train"), sample_data_path("dev"), None, limits=(TRAIN_ROWS, EVAL_ROWS, None))
    rows = roles.validation
    val_set = tokenize_rows(cfg, tokenizer, rows.dialogues, rows.summaries)
    with Progress(disable=True) as progress:
        single = validate(model, tokenizer, cfg, val_set, rows, build_collator(cfg, tokenizer), Accelerator(cpu=True), progress)
    for key in ("val_final", "val_rouge1", "val_loss", "val_gen_len"):
        logged = dict(_history(client, run.info.run_id, key))[EPOCHS]
        assert single.metrics[key] == pytest.approx(logged, rel=1e-5, abs=1e-6), key
