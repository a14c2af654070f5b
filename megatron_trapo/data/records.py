"""The one record type of training data, and its JSONL / parquet files.

A record is a problem, its ground-truth answer and a list of expert solutions (the first is the
main trace; TRAPO's last micro-group uses a second one when present), with an optional id and
source. Converters from public layouts live in ``data/convert.py``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

from megatron_trapo.config import ConfigError


@dataclass
class Record:
    problem: str
    answer: str
    solutions: List[str] = field(default_factory=list)
    id: Optional[str] = None
    source: Optional[str] = None


def _check(row: dict, where: str) -> Record:
    missing = [k for k in ("problem", "answer") if not isinstance(row.get(k), str)]
    if missing:
        raise ConfigError(f"{where}: missing or non-string field(s) {missing}")
    sols = row.get("solutions") or []
    if not isinstance(sols, list) or not all(isinstance(s, str) for s in sols):
        raise ConfigError(f"{where}: 'solutions' must be a list of strings")
    return Record(row["problem"], row["answer"], list(sols), row.get("id"), row.get("source"))


def read_rows(path: str | Path) -> List[dict]:
    """The rows of a ``.parquet`` file, or of a JSON-lines file (any other suffix); blank lines
    are skipped and a bad line is an error naming it."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
    return rows


def load_records(path: str | Path) -> List[Record]:
    """Records from ``.jsonl`` or ``.parquet`` in this schema (errors name the row)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise ConfigError(f"{path}: unsupported data format {path.suffix!r} (.jsonl or .parquet)")
    return [_check(row, f"{path} row {i}") for i, row in enumerate(read_rows(path))]


def save_records(records: Iterable[Record], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in records]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return len(rows)
