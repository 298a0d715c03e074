"""Fixtures shared by every test: the bundled sample data, real third-party assets, one model cache per session,
a temporary MLflow store, the machine's calibration (`slowdown`) that time bounds in tests are scaled by.

Most tests run on the project's own data: the sample set bundled with the package and tokenizers trained from it.
The few tests whose point is a real third-party asset (the real KoBART / Qwen3 tokenizers, the competition rows)
are marked `@pytest.mark.real_assets("name", ...)` and get the files from the `real_asset` fixture, which looks in
`../shared`, then `$DIALOGSUM_TEST_ASSETS`, then `.test-assets/` (filled by `scripts/fetch_test_assets.sh` with the
real tokenizers that ../shared lacks), then (tokenizers only) the Hugging Face cache or hub. When an asset
is missing these tests are deselected and the run ends with one line saying how many and how to provide them. In
CI (`CI=true`) they are required: they stay selected and a missing asset fails them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FETCHED = REPO / ".test-assets"  # scripts/fetch_test_assets.sh
ASSETS_ENV = "DIALOGSUM_TEST_ASSETS"
# name → path under ../shared (or $DIALOGSUM_TEST_ASSETS); tokenizers also resolve from the hub id.
REAL_ASSETS = {
    "labeled": "data/dialogsum-ko/labeled.csv",
    "unlabeled": "data/dialogsum-ko/unlabeled.csv",
    "kobart-tokenizer": "tokenizers/kobart",
    "qwen3-tokenizer": "tokenizers/qwen3",
    "solar-tokenizer": "tokenizers/mistral-7b",  # SOLAR-10.7B's 32,000-piece vocabulary (not its chat template)
    "llama3-tokenizer": "tokenizers/llama3",  # Llama-3.1/3.2's 128,256 tokens (scripts/fetch_test_assets.sh)
}
TOKENIZER_HUB_IDS = {"kobart-tokenizer": "gogamza/kobart-base-v2", "qwen3-tokenizer": "Qwen/Qwen3-4B-Instruct-2507"}
TOKENIZER_FILES = ["tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "config.json", "*.jinja"]
_DESELECTED_KEY = "dialogsum_real_asset_deselections"
_DESELECTED = pytest.StashKey[dict]()

# The calibration: a fixed single-threaded CPU workload timed once per session (per xdist worker). The reference is
# its CPU time on one core of the 2-core development machine: 0.25 s (`time.process_time`, five runs 0.246-0.263 s at
# load average 2.9; CPU time does not stretch with load, wall time does). `slowdown` = its wall time now over that,
# at least 1: how many times longer than on that machine unloaded CPU-bound work takes here, as loaded now.
CALIBRATION_REFERENCE_S = 0.25
CALIBRATION_ROUNDS = 3

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the machine's cores: one math thread each (also for their subprocesses), set
    # before anything imports torch, so workers do not oversubscribe the CPU.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


def _calibration_workload() -> int:
    total = 0
    for i in range(3_000_000):
        total += i * i % 7
    return total


def measure_slowdown() -> float:
    """This machine's slowdown against the calibration reference (>= 1), now: a second or more."""
    start = time.perf_counter()
    for _ in range(CALIBRATION_ROUNDS):
        _calibration_workload()
    return max(1.0, (time.perf_counter() - start) / (CALIBRATION_ROUNDS * CALIBRATION_REFERENCE_S))


machine_slowdown = lru_cache(maxsize=1)(measure_slowdown)  # once per process


@pytest.fixture(scope="session")
def slowdown() -> float:
    """How many times longer CPU-bound work takes on this machine than on the reference (>= 1), measured once per
    session. A time bound that load legitimately stretches is multiplied by it; a wall-clock wait of the product (a
    grace period, a socket timeout) is not."""
    return machine_slowdown()


@pytest.fixture(scope="session")
def slowdown_now() -> Callable[[], float]:
    """Measures the slowdown when called, at least the session's: for a tight bound on a moment when the test's own
    processes (a pipeline, its trainings) load the machine more than it was loaded when the session measured it."""
    return lambda: max(machine_slowdown(), measure_slowdown())


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _from_hub(name: str) -> Path | None:
    """A tokenizer from the Hugging Face cache, or downloaded (a few files) when the hub answers."""
    repo = TOKENIZER_HUB_IDS.get(name)
    if repo is None:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=TOKENIZER_FILES, local_files_only=True))
    except Exception:  # not cached: fall through to the hub
        pass
    from dialogsum.preflight import hub_reachable

    if not hub_reachable()[0]:
        return None
    try:
        return Path(snapshot_download(repo, allow_patterns=TOKENIZER_FILES))
    except Exception:  # the hub answered but would not serve it: treated as missing
        return None


@lru_cache(maxsize=None)
def find_asset(name: str) -> Path | None:
    """Where real asset `name` is: ../shared, then $DIALOGSUM_TEST_ASSETS, then the hub (tokenizers); None if nowhere."""
    relative = REAL_ASSETS[name]
    folders = [SHARED] + ([Path(os.environ[ASSETS_ENV])] if os.environ.get(ASSETS_ENV) else []) + [FETCHED]
    for folder in folders:
        if (folder / relative).exists():
            return folder / relative
    return _from_hub(name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_assets(*names): needs real third-party assets (" + ", ".join(REAL_ASSETS) + ")"
    )
    config.stash[_DESELECTED] = {}


# The longest test files, longest first (seconds per file measured with `--durations=0` on a 2-core machine): xdist
# hands whole files to workers in this order (`--no-loadscope-reorder` keeps it from sorting them by test count), so
# starting the long ones first keeps a worker from picking one up when the others are nearly done.
LONGEST_FIRST = ("test_ray.py", "test_faults.py", "test_pipeline.py", "test_fresh_install.py", "test_saved_model.py", "test_tracking_server.py",
                 "test_train.py", "test_tune_workers.py", "test_ensemble.py", "test_tune.py", "test_optimize.py", "test_solar.py",
                 "test_distributed.py", "test_serving.py", "test_kfold.py", "test_registry.py", "test_tags.py")  # fmt: skip


def _duration_rank(item: pytest.Item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the test files longest first; deselect real-asset tests whose assets are missing (never in CI, where
    they must fail instead)."""
    items.sort(key=_duration_rank)  # stable: tests keep their order within a file
    if in_ci():
        return
    keep, dropped = [], []
    missing: dict[str, int] = {}
    for item in items:
        names = [n for marker in item.iter_markers("real_assets") for n in marker.args]
        absent = [n for n in names if find_asset(n) is None]
        if absent:
            dropped.append(item)
            for n in absent:
                missing[n] = missing.get(n, 0) + 1
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    record = {"tests": len(dropped), "assets": sorted(missing)}
    config.stash[_DESELECTED] = record
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller prints the summary
        config.workeroutput[_DESELECTED_KEY] = json.dumps(record)


def pytest_itemcollected(item: pytest.Item) -> None:
    """pytest-timeout's limit for `item` (its own `timeout` mark, else the configured `timeout`) times the machine's
    slowdown: a hang guard sized on this machine unloaded must not fail a test because the machine is busy."""
    try:
        from pytest_timeout import get_env_settings
    except ImportError:  # pytest-timeout not installed: no limit to scale
        return
    marker = item.get_closest_marker("timeout")
    limit = (marker.args[0] if marker.args else marker.kwargs.get("timeout")) if marker else get_env_settings(item.config).timeout
    if limit:
        others = {k: v for k, v in marker.kwargs.items() if k != "timeout"} if marker else {}
        item.add_marker(pytest.mark.timeout(float(limit) * machine_slowdown(), **others), append=False)


def pytest_testnodedown(node, error) -> None:  # noqa: ARG001 - xdist hook signature
    """xdist controller: every worker collects the same items, so one worker's record is the run's."""
    output = getattr(node, "workeroutput", {}).get(_DESELECTED_KEY)
    if output:
        node.config.stash[_DESELECTED] = json.loads(output)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:  # noqa: ARG001
    record = config.stash.get(_DESELECTED, {})
    if record.get("tests"):
        where = ", ".join(f"{REAL_ASSETS[n]}" for n in record["assets"])
        terminalreporter.write_line(
            f"real assets: {record['tests']} test(s) deselected, missing {where}. Provide them in {SHARED} or "
            f"${ASSETS_ENV} or run scripts/fetch_test_assets.sh (same layout; tokenizers also come from the Hugging Face cache or hub); CI=true requires them."
        )


@pytest.fixture(scope="session")
def real_asset() -> Callable[[str], Path]:
    """`real_asset("labeled")` → the asset's path; a missing asset fails the test (it is deselected outside CI)."""

    def resolve(name: str) -> Path:
        path = find_asset(name)
        if path is None:
            where = "CI checkout" if in_ci() else "checkout"
            pytest.fail(f"real test asset '{name}' missing in this {where}: {REAL_ASSETS[name]} under {SHARED} "
                        f"or ${ASSETS_ENV}", pytrace=False)  # fmt: skip
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


@pytest.fixture
def third_training_fails(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """The third `run_training` call of the test raises RuntimeError("injected failure in training 3"), standing in for
    any real failure of a training; the returned function restores the real one."""
    import dialogsum.training.recipe

    real = dialogsum.training.recipe.run_training
    calls = []

    def fails_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in training 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(dialogsum.training.recipe, "run_training", fails_on_the_third)
    return lambda: monkeypatch.setattr(dialogsum.training.recipe, "run_training", real)
