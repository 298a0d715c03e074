"""Solar API evaluation against a real HTTP server on 127.0.0.1 (tests/solar_server.py): faults, retries,
rate limits, the persistent cache, a killed and resumed run, MLflow logging, and the key never leaking."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from solar_server import ChatCompletionServer, summary_for
from typer.testing import CliRunner

from dialogsum.cli import app
from dialogsum.config import ConfigError
from dialogsum.data import rows_digest
from dialogsum.metrics import aggregate, score_rows
from dialogsum.solar.evaluation import (
    FAILED_ROWS_ARTIFACT,
    SCOPE_TAG,
    MissingApiKey,
    SolarEvaluationError,
    api_key_from_env,
    evaluate_solar,
    load_prompt,
    load_solar_config,
)
from dialogsum.solar.cache import CacheError, CompletionCache, request_key
from dialogsum.solar.client import (
    Cancelled,
    ClientSettings,
    FatalApiError,
    RateLimiter,
    SolarClient,
)
from dialogsum.tracking import MODEL_TAG, TEST_PREDICTIONS_ARTIFACT, TEST_ROWS_TAG, VAL_ROWS_TAG, load_predictions

KEY = "up_TEST-SECRET-7f3a9c1e5b2d4068"
TOPICS = ["커피 주문", "기차표 환불", "치과 예약", "도서 연체", "호텔 방 변경", "운동화 교환", "택배 분실", "생일 케이크"]


def make_rows(prefix: str, n: int) -> list[tuple[str, str, str]]:
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        dialogue = (
            f"#Person1#: 안녕하세요, {topic} 때문에 왔어요. 접수 번호는 {prefix}-{i}번이에요.\n"
            f"#Person2#: 네, {topic} 건은 제가 도와드릴게요. 연락처를 알려주시겠어요?\n"
            f"#Person1#: 제 번호는 #PhoneNumber#입니다."
        )
        summary = f"#Person1#은 {topic} 때문에 #Person2#에게 도움을 요청하고 연락처를 알려줍니다."
        rows.append((f"{prefix}_{i}", dialogue, summary))
    return rows


def write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["fname", "dialogue", "summary"])
        writer.writerows(rows)
    return path


def write_config(path: Path, **client: object) -> Path:
    settings = {
        "concurrency": 4,
        "requests_per_minute": None,
        "timeout_s": 0.5,
        "max_attempts": 3,
        "backoff_initial_s": 0.02,
        "backoff_max_s": 2,
        **client,
    }
    config = {
        "model": "solar-mini",
        "base_url": "http://127.0.0.1:9/v1",  # never used: every test passes the local server's URL
        "prompt": "solar-few-shot",
        "generation": {"temperature": 0.2, "top_p": 0.3, "max_tokens": 64},
        "client": settings,
        "pricing": {"input_usd_per_million_tokens": 0.15, "output_usd_per_million_tokens": 0.6},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def payload(text: str) -> dict:
    return {
        "model": "solar-mini",
        "messages": [{"role": "user", "content": f"대화:\n#Person1#: {text}\n#Person2#: 네."}],
        "temperature": 0.2,
        "top_p": 0.3,
        "max_tokens": 64,
    }


def fast_client(server: ChatCompletionServer, **overrides: object) -> SolarClient:
    settings = {"concurrency": 2, "requests_per_minute": None, "timeout_s": 0.3, "max_attempts": 3,
                "backoff_initial_s": 0.02, "backoff_max_s": 2, **overrides}  # fmt: skip
    return SolarClient(server.base_url, KEY, ClientSettings(**settings))


def run_all(client: SolarClient, payloads: dict[str, dict]) -> tuple[dict, dict]:
    answers: dict = {}
    errors = client.complete_many(payloads, answers.__setitem__)
    return answers, errors


@pytest.fixture
def server():
    with ChatCompletionServer(api_key=KEY, hang_s=3) as srv:
        yield srv


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow-store")


@pytest.fixture
def env(store: Path, tmp_path: Path, monkeypatch) -> Path:
    """MLflow store and artifacts under the module's temp folder, the test key set, the cache in tmp."""
    monkeypatch.chdir(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.setenv("UPSTAGE_API_KEY", KEY)
    monkeypatch.setenv("DIALOGSUM_CACHE_DIR", str(tmp_path / "cache-root"))
    for name in ("SOLAR_API_KEY", "SOLAR_BASE_URL", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


# --- client: faults, retries, limits -------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "500", "503", "hang", "drop"])
def test_transient_faults_are_retried(server, fault):
    server.script(fault)
    with fast_client(server) as client:
        answers, errors = run_all(client, {"a": payload("안녕하세요")})
    assert errors == {}
    assert answers["a"].text == "#Person1# 안녕하세요"
    assert answers["a"].attempts == 2
    assert client.stats.retries == 1
    log = server.entries()
    assert [e.action for e in log if e.action != "hang"][-1] == "ok"
    if fault == "429":  # Retry-After: 1 is honoured before the retry
        first, retry = log
        assert retry.at - first.at >= 0.95
        assert client.stats.rate_limited == 1


@pytest.mark.parametrize("fault", ["malformed", "empty", "blank"])
def test_bad_answer_is_a_row_error_not_an_empty_summary(server, fault):
    server.script(fault)
    with fast_client(server) as client:
        answers, errors = run_all(client, {"a": payload("안녕하세요"), "b": payload("반가워요")})
    assert len(answers) == len(errors) == 1 and set(answers) | set(errors) == {"a", "b"}
    assert next(iter(errors.values())).startswith(("malformed response", "empty response"))
    assert len(server.entries()) == 2  # answered, so not paid for again


def test_retries_are_bounded_and_the_row_fails_with_the_reason(server):
    server.fault_for("망가진", "503")
    with fast_client(server) as client:
        answers, errors = run_all(client, {"bad": payload("망가진 행"), "good": payload("정상 행")})
    assert set(answers) == {"good"}
    assert errors["bad"].startswith("gave up after 3 attempts: HTTP 503")
    assert sum("망가진" in e.user_text for e in server.entries()) == 3


def test_refused_key_stops_everything_at_once(server, slowdown):
    with SolarClient(server.base_url, "wrong-key", ClientSettings(concurrency=2, requests_per_minute=None)) as client:
        start = time.perf_counter()
        with pytest.raises(FatalApiError, match="HTTP 401.*UPSTAGE_API_KEY"):
            run_all(client, {str(i): payload(f"행 {i}") for i in range(20)})
    assert time.perf_counter() - start < 2 * slowdown
    assert len(server.entries()) <= 2  # the requests already in flight, no retries, no further rows


def test_bad_request_is_fatal_not_retried(server):
    server.script("400")
    with fast_client(server, concurrency=1) as client, pytest.raises(FatalApiError, match="HTTP 400"):
        run_all(client, {str(i): payload(f"행 {i}") for i in range(5)})
    assert len(server.entries()) == 1


def test_server_rate_limit_answers_are_retried_until_done():
    with ChatCompletionServer(api_key=KEY, rpm_limit=3, window_s=1) as server:
        with fast_client(server, concurrency=4, max_attempts=6) as client:
            answers, errors = run_all(client, {str(i): payload(f"행 {i}") for i in range(7)})
    assert errors == {} and len(answers) == 7
    assert client.stats.rate_limited >= 1
    assert sum(server.answered().values()) == 7


class FakeTime:
    """A clock and a stop event whose wait() advances the clock instead of sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.now += seconds
        return False

    def is_set(self) -> bool:
        return False


def test_rate_limiter_spaces_requests_evenly_and_honours_tokens_and_pauses():
    fake = FakeTime()
    limiter = RateLimiter(requests_per_minute=120, clock=fake)
    starts = []
    for _ in range(4):
        limiter.acquire(0, fake)
        starts.append(fake.now)
    assert starts == pytest.approx([0, 0.5, 1.0, 1.5])
    limiter.pause(3)
    limiter.acquire(0, fake)
    assert fake.now == pytest.approx(4.5)

    fake = FakeTime()
    limiter = RateLimiter(requests_per_minute=None, tokens_per_minute=600, clock=fake)  # 10 tokens/s
    limiter.acquire(10, fake)
    limiter.acquire(10, fake)
    assert fake.now == pytest.approx(1.0)
    limiter.settle(estimated=10, actual=30)  # the server reported 20 more tokens than estimated
    limiter.acquire(10, fake)
    assert fake.now == pytest.approx(4.0)


def test_stopped_limiter_raises_instead_of_waiting(slowdown):
    stop = threading.Event()
    limiter = RateLimiter(requests_per_minute=1)
    limiter.acquire(0, stop)
    threading.Timer(0.1, stop.set).start()
    start = time.perf_counter()
    with pytest.raises(Cancelled):
        limiter.acquire(0, stop)  # would wait a minute
    assert time.perf_counter() - start < 2 * slowdown


# --- configuration, prompts, cache keys ------------------------------------------------------------------------


def test_config_rejects_unknown_keys_naming_file_and_key(tmp_path):
    path = tmp_path / "solar.yaml"
    path.write_text("model: solar-mini\nclient:\n  concurency: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"(?s)solar\.yaml.*key 'client\.concurency': unknown key"):
        load_solar_config(path)
    config = load_solar_config(overrides={"model": "solar-pro", "client.concurrency": 9, "generation.top_p": None})
    assert (config.model, config.client.concurrency, config.generation.top_p) == ("solar-pro", 9, 0.3)


def test_prompts_are_versioned_and_keep_speaker_tags(tmp_path):
    for name, shots in (("solar-zero-shot", 0), ("solar-few-shot", 3)):
        template, path = load_prompt(name)
        assert template.version >= 1 and template.shots == shots and path.name == f"{name}.yaml"
        assert "#Person1#" in template.system
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nversion: 1\nsystem: s\nuser: 요약하세요\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"(?s)broken\.yaml.*key 'user'.*\{dialogue\}"):
        load_prompt(str(broken))


def test_cache_key_covers_model_prompt_version_parameters_dialogue_and_endpoint():
    base = payload("안녕하세요")
    key = request_key("http://a/v1", "p", "1", base)
    assert key == request_key("http://a/v1/", "p", "1", dict(base))
    variants = [
        request_key("http://b/v1", "p", "1", base),
        request_key("http://a/v1", "q", "1", base),
        request_key("http://a/v1", "p", "2", base),
        request_key("http://a/v1", "p", "1", {**base, "model": "solar-pro"}),
        request_key("http://a/v1", "p", "1", {**base, "temperature": 0.3}),
        request_key("http://a/v1", "p", "1", {**base, "top_p": 0.9}),
        request_key("http://a/v1", "p", "1", {**base, "max_tokens": 65}),
        request_key("http://a/v1", "p", "1", payload("안녕히 가세요")),
    ]
    assert key not in variants and len(set(variants)) == len(variants)


def test_unreadable_cache_file_is_a_clear_error(tmp_path):
    (tmp_path / "completions.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CacheError, match="completions.sqlite3.*move it away"):
        CompletionCache(tmp_path)


def test_api_key_comes_from_either_variable(monkeypatch):
    monkeypatch.delenv("UPSTAGE_API_KEY", raising=False)
    monkeypatch.setenv("SOLAR_API_KEY", "other")
    assert api_key_from_env() == "other"
    monkeypatch.setenv("UPSTAGE_API_KEY", "first")
    assert api_key_from_env() == "first"


# --- evaluation runs ---------------------------------------------------------------------------------------------


def test_evaluation_logs_everything_and_a_second_run_pays_nothing(server, env):
    evaluated = make_rows("dev", 6)
    data = write_csv(env / "dev.csv", evaluated)
    same_fname = ("dev_0", "#Person1#: 다른 대화\n#Person2#: 네.", "다른 요약")
    same_text = ("train_x", evaluated[1][1], evaluated[1][2])
    eligible = make_rows("train", 3)
    train = write_csv(env / "train.csv", [same_fname, same_text, *eligible])
    config = write_config(env / "solar.yaml")
    kwargs = dict(train_path=train, cache_dir=env / "cache", config_path=config, base_url=server.base_url)

    test_rows = make_rows("test", 3)
    test_data = write_csv(env / "test.csv", test_rows)
    run_id = evaluate_solar(data, test_path=test_data, model="solar-pro", temperature=0.7, **kwargs)

    bodies = [e.body for e in server.entries()]
    assert len(bodies) == 9
    for body in bodies:  # the configured and overridden parameters are what was sent
        assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == ("solar-pro", 0.7, 0.3, 64)
        examples = body["messages"][1:-1]
        assert sorted(m["content"] for m in examples if m["role"] == "assistant") == sorted(r[2] for r in eligible)
        assert not any(row[1] in m["content"] for m in examples for row in evaluated + test_rows)
    assert {e.authorization for e in server.entries()} == {f"Bearer {KEY}"}

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[MODEL_TAG] == "solar-api:solar-pro"
    params = run.data.params
    assert (params["model"], params["prompt.name"], params["prompt.version"]) == ("solar-pro", "solar-few-shot", "1")
    generation = [params[f"generation.{name}"] for name in ("temperature", "top_p", "max_tokens")]
    assert generation == ["0.7", "0.3", "64"]
    table = load_predictions(run_id)
    columns = ["fname", "dialogue", "reference", "prediction", "rouge1", "rouge2", "rougeL", "final", "error"]
    assert list(table.columns[: len(columns)]) == columns
    assert table["error"].isna().all()
    expected_predictions = [summary_for(f"대화:\n{row[1]}") for row in evaluated]
    assert list(table["prediction"]) == expected_predictions  # tags kept, nothing post-processed
    assert all(p.startswith("#Person1#") for p in table["prediction"])
    expected = aggregate(score_rows(expected_predictions, [row[2] for row in evaluated]))
    metrics = run.data.metrics
    assert {k: metrics[f"val_{k}"] for k in expected} == pytest.approx(expected)
    assert metrics["val_final_ci95_low"] <= metrics["val_final"] <= metrics["val_final_ci95_high"]
    test_table = load_predictions(run_id, TEST_PREDICTIONS_ARTIFACT)
    assert list(test_table["fname"]) == [r[0] for r in test_rows]
    assert metrics["test_final"] == pytest.approx(test_table["final"].mean())
    assert run.data.tags[VAL_ROWS_TAG] == rows_digest([r[0] for r in evaluated], [r[2] for r in evaluated])
    assert run.data.tags[TEST_ROWS_TAG] == rows_digest([r[0] for r in test_rows], [r[2] for r in test_rows])
    assert (metrics["rows"], metrics["answered_rows"], metrics["failed_rows"], metrics["cache_hits"]) == (9, 9, 0, 0)
    assert metrics["api_requests"] == 9 and metrics["retries"] == 0
    assert metrics["tokens_in"] > 0 and metrics["tokens_out"] > 0
    cost = (metrics["tokens_in"] * 0.15 + metrics["tokens_out"] * 0.6) / 1e6
    assert metrics["estimated_cost_usd"] == pytest.approx(cost)
    assert 0 < metrics["latency_p50_s"] <= metrics["latency_p95_s"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "prompt")}
    assert "prompt/solar-few-shot.yaml" in artifacts

    second = evaluate_solar(data, model="solar-pro", temperature=0.7, **kwargs)

    assert len(server.entries()) == 9  # zero requests the second time
    again = mlflow.get_run(second).data.metrics
    assert (again["cache_hits"], again["api_requests"], again["tokens_in"]) == (6, 0, 0)
    assert again["val_final"] == pytest.approx(metrics["val_final"])


def test_failed_rows_score_zero_beside_the_answered_score_then_are_retried_on_rerun(server, env, monkeypatch):
    rows = make_rows("dev", 6)
    data = write_csv(env / "dev.csv", rows)
    config = write_config(env / "solar.yaml")
    server.fault_for("dev-1번", "503")
    server.fault_for("dev-4번", "malformed", times=1)
    monkeypatch.setenv("SOLAR_BASE_URL", server.base_url)
    kwargs = dict(prompt="solar-zero-shot", cache_dir=env / "cache", config_path=config)

    run_id = evaluate_solar(data, **kwargs)

    run = mlflow.get_run(run_id)
    metrics = run.data.metrics
    assert (metrics["rows"], metrics["answered_rows"], metrics["failed_rows"]) == (6, 4, 2)
    assert metrics["retries"] == 2
    assert run.data.tags[SCOPE_TAG].startswith("val: 4 of 6 rows answered; the 2 failed rows score 0 in *_final")
    table = load_predictions(run_id).set_index("fname")
    assert table.loc["dev_1", "error"].startswith("gave up after 3 attempts: HTTP 503")
    assert table.loc["dev_4", "error"].startswith("malformed response")
    for fname in ("dev_1", "dev_4"):
        assert table.loc[fname, ["prediction", "rouge1", "rouge2", "rougeL", "final"]].isna().all()
    ok = table[table["error"].isna()]
    expected = aggregate(score_rows(list(ok["prediction"]), list(ok["reference"])))
    assert metrics["val_final_answered"] == pytest.approx(expected["final"])
    assert metrics["val_final"] == pytest.approx(expected["final"] * 4 / 6), "a failed row scores 0 over all requested rows"
    assert metrics["val_answered_fraction"] == pytest.approx(4 / 6) and metrics["answered_fraction"] == pytest.approx(4 / 6)
    failed = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{FAILED_ROWS_ARTIFACT}")
    assert [f["fname"] for f in failed] == ["dev_1", "dev_4"]

    rerun = mlflow.get_run(evaluate_solar(data, **kwargs)).data.metrics

    assert (rerun["cache_hits"], rerun["failed_rows"], rerun["answered_rows"]) == (4, 1, 5)
    assert sum(server.answered().values()) == 5


def test_no_key_says_so_and_creates_no_run(server, env, monkeypatch):
    monkeypatch.delenv("UPSTAGE_API_KEY")
    data = write_csv(env / "dev.csv", make_rows("dev", 2))
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(MissingApiKey, match="UPSTAGE_API_KEY"):
        evaluate_solar(data, base_url=server.base_url, cache_dir=env / "cache")
    result = CliRunner().invoke(app, ["evaluate-solar", "--data", str(data), "--base-url", server.base_url])
    assert result.exit_code == 1
    assert "no Upstage API key" in result.output and "UPSTAGE_API_KEY" in result.output
    assert len(mlflow.search_runs(search_all_experiments=True)) == before
    assert server.entries() == []


def test_api_key_never_reaches_the_mlflow_store(server, env, store):
    data = write_csv(env / "dev.csv", make_rows("dev", 3))
    config = write_config(env / "solar.yaml")
    kwargs = dict(prompt="solar-zero-shot", cache_dir=env / "cache", config_path=config, base_url=server.base_url)
    evaluate_solar(data, **kwargs)
    server.script("401")  # the server's refusal quotes the Authorization header
    with pytest.raises(FatalApiError) as refused:
        evaluate_solar(write_csv(env / "other.csv", make_rows("other", 3)), **kwargs)
    server.fault_for("all-", "503")
    with pytest.raises(SolarEvaluationError, match="all 2 rows failed"):
        evaluate_solar(write_csv(env / "all.csv", make_rows("all", 2)), **kwargs)

    assert KEY not in str(refused.value) and "***" in str(refused.value)
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"], max_results=2)
    assert list(runs["status"]) == ["FAILED", "FAILED"]
    assert list(runs["tags.error.type"]) == ["SolarEvaluationError", "FatalApiError"]
    files = [p for p in store.rglob("*") if p.is_file()]
    assert any(p.name == "traceback.txt" for p in files) and any(p.name == "mlflow.db" for p in files)
    leaks = [p for p in files if KEY.encode() in p.read_bytes()]
    assert leaks == []


def test_killed_run_resumes_without_paying_twice(server, env, store, slowdown):
    rows = make_rows("kill", 8)
    data = write_csv(env / "kill.csv", rows)
    cache_dir = env / "cache"
    server.hang_s = 60
    server.script(*(["ok"] * 3 + ["hang"] * 20))  # three answers, then the API stops answering
    command = [sys.executable, "-m", "dialogsum", "evaluate-solar", "--data", str(data), "--prompt", "solar-zero-shot",
               "--base-url", server.base_url, "--cache-dir", str(cache_dir),
               "--config", str(write_config(env / "slow.yaml", timeout_s=60))]  # fmt: skip
    output = env / "first-run.log"
    with output.open("wb") as out:
        proc = subprocess.Popen(command, cwd=store, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60 * slowdown
            while _cached_rows(cache_dir) < 3:
                assert proc.poll() is None, output.read_text(encoding="utf-8")
                assert time.monotonic() < deadline, "the first run never cached three answers"
                time.sleep(0.05)
        finally:
            proc.kill()  # SIGKILL: no cleanup, like a crash
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert sum(server.answered().values()) == 3

    server.clear_script()
    run_id = evaluate_solar(data, prompt="solar-zero-shot", base_url=server.base_url, cache_dir=cache_dir,
                            config_path=write_config(env / "solar.yaml"))  # fmt: skip

    answered = server.answered()
    assert sorted(answered.values()) == [1] * 8  # every dialogue answered exactly once over both runs
    assert all(any(row[1] in text for text in answered) for row in rows)
    metrics = mlflow.get_run(run_id).data.metrics
    assert (metrics["cache_hits"], metrics["api_requests"], metrics["failed_rows"]) == (3, 5, 0)


def _cached_rows(folder: Path) -> int:
    if not (folder / "completions.sqlite3").exists():
        return 0
    with CompletionCache(folder) as cache:
        return len(cache)
