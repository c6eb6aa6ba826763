"""Test helpers shipped with the library: an OpenAI-compatible server on 127.0.0.1 (see openai_server)."""
from __future__ import annotations

__all__ = ["OpenAITestServer", "Reply", "messages_digest"]


def __getattr__(name: str):
    # Lazy, so `python -m tlcr_ray.testing.openai_server` does not import the module twice.
    if name in __all__:
        from tlcr_ray.testing import openai_server

        return getattr(openai_server, name)
    raise AttributeError(name)
