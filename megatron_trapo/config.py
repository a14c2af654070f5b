"""Typed configuration: dataclasses with the paper's defaults, YAML files, key=value overrides.

Field names follow Megatron-LM's command-line flags where one exists
(``tensor_model_parallel_size``, ``num_query_groups``, ``untie_embeddings_and_output_weights``…),
so that a Megatron user can read a config without a glossary. OmegaConf does the merging and
type checking of YAML and overrides; every dataclass validates its own values in
``__post_init__`` and names the offending field.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar
from urllib.parse import urlparse

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_trapo.algorithms.methods import LOSS_MODES
from megatron_trapo.models.preset_table import PRESETS

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def print_error(exc: Exception) -> None:
    """``megatron-trapo: error: …`` on stderr as one line written in one call: the ranks of a
    torchrun job that all refuse the same input print whole lines, not lines cut into each
    other."""
    sys.stderr.write(f"megatron-trapo: error: {exc}\n")
    sys.stderr.flush()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})  # servers on this machine


# The choice lists, each defined once (the code that implements them checks against these).
AGGREGATIONS = ("constant", "token_mean", "seq_mean_token_mean")  # algorithms/losses.py
REWARD_EXTRACTIONS = ("whole_response", "last_boxed")  # reward/math_reward.py
ENGINES = ("hf", "sglang", "vllm")  # rollout/__init__.py: make_engine
SERVER_IMPLS = ("hf", "sglang")  # rollout/servers.py: server_command
WEIGHT_SYNC_MODES = ("inprocess", "disk", "distributed")  # rollout/weight_sync.py: STRATEGIES


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    _check(value in allowed, f"{name}={value!r} is not one of {list(allowed)}")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only GPT (Llama / Qwen2 / Qwen3 families)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None = multi-head attention (no GQA)
    kv_channels: Optional[int] = None  # head dim; None = hidden_size // num_attention_heads
    vocab_size: int = 256
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 256
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    normalization: str = "RMSNorm"
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = False
    swiglu: bool = True
    hf_architecture: Optional[str] = None  # e.g. Qwen2ForCausalLM, for conversion/sync
    # --- run-time fields (RUNTIME_MODEL_FIELDS): how to run the architecture; with ``load=``
    # they come from this config, the architecture from the checkpoint
    # auto | fp32 | bf16 | fp16; auto: the checkpoint's with load=, else fp32 (an explicit
    # value wins over the checkpoint's, fp32 included)
    params_dtype: str = "auto"
    fp8: Optional[str] = None  # None | hybrid | e4m3 (Transformer Engine, GPU only)
    # tensorwise (current scaling) | blockwise | delayed | mxfp8 (Blackwell only)
    fp8_recipe: str = "tensorwise"
    first_last_layers_bf16: bool = False  # keep the first/last layers out of FP8
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    transformer_impl: str = "auto"  # auto | transformer_engine | local
    # core attention without Transformer Engine (megatron's --attention-backend, local spec):
    # auto = sdpa, torch's fused SDPA over packed sequences (models/sdpa_attention.py);
    # local = megatron's unfused DotProductAttention (block-diagonal masks, [heads, s, s] scores)
    attention_backend: str = "auto"
    # activation recompute (megatron's flags): selective (core attention) | full
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None  # full: uniform | block
    recompute_num_layers: Optional[int] = None  # full: layers per chunk (uniform) / per stage (block)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "vocab_size", "max_position_embeddings", "make_vocab_size_divisible_by"):
            _check(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_query_groups is not None:
            _check(self.num_query_groups > 0 and self.num_attention_heads % self.num_query_groups == 0,
                   f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                   f"model.num_query_groups={self.num_query_groups}")
        if self.kv_channels is None:
            _check(self.hidden_size % self.num_attention_heads == 0,
                   f"model.hidden_size={self.hidden_size} is not divisible by "
                   f"model.num_attention_heads={self.num_attention_heads}; set model.kv_channels")
        _choice("model.normalization", self.normalization, ["RMSNorm", "LayerNorm"])
        _choice("model.params_dtype", self.params_dtype, ["auto", "fp32", "bf16", "fp16"])
        _choice("model.fp8", self.fp8, [None, "hybrid", "e4m3"])
        _choice("model.fp8_recipe", self.fp8_recipe, ["delayed", "tensorwise", "mxfp8", "blockwise"])
        _choice("model.transformer_impl", self.transformer_impl, ["auto", "transformer_engine", "local"])
        _choice("model.attention_backend", self.attention_backend, ["auto", "sdpa", "local"])
        _check(not (self.attention_backend == "sdpa" and self.transformer_impl == "transformer_engine"),
               "model.attention_backend=sdpa is for the local spec; with "
               "model.transformer_impl=transformer_engine attention is Transformer Engine's")
        _check(not (self.first_last_layers_bf16 and self.fp8_recipe == "delayed"),
               "model.first_last_layers_bf16 does not work with model.fp8_recipe=delayed "
               "(megatron-core refuses it); use tensorwise or blockwise")
        _choice("model.recompute_granularity", self.recompute_granularity, [None, "selective", "full"])
        _choice("model.recompute_method", self.recompute_method, [None, "uniform", "block"])
        if self.recompute_granularity == "full":
            _check(self.recompute_method is not None and self.recompute_num_layers is not None,
                   "model.recompute_granularity=full needs model.recompute_method (uniform|block) "
                   "and model.recompute_num_layers")
        else:
            _check(self.recompute_method is None,
                   "model.recompute_method is only used with model.recompute_granularity=full")

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def dtype(self) -> str:
        """The parameter dtype a model built from this config has (``auto`` → fp32)."""
        return "fp32" if self.params_dtype == "auto" else self.params_dtype


RUNTIME_MODEL_FIELDS = ("params_dtype", "fp8", "fp8_recipe", "first_last_layers_bf16",
                        "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16",
                        "transformer_impl", "attention_backend", "recompute_granularity",
                        "recompute_method", "recompute_num_layers")


def runtime_model(checkpoint: ModelConfig, requested: ModelConfig) -> ModelConfig:
    """The model a run with ``load=`` builds: the architecture recorded in the checkpoint, the
    run-time fields (FP8, recompute, transformer impl, dtype) from the run's config. An
    architecture field the config sets to something else than both the default and the
    checkpoint is an error naming it (it cannot be honoured by loading those weights);
    ``params_dtype=auto`` keeps the checkpoint's."""
    defaults = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name in RUNTIME_MODEL_FIELDS or f.name == "hf_architecture":
            continue
        want, have = getattr(requested, f.name), getattr(checkpoint, f.name)
        if want != getattr(defaults, f.name) and want != have:
            raise ConfigError(f"model.{f.name}={want!r} conflicts with the checkpoint being "
                              f"loaded ({have!r}); the architecture comes from the checkpoint")
    runtime = {name: getattr(requested, name) for name in RUNTIME_MODEL_FIELDS}
    if requested.params_dtype == "auto":
        runtime["params_dtype"] = checkpoint.params_dtype
    return dataclasses.replace(checkpoint, **runtime)


@dataclass
class ParallelConfig:
    """Megatron's parallel layout. Data parallel size is what remains of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    distributed_backend: str = "auto"  # auto | nccl | gloo
    distributed_timeout_minutes: int = 30
    # other ranks wait for rank 0's rollouts and evaluation on a gloo group with this timeout,
    # not inside an NCCL collective (whose watchdog would abort a long generation phase)
    rollout_wait_timeout_minutes: int = 360

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size"):
            _check(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        _choice("parallel.distributed_backend", self.distributed_backend, ["auto", "nccl", "gloo"])

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)


@dataclass
class OptimizerConfig:
    """Optimizer and LR schedule. Defaults: the paper (constant lr 5e-6, clip 1.0, AdamW)."""

    optimizer: str = "adam"  # adam | sgd
    lr: float = 5e-6
    min_lr: float = 0.0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    lr_warmup_iters: int = 0
    # warm-up as a share of the decay steps (megatron's --lr-warmup-fraction), instead of
    # lr_warmup_iters: the SFT stage's 0.1 of its run
    lr_warmup_fraction: Optional[float] = None
    lr_decay_iters: Optional[int] = None
    # AdamW's decoupled decay; 0.01 on every parameter, as the reference (verl's FSDP AdamW
    # over model.parameters(); fidelity review D7)
    weight_decay: float = 0.01
    # megatron's own default leaves biases and 1-D parameters (norms) undecayed; false does
    weight_decay_norms_and_biases: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    # memory / overlap knobs (megatron's flags)
    optimizer_cpu_offload: bool = False  # Adam states and the step on the CPU
    use_precision_aware_optimizer: bool = False  # bf16 main params / states where safe (TE)
    overlap_grad_reduce: bool = False  # DP grad reduce-scatter overlapped with backward
    overlap_param_gather: bool = False  # distributed optimizer's all-gather with forward
    ddp_bucket_size: Optional[int] = None  # elements per DDP bucket (None: megatron's default)
    check_for_nan_in_grad: Optional[bool] = None  # None: on with CUDA (a NaN stops the step)

    def __post_init__(self) -> None:
        _choice("optimizer.optimizer", self.optimizer, ["adam", "sgd"])
        _choice("optimizer.lr_decay_style", self.lr_decay_style, ["constant", "linear", "cosine"])
        _check(self.lr >= 0, f"optimizer.lr must be >= 0, got {self.lr}")
        _check(self.lr_warmup_fraction is None or 0 <= self.lr_warmup_fraction < 1,
               f"optimizer.lr_warmup_fraction must be in [0, 1) or null, got "
               f"{self.lr_warmup_fraction}")
        _check(self.lr_warmup_fraction is None or self.lr_warmup_iters == 0,
               "optimizer.lr_warmup_fraction and optimizer.lr_warmup_iters: give one")
        _check(self.clip_grad >= 0, f"optimizer.clip_grad must be >= 0, got {self.clip_grad}")
        _check(self.weight_decay >= 0,
               f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        for flag in ("optimizer_cpu_offload", "use_precision_aware_optimizer", "overlap_param_gather"):
            _check(not getattr(self, flag) or self.use_distributed_optimizer,
                   f"optimizer.{flag} needs optimizer.use_distributed_optimizer=true")
        _check(not self.use_precision_aware_optimizer or self.optimizer == "adam",
               "optimizer.use_precision_aware_optimizer works with optimizer=adam only")
        _check(not self.overlap_param_gather or self.overlap_grad_reduce,
               "optimizer.overlap_param_gather needs optimizer.overlap_grad_reduce=true")
        _check(self.ddp_bucket_size is None or self.ddp_bucket_size > 0,
               "optimizer.ddp_bucket_size must be > 0 or null")


@dataclass
class MicroGroupConfig:
    """Defaults: the paper's n = (4, 2, 1, 1), L = (0, 0.25, 0.5, 1.0), t = (−1, .5, .7, .9)."""

    budgets: List[int] = field(default_factory=lambda: [4, 2, 1, 1])
    prefix_ratios: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0])
    threshold_mode: str = "count"  # count (reference code) | mean (paper text)
    mean_thresholds: List[float] = field(default_factory=lambda: [-1.0, 0.5, 0.7, 0.9])
    count_thresholds: List[int] = field(default_factory=lambda: [0, 2, 4, 7])  # guided if correct < c
    # per level, per sample: train the prefix with TrSFT (1) or use it as context only (0)
    sft_flags: List[List[int]] = field(default_factory=lambda: [[0, 0, 0, 0], [0, 1], [1], [1]])
    trace_index: List[int] = field(default_factory=lambda: [0, 0, 0, 1])  # expert trace per level
    snap_window: float = 0.3  # snap the cut forward to a "\n\n" token within ratio + window
    # Generate every level's possible samples (guided and free where rewards decide) in one
    # engine call, then keep what the schedule picks: the same groups from one decoding pass
    # instead of one per level, for up to ~40% more samples. null: on for the in-process
    # engine (rollout.engine=hf: small batches, latency-bound), off for servers.
    speculative: Optional[bool] = None

    def __post_init__(self) -> None:
        n = len(self.budgets)
        for name in ("prefix_ratios", "mean_thresholds", "count_thresholds", "sft_flags",
                     "trace_index"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"sampler.{name} has {len(getattr(self, name))} entries, "
                                  f"sampler.budgets has {n}")
        for i, (b, flags) in enumerate(zip(self.budgets, self.sft_flags)):
            if len(flags) != b:
                raise ConfigError(f"sampler.sft_flags[{i}] has {len(flags)} flags for a budget of {b}")
        if self.threshold_mode not in ("count", "mean"):
            raise ConfigError(f"sampler.threshold_mode={self.threshold_mode!r} is not count|mean")
        if any(not 0.0 <= r <= 1.0 for r in self.prefix_ratios):
            raise ConfigError(f"sampler.prefix_ratios must be in [0, 1], got {self.prefix_ratios}")

    @property
    def group_size(self) -> int:
        return sum(self.budgets)




@dataclass
class LuffyConfig:
    """LUFFY's four knobs (its paper and code): off-policy samples per group, the shaping of
    their tokens, the clip of the on-policy ones, where advantage statistics come from."""

    off_policy: int = 1  # k full expert solutions among a group's G samples
    gamma: float = 0.1  # f(p) = p / (p + γ) on off-policy tokens
    # the PPO clip of the on-policy tokens; null (the default): none, as LUFFY's script runs
    # it (loss_remove_clip=True; fidelity review D4); 0.2 is LUFFY's code default. It acts only
    # with several updates per rollout batch (batching.ppo_mini_batches / ppo_epochs)
    clip_ratio: Optional[float] = None
    on_policy_stats_only: bool = False  # group mean/std from the on-policy samples only

    def __post_init__(self) -> None:
        _check(self.gamma > 0, f"loss.luffy.gamma must be > 0, got {self.gamma}")
        _check(self.off_policy >= 0, f"loss.luffy.off_policy must be >= 0, got {self.off_policy}")
        _check(self.clip_ratio is None or self.clip_ratio > 0,
               f"loss.luffy.clip_ratio must be > 0 or null, got {self.clip_ratio}")


def default_logprob_chunk_rows(local_vocab: int) -> int:
    """Rows per chunk of logits when ``loss.logprob_chunk_size`` is null: 2²⁴ fp32 values
    (64 MiB) — 341 rows for SmolLM2's 49k vocabulary, a whole micro-batch for a 384-token one."""
    return max(1, (1 << 24) // max(local_vocab, 1))


@dataclass
class LossConfig:
    """Which tokens get which loss, and how a step's loss is normalised (paper defaults)."""

    loss_mode: str = "trapo"  # a method or pipeline of algorithms/methods.py (LOSS_MODES)
    trust_region_alpha: float = 0.1  # TrSFT's α
    aggregation: str = "constant"  # constant (sum / L_max per sequence) | token_mean | seq_mean_token_mean
    max_response_length: int = 8192  # L_max of the constant normaliser
    entropy_coef: float = 0.001  # the bonus −coef·H, with RL methods only
    # which tokens the bonus covers, and how it is averaged. response (the reference:
    # masked_mean(entropy, response_mask), fidelity review D6): every response token, expert
    # prefixes (trained or context) and generated ones alike, as a token mean over the step;
    # generated: the policy's own tokens only, weighted like the loss (loss.aggregation)
    entropy_tokens: str = "response"
    sft_weight: float = 1.0
    rl_weight: float = 1.0
    clip_ratio_low: Optional[float] = None  # PPO ε; the paper runs on-policy without clipping
    clip_ratio_high: Optional[float] = None
    luffy: LuffyConfig = field(default_factory=LuffyConfig)
    # truncated IS against the rollout engine's logprobs, weight min(π_old/π_rollout, cap):
    # null = 2.0 when rollout.quantization serves other weights than the trainer's (FP8), else
    # off; 0 = off
    tis_cap: Optional[float] = None
    # The output layer folded into the loss: logits are computed chunk by chunk from its input
    # and weight, and never exist for the whole micro-batch (train/output_layer.py); one more
    # output-layer GEMM in the backward. false: megatron's output layer, then the loss.
    fused_output_layer: bool = True
    # rows of logits per chunk; null: chunks of 2^24 values (64 MiB fp32), i.e. 16M / (V/TP)
    logprob_chunk_size: Optional[int] = None

    def __post_init__(self) -> None:
        _choice("loss.loss_mode", self.loss_mode, LOSS_MODES)
        _choice("loss.aggregation", self.aggregation, AGGREGATIONS)
        _choice("loss.entropy_tokens", self.entropy_tokens, ["response", "generated"])
        _check(0.0 <= self.trust_region_alpha <= 1.0,
               f"loss.trust_region_alpha must be in [0, 1], got {self.trust_region_alpha}")
        _check(self.max_response_length >= 1, "loss.max_response_length must be >= 1")
        for name in ("clip_ratio_low", "clip_ratio_high"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"loss.{name} must be > 0 or null, got {value}")
        _check(self.tis_cap is None or self.tis_cap >= 0,
               f"loss.tis_cap must be >= 0 (0: off) or null, got {self.tis_cap}")
        _check(self.logprob_chunk_size is None or self.logprob_chunk_size >= 1,
               "loss.logprob_chunk_size must be >= 1 or null")


@dataclass
class RolloutConfig:
    """Which engine generates rollouts, and how the trainer's weights reach it."""

    engine: str = "hf"  # hf (in-process transformers) | sglang | vllm
    temperature: float = 1.0  # sampling of the training rollouts (the paper: 1.0)
    top_p: float = 1.0
    model_path: Optional[str] = None  # HF folder the engine starts from
    tokenizer_path: Optional[str] = None
    # for engine=sglang: launch "sglang", or "hf" (our SGLang-protocol server over the HF engine)
    server_impl: str = "hf"
    num_servers: int = 1
    server_urls: List[str] = field(default_factory=list)  # attach instead of launching
    server_args: List[str] = field(default_factory=list)  # extra flags of launched servers
    use_router: bool = True
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    max_retries: int = 3
    max_batch_size: int = 64
    device: str = "cpu"
    dtype: str = "fp32"
    weight_sync: str = "auto"  # auto | inprocess | disk | distributed
    # engine=hf in the trainer's process: the engine generates from the trainer's own fp32
    # tensors (all but q/k/v and gate/up, which the sync assembles) instead of a copy
    share_trainer_weights: bool = True
    weight_sync_bucket_mb: int = 512
    # disk mode: a folder every server can read (shared FS for servers on other nodes); the
    # newest weight_sync_keep_versions versions are kept, older ones deleted
    weight_sync_dir: Optional[str] = None
    weight_sync_keep_versions: int = 2
    # distributed mode: the address servers use to reach the trainer's store and group
    # (default: loopback for local servers, else NCCL_SOCKET_IFNAME's or the routing interface)
    weight_sync_address: Optional[str] = None
    weight_sync_timeout_s: float = 600.0
    # in-flight generate requests per server (one HTTP connection each); SGLang batches
    # hundreds of sequences per server, so a small global cap leaves servers idle
    concurrency_per_server: int = 256
    # Every data-parallel rank generates its share of a step's prompts with its own HF engine
    # (each rank holds the whole model when TP = PP = CP = 1), instead of rank 0 generating
    # all of them while the others wait. None = auto: on with engine=hf at such a layout.
    data_parallel: Optional[bool] = None
    # FP8 weights for the engine (rollout/fp8.py: quantized with nvidia-modelopt at every
    # weight sync, per tensor or in fp8_block_size blocks; the decoder's linears only): the
    # in-process engine gets them dequantized (W8A16), disk sync writes them with their
    # quantization_config, broadcast sync streams fp8 tensors + scales. Servers must start
    # from an FP8 export of the same block size (tools/quantize_fp8.py), as SGLang and vLLM
    # build their FP8 layers from the checkpoint's config. TIS is on (loss.tis_cap 2.0) unless
    # set; the gap shows as pg/rollout_logprob_gap and pg/rollout_k3.
    quantization: str = "none"  # none | fp8
    fp8_block_size: Optional[List[int]] = field(default_factory=lambda: [128, 128])

    def __post_init__(self) -> None:
        _choice("rollout.engine", self.engine, ENGINES)
        _choice("rollout.quantization", self.quantization, ["none", "fp8"])
        _check(self.fp8_block_size is None or (len(self.fp8_block_size) == 2 and all(
            int(b) >= 1 for b in self.fp8_block_size)),
            f"rollout.fp8_block_size must be two positive sizes or null (per tensor), got "
            f"{self.fp8_block_size}")
        _check(self.data_parallel is not True or self.engine == "hf",
               f"rollout.data_parallel=true needs rollout.engine=hf (engine={self.engine}: "
               "servers batch every rank's requests themselves)")
        self.server_impl = _renamed_value("rollout.server_impl", self.server_impl)
        _choice("rollout.server_impl", self.server_impl, SERVER_IMPLS)
        _choice("rollout.weight_sync", self.weight_sync, ("auto", *WEIGHT_SYNC_MODES))
        _choice("rollout.dtype", self.dtype, ["fp32", "bf16", "fp16"])
        _check(self.num_servers >= 1, f"rollout.num_servers must be >= 1, got {self.num_servers}")
        _check(self.engine != "vllm" or bool(self.server_urls),
               "rollout.engine=vllm needs rollout.server_urls (start vLLM servers first)")
        if self.engine == "hf":
            _check(self.weight_sync in ("auto", "inprocess", "disk"),
                   f"rollout.weight_sync={self.weight_sync} is not available with engine=hf")
        if self.engine == "vllm":
            _check(self.weight_sync in ("auto", "disk"),
                   f"rollout.weight_sync={self.weight_sync} is not available with engine=vllm: "
                   "use disk (HF folder + pause / reload_weights / prefix-cache reset / "
                   "resume). vLLM's NCCL weight transfer forms its group with vLLM's own "
                   "stateless group and PyNccl, which a torch process group cannot join")
        _check(self.concurrency_per_server >= 1, "rollout.concurrency_per_server must be >= 1")
        _check(self.weight_sync_keep_versions >= 1, "rollout.weight_sync_keep_versions must be >= 1")
        remote = [u for u in self.server_urls if urlparse(u).hostname not in LOOPBACK_HOSTS]
        if remote and self.resolved_weight_sync == "disk":
            _check(self.weight_sync_dir is not None,
                   f"rollout.weight_sync=disk with servers on other hosts ({remote[0]}) needs "
                   "rollout.weight_sync_dir on a filesystem they share with the trainer")

    @property
    def resolved_weight_sync(self) -> str:
        if self.weight_sync != "auto":
            return self.weight_sync
        return {"hf": "inprocess", "sglang": "distributed", "vllm": "disk"}[self.engine]


@dataclass
class CheckpointConfig:
    """Where checkpoints go and how often (torch_dist format, resharding on load)."""

    save: Optional[str] = None
    save_interval: int = 0  # 0 = only at the end
    keep_last: Optional[int] = None  # None keeps every checkpoint
    # distributed-optimizer state (saved fully reshardable, in model space) is gathered to DP
    # rank 0 over gloo in host memory; false: all-gathered over NCCL on every GPU
    distrib_optim_fully_reshardable_mem_efficient: bool = True

    def __post_init__(self) -> None:
        _check(self.save_interval >= 0, f"checkpoint.save_interval must be >= 0, got {self.save_interval}")
        _check(self.keep_last is None or self.keep_last >= 1,
               f"checkpoint.keep_last must be >= 1, got {self.keep_last}")

@dataclass
class SmokeConfig:
    """The language-model smoke job: a tiny GPT learns a synthetic sequence task.

    It exercises everything below the TRAPO trainer — parallel layout, model, optimizer,
    pipeline schedule, checkpoints, resume, metrics — on the CPU demo.
    """

    model_preset: Optional[str] = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-3))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train_iters: int = 60
    seq_length: int = 32
    micro_batch_size: int = 4
    num_microbatches: int = 4
    seed: int = 1234
    log_dir: Optional[str] = "runs/smoke"
    log_interval: int = 1

    def __post_init__(self) -> None:
        for name in ("train_iters", "seq_length", "micro_batch_size", "num_microbatches",
                     "log_interval"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(self.seq_length < self.model.max_position_embeddings,
               f"seq_length={self.seq_length} must be < model.max_position_embeddings="
               f"{self.model.max_position_embeddings}")


@dataclass
class DataConfig:
    """What the preflight does with data rows a run cannot use (megatron_trapo/train/preflight.py):
    skipped and reported, or (``strict``) the run refused."""

    strict: bool = False
    # the paper's filter: prompts of at most 1024 tokens (None: only the model's positions)
    max_prompt_tokens: Optional[int] = 1024
    # how a problem becomes a prompt (data/prompts.py; eval's prompt_template/system_prompt
    # must match): auto (the tokenizer's chat template when it has one, else the plain prompt),
    # chat, plain (no system line) or a text holding {problem}
    prompt_template: str = "auto"
    system_prompt: Optional[str] = "You are a helpful assistant."
    # the text of an expert solution a run trains on: method (each method's own: TRAPO's
    # prefixes cut from the reasoning inside <think>…</think>, LUFFY's off-policy samples and
    # SFT on the full target), reasoning, or full (algorithms/methods.py: Method.expert_text)
    expert_text: str = "method"

    def __post_init__(self) -> None:
        _choice("data.expert_text", self.expert_text, ["method", "reasoning", "full"])
        _check(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
               f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        _check(self.prompt_template in ("auto", "chat", "plain")
               or "{problem}" in self.prompt_template,
               "data.prompt_template must be 'auto', 'chat', 'plain' or a text containing "
               f"{{problem}}, got {self.prompt_template!r}")


@dataclass
class LaunchConfig:
    """How ``megatron-trapo launch`` (and the example Slurm scripts) place one job: trainer
    nodes, rollout nodes with one inference server per ``server_tp_size`` GPUs, ports.

    With two or more nodes the first ``trainer_nodes`` train and the rest serve rollouts
    (disaggregated). On one node the first ``trainer_gpus_per_node`` GPUs train and the others
    serve (the paper's 7B setting: 4 + 4 on one 8-GPU node)."""

    trainer_nodes: int = 1
    gpus_per_node: int = 8
    trainer_gpus_per_node: Optional[int] = None  # None: all of a trainer node's GPUs
    server_tp_size: int = 1  # GPUs per inference server (its --tp-size)
    server_port: int = 30000  # first server port on a node; the next servers count up
    server_mem_fraction: float = 0.85  # SGLang --mem-fraction-static
    server_context_length: Optional[int] = None  # SGLang --context-length (a 16k base model)
    master_port: int = 29500  # the trainer's torchrun rendezvous on its first node
    gpu: str = "h100-80gb"  # what `plan` estimates memory against
    model_preset: Optional[str] = None  # `plan`'s architecture when load= is not readable here
    colocate: bool = False  # trainer and engines on the same GPUs: not built (refused)
    slurm_gres: bool = True  # steps ask for the node's GPUs (--gres=gpu:N); false on CPU clusters
    srun_args: List[str] = field(default_factory=list)  # extra flags of every srun step
    container_image: Optional[str] = None  # run steps in a container (enroot/pyxis)
    container_mounts: Optional[str] = None  # pyxis --container-mounts (the shared filesystem)
    requeue: bool = True  # preempted (SIGUSR1/SIGTERM, checkpoint saved): scontrol requeue
    stop_grace_s: float = 900.0  # how long a stop request waits for the step and its save

    def __post_init__(self) -> None:
        for name in ("trainer_nodes", "gpus_per_node", "server_tp_size"):
            _check(getattr(self, name) >= 1, f"launch.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.gpus_per_node % self.server_tp_size == 0,
               f"launch.server_tp_size={self.server_tp_size} must divide "
               f"launch.gpus_per_node={self.gpus_per_node} (one server per TP group)")
        if self.trainer_gpus_per_node is not None:
            _check(1 <= self.trainer_gpus_per_node <= self.gpus_per_node,
                   f"launch.trainer_gpus_per_node={self.trainer_gpus_per_node} must be in "
                   f"1..{self.gpus_per_node}")
        _check(0 < self.server_mem_fraction < 1,
               f"launch.server_mem_fraction must be in (0, 1), got {self.server_mem_fraction}")
        _check(not self.colocate,
               "launch.colocate=true is not available: trainer and inference servers get "
               "separate GPUs (disaggregated nodes, or launch.trainer_gpus_per_node on one node)")


@dataclass
class AdvantageConfig:
    """Group-relative advantages over each prompt's G samples."""

    normalize_std: bool = False  # divide by the group's std (GRPO); the paper: mean only


@dataclass
class RewardConfig:
    """How the binary math reward reads a response (reward/math_reward.py)."""

    # whole_response (the reference: math_verify.parse of the whole response, its last
    # answer-like expression; fidelity review D10) or last_boxed (only the last balanced
    # \boxed{}/\fbox{} counts: the spec's wording, strict about format)
    extraction: str = "whole_response"

    def __post_init__(self) -> None:
        _choice("reward.extraction", self.extraction, REWARD_EXTRACTIONS)


@dataclass
class BatchingConfig:
    """How a step's sequences become micro-batches, and whether old logprobs are recomputed."""

    max_tokens_per_microbatch: int = 16384
    # On CPU, padded micro-batches are cut at this many tokens (a longer sequence still gets a
    # micro-batch of its own): activations that stay in the caches train ~20% faster than one
    # 8k-token micro-batch, in a third of the memory (benchmarks/bench_vs_trl.py: 1M and 13M
    # models). null: max_tokens_per_microbatch. The loss does not depend on the split.
    cpu_max_tokens_per_microbatch: Optional[int] = 1024
    # On CPU, the memory the node's ranks may use together (GiB); null: 90% of the memory
    # available at start. The run is refused at start if it cannot fit, and the micro-batch
    # budget above lowered if its activations would not (train/cpu_memory.py).
    cpu_memory_target_gb: Optional[float] = None
    # On CPU (glibc), tensors of at least this many KiB get their own mmap, returned to the
    # kernel when freed, instead of glibc's moving threshold and a heap that keeps every
    # phase's peak (train/memory.py: fix_mmap_threshold). null: glibc's behaviour.
    cpu_mmap_threshold_kb: Optional[int] = 128
    # Whole sequences packed into rows (varlen attention with Transformer Engine). None = auto:
    # on with TE; off on CPU, where masked dense attention over long rows costs O(row²).
    pack_sequences: Optional[bool] = None
    # log π_old of the policy-gradient ratio. None = auto: strictly on-policy (one optimizer
    # step per rollout batch, no TIS) the old logprobs *are* the current ones, so the ratio is
    # exp(lp − sg(lp)) with no extra forward pass; otherwise recomputed by a forward pass.
    # true: always recompute; false: take the engine's rollout logprobs as π_old.
    recompute_old_logprobs: Optional[bool] = None
    # optimizer steps per rollout batch: its prompts in ppo_mini_batches parts of whole groups
    # (verl's ppo_mini_batch_size = prompts_per_step / ppo_mini_batches), one update per part,
    # ppo_epochs passes over the parts. The paper's TRAPO: 1 × 1 (strictly on-policy); LUFFY's
    # script: 2 × 1. With more than one update π_old is recomputed before the first, and the
    # lr schedule (optimizer.lr_warmup_iters / lr_decay_iters, in rollout steps) is stretched
    # to the updates.
    ppo_mini_batches: int = 1
    ppo_epochs: int = 1

    @property
    def updates_per_step(self) -> int:
        return self.ppo_mini_batches * self.ppo_epochs

    def __post_init__(self) -> None:
        _check(self.ppo_mini_batches >= 1,
               f"batching.ppo_mini_batches must be >= 1, got {self.ppo_mini_batches}")
        _check(self.ppo_epochs >= 1, f"batching.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        _check(self.max_tokens_per_microbatch >= 1,
               "batching.max_tokens_per_microbatch must be >= 1")
        _check(self.cpu_max_tokens_per_microbatch is None or self.cpu_max_tokens_per_microbatch >= 1,
               "batching.cpu_max_tokens_per_microbatch must be >= 1 or null")
        _check(self.cpu_mmap_threshold_kb is None or self.cpu_mmap_threshold_kb >= 4,
               "batching.cpu_mmap_threshold_kb must be >= 4 or null")
        _check(self.cpu_memory_target_gb is None or self.cpu_memory_target_gb > 0,
               "batching.cpu_memory_target_gb must be > 0 or null")


@dataclass
class ProfilingConfig:
    """Megatron's ``--profile`` flags: profile steps ``profile_step_start + 1`` …
    ``profile_step_end`` (1-based, as in metrics.jsonl) on the ``profile_ranks``. With
    ``use_pytorch_profiler`` a torch.profiler trace (Chrome/Perfetto JSON) and an op table go
    to ``log_dir/profile/``; without it the steps are marked for ``nsys --capture-range=cudaProfilerApi``."""

    profile: bool = False
    use_pytorch_profiler: bool = True
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: List[int] = field(default_factory=lambda: [0])
    record_shapes: bool = False  # the op table then splits each op by its input shapes

    def __post_init__(self) -> None:
        _check(0 <= self.profile_step_start < self.profile_step_end,
               f"profiling.profile_step_start={self.profile_step_start} and profile_step_end="
               f"{self.profile_step_end}: need 0 <= start < end")


@dataclass
class InLoopEvalConfig:
    """Held-out accuracy measured during training (``eval.data``; the benchmark evaluation is
    ``megatron-trapo eval``)."""

    data: Optional[str] = None  # .jsonl records
    interval: int = 0  # 0 = only at the end
    # also before the first step (a fresh run): false where that number is known already or
    # means nothing (the CPU demo's base starts from random weights: 96 tokens of noise for
    # each of 1120 problems)
    at_start: bool = True
    max_problems: Optional[int] = None
    # 0.6, the reference's val_temperature (train_trapo.sh; fidelity review D13), sample j of
    # problem i seeded with seed + i·k + j; 0: greedy
    temperature: float = 0.6
    k: int = 1  # samples per problem: accuracy is avg@k (the paper's pass@1 over k samples)
    # eval/accuracy over "problems" (each counts once) or over "sources" (the mean of the
    # records' sources' accuracies: each difficulty or benchmark weighs the same however many
    # problems it has, so a larger sample of one level sharpens it without re-weighting)
    average: str = "problems"

    def __post_init__(self) -> None:
        _choice("eval.average", self.average, ["problems", "sources"])
        _check(self.interval >= 0, f"eval.interval must be >= 0, got {self.interval}")
        _check(self.k >= 1, f"eval.k must be >= 1, got {self.k}")
        _check(self.k == 1 or self.temperature > 0,
               f"eval.k={self.k} needs eval.temperature > 0 (greedy samples are all the same)")


def _sft_stage_optimizer() -> "OptimizerConfig":
    # the reference's SFT (OpenRLHF, LUFFY's README): lr 5e-5, warm-up 0.1 of the run, cosine
    # to 0.1·lr (OpenRLHF's cosine_with_min_lr), no weight decay (its --l2 default)
    return OptimizerConfig(lr=5e-5, lr_warmup_fraction=0.1, lr_decay_style="cosine",
                           min_lr=5e-6, weight_decay=0.0)


@dataclass
class SFTStageConfig:
    """The SFT stage of ``loss_mode=sft_then_rl``: its own data, batch, length and optimizer;
    the RL stage that follows takes the run's own (``optimizer``, ``prompts_per_step``,
    ``train_iters``, ``train_data``). Defaults: the reference's SFT (3 epochs, lr 5e-5,
    warm-up 0.1, batch 64, on the full targets; fidelity review D5)."""

    train_iters: Optional[int] = None  # null: ``epochs`` over the stage's kept rows
    epochs: float = 3.0
    prompts_per_step: int = 64
    optimizer: OptimizerConfig = field(default_factory=_sft_stage_optimizer)
    # the stage's data: a file of its own, or ``split`` (a share of the run's train_data,
    # seeded by ``seed``) for SFT and the complement for RL — the reference's held-out
    # complement (prepare_train_sft_rl.py); null both: SFT and RL on the same train_data
    train_data: Optional[str] = None
    split: Optional[float] = None

    def __post_init__(self) -> None:
        _check(self.train_iters is None or self.train_iters >= 1,
               f"sft_stage.train_iters must be >= 1 or null, got {self.train_iters}")
        _check(self.epochs > 0, f"sft_stage.epochs must be > 0, got {self.epochs}")
        _check(self.prompts_per_step >= 1,
               f"sft_stage.prompts_per_step must be >= 1, got {self.prompts_per_step}")
        _check(self.split is None or 0 < self.split < 1,
               f"sft_stage.split must be in (0, 1) or null, got {self.split}")
        _check(self.split is None or self.train_data is None,
               "sft_stage.split and sft_stage.train_data: give one (a split of train_data, or "
               "a file of its own)")


@dataclass
class TrainConfig:
    """A TRAPO (or baseline) run: model, layout, optimizer, loss, sampler, rollout, data.

    Defaults follow the paper (docs/algorithm.md §4) where it says something: 8 samples per prompt from
    micro-groups (4, 2, 1, 1), constant lr, rollout temperature 1.0, one optimizer step per
    rollout batch (strictly on-policy).
    """

    model_preset: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    load: Optional[str] = None  # initial Megatron checkpoint (e.g. converted from HF)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: MicroGroupConfig = field(default_factory=MicroGroupConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # megatron-trapo launch / plan
    data: DataConfig = field(default_factory=DataConfig)  # bad rows: skipped or refused
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    eval: InLoopEvalConfig = field(default_factory=InLoopEvalConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    train_data: Optional[str] = None  # .jsonl / .parquet records
    prompts_per_step: int = 128
    train_iters: int = 500
    # null: train_iters; else that many passes over the kept training rows (rounded up to
    # whole steps), which then sets train_iters
    train_epochs: Optional[float] = None
    sft_stage: SFTStageConfig = field(default_factory=SFTStageConfig)  # loss_mode=sft_then_rl
    seed: int = 1234
    log_dir: Optional[str] = "runs/train"

    def __post_init__(self) -> None:
        _check(self.prompts_per_step >= 1, "prompts_per_step must be >= 1")
        _check(self.train_iters >= 1, "train_iters must be >= 1")
        _check(self.train_epochs is None or self.train_epochs > 0,
               f"train_epochs must be > 0 or null, got {self.train_epochs}")
        _check(self.prompts_per_step % self.batching.ppo_mini_batches == 0,
               f"batching.ppo_mini_batches={self.batching.ppo_mini_batches} must divide "
               f"prompts_per_step={self.prompts_per_step} (each update takes whole prompts)")
        if self.loss.tis_cap is None and self.rollout.quantization != "none":
            # the engine samples from its FP8 weights: correct for it unless told not to
            # (slime's and NeMo-RL's TIS cap; loss.tis_cap=0 turns it off)
            self.loss.tis_cap = DEFAULT_TIS_CAP
        _check(self.rollout.temperature > 0, "rollout.temperature must be > 0 for training "
                                             "rollouts")
        _check(self.parallel.context_parallel_size == 1,
               f"parallel.context_parallel_size={self.parallel.context_parallel_size}: the "
               "trainer does not split its micro-batches per context-parallel rank yet (megatron's "
               "get_batch_on_this_cp_rank / THD cu_seqlens_*_padded), so CP>1 would train on "
               "wrong tokens; use tensor or pipeline parallelism")


GRADINGS = ("math", "choice")  # how a benchmark's responses are graded (eval/registry.py)


@dataclass
class BenchmarkSpec:
    """A user benchmark: a JSONL file and the names of its problem and answer fields."""

    name: str = ""
    path: str = ""
    problem_field: str = "problem"
    answer_field: str = "answer"
    default_k: int = 1
    # math: math-verify, then PRM800K's grader; choice: the response's final letter against
    # the answer field's (multiple choice: the problem lists the lettered options)
    grading: str = "math"

    def __post_init__(self) -> None:
        _choice("eval.extra_benchmarks[].grading", self.grading, GRADINGS)


DEFAULT_TIS_CAP = 2.0  # loss.tis_cap when rollout.quantization is on and the cap is unset


@dataclass
class SlurmConfig:
    """How ``megatron-trapo eval --slurm`` submits its job array and aggregation job."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"  # per array task
    cpus_per_task: int = 8
    gpus_per_task: int = 0  # GPUs for the task's own servers (rollout.engine=sglang, no urls)
    mem: Optional[str] = None  # e.g. "200G"
    max_concurrent: int = 32  # the %M of --array=0-N%M
    job_name: str = "trapo-eval"
    # Shell lines run first in every task (module load, source a venv, export HF_HOME=…).
    setup: List[str] = field(default_factory=list)
    extra_sbatch_args: List[str] = field(default_factory=list)  # e.g. ["--constraint=h100"]
    python: Optional[str] = None  # interpreter in the tasks; default: the submitting one
    poll_interval_s: float = 2.0  # --wait: how often squeue is asked
    # run each task's command in a container through enroot/pyxis (srun --container-image);
    # the mounts must include the output folder and the model (a shared filesystem)
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.cpus_per_task >= 1, f"slurm.cpus_per_task must be >= 1, got {self.cpus_per_task}")
        _check(self.gpus_per_task >= 0, f"slurm.gpus_per_task must be >= 0, got {self.gpus_per_task}")
        _check(self.max_concurrent >= 1,
               f"slurm.max_concurrent must be >= 1, got {self.max_concurrent}")


@dataclass
class EvalConfig:
    """Benchmark evaluation (docs/algorithm.md §5): avg@32 for AIME/AMC, pass@1 otherwise, T=0.6,
    top_p 1.0, 8192 new tokens; math-verify with a second grader when it says wrong.

    The work is split into shards (benchmark × problem range × sample range); a local run does
    them one after the other, ``--slurm`` runs one array task per shard. Sample j of problem i
    always gets the same seed, however the work is sharded."""

    model_path: Optional[str] = None  # HF folder
    load: Optional[str] = None  # or a Megatron checkpoint, converted to HF under output_dir
    load_iteration: Optional[int] = None
    tokenizer_path: Optional[str] = None  # default: model_path
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the engine (model_path is set)
    benchmarks: List[str] = field(default_factory=lambda: [
        "aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"])
    extra_benchmarks: List[BenchmarkSpec] = field(default_factory=list)
    k: Optional[int] = None  # samples per problem; None: each benchmark's default (32 AIME/AMC)
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192
    prompt_template: str = "chat"  # chat (tokenizer's template) | plain | text with {problem}
    system_prompt: Optional[str] = "You are a helpful assistant."
    limit: Optional[int] = None  # first N problems of each benchmark (smoke runs)
    seed: int = 0
    problems_per_shard: int = 64
    samples_per_shard: int = 0  # 0: all k samples of a problem in one shard
    batch_size: int = 64  # requests per engine call; also how often progress is saved
    grader_workers: int = 2
    grader_timeout_s: float = 10.0
    output_dir: str = "runs/eval"
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        _check(self.k is None or 1 <= self.k <= 4096, f"k must be in [1, 4096], got {self.k}")
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.problems_per_shard >= 1,
               f"problems_per_shard must be >= 1, got {self.problems_per_shard}")
        _check(self.samples_per_shard >= 0,
               f"samples_per_shard must be >= 0, got {self.samples_per_shard}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        _check(bool(self.benchmarks), "benchmarks must name at least one benchmark")
        _check(self.prompt_template in ("chat", "plain") or "{problem}" in self.prompt_template,
               "prompt_template must be 'chat', 'plain' or a text containing {problem}, got "
               f"{self.prompt_template!r}")
        _check(not (self.model_path and self.load),
               "give either model_path (HF folder) or load (Megatron checkpoint), not both")


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named architecture (``models/preset_table.py``), with optional field
    overrides."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown ModelConfig fields {sorted(unknown)}")
    return ModelConfig(**{**PRESETS[key], **overrides})


def _structured(cls: Type[T]):
    return OmegaConf.structured(cls)


def _with_preset(base, cls, raw):
    """Replace the ``model`` defaults by a named preset when the config asks for one."""
    name = raw.get("model_preset") if raw is not None else None
    if name is None and "model_preset" in base:
        name = base.model_preset
    if name is None or "model" not in base:
        return base
    base.model = OmegaConf.structured(model_preset(name))
    return base


def _sections_are_mappings(base, layers, yaml_path) -> None:
    """``optimizer=3`` (a value where a section belongs) named plainly; OmegaConf's own error
    for it names neither the key nor the problem."""
    for layer in layers:
        for key in layer:
            if key in base and isinstance(base[key], DictConfig) \
                    and not isinstance(layer[key], DictConfig) and layer[key] is not None:
                where = f" in {yaml_path}" if yaml_path is not None and layer is layers[0] else ""
                raise ConfigError(f"{key}{where} is a section (key: value fields, e.g. "
                                  f"{key}.{next(iter(base[key]))}=…), got {layer[key]!r}")


# Keys renamed when the TrainConfig was grouped by concern: accepted for one release, with a
# one-line message naming the new key (None: the field was removed).
RENAMED = {
    "temperature": "rollout.temperature", "top_p": "rollout.top_p",
    "normalize_adv_std": "advantage.normalize_std",
    "luffy_off_policy": "loss.luffy.off_policy",
    "luffy_on_policy_stats_only": "loss.luffy.on_policy_stats_only",
    "loss.luffy_gamma": "loss.luffy.gamma", "loss.luffy_clip_ratio": "loss.luffy.clip_ratio",
    "max_tokens_per_microbatch": "batching.max_tokens_per_microbatch",
    "pack_sequences": "batching.pack_sequences",
    "recompute_old_logprobs": "batching.recompute_old_logprobs",
    "eval_data": "eval.data", "eval_interval": "eval.interval",
    "eval_max_problems": "eval.max_problems", "eval_temperature": "eval.temperature",
    "checkpoint.async_save": None, "checkpoint.load": None,
    "sft_stage_iters": "sft_stage.train_iters",
}
_REMOVED_WHY = {"checkpoint.async_save": "saves are synchronous (atomic rename after every rank "
                                         "finished)",
                "checkpoint.load": "use load= for the initial weights, --resume to continue "
                                   "checkpoint.save"}
_warned: set = set()
# Values renamed (the in-process engine has one name, "hf"): accepted for one release, told once.
RENAMED_VALUES = {("rollout.server_impl", "embedded"): "hf"}


def _renamed_value(key: str, value: Any) -> Any:
    new = RENAMED_VALUES.get((key, value)) if isinstance(value, str) else None
    if new is None:
        return value
    if (key, value) not in _warned and os.environ.get("RANK", "0") == "0":
        _warned.add((key, value))
        print(f"megatron-trapo: {key}={value} is deprecated: use {key}={new}", file=sys.stderr)
    return new


def _renamed(key: str) -> Optional[str]:
    """The current name of a deprecated key (told once per process, on rank 0)."""
    new = RENAMED[key]
    if key not in _warned and os.environ.get("RANK", "0") == "0":
        _warned.add(key)
        if new is None:
            print(f"megatron-trapo: config key {key} was removed and is ignored: "
                  f"{_REMOVED_WHY[key]}", file=sys.stderr)
        else:
            print(f"megatron-trapo: config key {key} is deprecated: use {new}", file=sys.stderr)
    return new


def _renames_for(cls) -> Dict[str, Optional[str]]:
    if cls is TrainConfig:
        return RENAMED
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in RENAMED.items() if "." in k and k.split(".")[0] in names}


def _rename_layer(layer: DictConfig, renames: Dict[str, Optional[str]]) -> DictConfig:
    """``layer`` with deprecated keys moved to their new places."""
    if not any(_holds(layer, key) for key in renames):
        return layer
    out: Dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(node.get(last), dict) and isinstance(value, dict):
            node[last].update(value)
        else:
            node[last] = value

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key in renames:
                if renames[key] is None and v not in (None, False, ""):
                    raise ConfigError(f"{key}={v if not isinstance(v, bool) else str(v).lower()} "
                                      f"is not available: {_REMOVED_WHY[key]}")
                new = _renamed(key)
                if new is not None:
                    put(new, v)
            elif isinstance(v, dict) and any(r.startswith(key + ".") for r in renames):
                walk(v, key + ".")
            else:
                put(key, v)

    walk(OmegaConf.to_container(layer), "")
    return OmegaConf.create(out)


def _holds(layer: DictConfig, dotted: str) -> bool:
    node: Any = layer
    for part in dotted.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node[part]
    return True


def load_config(cls: Type[T], yaml_path: Optional[str | Path] = None,
                overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then a YAML file, then ``key=value`` overrides.

    Unknown keys and wrongly typed values raise :class:`ConfigError` naming the key.
    """
    base = _structured(cls)
    try:
        layers = []
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                loaded = OmegaConf.load(path)
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{path}: the top level must be a mapping of keys (a YAML "
                                  f"dict), not a {type(loaded).__name__}")
            layers.append(loaded)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        layers = [_rename_layer(layer, _renames_for(cls)) for layer in layers]
        _sections_are_mappings(base, layers, yaml_path)
        raw = OmegaConf.merge(*layers) if layers else OmegaConf.create({})
        base = _with_preset(base, cls, raw)
        for layer in layers:
            base = OmegaConf.merge(base, layer)
        return OmegaConf.to_object(base)
    except yaml.YAMLError as exc:
        where = f"{yaml_path}" if yaml_path is not None else "the overrides"
        raise ConfigError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        msg = str(exc.msg).splitlines()[0]
        raise ConfigError(f"invalid config value{f' for {key}' if key else ''}: {msg}") from None


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config dataclass (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def _escape_interpolation(value: Any) -> Any:
    """Strings holding a literal ``${`` (shell lines such as ``${SLURM_JOB_ID:-}``) are written
    as ``\\${`` so that loading the YAML again gives the same string, not an interpolation."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, list):
        return [_escape_interpolation(v) for v in value]
    if isinstance(value, dict):
        return {k: _escape_interpolation(v) for k, v in value.items()}
    return value


def save_yaml(cfg: Any, path: str | Path) -> None:
    """YAML that :func:`load_config` reads back into an equal config."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(
        _escape_interpolation(dataclasses.asdict(cfg)))))
