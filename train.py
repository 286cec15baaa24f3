"""Train or finetune an OpenMoE model. `python train.py` is the embedded CPU demo; see README.md for more.

Launch across processes with `colossalai run --nproc_per_node N train.py ...` or `torchrun`.
"""

from moe_system.training.args import parse_args
from moe_system.training.loop import train

if __name__ == "__main__":
    train(parse_args())
