"""``megatron-trapo plan``: the whole job resolved without a GPU — placement, parallel ranks,
micro-batching, per-GPU memory of every pipeline stage and of the inference servers, the
weight-sync volume — and whether it fits (:mod:`megatron_trapo.launch.memory`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional

from megatron_trapo.config import ConfigError, ModelConfig, TrainConfig, runtime_model
from megatron_trapo.launch import memory as M
from megatron_trapo.launch.placement import place
from megatron_trapo.models.presets import num_parameters, preset
from megatron_trapo.platform.distributed import validate_layout


def resolve_model(cfg: TrainConfig) -> tuple[ModelConfig, str]:
    """The architecture: the checkpoint's when ``load=`` is readable here, else the preset
    ``launch.model_preset`` names, else the config's own model fields."""
    if cfg.load and (Path(cfg.load) / "latest_checkpointed_iteration.txt").is_file():
        # lazy: megatron-core takes ~3 s to import; plan and layout read a checkpoint only when
        # load= is readable here
        from megatron_trapo.train.pretrained import model_config_from_checkpoint

        return runtime_model(model_config_from_checkpoint(cfg.load), cfg.model), cfg.load
    if cfg.launch.model_preset:
        base = preset(cfg.launch.model_preset)
        runtime = {f: getattr(cfg.model, f) for f in (
            "params_dtype", "recompute_granularity", "recompute_method", "recompute_num_layers")}
        return dataclasses.replace(base, **runtime), f"preset {cfg.launch.model_preset}"
    if cfg.load:
        raise ConfigError(f"load={cfg.load} is not readable here and launch.model_preset is not "
                          "set: plan needs the architecture (e.g. launch.model_preset=qwen2.5-32b)")
    return cfg.model, "config"


def build_plan(cfg: TrainConfig, nodes: Optional[int] = None, prompt_tokens: int = 1024,
               hosts: Optional[List[str]] = None) -> Dict:
    """The plan for ``nodes`` nodes (named node0…), or for the real ``hosts`` of a job."""
    launch = cfg.launch
    model, source = resolve_model(cfg)
    if model.params_dtype == "auto":
        model = dataclasses.replace(model, params_dtype=cfg.rollout.dtype
                                    if cfg.rollout.dtype != "fp32" else "fp32")
    if launch.gpu not in M.GPU_MIB:
        raise ConfigError(f"launch.gpu={launch.gpu!r} is not one of {sorted(M.GPU_MIB)}")
    capacity = M.GPU_MIB[launch.gpu] / 1024
    if not nodes:  # a one-node split when the config asks for one, else one rollout node
        split = launch.trainer_gpus_per_node not in (None, launch.gpus_per_node)
        nodes = 1 if split and launch.trainer_nodes == 1 else launch.trainer_nodes + 1
    hosts = hosts or [f"node{i}" for i in range(nodes)]
    placement = place(hosts, launch)
    world = placement.trainer.world_size
    lay = validate_layout(cfg.parallel, world, model)
    seq = prompt_tokens + cfg.loss.max_response_length
    group = cfg.sampler.group_size
    step_tokens = cfg.prompts_per_step * group * seq  # upper bound: every sample at full length
    per_rank = -(-step_tokens // lay.dp)
    microbatches = -(-per_rank // cfg.batching.max_tokens_per_microbatch)
    stages = M.plan_trainer(model, cfg, lay.dp)
    total = num_parameters(model)
    server = M.plan_server(model, total, launch.server_tp_size, capacity,
                           launch.server_mem_fraction, seq) if placement.servers else None
    problems = M.verdict(stages, server, capacity, seq, cfg, lay.dp)
    usable = capacity - M.RESERVED_GIB
    worst = max(st.memory_gib["total"] for st in stages)
    return {
        "fits": not problems,
        "headroom_ok": not problems and worst <= usable - M.HEADROOM * capacity,
        "problems": problems,
        "model": {"source": source, "params_billion": round(total / 1e9, 3),
                  "num_layers": model.num_layers, "hidden_size": model.hidden_size,
                  "dtype": model.dtype, "recompute": model.recompute_granularity},
        "gpu": {"name": launch.gpu, "capacity_gib": round(capacity, 2),
                "reserved_gib": M.RESERVED_GIB},
        "layout": {"world_size": world, "tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "dp": lay.dp,
                   "sequence_parallel": lay.sequence_parallel,
                   "trainer_nodes": len(placement.trainer.hosts),
                   "gpus_per_trainer_node": len(placement.trainer.gpus)},
        "microbatching": {"sequence_tokens": seq, "step_tokens_max": step_tokens,
                          "tokens_per_dp_rank_max": per_rank,
                          "max_tokens_per_microbatch": cfg.batching.max_tokens_per_microbatch,
                          "microbatches_per_step_max": microbatches},
        "stages": [{"pp_rank": s.pp_rank, "layers": s.layers,
                    "params_million": round(s.params / 1e6, 2),
                    "microbatches_in_flight": s.microbatches_in_flight,
                    "memory_gib": {k: round(v, 2) for k, v in s.memory_gib.items()}}
                   for s in stages],
        "servers": None if server is None else {
            "count": len(placement.servers), "tp": server.tp,
            "hosts": placement.server_hosts,
            "weights_gib": round(server.weights_gib, 2),
            "kv_cache_gib": round(server.kv_cache_gib, 2),
            "kv_bytes_per_token": server.kv_bytes_per_token,
            "kv_tokens": server.max_tokens,
            "concurrent_full_length_sequences": server.concurrent_sequences},
        "weight_sync_gib_per_step": round(total * 2 / M.GIB, 2),
        "placement": placement.to_dict(),
    }


def render(plan: Dict) -> str:
    lay, mb, g = plan["layout"], plan["microbatching"], plan["gpu"]
    m = plan["model"]
    lines = [f"model: {m['params_billion']} B params ({m['source']}), {m['num_layers']} layers, "
             f"{m['dtype']}, recompute {m['recompute']}",
             f"layout: world {lay['world_size']} = tp {lay['tp']} × pp {lay['pp']} × cp "
             f"{lay['cp']} × dp {lay['dp']} (sp {lay['sequence_parallel']}) on "
             f"{lay['trainer_nodes']} trainer node(s) × {lay['gpus_per_trainer_node']} GPUs",
             f"micro-batching: ≤ {mb['step_tokens_max']} tokens a step, ≤ "
             f"{mb['tokens_per_dp_rank_max']} per DP rank, ≤ {mb['microbatches_per_step_max']} "
             f"micro-batches of {mb['max_tokens_per_microbatch']} tokens",
             f"per-GPU memory on {g['name']} ({g['capacity_gib']} GiB, {g['reserved_gib']} "
             "reserved), GiB:",
             "  stage  weights  grads  optimizer  activations  logits  total  (in flight)"]
    for s in plan["stages"]:
        mg = s["memory_gib"]
        lines.append(f"  {s['pp_rank']:>5}  {mg['weights']:>7.2f}  {mg['grads']:>5.2f}  "
                     f"{mg['optimizer']:>9.2f}  {mg['activations']:>11.2f}  {mg['logits']:>6.2f}"
                     f"  {mg['total']:>5.2f}  ({s['microbatches_in_flight']})")
    sv = plan["servers"]
    if sv:
        lines.append(f"servers: {sv['count']} × TP {sv['tp']} on {', '.join(sv['hosts'])}: "
                     f"weights {sv['weights_gib']} GiB, KV cache {sv['kv_cache_gib']} GiB "
                     f"= {sv['kv_tokens']} tokens ≈ {sv['concurrent_full_length_sequences']} "
                     "full-length sequences per server")
    lines.append(f"weight sync: {plan['weight_sync_gib_per_step']} GiB per step")
    if plan["fits"]:
        lines.append("fits" + (" with headroom" if plan["headroom_ok"] else
                               f" (less than {int(M.HEADROOM * 100)} % headroom)"))
    else:
        lines += ["does not fit:"] + [f"  - {p}" for p in plan["problems"]]
    return "\n".join(lines)
