"""Train or finetune an OpenMoE model. `python train.py` is the embedded CPU demo; see README.md for more.

Launch across processes with `colossalai run --nproc_per_node N train.py ...` or `torchrun`.
"""

import sys

from moe_system.data import DataError
from moe_system.model.convert import CheckpointError
from moe_system.parallel.layout import LayoutError
from moe_system.training.args import parse_args
from moe_system.training.loop import NonFiniteLossError, train
from moe_system.training.output_dir import OutputDirError

# Problems with what the user gave us: one clear line, no traceback, non-zero exit.
USER_ERRORS = (DataError, CheckpointError, LayoutError, NonFiniteLossError, OutputDirError, FileNotFoundError,
               PermissionError, ImportError)

if __name__ == "__main__":
    try:
        train(parse_args())
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
