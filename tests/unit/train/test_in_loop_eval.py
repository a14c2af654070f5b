"""The trainer's held-out evaluation renders prompts and grades answers as ``megatron-trapo eval``
does: the same prompt ids as eval's ``chat`` template, and PRM800K's grader consulted when
math-verify says wrong (before, the in-loop eval used the training reward alone, so an answer
only the second grader accepts counted wrong here and right in ``megatron-trapo eval``)."""
import json
from types import SimpleNamespace

import pytest

from megatron_trapo.config import ConfigError, TrainConfig, load_config
from megatron_trapo.data.items import encode
from megatron_trapo.data.prompts import prompt_ids
from megatron_trapo.data.records import Record
from megatron_trapo.data.tokenizer import train_bpe_tokenizer
from megatron_trapo.reward.math_reward import MathReward
from megatron_trapo.rollout.types import Sample
from megatron_trapo.train import trainer
from megatron_trapo.train.run import RolloutSide

CORPUS = [f"What is {i} divided by 4? The answer is \\boxed{{{i / 4}}}." for i in range(100)]


class ScriptedEngine:
    """Answers request i with the fixed texts ``responses[i]`` (one per sample it asks for);
    remembers the prompts and sampling it got."""

    def __init__(self, tokenizer, responses):
        self.tok, self.responses, self.prompts, self.sampling = tokenizer, responses, [], []

    def generate(self, requests):
        out = []
        for req, texts in zip(requests, self.responses):
            self.prompts.append(list(req.prompt_ids))
            self.sampling.append(req.sampling)
            assert len(texts) == req.sampling.n
            out.append([Sample(ids, [0.0] * len(ids), "stop", "v0") for ids in
                        (self.tok(t, add_special_tokens=False)["input_ids"] for t in texts)])
        return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(CORPUS, 300, tmp_path_factory.mktemp("tok"))


def test_in_loop_eval_renders_and_grades_as_megatron_trapo_eval(tokenizer, monkeypatch,
                                                                tmp_path):
    records = [Record("What is 5 divided by 4?", "1.25", id="a", source="one"),
               Record("What is 28 divided by 4?", "7", id="b", source="one"),
               Record("What is 8 divided by 4?", "2", id="c", source="two")]
    responses = ["So the answer is \\boxed{\\text{1.25}}.",  # math-verify: wrong; PRM800K: right
                 "The answer is \\boxed{7}.",  # math-verify: right
                 "I do not know."]  # no \boxed{}
    assert [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"])
            for t in responses] == responses  # byte-level: the texts survive the round trip
    engine = ScriptedEngine(tokenizer, [[r] for r in responses])
    monkeypatch.setattr(trainer, "gather_shares", lambda local, share: local)  # a world of one
    with MathReward(num_workers=1) as reward:
        monkeypatch.setattr(trainer.torch.distributed, "get_rank", lambda: 0)
        run = SimpleNamespace(cfg=TrainConfig(log_dir=str(tmp_path)), tokenizer=tokenizer,
                              stop_ids=[], sync_engine=dict,
                              rollout=RolloutSide(None, encode(records, tokenizer), engine,
                                                  reward))
        metrics = trainer.evaluate(run, 7)
    assert engine.prompts == [prompt_ids(tokenizer, r.problem, "chat") for r in records]
    assert metrics["eval/accuracy"] == pytest.approx(2 / 3)
    assert metrics["eval/second_grader"] == pytest.approx(1 / 3)
    assert metrics["eval/no_answer"] == pytest.approx(1 / 3)
    assert metrics["eval/accuracy/one"] == 1.0 and metrics["eval/accuracy/two"] == 0.0
    # every graded response, per problem, for paired comparisons between runs
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["id"], r["source"], r["correct"], r["text"]) for r in rows] == [
        (7, "a", "one", 1.0, responses[0]), (7, "b", "one", 1.0, responses[1]),
        (7, "c", "two", 0.0, responses[2])]


def test_in_loop_eval_k_samples_per_problem_is_avg_at_k(tokenizer, monkeypatch, tmp_path):
    """eval.k: k samples of each problem at eval.temperature, each graded and logged; the
    accuracy is their mean (avg@k); sample j of problem i has seed seed + i·k + j."""
    records = [Record("What is 28 divided by 4?", "7", id="a", source="one"),
               Record("What is 8 divided by 4?", "2", id="b", source="two")]
    right_a, wrong, right_b = "\\boxed{7}", "\\boxed{5}", "\\boxed{2}"
    engine = ScriptedEngine(tokenizer, [[right_a, wrong, right_a], [wrong, wrong, right_b]])
    monkeypatch.setattr(trainer, "gather_shares", lambda local, share: local)
    monkeypatch.setattr(trainer.torch.distributed, "get_rank", lambda: 0)
    cfg = TrainConfig(log_dir=str(tmp_path), seed=5)
    cfg.eval.k, cfg.eval.temperature = 3, 0.6
    with MathReward(num_workers=1) as reward:
        run = SimpleNamespace(cfg=cfg, tokenizer=tokenizer, stop_ids=[], sync_engine=dict,
                              rollout=RolloutSide(None, encode(records, tokenizer), engine,
                                                  reward))
        metrics = trainer.evaluate(run, 3)
    assert [(s.n, s.seed, s.temperature) for s in engine.sampling] == [(3, 5, 0.6), (3, 8, 0.6)]
    assert metrics["eval/accuracy"] == pytest.approx(3 / 6)
    assert metrics["eval/accuracy/one"] == pytest.approx(2 / 3)
    assert metrics["eval/accuracy/two"] == pytest.approx(1 / 3)
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [(r["id"], r["correct"]) for r in rows] == [
        ("a", 1.0), ("a", 0.0), ("a", 1.0), ("b", 0.0), ("b", 0.0), ("b", 1.0)]


def test_eval_k_needs_sampling():
    with pytest.raises(ConfigError, match="eval.k=4 needs eval.temperature > 0"):
        load_config(TrainConfig, None, ["eval.k=4", "eval.temperature=0"])
    with pytest.raises(ConfigError, match="eval.k must be >= 1"):
        load_config(TrainConfig, None, ["eval.k=0", "eval.temperature=0.6"])
    assert load_config(TrainConfig, None, ["eval.k=4", "eval.temperature=0.6"]).eval.k == 4


def test_eval_average_over_sources_weighs_each_source_the_same(tokenizer, monkeypatch,
                                                              tmp_path):
    """eval.average=sources: 3 of 3 right in source one, 0 of 1 in two -> (1 + 0) / 2, not
    3/4; a record without a source is refused by name."""
    records = [Record(f"What is {n} divided by 4?", str(n // 4), id=f"p{n}", source=src)
               for n, src in ((28, "one"), (8, "one"), (4, "one"), (12, "two"))]
    answers = ["\\boxed{7}", "\\boxed{2}", "\\boxed{1}", "\\boxed{9}"]
    monkeypatch.setattr(trainer, "gather_shares", lambda local, share: local)
    monkeypatch.setattr(trainer.torch.distributed, "get_rank", lambda: 0)
    cfg = load_config(TrainConfig, None, ["eval.average=sources", f"log_dir={tmp_path}"])
    with MathReward(num_workers=1) as reward:
        def run_on(recs):
            engine = ScriptedEngine(tokenizer, [[a] for a in answers])
            return SimpleNamespace(cfg=cfg, tokenizer=tokenizer, stop_ids=[], sync_engine=dict,
                                   rollout=RolloutSide(
                None, encode(recs, tokenizer), engine, reward))
        metrics = trainer.evaluate(run_on(records), 1)
        assert metrics["eval/accuracy"] == pytest.approx(0.5)
        cfg.eval.average = "problems"
        assert trainer.evaluate(run_on(records), 2)["eval/accuracy"] == pytest.approx(0.75)
        cfg.eval.average = "sources"
        unsourced = records[:3] + [Record("What is 12 divided by 4?", "3", id="q")]
        with pytest.raises(ConfigError, match="eval.average=sources needs a source"):
            trainer.evaluate(run_on(unsourced), 3)
    with pytest.raises(ConfigError, match="eval.average"):
        load_config(TrainConfig, None, ["eval.average=levels"])
