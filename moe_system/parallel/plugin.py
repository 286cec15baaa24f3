"""Booster layer: turns train.py's --plugin/--zero_stage/--precision into a configured Colossal-AI plugin.

This first version covers one process (the embedded CPU demo); the expert-parallel layouts land with issue 3.
"""

import os
import socket
from dataclasses import dataclass

import colossalai
import torch
import torch.distributed as dist
from colossalai.booster.plugin import MoeHybridParallelPlugin

from .accelerator import install_cpu_support
from .policy import OpenMoePolicy


@dataclass
class Layout:
    world: int
    pp: int = 1
    ep: int = 1
    moe_dp: int = 1

    @property
    def dp_size(self) -> int:
        return self.world // self.pp

    def describe(self) -> str:
        return f"{self.world} process(es): pp={self.pp} ep={self.ep} expert-dp={self.moe_dp} dp={self.dp_size}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(seed: int) -> None:
    """Join the torchrun/colossalai-run world, or make a one-process world when started as `python train.py`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    install_cpu_support()
    colossalai.launch_from_torch(seed=seed, verbose=False)


def build_plugin(args):
    world = dist.get_world_size()
    if world != 1:
        raise SystemExit(f"{world} processes: the expert-parallel layouts are not yet available; run one process")
    precision = args.precision or ("bf16" if torch.cuda.is_available() else "fp32")
    zero_stage = 0 if args.zero_stage is None else args.zero_stage
    if zero_stage > 0 and precision == "fp32":
        raise SystemExit("ZeRO (--zero_stage 1/2) keeps fp32 master weights of a bf16/fp16 model: "
                         "use --precision bf16 or fp16, or --zero_stage 0")
    plugin = MoeHybridParallelPlugin(tp_size=1, pp_size=1, ep_size=1, zero_stage=zero_stage, precision=precision,
                                     max_norm=args.max_grad_norm, custom_policy=OpenMoePolicy())
    return plugin, Layout(world=1)
