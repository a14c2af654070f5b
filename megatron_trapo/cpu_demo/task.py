"""The demo's task and sizes: which problems the base is pretrained on, which the methods train
and are evaluated on, and how long each stage runs (measured on 2 cores: README, "The CPU
demo")."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Set, Tuple

from megatron_trapo.data.records import Record, save_records
from megatron_trapo.data.synthetic import make_split, tokenizer_corpus
from megatron_trapo.data.tokenizer import train_bpe_tokenizer

LEVELS: Tuple[int, ...] = (1, 2, 3, 4, 5)  # steps per problem in the training/held-out splits


@dataclass(frozen=True)
class Sizes:
    # the base: SFT on a mixture that thins out with the steps and never shows the hardest
    # (four-step problems at a small weight: without them the base wrote 3 steps for 81 of 82
    # four-step problems; with them it writes four and solves 47%, and only five steps are
    # out of its reach)
    pretrain_mix: Dict[int, float] = field(default_factory=lambda: {1: 5, 2: 3, 3: 2, 4: 0.5})
    pretrain: int = 6000  # problems
    # sized on training problems, never held-out ones (benchmarks/size_base.py; README, "The
    # CPU demo"), greedy per level 1-5: 1000 steps 70/36/27/20/6, 1200 99/74/30/19/5, 1500
    # 100/99/99/68/7 (levels 1-3 saturated: nothing left for RL to show there). 1200 is the
    # issue's shape: competent at one step, little at five, and the middle levels half-solved,
    # where 67-90% of GRPO's groups of 8 at T = 1 disagree (the only ones with a signal)
    pre_iters: int = 1200
    pre_prompts: int = 16
    pre_lr: float = 2e-3  # cosine to 0 (a base annealed to a floor of 1e-4 was worse: 27% vs 39%)
    # every value in 0..20: few enough arithmetic facts that pretraining covers each one many
    # times (with 0..99 the base memorised problems instead: 17% on unseen one-step ones)
    max_value: int = 20
    # how often a step of a pretraining solution is written off by 1-2, per solution style
    # (data/synthetic.py): the base writes both styles, one of them less reliably
    pretrain_slip: Tuple[float, float] = (0.0, 0.0)
    train: int = 2000  # the methods' training problems (every level)
    eval: int = 400  # held-out problems (every level, about 80 each)
    # more held-out problems of the middle levels, where the methods differ, drawn after the
    # training splits among the problems none of them holds (so the base and the methods'
    # data stay what they were: a held-out split drawn otherwise changes the pretraining
    # draw, and the base with it — one such base solved 83% of the four-step problems where
    # this one solves 47%). With about 80 a level, two seeds of one method disagreed on enough
    # problems that the finite sample set much of the seed spread; accuracy is the mean of
    # the levels' (eval.average=sources), so the extra problems sharpen a level without
    # re-weighting it. Only ~190 one-step problems exist: level 1 gets none.
    eval_extra: Dict[int, int] = field(default_factory=lambda: {2: 240, 3: 240, 4: 240})
    # problems of the training distribution the --tune grid is scored on: drawn apart, in no
    # split a method trains or is evaluated on (scored on train.jsonl's first problems, as it
    # was, the grid partly measured prompts the runs had trained on: 640 of its 2000)
    probe: int = 200
    iters: int = 40  # optimizer steps of every method (SFT-then-RL: of its RL stage)
    prompts: int = 16
    evals: int = 2  # held-out evaluations during each run (and one at its start)
    max_response_length: int = 96
    # held-out accuracy: greedy (0), or as the paper measures it, pass@1 at temperature 0.6,
    # averaged over eval_k samples per problem (avg@k)
    eval_temperature: float = 0.0
    eval_k: int = 1


FULL = Sizes()
QUICK = Sizes(pretrain=2000, pre_iters=500, train=400, eval=100, eval_extra={}, probe=50,
              iters=10, prompts=8, evals=2)


def both_styles(records: List[Record]) -> List[Record]:
    """Every other record with its two expert solutions swapped: SFT trains on the first, so
    the base writes both styles (TRAPO's last micro-group and LUFFY use the second trace; a
    base that never saw it put 55-75% of those expert tokens below p = 0.1, NLL 5-7 nats)."""
    return [dataclasses.replace(r, solutions=r.solutions[::-1]) if i % 2 else r
            for i, r in enumerate(records)]


def extra_held_out(n: int, level: int, top: int, seen: Set[str]) -> List[Record]:
    """``n`` distinct ``level``-step problems none of ``seen`` (which grows by them), ids
    ``eval-extra{level}-i``."""
    out: List[Record] = []
    draws = make_split(20 * n, 0, [level], f"eval-extra{level}", top, exclude=seen)
    for r in draws:
        if r.problem not in seen:
            seen.add(r.problem)
            out.append(r)
            if len(out) == n:
                return out
    raise ValueError(f"Sizes.eval_extra: only {len(out)} unseen {level}-step problems found "
                     f"for {n}; ask for fewer")


def prepare(data: Path, sizes: Sizes) -> None:
    """The splits and the tokenizer, made once per output folder (a finished
    ``tune_probe.jsonl`` means it is done; every draw is seeded, so a folder made before the
    probe was drawn apart is made again the same, with the probe)."""
    if (data / "tune_probe.jsonl").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    top = sizes.max_value
    evals = make_split(sizes.eval, 0, LEVELS, "eval", top)
    held_out = {r.problem for r in evals}
    pre = both_styles(make_split(sizes.pretrain, 0, sizes.pretrain_mix, "pretrain", top,
                                 exclude=held_out, slip=sizes.pretrain_slip))
    train = make_split(sizes.train, 0, LEVELS, "train", top, exclude=held_out)
    seen = held_out | {r.problem for r in pre + train}
    for level, n in sizes.eval_extra.items():
        evals += extra_held_out(n, level, top, seen)
    # levels 2-5 only: the ~190 one-step problems are all held out or trained on already
    probe = make_split(sizes.probe, 0, LEVELS[1:], "probe", top,
                       exclude={r.problem for r in evals + train})
    train_bpe_tokenizer(tokenizer_corpus(pre + train), 400, data / "tokenizer",
                        individual_digits=True)
    save_records(pre, data / "pretrain.jsonl")
    save_records(train, data / "train.jsonl")
    save_records(evals, data / "eval.jsonl")
    save_records(probe, data / "tune_probe.jsonl")  # last: it marks the folder done
