"""A client for Upstage's OpenAI-compatible chat-completions API that survives a flaky API and never leaks the key.

- HTTP: `requests`, one Session per worker thread (a Session is not documented as thread-safe).
- Concurrency: a thread pool of `concurrency` workers; each answer is handed to a callback in the worker as soon
  as it arrives, so the caller can persist it before anything else can go wrong.
- Retries: `tenacity`, on 408/429/5xx, timeouts and connection errors, with exponential backoff and jitter, or
  the server's `Retry-After` when it sends one. 401/403 and other 4xx stop all work at once (`FatalApiError`):
  repeating them would only repeat the refusal. A malformed or empty answer is that row's error (no retry: the
  server answered, and retrying a deterministic refusal would pay again); it is never an empty summary.
- Rate limit: a token bucket written here, because it needs together what the common limiter libraries offer
  separately: requests per minute, tokens per minute (estimated before a call, corrected by the usage the server
  reports after it), and one pause shared by every worker when the server answers 429.

No message produced here contains the API key: every error text passes through `redact`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import requests
from pydantic import Field
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from dialogsum.config import StrictModel

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})
CHARS_PER_TOKEN_ESTIMATE = 2  # Korean text in Solar's tokenizer; only used until the server reports real usage
ERROR_TEXT_LIMIT = 300


class SolarApiError(RuntimeError):
    """An API call that did not produce a summary."""


class FatalApiError(SolarApiError):
    """A refusal that would repeat for every row (bad key, bad model or parameters): all work stops."""


class RetryableApiError(SolarApiError):
    """A failure worth retrying (rate limit, server error, timeout, connection); `retry_after` in seconds if sent."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class BadResponseError(SolarApiError):
    """The server answered 200 but without a usable summary (not JSON, no choices, empty content)."""


class Cancelled(SolarApiError):
    """Work stopped because another row hit a fatal error or the caller was interrupted."""


class ClientSettings(StrictModel):
    """How the client talks to the API (the `client` section of configs/solar.yaml)."""

    concurrency: int = Field(4, ge=1, le=64)
    requests_per_minute: float | None = Field(100, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout_s: float = Field(60, gt=0)
    max_attempts: int = Field(6, ge=1)
    backoff_initial_s: float = Field(1, gt=0)
    backoff_max_s: float = Field(60, gt=0)


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    tokens_in: int
    tokens_out: int
    latency_s: float
    attempts: int = 1


class _Bucket:
    """A token bucket: `rate` units per second up to `capacity`; the level may go negative (debt)."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, amount: float) -> float:
        """Seconds until `amount` (at most a full bucket) is available."""
        missing = min(amount, self.capacity) - self.level
        return max(0.0, missing / self.rate)


class RateLimiter:
    """Client-side limits shared by all workers: requests per minute (evenly spaced, no bursts), optionally
    tokens per minute, and a pause that everyone honours after the server signals a rate limit."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._clock = clock
        now = clock()
        self._requests = _Bucket(requests_per_minute / 60, 1, now) if requests_per_minute else None
        self._tokens = _Bucket(tokens_per_minute / 60, tokens_per_minute / 60, now) if tokens_per_minute else None
        self._paused_until = now
        self._lock = threading.Lock()

    def acquire(self, tokens: int, stop: threading.Event) -> None:
        """Block until one request of `tokens` estimated tokens may be sent; raises Cancelled if `stop` is set."""
        while True:
            if stop.is_set():
                raise Cancelled("stopped before sending")
            with self._lock:
                delay = self._delay(tokens)
                if delay <= 0:
                    self._take(tokens)
                    return
            stop.wait(delay)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the tokens bucket once the server has reported the real usage of a call."""
        if self._tokens is not None:
            with self._lock:
                self._tokens.level = min(self._tokens.capacity, self._tokens.level + estimated - actual)

    def pause(self, seconds: float) -> None:
        """Nobody sends before `seconds` from now (the server said it is rate limiting us)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def _delay(self, tokens: int) -> float:
        now = self._clock()
        delays = [self._paused_until - now]
        for bucket, amount in ((self._requests, 1), (self._tokens, tokens)):
            if bucket is not None:
                bucket.refill(now)
                delays.append(bucket.delay(amount))
        return max(delays)

    def _take(self, tokens: int) -> None:
        if self._requests is not None:
            self._requests.level -= 1
        if self._tokens is not None:
            self._tokens.level -= tokens


class _Stats:
    """Counters shared by the workers: HTTP attempts, retries and 429 answers."""

    def __init__(self) -> None:
        self.attempts = 0
        self.retries = 0
        self.rate_limited = 0
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


class SolarClient:
    """Sends chat-completion payloads to `{base_url}/chat/completions` with the settings' limits and retries."""

    def __init__(self, base_url: str, api_key: str, settings: ClientSettings):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.settings = settings
        self.stats = _Stats()
        self._api_key = api_key
        self._limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def __enter__(self) -> "SolarClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def complete_many(
        self,
        payloads: Mapping[str, dict[str, Any]],
        on_answer: Callable[[str, Completion], None],
    ) -> dict[str, str]:
        """Send every payload (at most `concurrency` at a time); returns {key: error} for the rows that failed.

        `on_answer(key, completion)` runs in the worker thread as soon as an answer arrives. A FatalApiError stops
        all work: queued rows are dropped, rows in flight finish (their answers still reach `on_answer`), and the
        error is raised.
        """
        errors: dict[str, str] = {}
        if not payloads:
            return errors
        stop = threading.Event()
        workers = min(self.settings.concurrency, len(payloads))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="solar")
        try:
            futures = {pool.submit(self._complete_row, key, p, on_answer, stop): key for key, p in payloads.items()}
            for done, future in enumerate(as_completed(futures), start=1):
                error = future.result()
                if error is not None:
                    errors[futures[future]] = error
                _log_progress(done, len(payloads))
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        return errors

    def complete(self, payload: dict[str, Any], stop: threading.Event | None = None) -> Completion:
        """One summary, retried as configured; raises RetryableApiError once the attempts are used up."""
        stop = stop or threading.Event()
        retrying = Retrying(
            retry=retry_if_exception_type(RetryableApiError),
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=self._wait,
            sleep=lambda seconds: _interruptible_sleep(seconds, stop),
            before_sleep=self._before_retry,
            reraise=True,
        )
        completion = retrying(self._attempt, payload, stop)
        return dataclasses.replace(completion, attempts=retrying.statistics["attempt_number"])

    def _complete_row(
        self,
        key: str,
        payload: dict[str, Any],
        on_answer: Callable[[str, Completion], None],
        stop: threading.Event,
    ) -> str | None:
        try:
            completion = self.complete(payload, stop)
        except RetryableApiError as e:
            return f"gave up after {self.settings.max_attempts} attempts: {e}"
        except (BadResponseError, Cancelled) as e:
            return str(e)
        except FatalApiError:
            stop.set()
            raise
        on_answer(key, completion)
        return None

    def _attempt(self, payload: dict[str, Any], stop: threading.Event) -> Completion:
        estimate = estimate_tokens(payload)
        self._limiter.acquire(estimate, stop)
        self.stats.add("attempts")
        start = time.perf_counter()
        try:
            response = self._session().post(
                self.url,
                json=payload,
                headers={"Authorization": f"Bearer {self._api_key}"},
                timeout=self.settings.timeout_s,
            )
        except requests.Timeout:
            raise RetryableApiError(f"no answer within {self.settings.timeout_s:g} s") from None
        except requests.ConnectionError as e:
            raise RetryableApiError(self._short(f"connection failed: {e}")) from None
        latency = time.perf_counter() - start
        self._check_status(response)
        completion = self._parse(response, latency)
        self._limiter.settle(estimate, completion.tokens_in + completion.tokens_out)
        return completion

    def _check_status(self, response: requests.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        detail = self._short(_server_message(response))
        if status in AUTH_STATUS:
            raise FatalApiError(
                f"the API refused the key (HTTP {status}: {detail}); check UPSTAGE_API_KEY / SOLAR_API_KEY"
            )
        if status in RETRYABLE_STATUS:
            if status == 429:
                self.stats.add("rate_limited")
            raise RetryableApiError(f"HTTP {status}: {detail}", status, _retry_after(response))
        raise FatalApiError(
            f"the API refused the request (HTTP {status}: {detail}); "
            "check the model and parameters in configs/solar.yaml"
        )

    def _parse(self, response: requests.Response, latency: float) -> Completion:
        try:
            body = response.json()
        except ValueError:
            raise BadResponseError(self._short(f"malformed response (not JSON): {response.text!r}")) from None
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BadResponseError("malformed response: no choices")
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str) or not content.strip():
            raise BadResponseError("empty response: the answer has no summary text")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return Completion(
            text=content.strip(),
            tokens_in=int(usage.get("prompt_tokens") or 0),
            tokens_out=int(usage.get("completion_tokens") or 0),
            latency_s=latency,
        )

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetryableApiError) and error.retry_after is not None:
            return min(error.retry_after, self.settings.backoff_max_s)
        backoff = wait_exponential_jitter(
            initial=self.settings.backoff_initial_s,
            max=self.settings.backoff_max_s,
            jitter=self.settings.backoff_initial_s,
        )
        return backoff(state)

    def _before_retry(self, state: RetryCallState) -> None:
        self.stats.add("retries")
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, RetryableApiError) and error.status == 429:
            self._limiter.pause(state.upcoming_sleep)
        logger.warning(
            "%s; retry %d/%d in %.1f s",
            error,
            state.attempt_number,
            self.settings.max_attempts - 1,
            state.upcoming_sleep,
        )

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _short(self, text: str) -> str:
        text = self.redact(text)
        return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + "..."


def estimate_tokens(payload: dict[str, Any]) -> int:
    """Tokens a call may use, for the tokens-per-minute limit: prompt characters / 2 plus the completion budget."""
    chars = sum(len(str(m.get("content", ""))) for m in payload.get("messages", []))
    return chars // CHARS_PER_TOKEN_ESTIMATE + int(payload.get("max_tokens") or 0)


def _interruptible_sleep(seconds: float, stop: threading.Event) -> None:
    if stop.wait(seconds):
        raise Cancelled("stopped while waiting to retry")


def _retry_after(response: requests.Response) -> float | None:
    """`Retry-After` in seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason or "no details"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(body)


def _log_progress(done: int, total: int) -> None:
    step = max(1, total // 10)
    if done % step == 0 or done == total:
        logger.info("%d/%d requests done", done, total)
