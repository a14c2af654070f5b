"""Megatron forward/backward over a list of micro-batches, and one optimizer step.

The pipeline schedule (no PP, 1F1B, or interleaved 1F1B with virtual stages) is chosen by
megatron's ``get_forward_backward_func`` from the parallel state. With
``calculate_per_token_loss=True`` (our models always set it), a loss function returns
``(loss_sum, num_tokens, metrics)``; the schedule sums ``num_tokens`` over micro-batches and
``finalize_model_grads`` all-reduces it over data-parallel ranks and divides the gradients by
it — so the gradient is that of the global token mean whatever the micro-batch split.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import megatron.core.distributed as mcore_distributed
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_trapo.train.memory import TransientPeak
from megatron_trapo.train.timing import StepTimers


def _configure_hooks(chunks: Sequence[torch.nn.Module], optimizer) -> None:
    config = chunks[0].config
    # read from the module at call time: the fake-CUDA dry run swaps it (platform/fake_cuda.py)
    config.finalize_model_grads_func = mcore_distributed.finalize_model_grads
    if optimizer is not None:
        config.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in chunks if hasattr(c, "no_sync")]
    if no_sync:
        config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]


def run_forward_backward(chunks: Sequence[torch.nn.Module], microbatches: List[Dict[str, Any]],
                         forward_step: Callable, seq_length: int, micro_batch_size: int,
                         forward_only: bool = False, optimizer=None) -> List[Dict[str, Any]]:
    """Run the schedule; returns the loss functions' metric dicts (on the last stage only).

    ``forward_step(batch, model) -> (output_tensor, loss_func)`` as megatron expects, except
    that it receives the micro-batch itself rather than an iterator.
    """
    chunks = list(chunks)
    pp = ps.get_pipeline_model_parallel_world_size()
    if len(chunks) > 1 and len(microbatches) % pp != 0:
        raise ValueError(f"interleaved pipeline needs the number of micro-batches "
                         f"({len(microbatches)}) to be a multiple of "
                         f"pipeline_model_parallel_size ({pp})")
    _configure_hooks(chunks, optimizer)
    if not forward_only:
        # megatron's fp32 optimizer leaves ``param.grad`` aliased to ``main_grad`` after a step;
        # autograd would then accumulate into the alias and DDP's hook add it again (doubling).
        # Megatron-LM avoids it with optimizer.zero_grad(); do it here so no caller can forget.
        for chunk in chunks:
            for param in chunk.parameters():
                param.grad = None

    def step_func(data_iterator, model):
        return forward_step(next(data_iterator), model)

    iterators = [iter(microbatches) for _ in chunks]
    fb = get_forward_backward_func()
    return fb(
        forward_step_func=step_func,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(ddp_chunks: Sequence[torch.nn.Module], optimizer, scheduler,
               microbatches: List[Dict[str, Any]], forward_step: Callable, seq_length: int,
               micro_batch_size: int, timers: Optional[StepTimers] = None,
               measure_memory: bool = False) -> Dict[str, Any]:
    """Zero grads, forward/backward every micro-batch, clip, step optimizer and LR scheduler
    (timed as the ``forward_backward`` and ``optimizer`` phases when ``timers`` is given).
    ``measure_memory``: also the forward/backward's transient peak (``transient_gb``)."""
    timers = timers or StepTimers()
    peak = TransientPeak()
    with timers.phase("forward_backward"), (peak if measure_memory else contextlib.nullcontext()):
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses = run_forward_backward(ddp_chunks, microbatches, forward_step, seq_length,
                                      micro_batch_size, forward_only=False, optimizer=optimizer)
    with timers.phase("optimizer"):
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=1)
    return {"losses": losses, "update_successful": bool(update_ok),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "transient_gb": peak.gb}
