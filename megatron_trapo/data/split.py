"""A seeded split of a training file into two disjoint files: the SFT stage's share and the RL
stage's complement (``sft_stage.split``; the reference trains its SFT-then-RL baseline's RL
stage on problems the SFT stage did not see, ``prepare_train_sft_rl.py``)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Tuple

from megatron_trapo.config import ConfigError
from megatron_trapo.data.records import scan_rows


def split_rows(path: str, share: float, seed: int, out_dir: Path) -> Tuple[Path, Path, int]:
    """``(first, rest, unreadable)``: ``share`` of the rows of ``path`` (rounded, at least one
    row each side) in ``out_dir/sft.jsonl``, the others in ``out_dir/rl.jsonl``, both in the
    file's order; unreadable lines (bad JSON, not UTF-8) are counted, not written (each stage's
    preflight reports the rows it cannot use). Every rank may call it: the files are written
    under a private name and renamed, so a reader never sees half of one."""
    rows, bad = scan_rows(path)
    if len(rows) < 2:
        raise ConfigError(f"sft_stage.split: train_data={path} has {len(rows)} readable row(s); "
                          "a split needs two or more")
    order = list(range(len(rows)))
    random.Random(f"split-{seed}").shuffle(order)
    n_first = min(max(round(share * len(rows)), 1), len(rows) - 1)
    first = set(order[:n_first])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "sft.jsonl", out_dir / "rl.jsonl"
    for target, keep in zip(paths, (True, False)):
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        with open(tmp, "w") as f:
            for k, (_, row) in enumerate(rows):
                if (k in first) == keep:
                    f.write(json.dumps(row) + "\n")
        os.replace(tmp, target)
    return paths[0], paths[1], len(bad)
