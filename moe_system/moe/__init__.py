"""Mixture-of-Experts building blocks: routing, token permutation, grouped experts, the sparse MLP layer."""

from .router import Routing, route, capacity
from .permute import DispatchPlan
from .experts import GroupedExperts, expert_ffn
from .layer import OpenMoeSparseMLP

__all__ = ["Routing", "route", "capacity", "DispatchPlan", "GroupedExperts", "expert_ffn", "OpenMoeSparseMLP"]
