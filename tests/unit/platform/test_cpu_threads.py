"""OpenMP teams stay on the main thread (platform/cpu_threads.py).

Each case runs in a fresh interpreter: the thread counts are process-wide state. A long-lived
helper thread (as gloo's are) runs a copy far above torch's grain size; libgomp starts a team
for it unless its thread count is 1, and a team shows as an extra OS thread that outlives the
copy. The main thread must keep its threads for OpenMP and for MKL's GEMMs."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, json, os, sys, threading
import torch
from megatron_trapo.platform import cpu_threads
confine = sys.argv[1] == "confine"
got = cpu_threads.confine_openmp_to_main_thread(2) if confine else None
torch.set_num_threads(2) if not confine else None
torch.ones(1 << 20).add_(1)  # the main thread's team exists before we count
done, go = threading.Event(), threading.Event()
seen = {}
def helper():
    seen["threads_in_helper"] = torch.get_num_threads()
    big = torch.empty(1 << 22)
    big.copy_(torch.ones(1 << 22))  # parallel_for over 4M elements: a team if allowed
    done.set()
    go.wait()  # stay alive, as gloo's threads do
before = len(os.listdir("/proc/self/task"))
t = threading.Thread(target=helper, daemon=True)
t.start()
done.wait()
extra = len(os.listdir("/proc/self/task")) - before - 1  # minus the helper itself
mkl = ctypes.CDLL(cpu_threads._loaded_library("libtorch_cpu"))
print(json.dumps({"returned": got, "main": torch.get_num_threads(),
                  "main_mkl": mkl.mkl_get_max_threads(), "helper": seen["threads_in_helper"],
                  "extra_threads": extra}))
go.set()
t.join()  # a helper still inside torch when the interpreter exits aborts it
"""


def _run(mode):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def knobs():
    from megatron_trapo.platform import cpu_threads

    if cpu_threads._knobs() is None:
        pytest.skip("torch here is not libgomp + MKL: the policy does not apply")


def test_without_the_policy_a_helper_thread_starts_a_team(knobs):
    # the bug the policy guards against, shown on this machine: one extra OpenMP worker
    plain = _run("plain")
    assert plain["helper"] == 2 and plain["extra_threads"] == 1, plain


def test_with_the_policy_only_the_main_thread_has_a_team(knobs):
    confined = _run("confine")
    assert confined["returned"] == 2
    assert confined["helper"] == 1 and confined["extra_threads"] == 0, confined
    assert confined["main"] == 2 and confined["main_mkl"] == 2, confined  # GEMMs keep 2


def test_refuses_other_threads():
    import threading

    from megatron_trapo.platform.cpu_threads import confine_openmp_to_main_thread

    errors = []

    def call():
        try:
            confine_openmp_to_main_thread(2)
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=call)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]
