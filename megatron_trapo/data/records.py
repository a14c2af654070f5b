"""The one record type of training data, and its JSONL / parquet files.

A record is a problem, its ground-truth answer and a list of expert solutions (the first is the
main trace; TRAPO's last micro-group uses a second one when present), with an optional id and
source. Converters from public layouts live in ``data/convert.py``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_trapo.config import ConfigError


@dataclass
class Record:
    problem: str
    answer: str
    solutions: List[str] = field(default_factory=list)
    id: Optional[str] = None
    source: Optional[str] = None


def record_problem(row: dict) -> Optional[str]:
    """Why ``row`` is not a record of this schema (None when it is one)."""
    missing = [k for k in ("problem", "answer") if not isinstance(row.get(k), str)
               or not row[k].strip()]
    if missing:
        return f"missing, empty or non-string {' and '.join(missing)}"
    sols = row.get("solutions") or []
    if not isinstance(sols, list) or not all(isinstance(s, str) for s in sols):
        return "'solutions' is not a list of strings"
    return None


def to_record(row: dict) -> Record:
    return Record(row["problem"], row["answer"], [s for s in row.get("solutions") or []],
                  row.get("id"), row.get("source"))


def _check(row: dict, where: str) -> Record:
    why = record_problem(row)
    if why:
        raise ConfigError(f"{where}: {why}")
    return to_record(row)


def scan_rows(path: str | Path) -> Tuple[List[Tuple[int, dict]], List[Tuple[int, str]]]:
    """``([(line, row)], [(line, why)])``: every row of a ``.parquet`` file (line = row number
    from 1) or JSON-lines file (1-based line numbers, blank lines skipped), and the lines that
    are not a JSON object (bad JSON, not UTF-8) with the reason — the caller decides whether
    those are skipped or fatal."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise ConfigError(f"{path}: not a readable parquet file ({exc})") from None
        return list(enumerate(table.to_pylist(), 1)), []
    rows, bad = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append((n, f"not UTF-8 (byte {exc.start})"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append((n, f"invalid JSON ({exc.msg})"))
                continue
            if not isinstance(row, dict):
                bad.append((n, f"a JSON {type(row).__name__}, not an object"))
                continue
            rows.append((n, row))
    return rows, bad


def read_rows(path: str | Path) -> List[dict]:
    """The rows of a ``.parquet`` or JSON-lines file; a bad line is an error naming it."""
    rows, bad = scan_rows(path)
    if bad:
        line, why = bad[0]
        raise ConfigError(f"{path}:{line}: {why}")
    return [row for _, row in rows]


def data_file(path: str | Path, what: str = "data file") -> Path:
    """``path`` if it is a readable data file; else an error naming ``what`` (the field)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}={path}: no such file")
    if p.suffix not in (".parquet", ".jsonl", ".json"):
        raise ConfigError(f"{what}={path}: unsupported format {p.suffix!r} (.jsonl or .parquet)")
    return p


def load_records(path: str | Path) -> List[Record]:
    """Records from ``.jsonl`` or ``.parquet`` in this schema (errors name the row)."""
    path = data_file(path)
    rows, bad = scan_rows(path)
    if bad:
        raise ConfigError(f"{path}:{bad[0][0]}: {bad[0][1]}")
    return [_check(row, f"{path}:{line}") for line, row in rows]


def save_records(records: Iterable[Record], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in records]
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return len(rows)
