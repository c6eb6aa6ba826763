"""How the learner's data-parallel ranks meet (torch.distributed init_method)."""
from __future__ import annotations

import socket


def needs_tcp_rendezvous(node_ips: list[str], on_gpu: bool) -> bool:
    """file:// lives in one node's /tmp, so ranks on several nodes (or NCCL ranks, which may be
    spread over GPUs of different hosts) must meet over TCP at rank 0's address instead."""
    return on_gpu or len(set(node_ips)) > 1


def rendezvous_init_method(node_ips: list[str], on_gpu: bool, file_path: str, rank0_port: int | None = None) -> str:
    """torch.distributed init_method for ranks on `node_ips` (rank order): `tcp://<rank 0 ip>:<port>`
    when `needs_tcp_rendezvous`, else `file://<file_path>` (TCPStore would listen on all addresses)."""
    if not needs_tcp_rendezvous(node_ips, on_gpu):
        return f"file://{file_path}"
    if rank0_port is None:
        raise ValueError("a TCP rendezvous needs rank 0's port (free_port() on rank 0's node)")
    host = node_ips[0]
    return f"tcp://[{host}]:{rank0_port}" if ":" in host else f"tcp://{host}:{rank0_port}"


def free_port(host: str = "") -> int:
    """A port free on this node right now (the caller's process binds it soon after)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
