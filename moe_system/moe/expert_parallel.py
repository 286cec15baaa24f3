"""Expert-parallel OpenMoE sparse MLP: each rank of an EP group holds num_experts / ep consecutive experts.

`shard_experts` keeps this rank's experts of an OpenMoeSparseMLP and gives it an AllToAllDispatch; only the
dispatch changes (layer.py): routing, capacity, drops and the weighted combine are the single-device code, so an
EP layer computes the same function as a single-device one.

* dropless: exchange per-expert row counts (all-to-all), send the expert-sorted rows with an uneven
  all-to-all, regroup the received rows expert-major, run the local experts as one grouped GEMM, undo the
  regrouping, and send every row back with the reverse all-to-all.
* capacity: every expert gets `cap` slots on every rank (kept copies at their priority rank, zero padding
  elsewhere) and the [E, cap, H] buffer is exchanged with an equal-split all-to-all, as the reference did
  (docs/moe.md, Dispatch). Zero rows stay zero through a bias-free SwiGLU expert and add nothing to its gradient, and
  dropped copies have weight 0 in the combine, exactly as on one device.
* overlap (overlap_chunks = n > 1, --comm_overlap): each expert's block of rows (or slots) is cut into n
  near-equal parts and chunk j gathers the j-th part of every expert, so a chunk is itself expert-sorted and
  goes through the same exchange and regrouping as the whole. Each chunk's asynchronous all-to-alls overlap
  other chunks' experts, in the forward and in the backward (`_overlapped_exchange`). Every row meets the same
  expert weights; only the GEMMs' row counts change, which changes a row's result only where the BLAS picks
  another kernel for very few rows (outputs and input gradients: bitwise equal, or ~1e-7 relative). Expert
  weight gradients are summed over chunks in another order (~1e-7 relative).
* two levels (node_groups, --hierarchical_alltoall): every exchange of `_overlapped_exchange` goes intra-node,
  then inter-node (moe/hierarchical_all_to_all.py); the rows arrive as from the flat one. Dropless, the counts
  are all-gathered instead of exchanged (every rank needs every pair's sizes): still one host sync per layer.

Gradient semantics. Every rank backpropagates its share of the global-batch loss and the optimizer averages
dense gradients over all dp = moe_dp * ep data-parallel ranks. An expert's gradient is the sum of the
contributions of the ep ranks whose tokens it served, then averaged over its moe_dp replicas only; scaling
it by 1/ep makes it the same dp-average the dense parameters get.
"""

import torch
import torch.distributed as dist
from colossalai.tensor.moe_tensor.api import set_moe_tensor_ep_group

from .all_to_all import AsyncAllToAll, exchange_counts, launch, scale_grad, wait
from .experts import GroupedExperts, expert_ffn
from .hierarchical_all_to_all import HierarchicalAllToAll, gather_counts
from .layer import OpenMoeSparseMLP
from .permute import DispatchPlan, inverse_permutation


def shard_experts(layer: OpenMoeSparseMLP, ep_group, overlap_chunks: int = 1, node_groups=None) -> OpenMoeSparseMLP:
    """Turn a single-device layer into this rank's EP layer in place and return it: its experts cut down to this
    rank's (unless it already holds only those) and tagged with ep_group, its rows exchanged over ep_group. The
    parameters keep their identity, so an optimizer built before boosting still owns them. overlap_chunks > 1
    overlaps the exchange with the experts in that many chunks (--comm_overlap)."""
    dispatcher = AllToAllDispatch(ep_group, overlap_chunks, node_groups)
    if not isinstance(layer, OpenMoeSparseMLP):
        raise TypeError(f"expected an OpenMoeSparseMLP, got {type(layer).__name__}")
    if layer.num_experts % dispatcher.ep_size:
        raise ValueError(f"{layer.num_experts} experts cannot be split over an EP group of {dispatcher.ep_size}")
    num_local = layer.num_experts // dispatcher.ep_size
    first = (dist.get_rank(ep_group) if ep_group is not None else 0) * num_local
    for param in (layer.experts.wi_gate, layer.experts.wi_up, layer.experts.wo):
        if param.shape[0] == layer.num_experts:
            param.data = param.data[first:first + num_local].clone()
        # Marks the tensor as an expert: ZeRO then shards and reduces it over the expert-DP group, and the
        # checkpoint IO gathers it over the EP group.
        set_moe_tensor_ep_group(param, ep_group)
    layer.experts.num_experts = num_local
    layer.dispatcher = dispatcher
    return layer


class AllToAllDispatch:
    """The layer's rows to the EP ranks holding their experts and back (the ways are described above)."""

    def __init__(self, ep_group, overlap_chunks: int = 1, node_groups=None):
        """node_groups (this rank's share of hierarchical_all_to_all.build_node_groups): every exchange goes in two
        levels, intra- then inter-node."""
        if overlap_chunks < 1:
            raise ValueError(f"overlap_chunks must be at least 1, got {overlap_chunks}")
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        if node_groups is not None and node_groups.ep_size != self.ep_size:
            raise ValueError(f"node groups for an EP group of {node_groups.ep_size}, but this one has {self.ep_size}")
        self.overlap_chunks, self.node_groups = overlap_chunks, node_groups

    @classmethod
    def from_native_module(cls, module: OpenMoeSparseMLP, process_group=None, ep_group=None, overlap_chunks: int = 1,
                           node_groups=None, **kwargs) -> OpenMoeSparseMLP:
        """Shardformer's replacement hook (parallel/policy.py): shard_experts, the same module back."""
        return shard_experts(module, ep_group, overlap_chunks, node_groups)

    def __call__(self, experts: GroupedExperts, rows: torch.Tensor, plan: DispatchPlan, cap: int | None):
        """rows: the layer's expert-sorted copies (plan: of all num_experts experts); experts: this rank's."""
        if self.ep_size == 1:
            return self._local_experts(experts, rows, plan.counts)
        if cap is None:
            return self._dropless_exchange(experts, rows, plan)
        return self._capacity_exchange(experts, rows, plan, cap)

    def _local_experts(self, experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor,
                       rows_per_expert: int | None = None) -> torch.Tensor:
        scale = 1.0 / self.ep_size
        weights = [scale_grad(w, scale) for w in (experts.wi_gate, experts.wi_up, experts.wo)]
        if x.shape[0] > 0:
            return expert_ffn(x, counts, *weights, impl=experts.impl, rows_per_expert=rows_per_expert)
        # No row of this exchange (or of this chunk of it) reached a local expert: still give every expert weight
        # a (zero) gradient, so each rank reduces the same set of gradients in the same order (ZeRO-2 otherwise
        # waits forever).
        out = expert_ffn(x, counts, *weights, impl="loop")
        return out + sum(w.sum() for w in weights) * 0.0

    def _dropless_exchange(self, experts: GroupedExperts, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ep, local, n = self.ep_size, experts.num_experts, self.overlap_chunks
        send = chunk_counts(plan.counts, n).view(n, ep, local)                      # [chunk, destination, expert]
        matrices = None
        if self.node_groups is None:
            # One small synchronous exchange gives every chunk's [source, local expert] counts.
            received = exchange_counts(send.transpose(0, 1).reshape(-1), self.ep_group)
            recv = received.view(ep, n, local).transpose(0, 1)                      # [chunk, source, expert]
            send_splits, recv_splits = torch.stack([send.sum(2), recv.sum(2)]).tolist()  # one host sync
        else:
            # Two levels need every pair's sizes: gather all ranks' counts, this rank's receipts among them.
            every = gather_counts(send, self.ep_group)                              # [source, chunk, dest, expert]
            me = dist.get_rank(self.ep_group)
            recv = every[:, :, me].transpose(0, 1)                                  # [chunk, source, expert]
            matrices = every.sum(3).transpose(0, 1).tolist()  # one host sync: [chunk][source][destination]
            send_splits = [m[me] for m in matrices]
            recv_splits = [[row[me] for row in m] for m in matrices]
        # Chunk-major layout: chunk j holds, for every expert, the j-th of n near-equal parts of its block, so each
        # chunk is itself expert-sorted and is sent exactly like an unchunked exchange.
        order = None if n == 1 else torch.argsort(plan.rank * n // plan.counts[plan.expert_of_row], stable=True)
        chunks = [rows] if order is None else rows[order].split([sum(s) for s in send_splits])
        returned = self._overlapped_exchange(chunks, send_splits, recv_splits,
                                             lambda j, x: self._grouped_by_source(experts, x, recv[j]), matrices)
        return returned[0] if order is None else torch.cat(returned)[inverse_permutation(order)]

    def _capacity_exchange(self, experts: GroupedExperts, rows: torch.Tensor, plan: DispatchPlan,
                           cap: int) -> torch.Tensor:
        ep, local, hidden = self.ep_size, experts.num_experts, rows.shape[-1]
        num_experts = ep * local
        num_rows, num_slots = rows.shape[0], num_experts * cap
        kept = plan.rank < cap
        slot = plan.expert_of_row * cap + plan.rank
        # Source row of each slot; empty slots read an appended zero row (a gather keeps the backward a plain
        # index-add, deterministic).
        slot_source = torch.full((num_slots + 1,), num_rows, dtype=torch.long, device=rows.device)
        slot_source[torch.where(kept, slot, num_slots)] = torch.arange(num_rows, device=rows.device)
        padded_rows = torch.cat([rows, rows.new_zeros(1, hidden)])
        buffer = padded_rows[slot_source[:num_slots]].view(num_experts, cap, hidden)

        # Chunk j: slots [lo_j, hi_j) of every expert. Sizes are known everywhere: no count exchange, no host sync,
        # equal splits. More chunks than slots would only add empty exchanges.
        n = min(self.overlap_chunks, cap)
        bounds = [(j * cap + n - 1) // n for j in range(n + 1)]
        chunks = [buffer[:, lo:hi].reshape(-1, hidden) for lo, hi in zip(bounds, bounds[1:])]
        equal = [None] * n

        def through_experts(j, received):                                          # [source, local, size, H]
            size = bounds[j + 1] - bounds[j]
            expert_major = received.view(ep, local, size, hidden).transpose(0, 1).reshape(-1, hidden)
            counts = torch.full((local,), ep * size, dtype=torch.long, device=rows.device)
            out = self._local_experts(experts, expert_major, counts, rows_per_expert=ep * size)
            return out.view(local, ep, size, hidden).transpose(0, 1).reshape(-1, hidden)

        returned = self._overlapped_exchange(chunks, equal, equal, through_experts)
        if n > 1:  # chunk j holds slots [lo_j, hi_j) of every expert: put them side by side again
            returned = [torch.cat([r.view(num_experts, -1, hidden) for r in returned], dim=1).view(-1, hidden)]
        returned = returned[0]                                                       # [E * cap, H]
        # Dropped copies read the zero row: their combine weight is 0 either way.
        padded_out = torch.cat([returned, returned.new_zeros(1, hidden)])
        return padded_out[torch.where(kept, slot, num_slots)]

    def _grouped_by_source(self, experts: GroupedExperts, received: torch.Tensor,
                           counts: torch.Tensor) -> torch.Tensor:
        """Rows received grouped [source rank, local expert] (counts [ep, local]) through their experts, same layout.
        The grouped GEMM wants them expert-major: a stable sort by (expert, source), undone afterwards."""
        ep, local = counts.shape
        block = torch.repeat_interleave(torch.arange(ep * local, device=received.device), counts.reshape(-1),
                                        output_size=received.shape[0])
        order = torch.argsort((block % local) * ep + block // local, stable=True)
        out = self._local_experts(experts, received[order], counts.sum(0))
        return out[inverse_permutation(order)]

    def _overlapped_exchange(self, chunks, send_splits, recv_splits, experts, matrices=None) -> list[torch.Tensor]:
        """Send chunks[j] (rows grouped by destination rank, send_splits[j] to each), run experts(j, received) on
        what arrives (recv_splits[j] rows from each source) and send the results back; returns, per chunk, the
        rows that came back, in the layout of chunks[j]. With one chunk this is a plain exchange each way.
        matrices[j] (two levels, uneven splits): chunk j's rows from every EP rank to every other.

        Forward, step j: launch dispatch j+1, wait for dispatch j, run chunk j's experts, launch combine j, wait
        for combine j-1; so dispatch j+1 and combine j-1 are in flight while chunk j computes, and transfers
        queue in the order A0 A1 B0 A2 B1 A3 B2 B3 (A dispatch, B combine).
        Backward: the autograd engine runs, among ready nodes, the one created last, so this creation order makes
        it walk the chunks from last to first as: launch the combine gradients of chunks j and j-1, wait for
        chunk j's, run its expert backward, launch its dispatch gradient, wait for chunk j+1's dispatch gradient
        (launched one expert backward earlier), launch chunk j-2's combine gradient, ...: each exchange overlaps
        a neighbouring chunk's expert backward and the link sees B3 B2 A3 B1 A2 B0 A1 A0 (benchmarks/
        comm_overlap.py records this order). Every rank builds the same graph (a chunk with no rows still gets
        its exchanges and a zero-row expert call), so all ranks issue the collectives in the same order.
        """
        group, n = self.ep_group, len(chunks)
        if self.node_groups is None:
            dispatch = [AsyncAllToAll(group, recv_splits[j], send_splits[j]) for j in range(n)]
        else:
            dispatch = [HierarchicalAllToAll(self.node_groups, recv_splits[j], send_splits[j],
                                             None if matrices is None else matrices[j]) for j in range(n)]
        combine = [exchange.reversed() for exchange in dispatch]
        arriving = launch(chunks[0], dispatch[0])
        leaving, returned = [], []
        for j in range(n):
            following = launch(chunks[j + 1], dispatch[j + 1]) if j + 1 < n else None
            received = wait(arriving, dispatch[j])
            leaving.append(launch(experts(j, received), combine[j]))
            if j > 0:
                returned.append(wait(leaving[j - 1], combine[j - 1]))
            arriving = following
        returned.append(wait(leaving[-1], combine[-1]))
        return returned


def chunk_counts(counts: torch.Tensor, chunks: int) -> torch.Tensor:
    """counts [E] rows per expert -> [chunks, E]: how many rows of each expert's block fall in each chunk.
    Row r of a block of c rows goes to chunk r * chunks // c: chunk j holds rows [ceil(j*c/n), ceil((j+1)*c/n))."""
    j = torch.arange(chunks + 1, device=counts.device).unsqueeze(1)
    bounds = (j * counts + chunks - 1) // chunks
    return bounds[1:] - bounds[:-1]
