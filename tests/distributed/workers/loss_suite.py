"""Two-process suite for the TRAPO loss: the vocab-parallel logprob/entropy function against a
full-vocabulary log_softmax, and the invariance of the step's loss and gradients to how a batch
of mixed TrSFT / policy-gradient samples is split over micro-batches, DP, TP and PP ranks."""
from __future__ import annotations

import dataclasses
import os

import torch

from common import MODEL, max_diff, write_results
from results import AggregationCase, LossSuite, SplitCase, VocabParallelCheck
from megatron_trapo.algorithms.losses import aggregation_weights
from megatron_trapo.config import LossConfig, ParallelConfig
from megatron_trapo.models.provider import build_model
from megatron_trapo.models.sharding import gather_global
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.train.checkpoint import load_checkpoint, save_checkpoint
from megatron_trapo.train.forward_backward import run_forward_backward
from megatron_trapo.train.logprobs import (fused_output_logprobs_entropy,
                                           vocab_parallel_logprobs_entropy)
from megatron_trapo.train.loss_func import global_normaliser, make_forward_step, reduce_loss_metrics
from megatron_trapo.train.optimizer import wrap_ddp

B, S = 8, 16


def vocab_parallel_check() -> VocabParallelCheck:
    from megatron.core import parallel_state as ps

    initialize_distributed(ParallelConfig(tensor_model_parallel_size=2), MODEL)
    g = torch.Generator().manual_seed(0)
    T, V = 40, 64
    full = torch.randn(T, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (T,), generator=g)
    targets[:6] = torch.tensor([0, 31, 32, 63, 31, 32])  # both sides of the shard boundary
    g_lp, g_h = torch.randn(T, generator=g), torch.randn(T, generator=g)
    tp_rank = ps.get_tensor_model_parallel_rank()
    shard = full[:, tp_rank * 32:(tp_rank + 1) * 32].float().clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs_entropy(shard, targets, chunk_size=7)
    ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
    ref_in = full.clone().requires_grad_()
    lsm = torch.log_softmax(ref_in, -1)
    ref_lp = lsm.gather(-1, targets[:, None]).squeeze(-1)
    ref_h = -(lsm.exp() * lsm).sum(-1)
    ((ref_lp * g_lp.double()).sum() + (ref_h * g_h.double()).sum()).backward()
    ref_grad = ref_in.grad[:, tp_rank * 32:(tp_rank + 1) * 32]
    diffs = [max_diff(lp, ref_lp), max_diff(ent, ref_h), max_diff(shard.grad, ref_grad)]

    # the fused path: from hidden states and this rank's rows of the output weight
    H = 24
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    h_in = hidden.float().clone().requires_grad_()
    w_shard = weight[tp_rank * 32:(tp_rank + 1) * 32].float().clone().requires_grad_()
    f_lp, f_ent = fused_output_logprobs_entropy(h_in, w_shard, targets, chunk_size=7)
    ((f_lp * g_lp).sum() + (f_ent * g_h).sum()).backward()
    h_grad = h_in.grad.clone()  # partial over the vocabulary: the model's TP mapping sums it
    torch.distributed.all_reduce(h_grad)
    ref_h_in, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lsm = torch.log_softmax(ref_h_in @ ref_w.t(), -1)
    r_lp, r_ent = lsm.gather(-1, targets[:, None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)
    ((r_lp * g_lp.double()).sum() + (r_ent * g_h.double()).sum()).backward()
    diffs += [max_diff(f_lp, r_lp), max_diff(f_ent, r_ent), max_diff(h_grad, ref_h_in.grad),
              max_diff(w_shard.grad, ref_w.grad[tp_rank * 32:(tp_rank + 1) * 32])]
    diffs = torch.tensor(diffs)
    torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
    lp_diff, ent_diff, grad_diff, *fused = diffs.tolist()
    return VocabParallelCheck(logprob_diff=lp_diff, entropy_diff=ent_diff, grad_diff=grad_diff,
                              ref_grad_max=float(ref_in.grad.abs().max()),
                              fused_diffs=fused,
                              fused_ref_grad_max=min(float(ref_h_in.grad.abs().max()),
                                                     float(ref_w.grad.abs().max())))


def mixed_batch():
    """8 sequences: prompt, optional expert prefix (TrSFT on some), generated tokens, padding."""
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, MODEL.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, MODEL.vocab_size, (B, S), generator=g)
    expert = torch.zeros(B, S)
    generated = torch.zeros(B, S)
    response = torch.zeros(B, S)  # expert prefix (trained or context) + generated
    for b in range(B):
        prompt = 3 + b % 3
        prefix = [0, 3, 5, 0, 4, 6, 2, 0][b]
        pad = [0, 2, 0, 3, 1, 0, 0, 4][b]
        if b in (1, 2, 5, 6):  # flagged for TrSFT (others: prefix as context only)
            expert[b, prompt:prompt + prefix] = 1
        generated[b, prompt + prefix:S - pad] = 1
        response[b, prompt:S - pad] = 1
    if True:  # one pure-TrSFT sample (the full-solution level): no generated tokens
        generated[6] = 0
        expert[6, 4:S] = 1
        response[6] = 0
        response[6, 4:S] = 1
    adv = (torch.rand(B, 1, generator=g) - 0.5).expand(B, S).clone()
    old = -torch.rand(B, S, generator=g) * 3 - 0.1
    rollout = old + 0.3 * torch.randn(B, S, generator=g)
    ids = torch.arange(B).unsqueeze(1).expand(B, S)
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    return dict(tokens=tokens, labels=labels, position_ids=pos, expert_mask=expert,
                generated_mask=generated, advantages=adv, old_logprobs=old,
                rollout_logprobs=rollout, sample_ids=ids, response_mask=response)
    # agg and entropy weights added per mode


def with_weights(batch, cfg):
    """The step's weights as build_sequences makes them: the loss's per aggregation, the
    entropy bonus's a token mean over the response tokens (loss.entropy_tokens=response)."""
    batch = dict(batch)
    response = batch.pop("response_mask")
    w, c = aggregation_weights(batch["sample_ids"], batch["expert_mask"] + batch["generated_mask"],
                               cfg.aggregation, cfg.max_response_length)
    e = response * (c.sum() / response.sum())
    return dict(batch, agg_weight=w, agg_norm=c, entropy_weight=e)


def split(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def run_layout(name, tp, pp, sp, mbs_per_rank, root, batch_by_mode, r):
    from megatron.core import parallel_state as ps

    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         sequence_parallel=sp)
    initialize_distributed(par, MODEL)
    chunks = wrap_ddp(build_model(MODEL, par), use_distributed_optimizer=False)
    load_checkpoint(root, chunks)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows_per_rank = B // dp
    mine = list(range(dp_rank * rows_per_rank, (dp_rank + 1) * rows_per_rank))
    for agg, (cfg, batch) in batch_by_mode.items():
        per_mb = rows_per_rank // mbs_per_rank
        if "packed" in name:  # whole sequences packed into rows of up to 3 sequences
            from megatron_trapo.train.batch import FIELDS, pack_microbatches

            seqs = [{k: batch[k][row] for k in FIELDS} for row in mine]
            if sp:  # rows a multiple of TP (SP scatters the sequence); 5·TP forces a pad tail
                mbs = pack_microbatches(seqs, 3 * S + 8, multiple=5 * tp)
                assert all(mb["tokens"].shape[1] % tp == 0 and int(mb["cu_seqlens"][-1]) ==
                           mb["tokens"].shape[1] > int((mb["segment_ids"] >= 0).sum())
                           for mb in mbs)
            else:  # pipelines: every row padded to the widest row (one p2p shape)
                mbs = pack_microbatches(seqs, 3 * S + 8, fixed_width=pp > 1)
                if pp > 1:
                    assert len({mb["tokens"].shape[1] for mb in mbs}) == 1 < len(mbs)
                    assert mbs[0]["tokens"].shape[1] < 3 * S + 8
            per_mb = 1
        else:
            mbs = [split(batch, mine[i * per_mb:(i + 1) * per_mb]) for i in range(mbs_per_rank)]
        for c in chunks:
            c.zero_grad_buffer()
        norm = global_normaliser(mbs)
        out = run_forward_backward(chunks, mbs, make_forward_step(cfg, norm),
                                   max(mb["tokens"].shape[1] for mb in mbs), per_mb)
        metrics = reduce_loss_metrics(out)
        grads = gather_global(chunks, "grad")
        r[f"{agg}:{name}"] = {"loss": metrics["loss"], "grads": grads,
                              "expert_tokens": metrics["expert/tokens"],
                              "pg_tokens": metrics["pg/tokens"]}


def main():
    r = {}
    vp = vocab_parallel_check()
    root = os.environ["TRAPO_TEST_CKPT"] + "/init"
    par = ParallelConfig(tensor_model_parallel_size=2)
    initialize_distributed(par, MODEL, seed=1)
    torch.manual_seed(3)
    save_checkpoint(root, 0, build_model(MODEL, par))
    base = mixed_batch()
    batch_by_mode = {}
    for agg in ("constant", "token_mean", "seq_mean_token_mean"):
        cfg = LossConfig(loss_mode="trapo", aggregation=agg, max_response_length=S,
                         clip_ratio_low=0.2, clip_ratio_high=0.28, tis_cap=2.0,
                         entropy_coef=0.01, logprob_chunk_size=5)
        batch_by_mode[agg] = (cfg, with_weights(base, cfg))
    layouts = [("tp2_mb1", 2, 1, False, 1), ("tp2_mb4", 2, 1, False, 4),
               ("tp2sp_mb2", 2, 1, True, 2), ("dp2_mb1", 1, 1, False, 1),
               ("dp2_mb2", 1, 1, False, 2), ("pp2_mb4", 1, 2, False, 4),
               ("tp2_packed", 2, 1, False, 1), ("dp2_packed", 1, 1, False, 1),
               ("tp2sp_packed", 2, 1, True, 1), ("pp2_packed", 1, 2, False, 1)]
    for name, tp, pp, sp, mbs in layouts:
        # the reference runs megatron's own output layer, every other layout the fused one
        fused = name != "tp2_mb1"
        by_mode = {agg: (dataclasses.replace(cfg, fused_output_layer=fused), batch)
                   for agg, (cfg, batch) in batch_by_mode.items()}
        run_layout(name, tp, pp, sp, mbs, root, by_mode, r)
    aggregations = {}
    for agg in batch_by_mode:
        ref = r[f"{agg}:tp2_mb1"]
        scale = max(float(g.abs().max()) for g in ref["grads"].values())
        splits = {}
        for name, *_ in layouts[1:]:
            got = r[f"{agg}:{name}"]
            splits[name] = SplitCase(
                loss_rel=abs(got["loss"] - ref["loss"]) / abs(ref["loss"]),
                grad_rel=max(max_diff(got["grads"][k], ref["grads"][k])
                             for k in ref["grads"]) / scale,
                grad_nan=any(torch.isnan(g).any().item() for g in got["grads"].values()))
        aggregations[agg] = AggregationCase(ref_loss=ref["loss"], grad_scale=scale,
                                            expert_tokens=ref["expert_tokens"],
                                            pg_tokens=ref["pg_tokens"], splits=splits)
    write_results(LossSuite(vocab_parallel=vp, aggregations=aggregations))


if __name__ == "__main__":  # the checkpoint writer re-imports __main__
    main()
