"""The CPU layer, checked in a fresh interpreter (it changes process-wide torch state)."""
import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(r'''
    import json, threading, torch
    from megatron_trapo.platform import activate, cpu_compat_active
    r = {"active_before": cpu_compat_active(), "device": activate()}
    r["idempotent"] = activate() == "cpu" and cpu_compat_active()
    r["empty"] = torch.empty(3, device="cuda").device.type
    r["zeros_dev"] = torch.zeros(2, device=torch.device("cuda", 0)).device.type
    t = torch.ones(2)
    r["cuda_is_self"] = t.cuda() is t
    r["to_cuda"] = t.to("cuda").device.type
    r["pinned"] = torch.empty(2, pin_memory=True).is_pinned()
    r["param_type"] = torch.nn.Parameter(torch.ones(1)).type()
    r["bf16_type"] = torch.ones(1, dtype=torch.bfloat16).type()
    r["type_convert"] = str(torch.ones(1).type(torch.float64).dtype)
    r["current_device"] = str(torch.cuda.current_device())
    # Inside backward (autograd's thread, where no TorchFunctionMode is active).
    seen = {}
    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2
        @staticmethod
        def backward(ctx, g):
            seen["dev"] = str(torch.cuda.current_device())
            return torch.empty_like(g, device=torch.cuda.current_device()).fill_(3.0)
    x = torch.ones(2, requires_grad=True)
    Probe.apply(x).sum().backward()
    r["backward_device"] = seen["dev"]
    r["backward_grad"] = x.grad.tolist()
    # RNG tracker: named CPU states that fork, advance and restore the default stream.
    from megatron.core.tensor_parallel import random as mrandom
    torch.manual_seed(0)
    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = mrandom.get_cuda_rng_tracker()
    r["tracker_class"] = type(tracker).__name__
    tracker.add("a", 11)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        a1 = torch.rand(3)
    with tracker.fork("a"):
        a2 = torch.rand(3)
    r["default_untouched"] = bool(torch.equal(before, torch.get_rng_state()))
    g = torch.Generator().manual_seed(11)
    ref = torch.rand(6, generator=g)
    r["fork_stream_continues"] = bool(torch.equal(torch.cat([a1, a2]), ref))
    state = mrandom._get_cuda_rng_state()
    u = torch.rand(2)
    mrandom._set_cuda_rng_state(state)
    r["set_state_replays"] = bool(torch.equal(u, torch.rand(2)))
    ev = torch.cuda.Event(enable_timing=True); ev.record(); torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
    r["streams_ok"] = True
    print("RESULT" + json.dumps(r))
''')


@pytest.fixture(scope="module")
def probe():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
    return json.loads(line[len("RESULT"):])


def test_activation(probe):
    assert probe["active_before"] is False
    assert probe["device"] == "cpu" and probe["idempotent"]


def test_cuda_device_requests_become_cpu(probe):
    assert probe["empty"] == probe["zeros_dev"] == probe["to_cuda"] == "cpu"
    assert probe["cuda_is_self"] and probe["pinned"] is False


def test_type_names_satisfy_megatron_optimizer_checks(probe):
    assert probe["param_type"] == "torch.cuda.FloatTensor"
    assert probe["bf16_type"] == "torch.cuda.BFloat16Tensor"
    assert probe["type_convert"] == "torch.float64"  # .type(dtype) still converts


def test_current_device_is_a_device_even_in_backward(probe):
    assert probe["current_device"] == "cpu"
    assert probe["backward_device"] == "cpu"
    assert probe["backward_grad"] == [3.0, 3.0]


def test_rng_tracker_on_cpu(probe):
    assert probe["tracker_class"] == "CpuRNGStatesTracker"
    assert probe["default_untouched"]
    assert probe["fork_stream_continues"]
    assert probe["set_state_replays"]
    assert probe["streams_ok"]


def test_parent_guard_exits_a_worker_whose_torchrun_died_before_the_guard_started(monkeypatch):
    """torchrun killed while its workers were still importing: they were re-parented before the
    guard noted torchrun's pid, and ran on forever (seen as orphans after the kill/resume test)."""
    import os

    from megatron_trapo.platform import parent_guard

    exits = []
    monkeypatch.setattr(parent_guard, "_STARTED", False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code) or (_ for _ in ()).throw(
        SystemExit(code)))
    monkeypatch.setattr(os, "getppid", lambda: 1)  # init: the launcher is gone
    monkeypatch.setattr(parent_guard, "_is_torchrun", lambda pid: False)  # init is no torchrun
    with pytest.raises(SystemExit):
        parent_guard.start()
    assert exits == [1]
    monkeypatch.undo()
    assert parent_guard._is_torchrun(os.getpid()) is False  # pytest is no torchrun


def test_parent_guard_keeps_a_worker_whose_parent_is_a_wrapper_not_init(monkeypatch):
    """A user's own launcher that calls torch.distributed.run's main() is no 'torchrun' by name;
    only a worker re-parented to init is taken for an orphan."""
    import os

    from megatron_trapo.platform import parent_guard

    monkeypatch.setattr(parent_guard, "_STARTED", False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert os.getppid() != 1 and not parent_guard._is_torchrun(os.getppid())
    assert parent_guard.start(interval_s=3600) is True  # watches; did not exit
