"""--format gsm8k / math on every real row of the shipped GSM8K and MATH-500 files, and
Hugging Face dataset folders read offline through ``datasets``."""
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from megatron_trapo.config import ConfigError
from megatron_trapo.data.convert import convert_rows
from megatron_trapo.data.hf_datasets import load_hf_rows
from megatron_trapo.data.records import load_records, read_rows
from megatron_trapo.reward.math_reward import last_boxed, verify_answer

BENCH = Path(__file__).resolve().parents[3] / "megatron_trapo" / "eval" / "benchmarks"
TOOL = Path(__file__).resolve().parents[3] / "tools" / "prepare_data.py"


def test_gsm8k_rows_give_the_final_answer_and_a_boxed_rationale():
    rows = read_rows(BENCH / "gsm8k.jsonl")
    records, report = convert_rows(rows, "gsm8k")
    assert report.kept == len(rows) == 1319 and not report.skipped
    for row, rec in zip(rows, records):
        # the ground truth by hand: the last line's number after '####', commas dropped
        last = row["answer"].strip().splitlines()[-1]
        assert last.startswith("#### ") and rec.answer == last[5:].replace(",", ""), row
        sol = rec.solutions[0]
        assert "<<" not in sol and ">>" not in sol and "####" not in sol
        assert last_boxed(sol) == rec.answer  # the expert solution ends in the answer
    assert records[0].answer == "18" and records[0].solutions[0] == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer’s market.\n"
        "The answer is $\\boxed{18}$.")
    assert sum("," in row["answer"].split("####")[-1] for row in rows) == 14  # e.g. 1,000
    # the reward a correct expert solution gets, through math-verify, on a sample of rows
    assert all(verify_answer(r.solutions[0], r.answer) == 1.0 for r in records[::60])


def test_math_rows_take_the_answer_from_the_last_box():
    rows = read_rows(BENCH / "math500.jsonl")
    records, report = convert_rows(rows, "math")
    assert report.kept == len(rows) == 500
    assert [r.answer for r in records] == [row["answer"].strip() for row in rows]
    assert records[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert all(r.solutions == [row["solution"]] for r, row in zip(records, rows))


def test_rows_without_a_final_answer_are_counted_not_kept():
    _, report = convert_rows([{"question": "q", "answer": "no marker"}], "gsm8k")
    assert report.skipped == {"no_final_answer": 1}
    _, report = convert_rows([{"problem": "p", "solution": "no box"},
                              {"problem": "p", "solution": "cut \\boxed{1"}], "math")
    assert report.skipped == {"no_boxed_answer_in_solution": 2}


ROWS = [{"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
        {"question": "What is 1,000 + 200?", "answer": "1000 + 200 = <<1000+200=1200>>1200\n#### 1,200"}]


def test_prepare_data_reads_hugging_face_dataset_folders(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(
        tmp_path / "saved")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert len(load_hf_rows(str(tmp_path / "saved"), "test")) == 1
    assert load_hf_rows(str(tmp_path / "files")) == ROWS  # a folder of data files, one split
    with pytest.raises(ConfigError, match="has the splits train, test: pass --split"):
        load_hf_rows(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match="--split dev: .* has the splits train, test"):
        load_hf_rows(str(tmp_path / "saved"), "dev")
    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, str(TOOL), "--format", "gsm8k", "--input",
                           str(tmp_path / "saved"), "--split", "train", "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [(r.problem, r.answer) for r in load_records(out)] == [
        ("What is 2 + 3?", "5"), ("What is 1,000 + 200?", "1200")]
    proc = subprocess.run([sys.executable, str(TOOL), "--format", "gsm8k", "--input",
                           str(tmp_path / "saved"), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"prepare_data: error: --input {tmp_path / 'saved'} has the splits train, test: "
        "pass --split"]
