"""Worker: train.py's entry point, recording the held-out rows each rank evaluates.

Usage: torchrun --nproc_per_node N tests/workers/counted_eval.py OUT_DIR [train.py args ...]
Each rank writes OUT_DIR/eval_rows-<rank>.json: the rows with a target token of every forward-only
execute_pipeline call (evaluation through a pipeline; training's calls run with gradients), in order; and
OUT_DIR/eval_calls-<rank>.json, off the pipeline: the rows with a target token of each held-out loss batch
("loss_rows"), the [prompt, greedy completion] pairs ("completions") and the forward-only model calls
("forwards"), padding included.
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

from moe_system.model.modeling import OpenMoeModel  # noqa: E402
from moe_system.training import evaluate  # noqa: E402

out_dir, argv = sys.argv[1], sys.argv[2:]
rows = []
calls = {"loss_rows": [], "completions": [], "forwards": 0}
execute_pipeline = Booster.execute_pipeline
chunked_lm_loss, greedy_complete, model_forward = evaluate.chunked_lm_loss, evaluate.greedy_complete, \
    OpenMoeModel.forward


def counted(self, data_iter, *args, **kwargs):
    if torch.is_grad_enabled():
        return execute_pipeline(self, data_iter, *args, **kwargs)
    batches = list(data_iter)
    rows.append(sum(int((b["labels"][:, 1:] != -100).any(dim=1).sum()) for b in batches))
    return execute_pipeline(self, iter(batches), *args, **kwargs)


def counted_loss(hidden, weight, labels, **kwargs):
    calls["loss_rows"].append(int((labels[:, 1:] != -100).any(dim=1).sum()))
    return chunked_lm_loss(hidden, weight, labels, **kwargs)


def counted_completions(model, tokenizer, prompts, *args, **kwargs):
    outputs = greedy_complete(model, tokenizer, prompts, *args, **kwargs)
    calls["completions"] += [[p, o] for p, o in zip(prompts, outputs)]
    return outputs


def counted_forward(self, *args, **kwargs):
    calls["forwards"] += not torch.is_grad_enabled()
    return model_forward(self, *args, **kwargs)


def write_rows():
    rank = os.environ["RANK"]
    with open(os.path.join(out_dir, f"eval_rows-{rank}.json"), "w") as f:
        json.dump(rows, f)
    with open(os.path.join(out_dir, f"eval_calls-{rank}.json"), "w") as f:
        json.dump(calls, f)


Booster.execute_pipeline = counted
evaluate.chunked_lm_loss, evaluate.greedy_complete, OpenMoeModel.forward = \
    counted_loss, counted_completions, counted_forward
atexit.register(write_rows)
sys.argv = [os.path.join(REPO, "train.py"), *argv]
runpy.run_path(sys.argv[0], run_name="__main__")
