"""HF safetensors → Megatron ``torch_dist`` checkpoint at a TP×PP layout, and back.

HF → Megatron runs ``tp × pp`` CPU worker processes (gloo), each building its own shard of the
Megatron model and filling it from the HF tensors; megatron's ``sharded_state_dict`` says which
slice of which global tensor every local parameter is (TP splits, SwiGLU halves, pipeline layer
offsets, tied output layers), so the converter never re-implements that slicing. Each worker
holds its 1/(tp·pp) of the model plus the one global tensor being mapped: the peak is about one
model copy in total. Megatron → HF loads the checkpoint (saved at any layout) into a TP=1/PP=1
model in one worker and streams the tensors into sharded safetensors.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.multiprocessing as mp

from megatron_trapo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_trapo.models.hf.files import (HFCheckpointReader, HFCheckpointWriter,
                                            copy_tokenizer_files, load_hf_config)
from megatron_trapo.models.hf.mapping import (all_tensor_names, expand, hf_to_model_config,
                                              model_to_hf_config, rule_for_key, rules_for, to_hf,
                                              to_mcore)
from megatron_trapo.models.provider import build_model, padded_vocab_size
from megatron_trapo.models.sharding import global_tensors, local_shards
from megatron_trapo.platform import quiet_known_warnings
from megatron_trapo.platform.distributed import (destroy_distributed, free_port,
                                                 initialize_distributed, validate_layout)
from megatron_trapo.train.checkpoint import save_checkpoint
from megatron_trapo.train.pretrained import load_pretrained, model_config_from_checkpoint

HF_SUBDIR = "hf"  # config.json + tokenizer files kept beside a converted checkpoint


@torch.no_grad()
def fill_from_hf(chunks, reader: HFCheckpointReader, model: ModelConfig, padded_vocab: int
                 ) -> int:
    """Copy every local parameter's slice from the HF checkpoint; returns tensors mapped.

    Parameters are first set to NaN, and any NaN left afterwards is an unmapped parameter —
    an error, never a silently random weight.
    """
    for chunk in chunks:
        for p in chunk.parameters():
            p.data.fill_(float("nan"))
    shards = local_shards(chunks)
    for key, items in shards.items():
        rule, layer = rule_for_key(model, key)
        _, hf_names = expand(rule, layer)
        full = to_mcore(rule.kind, [reader.get(n) for n in hf_names], model, padded_vocab)
        for view, slices, global_shape in items:
            if tuple(full.shape) != global_shape:
                raise ConfigError(f"{key}: HF gives shape {tuple(full.shape)}, megatron "
                                  f"expects {global_shape} (config mismatch?)")
            view.copy_(full[slices])
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if torch.isnan(p).any():
                raise ConfigError(f"parameter {name} was not filled from the HF checkpoint")
    return len(shards)


# --- workers -----------------------------------------------------------------------------------

def _init_worker(rank: int, world: int, port: int, parallel: ParallelConfig, model: ModelConfig):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    quiet_known_warnings()

    initialize_distributed(parallel, model, seed=0)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hf_to_mcore_worker(rank, world, port, hf_dir, out_dir, parallel, model, meta, result_dir):
    _init_worker(rank, world, port, parallel, model)
    chunks = build_model(model, parallel, perform_initialization=False)
    reader = HFCheckpointReader(hf_dir)
    n = fill_from_hf(chunks, reader, model, padded_vocab_size(model))
    save_checkpoint(out_dir, 0, chunks, config={"model": dataclasses.asdict(model), **meta})
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(
        {"tensors": n, "peak_rss_mib": _peak_rss_mib()}))
    destroy_distributed()


def _mcore_to_hf_worker(rank, world, port, mcore_dir, out_dir, model, base_hf, max_shard_bytes,
                        iteration, result_dir):
    parallel = ParallelConfig()
    _init_worker(rank, world, port, parallel, model)
    chunks, _ = load_pretrained(mcore_dir, parallel, iteration, model.params_dtype)
    writer = HFCheckpointWriter(out_dir, max_shard_bytes)
    written = 0
    tensors = dict(global_tensors(chunks))
    for key, hf_names, kind in all_tensor_names(model):  # HF order: layer by layer
        for name, t in zip(hf_names, to_hf(kind, tensors.pop(key), model)):
            writer.add(name, t)
            written += 1
    if tensors:
        raise ConfigError(f"megatron tensors without an HF mapping: {sorted(tensors)[:5]}")
    shards = writer.close()
    Path(out_dir, "config.json").write_text(json.dumps(model_to_hf_config(model, base_hf), indent=2))
    Path(result_dir, "rank0.json").write_text(json.dumps(
        {"tensors": written, "shards": shards, "peak_rss_mib": _peak_rss_mib()}))
    destroy_distributed()


def _spawn(fn, world: int, args: tuple) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` CPU processes (CUDA hidden: conversion
    needs no GPU and must not claim one)."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True,
                           start_method="spawn")
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _results(result_dir: Path) -> List[dict]:
    return [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank*.json"))]


# --- the two conversions --------------------------------------------------------------------------

def convert_hf_to_mcore(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1,
                        dtype: Optional[str] = None,
                        context_overrides: Optional[Dict] = None) -> Dict:
    """HF model folder → ``out_dir`` (torch_dist checkpoint + ``hf/`` config and tokenizer).
    ``context_overrides``: ``max_position_embeddings`` / ``rope_theta`` replacing the HF
    config's, to extend the context (the reference's 16k Qwen2.5-Math-7B base is the 4k model
    with 16384 positions and θ = 40000); recorded in ``hf/config.json`` too, so that exports and
    servers started from it agree."""
    t0 = time.time()
    hf_cfg = load_hf_config(hf_dir)
    unknown = set(context_overrides or {}) - {"max_position_embeddings", "rope_theta"}
    if unknown:
        raise ConfigError(f"context overrides {sorted(unknown)}: only max_position_embeddings "
                          "and rope_theta can be changed at conversion")
    hf_cfg.update(context_overrides or {})
    if "rope_theta" in (context_overrides or {}) and isinstance(hf_cfg.get("rope_parameters"), dict):
        hf_cfg["rope_parameters"]["rope_theta"] = context_overrides["rope_theta"]
    model, family = hf_to_model_config(hf_cfg, dtype)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    validate_layout(parallel, tp * pp, model)  # before any tensor is read
    padded_vocab_size(model, tp)
    reader = HFCheckpointReader(hf_dir)
    missing = [n for _, names, _ in all_tensor_names(model) for n in names if n not in reader]
    if missing:
        raise ConfigError(f"HF checkpoint lacks {len(missing)} tensors the {family.name} mapping "
                          f"needs, e.g. {missing[:3]}")
    del reader
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"hf_source": str(Path(hf_dir).resolve()), "family": family.name,
            "converted_layout": {"tp": tp, "pp": pp}}
    with tempfile.TemporaryDirectory() as result_dir:
        _spawn(_hf_to_mcore_worker, tp * pp, (str(hf_dir), str(out), parallel, model, meta,
                                              result_dir))
        results = _results(Path(result_dir))
    hf_out = out / HF_SUBDIR
    hf_out.mkdir(exist_ok=True)
    (hf_out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    copied = copy_tokenizer_files(hf_dir, hf_out)
    return {"family": family.name, "tensors": results[0]["tensors"], "seconds": time.time() - t0,
            "peak_rss_mib_per_worker": max(r["peak_rss_mib"] for r in results),
            "peak_rss_mib_sum": sum(r["peak_rss_mib"] for r in results),
            "tokenizer_files": copied, "model": dataclasses.asdict(model)}


def convert_mcore_to_hf(mcore_dir: str, out_dir: str, dtype: Optional[str] = None,
                        max_shard_bytes: int = 5 * 1024**3, iteration: Optional[int] = None) -> Dict:
    """A checkpoint of any layout → HF safetensors + config + tokenizer (vocab unpadded)."""
    t0 = time.time()
    model = model_config_from_checkpoint(mcore_dir, iteration)
    if dtype is not None:
        model = dataclasses.replace(model, params_dtype=dtype)
    rules_for(model)  # refuses unsupported architectures before loading
    if model.hf_architecture is None:
        raise ConfigError("checkpoint's model config has no hf_architecture; set it "
                          "(e.g. LlamaForCausalLM) to export to HF")
    base_dir = Path(mcore_dir) / HF_SUBDIR
    base_hf = load_hf_config(base_dir) if (base_dir / "config.json").is_file() else None
    model_to_hf_config(model, base_hf)  # validates the architecture early
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as result_dir:
        _spawn(_mcore_to_hf_worker, 1, (str(mcore_dir), str(out_dir), model, base_hf,
                                        max_shard_bytes, iteration, result_dir))
        result = _results(Path(result_dir))[0]
    copied = copy_tokenizer_files(base_dir, out_dir) if base_dir.is_dir() else []
    return {**result, "seconds": time.time() - t0, "tokenizer_files": copied}
