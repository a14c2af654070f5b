"""Will the run fit in this machine's memory? The CPU trainer's start-up check, before any model
is built: a per-rank estimate from the architecture (models/memory_model.py), and the
micro-batch token budget it leaves room for.

Per rank (fp32 on CPU): weights, grads (4 B/param each), Adam (8 B/param, divided by DP under
``optimizer.use_distributed_optimizer``), the in-process engine's copy of the weights and its
KV cache (every row of a level × (longest prompt + response budget)) — of its weights only q, k
and v when it shares the trainer's (``rollout.share_trainer_weights``) — the Python / torch /
megatron runtime, the verifier workers' share, and the activations of one micro-batch:
what backward keeps per token and layer, the attention scores megatron's unfused attention
keeps (``model.attention_backend=local``: 2 × heads × tokens × sequence per layer, one layer's
with selective recompute; none with the default SDPA attention) and the loss's logits.
Checked against 1024-token micro-batches of SmolLM2-135M on 2 ranks (unfused attention,
selective recompute): estimated 2.5 GB of activations + logits per rank, measured 2.7 GB
(``memory/forward_backward_transient_gb``).

The machine's budget is ``batching.cpu_memory_target_gb`` (null: 90 % of what the kernel
reports available at start), shared by the ranks on the node (``LOCAL_WORLD_SIZE``). When the
fixed part plus one longest sequence's activations does not fit, the run is refused at start
with the estimate and what to change; otherwise ``batching.cpu_max_tokens_per_microbatch`` is
lowered, when it has to be, to the tokens that fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import psutil

from megatron_trapo.config import ConfigError, ModelConfig, TrainConfig, default_logprob_chunk_rows
from megatron_trapo.models.memory_model import layer_params, stored_activation_bytes
from megatron_trapo.models.provider import padded_vocab_size

GIB = 1024 ** 3
RUNTIME_GIB = 0.6  # RSS of a rank after importing torch, megatron-core, transformers (0.44) + groups
VERIFIER_GIB = 0.06  # one verifier worker (a forkserver child without torch)
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_ADVICE = {
    "optimizer": "optimizer.use_distributed_optimizer=true (Adam sharded over the ranks)",
    "activations": "model.recompute_granularity=selective (or full), or a shorter "
                   "loss.max_response_length",
    "engine_kv_cache": "fewer prompts_per_step or a shorter loss.max_response_length",
    "engine_weights": "rollout.dtype=bf16",
}


@dataclass
class CpuPlan:
    ranks: int  # on this node
    available_gib: float  # the node's budget
    fixed_gib: Dict[str, float] = field(default_factory=dict)  # per rank
    activation_bytes_per_token: float = 0.0
    sequence_tokens: int = 0  # the longest sequence: prompt + response budget
    microbatch_tokens: int = 0  # the budget the run uses

    @property
    def per_rank_gib(self) -> float:
        return self.available_gib / self.ranks

    def total_gib(self, tokens: int) -> float:
        """Per rank, with a micro-batch of ``tokens``."""
        return sum(self.fixed_gib.values()) + tokens * self.activation_bytes_per_token / GIB

    def summary(self) -> str:
        terms = ", ".join(f"{k} {v:.2f}" for k, v in self.fixed_gib.items())
        return (f"CPU memory plan per rank: {terms}, activations of a {self.microbatch_tokens}"
                f"-token micro-batch {self.microbatch_tokens * self.activation_bytes_per_token / GIB:.2f}"
                f" = {self.total_gib(self.microbatch_tokens):.2f} GiB × {self.ranks} ranks of "
                f"{self.available_gib:.1f} GiB")


def _params(m: ModelConfig) -> float:
    per_layer = layer_params(m, 1)
    vocab = padded_vocab_size(m)
    embeddings = vocab * m.hidden_size * (2 if m.untie_embeddings_and_output_weights else 1)
    return m.num_layers * (per_layer["sharded"] + per_layer["replicated"]) + embeddings \
        + m.hidden_size


def _activation_bytes_per_token(m: ModelConfig, cfg: TrainConfig, seq: int) -> float:
    scale = _BYTES[m.dtype] / 2  # the formulas count bf16 activations
    body = stored_activation_bytes(m, m.num_layers, 1, 1, False) * scale
    if m.attention_backend == "local":  # megatron's unfused attention keeps them for backward
        scored_layers = 1 if m.recompute_granularity in ("selective", "full") else m.num_layers
    else:  # torch SDPA (models/sdpa_attention.py): its fused CPU kernel keeps no scores
        scored_layers = 0
    scores = 2 * m.num_attention_heads * seq * _BYTES[m.dtype] * scored_layers
    vocab = padded_vocab_size(m)
    logits = 0.0 if cfg.loss.fused_output_layer else 2 * _BYTES[m.dtype] * vocab
    return body + scores + logits


def _rows_per_prompt(cfg: TrainConfig, speculative: bool) -> int:
    """The most rows one prompt's generation holds at once."""
    s = cfg.sampler
    if not speculative:
        return max(s.budgets)
    # level 0, then both versions of every later level (the full-solution one generates nothing)
    return s.budgets[0] + sum(b * (2 if 0 < r < 1 else 1)
                              for b, r in zip(s.budgets[1:], s.prefix_ratios[1:]))


def plan_cpu_memory(cfg: TrainConfig, m: ModelConfig, generates: bool, dp: int,
                    max_prompt_tokens: int, speculative: bool, ranks: Optional[int] = None,
                    available_gib: Optional[float] = None) -> CpuPlan:
    """The estimate, and the micro-batch budget (see the module docstring); raises
    :class:`ConfigError` when the run cannot fit."""
    ranks = ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if available_gib is None:
        target = cfg.batching.cpu_memory_target_gb
        available_gib = target if target is not None else \
            0.9 * psutil.virtual_memory().available / GIB
    params = _params(m)
    wbytes = _BYTES[m.dtype]
    adam = (8 + (4 if m.dtype != "fp32" else 0)) / (dp if cfg.optimizer.use_distributed_optimizer
                                                    else 1)
    seq = max_prompt_tokens + cfg.loss.max_response_length
    fixed = {"weights": params * wbytes, "grads": params * 4, "optimizer": params * adam}
    if generates:
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        ebytes = _BYTES[cfg.rollout.dtype]
        prompts = -(-cfg.prompts_per_step // dp)
        rows = prompts * _rows_per_prompt(cfg, speculative)
        fixed["engine_weights"] = params * ebytes
        shared = cfg.rollout.share_trainer_weights and cfg.rollout.dtype == m.dtype and \
            cfg.parallel.tensor_model_parallel_size == cfg.parallel.pipeline_model_parallel_size == 1
        if shared:  # the engine generates from the trainer's tensors but the ones the sync
            # assembles: q, k, v, cut from megatron's fused QKV (SwiGLU's gate and up are
            # views of linear_fc1: models/sharding.py whole_view)
            qkv = m.hidden_size * (m.num_attention_heads + 2 * m.query_groups) * head_dim
            fixed["engine_weights"] = m.num_layers * qkv * ebytes
        fixed["engine_kv_cache"] = rows * seq * 2 * m.num_layers * m.query_groups * head_dim \
            * ebytes
    local_vocab = padded_vocab_size(m)
    rows = cfg.loss.logprob_chunk_size or default_logprob_chunk_rows(local_vocab)
    fixed["logit_chunks"] = 12 * rows * local_vocab
    fixed = {k: v / GIB for k, v in fixed.items()}
    fixed["runtime"] = RUNTIME_GIB + 2 * VERIFIER_GIB / ranks
    plan = CpuPlan(ranks, available_gib, fixed, _activation_bytes_per_token(m, cfg, seq), seq)
    cap = cfg.batching.cpu_max_tokens_per_microbatch or cfg.batching.max_tokens_per_microbatch
    room = plan.per_rank_gib - sum(fixed.values())
    fit = int(room * GIB // plan.activation_bytes_per_token) if room > 0 else 0
    if fit < seq:  # a sequence gets a micro-batch of its own however small the budget
        plan.microbatch_tokens = seq
        terms = {**fixed, "activations": seq * plan.activation_bytes_per_token / GIB}
        big = max((k for k in terms if k in _ADVICE), key=terms.get)
        raise ConfigError(
            f"this run needs ~{plan.total_gib(seq):.1f} GiB per rank × {ranks} ranks, more than the "
            f"{available_gib:.1f} GiB "
            + ("of batching.cpu_memory_target_gb" if cfg.batching.cpu_memory_target_gb is not None
               else "available (90% of the machine's free memory)")
            + " (per rank: " + ", ".join(f"{k} {v:.2f}" for k, v in terms.items())
            + f" GiB, activations for one {seq}-token sequence); the largest term that can "
            f"shrink is {big}: {_ADVICE[big]}")
    plan.microbatch_tokens = min(cap, max(fit // 64 * 64, seq))
    return plan
