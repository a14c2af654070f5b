"""``megatron-trapo eval``, step by step: plan the shards → (convert a Megatron checkpoint to
HF) → generate and grade each shard → summarise. A local run does the shards in one process;
under Slurm each array task runs :func:`run_one_shard` and the aggregation job
:func:`megatron_trapo.eval.summary.aggregate`.

Everything a task needs is in the output folder: ``eval_config.yaml`` (the resolved config)
and ``plan.json`` (the shards), so tasks take only the folder and their array index."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_trapo.config import ConfigError, EvalConfig
from megatron_trapo.data.prompts import prompt_ids as render_prompt_ids
from megatron_trapo.data.tokenizer import stop_token_ids
from megatron_trapo.eval import fingerprint, registry
from megatron_trapo.eval.plan import Plan, hf_model_dir, load_plan, missing_shards, prepare
from megatron_trapo.eval.shards import (Shard, append_jsonl, partial_path, read_jsonl, sample_seed,
                                        shard_path, write_atomic, write_shard)
from megatron_trapo.eval.summary import aggregate
from megatron_trapo.reward.choice import grade_choices
from megatron_trapo.reward.grading import Grader
from megatron_trapo.rollout import make_engine
from megatron_trapo.rollout.types import RolloutRequest, SamplingParams

logger = logging.getLogger(__name__)

# --- the model ------------------------------------------------------------------------------

def ensure_hf_model(plan: Plan) -> Path:
    """The HF folder to serve; a Megatron checkpoint (``load``) is converted once, into
    ``output_dir/hf_model`` (built aside, then renamed: a killed conversion leaves nothing)."""
    path = hf_model_dir(plan)
    if (path / "config.json").is_file():
        return path
    if not plan.cfg.load:
        raise ConfigError(f"model_path {path}: no config.json (an HF model folder is needed)")
    # lazy: megatron-core takes ~3 s to import; only a load= evaluation converts
    from megatron_trapo.conversion import convert_mcore_to_hf

    tmp = path.with_name(path.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    it = plan.cfg.load_iteration
    recorded = plan.out_dir / "fingerprint.json"
    if it is None and recorded.is_file():  # the iteration `latest` meant when this was planned
        it = json.loads(recorded.read_text()).get("model", {}).get("iteration")
    stats = convert_mcore_to_hf(plan.cfg.load, str(tmp), iteration=it)
    os.replace(tmp, path)
    logger.info("converted %s to %s in %.1f s", plan.cfg.load, path, stats["seconds"])
    return path


def tokenizer_dir(plan: Plan, model_dir: Path) -> str:
    return plan.cfg.tokenizer_path or str(model_dir)


def open_engine(plan: Plan, model_dir: Path):
    return make_engine(dataclasses.replace(plan.cfg.rollout, model_path=str(model_dir),
                                           tokenizer_path=tokenizer_dir(plan, model_dir)))


def load_tokenizer(plan: Plan, model_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir(plan, model_dir))


def prompt_ids(cfg: EvalConfig, tokenizer, problem: str) -> List[int]:
    """The prompt's token ids under ``prompt_template`` (the rendering training uses too)."""
    return render_prompt_ids(tokenizer, problem, cfg.prompt_template, cfg.system_prompt)


# --- one shard --------------------------------------------------------------------------------

def _requests(cfg: EvalConfig, shard: Shard, problems, prompts, done, stop_ids):
    """(problem, first sample, request) for every contiguous run of samples not yet done."""
    out = []
    for prob in problems:
        todo = [s for s in range(shard.sample_start, shard.sample_end)
                if (prob.index, s) not in done]
        runs: List[List[int]] = []
        for s in todo:
            if runs and runs[-1][-1] == s - 1:
                runs[-1].append(s)
            else:
                runs.append([s])
        for run in runs:
            params = SamplingParams(n=len(run), temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_new_tokens=cfg.max_new_tokens, stop_token_ids=stop_ids,
                                    seed=sample_seed(cfg.seed, shard.benchmark, prob.index) + run[0])
            out.append((prob, run[0], RolloutRequest(prompts[prob.index], params)))
    return out


def model_context(model_dir: Path) -> Optional[int]:
    """The positions the served model has (``max_position_embeddings`` of its config.json)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("max_position_embeddings")
    return int(value) if value else None


def too_long_rows(shard: Shard, reqs, context: int) -> List[dict]:
    """Samples of problems whose prompt leaves no room to generate in the model's context:
    recorded with their own verdict (wrong, grader ``prompt_too_long``) instead of failing the
    whole shard."""
    rows = []
    for prob, first, req in reqs:
        for j in range(req.sampling.n):
            rows.append({"benchmark": shard.benchmark, "problem_id": prob.index,
                         "sample_index": first + j, "seed": req.sampling.seed + j,
                         "answer": prob.answer, "finish_reason": "prompt_too_long",
                         "num_tokens": 0, "text": "", "extracted": None, "correct": False,
                         "grader": "prompt_too_long", "prompt_tokens": len(req.prompt_ids),
                         "context": context})
    return rows


def run_shard(plan: Plan, shard: Shard, engine, tokenizer, grader, progress=None,
              context: Optional[int] = None) -> Path:
    """Generate and grade the samples of one shard that are not yet written, saving each
    batch to the shard's partial file; then write the shard atomically. ``context``: the
    model's positions; a prompt that does not fit gets ``prompt_too_long`` samples."""
    cfg, out = plan.cfg, plan.out_dir
    final = shard_path(out, shard)
    if final.is_file():
        return final
    part = partial_path(out, shard)
    part.parent.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(part) if part.is_file() else []
    owned = set(shard.keys())
    done = {(r["problem_id"], r["sample_index"]): r for r in rows
            if (r.get("problem_id"), r.get("sample_index")) in owned}
    if len(done) < len(rows):
        logger.warning("%s: ignored %d rows that are not this shard's", part, len(rows) - len(done))
    if part.is_file():  # drop a line cut off by a crash (or foreign rows) before appending
        write_atomic(part, "".join(json.dumps(r) + "\n" for r in done.values()))
    if progress is not None:
        progress.update(len(done))
    bench = registry.get(shard.benchmark)
    problems = bench.load(cfg.limit)[shard.problem_start:shard.problem_end]
    prompts = {p.index: prompt_ids(cfg, tokenizer, p.problem) for p in problems}
    reqs = _requests(cfg, shard, problems, prompts, done, stop_token_ids(tokenizer))
    if context is not None:
        long = [r for r in reqs if len(r[2].prompt_ids) >= context]
        if long:
            logger.warning("%s: %d problem(s) with prompts of %s tokens do not fit the model's "
                           "context of %d: recorded as prompt_too_long", shard.name,
                           len({r[0].index for r in long}),
                           sorted({len(r[2].prompt_ids) for r in long})[:5], context)
            rows_long = too_long_rows(shard, long, context)
            append_jsonl(part, rows_long)
            done.update({(r["problem_id"], r["sample_index"]): r for r in rows_long})
            if progress is not None:
                progress.update(len(rows_long))
            reqs = [r for r in reqs if len(r[2].prompt_ids) < context]
    for b in range(0, len(reqs), cfg.batch_size):
        batch = reqs[b:b + cfg.batch_size]
        results = engine.generate([r for _, _, r in batch])
        new = []
        for (prob, first, req), samples in zip(batch, results):
            for j, sample in enumerate(samples):
                new.append({"benchmark": shard.benchmark, "problem_id": prob.index,
                            "sample_index": first + j, "seed": req.sampling.seed + j,
                            "answer": prob.answer, "finish_reason": sample.finish_reason,
                            "num_tokens": len(sample.token_ids),
                            "text": tokenizer.decode(sample.token_ids, skip_special_tokens=True)})
        pairs = [(r["text"], r["answer"]) for r in new]
        grades = grade_choices(pairs) if bench.grading == "choice" else grader.grade(pairs)
        for row, grade in zip(new, grades):
            row.update(grade)
        append_jsonl(part, new)
        done.update({(r["problem_id"], r["sample_index"]): r for r in new})
        if progress is not None:
            progress.update(len(new))
    return write_shard(out, shard, list(done.values()))


def _run_shards(plan: Plan, shards: List[Shard], desc: str) -> None:
    model_dir = ensure_hf_model(plan)
    tokenizer = load_tokenizer(plan, model_dir)
    with open_engine(plan, model_dir) as engine, \
            Grader(plan.cfg.grader_workers, plan.cfg.grader_timeout_s) as grader, \
            tqdm(total=sum(s.size for s in shards), desc=desc, unit="sample") as bar:
        bar.write(engine.describe(), file=sys.stderr)
        for shard in shards:
            run_shard(plan, shard, engine, tokenizer, grader, bar, model_context(model_dir))


def run_one_shard(out_dir: str | Path, index: int) -> Path:
    """What array task ``index`` does."""
    plan = load_plan(out_dir)
    if not 0 <= index < len(plan.shards):
        raise ConfigError(f"shard index {index} is outside 0..{len(plan.shards) - 1}")
    shard = plan.shards[index]

    fingerprint.verify(plan.out_dir, plan.cfg)  # the weights did not change under the array
    if plan.cfg.load and not (hf_model_dir(plan) / "config.json").is_file():
        raise ConfigError(f"{hf_model_dir(plan)} is missing: the conversion job did not finish")
    if not shard_path(plan.out_dir, shard).is_file():
        _run_shards(plan, [shard], f"shard {shard.name}")
    return shard_path(plan.out_dir, shard)


def run_local(cfg: EvalConfig, progress_desc: str = "eval", force: bool = False) -> Dict:
    """All shards in this process (skipping finished ones), then the summary."""
    plan = prepare(cfg, force)
    todo = missing_shards(plan)
    if todo:
        _run_shards(plan, todo, progress_desc)
    return aggregate(plan.out_dir)


def convert_only(out_dir: str | Path) -> Optional[Path]:
    """The Slurm conversion job: make ``output_dir/hf_model`` from ``load``."""
    plan = load_plan(out_dir)
    fingerprint.verify(plan.out_dir, plan.cfg)
    return ensure_hf_model(plan)
