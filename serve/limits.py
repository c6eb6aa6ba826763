"""Request limits and the messages that name them.

Items per request and characters per text field live in the request schema (422, e.g. `body.items: List
should have at most 64 items after validation, not 65 (serve.max_items)`); body size (checked before
parsing) and tokens per item are 413s, e.g. `items[3] has 1500 tokens; the limit is serve.max_tokens=1024`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import HTTPException


@dataclass(frozen=True)
class Limits:
    max_items: int
    max_chars: int
    max_tokens: int
    max_body_bytes: int


def too_large(message: str) -> HTTPException:
    return HTTPException(status_code=413, detail=message)


def limit_hint(error: dict) -> str:
    """Name the config key behind a pydantic size error (items per request, characters per text field)."""
    if error.get("type") == "string_too_long":
        return " (serve.max_chars)"
    if error.get("type") == "too_long" and tuple(error.get("loc", ()))[-1:] in (("items",), ("query",), ("prompts",)):
        return " (serve.max_items)"
    return ""


def check_tokens(limits: Limits, lengths: list[int], field: str) -> None:
    for index, length in enumerate(lengths):
        if length > limits.max_tokens:
            raise too_large(f"{field}[{index}] has {length} tokens; the limit is serve.max_tokens={limits.max_tokens}")


class BodySizeLimit:
    """ASGI middleware: answer 413 once a request body passes `max_bytes` (declared or streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over serve.max_body_bytes={self.max_bytes}"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _reply_413(send, message)
        seen = 0

        async def counting_receive():
            # Raised while the route reads the body: FastAPI turns an HTTPException into the 413 reply.
            nonlocal seen
            event = await receive()
            if event["type"] == "http.request":
                seen += len(event.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large(message)
            return event

        await self.app(scope, counting_receive, send)


async def _reply_413(send, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
