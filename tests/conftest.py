"""Fixtures shared by every test: the real shared data, one model cache per session, a temporary MLflow store."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the machine's cores: one math thread each (also for their subprocesses), set
    # before anything imports torch, so workers do not oversubscribe the CPU.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


@pytest.fixture(scope="session")
def shared() -> Callable[[str], Path]:
    """`shared("data/dialogsum-ko/labeled.csv")` → the path under ../shared; a missing file fails the test
    (never skips), in CI and locally, so a broken checkout cannot pass by testing nothing."""

    def resolve(relative: str) -> Path:
        path = SHARED / relative
        if not path.exists():
            where = "CI checkout" if os.environ.get("CI") else "checkout"
            pytest.fail(f"shared test data missing in this {where}: {path} (see ../shared/README.md)", pytrace=False)
        return path

    return resolve


@pytest.fixture(scope="session", autouse=True)
def dialogsum_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One DIALOGSUM_CACHE_DIR for the whole session, set in os.environ so subprocesses share it too."""
    folder = tmp_path_factory.mktemp("dialogsum-cache")
    previous = os.environ.get("DIALOGSUM_CACHE_DIR")
    os.environ["DIALOGSUM_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DIALOGSUM_CACHE_DIR", None)
    else:
        os.environ["DIALOGSUM_CACHE_DIR"] = previous


def _use_store(mp: pytest.MonkeyPatch, root: Path) -> str:
    """Point MLflow at a SQLite store in `root` and make `root` the working directory (artifacts land there).
    Run and experiment variables are set then deleted, so the values `mlflow.set_experiment` exports are undone
    when the patch ends."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        mp.setenv(name, "")
        mp.delenv(name)
    mp.chdir(root)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def _end_active_runs() -> None:
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite MLflow store in tmp_path for one test; yields the tracking URI."""
    yield _use_store(monkeypatch, tmp_path)
    _end_active_runs()


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One SQLite store (and working directory) for a whole test module, so trained runs can be reused and the
    store's creation (seconds) is paid once; yields its folder."""
    root = tmp_path_factory.mktemp("mlflow-store")
    with pytest.MonkeyPatch.context() as mp:
        _use_store(mp, root)
        yield root
        _end_active_runs()
