"""The Ray executor on a real local Ray (`ray.init(num_cpus=2)`, started by this module and shut down after), with
real pipelines, real trainings, real signals and a real killed Ray worker:

- trainings run at once (their runs' working intervals overlap in the store) and one over its timeout ends FAILED
  (`StageTimeout`) while the others finish;
- a Ray worker killed with SIGKILL ends its child FAILED (`WorkerLost`, with what Ray reported); SIGTERM to the
  pipeline then cancels the rest: within grace + 5 s (× the machine's `slowdown`) neither the pipeline nor any
  process carrying its marker is left, no Ray task holds a CPU, no run is RUNNING; `--resume` on Ray finishes the
  pipeline. (While Ray waits SIGINT and SIGTERM go through one handler; SIGTERM is the one Ray used to turn into a
  SystemError.);
- `dialogsum tune --executor ray --workers 2` runs two study workers as Ray tasks on one study;
- a multi-node cluster with a SQLite store is refused before anything starts (the node count is simulated: the
  only thing here that cannot be real);
- resources: GPUs from `resources.gpus` or the memory estimate against the cluster's per-GPU memory (the GPU is
  simulated as the device the cluster reported), memory on a CPU cluster; a training asking for a GPU this cluster
  does not have fails at once (`Unschedulable`) instead of waiting forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from test_faults import HANG_S, SHUTDOWN_S, _first_rows, left_after_signal, pipeline_marker
from test_tune import SPACE

from dialogsum.config import ConfigError
from dialogsum.data import sample_data_path
from dialogsum.pipeline.executors import StageResources
from dialogsum.pipeline.orchestrator import run_pipeline
from dialogsum.pipeline.ray_executor import RayExecutor, check_tracking_for_cluster, tracking_env, without_password
from dialogsum.precision import DeviceInfo
from dialogsum.sweeps.tune import STUDY_TAG, TRIAL_TAG, TuneError, TuneSettings
from dialogsum.sweeps.workers import shared_storage
from dialogsum.tracking import KIND_TAG, STARTED_AT_TAG
from dialogsum.training.checkpoints import CHECKPOINT_EPOCH_TAG

GIB = 2**30
GRACE_S = 5  # the interrupted pipeline's timeouts.grace
RELEASE_S = 10  # how soon after a pipeline ends its Ray tasks' CPUs are free again (times `slowdown`)
FAST = {"training.epochs": 1, "training.max_train_samples": 8, "generation.max_new_tokens": 4, "generation.num_beams": 1}
# Slow enough to be stopped from outside: batch size 1, 24 steps per epoch.
SLOW = {"training.epochs": 2, "training.batch_size": 1, "training.max_train_samples": 24, "generation.max_new_tokens": 4,
        "generation.num_beams": 1}  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for this module; yields its address for pipelines in other processes."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _config(tmp_path: Path, models: list[dict], **extra) -> Path:
    config = {"name": "on-ray", "data": {"train": str(sample_data_path("train")), "validation": str(_first_rows(tmp_path, "dev", 4))},
              "models": models, "steps": ["train"], **extra}  # fmt: skip
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _children(parent_id: str) -> dict[str, list]:
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")
    grouped: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        grouped.setdefault(run.data.tags["dialogsum.model"], []).append(run)
    return grouped


def _working_interval(run) -> tuple[int, int]:
    """From the moment its task started on a worker to the run's end (the run is created when the task is submitted)."""
    return int(run.data.tags[STARTED_AT_TAG]), run.info.end_time


def _cpus_free() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def test_trainings_run_at_once_and_one_over_its_timeout_fails_while_the_others_finish(ray_cluster, mlflow_store, tmp_path, slowdown):
    half_a_cpu = {"resources.cpus": 0.5}  # three trainings at once on the module's 2 CPUs
    models = [{"name": "kobart-tiny", "overrides": {**FAST, **half_a_cpu}},
              {"name": "llama-tiny", "overrides": {**FAST, **half_a_cpu}},
              {"name": "qwen3-tiny-qlora", "timeout": 20, "overrides": {**SLOW, "training.epochs": 1000, "checkpoint.keep": "none", **half_a_cpu}}]  # fmt: skip
    parent_id = run_pipeline(_config(tmp_path, models, executor="ray", timeouts={"train": round(400 * slowdown), "grace": GRACE_S}))

    children = _children(parent_id)
    kobart, llama, qwen = (children[name][-1] for name in ("kobart-tiny", "llama-tiny", "qwen3-tiny-qlora"))
    assert kobart.data.tags["dialogsum.status"] == llama.data.tags["dialogsum.status"] == "succeeded"
    assert qwen.info.status == "FAILED" and qwen.data.tags["error.type"] == "StageTimeout", qwen.data.tags
    assert "20 s timeout" in qwen.data.tags["dialogsum.reason"]
    (a_start, a_end), (b_start, b_end) = _working_interval(kobart), _working_interval(llama)
    assert a_start < b_end and b_start < a_end, "the two trainings worked at the same time"
    assert any(f.path.startswith("logs/") for f in mlflow.MlflowClient().list_artifacts(qwen.info.run_id, "logs")), "the worker logged the stage's log"
    assert mlflow.get_run(parent_id).data.params["executor"] == "ray"
    _await_cpus_free(RELEASE_S * slowdown)
    assert _cpus_free() == 2, "no task holds a CPU after the pipeline"


def _await_cpus_free(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _cpus_free() < 2 and time.monotonic() < deadline:
        time.sleep(0.5)


def _stage_processes(tracking_uri: str) -> dict[str, psutil.Process]:
    """`dialogsum train` processes logging into `tracking_uri`, by run id."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = p.info["cmdline"] or []
            if "dialogsum" in cmdline and "train" in cmdline and p.environ().get("MLFLOW_TRACKING_URI") == tracking_uri:
                found[p.environ()["MLFLOW_RUN_ID"]] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            pass
    return found


def _wait(condition, timeout: float, what: str, process: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(f"the pipeline ended before {what}: {process.stdout.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def test_a_lost_worker_fails_its_child_sigterm_cancels_the_rest_and_resume_finishes(ray_cluster, tmp_path, slowdown, slowdown_now):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    # kobart is killed while it starts; llama trains long enough (3 epochs after its first checkpoint) to be
    # interrupted mid-training whatever the machine's load
    config = _config(tmp_path, [{"name": "kobart-tiny", "overrides": {**SLOW, "training.epochs": 1}}, {"name": "llama-tiny", "overrides": {**SLOW, "training.epochs": 4}}],
                     timeouts={"grace": GRACE_S})  # the YAML says local; the command line says ray
    command = [sys.executable, "-m", "dialogsum", "pipeline", "--config", str(config), "--executor", "ray", "--ray-address", ray_cluster]
    # the client creates the store's tables now: MLflow migrates a fresh SQLite store without a lock, so a client
    # opened while the pipeline creates them can break the pipeline's migration
    client = mlflow.MlflowClient(uri)
    pipeline = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    hang_s = HANG_S * slowdown
    try:
        stages = _wait(lambda: (found := _stage_processes(uri)) and len(found) == 2 and found, hang_s, "two training processes", pipeline)
        marker = pipeline_marker(list(stages.values()))
        by_model = {client.get_run(run_id).data.tags["dialogsum.model"]: (run_id, p) for run_id, p in stages.items()}
        lost_run, lost_stage = by_model["kobart-tiny"]
        lost_stage.parent().kill()  # the Ray worker running kobart's task: SIGKILL
        lost = _wait(lambda: (r := client.get_run(lost_run)).data.tags.get("error.type") == "WorkerLost" and r, hang_s,
                     "the lost worker's child to be closed", pipeline)  # fmt: skip
        died = lost_stage.wait(timeout=GRACE_S + SHUTDOWN_S * slowdown)  # SIGTERM from the kernel when its worker died
        assert died is not None or not lost_stage.is_running(), "the stage died with its worker"
        running_run, running_stage = by_model["llama-tiny"]
        _wait(lambda: CHECKPOINT_EPOCH_TAG in client.get_run(running_run).data.tags, hang_s, "llama's first checkpoint", pipeline)
        assert client.get_run(running_run).info.status == "RUNNING", "llama is still training when the pipeline is interrupted"
        watched = [psutil.Process(pipeline.pid), running_stage]
        load = slowdown_now()  # with llama training, as it loads the machine while the pipeline stops
        bound_s = GRACE_S + SHUTDOWN_S * load
        output, elapsed, left = left_after_signal(pipeline, signal.SIGTERM, watched, marker, bound_s)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
    print(f"SIGTERM: nothing of the pipeline left after {elapsed:.1f} s (bound {bound_s:.1f} s, slowdown {load:.2f})")
    assert not left, (f"alive {bound_s:.1f} s after SIGTERM (grace {GRACE_S} s + {SHUTDOWN_S} s × slowdown {load:.2f}): "
                      + "; ".join(left) + "\n" + output[-3000:])  # fmt: skip
    assert pipeline.returncode == 130, output[-3000:]
    assert "left behind" not in output, "every process ended on its own: the pipeline's last resort found none"
    assert lost.info.status == "FAILED" and "Ray: " in lost.data.tags["error.message"], lost.data.tags
    runs = client.search_runs([client.get_experiment_by_name("dialogsum").experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], "no RUNNING run"
    interrupted = client.get_run(running_run)
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["error.type"] == "Interrupted"
    assert not _stage_processes(uri), "no stage process left"
    _await_cpus_free(RELEASE_S * slowdown)
    assert _cpus_free() == 2, "no Ray task left"

    parent = next(r for r in runs if r.data.tags[KIND_TAG] == "pipeline")
    assert parent.info.status == "KILLED"
    resumed = subprocess.run([sys.executable, "-m", "dialogsum", "pipeline", "--resume", parent.info.run_id, "--executor", "ray",
                              "--ray-address", ray_cluster], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=hang_s)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    latest = {model: runs[-1] for model, runs in _children(parent.info.run_id).items()}
    assert {m: r.data.tags["dialogsum.status"] for m, r in latest.items()} == {"kobart-tiny": "succeeded", "llama-tiny": "succeeded"}
    assert latest["llama-tiny"].info.run_id == running_run, "the interrupted training continued in its own run, from its checkpoint"


def test_tune_runs_its_workers_as_ray_tasks_on_one_study(ray_cluster, mlflow_store, tmp_path, slowdown):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "dialogsum", "tune", "--executor", "ray", "--ray-address", ray_cluster, "--workers", "2",
                             "--model", "kobart-tiny", "--space", str(space), "--trials", "2", "--study", "on-ray", "--pruner", "none",
                             "--sampler", "random", "--seed", "1", "--metric", "val_loss", "--set", "training.epochs=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S * slowdown)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worker-0: done" in result.stderr and "worker-1: done" in result.stderr
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string=f"tags.`{STUDY_TAG}` = 'on-ray' and tags.`{KIND_TAG}` = 'tune'")  # fmt: skip
    assert len(parents) == 1, "the workers found one parent"
    trials = _children(parents[0].info.run_id)["kobart-tiny"]
    finished = [t for t in trials if t.data.tags["dialogsum.status"] == "succeeded"]
    assert len(finished) == 2 and len({t.data.tags[TRIAL_TAG] for t in finished}) == 2, "two distinct trials, the cap held"


def test_a_multi_node_cluster_with_a_sqlite_store_is_refused_before_anything_starts(ray_cluster, mlflow_store, tmp_path, monkeypatch):
    # Simulated: this machine is one node; the check only counts the nodes Ray reports alive.
    monkeypatch.setattr(RayExecutor, "alive_nodes", staticmethod(lambda: [{"Alive": True}, {"Alive": True}]))
    with pytest.raises(ConfigError, match="2 nodes.*sqlite.*MLFLOW_TRACKING_URI"):
        run_pipeline(_config(tmp_path, [{"name": "kobart-tiny", "overrides": FAST}], executor="ray"))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == [], "nothing started"
    with pytest.raises(ConfigError, match="artifacts"):
        check_tracking_for_cluster("postgresql://db/mlflow", "/home/me/mlruns/1", nodes=3)
    check_tracking_for_cluster("http://tracking:5000", "mlflow-artifacts:/1", nodes=3)


def test_a_stage_no_node_could_run_fails_at_once_instead_of_waiting_forever(ray_cluster, mlflow_store, tmp_path):
    parent_id = run_pipeline(_config(tmp_path, [{"name": "kobart-tiny", "overrides": {**FAST, "resources.gpus": 1}}], executor="ray"))
    child = _children(parent_id)["kobart-tiny"][-1]
    assert child.info.status == "FAILED" and child.data.tags["error.type"] == "Unschedulable"
    assert child.data.tags["error.message"].startswith("no node of the Ray cluster has CPU 1, GPU 1 (nodes: CPU 2")


def test_credentials_stay_out_of_task_arguments_and_a_study_shared_across_nodes_needs_a_database():
    assert without_password("http://me:s3cret@tracking:5000/") == "http://me@tracking:5000/"
    assert without_password("postgresql://me:s3cret@db/mlflow") == "postgresql://me@db/mlflow"
    assert without_password("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    shared = {"MLFLOW_TRACKING_URI": "http://me@tracking:5000/"}
    assert tracking_env({"MLFLOW_TRACKING_URI": "http://me:s3cret@tracking:5000/"}, shared)["MLFLOW_TRACKING_URI"].endswith("s3cret@tracking:5000/"), \
        "a node with its own credentials for the same server keeps them"  # fmt: skip
    assert tracking_env({"MLFLOW_TRACKING_URI": "http://other:5000"}, shared) == shared

    settings = TuneSettings(model="kobart-tiny", space="kobart-tiny", trials=2, storage="postgresql://me:s3cret@db/optuna")
    with pytest.raises(TuneError, match="password"):
        shared_storage(settings, "study", nodes=1)
    with pytest.raises(TuneError, match="2 nodes"):
        shared_storage(TuneSettings(model="kobart-tiny", space="kobart-tiny", trials=2), "study", nodes=2)
    assert shared_storage(TuneSettings(model="kobart-tiny", space="kobart-tiny", trials=2), "s", nodes=1).startswith("journal:/")


def test_stage_resources_from_config_estimate_and_the_clusters_device(ray_cluster):
    executor = RayExecutor(grace_s=5, address=None)
    cpu = executor.device()
    assert cpu.kind == "cpu", "the cluster reported its device"
    on_cpu = executor.resources("train", None, 2.0, estimate_bytes=3 * GIB)
    assert on_cpu == StageResources(cpus=2.0, gpus=0.0, memory_bytes=3 * GIB), "a CPU training asks for its estimate as memory"
    assert executor.unschedulable(StageResources(cpus=1, gpus=1)).startswith("no node of the Ray cluster has CPU 1, GPU 1")
    assert executor.unschedulable(StageResources(cpus=2, memory_bytes=GIB)) is None

    executor._device = DeviceInfo("cuda", "H200", True, 140 * GIB, 139 * GIB)  # as a GPU cluster would report it
    assert executor.resources("train", None, 1.0, estimate_bytes=200 * GIB).gpus == 2, "200 GiB needs two 140 GiB GPUs"
    assert executor.resources("train", None, 1.0, estimate_bytes=20 * GIB) == StageResources(cpus=1.0, gpus=1.0)
    assert executor.resources("train", 4, 1.0, estimate_bytes=20 * GIB).gpus == 4, "resources.gpus wins"
    assert executor.resources("optimize").gpus == 1 and executor.resources("register").gpus == 0
