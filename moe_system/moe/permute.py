"""Sorting routed token copies by expert, and putting expert outputs back.

A token's k choices become k "copies", laid out choice-major (all first choices, then all second choices).
A stable sort by expert therefore ranks, inside every expert, first choices before second choices and then
by sequence position: exactly OpenMoE's capacity priority, and a contiguous block per expert for grouped GEMM.
No step here synchronises with the host.
"""

from dataclasses import dataclass

import torch

from .router import expert_counts


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i: where each element of the original sequence went."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


@dataclass
class DispatchPlan:
    order: torch.Tensor          # [S*k] copy index (choice-major) of each sorted row
    inverse: torch.Tensor        # [S*k] sorted row of each copy
    counts: torch.Tensor         # [E] rows per expert in the sorted layout
    rank: torch.Tensor           # [S*k] position of each sorted row inside its expert's block
    num_tokens: int
    top_k: int

    @classmethod
    def build(cls, expert_idx: torch.Tensor, num_experts: int) -> "DispatchPlan":
        num_tokens, top_k = expert_idx.shape
        flat = expert_idx.t().reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = inverse_permutation(order)
        counts = expert_counts(flat, num_experts)
        block_start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=order.device) - block_start[flat[order]]
        return cls(order, inverse, counts, rank, num_tokens, top_k)

    @property
    def token_of_row(self) -> torch.Tensor:
        return self.order % self.num_tokens

    @property
    def expert_of_row(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.counts.numel(), device=self.counts.device), self.counts,
                                       output_size=self.order.numel())

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """Token rows x [S, H] -> expert-sorted copies [S*k, H]."""
        return x[self.token_of_row]

    def kept(self, capacity: int | None) -> torch.Tensor:
        """[S, k] mask of copies that fit in their expert's capacity (all True when dropless)."""
        if capacity is None:
            return torch.ones(self.top_k, self.num_tokens, dtype=torch.bool, device=self.order.device).t()
        return (self.rank < capacity)[self.inverse].view(self.top_k, self.num_tokens).t()

    def combine(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Expert-sorted outputs [S*k, H] and weights [S, k] -> weighted sum per token [S, H].

        A gather with the inverse permutation (not a scatter-add) keeps the sum order fixed, hence deterministic.
        """
        copies = rows[self.inverse].view(self.top_k, self.num_tokens, -1)
        return (copies * weights.t().unsqueeze(-1).to(rows.dtype)).sum(dim=0)

    def dropped(self, capacity: int | None) -> torch.Tensor:
        """[E] copies per expert that did not fit in capacity."""
        if capacity is None:
            return torch.zeros_like(self.counts)
        return (self.counts - capacity).clamp(min=0)
