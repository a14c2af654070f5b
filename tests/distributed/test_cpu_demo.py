"""The README's main job in its --quick form: every stage runs, the table, the paired
comparison and both figures are written, and the numbers show training did something."""
import json
import subprocess
import sys

LEVELS = {f"synthetic-{k}step" for k in range(1, 6)}
# The quick base after its 500 SFT steps (measured with values in 0..20 and four-step
# problems in the mixture: held-out accuracy 26% from 0 at step 0; the mean SFT loss of the
# last 50 steps 0.19, of the first 50 2.26). A broken loss, optimizer or data path leaves the
# accuracy at 0 and the loss near ln(vocab) = 5.9.
BASE_LEARNED = 0.13  # half the measured 26%
BASE_LOSS = 0.3


def _rows(out, run):
    path = out / "runs" / run / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cpu_demo_quick(tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.run([sys.executable, "-m", "megatron_trapo.cpu_demo.compare", "--out",
                           str(out), "--quick"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"base", "grpo", "trapo"}
    for entry in results.values():
        assert len(entry["accuracy"]) == 1 and 0.0 <= entry["accuracy"][0] <= 1.0
        assert set(entry["by_level"][0]) == LEVELS
    md = (out / "results.md").read_text()
    assert "| trapo |" in md and "| TRAPO − method |" in md and "commit `" in md
    for png in ("accuracy.png", "training.png"):
        assert (out / png).stat().st_size > 10_000

    base_evals = [r for r in _rows(out, "base") if "eval/accuracy" in r]
    # one evaluation, after its last step (none of the random weights it starts from)
    assert [r["step"] for r in base_evals] == [500]
    assert base_evals[-1]["eval/accuracy"] >= BASE_LEARNED  # the base learned the task
    losses = [r["loss"] for r in _rows(out, "base") if "loss" in r]
    assert len(losses) == 500 and sum(losses[-50:]) / 50 < BASE_LOSS < sum(losses[:50]) / 50
    # the methods start from the base: their first evaluation is the base's last
    for method in ("grpo", "trapo"):
        rows = _rows(out, f"{method}_seed1")
        first = next(r for r in rows if "eval/accuracy" in r)
        assert first["eval/accuracy"] == base_evals[-1]["eval/accuracy"]
        trained = [r for r in rows if "loss" in r]
        assert len(trained) == 10 and all(r["pg/tokens"] > 0 for r in trained)
        # some groups' free rollouts disagree: the policy gradient had something to follow
        assert any(r["rollout/prompts_with_signal"] > 0 for r in trained)
        # the free-rollout reward per difficulty (what the equal-weight curve is made of)
        per_level = [v for r in trained for k, v in r.items()
                     if k.startswith("rollout/reward_unguided/synthetic-")]
        assert len(per_level) >= 10 and all(0.0 <= v <= 1.0 for v in per_level)
        samples = (out / "runs" / f"{method}_seed1" / "logs" / "eval_samples.jsonl")
        assert len(samples.read_text().splitlines()) == 3 * 100  # steps 0, 5, 10 × 100
    trapo = [r for r in _rows(out, "trapo_seed1") if "loss" in r]
    assert any(r["rollout/guided_fraction"] > 0 for r in trapo)  # guidance happened
    assert any(r["expert/tokens"] > 0 for r in trapo)
    assert any("rollout/guided_share/level1" in r for r in trapo)
