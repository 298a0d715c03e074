"""Fixtures shared by every test: the real shared data, one model cache per session, a temporary MLflow store."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


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


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh SQLite MLflow store in tmp_path, which is also the working directory (artifacts land there).
    Yields the tracking URI; any run left active is ended afterwards."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
