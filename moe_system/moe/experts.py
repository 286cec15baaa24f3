"""Experts stored as stacked tensors in the released checkpoint layout, computed with grouped GEMM.

Layout (docs/model.md, MoE layers): wi_gate [E, H, 2I], wi_up [E, H, I], wo [E, I, H]; every expert is OpenMoE's
three-way SwiGLU: wo( g[:I] * silu(g[I:]) * up ), with g = x @ wi_gate and up = x @ wi_up.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def swiglu3(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """OpenMoE's activation: the 2I-wide gate splits into a linear half and a SiLU half, times the up projection."""
    linear, gated = gate.chunk(2, dim=-1)
    return linear * F.silu(gated) * up


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for these operands (it needs 16-byte aligned strides everywhere)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        ok_device = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    else:
        ok_device = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    aligned = all(size * x.element_size() % 16 == 0 for size in (x.shape[-1], weight.shape[-1]))
    return ok_device and aligned and x.dtype == weight.dtype


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, weight, offs=offsets)


def _per_expert(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    # Reference path: one matmul per expert (a host sync for the counts). Used where grouped_mm is unavailable.
    outs = [rows @ weight[e] for e, rows in enumerate(x.split(counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[-1])


def expert_ffn(x: torch.Tensor, counts: torch.Tensor, wi_gate: torch.Tensor, wi_up: torch.Tensor,
               wo: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rows x [N, H], sorted so that expert e owns the next counts[e] rows, through each row's expert -> [N, H]."""
    if torch.is_autocast_enabled(x.device.type):
        # Do what autocast does for a matmul (it does not cover torch._grouped_mm): compute in its dtype. Without
        # this, bf16 activations meet fp32 weights and grouped GEMM would be skipped for the per-expert loop.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, wi_gate, wi_up, wo = (t.to(dtype) for t in (x, wi_gate, wi_up, wo))
    if impl == "auto":
        impl = "grouped_mm" if grouped_mm_supported(x, wi_gate) and grouped_mm_supported(x, wo) else "loop"
    if impl == "grouped_mm":
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        hidden = swiglu3(_grouped(x, wi_gate, offsets), _grouped(x, wi_up, offsets))
        return _grouped(hidden, wo, offsets)
    if impl == "loop":
        sizes = counts.tolist()
        hidden = swiglu3(_per_expert(x, wi_gate, sizes), _per_expert(x, wi_up, sizes))
        return _per_expert(hidden, wo, sizes)
    raise ValueError(f"unknown expert implementation {impl!r}; use auto, grouped_mm or loop")


class GroupedExperts(nn.Module):
    """num_experts SwiGLU experts held as three stacked parameters."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.impl = impl
        self.wi_gate = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.wi_up = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.wo = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def reset_parameters(self, scale: float, generators: list[torch.Generator] | None = None) -> None:
        """Switch-style fan-in scaled init (reference: normal(0, sqrt(0.1 / fan_in))). generators: one per held
        expert, drawing that expert's rows of wi_gate, wi_up and wo in turn, so an expert's initial weights do not
        depend on how many others are held with it; None draws the whole tensors from the global generator."""
        hidden, inter = self.wi_up.shape[1], self.wi_up.shape[2]
        stds = [math.sqrt(scale / hidden), math.sqrt(scale / hidden), math.sqrt(scale / inter)]
        weights = [self.wi_gate, self.wi_up, self.wo]
        if generators is None:
            for weight, std in zip(weights, stds):
                nn.init.normal_(weight, std=std)
            return
        if len(generators) != self.wi_up.shape[0]:
            raise ValueError(f"{len(generators)} generators for {self.wi_up.shape[0]} experts")
        for e, generator in enumerate(generators):
            for weight, std in zip(weights, stds):
                nn.init.normal_(weight[e], std=std, generator=generator)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return expert_ffn(x, counts, self.wi_gate, self.wi_up, self.wo, self.impl)
