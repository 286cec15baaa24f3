"""Expert-parallel OpenMoE sparse MLP: each rank of an EP group holds num_experts / ep consecutive experts.

Only `run_experts` changes (layer.py): routing, capacity, drops and the weighted combine are the single-device
code, so an EP layer computes the same function as OpenMoeSparseMLP.

* dropless: exchange per-expert row counts (all-to-all), send the expert-sorted rows with an uneven
  all-to-all, regroup the received rows expert-major, run the local experts as one grouped GEMM, undo the
  regrouping, and send every row back with the reverse all-to-all.
* capacity: every expert gets `cap` slots on every rank (kept copies at their priority rank, zero padding
  elsewhere) and the [E, cap, H] buffer is exchanged with an equal-split all-to-all, as the reference did
  (spec §4.5). Zero rows stay zero through a bias-free SwiGLU expert and add nothing to its gradient, and
  dropped copies have weight 0 in the combine, exactly as on one device.

Gradient semantics. Every rank backpropagates its share of the global-batch loss and the optimizer averages
dense gradients over all dp = moe_dp * ep data-parallel ranks. An expert's gradient is the sum of the
contributions of the ep ranks whose tokens it served, then averaged over its moe_dp replicas only; scaling
it by 1/ep makes it the same dp-average the dense parameters get.
"""

import torch
import torch.distributed as dist
from colossalai.tensor.moe_tensor.api import set_moe_tensor_ep_group

from .all_to_all import all_to_all, exchange_counts, scale_grad
from .experts import expert_ffn
from .layer import OpenMoeSparseMLP
from .permute import DispatchPlan


class ExpertParallelSparseMLP(OpenMoeSparseMLP):
    ep_group = None
    ep_size = 1
    ep_rank = 0

    @classmethod
    def from_native_module(cls, module: OpenMoeSparseMLP, process_group=None, ep_group=None, **kwargs):
        """Shardformer hook: turn a single-device layer into this rank's EP layer in place (the parameters keep
        their identity, so an optimizer built before boosting still owns them)."""
        if not isinstance(module, OpenMoeSparseMLP):
            raise TypeError(f"expected an OpenMoeSparseMLP, got {type(module).__name__}")
        module.__class__ = cls
        module.setup_expert_parallel(ep_group)
        return module

    def setup_expert_parallel(self, ep_group) -> None:
        ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        if self.num_experts % ep_size:
            raise ValueError(f"{self.num_experts} experts cannot be split over an EP group of {ep_size}")
        self.ep_group, self.ep_size = ep_group, ep_size
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        self.num_local_experts = self.num_experts // ep_size
        first = self.ep_rank * self.num_local_experts
        for param in (self.experts.wi_gate, self.experts.wi_up, self.experts.wo):
            if param.shape[0] == self.num_experts:
                param.data = param.data[first:first + self.num_local_experts].clone()
            # Marks the tensor as an expert: ZeRO then shards and reduces it over the expert-DP group, and the
            # checkpoint IO gathers it over the EP group.
            set_moe_tensor_ep_group(param, ep_group)
        self.experts.num_experts = self.num_local_experts

    @property
    def first_local_expert(self) -> int:
        return self.ep_rank * self.num_local_experts

    def _local_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / self.ep_size
        weights = [scale_grad(w, scale) for w in (self.experts.wi_gate, self.experts.wi_up, self.experts.wo)]
        if x.shape[0] > 0:
            return expert_ffn(x, counts, *weights, impl=self.experts.impl)
        # No token reached any local expert: still give every expert weight a (zero) gradient, so each rank
        # reduces the same set of gradients in the same order (ZeRO-2 otherwise waits forever).
        out = expert_ffn(x, counts, *weights, impl="loop")
        return out + sum(w.sum() for w in weights) * 0.0

    def run_experts(self, rows: torch.Tensor, plan: DispatchPlan, cap: int | None) -> torch.Tensor:
        if self.ep_size == 1:
            return self._local_experts(rows, plan.counts)
        if cap is None:
            return self._dropless_exchange(rows, plan.counts)
        return self._capacity_exchange(rows, plan, cap)

    def _dropless_exchange(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep_size, self.num_local_experts
        received_counts = exchange_counts(counts, self.ep_group).view(ep, local)   # [source rank, local expert]
        send_splits = counts.view(ep, local).sum(1).tolist()
        recv_splits = received_counts.sum(1).tolist()
        received = all_to_all(rows, self.ep_group, recv_splits, send_splits)     # grouped [source, expert]

        # Regroup expert-major for the grouped GEMM: a stable sort of the rows by (expert, source).
        chunk_of_row = torch.repeat_interleave(torch.arange(ep * local, device=rows.device),
                                               received_counts.reshape(-1), output_size=received.shape[0])
        expert_major_key = (chunk_of_row % local) * ep + chunk_of_row // local
        order = torch.argsort(expert_major_key, stable=True)
        out = self._local_experts(received[order], received_counts.sum(0))
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all(out[back], self.ep_group, send_splits, recv_splits)

    def _capacity_exchange(self, rows: torch.Tensor, plan: DispatchPlan, cap: int) -> torch.Tensor:
        ep, local, hidden = self.ep_size, self.num_local_experts, rows.shape[-1]
        num_rows, num_slots = rows.shape[0], self.num_experts * cap
        kept = plan.rank < cap
        slot = plan.expert_of_row * cap + plan.rank
        # Source row of each slot; empty slots read an appended zero row (a gather keeps the backward a plain
        # index-add, deterministic).
        slot_source = torch.full((num_slots + 1,), num_rows, dtype=torch.long, device=rows.device)
        slot_source[torch.where(kept, slot, num_slots)] = torch.arange(num_rows, device=rows.device)
        padded_rows = torch.cat([rows, rows.new_zeros(1, hidden)])
        buffer = padded_rows[slot_source[:num_slots]]                                # [E * cap, H]

        received = all_to_all(buffer, self.ep_group)                                 # [source, local, cap, H]
        expert_major = received.view(ep, local, cap, hidden).transpose(0, 1).reshape(-1, hidden)
        counts = torch.full((local,), ep * cap, dtype=torch.long, device=rows.device)
        out = self._local_experts(expert_major, counts)
        out = out.view(local, ep, cap, hidden).transpose(0, 1).reshape(-1, hidden)
        returned = all_to_all(out, self.ep_group)                                    # [E * cap, H]
        # Dropped copies read the zero row: their combine weight is 0 either way.
        padded_out = torch.cat([returned, returned.new_zeros(1, hidden)])
        return padded_out[torch.where(kept, slot, num_slots)]
