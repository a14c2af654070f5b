"""What produced an evaluation's results, so that a resume never mixes in stale ones.

An output folder can be resumed (finished shards are kept). The config alone does not say what
was evaluated: weights copied over the same ``model_path``, a checkpoint behind ``load=`` that
training advanced, or a benchmark file that was rewritten all keep the config equal. The
fingerprint records them — the weight files' names, sizes and modification times (hashing
60 GiB of weights at every task start would cost minutes), the checkpoint iteration that
``load_iteration: null`` resolved to, and a SHA-256 of every benchmark file — in
``fingerprint.json``. A resume (and every Slurm task) compares it with the present one;
a difference is refused with the reason, unless ``--force`` discards the old results.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List

from megatron_trapo.config import ConfigError, EvalConfig
from megatron_trapo.eval import registry

FILE = "fingerprint.json"
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "config.json", "*.index.json")


def _files(folder: Path, patterns=_WEIGHTS) -> Dict[str, List[int]]:
    out = {}
    for pattern in patterns:
        for f in folder.rglob(pattern):
            if f.is_file():
                st = f.stat()
                out[str(f.relative_to(folder))] = [st.st_size, st.st_mtime_ns]
    return dict(sorted(out.items()))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compute(cfg: EvalConfig) -> Dict:
    fp: Dict = {"benchmarks": {name: _sha256(registry.get(name).path) for name in cfg.benchmarks}}
    if cfg.model_path:
        fp["model"] = {"model_path": str(Path(cfg.model_path).resolve()),
                       "files": _files(Path(cfg.model_path))}
    elif cfg.load:
        # lazy: megatron-core takes ~3 s to import; only a load= evaluation needs the checkpoint
        # reader
        from megatron_trapo.train.checkpoint import iteration_dir, latest_iteration

        it = cfg.load_iteration if cfg.load_iteration is not None else latest_iteration(cfg.load)
        fp["model"] = {"load": str(Path(cfg.load).resolve()), "iteration": it,
                       "files": _files(iteration_dir(cfg.load, it), ("*",)) if it is not None
                       else {}}
    return fp


def differences(old: Dict, new: Dict) -> List[str]:
    """What changed, in words."""
    out = []
    om, nm = old.get("model", {}), new.get("model", {})
    if om.get("iteration") != nm.get("iteration"):
        out.append(f"checkpoint iteration {om.get('iteration')} → {nm.get('iteration')}")
    changed = sorted(k for k in set(om.get("files", {})) | set(nm.get("files", {}))
                     if om.get("files", {}).get(k) != nm.get("files", {}).get(k))
    if changed:
        out.append(f"model files changed ({', '.join(changed[:3])}{', …' if len(changed) > 3 else ''})")
    for name in sorted(set(old.get("benchmarks", {})) | set(new.get("benchmarks", {}))):
        if old.get("benchmarks", {}).get(name) != new.get("benchmarks", {}).get(name):
            out.append(f"benchmark {name}'s file changed")
    return out


def has_results(out: Path) -> bool:
    return any((out / "shards").glob("*.jsonl")) if (out / "shards").is_dir() else False


def discard_results(out: Path, converted: Path) -> None:
    """Remove shard results, merged samples and summaries, and a converted model."""
    shutil.rmtree(out / "shards", ignore_errors=True)
    for name in ("samples.jsonl", "summary.json", "summary.md"):
        (out / name).unlink(missing_ok=True)
    if converted.is_dir():
        shutil.rmtree(converted, ignore_errors=True)


def check(out: Path, cfg: EvalConfig, force: bool, converted: Path) -> Dict:
    """Record the present fingerprint; a resume over results of something else is refused
    (``force``: those results, and a converted model, are discarded first)."""
    now = compute(cfg)
    path = out / FILE
    if path.is_file() and has_results(out):
        diff = differences(json.loads(path.read_text()), now)
        if diff and not force:
            raise ConfigError(f"output_dir {out} holds results of something else: "
                              f"{'; '.join(diff)}. Rerun with --force to discard them, or "
                              "choose a new output_dir")
        if diff:
            discard_results(out, converted)
    elif not path.is_file() and has_results(out) and force:
        discard_results(out, converted)
    path.write_text(json.dumps(now, indent=1))
    return now


def verify(out: Path, cfg: EvalConfig) -> None:
    """A task's check that nothing changed since the evaluation was planned."""
    path = out / FILE
    if path.is_file():
        diff = differences(json.loads(path.read_text()), compute(cfg))
        if diff:
            raise ConfigError(f"{out}: {'; '.join(diff)} since this evaluation was planned; "
                              "rerun `megatron-trapo eval … --force`")
