"""CPU compatibility layer for megatron-core 0.16.x.

Why this exists: megatron-core assumes CUDA in a handful of unconditional places
(``torch.cuda.current_device()``, ``synchronize``, streams and events, ``device="cuda"``
literals in the pipeline schedules, ``param.type() == 'torch.cuda.FloatTensor'`` checks in
the optimizer, and the CUDA RNG tracker). Everything else — GPTModel, tensor/pipeline/
sequence parallel layers, vocab-parallel cross entropy, ``dist_checkpointing`` — is plain
torch.distributed and runs on gloo. This module redirects exactly those places so that the
same training code runs on a laptop or CI box; it is a no-op when CUDA is available.

It is activated in one place, :func:`megatron_trapo.platform.activate`, which the process
group setup calls. There is no way to activate it halfway: :func:`activate_cpu_compat`
installs every piece below or raises.

Pieces:
1. ``CudaToCpuMode`` — a ``TorchFunctionMode`` that rewrites ``device="cuda"`` (and
   ``torch.device("cuda", i)``) to CPU in factory calls, makes ``Tensor.cuda()`` a no-op,
   drops ``pin_memory`` and reports CPU float tensors under their CUDA type names, so the
   optimizer's ``param.type()`` checks accept them. A TorchFunctionMode is thread-local and is
   not active inside autograd's backward threads, hence piece 2.
2. ``torch.cuda`` shims — ``current_device()`` returns ``torch.device("cpu")`` (a *device*,
   not an ordinal: megatron's backward passes allocate with ``device=current_device()``);
   ``synchronize``/``empty_cache``/``set_device`` do nothing; streams and events are inert
   objects; the RNG functions act on the CPU generator.
3. Activation recompute — megatron's ``CheckpointFunction`` re-runs a layer's forward inside
   its ``backward``, which autograd calls without the thread's TorchFunctionMode, so the
   forward's ``device="cuda"`` literals (``get_default_causal_mask``) would fail there; its
   backward is wrapped to run under the mode.
4. ``CpuRNGStatesTracker`` — megatron's tracker of named RNG states (data-parallel,
   tensor-parallel, expert seeds), keeping CPU generator states instead of CUDA ones, and the
   private ``_get/_set_cuda_rng_state`` helpers pointed at the CPU generator.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import torch
from torch.overrides import (TorchFunctionMode, _get_current_function_mode,
                             _pop_mode_temporarily)

_LOCK = threading.Lock()
_ACTIVE = False
_MODE: "CudaToCpuMode | None" = None
_SUSPENDED = threading.local()  # see suspended()

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


def _to_cpu_device(dev: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(dev) else dev


# the calls rewritten even without keyword arguments (a device given by position, .cuda())
_REWRITTEN = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to,
                        torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.pin_memory})


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call made on this thread."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the fast path first: this runs for every torch call of the model's forward and
        # backward, and on a tiny model its cost is a visible part of the step
        if not kwargs and func not in _REWRITTEN and getattr(func, "__name__", "") != "to":
            return func(*args)
        if getattr(_SUSPENDED, "on", False):
            return func(*args, **(kwargs or {}))
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) or (
            getattr(func, "__name__", "") == "to"
        ):
            args = tuple(_to_cpu_device(a) for a in args)
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _InertStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _InertEvent:
    """Stands in for ``torch.cuda.Event``; timing methods return 0."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_INERT_STREAM = _InertStream()


def _noop_factory(name: str):
    """A distinct no-op per shimmed name: torch._dynamo keys its rules on function identity and
    refuses one object registered under two torch names."""

    def noop(*args, **kwargs):
        return None

    noop.__name__ = noop.__qualname__ = f"cpu_compat_noop_{name}"
    return noop


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class():
    # lazy: megatron-core takes ~3 s to import; the CLI, the launcher and the server pool
    # (rollout/servers.py) import this layer without needing it
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG states, kept as CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _install_torch_cuda_shims() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = _noop_factory("synchronize")
    cuda.empty_cache = _noop_factory("empty_cache")
    cuda.set_device = _noop_factory("set_device")
    cuda.Stream = _InertStream
    cuda.Event = _InertEvent
    cuda.current_stream = lambda *a, **k: _INERT_STREAM
    cuda.default_stream = lambda *a, **k: _INERT_STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_stream = _noop_factory("set_stream")
    # The "CUDA" generator is the CPU one here. torch.manual_seed itself calls
    # cuda.manual_seed_all, so that one must not call back into torch.manual_seed.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = _noop_factory("manual_seed_all")
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.nvtx.range_push = _noop_factory("range_push")
    cuda.nvtx.range_pop = _noop_factory("range_pop")


def _install_megatron_rng() -> None:
    # lazy: megatron-core takes ~3 s to import; the CLI, the launcher and the server pool
    # (rollout/servers.py) import this layer without needing it
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    tracker_cls = _make_cpu_tracker_class()
    mrandom.CudaRNGStatesTracker = tracker_cls
    # initialize_rng_tracker builds CudaRNGStatesTracker by module-global name lookup.
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def _install_megatron_recompute() -> None:
    # lazy: megatron-core takes ~3 s to import (as above)
    from megatron.core.tensor_parallel import random as mrandom

    for name in ("CheckpointFunction", "CheckpointWithoutOutputFunction"):
        fn = getattr(mrandom, name, None)
        if fn is None or getattr(fn.backward, "_under_cpu_mode", False):
            continue
        original = fn.backward

        def backward(ctx, *grads, _original=original):
            if _MODE is None or _get_current_function_mode() is _MODE:
                return _original(ctx, *grads)
            with _MODE:  # the recomputed forward asks for CUDA as the first one did
                return _original(ctx, *grads)

        backward._under_cpu_mode = True
        fn.backward = staticmethod(backward)


def activate_cpu_compat() -> bool:
    """Install the CPU layer on this process. Returns False (and does nothing) with CUDA."""
    global _ACTIVE, _MODE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ACTIVE:
            return True
        # megatron warns about this on every TP layer; it concerns CUDA streams only.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        _install_torch_cuda_shims()
        _install_megatron_rng()
        _install_megatron_recompute()
        _MODE = CudaToCpuMode()
        _MODE.__enter__()
        _ACTIVE = True
    return True


@contextlib.contextmanager
def suspended():
    """Let CUDA device requests through unchanged on this thread (the fake-CUDA dry run of
    ``platform/fake_cuda.py`` maps them to its fake device instead)."""
    before = getattr(_SUSPENDED, "on", False)
    _SUSPENDED.on = True
    try:
        yield
    finally:
        _SUSPENDED.on = before


@contextlib.contextmanager
def bypassed():
    """Run a block without the CUDA→CPU mode on this thread, for code that never asks for CUDA
    (the HF engine's generation): the mode is a Python call in front of every torch op, which
    a token-by-token decode loop makes tens of thousands of times per step. A no-op when the
    mode is not the innermost one (or not active). torch has no public way to step out of a
    mode; its two private helpers used here have been there since torch 2.0."""
    if _MODE is None or _get_current_function_mode() is not _MODE:
        yield
        return
    with _pop_mode_temporarily():
        yield


def cpu_compat_active() -> bool:
    """True once :func:`activate_cpu_compat` has run in this process."""
    return _ACTIVE
