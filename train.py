"""Train or finetune an OpenMoE model. `python train.py` is the embedded CPU demo; see README.md for more.

Launch across processes with `colossalai run --nproc_per_node N train.py ...` or `torchrun`.
"""

import os
import sys

from moe_system.training import interrupt

interrupt.install()  # first: Ctrl-C or SIGTERM while torch imports ends with one line, not a traceback

import torch.distributed as dist  # noqa: E402

from moe_system.data import DataError  # noqa: E402
from moe_system.model.convert import CheckpointError  # noqa: E402
from moe_system.parallel.faults import lost_peer, report_once  # noqa: E402
from moe_system.parallel.layout import LayoutError  # noqa: E402
from moe_system.training.args import parse_args  # noqa: E402
from moe_system.training.loop import NonFiniteLossError, train  # noqa: E402
from moe_system.training.output_dir import OutputDirError  # noqa: E402

# Problems with what the user gave us: one clear line, no traceback, non-zero exit.
USER_ERRORS = (DataError, CheckpointError, LayoutError, NonFiniteLossError, OutputDirError, FileNotFoundError,
               PermissionError, ImportError)


def stop(line: str, key: str | None = None) -> None:
    interrupt.ignore()  # exiting already: the signal torchrun sends the other ranks once one exits adds nothing
    report_once(line, key)  # once, though every rank may have found it
    sys.exit(1)


if __name__ == "__main__":
    try:
        train(parse_args())
    except USER_ERRORS as error:
        stop(f"error: {error}")
    except RuntimeError as error:
        if not lost_peer(error):
            raise
        # The rank that failed says why (or torchrun's summary names it); the others add one line, not a traceback.
        report_once(f"rank {dist.get_rank()}: stopping because another rank failed", key="lost peer")
        sys.stderr.flush()
        os._exit(1)  # a process group with a dead peer cannot be shut down cleanly: leave without trying
    finally:
        # Shut the process group's threads down before the interpreter does: left to exit, a backend thread
        # still running can abort the process ("terminate called without an active exception", status -6).
        if dist.is_initialized():
            dist.destroy_process_group()
