"""The demo's task and sizes: which problems the base is pretrained on, which the methods train
and are evaluated on, and how long each stage runs (measured on 2 cores: README, "The CPU
demo")."""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Set, Tuple

from megatron_trapo.data.records import Record, save_records
from megatron_trapo.data.synthetic import answer_line, level_of, make_split, tokenizer_corpus
from megatron_trapo.data.tokenizer import train_bpe_tokenizer

LEVELS: Tuple[int, ...] = (1, 2, 3, 4, 5)  # steps per problem in the training/held-out splits


@dataclass(frozen=True)
class Sizes:
    # the base: SFT on a mixture that thins out with the steps and never shows the hardest
    # (four-step problems at a small weight: without them the base wrote 3 steps for 81 of 82
    # four-step problems; with them it writes four and solves 47%, and only five steps are
    # out of its reach)
    pretrain_mix: Dict[int, float] = field(default_factory=lambda: {1: 5, 2: 3, 3: 2, 4: 0.5})
    pretrain: int = 9000  # problems (some answered without working: see pretrain_direct)
    # sized on training problems, never held-out ones (benchmarks/size_base.py; README, "The
    # CPU demo"). Without answers-only text (pretrain_direct 0), 6000 problems, greedy per
    # level 1-5: 1000 steps 70/36/27/20/6, 1200 99/74/30/19/5, 1500 100/99/99/68/7; on that
    # base RL moved nothing in 40 steps (README). With 40% answers only: 9000 problems and
    # 1800 steps keep the worked solutions' share of the steps (sampled at T = 1, worked
    # answers right 87/61/37/20/7%); 7500 and 1500 were weaker (68/32/12/16/9)
    pre_iters: int = 1800
    pre_prompts: int = 16
    pre_lr: float = 2e-3  # cosine to 0 (a base annealed to a floor of 1e-4 was worse: 27% vs 39%)
    # every value in 0..20: few enough arithmetic facts that pretraining covers each one many
    # times (with 0..99 the base memorised problems instead: 17% on unseen one-step ones)
    max_value: int = 20
    # how often a step of a pretraining solution is written off by 1-2, per solution style
    # (data/synthetic.py): the base writes both styles, one of them less reliably
    pretrain_slip: Tuple[float, float] = (0.0, 0.0)
    # per level, the share of pretraining problems answered without working ("The answer
    # is \\boxed{13}."), as much of the text a real base model learned from does: the habit RL
    # can drop. Which to write is decided at an answer's first token. Only the middle levels:
    # a one-step problem's working is one line, and the text works it (with 40% answers alone
    # at every level, greedy decoding guessed on 99-100% of the problems, one-step ones too:
    # 31% on those); four-step problems are worked too, so the base meets the longest chains,
    # never shown, working them rather than guessing (a guess from the last operation alone
    # is right on ~20% of the five-step problems: data/synthetic.py's values are 0..20). At
    # 40% the answers alone are right 9-14% of the time at T = 1 against 20-64% for worked
    # ones. With 6000 problems and 1200 steps, 40% at every level: at 30%, greedy took it on
    # 6-12%; at 50%, the worked answers were no better than guesses at T = 1 (RL would have
    # had no signal to follow). Measured on training problems (benchmarks/size_base.py),
    # greedy answers alone per level 1-5: 0/88/99/0/2%
    pretrain_direct: Dict[int, float] = field(default_factory=lambda: {2: 0.4, 3: 0.4})
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
# CI's pipeline check: a base without answers-only text (500 steps do not teach both habits)
QUICK = Sizes(pretrain=2000, pre_iters=500, train=400, eval=100, eval_extra={}, probe=50,
              iters=10, prompts=8, evals=2, pretrain_direct={})


def both_styles(records: List[Record]) -> List[Record]:
    """Every other record with its two expert solutions swapped: SFT trains on the first, so
    the base writes both styles (TRAPO's last micro-group and LUFFY use the second trace; a
    base that never saw it put 55-75% of those expert tokens below p = 0.1, NLL 5-7 nats)."""
    return [dataclasses.replace(r, solutions=r.solutions[::-1]) if i % 2 else r
            for i, r in enumerate(records)]


def direct_answers(records: List[Record], shares: Dict[int, float]) -> List[Record]:
    """A seeded share of ``records`` of each level (``shares``: level -> share) with their
    first solution (the one SFT trains on) replaced by the answer alone, in the terse style's
    words."""
    for level, share in shares.items():
        if level not in LEVELS or not 0.0 <= share <= 1.0:
            raise ValueError(f"Sizes.pretrain_direct: level -> share in [0, 1] for levels "
                             f"{LEVELS}, got {level}: {share}")
    rng = random.Random("direct")
    out = []
    for r in records:
        # one draw a record, whatever its level: a level's share moving leaves the other
        # levels' draws as they were
        draw = rng.random()
        out.append(dataclasses.replace(r, solutions=[answer_line(r.answer), *r.solutions[1:]])
                   if draw < shares.get(level_of(r.source), 0.0) else r)
    return out


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
    """The splits and the tokenizer, made once per output folder and ``sizes``:
    ``sizes.json``, written last, records what they were made with; a folder made with other
    sizes (or before they were recorded) is made again, and the stages that read its files run
    again with it (``stage.run_stage`` keys a stage on its input files). Every draw is seeded."""
    marker = data / "sizes.json"
    recorded = json.dumps(dataclasses.asdict(sizes), sort_keys=True)
    if marker.is_file() and marker.read_text() == recorded:
        return
    data.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a re-make cut off must not pass for the old sizes
    top = sizes.max_value
    evals = make_split(sizes.eval, 0, LEVELS, "eval", top)
    held_out = {r.problem for r in evals}
    pre = direct_answers(both_styles(make_split(
        sizes.pretrain, 0, sizes.pretrain_mix, "pretrain", top, exclude=held_out,
        slip=sizes.pretrain_slip)), sizes.pretrain_direct)
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
    save_records(probe, data / "tune_probe.jsonl")
    marker.write_text(recorded)  # last: it marks the folder done
