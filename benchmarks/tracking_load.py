"""Tracking load: N concurrent writer processes log metrics to a team `mlflow server` on PostgreSQL and to one local
SQLite file; metrics/s and p95 log latency are printed side by side.

    python benchmarks/tracking_load.py --writers 4 --metrics 200 [--workers 2] [--basic-auth]

The server is started here with tests/tracking_server.py (PostgreSQL on 127.0.0.1:5432, a fresh database dropped
afterwards, proxied artifacts in a temp folder). Each writer process opens its own run and calls
`MlflowClient.log_metric` synchronously M times, as a training loop does; all writers start together once their
imports are done, and the two stores are measured one after the other. Every stored point is counted back, so a
lost metric shows as a shortfall in `stored`, and a failed call (e.g. "database is locked") in `errors`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tracking_server import ensure_postgres, fresh_database, mlflow_server, new_admin_credentials  # noqa: E402

EXPERIMENT = "tracking-load"


@dataclass
class WriterResult:
    run_id: str
    latencies: list[float]
    errors: list[str]
    started: float
    finished: float


def _writer(uri: str, env: dict[str, str], metrics: int, barrier, results) -> None:
    os.environ.update(env)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    latencies, errors = [], []
    barrier.wait()
    started = time.time()
    for step in range(metrics):
        begin = time.perf_counter()
        try:
            client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
        except Exception as e:  # counted and reported: the point of the benchmark is what fails under load
            errors.append(f"{type(e).__name__}: {e}"[:200])
        latencies.append(time.perf_counter() - begin)
    finished = time.time()
    client.set_terminated(run_id)
    results.put(WriterResult(run_id, latencies, errors, started, finished))


@dataclass
class LoadResult:
    store: str
    metrics_per_s: float
    p50_ms: float
    p95_ms: float
    stored: int
    expected: int
    errors: list[str]


def measure(store: str, uri: str, env: dict[str, str], writers: int, metrics: int) -> LoadResult:
    """Run `writers` processes against `uri` at once and count what was stored."""
    os.environ.update(env)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(writers + 1), context.Queue()
    processes = [context.Process(target=_writer, args=(uri, env, metrics, barrier, results)) for _ in range(writers)]
    for process in processes:
        process.start()
    barrier.wait()
    done = [results.get(timeout=3600) for _ in processes]
    for process in processes:
        process.join()
    latencies = sorted(x for r in done for x in r.latencies)
    wall = max(r.finished for r in done) - min(r.started for r in done)
    stored = sum(len(client.get_metric_history(r.run_id, "loss")) for r in done)
    return LoadResult(
        store,
        metrics_per_s=writers * metrics / wall,
        p50_ms=1000 * statistics.median(latencies),
        p95_ms=1000 * latencies[int(0.95 * (len(latencies) - 1))],
        stored=stored,
        expected=writers * metrics,
        errors=[e for r in done for e in r.errors],
    )


def print_table(results: list[LoadResult], writers: int, metrics: int) -> None:
    print(f"\ntracking load: {writers} writer processes x {metrics} synchronous log_metric calls each")
    print(f"{'store':<28}{'metrics/s':>11}{'p50 ms':>9}{'p95 ms':>9}{'stored':>15}{'errors':>8}")
    for r in results:
        print(f"{r.store:<28}{r.metrics_per_s:>11.1f}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}{f'{r.stored}/{r.expected}':>15}{len(r.errors):>8}")
    server, local = results
    print(f"server/SQLite: throughput x{server.metrics_per_s / local.metrics_per_s:.2f}, p95 latency x{server.p95_ms / local.p95_ms:.2f}")
    for r in results:
        for error in sorted(set(r.errors))[:3]:
            print(f"  {r.store}: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--metrics", type=int, default=200, help="log_metric calls per writer")
    parser.add_argument("--workers", type=int, default=2, help="mlflow server worker processes")
    parser.add_argument("--basic-auth", action="store_true", help="run the server with --app-name basic-auth")
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" line per writer
    ensure_postgres()
    credentials = new_admin_credentials() if args.basic_auth else None
    label = "server on PostgreSQL" + (" + auth" if credentials else "")
    with tempfile.TemporaryDirectory(prefix="tracking-load-") as tmp, fresh_database("load") as backend_uri:
        with mlflow_server(backend_uri, Path(tmp) / "server", credentials=credentials, workers=args.workers) as server:
            on_server = measure(label, server.uri, server.client_env(), args.writers, args.metrics)
        sqlite_uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        on_sqlite = measure("local SQLite (one file)", sqlite_uri, {"MLFLOW_TRACKING_URI": sqlite_uri}, args.writers, args.metrics)
    print_table([on_server, on_sqlite], args.writers, args.metrics)


if __name__ == "__main__":
    main()
