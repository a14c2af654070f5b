"""A fake CUDA device on a CPU-only machine, for dry runs that must catch CPU/GPU tensor mixes.

Why: on CPU every tensor lives on one device, so code that forgets to move a micro-batch, a
mask or ``cu_seqlens`` to the GPU passes every CPU test and crashes at the first step on a
GPU. Inside :func:`fake_cuda`, ``device="cuda"`` means a *fake* GPU: tensors carry shapes,
dtypes and a non-CPU device but no data (PyTorch's ``FakeTensorMode``), and any op that mixes
them with CPU tensors raises ``FakeTensorDeviceMismatchError`` exactly where CUDA would raise
"Expected all tensors to be on the same device" (0-dim CPU tensors are allowed, as on CUDA).

Why not fake tensors on ``cuda`` itself: a CPU-only torch build aborts the process when
autograd records a CUDA tensor (it asks for a CUDA device guard that does not exist), so
backward could not be checked. The fake device is PyTorch's PrivateUse1 backend registered as
a Python backend (``torch.utils.backend_registration``) under the name ``fakegpu``, which
autograd accepts; a ``TorchFunctionMode`` maps every CUDA device request to it.

What is patched while the context is active (and restored after):
- ``torch.cuda.is_available()`` → True, ``current_device()`` → 0, ``device_count()`` → 1, so
  the project and megatron-core take their GPU branches;
- ``device="cuda"`` / ``torch.device("cuda", i)`` / integer devices in factory calls,
  ``Tensor.to(...)``, ``Tensor.cuda()`` → the fake device (real tensors are faked first);
  ``pin_memory`` is a no-op; ``Tensor.type()`` reports CUDA type names (megatron's optimizer
  checks them);
- ``torch.distributed`` collectives on a group of one process are the identity (which they
  are, mathematically); on larger groups they raise — fake tensors hold no data to send;
- megatron's ``finalize_model_grads`` is called without its token count (a host-side test
  of a device value, see :func:`_finalize_without_token_count`);
- ``Module.cuda()`` checks that the module was built on the device instead of moving it;
- the CPU layer's own CUDA→CPU rewriting (``cpu_compat``) is suspended.

Data-dependent Python values (``.item()``, ``float(t)``, ``if t > 0``) raise
``DataDependentOutputException``: on a GPU each of them is a host-device synchronisation, so
the dry run also shows where a step would stall.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import megatron.core.distributed as mcore_distributed
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils import backend_registration as br

from megatron_trapo.platform import cpu_compat

FAKE_DEVICE_TYPE = "fakegpu"
_REGISTERED = False


def _register_backend() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    if torch._C._get_privateuse1_backend_name() not in ("privateuseone", FAKE_DEVICE_TYPE):
        raise RuntimeError("fake_cuda: the PrivateUse1 backend is already taken by "
                           f"{torch._C._get_privateuse1_backend_name()!r}")
    br._setup_privateuseone_for_python_backend(FAKE_DEVICE_TYPE)
    _REGISTERED = True


def fake_device(index: int = 0) -> torch.device:
    return torch.device(FAKE_DEVICE_TYPE, index)


def _map_device(dev: Any) -> Any:
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return fake_device(dev.index or 0)
    if isinstance(dev, str) and dev.startswith("cuda"):
        return fake_device(int(dev.split(":")[1]) if ":" in dev else 0)
    if isinstance(dev, int) and not isinstance(dev, bool):
        return fake_device(dev)
    return dev


def _is_fake_target(dev: Any) -> bool:
    return isinstance(dev, torch.device) and dev.type == FAKE_DEVICE_TYPE


_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
               torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
               torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
               torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor"}


class FakeCudaMode(TorchFunctionMode):
    """Maps CUDA device requests to the fake device (see the module docstring)."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode

    def _fake(self, t: torch.Tensor) -> torch.Tensor:
        return t if isinstance(t, FakeTensor) else self.fake_mode.from_tensor(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            dev = _map_device(args[1] if len(args) > 1 else kwargs.pop("device", 0))
            kwargs.pop("non_blocking", None)
            return self._fake(args[0]).to(dev if dev is not None else fake_device())
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            if args[0].device.type == FAKE_DEVICE_TYPE:
                return _TYPE_NAMES.get(args[0].dtype, "torch.cuda.FloatTensor")
            return func(*args)
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.to or getattr(func, "__name__", "") == "to":
            args = (args[0],) + tuple(_map_device(a) for a in args[1:])
            target = next((a for a in args[1:] if isinstance(a, torch.device)), kwargs.get("device"))
            if _is_fake_target(target) and isinstance(args[0], torch.Tensor):
                args = (self._fake(args[0]),) + args[1:]
        return func(*args, **kwargs)


def _identity_collective(name: str, original):
    def collective(*args, **kwargs):
        group = kwargs.get("group")
        if group is None and len(args) > 2 and not isinstance(args[2], (int, bool)):
            group = args[2]
        size = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
        if size == 1:
            return None
        raise RuntimeError(f"fake_cuda: torch.distributed.{name} over {size} processes cannot "
                           "carry fake tensors; the dry run supports groups of one process")

    collective.__wrapped__ = original
    return collective


def _module_cuda(self, device=None):
    """``Module.cuda()`` for models built on the fake device: nothing to move. (torch swaps
    every fake parameter in ``_apply``, which fails for megatron's parameters, and a dry run
    should build the model where the trainer does: on the device, as megatron does without
    ``use_cpu_initialization``.) A tensor left on the CPU is named."""
    for name, t in list(self.named_parameters()) + list(self.named_buffers()):
        if t.device.type != FAKE_DEVICE_TYPE:
            raise RuntimeError(f"fake_cuda: {name} was built on {t.device}, not on the device")
    return self


def _finalize_without_token_count(original):
    """megatron's ``finalize_model_grads`` tests ``num_tokens > 0`` on the host (one sync per
    step on a GPU); fake tensors have no value, so the dry run drops the count — which only
    scales gradients, and the trainer's loss passes 0 (already normalised) anyway."""
    def finalize(model, num_tokens=None, *args, **kwargs):
        return original(model, None, *args, **kwargs)

    return finalize


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                "reduce_scatter_tensor", "barrier")


@contextlib.contextmanager
def fake_cuda() -> Iterator[Any]:
    """Run the body as if on one CUDA GPU; yields the ``FakeTensorMode``."""
    _register_backend()
    saved_cuda = {name: getattr(torch.cuda, name) for name in
                  ("is_available", "current_device", "device_count")}
    saved_dist = {name: getattr(torch.distributed, name) for name in _COLLECTIVES}
    saved_module_cuda = torch.nn.Module.cuda

    saved_finalize = mcore_distributed.finalize_model_grads
    mcore_distributed.finalize_model_grads = _finalize_without_token_count(saved_finalize)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode = FakeCudaMode(fake_mode)
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.nn.Module.cuda = _module_cuda
    for name in _COLLECTIVES:
        setattr(torch.distributed, name, _identity_collective(name, saved_dist[name]))
    try:
        with cpu_compat.suspended(), fake_mode, mode:
            yield fake_mode
    finally:
        for name, fn in saved_cuda.items():
            setattr(torch.cuda, name, fn)
        for name, fn in saved_dist.items():
            setattr(torch.distributed, name, fn)
        torch.nn.Module.cuda = saved_module_cuda
        mcore_distributed.finalize_model_grads = saved_finalize

