"""Two-level (node-aware) all-to-all for expert parallelism across nodes (--hierarchical_alltoall).

An EP group of P = N nodes x L ranks per node (EP rank p = node * L + local). A flat all-to-all makes every
rank send one message to each of the (N-1) * L ranks on other nodes: many small messages on the slowest link.
Here each exchange runs in two steps:

  1. intra-node: rank (n, l) sends to its node peer (n, l') every row bound for a rank with local index l'
     on any node, so (n, l') gathers what its whole node sends to the ranks (m, l') of every node m;
  2. inter-node: among the N ranks with local index l' (one per node), (n, l') sends to (m, l') the rows of
     its node bound for (m, l'): one message per node pair and local index, L times larger than a flat one.

The rows arrive grouped by source EP rank, exactly as the flat exchange delivers them, so the caller cannot
tell the two apart (only the transfer pattern changes). Each row still crosses nodes at most once. Every
direction (dispatch, combine and both gradients) runs intra first: on an accelerator the intra step (fast
link) is the only part the compute stream waits for inside `start`; the inter step runs while whatever
follows computes, until `wait`.

The intermediate sizes (what node peers send to whom) are not known from one rank's splits: for uneven splits
every rank needs the whole P x P split matrix: `gather_counts` gathers every rank's per-expert counts once for
all the chunks of a layer's exchange, in place of the flat path's count exchange. Equal splits need nothing.

The class is an AsyncAllToAll (moe/all_to_all.py) with its own `start`, so `launch`/`wait` and their autograd
apply unchanged.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.layout import LayoutError
from .all_to_all import AsyncAllToAll


@dataclass
class NodeGroups:
    """This rank's share of the two-level layout of its EP group."""
    intra: object       # its EP group's ranks on this node, ordered by local index
    inter: object       # its EP group's ranks with the same local index, one per node, in node order
    nodes: int          # N
    local: int          # L: ranks of the EP group on each node
    node: int           # n: this rank's node, counted within the EP group
    local_rank: int     # l

    @property
    def ep_size(self) -> int:
        return self.nodes * self.local


def node_shape(ep_ranks: list[int], ranks_per_node: int) -> tuple[int, int]:
    """Global ranks of one EP group (in EP-rank order), nodes of ranks_per_node consecutive ranks -> (N, L).
    Raises LayoutError unless the group is node-major and even: L ranks on each of its N nodes, in order."""
    nodes = [r // ranks_per_node for r in ep_ranks]
    spans = []  # (node, how many consecutive ranks of the group it holds)
    for node in nodes:
        if spans and spans[-1][0] == node:
            spans[-1][1] += 1
        else:
            spans.append([node, 1])
    sizes = {count for _, count in spans}
    if len(sizes) != 1 or len({node for node, _ in spans}) != len(spans):
        held = ", ".join(f"{count} on node {node}" for node, count in spans)
        raise LayoutError(
            f"--hierarchical_alltoall needs every expert-parallel group spread evenly over its nodes, but the group "
            f"of ranks {ep_ranks[0]}-{ep_ranks[-1]} has {held} ({ranks_per_node} processes per node); use an EP "
            f"size that divides, or is a multiple of, the processes per node, or drop --hierarchical_alltoall")
    return len(spans), sizes.pop()


def ranks_per_node_from_env(world: int, rank: int) -> int:
    """Processes per node, from the launcher (torchrun / colossalai run set LOCAL_WORLD_SIZE): ranks
    r..r+L-1 share a node. Raises LayoutError where that cannot hold."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if not value or not value.isdigit() or int(value) < 1:
        raise LayoutError("--hierarchical_alltoall needs LOCAL_WORLD_SIZE (processes per node) from the launcher; "
                          "start with torchrun or colossalai run")
    per_node = int(value)
    if world % per_node:
        raise LayoutError(f"--hierarchical_alltoall needs the same number of processes on every node: the world of "
                          f"{world} is not a multiple of LOCAL_WORLD_SIZE={per_node}")
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and int(local_rank) != rank % per_node:
        raise LayoutError(f"--hierarchical_alltoall needs each node's ranks consecutive, but rank {rank} has "
                          f"LOCAL_RANK={local_rank} with {per_node} processes per node; launch with torchrun's "
                          f"default rank assignment")
    return per_node


def build_node_groups(ep_groups: list[list[int]], ranks_per_node: int, rank: int) -> NodeGroups | None:
    """Create the intra- and inter-node subgroups of every EP group (every rank must call this with the same
    arguments: dist.new_group is collective and matched by call order). Returns this rank's NodeGroups, or None
    when its EP group lies within one node (the two-level exchange would be the flat one)."""
    shapes = [node_shape(ranks, ranks_per_node) for ranks in ep_groups]  # all checked before any group exists
    mine = None
    for ranks, (nodes, local) in zip(ep_groups, shapes):
        if nodes == 1:
            continue
        for n in range(nodes):
            group = dist.new_group(ranks[n * local:(n + 1) * local])
            if rank in ranks[n * local:(n + 1) * local]:
                intra = group
        for l in range(local):
            group = dist.new_group(ranks[l::local])
            if rank in ranks[l::local]:
                inter = group
        if rank in ranks:
            p = ranks.index(rank)
            mine = (nodes, local, p // local, p % local)
    if mine is None:
        return None
    return NodeGroups(intra, inter, *mine)


def _regroup(x: torch.Tensor, sizes: list[list[int]]) -> torch.Tensor:
    """x holds blocks (i, j), i-major, of sizes[i][j] rows -> the same blocks j-major."""
    blocks = x.split([s for row in sizes for s in row])
    rows, cols = len(sizes), len(sizes[0])
    return torch.cat([blocks[i * cols + j] for j in range(cols) for i in range(rows)])


class HierarchicalAllToAll(AsyncAllToAll):
    """An AsyncAllToAll over NodeGroups. splits: as AsyncAllToAll's (None: equal parts). matrix[p][q]: rows EP
    rank p sends to EP rank q, for every pair (needed with uneven splits; see gather_counts)."""

    def __init__(self, groups: NodeGroups, recv_splits: list[int] | None = None,
                 send_splits: list[int] | None = None, matrix: list[list[int]] | None = None):
        if (send_splits is None) != (matrix is None):
            raise ValueError("uneven splits need the split matrix of the whole EP group")
        super().__init__(None, recv_splits, send_splits)
        self.groups, self.matrix = groups, matrix

    def reversed(self) -> "HierarchicalAllToAll":
        """The exchange that sends every row back where it came from."""
        matrix = None if self.matrix is None else [list(col) for col in zip(*self.matrix)]
        return HierarchicalAllToAll(self.groups, self.send_splits, self.recv_splits, matrix)

    def _sizes(self, rows: int, reverse: bool):
        """Block sizes of both steps for this rank: m[p][q] rows from EP rank p to q in this direction."""
        g = self.groups
        P, N, L, n, l = g.ep_size, g.nodes, g.local, g.node, g.local_rank
        if self.matrix is None:
            if rows % P:
                raise ValueError(f"an equal-split exchange needs a multiple of {P} rows, got {rows}")
            m = [[rows // P] * P for _ in range(P)]
        else:
            m = [list(col) for col in zip(*self.matrix)] if reverse else self.matrix
        me = n * L + l
        send = [[m[me][dest_node * L + dest_local] for dest_local in range(L)] for dest_node in range(N)]  # [m][l']
        # step 1 receives from node peer l'' its rows bound for (m, l), grouped [l''][m]
        gathered = [[m[n * L + peer][dest_node * L + l] for dest_node in range(N)] for peer in range(L)]
        return send, gathered, [m[p][me] for p in range(P)]

    def start(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        if self._work is not None:
            raise RuntimeError("this exchange is already in flight")
        g = self.groups
        send, gathered, received = self._sizes(x.shape[0], reverse)
        # step 1, intra-node: blocks regrouped by destination local index
        sent = _regroup(x.contiguous(), send)
        step1 = sent.new_empty((sum(map(sum, gathered)), *sent.shape[1:]))
        dist.all_to_all_single(step1, sent, [sum(r) for r in gathered], [sum(col) for col in zip(*send)],
                               group=g.intra, async_op=True).wait()
        # step 2, inter-node: to node m the rows of every node peer bound for (m, l)
        outgoing = _regroup(step1, gathered)
        out = outgoing.new_empty((sum(received), *outgoing.shape[1:]))
        recv_from_node = [sum(received[k * g.local:(k + 1) * g.local]) for k in range(g.nodes)]
        self._work = dist.all_to_all_single(out, outgoing, recv_from_node, [sum(col) for col in zip(*gathered)],
                                            group=g.inter, async_op=True)
        self._received, self._sent = out, (sent, step1, outgoing)  # alive until the transfer completes (wait)
        return out


def gather_counts(send: torch.Tensor, ep_group) -> torch.Tensor:
    """send [chunk, destination, expert]: this rank's row counts -> [source, chunk, destination, expert], every
    EP rank's. One all_gather over the EP group (send on the accelerator: NCCL gathers device tensors only) gives
    both what this rank receives (its destination's slice, as the flat count exchange would) and the P x P split
    matrix of every chunk, so a layer's exchange still reads sizes back to the host once."""
    every = [torch.empty_like(send) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(every, send.contiguous(), group=ep_group)
    return torch.stack(every)
