"""Evaluation benchmarks shipped with the package (data files under ``eval/benchmarks/``, see
the README there for sources and licences) and the field mapping of each to (problem, answer).
Users register their own JSONL with :func:`register`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from megatron_trapo.config import GRADINGS, ConfigError
from megatron_trapo.data.convert import gsm8k_final_answer
from megatron_trapo.data.records import read_rows
from megatron_trapo.reward.math_reward import last_boxed

DATA = Path(__file__).parent / "benchmarks"


@dataclass(frozen=True)
class Problem:
    benchmark: str
    index: int
    problem: str
    answer: str


def _gsm8k_answer(row: dict) -> str:
    return gsm8k_final_answer(row["answer"]) or ""


def _minerva_answer(row: dict) -> str:
    boxed = last_boxed(row["solution"])
    if boxed is None:
        raise ConfigError("minerva row without a \\boxed{} answer in its solution")
    return boxed


def _olympiad_answer(row: dict) -> str:
    answers = row["final_answer"]
    return ", ".join(a.strip("$ ") for a in answers) if isinstance(answers, list) else str(answers)


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: Path
    problem_field: str
    answer: Callable[[dict], str]
    default_k: int = 1  # the paper: avg@32 for AIME/AMC, pass@1 elsewhere
    grading: str = "math"  # math (math-verify, then PRM800K's grader) | choice (the letter)

    def load(self, limit: Optional[int] = None) -> List[Problem]:
        if not self.path.is_file():
            raise ConfigError(f"benchmark {self.name}: file not found: {self.path}")
        out = []
        for i, row in enumerate(read_rows(self.path)[:limit]):
            if self.problem_field not in row:
                raise ConfigError(f"{self.path} row {i + 1}: no field {self.problem_field!r}")
            out.append(Problem(self.name, i, row[self.problem_field], self.answer(row)))
        return out


REGISTRY: Dict[str, Benchmark] = {
    "aime24": Benchmark("aime24", DATA / "aime24.jsonl", "problem", lambda r: _number(r["answer"]), 32),
    "aime25": Benchmark("aime25", DATA / "aime25.jsonl", "problem", lambda r: _number(r["answer"]), 32),
    "amc23": Benchmark("amc23", DATA / "amc23.jsonl", "problem", lambda r: _number(r["answer"]), 32),
    "math500": Benchmark("math500", DATA / "math500.jsonl", "problem", lambda r: _number(r["answer"])),
    "minerva": Benchmark("minerva", DATA / "minerva_math.jsonl", "problem", _minerva_answer),
    "olympiadbench": Benchmark("olympiadbench", DATA / "olympiadbench.jsonl", "question",
                               _olympiad_answer),
    "gsm8k": Benchmark("gsm8k", DATA / "gsm8k.jsonl", "question", _gsm8k_answer),
    # the paper's out-of-distribution benchmark (multiple choice; tools/prepare_arc_challenge.py)
    "arc_c": Benchmark("arc_c", DATA / "arc_challenge.jsonl", "problem", lambda r: r["answer"],
                       grading="choice"),
}


_USER_SPECS: Dict[str, tuple] = {}


def register(name: str, path: str | Path, problem_field: str = "problem",
             answer_field: str = "answer", default_k: int = 1, grading: str = "math") -> Benchmark:
    """Add a user JSONL benchmark with its field names and grading (``choice``: the answer
    field holds the right letter, the problem its lettered options)."""
    if grading not in GRADINGS:
        raise ConfigError(f"benchmark {name}: grading must be one of {list(GRADINGS)}, got "
                          f"{grading!r}")
    def answer(row: dict) -> str:
        if answer_field not in row:
            raise ConfigError(f"benchmark {name}: a row has no answer field {answer_field!r}")
        return _number(row[answer_field])

    spec = (Path(path).resolve(), problem_field, answer_field, default_k, grading)
    if name in REGISTRY:
        if _USER_SPECS.get(name) == spec:  # the same registration again (a resumed run)
            return REGISTRY[name]
        raise ConfigError(f"benchmark {name!r} is already registered")
    bench = Benchmark(name, Path(path).resolve(), problem_field, answer, default_k, grading)
    REGISTRY[name] = bench
    _USER_SPECS[name] = spec
    return bench


def get(name: str) -> Benchmark:
    if name not in REGISTRY:
        raise ConfigError(f"unknown benchmark {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]
