"""Workers exit when their launcher dies.

torchrun starts its workers in their own sessions (``start_new_session=True``), so killing
torchrun, or its process group, leaves them running — still training, still writing
checkpoints, next to the run a user then resumes. A daemon thread here notices that the parent
process is gone (the worker was re-parented) and ends the worker. Polling ``getppid`` rather
than ``prctl(PR_SET_PDEATHSIG)``: the latter fires when the *thread* that forked the worker
exits, which torchrun's process handlers do not promise to outlive.
"""
from __future__ import annotations

import logging
import os
import threading
import time

logger = logging.getLogger(__name__)
_STARTED = False


def start(interval_s: float = 1.0) -> bool:
    """Watch the parent from now on (once per process); False when not under a launcher."""
    global _STARTED
    if _STARTED or "LOCAL_RANK" not in os.environ:
        return False
    parent = os.getppid()
    if "TORCHELASTIC_RUN_ID" in os.environ and parent == 1 and not _is_torchrun(parent):
        # torchrun died while this worker was still starting: it was re-parented to init before
        # the guard could note torchrun's pid, so a change would never be seen. Only init counts
        # as proof: a user's own wrapper around torch.distributed.run's main() is a fine parent,
        # and torchrun may itself be pid 1 (a container's entrypoint).
        print(f"megatron-trapo: the launcher is gone (parent is pid {parent}); rank "
              f"{os.environ.get('RANK', '?')} exits", flush=True)
        os._exit(1)

    def watch():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                logger.error("the launcher (pid %d) is gone: this worker stops too", parent)
                print(f"megatron-trapo: the launcher (pid {parent}) is gone; rank "
                      f"{os.environ.get('RANK', '?')} exits", flush=True)
                os._exit(1)  # no cleanup that could block on peers that are gone as well

    threading.Thread(target=watch, name="parent-guard", daemon=True).start()
    _STARTED = True
    return True


def _is_torchrun(pid: int) -> bool:
    """Whether ``pid`` is a torchrun launcher (``torchrun`` or ``python -m torch.distributed.run``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc (not Linux): cannot tell, trust the parent
    return "torch.distributed.run" in cmd or "torchrun" in cmd
