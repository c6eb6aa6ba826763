"""A real OpenAI-compatible HTTP server on 127.0.0.1, scripted per request, for tests and benches.

    def handler(body: dict) -> Reply | dict | str:    # the request JSON -> what to answer
        return Reply(text="<revised_response>\\nHi\\n</revised_response>", delay=0.2)

    with OpenAITestServer(handler) as srv:             # ephemeral port, background thread
        client = OpenAI(base_url=srv.base_url, api_key="x")
        ...
        srv.request_count                              # chat completions received (retries included)

As a subprocess (prints `READY <base_url>` once it listens; GET /_test/stats reports counts):

    python -m tlcr_ray.testing.openai_server --mode edit --delay 0.5

Speaks the wire protocol the official SDK expects: POST /v1/chat/completions returns
id/object/created/model/choices[message, finish_reason]/usage; GET /v1/models; errors are OpenAI
error JSON ({"error": {"message", "type", "param", "code"}}) with the reply's status and headers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                408: "timeout_error", 429: "rate_limit_error"}


@dataclass
class Reply:
    """What the server answers to one chat completion request."""

    text: str = ""
    finish_reason: str = "stop"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (a hang: longer than the client's timeout)."""
    error: str = "scripted error"
    """Error message for a non-200 status."""
    refusal: str | None = None


Handler = Callable[[dict], "Reply | dict | str"]


def messages_digest(messages: list[dict]) -> str:
    """Stable id of a request's messages, so a test can tell which rows were requested."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


class OpenAITestServer:
    """Threaded HTTP server; `handler` decides each chat completion's reply."""

    def __init__(self, handler: Handler, model: str = "test-model", port: int = 0, api_key: str | None = None):
        self.handler = handler
        self.model = model
        self.api_key = api_key
        """When set, requests without `Authorization: Bearer <api_key>` get a 401."""
        self.request_count = 0
        self.request_digests: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", port), _RequestHandler)
        self._httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "OpenAITestServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a scripted delay
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, body: dict) -> None:
        with self._lock:
            self.request_count += 1
            self.request_digests.append(messages_digest(body.get("messages", [])))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # do not wait for handlers stuck in a scripted hang
    request_queue_size = 1024  # the default backlog of 5 drops bursts of concurrent connects
    app: OpenAITestServer


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK reuses connections
    server: _Server

    def log_message(self, format: str, *args) -> None:  # quiet: tests run thousands of requests
        pass

    def _authorized(self) -> bool:
        key = self.server.app.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(401, "Incorrect API key provided")
        return False

    def do_GET(self) -> None:
        app = self.server.app
        if self.path.rstrip("/") == "/v1/models" and not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": app.model, "object": "model", "created": 0, "owned_by": "tlcr-test"}]})
        elif self.path == "/_test/stats":
            with app._lock:
                self._json(200, {"requests": app.request_count, "digests": list(app.request_digests)})
        else:
            self._error(404, f"no route GET {self.path}")

    def do_POST(self) -> None:
        app = self.server.app
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route POST {self.path}")
        if not self._authorized():
            return
        try:
            body = json.loads(raw)
            if not isinstance(body.get("messages"), list) or not body.get("model"):
                raise ValueError("`model` and a `messages` list are required")
        except (ValueError, AttributeError) as exc:
            return self._error(400, f"invalid request body: {exc}")
        app._record(body)
        try:
            reply = app.handler(body)
        except Exception as exc:  # a broken script is a server error, visible to the client
            return self._error(500, f"handler failed: {type(exc).__name__}: {exc}")
        if isinstance(reply, str):
            reply = Reply(text=reply)
        elif isinstance(reply, dict):
            reply = Reply(**reply)
        if reply.delay and app._stopping.wait(reply.delay):
            return
        if reply.status != 200:
            return self._error(reply.status, reply.error, reply.headers)
        completion_tokens = len(reply.text.split())
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        self._json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": reply.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": reply.text, "refusal": reply.refusal}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, reply.headers)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}}, headers)

    def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout) before we answered


# --- scripted modes for the subprocess face -------------------------------------------------------

_NON_PREFERRED = re.compile(r"<non_preferred_response>\n(.*?)\n</non_preferred_response>", re.DOTALL)


def edit_handler(delay: float = 0.0) -> Handler:
    """A well-behaved reviser: returns the non-preferred response with one small appended sentence."""

    def handle(body: dict) -> Reply:
        user = next((m["content"] for m in reversed(body["messages"]) if m.get("role") == "user"), "")
        found = _NON_PREFERRED.search(user)
        rejected = found.group(1) if found else ""
        text = f"Here is the edit.\n<revised_response>\n{rejected} I hope that helps.\n</revised_response>"
        return Reply(text=text, delay=delay)

    return handle


MODES: dict[str, Callable[[float], Handler]] = {"edit": edit_handler}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="edit")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    parser.add_argument("--port", type=int, default=0, help="0: an ephemeral port")
    args = parser.parse_args(argv)
    server = OpenAITestServer(MODES[args.mode](args.delay), port=args.port)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with server:
        print(f"READY {server.base_url}", flush=True)
        try:
            done.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
