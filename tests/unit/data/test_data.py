"""Records, loaders and converters: every skipped row is counted with its reason."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_trapo.config import ConfigError
from megatron_trapo.data.convert import convert_rows
from megatron_trapo.data.prompts import INSTRUCTION, expert_text
from megatron_trapo.data.records import Record, load_records, save_records

TOOL = Path(__file__).resolve().parents[3] / "tools" / "prepare_data.py"

OPENR1 = [
    {"uuid": "a", "problem": "1+1?", "answer": "2",
     "generations": ["<think>one plus one\n\nis two</think> \\boxed{2}", "wrong \\boxed{3}", "ok \\boxed{2}"],
     "correctness_math_verify": [True, False, True]},
    {"uuid": "b", "problem": "2+2?", "answer": "", "generations": ["\\boxed{4}"],
     "correctness_math_verify": [True]},
    {"uuid": "c", "problem": "3+3?", "answer": "6", "generations": ["\\boxed{7}"],
     "correctness_math_verify": [False]},
]
LUFFY = [
    {"prompt": [{"role": "system", "content": "sys"},
                {"role": "user", "content": f"What is 5*5?\n{INSTRUCTION}"}],
     "target": [{"role": "assistant", "content": "<think>5 times 5</think>\\boxed{25}"}],
     "reward_model": {"ground_truth": "25"}, "extra_info": {"index": 7}, "data_source": "luffy"},
    {"prompt": [{"role": "system", "content": "only a system message"}], "target": [],
     "reward_model": {"ground_truth": "1"}},
]


def test_expert_text_keeps_think_content():
    assert expert_text("<think> a\n\nb </think> answer") == "a\n\nb"
    assert expert_text("plain") == "plain"


def test_openr1_keeps_verified_generations_and_reports_skips():
    recs, rep = convert_rows(OPENR1, "openr1")
    assert [r.id for r in recs] == ["a"]
    # kept whole: which part a method trains on is chosen when a run encodes them
    assert recs[0].solutions == ["<think>one plus one\n\nis two</think> \\boxed{2}",
                                 "ok \\boxed{2}"]
    assert rep.as_dict()["skipped"] == {"no_answer": 1, "no_usable_solution": 1}
    assert rep.examples == {"no_answer": ["b"], "no_usable_solution": ["c"]}


def test_luffy_layout():
    recs, rep = convert_rows(LUFFY, "luffy")
    assert recs[0] == Record("What is 5*5?", "25", ["<think>5 times 5</think>\\boxed{25}"],
                             "7", "luffy")
    assert rep.skipped == {"no_user_message": 1}


def test_a_luffy_row_with_an_answer_list_takes_its_traces_from_it():
    """Target and answer list both present: traces 0 and 1 are answer_list[0] and [1], as
    the reference's TRAPO reads them (not the target, then answer_list[0] as trace 1)."""
    row = {**LUFFY[0], "extra_info": {"index": 7, "answer_list": ["first trace", "second"]}}
    recs, _ = convert_rows([row], "luffy")
    assert recs[0].solutions == ["first trace", "second"]


def test_second_traces_are_merged_from_openr1_by_problem_text():
    from megatron_trapo.data.second_trace import merge_second_traces

    records = [Record("What is  5*5?\n", "25", ["5 times 5 \\boxed{25}"], "a"),
               Record("Unmatched?", "1", ["t"], "b"),
               Record("Two already", "2", ["x", "y"], "c"),
               Record("1+1?", "2", ["<think>one plus one\n\nis two</think> \\boxed{2}"], "d")]
    openr1 = [Record("what is 5*5?", "25", ["5  times 5 \\boxed{25}", "25 = 5·5 \\boxed{25}"]),
              Record("Two already", "2", ["z"]),
              *convert_rows(OPENR1, "openr1")[0]]
    merged, report = merge_second_traces(records, openr1)
    # the same trace re-wrapped is not a second one; the next verified one is
    assert merged[0].solutions == ["5 times 5 \\boxed{25}", "25 = 5·5 \\boxed{25}"]
    assert merged[1].solutions == ["t"] and merged[2].solutions == ["x", "y"]
    assert merged[3].solutions[1] == "ok \\boxed{2}"  # the verified one, not "wrong"
    assert report.as_dict() == {"records": 4, "had_two": 1, "got_second": 2,
                                "matched_without_new": 0, "unmatched": 1}


def test_prepare_data_merges_a_second_trace_and_reports_how_many(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    luffy = [{**LUFFY[0], "prompt": [{"role": "user", "content": f"1+1?\n{INSTRUCTION}"}],
              "target": [{"role": "assistant", "content": "<think>one plus one\n\nis two"
                                                          "</think> \\boxed{2}"}],
              "reward_model": {"ground_truth": "2"}}, LUFFY[0]]
    pq.write_table(pa.Table.from_pylist(luffy), tmp_path / "46k.parquet")
    pq.write_table(pa.Table.from_pylist(OPENR1), tmp_path / "openr1.parquet")
    proc = subprocess.run([sys.executable, str(TOOL), "--format", "luffy", "--input",
                           str(tmp_path / "46k.parquet"), "--output", str(tmp_path / "out.jsonl"),
                           "--second-trace", str(tmp_path / "openr1.parquet")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 2 problems got a second trace" in proc.stderr
    recs = load_records(tmp_path / "out.jsonl")
    assert [len(r.solutions) for r in recs] == [2, 1] and recs[0].solutions[1] == "ok \\boxed{2}"
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["second_trace"]["got_second"] == 1 and report["second_trace"]["unmatched"] == 1


def test_plain_jsonl_with_field_map_and_length_limit():
    rows = [{"question": "short", "final": "1", "trace": "t"}, {"question": "x" * 50, "final": "2",
                                                                "trace": "t"}]
    recs, rep = convert_rows(rows, "jsonl", {"problem": "question", "answer": "final",
                                             "solution": "trace"},
                             prompt_length=len, max_prompt_length=10)
    assert [r.problem for r in recs] == ["short"] and recs[0].solutions == ["t"]
    assert rep.skipped == {"prompt_too_long": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_save_load_round_trip(tmp_path, suffix):
    recs = [Record("p", "1", ["s1", "s2"], "i", "src"), Record("q", "2", [], None, None)]
    save_records(recs, tmp_path / f"d{suffix}")
    assert load_records(tmp_path / f"d{suffix}") == recs


def test_load_errors_name_the_row(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"problem": "p", "answer": "1"}\n{"problem": "p"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: missing, empty or non-string answer"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"problem": \n')
    with pytest.raises(ConfigError, match="bad2.jsonl:1: invalid JSON"):
        load_records(tmp_path / "bad2.jsonl")


def test_prepare_data_tool(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(OPENR1), tmp_path / "in.parquet")
    proc = subprocess.run([sys.executable, str(TOOL), "--format", "openr1", "--input",
                           str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["kept"] == 1 and report["skipped_total"] == 2
    assert len(load_records(tmp_path / "out.jsonl")) == 1
