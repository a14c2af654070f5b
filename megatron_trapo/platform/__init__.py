"""Where the code meets the hardware: the CPU layer for megatron-core and process groups."""
import warnings

import torch

from megatron_trapo.platform.cpu_compat import activate_cpu_compat, cpu_compat_active


def activate() -> str:
    """The one activation point. Returns the device type training will use ("cuda" or "cpu")."""
    if torch.cuda.is_available():
        return "cuda"
    activate_cpu_compat()
    return "cpu"


def compute_device():
    """Where the model and every tensor of a training step live: this process's CUDA device
    (set from LOCAL_RANK by ``initialize_distributed``), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def quiet_known_warnings() -> None:
    """Silence megatron-core's import-time notices that only say TE/apex are absent."""
    for pattern in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                    "full scope is deprecated", ".*deprecating ShardedTensor",
                    ".*`load_state_dict` is deprecated",
                    ".*`torch.distributed.reduce_scatter_tensor` is deprecated",
                    ".*`torch.distributed.all_gather_into_tensor` is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)


__all__ = ["activate", "compute_device", "activate_cpu_compat", "cpu_compat_active", "quiet_known_warnings"]
