"""Weight sync on 2 gloo processes: perturb a TP=2 (then PP=2) Megatron model, sync it to the
embedded engine (in-process), to one protocol server from disk and to another by broadcast, and
record the engines' logprobs next to Megatron's own for the same tokens."""
from __future__ import annotations

import json
import os

import torch

from megatron_trapo.config import ParallelConfig
from megatron_trapo.models.pretrained import load_pretrained, model_config_from_checkpoint
from megatron_trapo.platform import quiet_known_warnings
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.rollout.types import RolloutRequest, SamplingParams
from megatron_trapo.rollout.weight_sync import WeightSync

PROMPT = [5, 6, 7, 8]


def megatron_logprobs(chunks, seq, n_completion):
    """Raw log p of the last n tokens of seq by a Megatron forward (any TP/PP layout)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from common import broadcast_from_last_stage
    from megatron_trapo.train.forward_backward import run_forward_backward

    tokens = torch.tensor([seq])
    pos = torch.arange(len(seq)).unsqueeze(0)

    def step(batch, model):
        out = model(batch["tokens"], batch["pos"], None)
        return out, lambda o: (o.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": o.detach()})

    with torch.no_grad():
        out = run_forward_backward(chunks, [{"tokens": tokens, "pos": pos}], step, len(seq), 1,
                                   forward_only=True)
    lp = None
    if ps.is_pipeline_last_stage():
        logits = gather_from_tensor_model_parallel_region(out[0]["logits"])[0].float()
        vocab = model_config_from_checkpoint(os.environ["MC_DIR"]).vocab_size
        lsm = torch.log_softmax(logits[:, :vocab], -1)
        targets = torch.tensor(seq[len(seq) - n_completion:])
        lp = lsm[len(seq) - n_completion - 1:-1].gather(-1, targets[:, None]).squeeze(-1)
    return broadcast_from_last_stage(lp)


def check(engine, chunks, version, key, r):
    """Greedy sample from the engine (rank 0), Megatron logprobs of it (all ranks)."""
    holder = [None]
    if torch.distributed.get_rank() == 0:
        s = engine.generate([RolloutRequest(PROMPT, SamplingParams(temperature=0,
                                                                   max_new_tokens=10))])[0][0]
        holder = [(s.token_ids, s.logprobs, s.weight_version, engine.weight_version)]
    torch.distributed.broadcast_object_list(holder, src=0)
    ids, lps, sample_version, engine_version = holder[0]
    ref = megatron_logprobs(chunks, PROMPT + ids, len(ids))
    r[key] = {"diff": float((torch.tensor(lps) - ref).abs().max()), "tokens": len(ids),
              "sample_version": sample_version, "engine_version": engine_version,
              "expected_version": version}


def main():
    quiet_known_warnings()
    from megatron_trapo.rollout.hf_engine import HFEngine
    from megatron_trapo.rollout.servers import ServerPool
    from megatron_trapo.rollout.sglang_engine import SGLangEngine

    mc, hf = os.environ["MC_DIR"], os.environ["HF_DIR"]
    urls = os.environ["SERVER_URLS"].split(",")
    model = model_config_from_checkpoint(mc)
    rank0 = int(os.environ["RANK"]) == 0
    r = {}
    engines = {}
    if rank0:
        engines["inprocess"] = HFEngine(hf)
        engines["disk"] = SGLangEngine(ServerPool.attach([urls[0]], use_router=False))
        engines["distributed"] = SGLangEngine(ServerPool.attach([urls[1]], use_router=False))
    for layout, par in (("tp2", ParallelConfig(tensor_model_parallel_size=2)),
                        ("pp2", ParallelConfig(pipeline_model_parallel_size=2))):
        initialize_distributed(par, model)
        chunks, _ = load_pretrained(mc, par)
        g = torch.Generator().manual_seed(7 + (layout == "pp2"))
        with torch.no_grad():
            for p in (p for c in chunks for p in c.parameters()):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        modes = ("inprocess", "disk", "distributed") if layout == "tp2" else ("inprocess",)
        for k, mode in enumerate(modes):
            version = f"{layout}-{k + 1}"
            if layout == "tp2":
                check(engines.get(mode), chunks, version, f"{layout}:{mode}:before", r)
            sync = WeightSync(engines.get(mode), model, mode, bucket_bytes=20_000,
                              disk_dir=os.environ["TRAPO_TEST_CKPT"])
            stats = sync.sync(chunks, version)
            check(engines.get(mode), chunks, version, f"{layout}:{mode}:after", r)
            r[f"{layout}:{mode}:after"]["buckets"] = stats["buckets"]
    if rank0:
        for name in ("disk", "distributed"):
            engines[name].client.close()
        with open(os.environ["TRAPO_TEST_OUT"], "w") as f:
            json.dump(r, f, indent=2)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
