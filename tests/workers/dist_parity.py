"""Worker: train parity cases under torchrun and write what rank 0 sees (losses, grad norms, gathered params).

Usage: torchrun --nproc_per_node N tests/workers/dist_parity.py OUT_DIR CASE_JSON [CASE_JSON ...]
Each case is a dict: plugin, zero, precision, extra_dp_size / pp, dp, ep, microbatch, dispatch, starve,
optimizer, max_norm, name; optionally save (a directory for booster.save_model), overlap (--comm_overlap
with that many chunks), accum (that many accumulation micro-batches per step, as --grad_accum_steps), sync_each
(reduce gradients after every micro-batch's backward, as before no_sync), compile (a dynamo backend: the dense
blocks compiled as train.py --compile does, recording every rank's count of compiled graphs after training and an evaluation of another shape). Every case records
the gradient reductions (all-reduce / reduce-scatter calls inside booster.backward) of each step.
Several cases share one process group (launching costs more than a case on 2 CPU cores).
"""

import json
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

# Run as a script: its own folder (tests/workers) is on sys.path; dist_common and moe_system are not.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from dist_common import STEPS, make_batch, make_config, make_model, make_optimizer, routing_groups  # noqa: E402

from colossalai.booster import Booster  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from moe_system.moe.expert_parallel import AllToAllDispatch  # noqa: E402
from moe_system.parallel.checkpoint_io import canonical_state_dict  # noqa: E402
from moe_system.parallel.compile import compile_dense_blocks  # noqa: E402
from moe_system.parallel.config import ParallelConfig  # noqa: E402
from moe_system.parallel.launch import init_distributed  # noqa: E402
from moe_system.parallel.plugin import build_plugin  # noqa: E402
from moe_system.training.evaluate import evaluate_loss, pipeline_evaluate_loss  # noqa: E402
from moe_system.training.forward_backward import forward_backward, pipeline_forward_backward  # noqa: E402


def check_groups(plugin, layout) -> None:
    """The documented layout (parallel/layout.py) is the mesh Colossal-AI actually built."""
    for group, expected in ((plugin.ep_group, layout.ep_group_ranks()), (plugin.pp_group, layout.pp_group_ranks()),
                            (plugin.moe_dp_group, layout.expert_dp_group_ranks()),
                            (plugin.dp_group, layout.dp_group_ranks())):
        actual = dist.get_process_group_ranks(group)
        assert actual == expected, f"rank {dist.get_rank()}: group {actual} != documented {expected}"


class GradientReductions:
    """Counts the all-reduce and reduce-scatter calls made inside booster.backward: the gradient reductions
    (ZeRO-0's sync_dp_grads, the ZeRO optimizer's buckets); the loss-part and norm reductions lie outside it."""

    def __init__(self):
        self.count, self.inside = 0, False
        for name in ("all_reduce", "reduce_scatter", "reduce_scatter_tensor"):
            setattr(dist, name, self._counted(getattr(dist, name)))

    def _counted(self, collective):
        def counted(*args, **kwargs):
            self.count += self.inside
            return collective(*args, **kwargs)
        return counted

    def watch(self, booster) -> None:
        backward = booster.backward

        def counted_backward(*args, **kwargs):
            self.inside = True
            try:
                return backward(*args, **kwargs)
            finally:
                self.inside = False
        booster.backward = counted_backward


REDUCTIONS = None  # GradientReductions, installed by main


def boosted(case: dict, config):
    parallel = ParallelConfig(plugin=case["plugin"], zero_stage=case["zero"], precision=case["precision"],
                              extra_dp_size=case.get("extra_dp_size", 1), pp_size=case.get("pp", 1),
                              dp_size=case.get("moe_dp", 1), ep_size=case.get("ep", 1),
                              microbatch_size=case.get("microbatch"), max_grad_norm=case.get("max_norm", 1e9),
                              comm_overlap_chunks=case.get("overlap") or 1)
    plugin, layout = build_plugin(parallel, config)
    booster = Booster(plugin=plugin)
    if REDUCTIONS is not None:  # installed by this worker's main; other workers reuse boosted() without it
        REDUCTIONS.watch(booster)
    if case.get("sync_each"):
        booster.no_sync = lambda *args: nullcontext()
    model = make_model(config, case.get("starve", False))
    optimizer = make_optimizer(model.parameters(), case.get("optimizer", "adamw"))
    model, optimizer, *_ = booster.boost(model, optimizer)
    check_groups(plugin, layout)
    model.train()
    return plugin, layout, booster, model, optimizer


def train_step(plugin, layout, booster, model, optimizer, shard, accum: int = 1) -> tuple[list, float]:
    if layout.is_pipeline:
        parts = pipeline_forward_backward(booster, model, optimizer, [shard], plugin.dp_group, plugin.pp_group,
                                          torch.device("cpu"))
    else:
        per_mb = shard["input_ids"].shape[0] // accum
        micro_batches = [{k: v[i:i + per_mb] for k, v in shard.items()} for i in range(0, accum * per_mb, per_mb)]
        parts = forward_backward(booster, model, optimizer, micro_batches, plugin.dp_group, torch.device("cpu"))
    optimizer.step()
    norm = optimizer.get_grad_norm()
    optimizer.zero_grad()
    return [float(parts[k]) for k in ("lm_loss", "aux_loss", "router_z_loss")], norm


def run_case(case: dict, out_dir: str) -> None:
    config = make_config(case.get("dispatch", "dropless"))
    plugin, layout, booster, model, optimizer = boosted(case, config)
    if case.get("load"):
        booster.load_model(model, case["load"])
    graphs = None
    if case.get("compile"):  # where train.py --compile applies it: the unwrapped model, after boosting
        torch._dynamo.reset()  # graphs of an earlier case would be reused and go uncounted
        graphs = CompileCounterWithBackend(case["compile"])
        compile_dense_blocks(model.unwrap(), backend=graphs)

    batch = make_batch()
    shard = routing_groups(batch, layout.dp_size, None)[layout.data_parallel_rank]
    losses, norms, reductions = [], [], []
    if case.get("eval_only"):  # forward only: the LM loss of the whole batch, summed over the DP shards
        model.eval()
        num_items = float((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            lm_loss = model(input_ids=shard["input_ids"], labels=shard["labels"], num_items_in_batch=num_items).lm_loss
        dist.all_reduce(lm_loss, group=plugin.dp_group)
        losses.append([float(lm_loss), 0.0, 0.0])
    for step in range(0 if case.get("eval_only") else STEPS):
        before = REDUCTIONS.count
        loss, norm = train_step(plugin, layout, booster, model, optimizer, shard, case.get("accum", 1))
        losses.append(loss)
        norms.append(norm)
        reductions.append(REDUCTIONS.count - before)
        if case.get("resume_at") == step + 1:
            # Save model and optimizer, rebuild everything from scratch (fresh weights), load, continue.
            where = os.path.join(out_dir, f"{case['name']}-resume")
            booster.save_model(model, os.path.join(where, "model"), shard=True, use_safetensors=True)
            booster.save_optimizer(optimizer, os.path.join(where, "optimizer"), shard=True)
            torch.manual_seed(12345)
            plugin, layout, booster, model, optimizer = boosted({**case, "starve": False}, config)
            booster.load_model(model, os.path.join(where, "model"))
            booster.load_optimizer(optimizer, os.path.join(where, "optimizer"))

    # Canonical parameters: experts gathered over EP inside each stage, stages gathered over the PP group.
    state = canonical_state_dict(model.unwrap())
    stages = [None] * layout.pp
    dist.all_gather_object(stages, state, group=plugin.pp_group)
    compiled_graphs = [None] * dist.get_world_size()
    if graphs:  # evaluation runs the blocks eagerly (eval mode), whatever its shapes: it must compile nothing
        rows = [{k: v[:4, :9] for k, v in make_batch().items()}]  # every rank the same rows: the all-to-alls pair
        if layout.is_pipeline:
            pipeline_evaluate_loss(booster, model, rows, plugin.pp_group, plugin.dp_group, torch.device("cpu"))
        else:
            evaluate_loss(model, rows, torch.device("cpu"))
        assert model.unwrap().training  # the evaluation handed the model back in training mode
        dist.all_gather_object(compiled_graphs, graphs.frame_count)
    if case.get("save"):
        booster.save_model(model, case["save"], shard=True, use_safetensors=True, size_per_shard=1)
        booster.save_model(model, case["save"] + ".safetensors", shard=False, use_safetensors=True)
    if dist.get_rank() == 0:
        merged = {k: v.float() for s in stages for k, v in s.items()}
        chunks = sorted({layer.dispatcher.overlap_chunks for layer in model.unwrap().moe_layers()
                         if isinstance(layer.dispatcher, AllToAllDispatch)})
        torch.save({"losses": losses, "norms": norms, "state": merged, "layout": layout.describe(),
                    "overlap_chunks": chunks, "reductions": reductions, "compiled_graphs": compiled_graphs},
                   os.path.join(out_dir, f"{case['name']}.pt"))
    dist.barrier()


def main():
    global REDUCTIONS
    out_dir, cases = sys.argv[1], [json.loads(c) for c in sys.argv[2:]]
    REDUCTIONS = GradientReductions()
    init_distributed(seed=1)
    for case in cases:
        run_case(case, out_dir)
        if dist.get_rank() == 0:
            print(f"case {case['name']} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
