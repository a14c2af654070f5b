"""Megatron's DDP wrapper, optimizer and LR scheduler, plus fixes for its checkpoint bugs.

megatron-core 0.15/0.16 optimizer checkpoints have three defects with torch's Adam (the
optimizer used when neither TE nor apex is installed, i.e. always on CPU):
1. save on a fresh optimizer fails (torch Adam creates its state lazily at the first step;
   ``DistributedOptimizer`` asserts one common ``step`` over an empty state);
2. megatron's ``init_state_fn`` creates ``exp_avg``/``exp_avg_sq`` but no ``step``, so after a
   load torch Adam raises ``KeyError: 'step'``;
3. after a distributed-optimizer load every parameter's state holds *the same* ``step``
   tensor object; torch Adam increments it in place once per parameter, so a resumed run
   uses a wrong bias correction and silently drifts.
:func:`init_optimizer_state` (before any sharded state dict is built) and
:func:`untie_optimizer_steps` (after every load) fix them; the resume test catches the class.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_trapo.config import OptimizerConfig


def wrap_ddp(chunks: List[torch.nn.Module], use_distributed_optimizer: bool,
             overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
             bucket_size: Optional[int] = None,
             check_for_nan_in_grad: Optional[bool] = None) -> List[torch.nn.Module]:
    """Wrap each model chunk in megatron's DDP (contiguous fp32 grad buffers). NaN checks of
    the reduced gradients default to on with CUDA (bf16 has no loss scaler to catch them)."""
    if check_for_nan_in_grad is None:
        check_for_nan_in_grad = torch.cuda.is_available()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=check_for_nan_in_grad,
        bucket_size=bucket_size,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk,
            # Bucketing only matters with overlap; one bucket per chunk keeps CPU runs simple.
            disable_bucketing=(i > 0) or not overlap_grad_reduce))
    return wrapped


_PATCHED = False


def _patch_distributed_optimizer_state_copy() -> None:
    """Fix 2b: ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key
    of the live state (``step`` included) from the checkpoint tensors, which never carry
    ``step`` (megatron restores it separately) — ``KeyError: 'step'``. Copy only the keys the
    checkpoint provides. Idempotent; touches nothing but that method."""
    global _PATCHED
    if _PATCHED:
        return

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_states_skipping_missing(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_skipping_missing
    _PATCHED = True


def build_optimizer(ddp_chunks: List[torch.nn.Module], cfg: OptimizerConfig):
    """Megatron optimizer (fp32 / mixed precision / distributed) for the DDP-wrapped chunks."""
    _patch_distributed_optimizer_state_copy()
    model_config = ddp_chunks[0].config
    mcfg = MegatronOptimizerConfig(
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=model_config.bf16,
        fp16=model_config.fp16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        optimizer_cpu_offload=cfg.optimizer_cpu_offload,
        use_precision_aware_optimizer=cfg.use_precision_aware_optimizer,
    )
    # {}: no parameter group override, so every parameter decays (the reference); None:
    # megatron's standard overrides, which exempt biases and 1-D parameters
    overrides = {} if cfg.weight_decay_norms_and_biases else None
    return get_megatron_optimizer(mcfg, ddp_chunks, config_overrides=overrides)


def build_scheduler(optimizer, cfg: OptimizerConfig, train_iters: int, updates_per_iter: int = 1):
    """Megatron's ``OptimizerParamScheduler`` (step-based, one step per optimizer update;
    ``updates_per_iter`` updates per rollout step: warm-up and decay, given in rollout steps,
    are stretched to them)."""
    decay = (cfg.lr_decay_iters or max(train_iters, 1)) * updates_per_iter
    warmup = cfg.lr_warmup_iters * updates_per_iter
    if cfg.lr_warmup_fraction is not None:  # megatron's --lr-warmup-fraction
        warmup = int(cfg.lr_warmup_fraction * decay)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(decay, warmup + 1),
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(decay, 1),
        wd_incr_style="constant",
    )


def _inner_torch_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [sub.optimizer for sub in subs if getattr(sub, "optimizer", None) is not None]


def init_optimizer_state(optimizer) -> None:
    """Create torch Adam's lazy state (``step`` included) for every parameter that has none."""
    for opt in _inner_torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)


def untie_optimizer_steps(optimizer) -> None:
    """Give every parameter its own ``step`` tensor (a loaded checkpoint may share one)."""
    for opt in _inner_torch_optimizers(optimizer):
        for state in opt.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()


def optimizer_steps(optimizer) -> List[float]:
    """Every parameter's Adam ``step`` (for tests and sanity checks)."""
    steps = []
    for opt in _inner_torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state:
                steps.append(float(state["step"]))
    return steps


def build_training_state(chunks, optim_cfg: OptimizerConfig, train_iters: int,
                         updates_per_iter: int = 1
                         ) -> Tuple[List[torch.nn.Module], object, object]:
    """DDP-wrapped chunks, optimizer (state initialised) and scheduler, ready to train."""
    ddp = wrap_ddp(chunks, optim_cfg.use_distributed_optimizer, optim_cfg.overlap_grad_reduce,
                   optim_cfg.overlap_param_gather, optim_cfg.ddp_bucket_size,
                   optim_cfg.check_for_nan_in_grad)
    optimizer = build_optimizer(ddp, optim_cfg)
    init_optimizer_state(optimizer)
    scheduler = build_scheduler(optimizer, optim_cfg, train_iters, updates_per_iter)
    return ddp, optimizer, scheduler
