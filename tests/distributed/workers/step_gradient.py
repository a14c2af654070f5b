"""One full step (TRAIN_ARGS) whose gradient is kept for an independent check: the engine's HF
model before the step (its weights are the trainer's), the step's trajectories, and the
trainer's whole gradient, read from megatron's DDP buffers before the optimizer step, gathered
over TP and named as HF tensors — with several updates per step (batching.ppo_mini_batches),
each update's gradient and the weights it started from. Saved on rank 0 at
$TRAPO_TEST_OUT.pt."""
from __future__ import annotations

import copy
import os

import torch

from megatron_trapo.config import TrainConfig, load_config
from megatron_trapo.models.hf.mapping import expand, rule_for_key, to_hf
from megatron_trapo.models.sharding import gather_global
from megatron_trapo.platform import quiet_known_warnings


def main():
    quiet_known_warnings()
    from megatron_trapo.train import step as step_mod
    from megatron_trapo.train.trainer import setup

    cfg = load_config(TrainConfig, None, os.environ["TRAIN_ARGS"].split())
    run, _, _ = setup(cfg, resume=False)
    rank0 = torch.distributed.get_rank() == 0
    before = copy.deepcopy(run.engine.model).cpu() if rank0 else None
    updates = []  # per optimizer step: the weights it started from and its gradient
    optimizer_step = run.optimizer.step

    def read_then_step():  # every rank: gather_global is a collective
        updates.append({"params": gather_global(run.ddp, "param"),
                        "grads": gather_global(run.ddp, "grad")})
        return optimizer_step()

    run.optimizer.step = read_then_step
    result = step_mod.trapo_step(run, 0)
    if rank0:
        updates = [{k: hf_named(run.model, v) for k, v in u.items()} for u in updates]
        hf_grads = updates[0]["grads"]
        trajs = [{"prompt_ids": t.prompt_ids, "prefix_ids": t.prefix_ids,
                  "completion_ids": t.completion_ids, "train_prefix": t.train_prefix,
                  "reward": t.reward} for group in result.groups for t in group]
        loss = cfg.loss
        torch.save({"config": before.config.to_dict(), "state": before.state_dict(),
                    "grads": hf_grads, "updates": updates, "trajectories": trajs,
                    "metrics": result.metrics,
                    "ppo_mini_batches": cfg.batching.ppo_mini_batches,
                    "loss": {"mode": loss.loss_mode, "alpha": loss.trust_region_alpha,
                             "entropy_coef": loss.entropy_coef, "aggregation": loss.aggregation,
                             "entropy_tokens": loss.entropy_tokens,
                             "max_response_length": loss.max_response_length,
                             "sft_weight": loss.sft_weight, "rl_weight": loss.rl_weight,
                             "group_size": cfg.sampler.group_size,
                             "normalize_std": cfg.advantage.normalize_std}},
                   os.environ["TRAPO_TEST_OUT"] + ".pt")
        with open(os.environ["TRAPO_TEST_OUT"], "w") as f:
            f.write("{}")
    torch.distributed.barrier()
    run.close()


def hf_named(model, tensors):
    out = {}
    for key, t in tensors.items():
        rule, layer = rule_for_key(model, key)
        out.update(zip(expand(rule, layer)[1], to_hf(rule.kind, t, model)))
    return out


if __name__ == "__main__":
    main()
