"""The device check: one TRAPO forward/backward where every tensor must live on the model's
device. Run on a fake CUDA device on CPU machines (``platform/fake_cuda.py``, in CI) and on a
real GPU by ``scripts/gpu_smoke.sh`` — the same code both times.

It builds a tiny Qwen2-shaped model on ``compute_device()``, TRAPO micro-batches (expert
prefixes with TrSFT, generated tokens with the policy gradient, TIS, entropy) packed or
padded, moves them with the trainer's one :func:`to_device`, runs the old-logprob pass and
Megatron's forward/backward schedule with the trainer's loss function, and then checks that
logprobs, metrics, gradients and megatron's ``main_grad`` buffers are all on the device. Any
CPU tensor that meets a device tensor on the way raises (on a fake device,
``FakeTensorDeviceMismatchError``; on CUDA, "Expected all tensors to be on the same device").
Requires an initialised world of one process (TP = PP = 1).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Callable, ContextManager, Dict, List

import torch

from megatron_trapo.algorithms.trajectory import Trajectory, assign_advantages
from megatron_trapo.config import (BatchingConfig, LossConfig, ModelConfig, ParallelConfig,
                                   TrainConfig)
from megatron_trapo.models.provider import build_model
from megatron_trapo.platform import compute_device, quiet_known_warnings
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.train.batch import build_sequences, to_device
from megatron_trapo.train.forward_backward import run_forward_backward
from megatron_trapo.train.loss_func import global_normaliser, make_forward_step
from megatron_trapo.train.optimizer import wrap_ddp
from megatron_trapo.train.step import build_microbatches, fill_old_logprobs

MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, vocab_size=300, max_position_embeddings=128,
                    add_qkv_bias=True, untie_embeddings_and_output_weights=True,
                    hf_architecture="Qwen2ForCausalLM")


def sample_trajectories() -> List[Trajectory]:
    """One TRAPO group of 8: free rollouts, guided ones with trained and context-only prefixes,
    and a full-solution sample (no generated tokens)."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 290, (n,), generator=g).tolist()  # noqa: E731
    plan = [([], 9, False, 1.0), ([], 7, False, 0.0), ([], 11, False, 0.0), ([], 5, False, 0.0),
            (ids(3), 6, False, 1.0), (ids(3), 6, True, 0.0), (ids(6), 4, True, 1.0),
            (ids(12), 0, True, 1.0)]
    trajs = []
    for prefix, n_gen, train_prefix, reward in plan:
        completion = ids(n_gen)
        trajs.append(Trajectory(prompt_index=0, prompt_ids=ids(5), prefix_ids=prefix,
                                completion_ids=completion,
                                rollout_logprobs=(-torch.rand(n_gen, generator=g)).tolist(),
                                train_prefix=train_prefix, guided=bool(prefix), reward=reward))
    assign_advantages(trajs, 8)
    return trajs


def _device_of(t: torch.Tensor) -> str:
    return t.device.type


def run_device_check(packed: bool, loss_mode: str = "trapo",
                     on_device: Callable[[], ContextManager] = contextlib.nullcontext,
                     attention_backend: str = "auto") -> Dict[str, object]:
    """Build micro-batches (CPU, real data), then inside ``on_device()`` (``fake_cuda`` on
    CPU machines, nothing on a GPU) build the model, move, forward, backward; returns where
    each kind of tensor ended up. ``attention_backend``: ``model.attention_backend`` (fake
    tensors hold no data, so they need ``local``: packed sequences in THD read their
    ``cu_seqlens`` on the host, in megatron's RoPE and in the SDPA attention)."""
    model = dataclasses.replace(MODEL, attention_backend=attention_backend)
    cfg = TrainConfig(model=model, batching=BatchingConfig(pack_sequences=packed,
                                                          max_tokens_per_microbatch=48),
                      loss=LossConfig(loss_mode=loss_mode, max_response_length=16, tis_cap=2.0,
                                      logprob_chunk_size=7))
    seqs = build_sequences(sample_trajectories(), cfg.loss)
    cpu_mbs = build_microbatches(seqs, seqs, cfg, pad_id=0)
    normaliser = global_normaliser(cpu_mbs)
    with on_device():
        return _forward_backward_on_device(cfg, cpu_mbs, normaliser, packed)


def _forward_backward_on_device(cfg: TrainConfig, cpu_mbs: List[dict], normaliser: float,
                                packed: bool) -> Dict[str, object]:
    device = compute_device()
    # megatron's NaN check reads gradient values on the host: a fake device has none
    chunks = wrap_ddp(build_model(cfg.model, ParallelConfig(), perform_initialization=False),
                      use_distributed_optimizer=False,
                      check_for_nan_in_grad=False)
    mbs = [to_device(mb) for mb in cpu_mbs]
    seq_len = max(mb["tokens"].shape[1] for mb in mbs)
    mb_size = max(mb["tokens"].shape[0] for mb in mbs)
    fill_old_logprobs(chunks, mbs, cfg.loss, seq_len, mb_size)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    out = run_forward_backward(chunks, mbs, make_forward_step(cfg.loss, normaliser), seq_len,
                               mb_size)
    params = [p for c in chunks for p in c.parameters()]
    report = {
        "device": str(device),
        "microbatches": len(mbs),
        "packed": packed,
        "batch_fields": sorted({_device_of(v) for mb in mbs for v in mb.values()
                                if isinstance(v, torch.Tensor)}),
        "old_logprobs": sorted({_device_of(mb["old_logprobs"]) for mb in mbs}),
        "metrics": sorted({_device_of(v) for o in out for v in o.values()}),
        "params": sorted({_device_of(p) for p in params}),
        "main_grads": sorted({_device_of(p.main_grad) for p in params
                              if getattr(p, "main_grad", None) is not None}),
        "loss_metric_names": sorted({k for o in out for k in o}),
    }
    if packed:
        report["cu_seqlens"] = sorted({f"{_device_of(mb['cu_seqlens'])}:{mb['cu_seqlens'].dtype}"
                                       for mb in mbs})
    return report


def main() -> int:
    """``python -m megatron_trapo.train.device_check``: the real-device twin of the CI dry run
    (``scripts/gpu_smoke.sh`` runs it on a GPU); prints one JSON line per case and fails when
    any tensor is not on the model's device."""
    quiet_known_warnings()
    initialize_distributed(ParallelConfig(), MODEL)
    want = compute_device().type
    bad = []
    for packed in (False, True):
        for mode in ("trapo", "grpo", "sft", "luffy"):
            rep = run_device_check(packed, mode)
            print(json.dumps({"case": f"{mode}:{'packed' if packed else 'padded'}", **{
                k: v for k, v in rep.items() if k != "loss_metric_names"}}), flush=True)
            fields = ("batch_fields", "old_logprobs", "metrics", "params", "main_grads")
            bad += [f"{mode}/{packed}/{f}={rep[f]}" for f in fields if rep[f] != [want]]
    print("device check:", "OK, every tensor on " + want if not bad else f"FAILED {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
