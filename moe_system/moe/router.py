"""Token-choice top-k routing as in OpenMoE / ST-MoE (docs/moe.md, Routing).

The router always runs in fp32: the softmax over experts and the z-loss are numerically fragile in bf16.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    expert_idx: torch.Tensor  # [S, k] long, column 0 is every token's first choice
    weights: torch.Tensor     # [S, k] fp32 combine weights (raw softmax probs unless renormalised)
    aux_loss: torch.Tensor    # scalar, Switch load-balancing loss E * sum_e f_e * P_e (balanced top-k value: k)
    z_loss: torch.Tensor      # scalar, mean(logsumexp(logits)^2)
    counts: torch.Tensor      # [E] long, tokens that chose each expert (before any capacity drop)


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, *, noise: str = "none",
          renormalize: bool = False, training: bool = False, fp32: bool = True,
          selection_bias: torch.Tensor | None = None) -> Routing:
    """Route tokens x [S, H] to top_k of E experts with gate_weight [E, H].

    selection_bias [E] (aux-loss-free balancing, DeepSeek-V3) shifts which experts are chosen but not the
    combine weights, which stay the router's probabilities of the chosen experts.
    """
    num_experts = gate_weight.shape[0]
    if fp32:
        x, gate_weight = x.float(), gate_weight.float()
    if training and noise == "jitter":  # Switch Transformer: multiplicative noise on the router input
        x = x * torch.empty_like(x).uniform_(0.99, 1.01)
    # Under autocast F.linear would run in bf16 whatever its inputs; fp32 routing has to opt out explicitly.
    with torch.autocast(x.device.type, enabled=torch.is_autocast_enabled(x.device.type) and not fp32):
        logits = F.linear(x, gate_weight)
    if training and noise == "gaussian":  # noisy top-k with std 1/E, as in the reference's "Gaussian" policy
        logits = logits + torch.randn_like(logits) / num_experts
    logits = logits.float()  # softmax and z-loss in fp32 even when the matmul was not
    probs = logits.softmax(dim=-1)
    if selection_bias is None:
        weights, expert_idx = probs.topk(top_k, dim=-1)
    else:
        expert_idx = (probs + selection_bias).topk(top_k, dim=-1).indices
        weights = probs.gather(-1, expert_idx)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)

    counts = expert_counts(expert_idx.flatten(), num_experts)
    # Fraction of tokens sent to each expert (union over the k choices, so it sums to k) times mean probability.
    fraction = counts.float() / x.shape[0]
    aux_loss = num_experts * (fraction * probs.mean(dim=0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return Routing(expert_idx, weights, aux_loss, z_loss, counts)


def expert_counts(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] long: how many entries of expert_idx name each expert. Not torch.bincount: on CUDA it reads its input's
    maximum back to the host (even with minlength), a sync in every MoE layer. Integer adds: exact in any order."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_idx.device)
    return counts.scatter_add_(0, expert_idx, torch.ones_like(expert_idx))


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert in capacity mode: floor(k*cf*S/E), rounded up to even, at least min_capacity."""
    cap = int(top_k * capacity_factor * num_tokens / num_experts)
    cap += cap % 2
    return max(cap, min_capacity)
