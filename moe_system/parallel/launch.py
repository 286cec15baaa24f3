"""Joining the process world, before anything parallel is built.

Colossal-AI's pipeline needs torch.distributed.is_hccl_available (pipeline/p2p.py:159, colossalai 0.5.0) and
its ZeRO a CUDA-named accelerator: without a GPU, accelerator.install_cpu_support provides both.
"""

import os

import colossalai

from .accelerator import install_cpu_support
from .ports import free_port


def init_distributed(seed: int) -> None:
    """Join the torchrun/colossalai-run world, or make a one-process world when started as `python train.py`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    install_cpu_support()
    colossalai.launch_from_torch(seed=seed, verbose=False)
