"""HTTP token-reward API throughput vs the bare batched forward of the same model, plus latency.

    python bench/bench_serve.py            # SmolLM2-135M backbone (embedded) with a random token head
    python bench/bench_serve.py --tiny     # the tiny 2-layer Llama instead (fast, overhead-dominated)

Figures (one run, one machine), the app built from the default config (`load_config(None)`: serve.num_cpus
auto, serve.max_batch_size, serve.batch_wait_timeout_s and serve.max_ongoing_requests as shipped):
tokens/s through HTTP at saturation (64 concurrent clients, one item per request) divided by tokens/s of
`text_scoring.response_probabilities` on the same items in batches of serve.max_batch_size with the
replica's thread count (goal >= 0.8); latency p50/p99 at concurrency 1, 8, 64, and p50 at 1 client
divided by the bare forward of one item (goal <= 1.3). The bare figures are taken before and after the
HTTP runs and averaged (the machine is shared with other work, so only the ratios mean much).
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
from ray_init import ensure_ray  # noqa: E402
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


def bare_p50_one_item(model, tokenizer, pairs) -> float:
    """Median seconds of tokenizing one item and running its forward alone (what one HTTP request does)."""
    times = []
    for pair in pairs:
        began = time.perf_counter()
        response_probabilities(model, encode_items(tokenizer, [pair]), tokenizer.pad_token_id)
        times.append(time.perf_counter() - began)
    return percentile(times, 0.5)


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
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the app (default: none, the shipped serve settings)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts its workers at niceness 15; the bare forward runs here at 0. On a machine shared with
    # other work that alone halves the replica's CPU share, so both sides run at 0 for the ratio.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # A loaded machine starts Ray's dashboard agent slowly; the raylet's default wait for it is too short.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    cpus = len(os.sched_getaffinity(0))

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
        single = make_pairs(16, 24, 40)

        ensure_ray(num_cpus=cpus)  # loopback only, as `tlcr serve` starts it (a bare ray.init binds the LAN address)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cfg = load_config(None, args.set)
        batch_size = cfg.serve.max_batch_size
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(cfg, str(checkpoint)), name="bench", route_prefix="/")
        threads = serve.get_deployment_handle("Scorer", app_name="bench").torch_threads.remote().result()
        torch.set_num_threads(threads)  # the bare forward gets what the replica got
        warm = make_pairs(batch_size, 24, 40)
        bare_tokens_per_s(model, tokenizer, warm, batch_size)
        bare_before = bare_tokens_per_s(model, tokenizer, pairs, batch_size)
        one_before = bare_p50_one_item(model, tokenizer, single)
        print(f"bare before: {bare_before:.0f} tok/s, one item {one_before * 1000:.0f} ms", flush=True)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_clients(url, warm, 8))
        wall, _ = asyncio.run(run_clients(url, pairs, 64))
        http_tps = sum(len(e.input_ids) for e in encode_items(tokenizer, pairs)) / wall
        print(f"HTTP at 64 clients: {http_tps:.0f} tok/s", flush=True)
        latency = {}
        for concurrency, count in ((1, len(single)), (8, 48), (64, 128)):
            _, lat = asyncio.run(run_clients(url, single if concurrency == 1 else make_pairs(count, 24, 40),
                                             concurrency))
            latency[concurrency] = (percentile(lat, 0.5), percentile(lat, 0.99))
        bare_after = bare_tokens_per_s(model, tokenizer, pairs, batch_size)
        one_after = bare_p50_one_item(model, tokenizer, single)
        serve.shutdown()
        ray.shutdown()

    bare, one = (bare_before + bare_after) / 2, (one_before + one_after) / 2
    settings = (f"default serve settings{' + ' + ', '.join(args.set) if args.set else ''}: num_cpus "
                f"{cfg.serve.num_cpus or 'auto'} -> {threads} torch threads in the replica (and the bare forward), "
                f"batch {batch_size}, wait {cfg.serve.batch_wait_timeout_s} s, "
                f"max_ongoing_requests {cfg.serve.max_ongoing_requests}")
    details = (f"{model_name}; {args.items} items of ~{sum(len(e.input_ids) for e in encode_items(tokenizer, pairs[:1]))}"
               f" tokens, 1 item/request, 64 clients; {settings}; "
               f"HTTP {http_tps:.0f} tok/s, bare {bare:.0f} tok/s (before {bare_before:.0f}, after {bare_after:.0f}); "
               "shared machine, ratio within one run")
    record("serve", "HTTP tokens/s at saturation / bare batched forward", f"{http_tps / bare:.2f}", ">= 0.8", details)
    record("serve", "p50 latency at 1 client / bare forward of one item", f"{latency[1][0] / one:.2f}", "<= 1.3",
           f"{model_name}; HTTP p50 {latency[1][0] * 1000:.0f} ms, bare p50 {one * 1000:.0f} ms "
           f"(before {one_before * 1000:.0f}, after {one_after * 1000:.0f}); {threads} threads; shared machine")
    for concurrency, (p50, p99) in latency.items():
        record("serve", f"latency p50/p99 at concurrency {concurrency}", f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms",
               "", f"{model_name}; 1 item/request; {threads} threads")


if __name__ == "__main__":
    main()
