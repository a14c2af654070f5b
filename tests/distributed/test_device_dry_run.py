"""The fake-CUDA dry run in CI: a TRAPO step's tensors (micro-batches, masks, advantages,
old/rollout logprobs, cu_seqlens, metrics, gradients) and the smoke job's must all live on
the model's device; the same run without the micro-batch move — the trainer before it had
one — must raise a device mismatch, so this test can fail on the bug it guards."""
from launch import run_worker
from workers.results import DeviceCheck


def test_every_tensor_of_a_step_lives_on_the_device(tmp_path):
    r = run_worker("device_check.py", 1, tmp_path, timeout=600, result=DeviceCheck)
    for mode in ("trapo", "luffy", "grpo", "sft"):
        for layout in ("padded", "packed"):
            rep = r.cases[f"{mode}:{layout}"]
            for field in ("batch_fields", "old_logprobs", "metrics", "params", "main_grads"):
                assert getattr(rep, field) == ["fakegpu"], (mode, layout, field, rep)
            assert rep.microbatches > 1
            if layout == "packed":
                assert rep.cu_seqlens == ["fakegpu:torch.int32"]
        if mode != "sft":  # the policy-gradient metrics were computed on the device too
            assert "pg/ratio_max" in r.cases[f"{mode}:padded"].loss_metric_names
    assert "expert/outside_trust_region" in r.cases["trapo:packed"].loss_metric_names
    assert r.smoke_metrics == ["fakegpu"]
    assert r.knobs.ddp == [True, True, 4096, True, True]  # optimizer.* reach megatron's DDP
    assert r.knobs.host_group_backend == "gloo"  # rank 0's long waits: not under NCCL
    # ... and not under the default group's 30-minute timeout either
    assert r.knobs.host_group_timeout_s == 123 * 60
    assert r.knobs.default_group_timeout_s == 30 * 60
    for case in ("padded", "packed", "smoke"):
        verdict = r.unmoved[case]
        assert verdict.startswith("FakeTensorDeviceMismatchError"), (case, verdict)
        assert "fakegpu:0 and cpu" in verdict


def test_the_gpu_smoke_script_runs_through_on_a_cpu(tmp_path):
    """scripts/gpu_smoke.sh is what a lent GPU runs, once, with minutes to spare: its training
    part imported a helper the demo had since dropped (it would have stopped at step 2 on the
    GPU). On the CPU (GPU_SMOKE_ALLOW_CPU=1) the script must run through: a TRAPO step and a
    step with FP8 rollouts whose gap it prints (its device check is the test above's)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_smoke.sh")], cwd=root,
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, GPU_SMOKE_ALLOW_CPU="1", GPU_SMOKE_ITERS="1",
                                   GPU_SMOKE_SKIP_DEVICE_CHECK="1",
                                   GPU_SMOKE_OUT=str(tmp_path / "smoke")))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "gpu smoke: trapo 1 steps OK" in out
    assert "gpu smoke: trapo_fp8_rollouts 1 steps OK" in out
    assert "rollout_logprob_gap" in out and "tis_weight_mean" in out
