"""Worker: train.py's entry point, recording the held-out rows each rank runs through the pipeline schedule.

Usage: torchrun --nproc_per_node N tests/workers/counted_eval.py OUT_DIR [train.py args ...]
Each rank writes OUT_DIR/eval_rows-<rank>.json: the rows with a target token of every forward-only
execute_pipeline call (evaluation; training's calls run with gradients), in order.
"""

import atexit
import json
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from colossalai.booster import Booster  # noqa: E402

out_dir, argv = sys.argv[1], sys.argv[2:]
rows = []
execute_pipeline = Booster.execute_pipeline


def counted(self, data_iter, *args, **kwargs):
    if torch.is_grad_enabled():
        return execute_pipeline(self, data_iter, *args, **kwargs)
    batches = list(data_iter)
    rows.append(sum(int((b["labels"][:, 1:] != -100).any(dim=1).sum()) for b in batches))
    return execute_pipeline(self, iter(batches), *args, **kwargs)


def write_rows():
    with open(os.path.join(out_dir, f"eval_rows-{os.environ['RANK']}.json"), "w") as f:
        json.dump(rows, f)


Booster.execute_pipeline = counted
atexit.register(write_rows)
sys.argv = [os.path.join(REPO, "train.py"), *argv]
runpy.run_path(sys.argv[0], run_name="__main__")
