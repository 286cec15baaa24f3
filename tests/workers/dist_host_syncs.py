"""Worker: host synchronisations (tests/sync_counter.py) of a training step and of expert-parallel MoE layers.

Usage: torchrun --nproc_per_node N tests/workers/dist_host_syncs.py OUT_JSON

* step: one train_step (training/step.py) of the tiny OpenMoE through the booster of the default plugin (ep, fp32,
  ZeRO-0 with one process, 1 with several; the EP size is the world), after a warm-up step;
* with two processes, pipeline_step: the same through a two-stage 1F1B pipeline (plugin hybrid, ZeRO-0);
* with several processes, layers: the model's forward to the hidden states and a plain backward, every MoE layer
  an EP layer over the world, for each dispatch mode and chunk count, through the flat and the two-level
  (--hierarchical_alltoall, one rank per simulated node) exchange.
Rank 0 writes the counts and where they came from; every rank's counts must agree.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

# Run as a script: its own folder (tests/workers) is on sys.path; dist_common, sync_counter and moe_system are not.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from dist_common import make_batch, make_config, make_model, routing_groups  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402

from colossalai.booster import Booster  # noqa: E402

from moe_system.moe.expert_parallel import shard_experts  # noqa: E402
from moe_system.moe.hierarchical_all_to_all import build_node_groups  # noqa: E402
from moe_system.parallel.config import ParallelConfig  # noqa: E402
from moe_system.parallel.launch import init_distributed  # noqa: E402
from moe_system.parallel.plugin import build_plugin  # noqa: E402
from moe_system.training.schedule import build_scheduler  # noqa: E402
from moe_system.training.step import OK, train_step  # noqa: E402


def counted(fn) -> dict:
    with HostSyncCounter() as syncs:
        fn()
    return {"count": syncs.count, "where": dict(syncs.locations)}


def step_syncs(shard, parallel: ParallelConfig) -> dict:
    config = make_config("dropless")
    plugin, _ = build_plugin(parallel, config)
    booster = Booster(plugin=plugin)
    model = make_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = build_scheduler(optimizer, "constant", 0, 10)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    model.train()
    results = []

    def step():
        results.append(train_step(booster, model, optimizer, scheduler, [shard], plugin, torch.device("cpu")))

    step()  # warm-up: optimizer state, statistics moved to the device
    record = counted(step)
    assert all(r.outcome == OK for r in results), [r.outcome for r in results]
    return {**record, "moe_layers": len(model.unwrap().moe_layers())}


def layer_syncs(shard, dispatch: str, chunks: int, node_groups=None) -> dict:
    model = make_model(make_config(dispatch))
    for layer in model.moe_layers():
        shard_experts(layer, ep_group=dist.group.WORLD, overlap_chunks=chunks, node_groups=node_groups)
    model.train()

    def forward_backward():
        out = model.model(input_ids=shard["input_ids"])
        (out.last_hidden_state.square().mean() + out.aux_loss + out.z_loss).backward()

    forward_backward()
    return {"dispatch": dispatch, "chunks": chunks, "hierarchical": node_groups is not None,
            "moe_layers": len(model.moe_layers()), **counted(forward_backward)}


def main():
    out_path = sys.argv[1]
    init_distributed(seed=0)
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = routing_groups(make_batch(), world, None)[rank]
    result = {"world": world, "step": step_syncs(shard, ParallelConfig(ep_size=world)), "layers": []}
    if world == 2:  # a two-stage 1F1B pipeline over the whole batch, in micro-batches of 2 rows
        pipeline = ParallelConfig(plugin="hybrid", zero_stage=0, pp_size=2, ep_size=1, dp_size=1, microbatch_size=2)
        result["pipeline_step"] = step_syncs(make_batch(), pipeline)
    if world > 1:
        result["layers"] = [layer_syncs(shard, d, c) for d, c in (("dropless", 1), ("dropless", 2), ("capacity", 1))]
        # --hierarchical_alltoall, one rank per simulated node: the two-level exchange over the same EP group
        node_groups = build_node_groups([list(range(world))], 1, rank)
        result["layers"] += [layer_syncs(shard, d, c, node_groups) for d, c in (("dropless", 1), ("dropless", 2),
                                                                               ("capacity", 1))]
    everyone = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"ranks": everyone}, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
