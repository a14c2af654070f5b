"""Load converted checkpoints at several layouts and record logits (and greedy continuations)
for the HF-parity tests. Job: a results.ParityJob as JSON at $TRAPO_TEST_JOB; results: a
results.HFParity saved at $TRAPO_TEST_OUT.pt (rank 0)."""
from __future__ import annotations

import os

import torch

from megatron_trapo.config import ParallelConfig
from megatron_trapo.train.pretrained import load_pretrained, model_config_from_checkpoint
from megatron_trapo.platform import quiet_known_warnings
from megatron_trapo.platform.distributed import initialize_distributed
from results import HFParity, ParityJob, from_json


def logits(chunks, tokens):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(chunks[0](tokens, pos, None))


def greedy(chunks, tokens, steps, vocab):
    ids = tokens.clone()
    for _ in range(steps):
        nxt = logits(chunks, ids)[:, -1, :vocab].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, tokens.shape[1]:].tolist()


def main():
    quiet_known_warnings()
    job = from_json(ParityJob, open(os.environ["TRAPO_TEST_JOB"]).read())
    results = HFParity(logits={}, greedy={})
    for item in job.checkpoints:
        tokens = torch.tensor(item.tokens)
        vocab = model_config_from_checkpoint(item.ckpt).vocab_size
        for tp in item.tp:
            par = ParallelConfig(tensor_model_parallel_size=tp)
            model = model_config_from_checkpoint(item.ckpt)
            initialize_distributed(par, model, seed=0)
            chunks, _ = load_pretrained(item.ckpt, par)
            for c in chunks:
                c.eval()
            key = f"{item.name}@tp{tp}"
            results.logits[key] = logits(chunks, tokens)[..., :vocab].clone()
            if item.greedy:
                results.greedy[key] = greedy(chunks, tokens[:1], item.greedy, vocab)
    if torch.distributed.get_rank() == 0:
        results.save(os.environ["TRAPO_TEST_OUT"] + ".pt")
        open(os.environ["TRAPO_TEST_OUT"], "w").write("{}")

if __name__ == "__main__":
    main()
