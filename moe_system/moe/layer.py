"""OpenMoE's sparse MLP: route, sort copies by expert, run the experts, combine (docs/moe.md).

How the sorted rows reach their experts is the layer's `dispatcher`: LocalDispatch here, every expert on this
device; expert parallelism sets an AllToAllDispatch (expert_parallel.py: the exchange of sorted rows between
ranks). Routing, capacity and combine stay here, so single-device and parallel layers compute the same function.
"""

import math

import torch
import torch.nn as nn

from .experts import GroupedExperts
from .permute import DispatchPlan
from .router import capacity, route


class LocalDispatch:
    """Every expert on this device: the expert-sorted rows go straight through them."""

    def __call__(self, experts: GroupedExperts, rows: torch.Tensor, plan: DispatchPlan, cap: int | None):
        # Dropped copies are computed too (no host sync to size a smaller buffer) and are then given zero weight
        # in the combine, which is exactly the reference's "contributes 0".
        return experts(rows, plan.counts)


class OpenMoeSparseMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.router_topk
        self.dispatch = config.dispatch
        self.capacity_factor_train = config.capacity_factor_train
        self.capacity_factor_eval = config.capacity_factor_eval
        self.min_capacity = config.min_capacity
        self.router_noise = config.router_noise
        self.router_renormalize = config.router_renormalize
        self.init_scale = config.expert_init_scale
        self.router_fp32 = config.router_fp32
        self.gate_weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.intermediate_size)
        self.dispatcher = LocalDispatch()
        # Detached statistics, in canonical expert order, for logging and load balancing; never read on the hot
        # path. The last forward's counts, and running totals over training forwards, which load meters read as
        # differences (load.py), so several readers with different windows never reset each other.
        # Plain attributes rather than buffers, so no checkpoint writer can mistake them for weights.
        self.last_counts = torch.zeros(config.num_experts, dtype=torch.long)
        self.last_dropped = torch.zeros(config.num_experts, dtype=torch.long)
        # On the CPU even when the model is built on the meta device (loading a checkpoint); moved on first use.
        self.routed_total = torch.zeros(config.num_experts, dtype=torch.long, device="cpu")
        self.dropped_total = torch.zeros(config.num_experts, dtype=torch.long, device="cpu")
        # Where each expert runs: expert e's rows go to physical slot expert_slot[e] (EP rank slot // E_local).
        # None means slot e; load rebalancing (parallel/rebalance.py) permutes it. The gate and everything
        # else stays in canonical order, so moving an expert changes where it is computed and nothing else.
        self.register_buffer("expert_slot", None, persistent=False)
        if config.router_bias_update_rate > 0:
            # Aux-loss-free balancing: a per-expert selection bias, nudged after every optimizer step towards
            # the under-loaded experts (see balancing.py). Persistent: it is part of the trained router. Always
            # fp32 (see _apply): steps of ~1e-3 vanish in bf16 once |bias| reaches 0.25.
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def _apply(self, fn, recurse=True):
        # model.to(bf16) (as Colossal-AI's mixed-precision module does) casts every floating buffer: keep the
        # selection bias fp32, unrounded, wherever it moves.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(self.expert_bias.device)
        return self

    def reset_parameters(self, generator: torch.Generator | None = None,
                         expert_generators: list[torch.Generator] | None = None) -> None:
        """generator draws the gate, expert_generators each held expert (GroupedExperts.reset_parameters); None:
        the global generator."""
        nn.init.normal_(self.gate_weight, std=math.sqrt(self.init_scale / self.gate_weight.shape[1]),
                        generator=generator)
        self.experts.reset_parameters(self.init_scale, expert_generators)
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def capacity(self, num_tokens: int) -> int | None:
        if self.dispatch == "dropless":
            return None
        factor = self.capacity_factor_train if self.training else self.capacity_factor_eval
        return capacity(num_tokens, self.num_experts, self.top_k, factor, self.min_capacity)

    def run_experts(self, rows: torch.Tensor, plan: DispatchPlan, cap: int | None) -> torch.Tensor:
        return self.dispatcher(self.experts, rows, plan, cap)

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = route(x, self.gate_weight, self.top_k, noise=self.router_noise, renormalize=self.router_renormalize,
                        training=self.training, fp32=self.router_fp32, selection_bias=self.expert_bias)
        slots = routing.expert_idx if self.expert_slot is None else self.expert_slot[routing.expert_idx]
        plan = DispatchPlan.build(slots, self.num_experts)
        cap = self.capacity(x.shape[0])
        rows = self.run_experts(plan.permute(x), plan, cap)
        weights = routing.weights * plan.kept(cap)
        out = plan.combine(rows, weights).to(hidden_states.dtype)
        dropped = plan.dropped(cap)
        self.last_counts = routing.counts.detach()
        self.last_dropped = (dropped if self.expert_slot is None else dropped[self.expert_slot]).detach()
        if self.training:
            self.routed_total = self.routed_total.to(x.device) + self.last_counts
            self.dropped_total = self.dropped_total.to(x.device) + self.last_dropped
        return out.view(shape), routing.aux_loss, routing.z_loss
