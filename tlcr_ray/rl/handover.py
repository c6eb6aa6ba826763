"""Same-node weight handover: one bucket of gathered weights passed by reference, not through the object store.

    handle = pack_shm(bucket)               # learner rank 0: the bucket copied once into /dev/shm
    deliver(handle)                         # every engine: tensors = open_handle(handle); load; return (the ack)
    release(handle)                         # learner: the file is unlinked (engine mappings stay valid)

Two kinds, one handle layout ({"kind", "entries", ...}, small and picklable: it crosses Ray and vLLM's
collective_rpc, raw tensors never do):
* "shm" (any device, learner rank 0 and the engines on one node): the bucket is packed into one flat
  uint8 file under /dev/shm (`torch.from_file(shared=True)`); an engine maps it copy-on-write and reads
  views of it. One copy on each side, no pickling, and at most one bucket in host memory at a time:
  the object-store path holds the whole state dict in the store and copies it twice more (serialise,
  deserialise) before the engine copies it into its weights.
* "cuda_ipc" (CUDA, colocated: engine and learner rank on one GPU): every learner rank packs its gathered
  bucket into one flat CUDA buffer and shares it with `torch.multiprocessing.reductions.reduce_tensor`;
  the handle maps each GPU's UUID to the IPC handle of the rank on it, and an engine rebuilds the buffer
  on its own device index (`rebuild_cuda_ipc`: the two processes may number the GPU differently). No
  copy leaves the GPU. The producer keeps the buffer until every engine has acked.

Fresh file or reused one: vLLM's layer-wise reload keeps views of a bucket's tensors until their layer is
complete, possibly a bucket later, and an unlinked file keeps its pages for those views while an overwritten
one would not: those engines get a fresh file per bucket (`pack_shm`). An engine that copies every tensor
out before it acks (the HF engine: `copies_on_load`) gets one file for the whole run instead (`ReusedShm`),
which both sides map once: no first-touch page faults after the first sync. Measured on this project's 2-core
VM, 2 x 265 MB buckets: filling fresh files 1.1 s vs 0.04 s reused, the engine's reads 0.17 vs 0.04 s.

`entries` lists (name, dtype name, shape, byte offset) in bucket order; offsets are aligned so that every
view is legal for its dtype (`flatten_bucket` / `unflatten_bucket`, the part both kinds share).
"""
from __future__ import annotations

import os
import tempfile
import uuid
import weakref
from typing import Callable, Iterable

import torch

ALIGN_BYTES = 64
"""Every tensor starts at a multiple of this in the flat buffer (>= any element size; cache-line aligned)."""
SHM_PREFIX = "tlcr-weights-"
STORAGE_DEVICE_ARG = 6
"""Position of `storage_device` in `torch.multiprocessing.reductions.rebuild_cuda_tensor`'s arguments
(tests/unit/test_handover.py checks it against the installed torch)."""


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight handover: unknown dtype {name!r}")
    return dtype


def bucket_layout(bucket: dict[str, torch.Tensor]) -> tuple[list[tuple[str, str, list[int], int]], int]:
    """-> (entries, total bytes) of `bucket` packed flat: (name, dtype name, shape, offset) per tensor."""
    entries, offset = [], 0
    for name, tensor in bucket.items():
        offset = -(-offset // ALIGN_BYTES) * ALIGN_BYTES
        entries.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset))
        offset += tensor.numel() * tensor.element_size()
    return entries, offset


def flatten_bucket(bucket: dict[str, torch.Tensor], out: torch.Tensor) -> list[tuple[str, str, list[int], int]]:
    """Copy `bucket`'s tensors into `out` (a flat uint8 tensor of >= the layout's bytes) -> its entries."""
    entries, total = bucket_layout(bucket)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < total:
        raise ValueError(f"flatten_bucket: need a flat uint8 buffer of {total} bytes, got "
                         f"{out.dtype} {tuple(out.shape)}")
    for (name, dtype, shape, offset), tensor in zip(entries, bucket.values()):
        nbytes = tensor.numel() * tensor.element_size()
        out[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    return entries


def unflatten_bucket(flat: torch.Tensor, entries: Iterable[tuple[str, str, list[int], int]]) -> dict[str, torch.Tensor]:
    """Views of `flat` (uint8) named by `entries`: {name: tensor of that dtype and shape}, no copy."""
    out = {}
    for name, dtype_name, shape, offset in entries:
        dtype = _dtype(dtype_name)
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * dtype.itemsize
        if offset + nbytes > flat.numel():
            raise ValueError(f"weight handover: {name} ends at byte {offset + nbytes}, the buffer has {flat.numel()}")
        out[name] = flat[offset:offset + nbytes].view(dtype).view(shape)
    return out


# ---- "shm": one /dev/shm file per bucket ---------------------------------------------------------
def shm_dir() -> str:
    """Where bucket files go: /dev/shm (RAM-backed) when the system has it, else the temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def pack_shm(bucket: dict[str, torch.Tensor], folder: str | None = None) -> dict:
    """Write `bucket` once into a new shared-memory file -> its handle (path, nbytes, entries)."""
    _, total = bucket_layout(bucket)
    path = os.path.join(folder or shm_dir(), f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
    try:
        flat = torch.from_file(path, shared=True, size=max(total, 1), dtype=torch.uint8)
        entries = flatten_bucket(bucket, flat)
    except BaseException:
        _unlink(path)
        raise
    return {"kind": "shm", "path": path, "nbytes": total, "entries": entries}


def open_shm(handle: dict) -> dict[str, torch.Tensor]:
    """An engine's view of a "shm" bucket: tensors over a private (copy-on-write) mapping of the file,
    valid after the producer unlinks it; the mapping goes when the last view does."""
    flat = torch.from_file(handle["path"], shared=False, size=max(handle["nbytes"], 1), dtype=torch.uint8)
    return unflatten_bucket(flat, handle["entries"])


class ReusedShm:
    """The producer's one bucket file for engines that copy a bucket out before they ack: every bucket is
    packed into the same mapping (grown, under a new name, when a bucket needs more), so its pages are faulted
    in once per run. The file outlives a sync by design; `close()` unlinks it (so does garbage collection, or
    the interpreter's exit), and a killed producer's file is swept by the next `sweep_stale_shm`."""

    def __init__(self, folder: str | None = None):
        self.folder = folder or shm_dir()
        self.path: str | None = None
        self.flat: torch.Tensor | None = None
        self._unlink_later: weakref.finalize | None = None  # unlinks the file when this goes, or at exit

    def pack(self, bucket: dict[str, torch.Tensor]) -> dict:
        """Write `bucket` into the file -> its handle; the previous bucket's contents are overwritten, so call
        this only once every engine has acked it."""
        _, total = bucket_layout(bucket)
        if self.flat is None or self.flat.numel() < total:
            self.close()
            path = os.path.join(self.folder, f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
            self._unlink_later = weakref.finalize(self, _unlink, path)
            self.flat = torch.from_file(path, shared=True, size=max(total, 1), dtype=torch.uint8)
            self.path = path
        entries = flatten_bucket(bucket, self.flat)
        return {"kind": "shm", "path": self.path, "nbytes": total, "entries": entries, "reused": True,
                "file_bytes": self.flat.numel()}

    def close(self) -> None:
        if self._unlink_later is not None:
            self._unlink_later()
        self.path, self.flat, self._unlink_later = None, None, None


class ShmMappings:
    """An engine's mapping of a producer's `ReusedShm` file, kept from one bucket (and sync) to the next: the
    one file it maps, shared (a file rewritten under it: POSIX leaves a private mapping's view of that
    unspecified). Views of it are valid only until the engine acks."""

    def __init__(self):
        self.path: str | None = None
        self.flat: torch.Tensor | None = None

    def open(self, handle: dict) -> dict[str, torch.Tensor]:
        if handle["path"] != self.path or self.flat is None or self.flat.numel() != handle["file_bytes"]:
            self.path, self.flat = None, None  # the producer grew (renamed) its file: drop the old mapping
            self.flat = torch.from_file(handle["path"], shared=True, size=handle["file_bytes"], dtype=torch.uint8)
            self.path = handle["path"]
        return unflatten_bucket(self.flat, handle["entries"])


def sweep_stale_shm(folder: str | None = None) -> list[str]:
    """Unlink bucket files whose producer is gone (a learner killed mid-sync leaves at most one) -> their names."""
    folder = folder or shm_dir()
    swept = []
    for name in os.listdir(folder):
        pid = name[len(SHM_PREFIX):].split("-", 1)[0] if name.startswith(SHM_PREFIX) else ""
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _unlink(os.path.join(folder, name))
            swept.append(name)
    return swept


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---- "cuda_ipc": a flat CUDA buffer per learner rank, shared by IPC handle ----------------------
def device_uuid(device: torch.device | int) -> str:
    """The GPU's UUID: the name both processes agree on whatever CUDA_VISIBLE_DEVICES numbers it."""
    index = device if isinstance(device, int) else (device.index if device.index is not None else 0)
    return str(torch.cuda.get_device_properties(index).uuid)


def pack_cuda_ipc(bucket: dict[str, torch.Tensor], device: torch.device) -> tuple[dict, torch.Tensor]:
    """This rank's bucket flattened on its GPU and shared -> (handle {"kind", "entries", "ipc": {uuid:
    handle}}, the buffer the caller keeps alive until every engine has acked)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, total = bucket_layout(bucket)
    flat = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
    entries = flatten_bucket(bucket, flat)
    torch.cuda.current_stream(device).synchronize()  # the copies land before another process reads them
    return {"kind": "cuda_ipc", "entries": entries, "ipc": {device_uuid(device): reduce_tensor(flat)}}, flat


def merge_ipc_handles(handles: Iterable[dict | None]) -> dict:
    """One handle from every learner rank's (same entries; one IPC handle per GPU)."""
    merged: dict | None = None
    for handle in handles:
        if handle is None:
            continue
        if merged is None:
            merged = {**handle, "ipc": dict(handle["ipc"])}
        elif handle["entries"] != merged["entries"]:
            raise ValueError("weight handover: learner ranks packed different buckets")
        else:
            merged["ipc"].update(handle["ipc"])
    if merged is None:
        raise ValueError("weight handover: no learner rank packed the bucket")
    return merged


def rebuild_cuda_ipc(ipc: tuple[Callable, tuple], device_index: int) -> torch.Tensor:
    """The producer's buffer, opened on this process's `device_index` (its own number for that GPU)."""
    rebuild, args = ipc
    args = list(args)
    args[STORAGE_DEVICE_ARG] = device_index
    return rebuild(*args)


def open_cuda_ipc(handle: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """An engine's view of a "cuda_ipc" bucket: the tensors of the learner rank on this GPU, no copy."""
    key = device_uuid(device)
    if key not in handle["ipc"]:
        raise RuntimeError(f"weight handover: no learner rank shares this engine's GPU {key} "
                           f"(ranks on {sorted(handle['ipc'])}); use ppo.weight_sync shm or object_store")
    return unflatten_bucket(rebuild_cuda_ipc(handle["ipc"][key], device.index or 0), handle["entries"])


# ---- both kinds ----------------------------------------------------------------------------------
def open_handle(handle: dict, device: torch.device | str = "cpu",
                mappings: ShmMappings | None = None) -> dict[str, torch.Tensor]:
    """The receiving side: {name: tensor} of a bucket handle (views; copy what must outlive the load). A
    reused-file handle (`ReusedShm`) needs the engine's `mappings`: only an engine that copies on load has one."""
    kind = handle.get("kind")
    if kind == "shm" and handle.get("reused"):
        if mappings is None:
            raise ValueError("weight handover: a reused bucket file reached an engine that keeps views of its "
                             "buckets (copies_on_load False); it needs a fresh file per bucket")
        return mappings.open(handle)
    if kind == "shm":
        return open_shm(handle)
    if kind == "cuda_ipc":
        return open_cuda_ipc(handle, torch.device(device))
    raise ValueError(f"weight handover: unknown handle kind {kind!r}")


def release(handle: dict | None) -> None:
    """The producing side, after every engine acked: a fresh "shm" file is unlinked (a reused one stays for
    the next bucket; a "cuda_ipc" buffer is freed by dropping the tensor `pack_cuda_ipc` returned)."""
    if handle is not None and handle.get("kind") == "shm" and not handle.get("reused"):
        _unlink(handle["path"])


def push_buckets(buckets: Iterable[dict[str, torch.Tensor] | None], kind: str, deliver: Callable[[dict], object],
                 *, rank: int = 0, device: torch.device | None = None,
                 gather: Callable[[dict | None], list] | None = None, barrier: Callable[[], None] | None = None,
                 reused: ReusedShm | None = None) -> int:
    """Hand every bucket over, waiting for the engines' ack before the next one -> buckets delivered.

    `buckets`: `tlcr_ray.training.gather.state_buckets`, drained on every rank (a collective under ZeRO-3);
    a bucket is None on a rank that packs nothing. "shm": only rank 0 holds buckets. "cuda_ipc": every rank
    holds the gathered bucket on its GPU; with several ranks `gather(handle)` returns every rank's handle
    (rank order) so rank 0 delivers their merge, and `barrier()` keeps the other ranks' buffers alive until
    rank 0's engines are done. `deliver(handle)` runs on rank 0 and returns once every engine has loaded it.
    `reused` ("shm", engines that copy on load): every bucket goes into that one file, which stays.
    """
    if kind not in ("shm", "cuda_ipc"):
        raise ValueError(f"weight handover: unknown kind {kind!r}")
    if kind == "shm" and rank == 0 and os.path.isdir("/proc/self"):
        sweep_stale_shm()
    delivered = 0
    for bucket in buckets:
        handle, keep = None, None
        try:
            if bucket is not None:
                if kind == "cuda_ipc":
                    handle, keep = pack_cuda_ipc(bucket, device)
                else:
                    handle = reused.pack(bucket) if reused is not None else pack_shm(bucket)
            outgoing = merge_ipc_handles(gather(handle)) if gather is not None else handle
            if rank == 0 and outgoing is not None:
                deliver(outgoing)
                delivered += 1
            if barrier is not None:
                barrier()
        finally:
            release(handle)
            del keep
            bucket = None  # released before the next bucket is gathered (gather.items_of)
    return delivered
