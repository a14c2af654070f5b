"""One optimizer step with zero gradients from OptimizerConfig's defaults (and with megatron's
own exemption): AdamW's update is then the decay alone, p ← p·(1 − lr·wd), on every
parameter it decays. Writes, per parameter name, the step's p / p₀ − 1 (median over the tensor's
nonzero entries)."""
from __future__ import annotations

import json
import os

import torch

from common import MODEL

from megatron_trapo.config import OptimizerConfig, ParallelConfig
from megatron_trapo.models.provider import build_model
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.train.optimizer import build_training_state

LR = 0.1


def decay_step(**optimizer) -> dict:
    torch.manual_seed(0)
    chunks = build_model(MODEL, ParallelConfig())
    ddp, opt, _ = build_training_state(chunks, OptimizerConfig(lr=LR, **optimizer), 10)
    before = {n: p.detach().clone() for n, p in ddp[0].named_parameters()}
    for chunk in ddp:
        chunk.zero_grad_buffer()  # every main_grad 0: Adam's m and v stay 0, its update 0
    opt.step()
    out = {}
    for n, p in ddp[0].named_parameters():
        nonzero = before[n] != 0
        out[n] = float((p.detach()[nonzero] / before[n][nonzero] - 1).median())
    return out


def main():
    initialize_distributed(ParallelConfig(), MODEL, seed=1)
    result = {"lr": LR, "default_wd": OptimizerConfig().weight_decay,
              "defaults": decay_step(),
              "megatron_exemption": decay_step(weight_decay_norms_and_biases=False)}
    with open(os.environ["TRAPO_TEST_OUT"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
