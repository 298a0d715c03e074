"""`dialogsum tune --executor ray --workers N`: N study workers as Ray tasks, each the ordinary `dialogsum tune`
process joining one shared study (`dialogsum.sweeps.tune`), one GPU each when the cluster has GPUs.

The study is named and its storage fixed here, before any worker starts, so every worker joins the same one: a
journal file at an absolute path on a one-node cluster (the default), an RDB URL (PostgreSQL) on several nodes.
Paths travel absolute; on several nodes they must be readable on every node (a shared file system). A storage URL
carrying a password is refused: the workers would receive it as an argument; give the password to the nodes'
environment instead (`PGPASSWORD`, `~/.pgpass`). With `--seed`, worker i samples with seed + i, so the workers do
not propose the same trials.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from urllib.parse import urlparse

from dialogsum.pipeline.executors import DIALOGSUM, Stage, StageProcess
from dialogsum.sweeps.tune import TuneError, TuneSettings, journal_path


def worker_command(settings: TuneSettings, study: str, storage: str, seed: int | None) -> list[str]:
    """The `dialogsum tune` arguments of one worker: the settings with every path absolute."""
    space = Path(settings.space)
    command = ["tune", "--model", settings.model, "--space", str(space.resolve()) if space.is_file() else settings.space,
               "--trials", str(settings.trials), "--study", study, "--storage", storage, "--sampler", settings.sampler,
               "--pruner", settings.pruner, "--metric", settings.metric]  # fmt: skip
    for flag, path in (("--train-data", settings.train_path), ("--validation-data", settings.validation_path)):
        if path:
            command += [flag, str(Path(path).resolve())]
    for key, value in settings.overrides.items():
        command += ["--set", f"{key}={value}"]
    if seed is not None:
        command += ["--seed", str(seed)]
    if settings.from_run:
        command += ["--from-run", settings.from_run]
    return command


def shared_storage(settings: TuneSettings, study: str, nodes: int) -> str:
    """The storage every worker opens: the given one, else a journal file here (one node only)."""
    url = settings.storage
    if url and urlparse(url).password is not None:
        raise TuneError("--storage carries a password, which every Ray worker would receive as an argument; give it "
                        "without the password and put the password in the nodes' environment (PGPASSWORD or ~/.pgpass)")  # fmt: skip
    journal = journal_path(url, study)
    if nodes > 1 and (journal is not None or url.startswith("sqlite:")):
        raise TuneError(f"the Ray cluster has {nodes} nodes but the study's storage ({url or 'a journal file here'}) is on "
                        "this machine's disk; give --storage postgresql://… that every node reaches")  # fmt: skip
    return f"journal:{journal.resolve()}" if journal is not None else url


def run_ray_workers(settings: TuneSettings, workers: int, address: str | None, grace_s: float = 30) -> str:
    """Create (or load) the study and its parent run, then run `workers` study workers on the Ray cluster at `address`
    until the study holds `settings.trials` finished trials; returns the parent run id. A worker that fails is
    reported with its log tail; the study goes on with the others."""
    import optuna
    from rich.console import Console
    from rich.markup import escape

    from dialogsum.config import load_model_config
    from dialogsum.pipeline.ray_executor import RayExecutor
    from dialogsum.sweeps.tune import storage_for, study_parent
    from dialogsum.tracking import Terminated, configure_tracking

    console = Console(stderr=True)
    configure_tracking()
    study = settings.study or f"{load_model_config(settings.model, settings.overrides or None).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runner = RayExecutor(grace_s, address)
    try:
        runner.check_tracking()
        storage = shared_storage(settings, study, len(runner.alive_nodes()))
        # The study and its parent run exist before any worker starts (the parent is `mlflow run`'s run, if any).
        shared = dataclasses.replace(settings, study=study, storage=storage)
        opened = storage_for(shared, study)
        parent = study_parent(optuna.create_study(study_name=study, storage=opened, load_if_exists=True, direction=settings.direction),
                              opened, shared)  # fmt: skip
        resources = runner.resources("tune")
        stages = [Stage("tune", f"worker-{i}", [*DIALOGSUM, *worker_command(settings, study, storage, None if settings.seed is None else settings.seed + i)],
                        None, resources) for i in range(workers)]  # fmt: skip
        failed: list[tuple[Stage, StageProcess]] = []

        def finished(stage: Stage, done: StageProcess) -> None:
            ok = done.returncode == 0 and done.error is None
            console.print(f"tune {stage.name}: {'done' if ok else 'failed'} after {done.elapsed_s:.0f} s")
            if not ok:
                failed.append((stage, done))

        console.print(f"study {study}: {workers} worker(s) on Ray, storage {storage}")
        try:
            runner.run_all(stages, lambda stage: None, finished)
        except (KeyboardInterrupt, Terminated):
            _close_if_running(parent, "killed", "Interrupted", "the study's Ray workers were cancelled (Ctrl-C or SIGTERM)")
            raise
    finally:
        runner.close()
    if len(failed) == workers:
        reasons = "\n".join(f"{s.name}: {_why(d)}\n{d.log_tail}" for s, d in failed)
        _close_if_running(parent, "failed", "NoWorkerRan", reasons)
        raise TuneError(f"no worker of study {study} ran: {reasons}")
    for stage, done in failed:
        console.print(f"[yellow]{stage.name} failed[/yellow]: {escape(_why(done))}\n{escape(done.log_tail)}", soft_wrap=True)
    return parent


def _why(done: StageProcess) -> str:
    return done.error[1] if done.error else f"exit code {done.returncode}"


def _close_if_running(run_id: str, status: str, error_type: str, message: str) -> None:
    """The study's parent, left RUNNING when no worker got to end it."""
    import mlflow

    from dialogsum.tracking import close_run

    if mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING":
        close_run(run_id, status, "tune", error_type, message)
