"""Grouped GEMM for the expert FFN: Y[rows of e] = X[rows of e] @ W[e], rows sorted by expert, with no host sync.

For the devices and dtypes torch._grouped_mm has no kernel for (sm80-sm89, fp16/fp32 operands). The row counts
stay on the device: the grid is sized on the host from an upper bound of the row tiles every expert can need,
cdiv(N, BLOCK_M) + E (each expert wastes less than one tile on its ragged end), and each program finds its own
expert and row tile from the device-side row ends, exiting at once when it is past the last tile.
"""

import os

import torch
import triton
import triton.language as tl


def _interpreter_scalar_index() -> None:
    """Under the interpreter a scalar is a 1-element 1-D numpy array, and its __index__ (used by a loop with a
    runtime bound) calls int() on it, which numpy 2.4 refuses: read the element instead."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "reads_the_element", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch.reads_the_element = True
    interpreter._patch_lang_tensor = patch


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_scalar_index()


@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, y_ptr, ends_ptr, num_experts, n_out, k_in,
                       stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
                       EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    tile = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_POW2)
    in_range = experts < num_experts
    row_ends = tl.load(ends_ptr + experts, mask=in_range, other=0)
    row_starts = tl.load(ends_ptr + experts - 1, mask=in_range & (experts > 0), other=0)
    tiles = tl.where(in_range, (row_ends - row_starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_ends = tl.cumsum(tiles, 0)
    # Expert e owns tiles [tile_ends[e] - tiles[e], tile_ends[e]); experts with no rows own none.
    expert = tl.sum(((tile_ends <= tile) & in_range).to(tl.int32), 0)
    if expert >= num_experts:
        return
    mine = experts == expert
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
    row_end = tl.sum(tl.where(mine, row_ends, 0), 0)
    row0 = tl.sum(tl.where(mine, row_starts, 0), 0) + (tile - first_tile) * BLOCK_M

    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < row_end, cols < n_out
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_in
        a = tl.load(x_rows + k.to(tl.int64)[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + k.to(tl.int64)[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols.to(tl.int64)[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_weight_grad_kernel(x_ptr, dy_ptr, dw_ptr, ends_ptr, k_in, n_out,
                                stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dW[e][k tile, n tile] = X[rows of e, k tile]^T @ dY[rows of e, n tile], over that expert's rows."""
    n_tiles = tl.cdiv(n_out, BLOCK_N)
    k_tile, n_tile, expert = tl.program_id(0) // n_tiles, tl.program_id(0) % n_tiles, tl.program_id(1)
    row_end = tl.load(ends_ptr + expert)
    row_start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, col_ok = ks < k_in, cols < n_out
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # an expert with no rows stores these zeros
    for m0 in range(0, row_end - row_start, BLOCK_M):
        rows = row_start + m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        xt = tl.load(x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks.to(tl.int64)[:, None] * stride_xk,
                     mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols.to(tl.int64)[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            xt, dy = xt.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
    dw = dw_ptr + expert.to(tl.int64) * stride_we + ks.to(tl.int64)[:, None] * stride_wk \
        + cols.to(tl.int64)[None, :] * stride_wn
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). On sm80: 64-row tiles waste at most 63 rows per expert,
# a 64x128 fp32 accumulator is 64 registers a thread at 4 warps, and 3 stages of bf16 tiles take 36 KiB of shared
# memory (fp32: 72 KiB, within the 99 KiB of sm86/sm89). The interpreter runs every program one after another
# in numpy: small tiles keep its tests quick and still cover several tiles and the masked edges.
FORWARD_BLOCKS = (64, 128, 32, 4, 3)
WEIGHT_GRAD_BLOCKS = (32, 64, 128, 4, 3)  # rows per step, then the K x Nout tile of dW
INTERPRETER_BLOCKS = (16, 16, 16, 1, 1)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's matmul setting: TF32 only where torch would use it for a matmul too (16-bit
    # operands have one precision: they get Triton's default).
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _interpreted_bf16(x: torch.Tensor) -> bool:
    """Where the interpreter would not compute what the GPU does: its dot multiplies bf16 tiles as the uint16 it
    stores them in, and its fp32 -> bf16 cast truncates where the GPU rounds to nearest even. There the kernel
    multiplies the same values in fp32 (products of bf16 values are exact in fp32, as in the GPU's MMA) and
    writes fp32, which torch rounds."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def _stored_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if _interpreted_bf16(x) else x.dtype


def _blocks(device: torch.device, blocks: tuple) -> tuple:
    return INTERPRETER_BLOCKS if device.type == "cpu" else blocks


def _mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, transpose_w: bool = False) -> torch.Tensor:
    """y [N, n_out] with y[rows of e] = x[rows of e] @ w[e] (or w[e]^T, read through swapped strides, no copy)."""
    num_experts, n_out = ends.shape[0], w.shape[1 if transpose_w else 2]
    w_strides = (w.stride(0), w.stride(2), w.stride(1)) if transpose_w else w.stride()
    y = x.new_empty(x.shape[0], n_out, dtype=_stored_dtype(x))
    if x.shape[0] == 0 or n_out == 0 or num_experts == 0:
        return y.to(x.dtype)
    block_m, block_n, block_k, warps, stages = _blocks(x.device, FORWARD_BLOCKS)
    grid = (triton.cdiv(x.shape[0], block_m) + num_experts, triton.cdiv(n_out, block_n))
    _grouped_mm_kernel[grid](x, w, y, ends, num_experts, n_out, x.shape[1], x.stride(0), x.stride(1), *w_strides,
                             y.stride(0), y.stride(1), EXPERTS_POW2=triton.next_power_of_2(num_experts),
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(x.dtype),
                             UPCAST=_interpreted_bf16(x), num_warps=warps, num_stages=stages)
    return y.to(x.dtype)


def _weight_grad(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    num_experts, k_in, n_out = ends.shape[0], x.shape[1], dy.shape[1]
    dw = x.new_empty(num_experts, k_in, n_out, dtype=_stored_dtype(x))
    if dw.numel() == 0:
        return dw.to(x.dtype)
    block_m, block_k, block_n, warps, stages = _blocks(x.device, WEIGHT_GRAD_BLOCKS)
    grid = (triton.cdiv(k_in, block_k) * triton.cdiv(n_out, block_n), num_experts)
    _grouped_weight_grad_kernel[grid](x, dy, dw, ends, k_in, n_out, x.stride(0), x.stride(1), dy.stride(0),
                                      dy.stride(1), *dw.stride(), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
                                      PRECISION=_precision(x.dtype), UPCAST=_interpreted_bf16(x), num_warps=warps,
                                      num_stages=stages)
    return dw.to(x.dtype)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, ends):
        ctx.save_for_backward(x, w, ends)
        return _mm(x, w, ends)

    @staticmethod
    def backward(ctx, dy):
        x, w, ends = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dY @ W[e]^T: the same kernel reading W transposed through its strides
            dx = _mm(dy, w, ends, transpose_w=True)
        if ctx.needs_input_grad[1]:
            dw = _weight_grad(x, dy, ends)
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, row_ends: torch.Tensor) -> torch.Tensor:
    """x [N, K] sorted by expert, w [E, K, Nout], row_ends [E] int32 = cumsum(counts) on x's device -> [N, Nout]
    in x's dtype, fp32 accumulation. Differentiable in x and w; nothing is read back to the host."""
    if x.dtype != w.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"grouped_mm takes fp16, bf16 or fp32 operands of one dtype, not {x.dtype} and {w.dtype}")
    return _GroupedMM.apply(x, w, row_ends.to(torch.int32))
