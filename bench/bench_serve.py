"""HTTP token-reward API throughput vs the bare batched forward of the same model, plus latency.

    python bench/bench_serve.py            # SmolLM2-135M backbone (embedded) with a random token head
    python bench/bench_serve.py --tiny     # the tiny 2-layer Llama instead (fast, overhead-dominated)

Figures (one run, one machine): tokens/s through HTTP at saturation (64 concurrent clients, one item per
request) divided by tokens/s of `scoring.response_probabilities` on the same items in batches of
serve.max_batch_size with the same thread count (goal >= 0.8); latency p50/p99 at concurrency 1, 8, 64.
The bare forward runs before and after the HTTP run and the two are averaged (the machine is shared).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import record  # noqa: E402
from tlcr_ray.config import load_config  # noqa: E402
from tlcr_ray.models import (  # noqa: E402
    TokenDiscriminator,
    embedded_model_dir,
    embedded_tokenizer_dir,
    load_tokenizer,
    save_head_model,
)
from tlcr_ray.rl.text_scoring import encode_items, response_probabilities  # noqa: E402
from tlcr_ray.testing.tiny_model import build_tiny_llama  # noqa: E402

WORDS = "the a quick answer is that you should never do this because it is harmful and unsafe please ask".split()


def make_pairs(n: int, prompt_words: int, response_words: int) -> list[tuple[str, str]]:
    def text(i: int, k: int) -> str:
        return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(k))

    return [(f"\n\nHuman: {text(i, prompt_words)}?\n\nAssistant:", " " + text(i + 1, response_words) + ".")
            for i in range(n)]


def bare_tokens_per_s(model, tokenizer, pairs, batch_size: int) -> float:
    encoded = encode_items(tokenizer, pairs)
    began = time.perf_counter()
    for start in range(0, len(encoded), batch_size):
        response_probabilities(model, encoded[start:start + batch_size], tokenizer.pad_token_id)
    return sum(len(e.input_ids) for e in encoded) / (time.perf_counter() - began)


async def run_clients(url: str, pairs, concurrency: int) -> tuple[float, list[float]]:
    """Send each pair as its own request from `concurrency` clients; -> (wall seconds, latencies)."""
    import aiohttp

    queue = list(range(len(pairs)))
    latencies: list[float] = []

    async def client(session):
        while queue:
            i = queue.pop()
            began = time.perf_counter()
            async with session.post(url + "/v1/token-rewards",
                                    json={"items": [{"prompt": pairs[i][0], "response": pairs[i][1]}]}) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status}: {await reply.text()}")
                await reply.read()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*[client(session) for _ in range(concurrency)])
    return time.perf_counter() - began, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2-135M")
    parser.add_argument("--items", type=int, default=256, help="items in the saturation run")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(cpus)  # the scorer replica gets all CPUs too (Ray sets its OMP threads to num_cpus)

    import ray
    from ray import serve

    from serve.app import build_application

    tokenizer_dir = str(embedded_tokenizer_dir())
    tokenizer = load_tokenizer(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_tiny_llama(Path(tmp) / "tiny", tokenizer_dir) if args.tiny else embedded_model_dir()
        model_name = "tiny Llama (2 layers, hidden 64)" if args.tiny else "SmolLM2-135M + random head"
        model = TokenDiscriminator.from_pretrained(str(backbone), seed=0).eval()
        checkpoint = save_head_model(model, Path(tmp) / "disc", tokenizer=tokenizer)
        pairs = make_pairs(args.items, 24, 40)
        warm = make_pairs(args.batch_size, 24, 40)
        bare_tokens_per_s(model, tokenizer, warm, args.batch_size)
        bare_before = bare_tokens_per_s(model, tokenizer, pairs, args.batch_size)

        ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cfg = load_config(None, [f"serve.num_cpus={cpus}", f"serve.max_batch_size={args.batch_size}",
                                 "serve.max_ongoing_requests=128"])
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(cfg, str(checkpoint)), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_clients(url, warm, 8))
        wall, _ = asyncio.run(run_clients(url, pairs, 64))
        http_tps = sum(len(e.input_ids) for e in encode_items(tokenizer, pairs)) / wall
        latency = {}
        for concurrency, count in ((1, 24), (8, 64), (64, 192)):
            _, lat = asyncio.run(run_clients(url, make_pairs(count, 24, 40), concurrency))
            latency[concurrency] = (percentile(lat, 0.5), percentile(lat, 0.99))
        serve.shutdown()
        ray.shutdown()
        bare_after = bare_tokens_per_s(model, tokenizer, pairs, args.batch_size)

    bare = (bare_before + bare_after) / 2
    details = (f"{model_name}; {args.items} items of ~{sum(len(e.input_ids) for e in encode_items(tokenizer, pairs[:1]))}"
               f" tokens, 1 item/request, 64 clients, batch {args.batch_size}, {cpus} torch threads both sides; "
               f"HTTP {http_tps:.0f} tok/s, bare {bare:.0f} tok/s (before {bare_before:.0f}, after {bare_after:.0f})")
    record("serve", "HTTP tokens/s at saturation / bare batched forward", f"{http_tps / bare:.2f}", ">= 0.8", details)
    for concurrency, (p50, p99) in latency.items():
        record("serve", f"latency p50/p99 at concurrency {concurrency}", f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms",
               "", f"{model_name}; 1 item/request")


if __name__ == "__main__":
    main()
