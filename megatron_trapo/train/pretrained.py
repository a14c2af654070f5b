"""Start from a checkpoint: read the model config it records and load its weights at any layout
(converted HF models and training checkpoints alike)."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from megatron_trapo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_trapo.models.provider import build_model
from megatron_trapo.train.checkpoint import (iteration_dir, latest_iteration, load_checkpoint,
                                             read_meta)


def model_config_from_checkpoint(mcore_dir: str, iteration: Optional[int] = None) -> ModelConfig:
    """The ModelConfig recorded in a megatron_trapo checkpoint's ``trapo_meta.json``."""
    it = latest_iteration(mcore_dir) if iteration is None else iteration
    if it is None:
        raise ConfigError(f"{mcore_dir}: no latest_checkpointed_iteration.txt")
    cfg = read_meta(iteration_dir(mcore_dir, it)).get("config", {})
    if "model" not in cfg:
        raise ConfigError(f"{mcore_dir}: the checkpoint records no model config")
    return ModelConfig(**cfg["model"])


def load_pretrained(mcore_dir: str, parallel: ParallelConfig, iteration: Optional[int] = None,
                    params_dtype: Optional[str] = None) -> Tuple[List[torch.nn.Module], ModelConfig]:
    """Build the recorded model at the current layout and load its weights (no optimizer).

    Requires initialised process groups for ``parallel``.
    """
    model = model_config_from_checkpoint(mcore_dir, iteration)
    if params_dtype not in (None, "auto"):
        model = dataclasses.replace(model, params_dtype=params_dtype)
    chunks = build_model(model, parallel, perform_initialization=False)
    load_checkpoint(mcore_dir, chunks, iteration=iteration, load_rng=False)
    return chunks, model
