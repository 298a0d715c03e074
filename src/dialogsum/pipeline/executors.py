"""Where a pipeline's stages run. A stage is one `python -m dialogsum <command>` logging into a child run the
orchestrator created (`$MLFLOW_RUN_ID`); an executor runs a list of them and reports each one's end.

`LocalExecutor` runs them one after another on this machine; `dialogsum.pipeline.ray_executor.RayExecutor` runs
them as Ray tasks, at the same time where resources allow. Both run each stage through `run_stage_process`: the
command in a process group of its own, its output in a log that is logged to the run (`logs/`). A stage that
outlives its timeout, and a running stage when the pipeline itself gets SIGINT or SIGTERM, are stopped the same
way: SIGTERM to the whole process group (the stage ends its run KILLED and a DDP launch takes its workers down),
SIGKILL to whatever is left after the grace period. The stage process also gets SIGTERM if the process that started
it dies (Linux `PR_SET_PDEATHSIG`), so nothing of a stage outlives what runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dialogsum.tracking import Terminated

LOG_TAIL_CHARS = 2000
LOG_ARTIFACT_DIR = "logs"


@dataclass(frozen=True)
class StageResources:
    """What a stage asks of a Ray cluster (the local executor runs one stage at a time and ignores it)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_bytes: int | None = None


@dataclass(eq=False)  # a stage is itself: two stages are never equal
class Stage:
    """One command to run. `run_id` is set when the stage starts (its child run is created then), or before for a
    resumed training that continues its own run. `group` names a concurrency cap (`train`: `max_concurrency`)."""

    kind: str
    name: str
    command: list[str]
    timeout_s: float | None
    resources: StageResources = field(default_factory=StageResources)
    group: str | None = None
    run_id: str | None = None
    resumed_from_epoch: int | None = None  # a resumed training: the epoch of the checkpoint it continues from


@dataclass
class StageProcess:
    """How a stage ended. `error` is set when the executor, not the command, failed it: (error type, message),
    e.g. ("WorkerLost", what Ray reported)."""

    returncode: int
    timed_out: bool
    elapsed_s: float
    log_tail: str = ""
    error: tuple[str, str] | None = None


class Interrupted(KeyboardInterrupt):
    """The pipeline was interrupted (SIGINT/SIGTERM) while stages ran; they have been stopped. `log_tails`: run id ->
    the stopped stage's log tail, where the executor has it. A KeyboardInterrupt, so the pipeline's run ends KILLED
    like any interrupted run."""

    def __init__(self, message: str, log_tails: dict[str, str]):
        super().__init__(message)
        self.log_tails = log_tails


class StageStopped(KeyboardInterrupt):
    """Raised by `run_stage_process` when it was interrupted and has stopped its stage; carries the log tail."""

    def __init__(self, message: str, log_tail: str):
        super().__init__(message)
        self.log_tail = log_tail


Started = Callable[[Stage], None]
Finished = Callable[[Stage, StageProcess], None]


def log_tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:] if path.is_file() else ""


def run_stage_process(command: list[str], env: dict[str, str], timeout_s: float | None, grace_s: float, log_path: Path,
                      run_id: str | None) -> StageProcess:  # fmt: skip
    """Run `python -m dialogsum <command>` with `env` (plus `MLFLOW_RUN_ID=run_id`) to its end or its timeout, its
    output in `log_path`, then log that file to the run under `logs/`. On SIGINT/SIGTERM (or a Ray cancel, which
    raises KeyboardInterrupt) the stage is stopped and `StageStopped` raised with its log tail."""
    env = {**env, "PYTHONUNBUFFERED": "1", **({"MLFLOW_RUN_ID": run_id} if run_id else {})}
    start = time.perf_counter()
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen([sys.executable, "-m", "dialogsum", *command], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
            try:
                returncode = process.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                returncode, timed_out = _stop(process, grace_s), True
            except (KeyboardInterrupt, Terminated) as e:
                ignore_signals()  # a second Ctrl-C must not cut the shutdown short
                _stop(process, grace_s)
                raise StageStopped(f"pipeline interrupted ({type(e).__name__}) while this stage ran; stopped with "
                                   f"SIGTERM, then SIGKILL after {grace_s:.0f} s", log_tail(log_path)) from e  # fmt: skip
            finally:
                _kill_leftovers(process.pid)
    finally:
        if run_id:
            _log_to_run(run_id, log_path)
    return StageProcess(returncode, timed_out, time.perf_counter() - start, log_tail(log_path))


def _log_to_run(run_id: str, log_path: Path) -> None:
    import mlflow

    if log_path.is_file():
        mlflow.MlflowClient().log_artifact(run_id, str(log_path), LOG_ARTIFACT_DIR)


class LocalExecutor:
    """Stages one after another, each a subprocess of this process."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.folder = Path(".")

    def use_folder(self, parent_id: str, folder: Path) -> None:  # noqa: ARG002 - the Ray executor needs the parent
        """The pipeline's folder: its files are here already; the stages' logs are written here."""
        self.folder = folder

    def resources(self, kind: str, gpus: float | None = None, cpus: float = 1.0, estimate_bytes: float | None = None) -> StageResources:  # noqa: ARG002
        """One stage at a time has this machine: nothing to ask for."""
        return StageResources()

    def run_all(self, stages: list[Stage], started: Started, finished: Finished, max_concurrency: int | None = None) -> None:  # noqa: ARG002
        """Run `stages` in order; `started(stage)` before each (it sets `run_id`), `finished(stage, result)` after.
        On SIGINT/SIGTERM the running stage is stopped and `Interrupted` raised."""
        for stage in stages:
            started(stage)
            assert stage.run_id is not None
            try:
                done = run_stage_process(stage.command, dict(os.environ), stage.timeout_s, self.grace_s,
                                         self.folder / f"{stage.kind}-{stage.run_id}.log", stage.run_id)  # fmt: skip
            except StageStopped as e:
                raise Interrupted(str(e), {stage.run_id: e.log_tail}) from e
            finished(stage, done)

    def check_tracking(self) -> None:
        """Every stage runs here: any tracking store this machine reaches will do."""

    def device(self):
        """The device the stages train on: this machine's."""
        from dialogsum.precision import detect_device

        return detect_device()

    def close(self) -> None:
        pass


def _stop(process: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM to the stage's process group; SIGKILL after the grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()
    except ProcessLookupError:
        return process.wait()


def _kill_leftovers(group: int) -> None:
    """A stage's own subprocesses (a DDP launch's workers) may outlive it; none may outlive the stage."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _libc():
    if sys.platform != "linux":
        return None
    import ctypes

    return ctypes.CDLL(None)


_LIBC = _libc()  # loaded here: between fork and exec nothing may import or take a lock
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the stage process, before exec: SIGTERM when the process that started it dies (a killed pipeline, a Ray
    worker that crashed), so the stage ends its run KILLED instead of running on unowned."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
