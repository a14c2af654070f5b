"""Two processes: the local spec's SDPA core attention (models/sdpa_attention.py) against
megatron's unfused DotProductAttention, and packed rows against each sequence run alone.
tests/distributed/test_sdpa_attention.py asserts on what this writes."""
from __future__ import annotations

import dataclasses

import torch

from common import MODEL, max_diff, write_results
from results import SdpaSuite
from megatron_trapo.config import ParallelConfig
from megatron_trapo.models.provider import build_model, takes_packed_sequences
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.train.batch import model_forward

LENGTHS, PAD = (7, 12, 5), 4  # three sequences and a padding tail in one 28-token row


def build(backend: str, tp: int = 1, sp: bool = False):
    model = dataclasses.replace(MODEL, attention_backend=backend)
    par = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
    initialize_distributed(par, model, seed=1)
    torch.manual_seed(3)
    return build_model(model, par)[0]


def packed_row():
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(1, MODEL.vocab_size, (n,), generator=g) for n in LENGTHS]
    tokens = torch.cat(seqs + [torch.zeros(PAD, dtype=torch.long)])[None]
    bounds = [0]
    for n in LENGTHS + (PAD,):
        bounds.append(bounds[-1] + n)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)]
                    + [torch.full((PAD,), -1)])[None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS + (PAD,)])[None]
    batch = {"tokens": tokens, "position_ids": pos, "segment_ids": seg,
             "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
             "max_seqlen": max(LENGTHS + (PAD,))}
    return seqs, batch, sum(LENGTHS)


def full_vocab(logits):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def packed_logits_and_grads(model, batch, real):
    model.zero_grad()
    logits = full_vocab(model_forward(model, batch))[0, :real]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    (logits * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), grads


def alone(model, seqs):
    with torch.no_grad():
        return torch.cat([full_vocab(model(s[None], torch.arange(len(s))[None], None))[0]
                          for s in seqs])


def main():
    seqs, batch, real = packed_row()
    r = {"takes_packed": {}}
    local = build("local")
    ref_logits, ref_grads = packed_logits_and_grads(local, batch, real)
    r["local_packed_vs_alone_logits"] = max_diff(ref_logits, alone(local, seqs))
    r["takes_packed"]["local"] = takes_packed_sequences(local)
    local_params = {n: p.detach().clone() for n, p in local.named_parameters()}
    padded = torch.stack([s[:5] for s in seqs])  # [3, 5], causal, no packing
    with torch.no_grad():
        padded_ref = local(padded, torch.arange(5).expand(3, 5), None)

    sdpa = build("auto")
    r["takes_packed"]["auto"] = takes_packed_sequences(sdpa)
    r["same_weights"] = all(torch.equal(p, local_params[n]) for n, p in sdpa.named_parameters())
    logits, grads = packed_logits_and_grads(sdpa, batch, real)
    r["packed_vs_local_logits"] = max_diff(logits, ref_logits)
    r["packed_vs_local_grads"] = max(max_diff(grads[n], ref_grads[n]) for n in ref_grads)
    r["ref_grad_max"] = max(float(g.abs().max()) for g in ref_grads.values())
    r["packed_vs_alone_logits"] = max_diff(logits, alone(sdpa, seqs))
    with torch.no_grad():
        r["padded_vs_local_logits"] = max_diff(
            sdpa(padded, torch.arange(5).expand(3, 5), None), padded_ref)
        leaky = dict(batch, cu_seqlens=torch.tensor([0, 28], dtype=torch.int32), max_seqlen=28)
        r["leaky_vs_alone_logits"] = max_diff(full_vocab(model_forward(sdpa, leaky))[0, :real],
                                              alone(sdpa, seqs))

    tp2 = build("auto", tp=2, sp=True)
    with torch.no_grad():
        r["tp2sp_packed_vs_tp1_logits"] = max_diff(
            full_vocab(model_forward(tp2, batch))[0, :real], logits)
    write_results(SdpaSuite(**r))


if __name__ == "__main__":
    main()
