"""The OpenAI-compatible client settings shared by the reviser and the judge.

    client = async_client(base_url, api_key_env="OPENAI_API_KEY", config_key="reviser.api_key_env",
                          timeout_s=60, max_retries=5)

The SDK owns retries (exponential backoff with jitter, honouring Retry-After) and the per-request
timeout; we do not stack a second retry loop on it. The key comes only from the environment and is
never written anywhere.
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

from tlcr_ray.config import ConfigError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def api_key_from_env(env_var: str, base_url: str, config_key: str) -> str:
    """The key from `env_var`; a local server gets a dummy one when none is set."""
    key = os.environ.get(env_var)
    if key:
        return key
    if urlparse(base_url).hostname in _LOCAL_HOSTS:
        return "local-no-key"
    raise ConfigError(f"{config_key}: environment variable {env_var} is not set; "
                      f"it must hold the API key for {base_url}")


def _http_client():
    """The SDK's aiohttp transport when aiohttp is installed: ~30% less client CPU per request than
    its default httpx one (measured here: 3.9-4.7 -> 2.8 ms), which matters at high concurrency."""
    from openai import DefaultAioHttpClient

    try:
        return DefaultAioHttpClient()
    except RuntimeError:  # aiohttp missing: the SDK's default client
        return None


def async_client(base_url: str | None, *, api_key_env: str, config_key: str, timeout_s: float, max_retries: int):
    """An `openai.AsyncOpenAI` for `base_url` (None: OpenAI) with our timeout/retry settings."""
    from openai import AsyncOpenAI

    base_url = base_url or DEFAULT_BASE_URL
    return AsyncOpenAI(api_key=api_key_from_env(api_key_env, base_url, config_key), base_url=base_url,
                       http_client=_http_client(), timeout=timeout_s, max_retries=max_retries)
