"""Where a pipeline's stages run. A stage is one `python -m dialogsum <command>` logging into a child run the
orchestrator created (`$MLFLOW_RUN_ID`); an executor runs a list of them and reports each one's end.

`LocalExecutor` runs them on this machine: one after another without GPUs; on a GPU machine at once where the GPUs
hold them (`dialogsum.pipeline.gpu_scheduler`), each pinned to its own GPUs and the rest queued until GPUs come
back. `dialogsum.pipeline.ray_executor.RayExecutor` runs them as Ray tasks, at the same time where resources allow.
Both run each stage as a `StageRun`: the command in a process group of its own, its output in a log that is logged
to the run (`logs/`). A stage that outlives its timeout, and the running stages when the pipeline itself gets SIGINT
or SIGTERM, are stopped the same way: SIGTERM to the whole process group (the stage ends its run KILLED and a DDP
launch takes its workers down), SIGKILL to whatever is left after the grace period. The stage process also gets
SIGTERM if the process that started it dies (Linux `PR_SET_PDEATHSIG`), so nothing of a stage outlives what runs it.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from dialogsum.pipeline.gpu_scheduler import GpuDevice, GpuQueue, GpuRequest, Unschedulable, probe_gpus, usable_gpus
from dialogsum.tracking import Terminated

LOG_TAIL_CHARS = 2000
LOG_ARTIFACT_DIR = "logs"
DIALOGSUM = ("-m", "dialogsum")  # a stage's command starts with these: `python -m dialogsum <command>`
DEVICE_STAGES = ("tune", "kfold", "ensemble", "optimize", "predict")  # later steps that load models: one GPU each
POLL_S = 0.2  # how often the local executor looks for stages that ended while several run


@dataclass(frozen=True)
class StageResources:
    """What a stage asks for: of a Ray cluster, or of this machine's GPUs (a machine without GPUs runs one stage at
    a time and ignores it). `gpus=None`: as many as `estimate_bytes` (preflight's) needs, sized by the local
    executor against each GPU's free memory when it queues the stage."""

    cpus: float = 1.0
    gpus: float | None = 0.0
    memory_bytes: int | None = None
    estimate_bytes: float | None = None


@dataclass(eq=False)  # a stage is itself: two stages are never equal
class Stage:
    """One command to run: the arguments of `python` (`[*DIALOGSUM, "train", ...]`). `run_id` is set when the stage
    starts (its child run is created then), or before for a resumed training that continues its own run. `group`
    names a concurrency cap (`train`: `max_concurrency`). `gpus`: the GPUs the local executor pinned it to, set just
    before it starts (None: it was not pinned)."""

    kind: str
    name: str
    command: list[str]
    timeout_s: float | None
    resources: StageResources = field(default_factory=StageResources)
    group: str | None = None
    run_id: str | None = None
    resumed_from_epoch: int | None = None  # a resumed training: the epoch of the checkpoint it continues from
    gpus: tuple[int, ...] | None = None


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


class StageRun:
    """A stage's process, started: `python *launcher *command` with `env` (plus `MLFLOW_RUN_ID=run_id`) in a process
    group of its own, its output in `log_path`. When it ends (or is stopped) the log is logged to the run under
    `logs/`. `launcher`: what runs the command, e.g. an accelerate launch across several GPUs."""

    def __init__(self, command: list[str], env: dict[str, str], timeout_s: float | None, grace_s: float, log_path: Path,
                 run_id: str | None, launcher: tuple[str, ...] = ()):  # fmt: skip
        self.timeout_s, self.grace_s, self.log_path, self.run_id = timeout_s, grace_s, log_path, run_id
        env = {**env, "PYTHONUNBUFFERED": "1", **({"MLFLOW_RUN_ID": run_id} if run_id else {})}
        self.start = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:  # the process writes through its own copy
            self.process = subprocess.Popen([sys.executable, *launcher, *command], env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip

    def wait(self, poll_s: float | None = None) -> StageProcess | None:
        """Wait until the stage ends, or at most `poll_s` seconds: how it ended, or None while it runs. Past its
        timeout it is stopped (SIGTERM, SIGKILL after the grace period) and reported timed out."""
        left = None if self.timeout_s is None else max(0.0, self.timeout_s - (time.perf_counter() - self.start))
        own_deadline = poll_s is None or (left is not None and left <= poll_s)
        try:
            returncode = self.process.wait(timeout=left if own_deadline else poll_s)
        except subprocess.TimeoutExpired:
            if not own_deadline:
                return None
            return self._end(_stop(self.process, self.grace_s), timed_out=True)
        return self._end(returncode, timed_out=False)

    def terminate(self) -> None:
        """SIGTERM to the stage's process group (`stop` then waits for it)."""
        _signal_group(self.process.pid, signal.SIGTERM)

    def stop(self, grace_s: float | None = None) -> str:
        """Stop the stage (SIGTERM, SIGKILL after `grace_s`, by default its grace period); returns its log tail."""
        self._end(_stop(self.process, self.grace_s if grace_s is None else grace_s), timed_out=False)
        return log_tail(self.log_path)

    def _end(self, returncode: int, timed_out: bool) -> StageProcess:
        _kill_leftovers(self.process.pid)
        if self.run_id:
            _log_to_run(self.run_id, self.log_path)
        return StageProcess(returncode, timed_out, time.perf_counter() - self.start, log_tail(self.log_path))


def run_stage_process(command: list[str], env: dict[str, str], timeout_s: float | None, grace_s: float, log_path: Path,
                      run_id: str | None) -> StageProcess:  # fmt: skip
    """Run a stage (`StageRun`) to its end or its timeout. On SIGINT/SIGTERM (or a Ray cancel, which raises
    KeyboardInterrupt) the stage is stopped and `StageStopped` raised with its log tail."""
    run = StageRun(command, env, timeout_s, grace_s, log_path, run_id)
    try:
        done = run.wait()
    except (KeyboardInterrupt, Terminated) as e:
        ignore_signals()  # a second Ctrl-C must not cut the shutdown short
        raise StageStopped(f"pipeline interrupted ({type(e).__name__}) while this stage ran; stopped with "
                           f"SIGTERM, then SIGKILL after {grace_s:.0f} s", run.stop()) from e  # fmt: skip
    assert done is not None
    return done


def stop_all(runs: dict[Stage, StageRun], grace_s: float) -> dict[str, str]:
    """Stop every running stage: SIGTERM to all at once, then SIGKILL to what is left after one grace period.
    Returns run id -> log tail."""
    for run in runs.values():
        run.terminate()
    deadline = time.monotonic() + grace_s
    return {str(stage.run_id): run.stop(max(0.0, deadline - time.monotonic())) for stage, run in runs.items()}


def _log_to_run(run_id: str, log_path: Path) -> None:
    import mlflow

    if log_path.is_file():
        mlflow.MlflowClient().log_artifact(run_id, str(log_path), LOG_ARTIFACT_DIR)


class LocalExecutor:
    """Stages on this machine, each a subprocess of this process: one after another without GPUs; with GPUs, at once
    where they fit, each pinned to its own GPUs. `gpus`: the GPU indices the pipeline may use (None: all); `probe`:
    where the GPUs and their free memory come from (`probe_gpus`; a test gives a fake list)."""

    def __init__(self, grace_s: float, gpus: list[int] | None = None, probe: Callable[[], list[GpuDevice]] = probe_gpus):
        self.grace_s = grace_s
        self.allowed = gpus
        self.probe = probe
        self.folder = Path(".")

    def use_folder(self, parent_id: str, folder: Path) -> None:  # noqa: ARG002 - the Ray executor needs the parent
        """The pipeline's folder: its files are here already; the stages' logs are written here."""
        self.folder = folder

    def gpus(self) -> list[GpuDevice]:
        """The GPUs the stages may use, with their free memory now (none on a machine without GPUs)."""
        return usable_gpus(self.probe(), self.allowed)

    def resources(self, kind: str, gpus: float | None = None, cpus: float = 1.0, estimate_bytes: float | None = None) -> StageResources:
        """What a stage holds on a GPU machine: a training `gpus` (the model's `resources.gpus`) or, unset, as many
        as its memory estimate needs on the GPUs' free memory (sized when it is queued); a later step that loads
        models one GPU; the others none."""
        if kind == "train":
            return StageResources(cpus=cpus, gpus=gpus, estimate_bytes=estimate_bytes)
        return StageResources(cpus=cpus, gpus=1.0 if kind in DEVICE_STAGES else 0.0)

    def run_all(self, stages: list[Stage], started: Started, finished: Finished, max_concurrency: int | None = None) -> None:
        """Run `stages`; `started(stage)` before each (it sets `run_id`), `finished(stage, result)` as each ends.
        Without GPUs: one after another, in order. With GPUs: each as soon as the GPUs it needs are idle (and fewer
        than `max_concurrency` trainings run), in order, pinned to them through CUDA_VISIBLE_DEVICES; a stage that
        no set of the GPUs can hold fails at once (`Unschedulable`). On SIGINT/SIGTERM the running stages are
        stopped and `Interrupted` raised."""
        devices = self.gpus()
        if devices:
            self._run_on_gpus(stages, started, finished, devices, max_concurrency)
        else:
            self._run_in_turn(stages, started, finished)

    def _run_in_turn(self, stages: list[Stage], started: Started, finished: Finished) -> None:
        for stage in stages:
            started(stage)
            assert stage.run_id is not None
            try:
                done = run_stage_process(stage.command, dict(os.environ), stage.timeout_s, self.grace_s,
                                         self._log_path(stage), stage.run_id)  # fmt: skip
            except StageStopped as e:
                raise Interrupted(str(e), {stage.run_id: e.log_tail}) from e
            finished(stage, done)

    def _run_on_gpus(self, stages: list[Stage], started: Started, finished: Finished, devices: list[GpuDevice],
                     max_concurrency: int | None) -> None:  # fmt: skip
        queue = GpuQueue(devices, max_concurrency)
        for stage in stages:
            try:
                queue.add(stage, gpu_request(stage), counted=stage.group == "train")
            except Unschedulable as e:
                started(stage)
                finished(stage, StageProcess(-1, False, 0.0, "", ("Unschedulable", str(e))))
        running: dict[Stage, StageRun] = {}
        try:
            while queue.waiting or running:
                for stage, held in queue.start_ready():
                    stage.gpus = held
                    started(stage)
                    assert stage.run_id is not None
                    running[stage] = StageRun(stage.command, {**os.environ, **pinned_env(held)}, stage.timeout_s,
                                              self.grace_s, self._log_path(stage), stage.run_id, launcher_for(stage, held))  # fmt: skip
                if not self._report_ended(running, queue, finished):
                    time.sleep(POLL_S)
        except (KeyboardInterrupt, Terminated) as e:
            ignore_signals()  # a second Ctrl-C must not cut the shutdown short
            tails = stop_all(running, self.grace_s)
            raise Interrupted(f"pipeline interrupted ({type(e).__name__}) while {len(tails)} stage(s) ran; each was "
                              f"stopped with SIGTERM, then SIGKILL after {self.grace_s:.0f} s", tails) from e  # fmt: skip
        except BaseException:
            stop_all(running, self.grace_s)  # nothing is left running, whatever failed here
            raise

    @staticmethod
    def _report_ended(running: dict[Stage, StageRun], queue: GpuQueue, finished: Finished) -> bool:
        """`finished` for each running stage that has ended, its GPUs back to the queue; whether any had."""
        ended = False
        for stage, run in list(running.items()):
            done = run.wait(0)
            if done is None:
                continue
            del running[stage]
            queue.finish(stage)
            finished(stage, done)
            ended = True
        return ended

    def _log_path(self, stage: Stage) -> Path:
        return self.folder / f"{stage.kind}-{stage.run_id}.log"

    def check_tracking(self) -> None:
        """Every stage runs here: any tracking store this machine reaches will do."""

    def device(self):
        """The device the stages train on: this machine's; on a GPU machine with the memory of the roomiest GPU the
        pipeline may use, which preflight checks each model against."""
        from dialogsum.precision import detect_device

        device = detect_device()
        gpus = self.gpus()
        if device.kind != "cuda" or not gpus:
            return device
        roomiest = max(gpus, key=lambda d: d.free_bytes)
        return replace(device, total_bytes=roomiest.total_bytes, available_bytes=roomiest.free_bytes)

    def close(self) -> None:
        pass


def gpu_request(stage: Stage) -> GpuRequest:
    """What `stage` asks of the GPU queue: a training its whole GPUs (a fraction of one, as Ray allows, is one) or
    its estimate; a later step one GPU or none."""
    gpus = stage.resources.gpus
    return GpuRequest(stage.name, None if gpus is None else math.ceil(gpus), stage.resources.estimate_bytes)


def pinned_env(gpus: tuple[int, ...]) -> dict[str, str]:
    """The variables that give a stage exactly `gpus` (NVML's indices: CUDA numbers them in PCI bus order too)."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}


def launcher_for(stage: Stage, gpus: tuple[int, ...]) -> tuple[str, ...]:
    """What runs `stage` on `gpus`: a training on several is an accelerate launch with one process per GPU (DDP, as
    README's "Several processes, one run" shows; the training's own precision policy overrides the launch's
    `--mixed_precision`); anything else runs as it is."""
    if stage.kind != "train" or len(gpus) < 2:
        return ()
    return ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(len(gpus)), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()))  # fmt: skip


def free_port() -> int:
    """A TCP port free on this machine now (each concurrent DDP launch needs its own rendezvous port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM to the stage's process group; SIGKILL after the grace period."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGKILL)
        return process.wait()


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):  # the group has ended already (or its pid went to another user)
        pass


def _kill_leftovers(group: int) -> None:
    """A stage's own subprocesses (a DDP launch's workers) may outlive it; none may outlive the stage."""
    _signal_group(group, signal.SIGKILL)


def mark_pipeline_processes() -> str:
    """Give this process, and so every process it starts from now on (they inherit its environment), the marker
    `PIPELINE_ENV=<a fresh id>`; returns the id."""
    import uuid

    from dialogsum.tracking import PIPELINE_ENV

    marker = uuid.uuid4().hex
    os.environ[PIPELINE_ENV] = marker
    return marker


def marked_processes(marker: str) -> list:
    """The live processes on this machine (psutil.Process) whose environment carries `PIPELINE_ENV=marker`. A
    process's environment is read as it was when it started: the process that set the marker on itself is not
    among them."""
    import psutil

    from dialogsum.tracking import PIPELINE_ENV

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(PIPELINE_ENV) == marker and process_alive(process):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended meanwhile, or another user's
            pass
    return found


def process_alive(process) -> bool:
    """Running, not a zombie (dead, its exit status not yet collected)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describe_process(process) -> str:
    """`pid command line` (the command line cut at 200 characters)."""
    import psutil

    try:
        return f"{process.pid} {' '.join(process.cmdline())[:200]}"
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"{process.pid} (gone)"


def stop_processes(processes: list, grace_s: float) -> None:
    """SIGTERM to each of `processes` (psutil.Process) still alive, SIGKILL to those alive after `grace_s`."""
    import psutil

    for send in ("terminate", "kill"):
        for process in processes:
            if process_alive(process):
                try:
                    getattr(process, send)()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        deadline = time.monotonic() + grace_s
        while any(process_alive(p) for p in processes) and time.monotonic() < deadline:
            time.sleep(0.1)


ORPHAN_GRACE_S = 5.0  # SIGTERM to SIGKILL for a process the pipeline left behind: the "+ 5 s" of "grace + 5 s"


def stop_marked_processes(marker: str, grace_s: float) -> list[str]:
    """The last resort of a pipeline that exits: a process carrying its marker still alive has left the process group
    it was stopped by and outlived its owner (a stage whose Ray worker was killed under it, a process a stage started
    in a session of its own). Each gets SIGTERM, SIGKILL after `grace_s`; returns them (`describe_process`)."""
    left = marked_processes(marker)
    described = [describe_process(p) for p in left]
    stop_processes(left, grace_s)
    return described


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
