"""A small OpenAI-compatible chat-completions server for tests, with faults injected on demand.

It answers ``POST /v1/chat/completions`` with a deterministic "paraphrase" of the last
user turn (`paraphrase_of`), or, when the system prompt is gradlake's judge's, a grade
(`grade_of`), checks ``Authorization: Bearer <key>`` (401 in OpenAI's
error shape otherwise, quoting the key it got, as OpenAI does) and the model (404
``model_not_found``), and records every request with the answer it got.  Faults are
`Fault` rules, tried in order: the first that matches a request answers it.

429 and 5xx answers carry ``Retry-After: 0`` and ``retry-after-ms``: the openai client
only honours a *positive* delay (``0 < delay <= 120 s``, ``retry-after-ms`` first), so
``Retry-After: 0`` alone would fall back to its 0.5 s exponential backoff; the
millisecond header keeps tests fast.  A dropped connection has no headers, so its retry
waits the client's backoff (about 0.4-0.5 s for the first).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = ("gpt-4o-mini", "test-paraphraser")


def paraphrase_of(text: str) -> str:
    """The server's paraphrase: a fixed, checkable transform of the user text."""
    return "In other words: " + " ".join(reversed(text.split()))


def grade_of(prompt: str) -> str:
    """The server's grade of a judge request: 10 x the word overlap (Jaccard) of answer and reference."""
    reference = prompt.split("Reference answer:\n", 1)[1].split("\n\nAnswer to grade:\n", 1)[0]
    answer = prompt.split("Answer to grade:\n", 1)[1]
    r, a = set(reference.lower().split()), set(answer.lower().split())
    return str(round(10 * len(r & a) / max(1, len(r | a))))


@dataclass
class Fault:
    """An injected fault: what the server does instead of answering, and to which requests."""

    action: int | str  # an HTTP status (429, 500, 503, ...), "drop" (close without answering) or "empty" (blank content)
    prompt: str | None = None  # only requests for this user text; None: any request
    times: int | None = 1  # requests it hits before it is spent; None: every one
    after: int = 0  # only once the server has given this many successful answers

    def hits(self, prompt: str, successes: int) -> bool:
        return ((self.prompt is None or self.prompt == prompt) and (self.times is None or self.times > 0)
                and successes >= self.after)


@dataclass
class Seen:
    """One request the server received, and how it answered (an HTTP status, or 'drop')."""

    prompt: str | None
    status: int | str
    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    seed: int | None = None
    retry_count: str | None = None


@dataclass
class FakeOpenAI:
    """The server; `start` it (port 0 on loopback), point a client at `base_url`, read `seen`."""

    api_key: str = "test-key-0123456789"
    models: tuple[str, ...] = MODELS
    retry_after_ms: int | None = 1
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- what tests use ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def successes(self) -> list[str]:
        """The prompts of every successful (200, non-empty) answer, in order."""
        with self._lock:
            return [s.prompt for s in self.seen if s.status == 200]

    def statuses(self) -> list[int | str]:
        with self._lock:
            return [s.status for s in self.seen]

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()
            self.faults.clear()

    def start(self) -> FakeOpenAI:
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- what the handler uses --------------------------------------------------------------

    def _decide(self, prompt: str) -> int | str:
        """The fault that answers this request (spending one of its times), else 200."""
        with self._lock:
            successes = sum(s.status == 200 for s in self.seen)
            for fault in self.faults:
                if fault.hits(prompt, successes):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault.action
        return 200

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up (a cancelled request) is part of the tests, not news


def _error(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _handler(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers: a drop then hits a reused connection
        timeout = 10

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (cancelled): nothing to tell it
                self.close_connection = True

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"}
                                                            for m in server.models]})
            else:
                self._send(404, _error(f"no route {self.path}", "invalid_request_error", None))

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, _error(f"no route {self.path}", "invalid_request_error", None))
                return
            messages = body.get("messages", [])
            users = [m["content"] for m in messages if m.get("role") == "user"]
            systems = [m["content"] for m in messages if m.get("role") == "system"]
            seen = Seen(prompt=users[-1] if users else None, status=200, model=body.get("model"),
                        system=systems[0] if systems else None, temperature=body.get("temperature"),
                        seed=body.get("seed"), retry_count=self.headers.get("x-stainless-retry-count"))
            given = self.headers.get("Authorization", "")
            if given != f"Bearer {server.api_key}":
                seen.status = 401
                server._record(seen)
                self._send(401, _error(f"Incorrect API key provided: {given.removeprefix('Bearer ')}. You can find "
                                       "your API key at https://platform.openai.com/account/api-keys.",
                                       "invalid_request_error", "invalid_api_key"))
                return
            if seen.model not in server.models:
                seen.status = 404
                server._record(seen)
                self._send(404, _error(f"The model `{seen.model}` does not exist or you do not have access to it.",
                                       "invalid_request_error", "model_not_found"))
                return
            action = server._decide(seen.prompt)
            if action == "drop":
                seen.status = "drop"
                server._record(seen)
                self.close_connection = True  # the handler returns without a byte: the socket just closes
                return
            if isinstance(action, int) and action != 200:
                seen.status = action
                server._record(seen)
                headers = {"Retry-After": "0"}
                if server.retry_after_ms is not None:
                    headers["retry-after-ms"] = str(server.retry_after_ms)
                kind = "rate_limit_exceeded" if action == 429 else "server_error"
                self._send(action, _error(f"injected {action}", kind, kind), headers)
                return
            judging = bool(seen.system and seen.system.startswith("You grade answers"))
            content = "" if action == "empty" else (grade_of if judging else paraphrase_of)(seen.prompt or "")
            seen.status = "empty" if action == "empty" else 200
            server._record(seen)
            self._send(200, {
                "id": f"chatcmpl-test-{len(server.seen)}", "object": "chat.completion", "created": int(time.time()),
                "model": seen.model, "system_fingerprint": "fp_test",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
            })

    return Handler
