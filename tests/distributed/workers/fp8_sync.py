"""FP8 weight sync on 2 gloo processes (TP=2): the trainer's weights quantized to FP8 reach
a protocol server from disk (an FP8 export with quantization_config) and two TP-2 ones by
broadcast (fp8 bytes + scales); each then generates exactly what the in-process engine
does with the same weights quantized and dequantized, and differs from the unquantized
weights."""
from __future__ import annotations

import os

import torch

from results import Fp8SyncCheck, Fp8SyncSuite, to_json
from weight_sync import PROMPT, megatron_logprobs, perturb

from megatron_trapo.config import ParallelConfig
from megatron_trapo.platform import quiet_known_warnings
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.rollout.types import RolloutRequest, SamplingParams
from megatron_trapo.rollout.weight_sync import WeightSync
from megatron_trapo.train.pretrained import load_pretrained, model_config_from_checkpoint

BLOCK = [32, 32]  # several blocks per tensor on the tiny model (hidden 128, ffn 256)


def greedy(engine):
    s = engine.generate([RolloutRequest(PROMPT, SamplingParams(temperature=0,
                                                               max_new_tokens=10))])[0][0]
    return s.token_ids, s.logprobs, s.weight_version


def main():
    quiet_known_warnings()
    from megatron_trapo.rollout.hf_engine import HFEngine
    from megatron_trapo.rollout.servers import ServerPool
    from megatron_trapo.rollout.sglang_engine import SGLangEngine

    mc, hf = os.environ["MC_DIR"], os.environ["HF_DIR"]
    model = model_config_from_checkpoint(mc)
    rank0 = int(os.environ["RANK"]) == 0
    engines = {}
    if rank0:
        engines["reference"] = HFEngine(hf)  # in-process: fake-quantized weights
        engines["disk"] = SGLangEngine(ServerPool.attach([os.environ["DISK_URL"]],
                                                         use_router=False))
        engines["distributed"] = SGLangEngine(ServerPool.attach(
            os.environ["TP2_URLS"].split(","), use_router=False))
    initialize_distributed(ParallelConfig(tensor_model_parallel_size=2), model)
    chunks, _ = load_pretrained(mc, ParallelConfig(tensor_model_parallel_size=2))
    perturb(chunks, 7)
    out = {}
    for mode in ("reference", "disk", "distributed"):
        version = f"fp8-{mode}"
        sync = WeightSync(engines.get(mode), model, "inprocess" if mode == "reference" else mode,
                          bucket_bytes=20_000, disk_dir=os.environ["TRAPO_TEST_CKPT"],
                          quantization="fp8", fp8_block_size=BLOCK)
        stats = sync.sync(chunks, version)
        holder = [greedy(engines[mode]) if rank0 else None]
        torch.distributed.broadcast_object_list(holder, src=0)
        ids, lps, sample_version = holder[0]
        unquantized = megatron_logprobs(chunks, PROMPT + ids, len(ids))  # all ranks
        out[mode] = (ids, lps, sample_version, float((torch.tensor(lps) - unquantized).abs()
                                                     .max()), int(stats["buckets"]))
    if rank0:
        ref_ids, ref_lps = out["reference"][:2]
        checks = {mode: Fp8SyncCheck(
            same_tokens=ids == ref_ids, tokens=len(ids),
            diff_to_reference=float((torch.tensor(lps) - torch.tensor(ref_lps)).abs().max())
            if ids == ref_ids else float("inf"),
            diff_to_unquantized=gap, sample_version=version, buckets=buckets)
            for mode, (ids, lps, version, gap, buckets) in out.items()}
        with open(os.environ["TRAPO_TEST_OUT"], "w") as f:
            f.write(to_json(Fp8SyncSuite(checks)))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
