"""Weight sync on 2 gloo processes: perturb a TP=2 (then PP=2) Megatron model, sync it to the
HF engine (in-process), to one protocol server from disk and to another by broadcast, and
record the engines' logprobs next to Megatron's own for the same tokens."""
from __future__ import annotations

import os
import sys
import time

import torch

from results import SyncCheck, WeightSyncSuite, to_json

from megatron_trapo.config import ParallelConfig
from megatron_trapo.train.pretrained import load_pretrained, model_config_from_checkpoint
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
    r.checks[key] = SyncCheck(diff=float((torch.tensor(lps) - ref).abs().max()),
                              tokens=len(ids), sample_version=sample_version,
                              engine_version=engine_version, expected_version=version)


class NoHostCopies:
    """A default group that refuses CPU tensors, as NCCL's does, for the weight path: while
    active, ``Tensor.cpu()`` raises (the old code staged every PP tensor through the host) and
    p2p sends/receives of tensors that are not on ``compute_device()`` raise."""

    def __enter__(self):
        from megatron_trapo.platform import compute_device

        self.saved = (torch.Tensor.cpu, torch.distributed.send, torch.distributed.recv)
        self.calls = 0

        original_cpu = self.saved[0]

        def no_cpu(t, *a, **k):  # torch's own object p2p stages through the host: allowed
            frame = sys._getframe(1)  # the first caller past the CPU layer's function mode
            while frame.f_globals.get("__name__", "") in ("__main__", "torch.overrides",
                                                          "megatron_trapo.platform.cpu_compat"):
                frame = frame.f_back
            if frame.f_globals.get("__name__", "").startswith("megatron_trapo"):
                raise RuntimeError("weight sync copied a tensor to the host on the device path")
            return original_cpu(t, *a, **k)

        def guard(fn):
            def p2p(tensor, *a, **k):
                if tensor.device != compute_device():
                    raise RuntimeError(f"p2p of a tensor on {tensor.device}")
                self.calls += 1
                return fn(tensor, *a, **k)
            return p2p

        torch.Tensor.cpu = no_cpu
        torch.distributed.send, torch.distributed.recv = guard(self.saved[1]), guard(self.saved[2])
        return self

    def __exit__(self, *exc):
        torch.Tensor.cpu, torch.distributed.send, torch.distributed.recv = self.saved


def kill_during_second_bucket(engine, pgid):
    """Kill the server group ``pgid`` right after the engine has asked the servers for the
    sync's second bucket: the sync rank then broadcasts to a dead member."""
    start = engine.start_distributed_update
    calls = []

    def start_then_kill(*args, **kwargs):
        futures = start(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.killpg(pgid, 9)
            time.sleep(0.5)  # gone before the broadcast starts
        return futures

    engine.start_distributed_update = start_then_kill


def perturb(chunks, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for c in chunks for p in c.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def main():
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("TRAPO_TEST_HANG_S", "420")), exit=True)  # a hang shows where, not just a timeout
    quiet_known_warnings()
    from megatron_trapo.rollout.hf_engine import HFEngine
    from megatron_trapo.rollout.servers import ServerPool
    from megatron_trapo.rollout.sglang_engine import SGLangEngine
    from megatron_trapo.rollout.vllm_engine import VLLMEngine

    mc, hf = os.environ["MC_DIR"], os.environ["HF_DIR"]
    disk_url = os.environ["DISK_URL"]
    tp2_urls = os.environ["TP2_URLS"].split(",")  # two protocol servers of TP size 2
    model = model_config_from_checkpoint(mc)
    rank0 = int(os.environ["RANK"]) == 0
    r = WeightSyncSuite(checks={}, device_p2p_calls={})
    engines, single = {}, {}
    if rank0:
        engines["inprocess"] = HFEngine(hf)
        engines["disk"] = SGLangEngine(ServerPool.attach([disk_url], use_router=False))
        # the same server through vLLM's protocol: pause, collective_rpc reload, cache reset
        engines["vllm-disk"] = VLLMEngine([disk_url], model=hf, weight_updates=True)
        engines["distributed"] = SGLangEngine(ServerPool.attach(tp2_urls, use_router=False))
        single = {u: SGLangEngine(ServerPool.attach([u], use_router=False)) for u in tp2_urls}
    syncs = {}
    for layout, par in (("tp2", ParallelConfig(tensor_model_parallel_size=2)),
                        ("pp2", ParallelConfig(pipeline_model_parallel_size=2))):
        initialize_distributed(par, model)
        chunks, _ = load_pretrained(mc, par)
        perturb(chunks, 7 + (layout == "pp2"))
        modes = ("inprocess", "disk", "vllm-disk", "distributed") if layout == "tp2" \
            else ("inprocess", "distributed")
        for k, mode in enumerate(modes):
            version = f"{layout}-{k + 1}"
            if mode == "vllm-disk":  # same server as "disk": new weights, so the sync shows
                perturb(chunks, 9)
            if layout == "tp2":
                check(engines.get(mode), chunks, version, f"{layout}:{mode}:before", r)
            sync = syncs.get(mode) or WeightSync(engines.get(mode), model, mode.split("-")[-1],
                                                 bucket_bytes=20_000,
                                                 disk_dir=os.environ["TRAPO_TEST_CKPT"])
            syncs[mode] = sync
            if layout == "pp2":
                with NoHostCopies() as guard:
                    stats = sync.sync(chunks, version)
                r.device_p2p_calls[f"{layout}:{mode}"] = guard.calls
            else:
                stats = sync.sync(chunks, version)
            check(engines.get(mode), chunks, version, f"{layout}:{mode}:after", r)
            r.checks[f"{layout}:{mode}:after"].buckets = int(stats["buckets"])
            if mode == "distributed" and layout == "tp2":
                for i, url in enumerate(tp2_urls):  # both servers (2 ranks each) got them
                    check(single.get(url), chunks, version, f"{layout}:distributed:server{i}", r)
        if layout == "tp2":
            # one of the two servers dies in the middle of a sync (its second bucket asked
            # for, not yet broadcast): the sync is done again on the survivor, in a new group
            if rank0:
                kill_during_second_bucket(engines["distributed"], int(os.environ["VICTIM_PGID"]))
            perturb(chunks, 11)
            stats = syncs["distributed"].sync(chunks, "tp2-after-kill")
            check(engines.get("distributed"), chunks, "tp2-after-kill", "tp2:after_kill", r)
            if rank0:
                r.checks["tp2:after_kill"].rebuilds = syncs["distributed"].rebuilds
                r.checks["tp2:after_kill"].live = list(engines["distributed"].pool.urls)
                r.checks["tp2:after_kill"].attempts = int(stats["attempts"])
    if rank0:
        for e in [engines["disk"], engines["distributed"], *single.values()]:
            e.client.close()
        engines["vllm-disk"].close()
        with open(os.environ["TRAPO_TEST_OUT"], "w") as f:
            f.write(to_json(r))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
