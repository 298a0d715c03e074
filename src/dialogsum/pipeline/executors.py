"""Where a pipeline's stages run. `LocalExecutor`: each stage is `python -m dialogsum <command>` in a process group of
its own, logging into a child run the orchestrator created (`$MLFLOW_RUN_ID`).

A stage that outlives its timeout, and the running stage when the pipeline itself gets SIGINT or SIGTERM, are
stopped the same way: SIGTERM to the whole process group (the stage ends its run KILLED and a DDP launch takes its
workers down), SIGKILL to whatever is left after the grace period. Nothing of the stage outlives the pipeline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dialogsum.tracking import Terminated

LOG_TAIL_CHARS = 2000


class Interrupted(KeyboardInterrupt):
    """The pipeline was interrupted (SIGINT/SIGTERM) while this stage ran; it has been stopped. A KeyboardInterrupt,
    so the pipeline's run ends KILLED like any interrupted run."""

    def __init__(self, message: str, log_tail: str):
        super().__init__(message)
        self.log_tail = log_tail


@dataclass
class StageProcess:
    returncode: int
    timed_out: bool
    elapsed_s: float


def log_tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:] if path.is_file() else ""


class LocalExecutor:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s

    def run(self, run_id: str, command: list[str], timeout_s: float, log_path: Path) -> StageProcess:
        """Run one stage to its end or its timeout. On SIGINT/SIGTERM to this process the stage is stopped and
        `Interrupted` raised (with the stage's log tail)."""
        env = {**os.environ, "MLFLOW_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log:
            process = subprocess.Popen([sys.executable, "-m", "dialogsum", *command], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            try:
                returncode = process.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                returncode, timed_out = self.stop(process), True
            except (KeyboardInterrupt, Terminated) as e:
                _ignore_signals()  # a second Ctrl-C must not cut the shutdown short
                self.stop(process)
                raise Interrupted(f"pipeline interrupted ({type(e).__name__}) while this stage ran; stopped with "
                                  f"SIGTERM, then SIGKILL after {self.grace_s:.0f} s", log_tail(log_path)) from e  # fmt: skip
            finally:
                _kill_leftovers(process.pid)
        return StageProcess(returncode, timed_out, time.perf_counter() - start)

    def stop(self, process: subprocess.Popen) -> int:
        """SIGTERM to the stage's process group; SIGKILL after the grace period."""
        try:
            os.killpg(process.pid, signal.SIGTERM)
            return process.wait(timeout=self.grace_s)
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


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
