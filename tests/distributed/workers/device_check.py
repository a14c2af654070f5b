"""The fake-CUDA dry run (one process): a TRAPO forward/backward, packed and padded, and the
smoke job's step, with every tensor on a fake GPU; then the same with the micro-batch move
switched off (what the trainer did before it had one), which must raise a device mismatch."""
from __future__ import annotations

import os

import torch

from results import DeviceCheck, DeviceReport, MegatronKnobs, to_json

from megatron_trapo.config import ParallelConfig, SmokeConfig
from megatron_trapo.platform import quiet_known_warnings
from megatron_trapo.platform.distributed import initialize_distributed
from megatron_trapo.platform.fake_cuda import fake_cuda
from megatron_trapo.train import batch as batch_module
from megatron_trapo.train import device_check, smoke

# fake tensors hold no data; packed sequences in THD read cu_seqlens on the host (megatron's
# RoPE, the SDPA attention), so the fake-device runs take megatron's masked attention
FAKE_TENSOR_ATTENTION = "local"


def smoke_step(move: bool) -> list:
    """The smoke job's micro-batches and loss through megatron's schedule on the device."""
    from megatron_trapo.models.provider import build_model
    from megatron_trapo.train.forward_backward import run_forward_backward
    from megatron_trapo.train.lm_loss import lm_forward_step
    from megatron_trapo.train.optimizer import wrap_ddp

    cfg = SmokeConfig(seq_length=16, micro_batch_size=2, num_microbatches=2)
    cpu_mbs = smoke.progression_batch(0, 0, cfg)
    with fake_cuda():
        chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, perform_initialization=False),
                          use_distributed_optimizer=False,
                          check_for_nan_in_grad=False)
        mbs = [batch_module.to_device(mb) if move else mb for mb in cpu_mbs]
        out = run_forward_backward(chunks, mbs, lm_forward_step, cfg.seq_length,
                                   cfg.micro_batch_size)
        return sorted({v.device.type for o in out for v in o.values()})


def knobs() -> MegatronKnobs:
    """Megatron's memory/overlap flags reach DDP; rank 0's waits use the gloo host group."""
    from megatron_trapo.config import OptimizerConfig
    from megatron_trapo.models.provider import build_model
    from megatron_trapo.platform.distributed import host_group
    from megatron_trapo.train.optimizer import build_training_state

    cfg = OptimizerConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                          overlap_param_gather=True, ddp_bucket_size=4096,
                          check_for_nan_in_grad=True)
    ddp, _, _ = build_training_state(build_model(device_check.MODEL, ParallelConfig()), cfg, 10)
    dc = ddp[0].ddp_config
    return MegatronKnobs(ddp=[dc.overlap_grad_reduce, dc.overlap_param_gather, dc.bucket_size,
                              dc.check_for_nan_in_grad, dc.use_distributed_optimizer],
                         host_group_backend=torch.distributed.get_backend(host_group()),
                         host_group_timeout_s=_timeout_s(host_group()),
                         default_group_timeout_s=_timeout_s(None))


def _timeout_s(group) -> float:
    pg = group or torch.distributed.distributed_c10d._get_default_group()
    return pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def expect_mismatch(fn) -> str:
    try:
        fn()
    except Exception as exc:  # the dry run's verdict: which error, raised where
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return "no error"


def main():
    quiet_known_warnings()
    initialize_distributed(ParallelConfig(rollout_wait_timeout_minutes=123), device_check.MODEL)
    cases = {}
    for packed in (False, True):
        for mode in ("trapo", "luffy", "grpo", "sft"):
            cases[f"{mode}:{'packed' if packed else 'padded'}"] = DeviceReport(
                **device_check.run_device_check(packed, mode, on_device=fake_cuda,
                                                 attention_backend=FAKE_TENSOR_ATTENTION))
    r = DeviceCheck(cases=cases, smoke_metrics=smoke_step(move=True), knobs=knobs(), unmoved={})
    # before the fix nothing moved a micro-batch: the same run must fail
    identity = lambda mb, device=None: mb  # noqa: E731
    # patched where the device check looks it up (it imports the name from train/batch.py)
    device_check_to_device = device_check.to_device
    device_check.to_device = identity
    try:
        r.unmoved["padded"] = expect_mismatch(
            lambda: device_check.run_device_check(False, "trapo", on_device=fake_cuda,
                                               attention_backend=FAKE_TENSOR_ATTENTION))
        r.unmoved["packed"] = expect_mismatch(
            lambda: device_check.run_device_check(True, "trapo", on_device=fake_cuda,
                                               attention_backend=FAKE_TENSOR_ATTENTION))
        r.unmoved["smoke"] = expect_mismatch(lambda: smoke_step(move=False))
    finally:
        device_check.to_device = device_check_to_device
    with open(os.environ["TRAPO_TEST_OUT"], "w") as f:
        f.write(to_json(r))


if __name__ == "__main__":
    main()
