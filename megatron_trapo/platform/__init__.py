"""Where the code meets the hardware: the CPU layer for megatron-core and process groups."""
from megatron_trapo.platform.cpu_compat import activate_cpu_compat, cpu_compat_active


def activate() -> str:
    """The one activation point. Returns the device type training will use ("cuda" or "cpu")."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    activate_cpu_compat()
    return "cpu"


__all__ = ["activate", "activate_cpu_compat", "cpu_compat_active"]
