"""Experts stored as stacked tensors in the released checkpoint layout, computed with grouped GEMM.

Layout (docs/model.md, MoE layers): wi_gate [E, H, 2I], wi_up [E, H, I], wo [E, I, H]; every expert is OpenMoE's
three-way SwiGLU: wo( g[:I] * silu(g[I:]) * up ), with g = x @ wi_gate and up = x @ wi_up.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe_system.kernels import triton_usable

_recompute_swiglu = False


@contextmanager
def recomputed_swiglu(enabled: bool = True):
    """While enabled, every swiglu3 that autograd records keeps only its inputs and recomputes its product in
    backward (selective activation recompute, docs/model.md)."""
    global _recompute_swiglu
    before, _recompute_swiglu = _recompute_swiglu, enabled
    try:
        yield
    finally:
        _recompute_swiglu = before


def _swiglu3_product(linear: torch.Tensor, gated: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return linear * F.silu(gated) * up


def swiglu3(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """OpenMoE's activation: the 2I-wide gate splits into a linear half and a SiLU half, times the up projection.
    Where no gradient is needed, gate and up (fresh GEMM outputs at every caller) are overwritten."""
    linear, gated = gate.chunk(2, dim=-1)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        if _recompute_swiglu:
            # Backward then holds gate and up (3I per row) but not silu(gated) and linear * silu(gated) (2I
            # more), which it recomputes with the same two elementwise ops: the gradients are bit for bit equal.
            return checkpoint(_swiglu3_product, linear, gated, up, use_reentrant=False, preserve_rng_state=False)
        return _swiglu3_product(linear, gated, up)
    # No backward to feed (inference): work in the projections' own memory instead of three [N, I] temporaries.
    return up.mul_(F.silu(gated, inplace=True).mul_(linear))


class _CastSideBySide(torch.autograd.Function):
    """wi_gate [E, H, 2I] and wi_up [E, H, I] cast into one [E, H, 3I] tensor of `dtype`, in one pass."""

    @staticmethod
    def forward(ctx, wi_gate, wi_up, dtype):
        wi = wi_gate.new_empty(*wi_gate.shape[:-1], wi_gate.shape[-1] + wi_up.shape[-1], dtype=dtype)
        wi[..., :wi_gate.shape[-1]].copy_(wi_gate)
        wi[..., wi_gate.shape[-1]:].copy_(wi_up)
        ctx.split, ctx.dtypes = wi_gate.shape[-1], (wi_gate.dtype, wi_up.dtype)
        return wi

    @staticmethod
    def backward(ctx, grad):
        return grad[..., :ctx.split].to(ctx.dtypes[0]), grad[..., ctx.split:].to(ctx.dtypes[1]), None


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


def triton_grouped_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton grouped GEMM (moe_system/kernels/grouped_gemm.py) runs for these operands."""
    return triton_usable(x) and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _triton_grouped(x: torch.Tensor, weight: torch.Tensor, row_ends: torch.Tensor) -> torch.Tensor:
    from moe_system.kernels.grouped_gemm import grouped_mm  # imports triton, which reads TRITON_INTERPRET once
    return grouped_mm(x, weight, row_ends)


def _per_expert(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    # Reference path: one matmul per expert (a host sync for the counts).
    outs = [rows @ weight[e] for e, rows in enumerate(x.split(counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[-1])


def _through(x: torch.Tensor, weights_in: tuple, wo: torch.Tensor, mm) -> torch.Tensor:
    """The SwiGLU FFN with mm(rows, weight) as its GEMM; weights_in: (wi_gate, wi_up) or their side-by-side wi."""
    if len(weights_in) == 1:
        gate_up = mm(x, weights_in[0])
        inter = gate_up.shape[-1] // 3
        hidden = swiglu3(gate_up[..., :2 * inter], gate_up[..., 2 * inter:])
    else:
        hidden = swiglu3(*(mm(x, w) for w in weights_in))
    return mm(hidden, wo)


# Up to one GEMM tile of rows (128) an expert's GEMM reads all of its weights for at most as many flops per byte as
# a GPU's balance point (A100: ~150 bf16 flop/B), so its time is that read: padding every expert to the largest
# one's rows costs no time, and one batched GEMM replaces a launch per expert. Above it, padding costs compute.
PAD_ROWS = 128


def _padded_bmm(x: torch.Tensor, counts: torch.Tensor, rows: int, weights_in: tuple, wo: torch.Tensor):
    """Every expert's rows zero-padded to `rows`, through torch.bmm: zero rows give zero outputs and gradients."""
    num_experts, width = counts.shape[0], x.shape[-1]
    if x.shape[0] == num_experts * rows:  # every expert has exactly `rows`: no padding, no index
        return _through(x.view(num_experts, rows, width), weights_in, wo, torch.bmm).view(x.shape[0], wo.shape[-1])
    starts = torch.cumsum(counts, 0) - counts
    expert = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts, output_size=x.shape[0])
    slot = expert * rows + torch.arange(x.shape[0], device=x.device) - starts[expert]
    padded = x.new_zeros(num_experts * rows, width).index_copy(0, slot, x)
    out = _through(padded.view(num_experts, rows, width), weights_in, wo, torch.bmm)
    return out.view(num_experts * rows, wo.shape[-1]).index_select(0, slot)


def expert_ffn(x: torch.Tensor, counts: torch.Tensor, wi_gate: torch.Tensor, wi_up: torch.Tensor,
               wo: torch.Tensor, impl: str = "auto", rows_per_expert: int | None = None) -> torch.Tensor:
    """Rows x [N, H], sorted so that expert e owns the next counts[e] rows, through each row's expert -> [N, H].

    rows_per_expert: the callers that know every count equals it without a host sync (capacity-mode expert
    parallelism) say so; the fallback then needs none. impl: auto, grouped_mm, triton (our grouped GEMM kernel, for
    CUDA devices and dtypes grouped_mm has no kernel for), bmm (padded batched GEMM) or loop (one GEMM per expert,
    the reference)."""
    weights_in = (wi_gate, wi_up)
    if torch.is_autocast_enabled(x.device.type):
        # Do what autocast does for a matmul (it does not cover torch._grouped_mm): compute in its dtype. Without
        # this, bf16 activations meet fp32 weights and grouped GEMM would be skipped for the per-expert loop.
        # The cast copies the weights anyway: written side by side, gate and up are one GEMM at no extra cost.
        # (Weights already in the compute dtype are not put side by side: that copy would cost a weight read and
        # write each call, more than the one launch and one read of x it would save.)
        dtype = torch.get_autocast_dtype(x.device.type)
        x, wo = x.to(dtype), wo.to(dtype)
        weights_in = (_CastSideBySide.apply(wi_gate, wi_up, dtype),)
    if impl not in ("auto", "grouped_mm", "triton", "bmm", "loop"):
        raise ValueError(f"unknown expert implementation {impl!r}; use auto, grouped_mm, triton, bmm or loop")
    if impl == "grouped_mm" or (impl == "auto" and all(grouped_mm_supported(x, w) for w in (*weights_in, wo))):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return _through(x, weights_in, wo, lambda rows, w: _grouped(rows, w, offsets))
    triton_ok = all(triton_grouped_supported(x, w) for w in (*weights_in, wo))
    if impl == "triton" and not triton_ok:
        raise ValueError(f"expert implementation 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on "
                         f"the CPU) and fp16, bf16 or fp32 rows and weights of one dtype, not {x.dtype} rows on "
                         f"{x.device.type}; use auto")
    # Capacity mode keeps its padded bmm (equal counts: no padding, no sync); the CPU keeps the paths below. fp32
    # rows stay on cuBLAS's per-expert SGEMMs: without TF32 a Triton fp32 dot runs on the CUDA cores too, and it is
    # not measured to beat them (impl="triton" still takes it).
    auto_triton = triton_ok and rows_per_expert is None and x.device.type == "cuda" and x.dtype != torch.float32
    if impl == "triton" or (impl == "auto" and auto_triton):
        row_ends = torch.cumsum(counts, 0, dtype=torch.int32)  # stays on the device: the kernel reads it there
        return _through(x, weights_in, wo, lambda rows, w: _triton_grouped(rows, w, row_ends))
    if impl != "loop" and rows_per_expert is not None:
        return _padded_bmm(x, counts, rows_per_expert, weights_in, wo)
    sizes = counts.tolist()  # the one host sync of the other fallbacks
    most = max(sizes, default=0)
    if impl == "bmm" or (impl == "auto" and most <= PAD_ROWS):
        return _padded_bmm(x, counts, most, weights_in, wo)
    return _through(x, weights_in, wo, lambda rows, w: _per_expert(rows, w, sizes))


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
