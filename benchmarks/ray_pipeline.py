"""The quick-start pipeline with `executor: ray` against `executor: local`, side by side on this machine.

1. Ray's own start-up cost, apart: `ray.init` of a local Ray, the first (no-op) task, and `ray.shutdown`.
2. `dialogsum pipeline --config quickstart` twice, each in a fresh folder and store, `--executor local` and
   `--executor ray` (a Ray started by the pipeline, so its start-up is inside that wall time).
3. For each, from the store: the wall time of the training round (first training start to last training end), the
   sum of the trainings' own durations, and their overlap = sum / round wall (1.0: one after another; 3.0: the three
   trainings fully at once). A Ray training's duration counts from `dialogsum.started_at`, when it got its
   resources.

    python benchmarks/ray_pipeline.py [--config quickstart]

On 2 cores the three tiny trainings compete for the same CPUs, so overlap is the number to read, not the speed-up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ray_startup() -> dict[str, float]:
    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    initialized = time.perf_counter()
    ray.get(ray.remote(lambda: None).remote())
    first_task = time.perf_counter()
    ray.shutdown()
    return {"init_s": initialized - start, "first_task_s": first_task - initialized, "shutdown_s": time.perf_counter() - first_task}


def run_pipeline(config: str, executor: str, folder: Path) -> tuple[float, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dialogsum", "pipeline", "--config", config, "--executor", executor],
                          cwd=folder, env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{executor} pipeline failed:\n{done.stderr[-3000:]}")
    parent = next(line.split()[-1] for line in done.stderr.splitlines() if line.startswith("pipeline parent run"))
    return wall, parent


def training_round(folder: Path, parent: str) -> dict[str, float]:
    import mlflow

    from dialogsum.tracking import STARTED_AT_TAG

    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.`dialogsum.kind` = 'train'",
    )
    spans = [(int(r.data.tags.get(STARTED_AT_TAG, r.info.start_time)), r.info.end_time) for r in runs]
    round_wall = (max(end for _, end in spans) - min(start for start, _ in spans)) / 1000
    total = sum(end - start for start, end in spans) / 1000
    return {"trainings": len(spans), "round_wall_s": round_wall, "sum_of_trainings_s": total, "overlap": total / round_wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart")
    args = parser.parse_args()

    startup = ray_startup()
    print(f"Ray start-up: init {startup['init_s']:.1f} s, first task {startup['first_task_s']:.1f} s, "
          f"shutdown {startup['shutdown_s']:.1f} s")  # fmt: skip
    results = {}
    for executor in ("local", "ray"):
        with tempfile.TemporaryDirectory(prefix=f"ray-bench-{executor}-") as tmp:
            wall, parent = run_pipeline(args.config, executor, Path(tmp))
            results[executor] = {"wall_s": wall, **training_round(Path(tmp), parent)}
    print(f"{'executor':<8} {'pipeline wall':>14} {'training round':>15} {'sum of trainings':>17} {'overlap':>8}")
    for executor, r in results.items():
        print(f"{executor:<8} {r['wall_s']:>12.1f} s {r['round_wall_s']:>13.1f} s {r['sum_of_trainings_s']:>15.1f} s {r['overlap']:>7.2f}x")
    local, ray = results["local"], results["ray"]
    print(f"ray / local: pipeline wall {ray['wall_s'] / local['wall_s']:.2f}, training round "
          f"{ray['round_wall_s'] / local['round_wall_s']:.2f}; Ray's start-up (init + first task) "
          f"{startup['init_s'] + startup['first_task_s']:.1f} s of the ray wall")  # fmt: skip


if __name__ == "__main__":
    main()
