"""Typed results of the multi-process suites: the worker fills one of these dataclasses, writes it
as JSON, and the test reads it back into the same type (``launch.run_worker(..., result=…)``),
so a test names fields (``suite.pipeline["pp2"].loss_diff``) instead of building dict keys, and
a field the worker forgot, or one the test does not know, fails at the read, naming it."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch


def to_json(result) -> str:
    return json.dumps(dataclasses.asdict(result), indent=2)


def from_json(cls, text: str):
    return _build(cls, json.loads(text), cls.__name__)


def _build(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        missing = sorted(f.name for f in dataclasses.fields(tp) if f.name not in value
                         and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if unknown or missing:
            raise TypeError(f"{where}: unknown fields {unknown}, missing fields {missing}")
        return tp(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin in (dict, Dict):
        _, val_tp = typing.get_args(tp)
        return {k: _build(val_tp, v, f"{where}[{k!r}]") for k, v in value.items()}
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        return [_build(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _build(args[0], value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise TypeError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


# --- parallel_suite.py: layouts, resharding checkpoints, exact resume, atomic saves -----------

@dataclass
class PipelineCase:
    """A PP layout's loss and final grads against PP=1 on the same batch."""

    grad_keys_match: bool
    loss_diff: float
    grad_max_diff: float
    tied_output_grad_diff: float


@dataclass
class ResumeCase:
    first: List[float]  # the steps before the save
    cont: List[float]  # the uninterrupted run's next steps
    resumed: List[float]  # the same steps after loading the checkpoint
    logits_diff: float
    steps: List[float]  # each parameter's Adam step count (distinct values)
    trainer_state: Dict[str, int]
    rng_restored: bool


@dataclass
class SaveGather:
    gloo: bool
    all_ranks: bool
    loading: bool


@dataclass
class ParallelSuite:
    tp1_vs_tp2_logits: float
    sp_vs_tp2_logits: float
    tp2_losses: List[float]
    tp1_init_vs_tp2_trained: float
    tp2_ckpt_at_tp1_logits: float
    tp2_ckpt_at_tp1_rng_restored: bool
    tp2_next_losses: List[float]
    tp2_ckpt_at_tp1_next_losses: List[float]
    pp_num_grads: int
    ref_grad_max_abs: float
    pipeline: Dict[str, PipelineCase]  # "pp2", "pp2_vpp2"
    pp2_ckpt_at_pp1_logits: float
    resume: Dict[str, ResumeCase]  # "plain", "distopt"
    distopt_save_gathers: List[SaveGather]
    atomic_save_raised: bool
    atomic_latest_after_crash: Optional[int]
    atomic_iter9_exists: bool
    atomic_load_iteration: int
    seconds: float


# --- loss_suite.py: the TRAPO loss invariant to every split -----------------------------------

@dataclass
class VocabParallelCheck:
    """Fused vocab-parallel logprobs/entropy (and their grads) against a full log_softmax."""

    logprob_diff: float
    entropy_diff: float
    grad_diff: float
    ref_grad_max: float
    # the fused output layer (hidden states × weight shard): log p, entropy, ∂hidden, ∂weight
    fused_diffs: List[float]
    fused_ref_grad_max: float


@dataclass
class SplitCase:
    """One layout / micro-batch split against TP=2 with one micro-batch."""

    loss_rel: float
    grad_rel: float
    grad_nan: bool


@dataclass
class AggregationCase:
    ref_loss: float
    grad_scale: float
    expert_tokens: float
    pg_tokens: float
    splits: Dict[str, SplitCase]


@dataclass
class LossSuite:
    vocab_parallel: VocabParallelCheck
    aggregations: Dict[str, AggregationCase]  # "constant", "token_mean", "seq_mean_token_mean"


# --- layouts_4proc.py: TP=2 x PP=2 continued at other layouts ---------------------------------

@dataclass
class LayoutTarget:
    logits: float  # max |Δ logits| after loading the TP=2 x PP=2 checkpoint
    next: List[float]  # the next two steps' losses
    loss_after: float


@dataclass
class Layouts4Proc:
    tp2pp2_losses: List[float]
    tp2pp2_next: List[float]
    tp2pp2_loss_after: float
    targets: Dict[str, LayoutTarget] = field(default_factory=dict)  # tp1pp1, tp1pp4, tp2pp1


# --- trapo_step.py: one full TRAPO step at TP=2 -----------------------------------------------

@dataclass
class SampledRow:
    """One trajectory as the sampler made it."""

    prompt_index: int
    level: int
    guided: bool
    train_prefix: bool
    prefix_len: int
    completion_len: int
    reward: float


@dataclass
class TrapoStep:
    metrics: Dict[str, float]  # the step's logged metrics
    expected_expert: int  # prefix tokens flagged for TrSFT, counted from the trajectories
    expected_generated: int  # generated tokens, counted from the trajectories
    param_bytes: int  # rank 0's model parameters, numel × element size
    engine_param_bytes: int  # its HF engine's, in fp32
    rows: List[SampledRow]
    engine_qkv_bytes: int = 0  # of which its q, k, v projections


# --- device_check.py: the fake-CUDA dry run ---------------------------------------------------

@dataclass
class DeviceReport:
    """Where each kind of tensor of one TRAPO step ended up (train/device_check.py's report)."""

    device: str
    microbatches: int
    packed: bool
    batch_fields: List[str]
    old_logprobs: List[str]
    metrics: List[str]
    params: List[str]
    main_grads: List[str]
    loss_metric_names: List[str]
    cu_seqlens: Optional[List[str]] = None  # packed only


@dataclass
class MegatronKnobs:
    ddp: list  # overlap_grad_reduce, overlap_param_gather, bucket_size, nan check, dist. optimizer
    host_group_backend: str
    host_group_timeout_s: float
    default_group_timeout_s: float


@dataclass
class DeviceCheck:
    cases: Dict[str, DeviceReport]  # "trapo:packed", "grpo:padded", …
    smoke_metrics: List[str]  # devices of the smoke job's loss metrics
    knobs: MegatronKnobs
    unmoved: Dict[str, str]  # the verdict without the micro-batch move, per case


# --- weight_sync.py: TP=2 / PP=2 trainers sync to engines in every mode -----------------------

@dataclass
class SyncCheck:
    """A greedy sample's engine logprobs against Megatron's for the same tokens."""

    diff: float
    tokens: int
    sample_version: str
    engine_version: str
    expected_version: str
    buckets: Optional[int] = None  # buckets of the sync just before (after-sync checks)
    rebuilds: Optional[int] = None  # weight-group rebuilds (after a server was killed)
    live: Optional[List[str]] = None  # servers left in the pool
    attempts: Optional[int] = None  # passes the sync took (2: a server died during it)


@dataclass
class WeightSyncSuite:
    checks: Dict[str, SyncCheck]  # "tp2:disk:before", "pp2:distributed:after", …
    device_p2p_calls: Dict[str, int]  # PP=2 syncs: stage 1 → 0 sends that stayed on device


# --- fp8_sync.py: FP8 weight sync to servers ------------------------------------------------

@dataclass
class Fp8SyncCheck:
    """A greedy sample after an FP8 sync against the in-process engine's (same weights,
    quantized and dequantized in the trainer) and against the unquantized Megatron model."""

    same_tokens: bool
    tokens: int
    diff_to_reference: float
    diff_to_unquantized: float
    sample_version: str
    buckets: int


@dataclass
class Fp8SyncSuite:
    checks: Dict[str, Fp8SyncCheck]  # reference (in-process), disk, distributed


# --- hf_parity.py: converted checkpoints loaded at several layouts ------------------------------

@dataclass
class ParityCheckpoint:
    """One converted checkpoint to load at each TP size in ``tp``: its logits on ``tokens``
    and, when ``greedy`` > 0, that many greedy tokens continuing the first row."""

    name: str
    ckpt: str
    tokens: List[List[int]]
    tp: List[int]
    greedy: int = 0


@dataclass
class ParityJob:
    checkpoints: List[ParityCheckpoint]


@dataclass
class HFParity:
    """Keyed ``name@tpN``: the logits (tensors: the file is torch's, not JSON) and the greedy
    continuations."""

    logits: Dict[str, torch.Tensor]
    greedy: Dict[str, List[int]]

    def save(self, path) -> None:
        torch.save(dataclasses.asdict(self), path)

    @classmethod
    def load(cls, path) -> "HFParity":
        raw = torch.load(path)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise TypeError(f"{path}: expected the fields {sorted(names)}, got "
                            f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        bad = sorted(k for k, v in raw["logits"].items() if not isinstance(v, torch.Tensor))
        if bad:
            raise TypeError(f"{path}: logits {bad} are not tensors")
        return cls(**raw)


# --- weight_group_peer.py: one member of a weight-update group ----------------------------------

@dataclass
class GroupPeer:
    """What one rank held after rank 0's broadcast; ``formed`` false with the error otherwise."""

    role: str
    rank: int
    formed: bool
    values: Optional[List[float]] = None
    error: Optional[str] = None
    source: Optional[str] = None  # the sglang role: the wheel's file the function came from


# --- sdpa_attention.py: the local spec's SDPA core attention ---------------------------------

@dataclass
class SdpaSuite:
    """Max |Δ| of logits / parameter gradients between the two core attentions and against
    each packed sequence run on its own."""

    same_weights: bool  # the two models' parameters are identical (only attention differs)
    packed_vs_local_logits: float  # SDPA on THD rows vs megatron's block-diagonal mask
    packed_vs_local_grads: float
    packed_vs_alone_logits: float  # SDPA on THD rows vs each sequence alone (unfused)
    local_packed_vs_alone_logits: float  # the same check of the unfused reference itself
    padded_vs_local_logits: float  # [b, s] rows with a causal mask, no packing
    ref_grad_max: float  # largest reference gradient (the grads compared are not ~0)
    tp2sp_packed_vs_tp1_logits: float  # TP=2 with sequence parallel, SDPA on THD rows
    leaky_vs_alone_logits: float  # one row attended as ONE sequence (what the check catches)
    takes_packed: Dict[str, bool]  # provider.takes_packed_sequences per backend
