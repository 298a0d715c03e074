"""Stages as Ray tasks (`executor: ray`): the same `python -m dialogsum <command>` each, run by `run_stage_process` on
whichever node has the resources, at the same time where the cluster allows. Ray schedules; dialogsum only says
what each stage needs (`StageResources`) and caps the concurrent trainings (`max_concurrency`).

- A stage's child run is created when its task is submitted; the task tags it `dialogsum.started_at` (epoch ms)
  when it starts on a worker, so time spent waiting for resources shows.
- A task's worker re-creates the pipeline's folder from the parent run's `data/` artifacts, so the role files
  reach every node, and logs the stage's output to the child run (`logs/`).
- The tracking URI travels without its password: credentials come from each node's environment
  (`MLFLOW_TRACKING_USERNAME`/`PASSWORD`/`TOKEN`, `PGPASSWORD`, or the node's own `MLFLOW_TRACKING_URI`), never
  from task arguments.
- A stage's timeout is enforced by its task, as locally; a task whose worker or node dies ends its child FAILED
  (`WorkerLost`) with Ray's report; Ctrl-C cancels every task (each stops its stage: SIGTERM, SIGKILL after the
  grace period) and waits for them, so nothing is left running on the cluster. Tasks are never retried by Ray: a
  retried stage would write into a run that already tells a story.
- A cluster of several nodes with a tracking store on this machine's disk (`sqlite:`, `file:`, a path) is refused
  before anything starts.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import psutil

from dialogsum.config import ConfigError
from dialogsum.pipeline.executors import (
    DEVICE_STAGES,
    Finished,
    Interrupted,
    Stage,
    StageProcess,
    StageResources,
    Started,
    ignore_signals,
    run_stage_process,
    stop_processes,
)
from dialogsum.pipeline.gpu_scheduler import gpus_for_estimate
from dialogsum.tracking import PIPELINE_ENV, STARTED_AT_TAG, Terminated

RAY_EXTRA = 'pip install "dialogsum[ray]"'
CANCEL_WAIT_S = 30  # after the grace period, how long a cancelled task may take to report before it is force-killed
POLL_S = 1.0


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"executor 'ray' needs Ray, an optional extra: {RAY_EXTRA}") from e
    return ray


def without_password(uri: str) -> str:
    """`uri` with the password of its user info removed (`http://me:secret@host` → `http://me@host`)."""
    parts = urlparse(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunparse(parts._replace(netloc=netloc))


def is_local_store(uri: str) -> bool:
    """A tracking or artifact location on this machine's disk: `sqlite:`, `file:` or a bare path."""
    scheme = urlparse(uri).scheme
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # a Windows drive letter


def check_tracking_for_cluster(tracking_uri: str, artifact_location: str | None, nodes: int) -> None:
    """Refuse a cluster of several nodes whose runs or artifacts would land on this machine's disk."""
    if nodes <= 1:
        return
    if is_local_store(tracking_uri):
        raise ConfigError(f"the Ray cluster has {nodes} nodes but MLflow tracks into {without_password(tracking_uri)}, a "
                          "store on this machine's disk that the other nodes cannot reach; set MLFLOW_TRACKING_URI to the "
                          "team tracking server (http://…, see README 'Team tracking server') and run again")  # fmt: skip
    if artifact_location and is_local_store(artifact_location) and urlparse(tracking_uri).scheme not in ("http", "https"):
        raise ConfigError(f"the Ray cluster has {nodes} nodes but the experiment stores artifacts in {artifact_location}, "
                          "on this machine's disk; use a tracking server that serves artifacts (mlflow server "
                          "--serve-artifacts) or an experiment with a shared artifact location")  # fmt: skip


def tracking_env(node_env: dict[str, str], shared: dict[str, str]) -> dict[str, str]:
    """The MLflow variables a stage runs with on a node: the driver's (`shared`, password-free), except that a node
    whose own MLFLOW_TRACKING_URI is the same store with credentials keeps its own."""
    env = dict(shared)
    own = node_env.get("MLFLOW_TRACKING_URI")
    if own and without_password(own) == shared.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = own
    return env


def _stage_task(kind: str, command: list[str], shared_env: dict[str, str], timeout_s: float | None, grace_s: float,
                run_id: str | None, files: tuple[str, str] | None) -> StageProcess:  # fmt: skip
    """A Ray task: run one stage on this worker. `files` = (parent run id, the driver's pipeline folder): the folder
    is re-created here from the parent's `data/` artifacts and the command's paths under it point here instead."""
    import mlflow

    env = tracking_env(dict(os.environ), shared_env)
    os.environ.update(env)  # this worker runs one task only (max_calls=1)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    if run_id:  # the run was created when the task was submitted; this is when it got its resources
        mlflow.MlflowClient().set_tag(run_id, STARTED_AT_TAG, str(int(time.time() * 1000)))
    with tempfile.TemporaryDirectory(prefix="dialogsum-stage-") as tmp:
        if files is not None:
            parent_id, driver_folder = files
            mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="data", dst_path=tmp)
            command = [tmp + arg[len(driver_folder):] if arg.startswith(driver_folder + os.sep) else arg for arg in command]
        log_path = Path(tmp) / f"{kind}-{run_id or 'worker'}.log"
        return run_stage_process(command, dict(os.environ), timeout_s, grace_s, log_path, run_id)


def _describe(resources: dict) -> str:
    """`CPU 2, GPU 1, memory 13.6 GiB`: the resources dialogsum asks for, in that order."""
    return ", ".join(f"{key} {resources[key] / 2**30:.1f} GiB" if key == "memory" else f"{key} {resources[key]:g}"
                     for key in ("CPU", "GPU", "memory") if key in resources)  # fmt: skip


@contextmanager
def _signals_interrupt(received: list[str]) -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, their name appended to `received`. Ray lets an exception raised by
    a signal handler out of its calls (`ray.wait`, `ray.get`) only as KeyboardInterrupt or SystemExit: `Terminated`
    came out of `ray.wait` as a SystemError and the pipeline ended FAILED instead of stopping its stages. The previous
    handlers come back unless interrupted (then the signals stay ignored for the shutdown). Outside the main thread
    nothing changes."""

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        received.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(received[-1])

    try:
        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        if not received:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _with_descendants(processes: list) -> list:
    """`processes` (psutil.Process) and, for those still alive, every process under them."""
    found = list(processes)
    for process in processes:
        try:
            found += process.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return found


def _probe_device():
    from dialogsum.precision import detect_device

    return detect_device()


class RayExecutor:
    """Stages as Ray tasks on the cluster at `address` (None: a Ray started here for this process, or the one this
    process is already connected to)."""

    def __init__(self, grace_s: float, address: str | None):
        ray = import_ray()
        self.grace_s = grace_s
        self.files: tuple[str, str] | None = None
        self._device = None
        self.started_here = not ray.is_initialized()
        self.ray_processes: list = []  # the processes `ray.init` started here (none when it joined a cluster)
        if self.started_here:
            before = {p.pid for p in psutil.Process().children()}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"cannot reach the Ray cluster at {address or 'auto'}: {e}") from e
            self.ray_processes = [p for p in psutil.Process().children() if p.pid not in before]
        self.task = ray.remote(max_calls=1)(_stage_task)  # a fresh worker per stage: nothing carries over

    @staticmethod
    def alive_nodes() -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def check_tracking(self) -> None:
        """Refuse a multi-node cluster with a local tracking store (before anything starts)."""
        import mlflow

        from dialogsum.tracking import active_experiment_id

        experiment = mlflow.MlflowClient().get_experiment(active_experiment_id())
        check_tracking_for_cluster(mlflow.get_tracking_uri(), experiment.artifact_location, len(self.alive_nodes()))

    def use_folder(self, parent_id: str, folder: Path) -> None:
        """The pipeline's folder: the stages' paths under it exist on the workers as the parent run's `data/`
        artifacts (the logs are written on the workers and logged to the runs)."""
        self.files = (parent_id, str(folder))

    def device(self):
        """The device a training gets on the cluster: a GPU node's first GPU when there are GPUs, else a node's CPU
        (asked of the cluster by a task, once)."""
        import ray

        if self._device is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
            probe = ray.remote(_probe_device).options(num_cpus=0, num_gpus=gpus, max_retries=0)
            self._device = ray.get(probe.remote())
        return self._device

    def resources(self, kind: str, gpus: float | None = None, cpus: float = 1.0, estimate_bytes: float | None = None) -> StageResources:
        """What a stage asks for. A training: `gpus` (the model's `resources.gpus`) or, unset, as many GPUs as its
        memory estimate needs (none on a CPU cluster, where it asks for the estimate as memory instead). Later
        steps that load models ask for one GPU when the cluster has them."""
        device = self.device()
        on_gpu = device.kind == "cuda"
        if kind == "train":
            if gpus is None:
                gpus = gpus_for_estimate(estimate_bytes, device.total_bytes) if on_gpu and estimate_bytes else 0
            memory = int(estimate_bytes) if not gpus and estimate_bytes else None
            return StageResources(cpus=cpus, gpus=float(gpus), memory_bytes=memory)
        return StageResources(cpus=cpus, gpus=1.0 if on_gpu and kind in DEVICE_STAGES else 0.0)

    def unschedulable(self, need: StageResources) -> str | None:
        """Why no node of the cluster could ever run a stage that asks for `need` (Ray would wait forever)."""
        wanted = {"CPU": need.cpus, "GPU": need.gpus, "memory": need.memory_bytes or 0}
        nodes = [n.get("Resources", {}) for n in self.alive_nodes()]
        if any(all(have.get(key, 0) >= value for key, value in wanted.items() if value) for have in nodes):
            return None
        offers = "; ".join(_describe(have) for have in nodes) or "none alive"
        return f"no node of the Ray cluster has {_describe({k: v for k, v in wanted.items() if v})} (nodes: {offers})"

    def _shared_env(self) -> dict[str, str]:
        import mlflow

        env = {"MLFLOW_TRACKING_URI": without_password(mlflow.get_tracking_uri())}
        for name in ("MLFLOW_EXPERIMENT_ID", PIPELINE_ENV):  # the pipeline's marker: its stages carry it on every node
            if os.environ.get(name):
                env[name] = os.environ[name]
        return env

    def _submit(self, stage: Stage):
        r = stage.resources
        options = {"num_cpus": r.cpus, "num_gpus": r.gpus, "max_retries": 0,
                   "name": f"dialogsum {stage.kind} {stage.name}", **({"memory": r.memory_bytes} if r.memory_bytes else {})}  # fmt: skip
        return self.task.options(**options).remote(stage.kind, stage.command, self._shared_env(), stage.timeout_s,
                                                   self.grace_s, stage.run_id, self.files)  # fmt: skip

    def run_all(self, stages: list[Stage], started: Started, finished: Finished, max_concurrency: int | None = None) -> None:
        """Submit every stage (at most `max_concurrency` of group `train` at once), `started(stage)` as each is
        submitted, `finished(stage, result)` as each ends, in the order they end. On SIGINT/SIGTERM every task is
        cancelled and waited for, then `Interrupted` raised."""
        import ray

        pending = list(stages)
        running: dict = {}  # task ref -> stage
        received: list[str] = []  # the signal that interrupted, by name
        with _signals_interrupt(received):
            try:
                while pending or running:
                    for stage in list(pending):
                        busy = sum(s.group == stage.group for s in running.values())
                        if stage.group == "train" and max_concurrency and busy >= max_concurrency:
                            continue
                        pending.remove(stage)
                        started(stage)
                        problem = self.unschedulable(stage.resources)
                        if problem:
                            finished(stage, StageProcess(-1, False, 0.0, "", ("Unschedulable", problem)))
                            continue
                        running[self._submit(stage)] = stage
                    if running:
                        done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                        for ref in done:
                            stage = running.pop(ref)
                            finished(stage, self._result(ref, stage))
            except (KeyboardInterrupt, Terminated) as e:
                ignore_signals()  # a second Ctrl-C must not cut the shutdown short
                self._cancel(running)
                why = received[-1] if received else type(e).__name__
                raise Interrupted(f"pipeline interrupted ({why}): its Ray tasks were cancelled, each stopped its stage "
                                  f"with SIGTERM, then SIGKILL after {self.grace_s:.0f} s", {}) from e  # fmt: skip
            except BaseException:
                self._cancel(running)  # nothing is left running on the cluster, whatever failed here
                raise

    def _result(self, ref, stage: Stage) -> StageProcess:
        import ray
        from ray.exceptions import RayError, RayTaskError, TaskCancelledError

        try:
            return ray.get(ref)
        except TaskCancelledError as e:
            return StageProcess(-1, False, 0.0, "", ("Cancelled", f"the Ray task was cancelled: {e}"))
        except RayTaskError as e:  # the task itself raised (e.g. the data could not be fetched)
            return StageProcess(-1, False, 0.0, "", ("StageError", str(e)[-2000:]))
        except RayError as e:  # the worker or its node died
            self._await_run_end(stage.run_id)
            return StageProcess(-1, False, 0.0, "", ("WorkerLost", f"Ray: {type(e).__name__}: {e}"[:2000]))

    def _await_run_end(self, run_id: str | None) -> None:
        """After a worker died, its stage (SIGTERM'd by the kernel) may still be ending its run; wait for that up to
        the grace period, so the WorkerLost verdict is the last word."""
        import mlflow

        deadline = time.monotonic() + self.grace_s
        while run_id and time.monotonic() < deadline:
            if mlflow.MlflowClient().get_run(run_id).info.status != "RUNNING":
                return
            time.sleep(0.5)

    def _cancel(self, running: dict) -> None:
        """Cancel every task (a KeyboardInterrupt in each: it stops its stage) and wait until each has ended;
        force-kill a task that does not report within the grace period plus `CANCEL_WAIT_S`."""
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        for ref in running:
            ray.cancel(ref)
        deadline = time.monotonic() + self.grace_s + CANCEL_WAIT_S
        for ref in running:
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except GetTimeoutError:
                ray.cancel(ref, force=True)
            except RayError:  # cancelled, or the task failed while stopping: either way it has ended
                pass

    def close(self) -> None:
        """Disconnect; a Ray started here is shut down and waited for until its processes (and theirs: the workers)
        have ended, SIGTERM, SIGKILL after the grace period. `ray.shutdown` returns once it has stopped the raylet,
        while the workers, each in a session of its own, are still exiting: seconds later they were alive, orphaned."""
        import ray

        if self.started_here and ray.is_initialized():
            started = _with_descendants(self.ray_processes)
            ray.shutdown()
            stop_processes(started, self.grace_s)
