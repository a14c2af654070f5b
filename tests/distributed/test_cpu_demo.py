"""The README's main job in its --quick form: every stage runs and the table is written."""
import json
import subprocess
import sys


def test_cpu_demo_quick(tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.run([sys.executable, "-m", "megatron_trapo.cpu_demo.compare", "--out",
                           str(out), "--quick"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"base", "sft", "grpo", "trapo", "trapo_plain_sft"}
    assert all(0.0 <= a <= 1.0 for accs in results.values() for a in accs)
    assert "| trapo |" in (out / "results.md").read_text()
    assert (out / "curves.png").stat().st_size > 10_000
    for method in ("grpo", "trapo"):
        rows = [json.loads(l) for l in
                (out / "runs" / f"{method}_seed1" / "logs" / "metrics.jsonl").read_text().splitlines()]
        trained = [r for r in rows if "loss" in r]
        assert len(trained) == 6 and all(r["pg/tokens"] > 0 for r in trained)
        if method == "trapo":
            assert any(r["rollout/guided_fraction"] > 0 for r in trained)  # guidance happened
            assert any(r["expert/tokens"] > 0 for r in trained)
