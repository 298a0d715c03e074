"""Solar client throughput under a server-side rate limit, against the local chat-completions server.

200 real dialogues (../shared/data/dialogsum-ko/labeled.csv) go through dialogsum's client (thread pool, token
bucket at the published limit, retries honouring Retry-After, answers cached in SQLite as they arrive) to the
server of tests/solar_server.py answering in 100 ms and enforcing 120 requests per minute over a sliding minute
(429 with Retry-After beyond it). Printed: the achieved requests per minute against the limit (target: at least
90 % of it, zero failed rows), the original client's approach for comparison, and a re-run on the same cache
(target: zero requests).

The original approach is one request at a time with a fixed `time.sleep` after each call and no retries (an error
becomes an empty summary). Its pause defaults to 60 / limit seconds, the shortest fixed pause that keeps a
sequential loop under the limit whatever the latency. Being strictly sequential, its time is linear in the row
count: it is measured on --baseline-rows rows and extrapolated to all rows (labelled as such).

    python benchmarks/solar_client.py [--rows 200] [--latency 0.1] [--limit 120] [--concurrency 4]
                                      [--baseline-rows 30] [--baseline-sleep SECONDS] [--data CSV]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from solar_server import ChatCompletionServer  # noqa: E402

from dialogsum.data import read_dialogues  # noqa: E402
from dialogsum.solar.evaluation import build_requests, load_prompt, load_solar_config  # noqa: E402
from dialogsum.solar.cache import CompletionCache  # noqa: E402
from dialogsum.solar.client import SolarClient  # noqa: E402

LABELLED = ROOT.parent / "shared" / "data" / "dialogsum-ko" / "labeled.csv"
KEY = "benchmark-key"
TARGET_SHARE = 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.1, help="server answer time in seconds")
    parser.add_argument("--limit", type=int, default=120, help="server-side requests per minute")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--baseline-rows", type=int, default=30)
    parser.add_argument("--baseline-sleep", type=float, default=None, help="fixed pause (default: 60 / limit)")
    parser.add_argument("--data", type=Path, default=LABELLED)
    return parser.parse_args()


def payloads(data: Path, rows: int, base_url: str, limit: int, concurrency: int):
    """The real requests of `rows` dialogues with the zero-shot prompt, and the client settings."""
    dataset = read_dialogues(data, require_summary=True).head(rows)
    if len(dataset) < rows:
        sys.exit(f"{data} has only {len(dataset)} rows; pass --rows {len(dataset)} or another --data")
    config = load_solar_config(overrides={"client.requests_per_minute": limit, "client.concurrency": concurrency})
    template, _ = load_prompt("solar-zero-shot")
    return build_requests(dataset, template, [], config, base_url), config.client


def run_client(args: argparse.Namespace, server: ChatCompletionServer, cache_dir: Path) -> dict:
    requests_, settings = payloads(args.data, args.rows, server.base_url, args.limit, args.concurrency)
    before = len(server.entries())
    results = {}
    with CompletionCache(cache_dir) as cache, SolarClient(server.base_url, KEY, settings) as client:
        cached = cache.get_many(r.key for r in requests_)
        todo = {r.key: r for r in requests_ if r.key not in cached}

        def on_answer(key, completion):
            cache.put(key, completion, model="bench", prompt="solar-zero-shot", prompt_version="1",
                      fname=todo[key].row.fname)  # fmt: skip
            results[key] = completion

        start = time.perf_counter()
        errors = client.complete_many({k: r.payload for k, r in todo.items()}, on_answer)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "sent": len(todo),
        "answered": len(results),
        "failed": len(errors),
        "http_requests": len(server.entries()) - before,
        "rate_limited": client.stats.rate_limited,
        "retries": client.stats.retries,
    }


def busiest_window(server: ChatCompletionServer, window_s: float = 60.0) -> int:
    """The most requests the server admitted within any `window_s` seconds."""
    times = sorted(e.at for e in server.entries() if e.answered)
    first = 0
    most = 0
    for last, at in enumerate(times):
        while at - times[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def run_original(args: argparse.Namespace, pause: float) -> dict:
    """The original loop: sequential, a fixed pause after every call, any error an empty summary."""
    with ChatCompletionServer(api_key=KEY, latency_s=args.latency, rpm_limit=args.limit) as server:
        requests_, _ = payloads(args.data, args.baseline_rows, server.base_url, args.limit, 1)
        session = requests.Session()
        empty = 0
        start = time.perf_counter()
        for request in requests_:
            try:
                response = session.post(f"{server.base_url}/chat/completions", json=request.payload,
                                         headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
                summary = response.json()["choices"][0]["message"]["content"]
            except (requests.RequestException, ValueError, KeyError, IndexError):
                summary = ""
            empty += not summary
            time.sleep(pause)
        seconds = time.perf_counter() - start
        session.close()
    return {"seconds": seconds, "rows": len(requests_), "empty": empty}


def main() -> int:
    args = parse_args()
    pause = args.baseline_sleep if args.baseline_sleep is not None else 60 / args.limit
    print(
        f"Solar client benchmark: {args.rows} dialogues, server latency {args.latency * 1000:.0f} ms, "
        f"server limit {args.limit} requests/min (429 + Retry-After beyond it)"
    )
    with tempfile.TemporaryDirectory() as tmp, ChatCompletionServer(
        api_key=KEY, latency_s=args.latency, rpm_limit=args.limit
    ) as server:
        ours = run_client(args, server, Path(tmp))
        busiest = busiest_window(server)
        rerun = run_client(args, server, Path(tmp))
    rate = ours["sent"] / ours["seconds"] * 60
    share = rate / args.limit
    print(
        f"dialogsum client (concurrency {args.concurrency}, client limit {args.limit}/min): {ours['answered']} rows in "
        f"{ours['seconds']:.1f} s = {rate:.1f} requests/min = {share:.1%} of the limit; failed rows {ours['failed']}; "
        f"HTTP requests {ours['http_requests']}; 429 answers {ours['rate_limited']}; retries {ours['retries']}; "
        f"most requests the server admitted in any 60 s: {busiest}"
    )

    original = run_original(args, pause)
    per_row = original["seconds"] / original["rows"]
    projected = per_row * args.rows
    print(
        f"original loop (sequential, fixed {pause:.2f} s sleep after each call, no retries): measured on "
        f"{original['rows']} rows, {per_row:.3f} s/row, empty summaries {original['empty']}; extrapolated to "
        f"{args.rows} rows: {projected:.1f} s = {args.rows / projected * 60:.1f} requests/min"
    )
    print(f"speed-up over the original loop: {projected / ours['seconds']:.2f}x")
    print(f"re-run on the same cache: {rerun['http_requests']} requests to the server in {rerun['seconds']:.3f} s")

    checks = {
        f"at least {TARGET_SHARE:.0%} of the limit": share >= TARGET_SHARE,
        "zero failed rows": ours["failed"] == 0 and ours["answered"] == args.rows,
        "zero requests on re-run": rerun["http_requests"] == 0,
    }
    print("targets: " + "; ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks.items()))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
