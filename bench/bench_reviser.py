"""Reviser throughput against the OpenAI test server with a fixed latency, as a fraction of the bound.

    python bench/bench_reviser.py [--latency 0.2] [--concurrency 8 16 64] [--waves 10]

With L seconds per reply and C requests in flight, no client can beat C / L requests per second;
the figure is achieved / (C / L) for the full `revise_all` path (official SDK, semaphore, tag
parsing, edit-ratio tokenization, fsynced cache). The server runs in its own process, like a real
API. Client CPU per request is printed too: when the bound needs more CPU than the machine has,
that is what caps the ratio.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import record  # noqa: E402
from tlcr_ray.config import DataConfig, ReviserConfig  # noqa: E402
from tlcr_ray.data.pairs import load_pairs  # noqa: E402
from tlcr_ray.labeling.revise import make_reviser, revise_all  # noqa: E402
from tlcr_ray.models import embedded_tokenizer_dir, load_tokenizer  # noqa: E402


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tlcr_ray.testing.openai_server", "--mode", "edit",
                             "--delay", str(latency)], stdout=subprocess.PIPE, text=True)
    ready = proc.stdout.readline().split()
    if not ready or ready[0] != "READY":
        raise RuntimeError("the test server did not start")
    return proc, ready[1]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(pairs, base_url: str, concurrency: int, tokenize) -> tuple[float, float, int]:
    """-> (requests per second, client CPU ms per request, accepted revisions)."""
    cfg = ReviserConfig(kind="openai", base_url=base_url, model="bench", max_concurrency=concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        results, stats = revise_all(pairs, make_reviser(cfg, tokenize), Path(tmp) / "revisions.jsonl",
                                    concurrency, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert stats["requested"] == len(pairs)
    return len(pairs) / wall, 1000 * cpu / len(pairs), sum(r.accepted for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--waves", type=int, default=10, help="requests per level = waves x concurrency")
    args = parser.parse_args()

    pairs, _ = load_pairs(DataConfig().path, on_bad_row="skip")
    tokenizer = load_tokenizer(str(embedded_tokenizer_dir()))
    tokenize = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    proc, base_url = start_server(args.latency)
    try:
        measure(pairs[:8], base_url, 8, tokenize)  # warm up imports and the server
        for concurrency in args.concurrency:
            n = min(len(pairs), args.waves * concurrency)
            server_cpu = process_cpu_s(proc.pid)
            rate, cpu_ms, accepted = measure(pairs[:n], base_url, concurrency, tokenize)
            server_ms = 1000 * (process_cpu_s(proc.pid) - server_cpu) / n
            bound = concurrency / args.latency
            cores_needed = bound * (cpu_ms + server_ms) / 1000
            record("reviser", f"throughput / bound at concurrency {concurrency}, latency {args.latency * 1000:.0f} ms",
                   f"{rate / bound:.2f}", "0.9" if concurrency == 64 else "",
                   f"{rate:.0f} req/s of {bound:.0f}; {n} requests; CPU/req client {cpu_ms:.1f} ms + "
                   f"server {server_ms:.1f} ms, so the bound needs {cores_needed:.1f} cores; "
                   f"load avg {os.getloadavg()[0]:.1f}; {accepted} accepted")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
