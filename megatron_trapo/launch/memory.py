"""Per-GPU memory of a layout, estimated from the architecture alone (no GPU, no weights).

Trainer, per pipeline stage (bytes per GPU):

* **weights**: the stage's parameters (TP-sharded matrices, replicated norms; the embedding on
  the first stage, the output layer on the last) × 2 (bf16) or 4 (fp32).
* **grads**: megatron DDP's gradient buffer, fp32 (``grad_reduce_in_fp32``): 4 per parameter.
* **optimizer**: Adam's fp32 master copy (bf16 runs) and two moments, 12 (8 for fp32
  parameters) per parameter, divided by DP under the distributed optimizer, 0 when offloaded.
* **activations**: what backward keeps per token and layer, in bf16, for SwiGLU/GQA layers with
  flash attention (no s² scores): the two norm inputs and the two linear inputs they feed (8h,
  sequence-sharded with SP), q and the attention output (2·2·h_q), k and v (4·kv), SwiGLU's
  fc1 output and its product (6·ffn), softmax statistics (4·heads), TP-sharded. Full recompute
  keeps only each recompute chunk's input (2h) plus one chunk recomputed in backward; selective
  recompute (core attention) saves nothing more under flash attention. 1F1B keeps
  ``pp − stage`` micro-batches in flight.
* **logits** (last stage): the logprob function's fp32 chunk temporaries (three
  ``[chunk, vocab/TP]`` buffers), plus — without ``loss.fused_output_layer`` — the output
  layer's [tokens, vocab/TP] bf16 output and its gradient.

Inference server: bf16 weights / its TP; SGLang's ``mem_fraction_static`` of the GPU holds
weights and KV cache, 2 (k, v) × layers × kv-heads-per-GPU × head_dim × 2 bytes per token.

A fixed reserve per GPU covers the CUDA context, NCCL buffers and allocator fragmentation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_trapo.config import ConfigError, ModelConfig, TrainConfig
# the architecture's formulas, shared with the CPU trainer's check (train/cpu_memory.py)
from megatron_trapo.models.memory_model import (  # noqa: F401 (re-exported)
    activation_bytes_per_token, layer_params, logits_bytes, stored_activation_bytes)
from megatron_trapo.models.provider import padded_vocab_size

GIB = 1024 ** 3
# memory.total as nvidia-smi reports it, MiB
GPU_MIB = {"h100-80gb": 81559, "h100-94gb": 95830, "h200": 143771, "a100-80gb": 81920,
           "a100-40gb": 40960, "b200": 183359, "l40s": 46068}
RESERVED_GIB = 5.0  # CUDA context (~0.5), NCCL communicators and buffers, fragmentation
HEADROOM = 0.10  # a plan "fits with headroom" when 10 % of the GPU stays free beyond that
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class StagePlan:
    pp_rank: int
    layers: int
    params: float
    microbatches_in_flight: int
    memory_gib: Dict[str, float] = field(default_factory=dict)


@dataclass
class ServerPlan:
    tp: int
    weights_gib: float
    kv_cache_gib: float
    kv_bytes_per_token: float
    max_tokens: int
    concurrent_sequences: int


def plan_trainer(m: ModelConfig, cfg: TrainConfig, dp: int) -> List[StagePlan]:
    par = cfg.parallel
    tp, pp, sp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, \
        par.sequence_parallel
    if m.num_layers % pp:
        raise ConfigError(f"num_layers={m.num_layers} is not divisible by "
                          f"pipeline_model_parallel_size={pp}")
    per_layer = layer_params(m, tp)
    vocab = padded_vocab_size(m, tp) / tp
    tokens = cfg.batching.max_tokens_per_microbatch
    wbytes = _BYTES[m.dtype]
    opt_bytes = 8 + (4 if m.dtype != "fp32" else 0)
    opt_share = 0.0 if cfg.optimizer.optimizer_cpu_offload else \
        (1 / dp if cfg.optimizer.use_distributed_optimizer else 1.0)
    tied = not m.untie_embeddings_and_output_weights
    stages = []
    for p in range(pp):
        layers = m.num_layers // pp
        params = layers * (per_layer["sharded"] + per_layer["replicated"])
        first, last = p == 0, p == pp - 1
        if first:
            params += vocab * m.hidden_size
        if last:
            params += m.hidden_size  # final norm
            if not tied or pp > 1:  # tied at PP>1: the last stage holds its own copy
                params += vocab * m.hidden_size
        in_flight = pp - p
        acts = stored_activation_bytes(m, layers, tokens, tp, sp) * in_flight
        logits = logits_bytes(cfg.loss, tokens, vocab) if last else 0.0
        mem = {"weights": params * wbytes, "grads": params * 4,
               "optimizer": params * opt_bytes * opt_share, "activations": acts,
               "logits": logits}
        mem = {k: v / GIB for k, v in mem.items()}
        mem["total"] = sum(mem.values())
        stages.append(StagePlan(p, layers, params, in_flight, mem))
    return stages


def plan_server(m: ModelConfig, total_params: float, tp: int, capacity_gib: float,
                mem_fraction: float, seq_tokens: int) -> ServerPlan:
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    kv_heads = max(1, m.query_groups // tp)  # fewer KV heads than TP ranks: replicated
    kv_per_token = 2 * m.num_layers * kv_heads * head_dim * 2
    weights = total_params * 2 / tp / GIB
    kv = mem_fraction * capacity_gib - weights
    max_tokens = int(max(kv, 0) * GIB // kv_per_token)
    return ServerPlan(tp, weights, kv, kv_per_token, max_tokens, max_tokens // seq_tokens)


_ADVICE = {
    "activations": "set model.recompute_granularity=full model.recompute_method=uniform "
                   "model.recompute_num_layers=1, lower batching.max_tokens_per_microbatch, or raise "
                   "parallel.tensor_model_parallel_size / pipeline_model_parallel_size",
    "optimizer": "set optimizer.use_distributed_optimizer=true and add data-parallel ranks "
                 "(more trainer nodes), or optimizer.optimizer_cpu_offload=true",
    "grads": "raise parallel.tensor_model_parallel_size or pipeline_model_parallel_size",
    "weights": "raise parallel.tensor_model_parallel_size or pipeline_model_parallel_size",
    "logits": "lower batching.max_tokens_per_microbatch or raise "
              "parallel.tensor_model_parallel_size",
}


def _advice(term: str, cfg: Optional[TrainConfig], dp: int) -> str:
    if term == "optimizer" and cfg is not None and cfg.optimizer.use_distributed_optimizer:
        return (f"the distributed optimizer shards it over DP={dp}: add data-parallel ranks "
                "(more trainer nodes), or set optimizer.optimizer_cpu_offload=true")
    return _ADVICE[term]


def verdict(stages: List[StagePlan], server: Optional[ServerPlan], capacity_gib: float,
            seq_tokens: int, cfg: Optional[TrainConfig] = None, dp: int = 1) -> List[str]:
    """Why the plan does not fit (empty when it does)."""
    usable = capacity_gib - RESERVED_GIB
    problems = []
    for st in stages:
        if st.memory_gib["total"] > usable:
            terms = {k: v for k, v in st.memory_gib.items() if k != "total"}
            big = max(terms, key=terms.get)
            problems.append(
                f"pipeline stage {st.pp_rank} needs {st.memory_gib['total']:.1f} GiB of "
                f"{usable:.1f} usable; the largest term is {big} ({terms[big]:.1f} GiB): "
                f"{_advice(big, cfg, dp)}")
    if server is not None and server.concurrent_sequences < 1:
        problems.append(
            f"an inference server of TP {server.tp} holds {server.weights_gib:.1f} GiB of "
            f"weights and room for {server.max_tokens} KV tokens, less than one "
            f"{seq_tokens}-token sequence: raise launch.server_tp_size or "
            "launch.server_mem_fraction")
    return problems
