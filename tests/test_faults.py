"""The fault suite: real processes, real signals, a real tracking server killed and restarted, a real full disk.

- `kill -9` in epoch 3 of 4, then `train --resume`: the same run finishes, each epoch's metrics logged once, and
  its final weights equal an uninterrupted run's (dropout on, so the restored RNG states matter).
- SIGTERM to a pipeline during its first training: within grace + 5 s (the 5 s × the machine's `slowdown`) nothing of
  it is left: not the pipeline, no process carrying its marker ($DIALOGSUM_PIPELINE); no run is RUNNING;
  `pipeline --resume` continues that training from its checkpoint.
- The tracking server is killed mid-training and restarted: the training completes with every metric, or ends
  FAILED with a local checkpoint that `--resume` continues. It never hangs.
- The artifact store is a full tmpfs: the run ends FAILED naming the cause.

The only instrumentation: the `kill -9` test's training process wraps `train_epoch` so the SIGKILL lands at a
known point (the second step of epoch 3); the kill itself is a real SIGKILL of a real process.

Waits for a command or an event are bounded by hang guards (`HANG_S`) times the machine's `slowdown` (tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file
from tracking_server import free_port, mlflow_server

from dialogsum.config import ROW_LIMITS
from dialogsum.data import read_dialogues, sample_data_path, write_dialogues
from dialogsum.pipeline.executors import describe_process, marked_processes, process_alive
from dialogsum.pipeline.orchestrator import INTERRUPTED_REASON
from dialogsum.tracking import PIPELINE_ENV
from dialogsum.training.checkpoints import CHECKPOINT_EPOCH_TAG, checkpoint_root
from dialogsum.training.recipe import RESUMED_FROM_TAG

EPOCHS = 4
HANG_S = 400  # a command or an event that has not come by then (times `slowdown`) never will
GRACE_S = 5  # the interrupted pipeline's timeouts.grace
SHUTDOWN_S = 5  # after the grace period, what the contract allows a stopped pipeline to finish in ("grace + 5 s")
TRAIN_ROWS = 24  # 3 steps per epoch at kobart-tiny's batch size of 8
DATA_ARGS = ["--train-data", str(sample_data_path("train")), "--validation-data", str(sample_data_path("dev"))]
TRAIN_ARGS = ["train", "--model", "kobart-tiny", *DATA_ARGS, "--epochs", str(EPOCHS), "--max-train-samples",
              str(TRAIN_ROWS), "--max-validation-samples", "4", "--set", "generation.max_new_tokens=4",
              "--set", "generation.num_beams=1", "--set", "training.log_every_n_steps=1",
              "--set", "architecture.dropout=0.1"]  # fmt: skip
# Slower epochs (batch size 1: 48 steps) for the tests that act from outside while a training runs.
SLOW_OVERRIDES = {"training.epochs": 3, "training.batch_size": 1, "training.max_train_samples": 48,
                  "training.max_validation_samples": 4, "generation.max_new_tokens": 4, "generation.num_beams": 1}  # fmt: skip
KILL_IN_EPOCH_3 = """
import os, signal, sys
import dialogsum.training.recipe as recipe

real_train_epoch, epochs = recipe.train_epoch, []

def train_epoch(model, loader, optimizer, scheduler, accelerator, max_grad_norm, on_step):
    epochs.append(1)
    steps = []

    def on_step_then_die(loss, synced):
        on_step(loss, synced)
        steps.append(1)
        if len(epochs) == 3 and len(steps) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    return real_train_epoch(model, loader, optimizer, scheduler, accelerator, max_grad_norm, on_step_then_die)

recipe.train_epoch = train_epoch
from dialogsum.cli import app
sys.argv = ["dialogsum", *sys.argv[1:]]
app()
"""


def _env(tmp_path: Path, uri: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri or f"sqlite:///{tmp_path / 'mlflow.db'}", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **extra)  # fmt: skip
    return env


def _dialogsum(args: list[str], tmp_path: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dialogsum", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _final_weights(client: MlflowClient, run_id: str, folder: Path):
    path = client.download_artifacts(run_id, "checkpoints/last/state/model.safetensors", str(folder))
    return load_file(path)


def _wait_for(condition, timeout: float, what: str, process: subprocess.Popen, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {what}:\n{process.stdout.read()[-3000:]}")
        found = condition()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _checkpointed_training(client: MlflowClient, experiment: str = "dialogsum"):
    """A RUNNING training run that has logged its first checkpoint, or None."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], "tags.`dialogsum.kind` = 'train' and attributes.status = 'RUNNING'")
    return next((r for r in runs if CHECKPOINT_EPOCH_TAG in r.data.tags), None)


def test_kill_9_in_epoch_3_then_resume_finishes_the_same_run_with_an_uninterrupted_runs_weights(tmp_path: Path, slowdown: float):
    env = _env(tmp_path)
    hang_s = HANG_S * slowdown
    uri = env["MLFLOW_TRACKING_URI"]
    whole = subprocess.Popen([sys.executable, "-m", "dialogsum", *TRAIN_ARGS], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", KILL_IN_EPOCH_3, *TRAIN_ARGS], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=hang_s)  # fmt: skip
    whole_output, _ = whole.communicate(timeout=hang_s)
    assert whole.returncode == 0, whole_output[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dialogsum").experiment_id])
    interrupted = next(r for r in runs if r.info.status == "RUNNING")  # a SIGKILL leaves no chance to close it
    reference = next(r for r in runs if r.info.status == "FINISHED")
    run_id = interrupted.info.run_id
    assert interrupted.data.tags[CHECKPOINT_EPOCH_TAG] == "2"
    assert _steps(client, run_id, "val_final") == [1, 2]

    refused = _dialogsum(["train", "--resume", run_id, *DATA_ARGS, "--set", "training.learning_rate=0.5"], tmp_path, env, hang_s)
    assert refused.returncode == 1
    assert "in 1 key(s): training.learning_rate: 0.001 → 0.5" in " ".join(refused.stderr.split()), refused.stderr
    other_rows = _dialogsum(["train", "--resume", run_id, "--train-data", str(sample_data_path("dev")),
                             "--validation-data", str(sample_data_path("train"))], tmp_path, env, hang_s)  # fmt: skip
    assert other_rows.returncode == 1 and "data.training.file_digest" in other_rows.stderr, other_rows.stderr
    assert client.get_run(run_id).info.status == "RUNNING", "a refused resume leaves the run as it was"

    shutil.rmtree(checkpoint_root(run_id))  # as on another machine: the checkpoints come from the run's artifacts
    resumed = _dialogsum(["train", "--resume", run_id, *DATA_ARGS], tmp_path, env, hang_s)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dialogsum.status"] == "succeeded"
    assert run.data.tags[RESUMED_FROM_TAG] == "2" and "error.type" not in run.data.tags
    for key in ("val_final", "val_loss", "epoch_time_s"):
        assert _steps(client, run_id, key) == [1, 2, 3, 4], key
    steps_per_epoch = TRAIN_ROWS // 8
    assert _steps(client, run_id, "train_loss") == list(range(1, EPOCHS * steps_per_epoch + 1)), "each step logged once"

    mine, theirs = _final_weights(client, run_id, tmp_path / "a"), _final_weights(client, reference.info.run_id, tmp_path / "b")
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert mine[name].allclose(tensor, atol=1e-6), name
    for key in ("val_final", "val_loss"):
        ours = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        reference_values = [m.value for m in sorted(client.get_metric_history(reference.info.run_id, key), key=lambda m: m.step)]
        assert ours == pytest.approx(reference_values, abs=1e-6), key
    assert not checkpoint_root(run_id).exists(), "the local checkpoints are removed once the run ends well"


def _first_rows(folder: Path, split: str, n: int) -> Path:
    return write_dialogues(read_dialogues(sample_data_path(split)).head(n), folder / f"{split}-{n}.csv")


def _pipeline_config(tmp_path: Path) -> Path:
    config = {
        "name": "interrupted",
        "data": {"train": str(sample_data_path("train")), "validation": str(_first_rows(tmp_path, "dev", 4))},
        "models": [{"name": "kobart-tiny", "overrides": {k: v for k, v in SLOW_OVERRIDES.items() if k not in ROW_LIMITS}},
                   {"name": "llama-tiny", "overrides": {"training.epochs": 1, "training.max_train_samples": 8,
                                                        "generation.max_new_tokens": 4}}],
        "steps": ["train"],
        "timeouts": {"grace": GRACE_S},
    }  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def pipeline_marker(started: list[psutil.Process]) -> str:
    """The marker ($DIALOGSUM_PIPELINE) a pipeline gave the processes it started, read from their environments (the
    pipeline set it on itself after it started: its own does not show it); each must carry the same one."""
    markers = {p.pid: p.environ().get(PIPELINE_ENV) for p in started}
    assert started and len(set(markers.values())) == 1 and None not in markers.values(), f"pid → marker: {markers}"
    return next(iter(markers.values()))


def left_after_signal(pipeline: subprocess.Popen, sig: signal.Signals, watched: list[psutil.Process], marker: str,
                      bound_s: float) -> tuple[str, float, list[str]]:  # fmt: skip
    """Send `sig` to `pipeline` and watch it stop: (its output, seconds from the signal until nothing of it was left or
    `bound_s` passed, what of it was still alive then: any of `watched` (the pipeline among them), any process
    carrying `marker`)."""
    start = time.monotonic()
    pipeline.send_signal(sig)
    try:
        output, _ = pipeline.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        output = None
    while True:
        left = {p.pid: p for p in [*watched, *marked_processes(marker)] if process_alive(p)}
        if not left or time.monotonic() - start >= bound_s:
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - start
    described = [describe_process(p) for p in left.values()]
    if output is None:
        pipeline.kill()
        output, _ = pipeline.communicate()
    return output, elapsed, described


def test_sigterm_to_a_pipeline_leaves_no_process_and_no_running_run_and_resume_continues(tmp_path: Path, slowdown: float, slowdown_now):
    env = _env(tmp_path)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    pipeline = subprocess.Popen([sys.executable, "-m", "dialogsum", "pipeline", "--config", str(_pipeline_config(tmp_path))],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        training = _wait_for(lambda: _checkpointed_training(client), HANG_S * slowdown, "the first training's first checkpoint", pipeline)
        family = [psutil.Process(pipeline.pid), *psutil.Process(pipeline.pid).children(recursive=True)]
        assert len(family) >= 2, "the training runs in a process of its own"
        marker = pipeline_marker(family[1:])
        assert {p.pid for p in family[1:]} <= {p.pid for p in marked_processes(marker)}, "found by the marker"
        load = slowdown_now()  # with the training running, as it loads the machine while the pipeline stops
        bound_s = GRACE_S + SHUTDOWN_S * load
        output, elapsed, left = left_after_signal(pipeline, signal.SIGTERM, family, marker, bound_s)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    print(f"SIGTERM: nothing of the pipeline left after {elapsed:.1f} s (bound {bound_s:.1f} s, slowdown {load:.2f})")
    assert not left, (f"alive {bound_s:.1f} s after SIGTERM (grace {GRACE_S} s + {SHUTDOWN_S} s × slowdown {load:.2f}): "
                      + "; ".join(left) + "\n" + output[-3000:])  # fmt: skip
    assert pipeline.returncode == 130, output[-3000:]
    assert "continue with: dialogsum pipeline --resume" in " ".join(output.split())
    assert "left behind" not in output, "every process ended on its own: the pipeline's last resort found none"

    experiment = client.get_experiment_by_name("dialogsum").experiment_id
    runs = client.search_runs([experiment])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parent = next(r for r in runs if r.data.tags["dialogsum.kind"] == "pipeline")
    assert parent.info.status == "KILLED"
    stopped = client.get_run(training.info.run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags["error.type"] == "Interrupted"
    assert "log tail" in stopped.data.tags["dialogsum.reason"]
    never_started = next(r for r in runs if r.data.tags.get("dialogsum.model") == "llama-tiny")
    assert never_started.data.tags["dialogsum.status"] == "skipped"
    assert never_started.data.tags["dialogsum.reason"] == INTERRUPTED_REASON
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    resumed = _dialogsum(["pipeline", "--resume", parent.info.run_id], tmp_path, env, HANG_S * slowdown)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    continued = client.get_run(training.info.run_id)
    assert continued.info.status == "FINISHED" and continued.data.tags["dialogsum.status"] == "succeeded"
    assert continued.data.tags[RESUMED_FROM_TAG] == stopped.data.tags[CHECKPOINT_EPOCH_TAG]
    said = " ".join(resumed.stderr.split())
    assert said.count("train kobart-tiny →") == 1, "one line when the resumed training starts"
    assert f"train kobart-tiny → resuming run {training.info.run_id} from epoch {stopped.data.tags[CHECKPOINT_EPOCH_TAG]}" in said
    assert _steps(client, training.info.run_id, "val_final") == [1, 2, 3]
    trained = client.search_runs([experiment], "tags.`dialogsum.model` = 'llama-tiny' and tags.`dialogsum.status` = 'succeeded'")
    assert len(trained) == 1


def test_tracking_server_killed_mid_training_then_restarted(tmp_path: Path, slowdown: float):
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    port = free_port()
    with mlflow_server(backend, tmp_path / "server", port=port) as server:
        env = _env(tmp_path, server.uri, DIALOGSUM_CLOSE_BUDGET_S="120")
        client = MlflowClient(server.uri)
        args = ["train", "--model", "kobart-tiny", *DATA_ARGS,
                *[arg for k, v in SLOW_OVERRIDES.items() for arg in ("--set", f"{k}={v}")]]  # fmt: skip
        training = subprocess.Popen([sys.executable, "-m", "dialogsum", *args], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        run = _wait_for(lambda: _checkpointed_training(client), HANG_S * slowdown, "the training's first checkpoint", training)
        os.killpg(server.pid, signal.SIGKILL)
    time.sleep(3)
    with mlflow_server(backend, tmp_path / "server", port=port):
        try:
            output, _ = training.communicate(timeout=HANG_S * slowdown)  # never hangs
        finally:
            if training.poll() is None:
                training.kill()
        run_id = run.info.run_id
        after = client.get_run(run_id)
        assert after.info.status in ("FINISHED", "FAILED"), after.info.status
        if after.info.status == "FINISHED":  # the server was back within MLflow's retry budget
            assert training.returncode == 0, output[-3000:]
        else:  # ended FAILED with a clear error; the local checkpoint continues it
            assert training.returncode == 1, output[-3000:]
            assert after.data.tags["error.type"] and after.data.tags["dialogsum.status"] == "failed"
            assert (checkpoint_root(run_id) / "last").is_dir()
            resumed = _dialogsum(["train", "--resume", run_id, *DATA_ARGS], tmp_path, env, HANG_S * slowdown)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            after = client.get_run(run_id)
            assert after.info.status == "FINISHED"
        assert _steps(client, run_id, "val_final") == [1, 2, 3], "never success with metrics missing"
        assert _steps(client, run_id, "train_loss") == list(range(5, 3 * 48 + 1, 5)), "every 5th step, once"


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 1 MiB tmpfs: smaller than kobart-tiny's first checkpoint. Mounting needs root (as in CI)."""
    folder = tmp_path / "tiny-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"cannot mount a tmpfs for the full-disk test: {mounted.stderr}")
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_artifact_store_ends_the_run_failed_naming_the_cause(tmp_path: Path, full_disk: Path, slowdown: float):
    env = _env(tmp_path, MLFLOW_EXPERIMENT_NAME="full-disk")
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    client.create_experiment("full-disk", artifact_location=full_disk.as_uri())
    done = _dialogsum(TRAIN_ARGS, tmp_path, env, HANG_S * slowdown)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "No space left on device" in " ".join(done.stderr.split()), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    run = client.search_runs([client.get_experiment_by_name("full-disk").experiment_id])[0]
    assert run.info.status == "FAILED" and run.data.tags["dialogsum.status"] == "failed"
    assert "No space left on device" in run.data.tags["error.message"]
    assert run.data.tags["error.stage"] in ("checkpoint", "save")
