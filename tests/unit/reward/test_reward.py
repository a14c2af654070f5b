"""Math reward: last \\boxed{} answer, math-verify equivalence, and a hard deadline."""
import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from megatron_trapo.reward.math_reward import MathReward, last_boxed


def test_last_boxed_matches_braces():
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    assert last_boxed(r"cut \boxed{\frac{1}{2") is None


@pytest.fixture(scope="module")
def reward():
    with MathReward(num_workers=2, timeout_s=4.0) as r:
        yield r


def test_equivalence_and_last_box():
    pairs = [(r"so the answer is \boxed{0.5}", r"\frac{1}{2}"),
             (r"\boxed{3} wait, no: \boxed{4}", "4"),
             (r"\boxed{4} wait, no: \boxed{3}", "4"),
             ("The answer is 4.", "4"),  # no box, no reward (no format guessing)
             (r"\boxed{x^2+2x+1}", "(x+1)^2"),
             (r"\boxed{12}", "12")]
    with MathReward(num_workers=1, timeout_s=4.0, extraction="last_boxed") as r:
        assert r.score(pairs) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


# fidelity review D10: the three cases where the reference's extraction (math_verify.parse
# of the whole response) and the last-\boxed one disagree, worked against math-verify
DISAGREE = [("So the final answer is 5.", "5"),  # no box: the last expression counts
            (r"First \boxed{5}, then \boxed{", "5"),  # last box cut off: the earlier one
            (r"\fbox{7}", "7")]  # math-verify reads no \fbox


def test_the_default_extraction_is_the_references_whole_response(reward):
    from megatron_trapo.config import RewardConfig

    assert RewardConfig().extraction == "whole_response" == reward.extraction
    assert reward.score(DISAGREE) == [1.0, 1.0, 0.0]
    assert reward.score([(r"\boxed{x^2+2x+1}", "(x+1)^2"), (r"\boxed{12}", "12"),
                         (r"\boxed{3} wait, no: \boxed{4}", "4"), ("", "4")]) == \
        [1.0, 1.0, 0.0, 0.0]  # two boxes parse as the set {3, 4}


def test_last_boxed_extraction_is_one_setting_away():
    from megatron_trapo.config import TrainConfig, load_config

    assert load_config(TrainConfig, None, ["reward.extraction=last_boxed"]).reward.extraction \
        == "last_boxed"
    with MathReward(num_workers=1, timeout_s=4.0, extraction="last_boxed") as r:
        assert r.score(DISAGREE) == [0.0, 0.0, 1.0]


def test_pathological_answer_scores_zero_without_hanging(reward):
    t0 = time.time()
    out = reward.score([(r"\boxed{10^{10^{10}}}", "7"), (r"\boxed{7}", "7")])
    assert out == [0.0, 1.0]
    assert time.time() - t0 < 10


def test_verifier_processes_start_small_and_outside_the_trainers_session(reward):
    """The pool's processes come from a forkserver, not forked from the caller (a forked worker
    keeps the trainer's pages), and neither the server nor the workers are in the caller's
    session: a signal to the trainer's process group (torchrun's SIGTERM on preemption) must
    not break the pool in the middle of the step the trainer is finishing."""
    assert reward.score([(r"\boxed{1}", "1")]) == [1.0]  # workers up
    mine = os.getsid(0)
    verifiers = [p for p in psutil.Process().children(recursive=True)
                 if "resource_tracker" not in " ".join(p.cmdline())]  # it ignores SIGTERM
    assert len(verifiers) >= 3  # the forkserver and the two workers
    assert all("multiprocessing.forkserver" in " ".join(p.cmdline()) for p in verifiers)
    assert all(os.getsid(p.pid) != mine for p in verifiers)


HEAVY_MAIN = textwrap.dedent("""
    import json, psutil, torch  # torch stands for the trainer's main: megatron_trapo.cli
    from megatron_trapo.reward.math_reward import VerifierPool, math_verify_equal

    if __name__ == "__main__":
        pool = VerifierPool(num_workers=2)
        assert pool.map(math_verify_equal, [("1", "1")] * 4, str) == [True] * 4
        maps = []
        for p in psutil.Process().children(recursive=True):
            try:  # a process that ends meanwhile (seen once on a loaded machine) is skipped
                if "resource_tracker" not in " ".join(p.cmdline()):
                    maps.append([m.path for m in p.memory_maps() if "libtorch" in m.path])
            except psutil.NoSuchProcess:
                pass
        print(json.dumps(maps))
        pool.close()
""")


@pytest.mark.parametrize("how", ["path", "module"])
def test_verifier_workers_do_not_import_the_trainers_main_again(tmp_path, how):
    """multiprocessing prepares a new worker by importing the parent's main module again; for the
    trainer that is the CLI with torch and megatron-core (~2 s and ~200 MB per worker). Under a
    main that imports torch, run as a file and as ``-m``, no verifier process maps libtorch."""
    (tmp_path / "heavy_main.py").write_text(HEAVY_MAIN)
    argv = [str(tmp_path / "heavy_main.py")] if how == "path" else ["-m", "heavy_main"]
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    maps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(maps) >= 3  # the forkserver and two workers
    assert maps == [[]] * len(maps), maps
