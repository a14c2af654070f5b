"""Imported by the verifier pool's forkserver only (its preload, ``reward/math_reward.py``): the
server leaves the trainer's session, as the pool's workers do. A signal to the trainer's process
group — torchrun passing SIGTERM on for a preemption — is for the trainer, which finishes its
step and needs its verifiers for that; with the server killed, the pool breaks mid-step.

The guard makes an import anywhere else (a tool that imports every module) do nothing: only the
forkserver runs as ``python -c`` with multiprocessing's forkserver module loaded."""
import os
import sys

if sys.argv == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    try:
        os.setsid()
    except PermissionError:  # already a session leader
        pass
