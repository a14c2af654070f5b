"""Fused vocab-parallel logprobs + entropy versus the naive all-gather + log_softmax path:
time and peak extra memory of forward + backward, on CPU under torchrun:

    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_logprob.py \
        --tokens 4096 --vocab 32768

"Extra memory" is the peak of allocations made by the function (its outputs, buffers and the
gradient of the logits), measured with a torch allocator hook on CPU, in units of one
[T, V/TP] fp32 buffer.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


class PeakMemory:
    """Peak bytes allocated on the CPU between enter and exit, via torch's profiler hooks."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        events = sorted(self._prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            if event.name() == "[memory]":
                live += event.nbytes()
                peak = max(peak, live)
        self.peak = peak


def naive(logits, targets, group):
    world = dist.get_world_size(group)
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    rank = dist.get_rank(group)
    parts[rank] = logits  # keep the autograd path through this rank's shard
    full = torch.cat(parts, dim=-1)
    lsm = torch.log_softmax(full, dim=-1)
    lp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent


def measure(fn, logits, targets, repeats):
    times, peak = [], 0
    for i in range(repeats):
        x = logits.clone().requires_grad_()
        dist.barrier()
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            lp, ent = fn(x, targets)
            (lp.sum() + 0.01 * ent.sum()).backward()
        times.append(time.perf_counter() - t0)
        peak = max(peak, mem.peak)
    return statistics.median(times), peak, lp.detach(), x.grad


def main():
    from megatron_trapo.platform import quiet_known_warnings

    quiet_known_warnings()
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from megatron_trapo.train.logprobs import vocab_parallel_logprobs_entropy

    dist.init_process_group("gloo")
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    local_v = args.vocab // world
    g = torch.Generator().manual_seed(rank)
    logits = torch.randn(args.tokens, local_v, generator=g)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(9))
    fused = lambda x, t: vocab_parallel_logprobs_entropy(x, t, args.chunk, group=group)
    naive_fn = lambda x, t: naive(x, t, group)
    t_f, m_f, lp_f, g_f = measure(fused, logits, targets, args.repeats)
    t_n, m_n, lp_n, g_n = measure(naive_fn, logits, targets, args.repeats)
    unit = args.tokens * local_v * 4
    if rank == 0:
        print(f"T={args.tokens} V={args.vocab} TP={world} chunk={args.chunk} "
              f"(one [T, V/TP] fp32 buffer = {unit / 2**20:.0f} MiB)")
        print(f"fused: {t_f * 1000:8.1f} ms  peak extra {m_f / 2**20:7.0f} MiB = {m_f / unit:.2f}x")
        print(f"naive: {t_n * 1000:8.1f} ms  peak extra {m_n / 2**20:7.0f} MiB = {m_n / unit:.2f}x")
        print(f"fused/naive: time {t_f / t_n:.2f}x, memory {m_f / m_n:.2f}x; "
              f"max |logprob diff| {float((lp_f - lp_n).abs().max()):.2e}, "
              f"max |grad diff| {float((g_f - g_n).abs().max()):.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
