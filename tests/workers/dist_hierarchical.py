"""Worker: the two-level all-to-all (--hierarchical_alltoall) against the flat one, on 4 gloo processes.

Usage: torchrun --nproc_per_node 4 tests/workers/dist_hierarchical.py OUT_JSON

Nodes are simulated: the node subgroups are built for 2 ranks per node (2 nodes x 2) and for 1 (4 nodes x 1),
whatever torchrun's own LOCAL_WORLD_SIZE. Two levels of checks, each against the flat exchange:
* the primitive: rows tagged with their source and position, random uneven splits (zeros included) and equal
  splits; the rows received, the reversed exchange, and the gradient sent back by backward must be identical;
* the EP layer (tiny OpenMoE, every MoE layer EP over the world): loss, MoE outputs and every gradient, dropless
  and capacity, with experts that get no token, with 1 and 3 overlap chunks.
Rank 0 writes the largest differences over all ranks.
"""

import os
import sys

import torch
import torch.distributed as dist

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS), os.path.join(TESTS, "workers")]
from dist_common import make_batch, make_config, make_model, routing_groups, write_records_and_leave  # noqa: E402
from dist_overlap import compare, max_over_ranks, run  # noqa: E402

from moe_system.moe.all_to_all import all_to_all, launch, wait  # noqa: E402
from moe_system.moe.expert_parallel import shard_experts  # noqa: E402
from moe_system.moe.hierarchical_all_to_all import HierarchicalAllToAll, build_node_groups  # noqa: E402

HIDDEN = 3


def split_matrix(world: int, seed: int, zero_row: bool) -> torch.Tensor:
    """The same random [source, destination] row counts on every rank; about a third of them 0."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (world, world), generator=g) * (torch.rand(world, world, generator=g) > 0.3)
    if zero_row:
        counts[seed % world] = 0  # one rank sends nothing at all
    return counts


def primitive(groups, rank: int, world: int, seed: int, equal: bool) -> float:
    """Largest |difference| between flat and hierarchical: received rows, rows sent back, input gradient."""
    if equal:
        send = recv = matrix = None
        rows = world * 2
    else:
        counts = split_matrix(world, seed, zero_row=seed % 2 == 1)
        send, recv, matrix = counts[rank].tolist(), counts[:, rank].tolist(), counts.tolist()
        rows = sum(send)
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = (rank * 1000 + torch.arange(rows, dtype=torch.float32)).unsqueeze(1).repeat(1, HIDDEN).requires_grad_()
    grad_out = torch.randn(rows if recv is None else sum(recv), HIDDEN, generator=g)

    flat = all_to_all(x, dist.group.WORLD, recv, send)
    flat.backward(grad_out)
    flat_grad, x.grad = x.grad, None
    exchange = HierarchicalAllToAll(groups, recv, send, matrix)
    hier = wait(launch(x, exchange), exchange)
    hier.backward(grad_out)
    back = exchange.reversed()
    returned = wait(launch(hier.detach(), back), back)          # the combine direction: rows go home
    pairs = [(hier.detach(), flat.detach()), (x.grad, flat_grad), (returned, x.detach())]
    if any(a.shape != b.shape for a, b in pairs):
        return float("inf")
    return max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in pairs)


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    every = [list(range(world))]
    node_groups = {per_node: build_node_groups(every, per_node, rank) for per_node in (2, 1)}
    assert build_node_groups(every, world, rank) is None  # one node: nothing to do in two levels

    records = []
    for per_node, groups in node_groups.items():
        for seed in range(6):
            for equal in (False, True):
                diff = max_over_ranks([primitive(groups, rank, world, seed, equal)])[0]
                records.append({"kind": "primitive", "per_node": per_node, "seed": seed, "equal": equal,
                                "max_abs_diff": diff})

    batch = make_batch()
    shard = routing_groups(batch, world, None)[rank]
    num_items = float((batch["labels"][:, 1:] != -100).sum())
    for dispatch, starve in (("dropless", False), ("dropless", True), ("capacity", False)):
        model = make_model(make_config(dispatch), starve=starve)
        for layer in model.model.layers:
            if layer.is_moe:
                shard_experts(layer.mlp, ep_group=dist.group.WORLD)
        for chunks in (1, 3):
            base = run(model, shard, num_items, chunks, False)
            for layer in model.moe_layers():
                layer.dispatcher.node_groups = node_groups[2]
            diffs = compare(base, run(model, shard, num_items, chunks, False))
            for layer in model.moe_layers():
                layer.dispatcher.node_groups = None
            records.append({"kind": "layer", "dispatch": dispatch, "starve": starve, "chunks": chunks, **diffs})
    write_records_and_leave(records, out_path, world)


if __name__ == "__main__":
    main()
