"""`dialogsum tune` with several worker processes on one PostgreSQL study (real processes, real PostgreSQL): the cap
over workers, one parent, and a worker killed with `kill -9` whose trial is failed (`WorkerLost`) and retried."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from test_tune import SPACE, _children, _study
from tracking_server import ensure_postgres, fresh_database

from dialogsum.sweeps.tune import STUDY_TAG, TRIAL_TAG, trial_runs
from dialogsum.tracking import KIND_TAG


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(SPACE, encoding="utf-8")
    return path


def _worker(space_file: Path, storage: str, trials: int, cwd: Path, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "dialogsum", "tune", "--model", "kobart-tiny", "--space", str(space_file), "--trials", str(trials),
               "--study", "shared", "--storage", storage, "--pruner", "none", "--sampler", "random", "--metric", "val_loss"]  # fmt: skip
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture
def worker_env(module_store) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
            "OMP_NUM_THREADS": "1", "DIALOGSUM_TUNE_HEARTBEAT_S": "1", "DIALOGSUM_TUNE_GRACE_S": "4"}  # fmt: skip


def test_two_workers_share_one_postgresql_study_and_a_killed_workers_trial_is_failed_and_retried(space_file, module_store, worker_env, slowdown):
    ensure_postgres()
    with fresh_database("optuna") as storage:
        first = _worker(space_file, storage, 3, module_store, worker_env)
        second = _worker(space_file, storage, 3, module_store, worker_env)
        outputs = [p.communicate(timeout=600 * slowdown)[0] for p in (first, second)]
        assert first.returncode == 0 and second.returncode == 0, outputs
        parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                     filter_string=f"tags.`{STUDY_TAG}` = 'shared' and tags.`{KIND_TAG}` = 'tune'")  # fmt: skip
        assert len(parents) == 1, "the workers found one parent"
        study = _study("shared", storage)
        finished = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
        assert len(finished) == 3, "the cap holds over both workers"
        children = _children(parents[0].info.run_id)
        assert sorted(int(c.data.tags[TRIAL_TAG]) for c in children) == sorted(t.number for t in finished)

        # A worker killed in the middle of a trial: its trial FAIL (no heartbeat), its run FAILED (WorkerLost), retried.
        victim = _worker(space_file, storage, 5, module_store, worker_env)
        deadline, running = time.monotonic() + 240 * slowdown, []
        while time.monotonic() < deadline and not running:  # a trial of the victim whose training run has started
            time.sleep(0.5)
            running = [t for t in _study("shared", storage).get_trials() if t.state.name == "RUNNING" and trial_runs("shared", t.number)]
        assert running, "the victim started a trial"
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        time.sleep(6)  # past the grace period
        rescuer = _worker(space_file, storage, 5, module_store, worker_env)
        assert rescuer.communicate(timeout=600 * slowdown)[0] is not None and rescuer.returncode == 0
        lost = _study("shared", storage).trials[running[0].number]
        assert lost.state.name == "FAIL"
        [lost_run] = trial_runs("shared", lost.number)
        assert lost_run.info.status == "FAILED" and lost_run.data.tags["error.type"] == "WorkerLost"
        retried = [t for t in _study("shared", storage).get_trials() if optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) == lost.number]
        assert retried and retried[0].params == lost.params and retried[0].state.name == "COMPLETE"
