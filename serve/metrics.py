"""Prometheus metrics of the token-reward API, exported through Ray's metrics agent.

Ray prefixes every name with `ray_`: scrape `ray_tlcr_requests_total`, `ray_tlcr_request_latency_s`,
`ray_tlcr_batch_size` and `ray_tlcr_tokens_scored_total` from the node's metrics export port
(`ray metrics launch-prometheus`, or `curl 127.0.0.1:<metrics_export_port>/metrics`).
Serve adds the deployment, replica and application tags.
"""
from __future__ import annotations

import time

from ray.serve import metrics

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class IngressMetrics:
    """Per-request figures, recorded by the HTTP ingress."""

    def __init__(self) -> None:
        self.requests = metrics.Counter("tlcr_requests", description="HTTP requests by route and status",
                                        tag_keys=("path", "status"))
        self.latency = metrics.Histogram("tlcr_request_latency_s", description="request latency in seconds",
                                         boundaries=LATENCY_BOUNDARIES_S, tag_keys=("path",))

    def observe(self, path: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"path": path, "status": str(status)})
        self.latency.observe(seconds, tags={"path": path})


class ScorerMetrics:
    """Per-batch figures, recorded by the model replica."""

    def __init__(self) -> None:
        self.batch_size = metrics.Histogram("tlcr_batch_size", description="items per forward pass",
                                            boundaries=BATCH_BOUNDARIES)
        self.tokens = metrics.Counter("tlcr_tokens_scored", description="tokens through the discriminator")

    def observe(self, items: int, tokens: int) -> None:
        self.batch_size.observe(items)
        self.tokens.inc(tokens)


class MetricsMiddleware:
    """ASGI middleware: count every request and time it, by route (unknown paths count as `other`)."""

    def __init__(self, app, metrics: IngressMetrics, paths: tuple[str, ...]):
        self.app = app
        self.metrics = metrics
        self.paths = set(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            path = scope.get("path", "")
            self.metrics.observe(path if path in self.paths else "other", status, time.perf_counter() - began)
