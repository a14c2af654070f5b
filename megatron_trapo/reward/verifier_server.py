"""Imported by the verifier pool's forkserver only (its preload, ``reward/math_reward.py``).

1. The server leaves the trainer's session, as the pool's workers do. A signal to the trainer's
   process group — torchrun passing SIGTERM on for a preemption — is for the trainer, which
   finishes its step and needs its verifiers for that; with the server killed, the pool breaks
   mid-step.
2. The server's ``__main__`` stands in for the trainer's. multiprocessing prepares each new
   worker by importing the parent's main module again (as ``__mp_main__``) unless the worker's
   own ``__main__`` already is that module (same spec name, or same file). For a trainer that is
   ``megatron_trapo.cli`` or the ``megatron-trapo`` script: torch, megatron-core and
   transformers, about 2 s and 200 MB per worker, none of which a verifier uses. The parent
   names its main in ``TRAINER_MAIN_ENV`` (``math_reward.VerifierPool``); nothing a verifier
   runs lives in ``__main__``, so the stand-in is never used for anything else.

The guard makes an import anywhere else (a tool that imports every module) do nothing: only the
forkserver runs as ``python -c`` with multiprocessing's forkserver module loaded."""
import importlib.machinery
import json
import os
import sys

TRAINER_MAIN_ENV = "MEGATRON_TRAPO_VERIFIER_PARENT_MAIN"


def _stand_in_for_the_parents_main() -> None:
    parent = json.loads(os.environ.get(TRAINER_MAIN_ENV) or "{}")
    main = sys.modules["__main__"]
    if parent.get("name"):
        main.__spec__ = importlib.machinery.ModuleSpec(parent["name"], None)
    if parent.get("path"):
        main.__file__ = parent["path"]


if sys.argv == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    try:
        os.setsid()
    except PermissionError:  # already a session leader
        pass
    _stand_in_for_the_parents_main()
