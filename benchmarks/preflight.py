"""How fast does a doomed pipeline tell you it is doomed?

Runs `dialogsum pipeline --config seed-full` offline (no weights reachable; the bundled sample stands in for the
competition files it names: data/train.csv, data/dev.csv, data/test.csv) against an existing, empty SQLite store and prints the seconds from start until every one of the six seed models has its verdict
as a FAILED child run in the store, next to the original pipeline's 21 minutes until its last failure.

    python benchmarks/preflight.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dialogsum.data import sample_data_path

SEED_MODELS = {"kobart", "llama-3.2-korean-3b", "qwen3-4b", "solar-10.7b", "polyglot-ko-12.8b", "kullm-v2"}
ORIGINAL_SECONDS = 21 * 60


def blocked_children(db: Path) -> dict[str, str]:
    """model → error message for FAILED train children, read straight from the store's database."""
    import sqlite3

    if not db.exists():
        return {}
    query = """
        SELECT m.value, e.value FROM runs r
        JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'dialogsum.kind' AND k.value = 'train'
        JOIN tags m ON m.run_uuid = r.run_uuid AND m.key = 'dialogsum.model'
        JOIN tags e ON e.run_uuid = r.run_uuid AND e.key = 'error.message'
        WHERE r.status = 'FAILED'
    """
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return dict(conn.execute(query).fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
        store_start = time.perf_counter()
        from mlflow import MlflowClient

        MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()  # a team's store exists before a pipeline runs
        store_s = time.perf_counter() - store_start
        (Path(tmp) / "data").mkdir()
        for name, split in (("train", "train"), ("dev", "dev"), ("test", "test")):
            shutil.copy(sample_data_path(split), Path(tmp) / "data" / f"{name}.csv")
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "dialogsum", "pipeline", "--config", "seed-full"],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        verdicts: dict[str, str] = {}
        while process.poll() is None and set(verdicts) != SEED_MODELS:
            time.sleep(0.1)
            verdicts = blocked_children(db)
        all_verdicts_s = time.perf_counter() - start
        process.wait(timeout=300)
        total_s = time.perf_counter() - start
    print(f"six seed models, offline, seed-full.yaml: {len(verdicts)}/6 verdicts stored as FAILED child runs")
    for model in sorted(verdicts):
        print(f"  {model:20s} {verdicts[model][:110]}")
    print(f"creating the empty SQLite store beforehand (MLflow's migrations, not timed below): {store_s:.1f} s")
    print(f"seconds from command start (interpreter start and imports included) until every verdict was in the store: "
          f"{all_verdicts_s:.1f} s (target < 10 s)")
    print(f"whole pipeline incl. skipped steps, matrix and report: {total_s:.1f} s (exit code {process.returncode})")
    print(f"original pipeline until its last failure: {ORIGINAL_SECONDS / 60:.0f} min -> {ORIGINAL_SECONDS / all_verdicts_s:.0f}x sooner")


if __name__ == "__main__":
    main()
