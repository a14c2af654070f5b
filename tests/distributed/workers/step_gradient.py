"""One full step (TRAIN_ARGS) whose gradient is kept for an independent check: the engine's HF
model before the step (its weights are the trainer's), the step's trajectories, and the
trainer's whole gradient, read from megatron's DDP buffers before the optimizer step, gathered
over TP and named as HF tensors. Saved on rank 0 at $TRAPO_TEST_OUT.pt."""
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
    grads = {}
    optimizer_step = run.optimizer.step

    def read_then_step():  # every rank: gather_global is a collective
        grads.update(gather_global(run.ddp, "grad"))
        return optimizer_step()

    run.optimizer.step = read_then_step
    result = step_mod.trapo_step(run, 0)
    if rank0:
        hf_grads = {}
        for key, grad in grads.items():
            rule, layer = rule_for_key(run.model, key)
            hf_grads.update(zip(expand(rule, layer)[1], to_hf(rule.kind, grad, run.model)))
        trajs = [{"prompt_ids": t.prompt_ids, "prefix_ids": t.prefix_ids,
                  "completion_ids": t.completion_ids, "train_prefix": t.train_prefix,
                  "reward": t.reward} for group in result.groups for t in group]
        loss = cfg.loss
        torch.save({"config": before.config.to_dict(), "state": before.state_dict(),
                    "grads": hf_grads, "trajectories": trajs, "metrics": result.metrics,
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


if __name__ == "__main__":
    main()
