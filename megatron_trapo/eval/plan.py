"""An evaluation's plan: the resolved config and the shards, written to (and read back from)
the output folder, which is all that a Slurm task or the aggregation job needs."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from megatron_trapo.config import ConfigError, EvalConfig, load_config, save_yaml
from megatron_trapo.eval import fingerprint, registry
from megatron_trapo.eval.shards import (Shard, plan_shards, shard_path, shards_from_json,
                                        shards_to_json, write_atomic)

# Fields that change the results: a folder evaluated with other values cannot be resumed.
RESULT_FIELDS = ("model_path", "load", "load_iteration", "tokenizer_path", "benchmarks",
                 "extra_benchmarks", "k", "temperature", "top_p", "max_new_tokens",
                 "prompt_template", "system_prompt", "limit", "seed", "problems_per_shard",
                 "samples_per_shard")


@dataclass
class Plan:
    out_dir: Path
    cfg: EvalConfig
    shards: List[Shard]
    counts: Dict[str, Tuple[int, int]]  # benchmark -> (problems, k)


def register_extra(cfg: EvalConfig) -> None:
    for spec in cfg.extra_benchmarks:
        registry.register(spec.name, spec.path, spec.problem_field, spec.answer_field,
                          spec.default_k, spec.grading)


def prepare(cfg: EvalConfig, force: bool = False) -> Plan:
    """Plan the shards and write ``eval_config.yaml`` + ``plan.json``; an existing folder is
    resumed only if it was evaluated with the same result-changing settings, weights and
    benchmark files (:mod:`megatron_trapo.eval.fingerprint`; ``force`` discards its results)."""
    out = Path(cfg.output_dir).resolve()
    # an extra benchmark is evaluated whether or not ``benchmarks`` names it (it used to be
    # registered and then silently skipped)
    names = list(cfg.benchmarks) + [s.name for s in cfg.extra_benchmarks
                                    if s.name not in cfg.benchmarks]
    cfg = dataclasses.replace(cfg, output_dir=str(out), benchmarks=names)
    register_extra(cfg)
    counts = {}
    for name in cfg.benchmarks:
        bench = registry.get(name)
        counts[name] = (len(bench.load(cfg.limit)), cfg.k or bench.default_k)
    shards = plan_shards(counts, cfg.problems_per_shard, cfg.samples_per_shard)
    saved = out / "eval_config.yaml"
    if saved.is_file():
        old = load_config(EvalConfig, saved)
        diff = [f for f in RESULT_FIELDS if getattr(old, f) != getattr(cfg, f)]
        if diff:
            raise ConfigError(f"output_dir {out} holds an evaluation with other {diff}; "
                              "choose a new output_dir (or delete that folder)")
    out.mkdir(parents=True, exist_ok=True)
    fingerprint.check(out, cfg, force, out / "hf_model")
    save_yaml(cfg, saved)
    write_atomic(out / "plan.json", json.dumps({"counts": counts,
                                                "shards": shards_to_json(shards)}, indent=1))
    return Plan(out, cfg, shards, counts)


def load_plan(out_dir: str | Path) -> Plan:
    """The plan a task or the aggregator works from."""
    out = Path(out_dir).resolve()
    if not (out / "plan.json").is_file() or not (out / "eval_config.yaml").is_file():
        raise ConfigError(f"{out} is not an evaluation folder (no plan.json / eval_config.yaml); "
                          "run `megatron-trapo eval` first")
    cfg = load_config(EvalConfig, out / "eval_config.yaml")
    register_extra(cfg)
    plan = json.loads((out / "plan.json").read_text())
    counts = {k: tuple(v) for k, v in plan["counts"].items()}
    return Plan(out, cfg, shards_from_json(plan["shards"]), counts)


def missing_shards(plan: Plan) -> List[Shard]:
    return [s for s in plan.shards if not shard_path(plan.out_dir, s).is_file()]


def hf_model_dir(plan: Plan) -> Path:
    if plan.cfg.model_path:
        return Path(plan.cfg.model_path)
    if plan.cfg.load:
        return plan.out_dir / "hf_model"
    raise ConfigError("model_path (an HF folder) or load (a Megatron checkpoint) is required")
