"""CPU runs: OpenMP teams on the main thread only.

Why: libgomp, the OpenMP runtime of torch's CPU wheels, counts the worker threads of every team
that any thread has started, and once that count exceeds the CPUs its workers stop spinning
between parallel regions and sleep in futex instead ("throttled" spinning, libgomp's
``config/linux/wait.h``; no environment variable turns it off). gloo runs its collectives'
copies on its own long-lived threads, and a copy of more than torch's grain size (32k
elements) there starts a team that lives as long as that thread: one ``all_gather_object`` at
checkpoint load or one distributed-optimizer all-gather, and every parallel region of the main
thread pays a futex wake-up for the rest of the run (on 2 cores: generation inside the trainer
took 37.9 s with 214k context switches where the same requests replayed alone took 29.2 s).

torch gives a thread the process-wide thread count at its first parallel op
(``at::init_num_threads``), so the process-wide count becomes 1 — no other thread starts a
team — and the main thread gets its threads back through its own OpenMP setting and MKL's
thread-local one. torch exposes neither per-thread knob, hence ctypes on the libgomp and MKL
that torch loaded; where either is missing (other OpenMP runtimes, other BLAS) nothing changes.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def _loaded_library(fragment: str) -> Optional[str]:
    """The path of the mapped shared object whose file name contains ``fragment``."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if path.startswith("/") and fragment in path.rsplit("/", 1)[-1]:
                    return path
    except OSError:  # not Linux
        return None
    return None


def _knobs():
    """(libgomp's omp_set_num_threads, MKL's per-thread count setter), or None."""
    gomp_path = _loaded_library("libgomp")
    torch_cpu = _loaded_library("libtorch_cpu")
    if gomp_path is None or torch_cpu is None:
        return None
    gomp, mkl = ctypes.CDLL(gomp_path), ctypes.CDLL(torch_cpu)  # already loaded: same handles
    if not hasattr(gomp, "omp_set_num_threads") or not hasattr(mkl, "MKL_Set_Num_Threads_Local"):
        return None
    # MKL's C entry point (its header maps mkl_set_num_threads_local to it); the lower-case
    # export is the Fortran one, which takes a pointer
    return gomp.omp_set_num_threads, mkl.MKL_Set_Num_Threads_Local


def confine_openmp_to_main_thread(threads: Optional[int] = None) -> Optional[int]:
    """Give the calling (main) thread ``threads`` OpenMP/MKL threads (default: torch's current
    count) and every other thread one. Call before the process groups exist. Returns the main
    thread's count, or None where the runtime is not libgomp + MKL (then nothing changed)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("confine_openmp_to_main_thread: call it from the main thread")
    n = int(threads or torch.get_num_threads())
    knobs = _knobs()
    if knobs is None or n <= 1:
        return None if knobs is None else n
    omp_set, mkl_set_local = knobs
    torch.ones(1 << 16).add_(1)  # the main thread's own lazy thread init happens now, not later
    torch.set_num_threads(1)  # the process-wide count every other thread starts from
    omp_set(n)
    mkl_set_local(n)
    if torch.get_num_threads() != n:  # torch reads the calling thread's OpenMP count
        raise RuntimeError(f"confine_openmp_to_main_thread: main thread has "
                           f"{torch.get_num_threads()} threads after asking for {n}")
    logger.info("OpenMP: %d threads on the main thread, 1 on every other", n)
    return n
