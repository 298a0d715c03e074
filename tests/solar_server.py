"""A local chat-completions server (the OpenAI/Upstage protocol) on 127.0.0.1 for tests and benchmarks.

`POST /v1/chat/completions` answers with a deterministic summary (the first speaker line of the dialogue) and
usage counts. It can be told to misbehave:

- `script(*actions)`: the next requests, in arrival order, get these actions (then "ok" again);
- `fault_for(marker, action, times=None)`: requests whose last user message contains `marker` get `action`
  (`times` times, or always);
- `rpm_limit` / `window_s`: a sliding-window rate limit; requests over it get 429 with `Retry-After`;
- a wrong `Authorization` header always gets 401.

Actions: ok, 429 (with Retry-After: `retry_after_s`), 500, 503, 400, 401, hang (no answer for `hang_s`, then
the connection closes), drop (connection closed without an answer), malformed (200 with broken JSON), empty
(200 with no choices), blank (200 with an empty summary). Every request is logged in `log`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ACTIONS = ("ok", "429", "500", "503", "400", "401", "hang", "drop", "malformed", "empty", "blank")


@dataclass
class Logged:
    """One request as the server saw it: arrival time, action, status (0 when no answer was sent: hang, drop)."""

    at: float
    action: str
    status: int
    body: dict[str, Any] | None
    authorization: str | None

    @property
    def user_text(self) -> str:
        return last_user_text(self.body)

    @property
    def answered(self) -> bool:
        return self.action == "ok" and self.status == 200


def last_user_text(body: dict[str, Any] | None) -> str:
    """The last user message of a request: the prompt with the dialogue to summarize."""
    messages = (body or {}).get("messages") or []
    users = [str(m.get("content", "")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def summary_for(user_text: str) -> str:
    """The server's answer: the first `#PersonN#: ...` line of the dialogue in the prompt (tags kept)."""
    for line in user_text.splitlines():
        if line.startswith("#Person"):
            return line.replace(":", "", 1).strip()
    return user_text.strip()[:50] or "요약"


class ChatCompletionServer:
    def __init__(
        self,
        api_key: str = "test-key",
        latency_s: float = 0.0,
        rpm_limit: int | None = None,
        window_s: float = 60.0,
        retry_after_s: int = 1,
        hang_s: float = 5.0,
    ):
        self.api_key = api_key
        self.latency_s = latency_s
        self.rpm_limit = rpm_limit
        self.window_s = window_s
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.log: list[Logged] = []
        self._script: deque[str] = deque()
        self._rules: list[list[Any]] = []  # [marker, action, remaining or None]
        self._admitted: deque[float] = deque()
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "ChatCompletionServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(self, *actions: str) -> None:
        _check(actions)
        with self._lock:
            self._script.extend(actions)

    def clear_script(self) -> None:
        with self._lock:
            self._script.clear()

    def fault_for(self, marker: str, action: str, times: int | None = None) -> None:
        _check([action])
        with self._lock:
            self._rules.append([marker, action, times])

    def answered(self) -> Counter:
        """How many successful answers each distinct prompt (last user message) got."""
        with self._lock:
            return Counter(entry.user_text for entry in self.log if entry.answered)

    def entries(self) -> list[Logged]:
        with self._lock:
            return list(self.log)

    def choose_action(self, body: dict[str, Any] | None, authorization: str | None) -> str:
        with self._lock:
            if authorization != f"Bearer {self.api_key}":
                return "401"
            action = self._rule_action(body) or (self._script.popleft() if self._script else "ok")
            if action == "ok" and self.rpm_limit is not None:
                action = self._admit()
            return action

    def retry_after(self) -> int:
        """Seconds until the rate limit admits a request again (at least `retry_after_s`)."""
        with self._lock:
            if self.rpm_limit is None or len(self._admitted) < self.rpm_limit:
                return self.retry_after_s
            wait = self._admitted[0] + self.window_s - time.monotonic()
            return max(self.retry_after_s, math.ceil(wait))

    def record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    def hang(self) -> None:
        self._released.wait(self.hang_s)

    def _rule_action(self, body: dict[str, Any] | None) -> str | None:
        text = last_user_text(body)
        for rule in self._rules:
            marker, action, remaining = rule
            if marker in text and remaining != 0:
                if remaining is not None:
                    rule[2] = remaining - 1
                return action
        return None

    def _admit(self) -> str:
        now = time.monotonic()
        while self._admitted and self._admitted[0] <= now - self.window_s:
            self._admitted.popleft()
        if len(self._admitted) >= self.rpm_limit:
            return "rate_limited"
        self._admitted.append(now)
        return "ok"


def _check(actions) -> None:
    unknown = [a for a in actions if a not in ACTIONS]
    if unknown:
        raise ValueError(f"unknown actions {unknown}; known: {', '.join(ACTIONS)}")


def _handler_for(server: ChatCompletionServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
            pass

        def do_POST(self) -> None:
            arrived = time.monotonic()
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            authorization = self.headers.get("Authorization")
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._entry = Logged(arrived, "not_found", 404, body, authorization)
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            action = server.choose_action(body, authorization)
            # Recorded before the answer is written, so a client that has its answer finds it in the log.
            self._entry = Logged(arrived, action, 0, body, authorization)
            if self._perform(action, body, authorization) == 0:
                server.record(self._entry)

        def _perform(self, action: str, body: dict[str, Any] | None, authorization: str | None) -> int:
            if action == "ok":
                time.sleep(server.latency_s)
                return self._send(200, _completion(body or {}))
            if action in ("429", "rate_limited"):
                retry_after = server.retry_after()
                return self._send(429, {"error": {"message": "rate limit exceeded"}}, {"Retry-After": str(retry_after)})
            if action in ("500", "503", "400"):
                return self._send(int(action), {"error": {"message": f"simulated HTTP {action}"}})
            if action == "401":  # quotes the header, as some APIs do: the client must redact it
                return self._send(401, {"error": {"message": f"invalid API key in {authorization!r}"}})
            if action == "malformed":
                return self._send_raw(200, b'{"choices": [{"message": ')
            if action == "empty":
                usage = {"prompt_tokens": 1, "completion_tokens": 0}
                return self._send(200, {"id": "chatcmpl-local", "choices": [], "usage": usage})
            if action == "blank":
                return self._send(200, _completion(body or {}, text=""))
            if action == "hang":
                server.hang()
            self.close_connection = True  # hang, drop: no answer at all
            return 0

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> int:
            return self._send_raw(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"), headers)

        def _send_raw(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> int:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            server.record(dataclasses.replace(self._entry, status=status))
            self.wfile.write(data)
            return status

    return Handler


def _completion(body: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    messages = body.get("messages") or []
    summary = summary_for(last_user_text(body)) if text is None else text
    prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
    return {
        "id": "chatcmpl-local",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": summary}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_chars // 2 + 1,
            "completion_tokens": len(summary) // 2 + 1,
            "total_tokens": prompt_chars // 2 + len(summary) // 2 + 2,
        },
    }
