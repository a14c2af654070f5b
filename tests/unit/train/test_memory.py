"""memory/<part>_gb: storages counted once, and the transient peak of a block measured."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_trapo.train.memory import TransientPeak, breakdown, unique_bytes


def test_views_of_one_buffer_count_once():
    flat = torch.zeros(1000)
    views = [flat[:600], flat[600:], flat.view(10, 100)]
    assert unique_bytes(views) == 4000
    assert unique_bytes(views + [torch.zeros(10, dtype=torch.float64)]) == 4080


def test_a_block_that_allocates_300_mb_shows_it():
    with TransientPeak() as peak:
        big = np.ones(300 * 2**20 // 8)  # touched pages: resident
        del big
    assert peak.gb is not None and 0.28 <= peak.gb <= 0.6, peak.gb
    with TransientPeak() as quiet:
        torch.ones(10)
    assert quiet.gb < 0.05  # the high-water mark was reset at the start of the block


def test_breakdown_of_a_plain_model_and_adam():
    model = torch.nn.Linear(256, 512)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(4, 256)).sum().backward()
    opt.step()
    n = 256 * 512 + 512
    m = breakdown([model], opt)
    gib = 2**30
    assert round(m["memory/weights_gb"] * gib) == 4 * n
    assert round(m["memory/grads_gb"] * gib) == 4 * n  # .grad when there is no DDP buffer
    # exp_avg and exp_avg_sq per parameter, plus Adam's scalar step counts
    assert 8 * n <= round(m["memory/optimizer_gb"] * gib) <= 8 * n + 64


def test_the_run_peak_survives_the_transient_measurements_reset(monkeypatch):
    """On a GPU the transient measurement resets the allocator's peak; memory/peak_gb must
    still be the peak since the process started (e.g. the generation before that phase)."""
    from megatron_trapo.train import memory

    alloc = {"now": 1 * memory.GB, "peak": 10 * memory.GB}  # generation peaked at 10 GB

    def reset():
        alloc["peak"] = alloc["now"]

    monkeypatch.setattr(memory, "_CUDA_PEAK_BEFORE_RESETS", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: alloc["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: alloc["peak"])
    with TransientPeak() as peak:
        alloc["peak"] = 4 * memory.GB  # forward/backward rose 3 GB above its start
    assert peak.gb == 3.0
    assert memory.peak_memory_gb() == 10.0


_HEAP_SCRIPT = r"""
import ctypes, json
import psutil
from megatron_trapo.train import memory
assert memory.fix_mmap_threshold(32768)  # 32 MiB: the 16 MB block below comes from the heap
libc = memory._LIBC
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: psutil.Process().memory_info().rss
block = libc.malloc(16 << 20)  # as an activation's storage is allocated: the heap's top
ctypes.memset(block, 1, 16 << 20)  # touched: resident
held = rss()
libc.free(block)
after_free = rss()
memory.release_freed_memory()
print(json.dumps({"freed_on_free": held - after_free, "freed_on_trim": after_free - rss()}))
"""


def test_the_heap_is_given_back_between_phases_not_inside_them():
    """With a fixed mmap threshold of megabytes, a freed activation stays in the heap for the
    next micro-batch (glibc's 128 KiB trim threshold would hand it back at ``free`` and the
    next micro-batch would fault it in again) until ``release_freed_memory`` at the phase's
    end returns it."""
    from megatron_trapo.train import memory

    if memory._LIBC is None:
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[3], timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["freed_on_free"] < 2 << 20, got  # kept at free
    assert got["freed_on_trim"] > 14 << 20, got  # returned at the phase boundary
