"""One full TRAPO step on CPU (TP=2, or TP=1): record the trajectories the sampler made (rank
0) and the loss function's token counts, to check that the masks follow the sampler's
decisions."""
from __future__ import annotations

import os

import torch

from results import SampledRow, TrapoStep, to_json

from megatron_trapo.config import load_config, TrainConfig
from megatron_trapo.platform import quiet_known_warnings


def main():
    quiet_known_warnings()
    from megatron_trapo.train import step as step_mod
    from megatron_trapo.train.trainer import setup

    cfg = load_config(TrainConfig, None, os.environ["TRAIN_ARGS"].split())
    run, start, _ = setup(cfg, resume=False)
    result = step_mod.trapo_step(run, 0)
    if torch.distributed.get_rank() == 0:
        trajs = [t for group in result.groups for t in group]
        out = TrapoStep(
            metrics=result.metrics,
            expected_expert=sum(len(t.prefix_ids) for t in trajs if t.train_prefix),
            expected_generated=sum(len(t.completion_ids) for t in trajs),
            param_bytes=sum(p.numel() * p.element_size()
                            for chunk in run.ddp for p in chunk.parameters()),
            engine_param_bytes=sum(p.numel() * 4 for p in run.engine.model.parameters()),
            engine_qkv_bytes=sum(p.numel() * 4 for n, p in run.engine.model.named_parameters()
                                 if n.endswith(("q_proj.weight", "k_proj.weight",
                                                "v_proj.weight"))),
            rows=[SampledRow(prompt_index=t.prompt_index, level=t.level, guided=t.guided,
                             train_prefix=t.train_prefix, prefix_len=len(t.prefix_ids),
                             completion_len=len(t.completion_ids), reward=t.reward)
                  for t in trajs])
        with open(os.environ["TRAPO_TEST_OUT"], "w") as f:
            f.write(to_json(out))
    torch.distributed.barrier()
    run.close()


if __name__ == "__main__":
    main()
