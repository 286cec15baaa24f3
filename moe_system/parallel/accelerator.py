"""A CPU accelerator under which Colossal-AI's real ZeRO and pipeline code runs on gloo.

Colossal-AI 0.5.0's CpuAccelerator raises in Stream/current_stream/synchronize/device_count, and its ZeRO
optimizer asserts a CUDA-named accelerator (docs/colossalai.md, Running on CPU). CPU work is synchronous, so a stream
is just torch.cpu's, synchronising is a no-op, and the device count is one. Used only when no GPU is present.
"""

import torch
import torch.distributed as dist
from colossalai.accelerator import CpuAccelerator, set_accelerator


class CpuZeroAccelerator(CpuAccelerator):
    def __init__(self):
        super().__init__()
        # LowLevelZeroOptimizer._sanity_checks requires the name "cuda" (zero/low_level/low_level_optim.py:254).
        self._name = "cuda"

    def Stream(self, *args, **kwargs):
        return torch.cpu.Stream()

    def current_stream(self, *args, **kwargs):
        return torch.cpu.current_stream()

    def stream(self, stream):
        return torch.cpu.stream(stream)

    def synchronize(self, device=None):
        return None

    def device_count(self):
        return 1

    def current_device(self):
        return 0

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def empty_cache(self):
        return None


def install_cpu_support() -> bool:
    """Make Colossal-AI usable on a machine without a GPU; returns True when the CPU path was installed."""
    if not hasattr(dist, "is_hccl_available"):
        # pipeline/p2p.py:159 calls it whenever NCCL is unavailable; upstream torch only has it with torch_npu.
        dist.is_hccl_available = lambda: False
    if torch.cuda.is_available():
        return False
    set_accelerator(CpuZeroAccelerator())
    return True
