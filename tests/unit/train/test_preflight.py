"""The training preflight: every bad input of the robustness probes found before any model is
built, in one line naming the file, row (1-based line) or field; bad rows skipped and counted
(or refused with data.strict); runs never overwritten; the metrics log continues at a resume."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from rollout_models import tiny_qwen2

from megatron_trapo.config import ConfigError, TrainConfig, load_config
from megatron_trapo.metrics import continue_log
from megatron_trapo.train.preflight import check_all_data, check_paths, load_tokenizer

GOOD = {"problem": "What is 2 plus 2?", "answer": "4", "solutions": ["2 + 2 = 4. \\boxed{4}"]}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tiny_qwen2(tmp_path_factory.mktemp("tok") / "m", max_positions=256)


def write(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


def cfg(tmp_path, tok_dir, data, *extra):
    return load_config(TrainConfig, None, [f"train_data={data}", f"rollout.tokenizer_path={tok_dir}",
                                           f"log_dir={tmp_path / 'logs'}", *extra])


def check(tmp_path, tok_dir, rows, *extra):
    c = cfg(tmp_path, tok_dir, write(tmp_path / "d.jsonl", rows), *extra)
    return check_all_data(c, load_tokenizer(c), 256)


def test_bad_rows_are_skipped_and_reported_by_line(tmp_path, tok_dir):
    rows = [GOOD, {"problem": "no answer"}, GOOD, b'{"problem": "cut off\n', GOOD,
            b'{"problem": "\xff\xfe", "answer": "1"}\n', {**GOOD, "solutions": []},
            {**GOOD, "problem": "word " * 400}, [1, 2]]
    train, _, reports = check(tmp_path, tok_dir, rows)
    rep = reports["train"]
    assert len(train) == rep.kept == 3
    assert rep.skipped == {
        "missing, empty or non-string answer": [2],
        "invalid JSON (Invalid control character at)": [4],
        "not UTF-8 (byte 13)": [6],
        "without an expert solution (loss_mode=trapo needs one)": [7],
        "with a prompt over data.max_prompt_tokens=1024": [8],
        "a JSON list, not an object": [9]}
    summary = rep.summary()
    assert summary.startswith(f"{tmp_path / 'd.jsonl'}: 3 row(s) kept, 6 skipped: ")
    assert "(line 7)" in summary
    assert rep.metrics("train") == {"data/train_rows_kept": 3.0, "data/train_rows_skipped": 6.0}


@pytest.mark.parametrize("mode, kept", [("sft", 1), ("luffy", 1), ("trapo", 1), ("grpo", 2)])
def test_empty_solutions_per_method(tmp_path, tok_dir, mode, kept):
    train, _, rep = check(tmp_path, tok_dir, [GOOD, {**GOOD, "solutions": []}],
                          f"loss.loss_mode={mode}")
    assert len(train) == kept  # the methods built from an expert solution skip the row


def test_trapo_without_any_expert_solution_is_an_error_not_silent_grpo(tmp_path, tok_dir):
    with pytest.raises(ConfigError, match=r"train_data=.*: no usable row.*without an expert "
                                          r"solution \(loss_mode=trapo needs one\) \(lines 1, 2\)"):
        check(tmp_path, tok_dir, [{**GOOD, "solutions": []}] * 2)


def test_prompt_beyond_the_model_positions_is_skipped_for_sft_too(tmp_path, tok_dir):
    long = {**GOOD, "problem": "word " * 300}  # over the model's 256 positions
    for mode in ("grpo", "sft"):
        train, _, rep = check(tmp_path, tok_dir, [GOOD, long], f"loss.loss_mode={mode}",
                              "data.max_prompt_tokens=null")
        assert len(train) == 1
        assert rep["train"].skipped == {
            "with a prompt that does not fit the model's 256 positions": [2]}


def test_strict_refuses_instead_of_skipping(tmp_path, tok_dir):
    with pytest.raises(ConfigError, match=r"data.strict=true and .*1 skipped: 1 missing, empty "
                                          r"or non-string answer \(line 2\)"):
        check(tmp_path, tok_dir, [GOOD, {"problem": "p"}], "data.strict=true")


def test_empty_and_missing_files(tmp_path, tok_dir):
    with pytest.raises(ConfigError, match="no usable row"):
        check(tmp_path, tok_dir, [])
    c = cfg(tmp_path, tok_dir, tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"train_data=.*nope.jsonl: no such file"):
        check_all_data(c, load_tokenizer(c), 256)


def test_paths_that_cannot_work_are_found_first(tmp_path, tok_dir):
    data = write(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ConfigError, match=r"checkpoint.save=/proc/xyz: cannot write there"):
        check_paths(cfg(tmp_path, tok_dir, data, "checkpoint.save=/proc/xyz"), False, False)
    with pytest.raises(ConfigError, match=r"log_dir=/proc/xyz/logs: cannot write there"):
        check_paths(cfg(tmp_path, tok_dir, data, "log_dir=/proc/xyz/logs"), False, False)
    with pytest.raises(ConfigError, match=r"rollout.tokenizer_path=.*no_such_tok: no such folder"):
        load_tokenizer(cfg(tmp_path, tmp_path / "no_such_tok", data))
    fake = tmp_path / "fakeckpt"
    fake.mkdir()
    (fake / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ConfigError, match=r"load=.*fakeckpt: not a readable checkpoint .*iter_0000005"):
        check_paths(cfg(tmp_path, tok_dir, data, f"load={fake}"), False, False)
    (fake / "latest_checkpointed_iteration.txt").write_text("abc")
    with pytest.raises(ConfigError, match="does not hold an iteration number"):
        check_paths(cfg(tmp_path, tok_dir, data, f"load={fake}"), False, False)


def test_a_finished_run_is_not_overwritten(tmp_path, tok_dir):
    data = write(tmp_path / "d.jsonl", [GOOD])
    save = tmp_path / "ckpt"
    (save / "iter_0000008").mkdir(parents=True)
    (save / "latest_checkpointed_iteration.txt").write_text("8")
    c = cfg(tmp_path, tok_dir, data, f"checkpoint.save={save}")
    with pytest.raises(ConfigError, match=r"holds a run \(latest iteration 8\): pass --resume"):
        check_paths(c, resume=False, overwrite=False)
    check_paths(c, resume=True, overwrite=False)  # continuing it is fine
    assert (save / "iter_0000008").is_dir()
    check_paths(c, resume=False, overwrite=True)  # starting over removes the old run
    assert not (save / "iter_0000008").exists()
    assert not (save / "latest_checkpointed_iteration.txt").exists()


def test_metrics_log_continues_at_the_resumed_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in (0, 1, 2, 3, 4))
                   + '{"step": 5, "lo')  # a row cut off by the kill
    continue_log(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2, 3]
    continue_log(log, 0)  # a fresh run: the old log is kept aside, not appended to
    assert not log.exists() and (tmp_path / "metrics.1.jsonl").is_file()


def test_cli_reports_a_bad_tokenizer_in_one_line_before_building_anything(tmp_path, tok_dir):
    data = write(tmp_path / "d.jsonl", [GOOD])
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "megatron_trapo.cli", "train",
                           f"train_data={data}", f"rollout.tokenizer_path={tmp_path / 'nope'}",
                           f"log_dir={tmp_path / 'logs'}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"megatron-trapo: error: rollout.tokenizer_path={tmp_path / 'nope'}: no such "
                     "folder (tokenizers are read from local folders; nothing is downloaded)"]
    assert time.time() - t0 < 60


def test_sft_skips_a_solution_longer_than_the_model(tmp_path, tok_dir):
    long = {**GOOD, "solutions": ["step " * 300]}
    train, _, rep = check(tmp_path, tok_dir, [GOOD, long], "loss.loss_mode=sft")
    assert len(train) == 1 and list(rep["train"].skipped) == [
        "whose prompt + expert solution exceed the model's positions or "
        "batching.max_tokens_per_microbatch"]
    # within the response budget the solution is cut to it instead (D5): the row is kept
    train, _, _ = check(tmp_path, tok_dir, [GOOD, long], "loss.loss_mode=sft",
                        "loss.max_response_length=96")
    assert len(train) == 2
    train, _, _ = check(tmp_path, tok_dir, [GOOD, long], "loss.loss_mode=trapo")
    assert len(train) == 2  # TRAPO cuts prefixes to the response budget: the row is usable


def test_every_rank_refuses_in_one_whole_line_without_a_traceback(tmp_path, tok_dir):
    """Each rank runs the preflight and exits with code 2 and the same one-line message before
    any process group forms: no rank is left waiting for a peer (the probes saw ~60 lines of
    gloo tracebacks from rank 1) and no line is cut into another.

    Each rank is first run alone, with WORLD_SIZE=2 and a rendezvous port nobody serves: had it
    formed a group first it would wait for its peer instead of answering. Then both under
    torchrun, which stops the other worker (SIGTERM) as soon as one has exited; which rank
    prints first is a race, so there every error line must be whole and the same, and each
    rank must have exited with 2 or been stopped by torchrun."""
    data = write(tmp_path / "d.jsonl", [{**GOOD, "solutions": []}] * 3)
    args = ["-m", "megatron_trapo.cli", "train", f"train_data={data}",
            f"rollout.tokenizer_path={tok_dir}", "loss.loss_mode=trapo",
            f"log_dir={tmp_path / 'logs'}"]
    expected = None
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        alone = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                               timeout=120, env=env)
        lines = [line for line in alone.stderr.splitlines() if line.strip()]
        assert alone.returncode == 2 and len(lines) == 1, (rank, alone.returncode, lines)
        assert lines[0].startswith("megatron-trapo: error: train_data=") and \
            "without an expert solution (loss_mode=trapo needs one) (lines 1, 2, 3)" in lines[0]
        assert expected in (None, lines[0])
        expected = lines[0]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", *args], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "megatron-trapo: error:" in line]
    assert 1 <= len(ours) <= 2 and set(ours) == {expected}, ours
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)  # torchrun's summary
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert "gloo" not in proc.stderr.lower() and "megatron_trapo/" not in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, text", [
    (["loss.loss_mode=trapo"], "reasoning"), (["loss.loss_mode=luffy"], "full"),
    (["loss.loss_mode=sft"], "full"), (["loss.loss_mode=sft_then_rl"], "full"),
    (["loss.loss_mode=trapo", "data.expert_text=full"], "full"),
    (["loss.loss_mode=luffy", "data.expert_text=reasoning"], "reasoning")])
def test_each_method_trains_on_its_own_text_of_the_expert_solution(tmp_path, tok_dir, extra, text):
    """LUFFY's off-policy samples and SFT are the full target (reasoning, </think> and the
    final solution); TRAPO's prefixes are cut from the reasoning — before, every method got
    the reasoning only, cut at conversion (fidelity review D4)."""
    full = "<think>two plus two</think> So the answer is \\boxed{4}."
    train, _, _ = check(tmp_path, tok_dir, [{**GOOD, "solutions": [full]}], *extra)
    tok = load_tokenizer(cfg(tmp_path, tok_dir, tmp_path / "d.jsonl"))
    decoded = tok.decode(train[0].traces[0])
    assert decoded == (full if text == "full" else "two plus two")


def test_prompt_template_renders_the_training_prompts(tmp_path, tok_dir):
    """data.prompt_template reaches the encoded prompts (the default is the chat template
    with the system line and the paper's instruction)."""
    tok = load_tokenizer(cfg(tmp_path, tok_dir, write(tmp_path / "d.jsonl", [GOOD])))
    default, _, _ = check(tmp_path, tok_dir, [GOOD])
    plain, _, _ = check(tmp_path, tok_dir, [GOOD], 'data.prompt_template="Q: {problem}\\n"')
    assert tok.decode(plain[0].prompt_ids) == "Q: What is 2 plus 2?\n"
    text = tok.decode(default[0].prompt_ids)
    assert "You are a helpful assistant." in text and "\\boxed{}" in text
    bare, _, _ = check(tmp_path, tok_dir, [GOOD], "data.system_prompt=null")
    assert "You are a helpful assistant." not in tok.decode(bare[0].prompt_ids)


def test_a_template_without_the_problem_is_refused_by_name(tmp_path, tok_dir):
    with pytest.raises(ConfigError, match="data.prompt_template"):
        cfg(tmp_path, tok_dir, write(tmp_path / "d.jsonl", [GOOD]), "data.prompt_template=Q:")
