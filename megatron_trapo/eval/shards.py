"""The unit of evaluation work — a shard: one benchmark × a problem range × a sample range —
and its files. A finished shard is one JSONL file written atomically (temp file + rename), so
an output either exists whole or not at all; samples graded so far live in a ``.partial``
file beside it, which a re-run reads to skip what is already done."""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

MAX_K = 4096  # sample index bits in a seed (see sample_seed)


@dataclass(frozen=True)
class Shard:
    index: int  # the Slurm array index
    benchmark: str
    problem_start: int  # [start, end) over the benchmark's problems
    problem_end: int
    sample_start: int  # [start, end) over the k samples of each problem
    sample_end: int

    @property
    def name(self) -> str:
        return (f"{self.index:05d}_{self.benchmark}_p{self.problem_start}-{self.problem_end}"
                f"_s{self.sample_start}-{self.sample_end}")

    @property
    def size(self) -> int:
        return (self.problem_end - self.problem_start) * (self.sample_end - self.sample_start)

    def keys(self) -> List[Tuple[int, int]]:
        """(problem index, sample index) of every sample this shard owns."""
        return [(p, s) for p in range(self.problem_start, self.problem_end)
                for s in range(self.sample_start, self.sample_end)]


def plan_shards(counts: Dict[str, Tuple[int, int]], problems_per_shard: int,
                samples_per_shard: int) -> List[Shard]:
    """Shards for ``counts[benchmark] = (problems, k)``; ``samples_per_shard=0`` keeps all k
    samples of a problem together."""
    shards: List[Shard] = []
    for bench, (problems, k) in counts.items():
        step = samples_per_shard or k
        for p0 in range(0, problems, problems_per_shard):
            for s0 in range(0, k, step):
                shards.append(Shard(len(shards), bench, p0, min(p0 + problems_per_shard, problems),
                                    s0, min(s0 + step, k)))
    return shards


def sample_seed(seed: int, benchmark: str, problem: int) -> int:
    """The seed of sample 0 of a problem; sample j uses this + j (engines' SamplingParams.seed
    convention), so a sample's seed does not depend on how the work was sharded."""
    return ((seed & 0xFFFF) << 44) | (zlib.crc32(f"{benchmark}/{problem}".encode()) << 12)


def shard_path(out_dir: Path, shard: Shard) -> Path:
    return Path(out_dir) / "shards" / f"{shard.name}.jsonl"


def partial_path(out_dir: Path, shard: Shard) -> Path:
    return Path(out_dir) / "shards" / f"{shard.name}.partial.jsonl"


def read_jsonl(path: Path) -> List[dict]:
    """Rows of a JSONL file; a last line cut off by a crash is dropped (it is redone)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):  # corruption in the middle is not a crash artefact
                    raise ValueError(f"{path}: unreadable line {len(rows) + 1}") from None
    return rows


def append_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Append and fsync: rows reported done survive a killed task."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(out_dir: Path, shard: Shard, rows: List[dict]) -> Path:
    """The finished shard, sorted by (problem, sample), written atomically; the partial file
    is removed after."""
    rows = sorted(rows, key=lambda r: (r["problem_id"], r["sample_index"]))
    got = [(r["problem_id"], r["sample_index"]) for r in rows]
    if got != shard.keys():
        raise ValueError(f"shard {shard.name}: rows do not cover exactly its samples")
    path = shard_path(out_dir, shard)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    partial_path(out_dir, shard).unlink(missing_ok=True)
    return path


def shards_to_json(shards: List[Shard]) -> List[dict]:
    return [asdict(s) for s in shards]


def shards_from_json(rows: List[dict]) -> List[Shard]:
    return [Shard(**r) for r in rows]
