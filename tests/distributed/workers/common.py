"""Helpers shared by the multi-process test workers (run under torchrun, gloo on CPU)."""
from __future__ import annotations

import os

import torch

from results import to_json

from megatron_trapo.config import OptimizerConfig, ParallelConfig
from megatron_trapo.models.names import global_named_main_grads
from megatron_trapo.models.presets import preset
from megatron_trapo.models.provider import build_model
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.train.forward_backward import run_forward_backward
from megatron_trapo.train.lm_loss import lm_forward_step, reduce_lm_loss, shift_batch
from megatron_trapo.train.optimizer import build_training_state

SEQ, MBS, NUM_MB = 16, 2, 4
MODEL = preset("tiny")


def rank() -> int:
    return torch.distributed.get_rank()


def setup(tp=1, pp=1, vpp=None, sp=False, distopt=False, lr=1e-3, seed=0):
    """Process groups for the layout, then a freshly initialised model + optimizer."""
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp)
    initialize_distributed(par, MODEL, seed=1)
    torch.manual_seed(seed)
    chunks = build_model(MODEL, par)
    return build_training_state(chunks, OptimizerConfig(lr=lr, use_distributed_optimizer=distopt), 100)


def fixed_microbatches(seed=5):
    data = torch.randint(0, MODEL.vocab_size, (NUM_MB, MBS, SEQ + 1),
                         generator=torch.Generator().manual_seed(seed))
    return [shift_batch(d) for d in data]


def _logits_loss(output_tensor):
    return output_tensor.sum() * 0.0, torch.tensor(1, dtype=torch.int), {"logits": output_tensor.detach()}


def _logits_step(batch, model):
    tokens = batch["tokens"]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None), _logits_loss


def full_logits(chunks, microbatches):
    """Full-vocabulary logits [NUM_MB, b, s, V] of a forward-only pass, on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    out = run_forward_backward(chunks, microbatches, _logits_step, SEQ, MBS, forward_only=True)
    logits = None
    if ps.is_pipeline_last_stage():
        logits = torch.stack([gather_from_tensor_model_parallel_region(d["logits"]) for d in out])
    return broadcast_from_last_stage(logits)


def broadcast_from_last_stage(obj):
    from megatron.core import parallel_state as ps

    holder = [obj]
    last = ps.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast_object_list(holder, src=last,
                                            group=ps.get_pipeline_model_parallel_group())
    return holder[0]


def loss_and_grads(ddp_chunks, microbatches):
    """Token-mean loss and the final (DP-reduced, token-normalised) grads by global name."""
    from megatron.core import parallel_state as ps

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    out = run_forward_backward(ddp_chunks, microbatches, lm_forward_step, SEQ, MBS)
    loss = broadcast_from_last_stage(reduce_lm_loss(out) if ps.is_pipeline_last_stage() else None)
    grads = {}
    for chunk in ddp_chunks:
        grads.update(global_named_main_grads(chunk))
    # Only TP rank 0 of each stage: the tiny model's TP=1 layouts hold whole tensors.
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, grads)
    merged = {}
    for g in gathered:
        for k, v in g.items():
            merged.setdefault(k, v)
    return loss, merged


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def write_results(results) -> None:
    """Rank 0 writes the suite's typed result (a dataclass of ``results.py``) as JSON."""
    if rank() == 0:
        with open(os.environ["TRAPO_TEST_OUT"], "w") as f:
            f.write(to_json(results))


def train(state, microbatches, n):
    """``n`` optimizer steps on the same micro-batches; the loss of each (on every rank)."""
    from megatron.core import parallel_state as ps

    from megatron_trapo.train.forward_backward import train_step

    losses = []
    for _ in range(n):
        out = train_step(*state, microbatches, lm_forward_step, SEQ, MBS)
        loss = reduce_lm_loss(out["losses"]) if ps.is_pipeline_last_stage() else None
        losses.append(broadcast_from_last_stage(loss))
    return losses


def loss_and_grads_by_layout(ddp_chunks, microbatches):
    """Token-mean loss of a forward/backward pass at any layout (grads not gathered)."""
    from megatron.core import parallel_state as ps

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    out = run_forward_backward(ddp_chunks, microbatches, lm_forward_step, SEQ, MBS)
    return broadcast_from_last_stage(reduce_lm_loss(out) if ps.is_pipeline_last_stage() else None)
