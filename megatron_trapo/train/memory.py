"""Where a rank's memory goes, logged at the first steps as ``memory/<part>_gb``: the model's
weights, its gradient buffers, the optimizer state, the forward/backward's transient peak
(activations, logits and autograd temporaries of the largest micro-batch — measured, not
modelled), the rollout engine's weights and KV cache, and the verifier workers.

The transient peak is read from the allocator on a GPU (peak allocated over what was allocated
before the phase); on Linux CPUs from the process's resident high-water mark, which
``/proc/self/clear_refs`` resets at the start of the phase (Linux ≥ 4.0)."""
from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import psutil
import torch

GB = 2**30
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_CUDA_PEAK_BEFORE_RESETS = 0  # the allocator's peak each TransientPeak reset, the largest


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS)
        return None


_LIBC = _glibc() if sys.platform.startswith("linux") else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_TRIM_THRESHOLD = 1 << 30


def fix_mmap_threshold(kib: Optional[int]) -> bool:
    """Serve every allocation of at least ``kib`` KiB with its own mmap, returned to the kernel
    when freed (``batching.cpu_mmap_threshold_kb``; CPU runs on glibc). glibc's default starts
    at 128 KiB but raises the threshold whenever such a block is freed (up to 32 MiB), after
    which activations come from the heap, whose freed pages it keeps: a rank's resident memory
    then holds every phase's high-water mark at once. Fixing it costs page faults on fresh
    allocations. Measured on SmolLM2-135M TRAPO, 2 ranks: the process tree's peak 10.7 → 7.8
    GiB.

    The heap's free top is then returned by :func:`release_freed_memory` between phases only,
    not by every ``free`` that leaves more than glibc's 128 KiB trim threshold there: with a
    threshold of megabytes (activations on the heap, reused from one micro-batch to the next
    without page faults), trimming inside a phase hands back pages that the next micro-batch
    faults in again. Returns whether it was applied."""
    if kib is None or _LIBC is None or torch.cuda.is_available():
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, int(kib) * 1024)) and \
        bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def release_freed_memory() -> None:
    """Give the memory freed by the phase that just ended back to the kernel (glibc's
    ``malloc_trim``; CPU runs). glibc keeps freed heap pages, and after a large block is freed
    it raises its mmap threshold (up to 32 MB), so the next phase's tensors come from the heap
    too: without this, a rank's resident memory grows to the sum of each phase's peak instead
    of the largest (SmolLM2-135M TRAPO: a rank's RSS between phases 5.5 GB, with the trim 2.7 GB). Costs a few ms."""
    if _LIBC is not None and not torch.cuda.is_available():
        _LIBC.malloc_trim(0)


def peak_memory_gb() -> float:
    """This process's peak GPU memory allocated since it started (CUDA; across the resets
    :class:`TransientPeak` makes), else its resident set size now."""
    if torch.cuda.is_available():
        return max(_CUDA_PEAK_BEFORE_RESETS, torch.cuda.max_memory_allocated()) / GB
    return psutil.Process().memory_info().rss / GB


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage once (megatron's DDP keeps all
    parameters, and all gradients, as views of a few flat buffers)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _grad_tensors(chunks) -> Iterator[torch.Tensor]:
    for chunk in chunks:
        # megatron's DDP: lists of its flat buffers (a plain module's .buffers is a method)
        buffers = [b for name in ("buffers", "expert_parallel_buffers")
                   if isinstance(getattr(chunk, name, None), list) for b in getattr(chunk, name)]
        if buffers:
            yield from (b.grad_data for b in buffers)
        else:  # no contiguous buffer: each parameter's own main_grad / grad
            for p in chunk.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None:
                    yield g


def _optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", opt)  # megatron's wrapper around a torch optimizer
        for state in getattr(inner, "state", {}).values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        for groups_name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(opt, groups_name, None) or []:  # fp32 master weights
                yield from group


def _worker_uss(pids: List[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().uss
    return total / GB


def verifier_pids() -> List[int]:
    """This process's verifier processes: its forkserver and the workers forked from it."""
    return [p.pid for p in psutil.Process().children(recursive=True)
            if "multiprocessing.forkserver" in " ".join(p.cmdline())]


def breakdown(chunks, optimizer, engine=None, transient_gb: Optional[float] = None
              ) -> Dict[str, float]:
    """``memory/<part>_gb`` for this rank now (``transient_gb`` from :class:`TransientPeak`)."""
    out = {"memory/weights_gb": unique_bytes(p for c in chunks for p in c.parameters()) / GB,
           "memory/grads_gb": unique_bytes(_grad_tensors(chunks)) / GB,
           "memory/optimizer_gb": unique_bytes(_optimizer_tensors(optimizer)) / GB,
           "memory/process_rss_gb": psutil.Process().memory_info().rss / GB}
    if transient_gb is not None:
        out["memory/forward_backward_transient_gb"] = transient_gb
    if engine is not None and hasattr(engine, "memory_bytes"):
        # storages it shares with the trainer (rollout.share_trainer_weights) are not its own
        weights, kv = engine.memory_bytes([p for c in chunks for p in c.parameters()])
        out["memory/engine_weights_gb"] = weights / GB
        out["memory/engine_kv_cache_peak_gb"] = kv / GB
    pids = verifier_pids()
    if pids:
        out["memory/verifier_processes_gb"] = _worker_uss(pids)  # their own pages (USS)
    return out


class TransientPeak:
    """``with TransientPeak() as peak: …`` then ``peak.gb``: how far memory rose above its level
    at the start, at the highest point inside the block; None where it cannot be read."""

    def __init__(self):
        self.gb: Optional[float] = None

    def __enter__(self) -> "TransientPeak":
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            global _CUDA_PEAK_BEFORE_RESETS
            torch.cuda.synchronize()
            _CUDA_PEAK_BEFORE_RESETS = max(_CUDA_PEAK_BEFORE_RESETS,
                                           torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = psutil.Process().memory_info().rss
            try:
                _CLEAR_REFS.write_text("5")  # reset the resident high-water mark
                self._cpu = True
            except OSError:  # not Linux, or not permitted
                self._cpu = False
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            torch.cuda.synchronize()
            self.gb = max(0, torch.cuda.max_memory_allocated() - self._start) / GB
        elif self._cpu:
            hwm = next((int(line.split()[1]) * 1024 for line in _STATUS.read_text().splitlines()
                        if line.startswith("VmHWM:")), None)
            self.gb = None if hwm is None else max(0, hwm - self._start) / GB
