"""Worker: the Triton grouped GEMM under Triton's interpreter on the CPU, checked against the per-expert loop.

Usage: python tests/workers/grouped_gemm_interpreted.py OUT_JSON
TRITON_INTERPRET must be set before triton is first imported, hence a process of its own. Writes
{check name: "ok" or what failed}; each check runs even when another one fails.
"""

import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]

import torch  # noqa: E402

import moe_system.moe.experts as experts  # noqa: E402
from moe_system.kernels.grouped_gemm import INTERPRETER_BLOCKS, grouped_mm  # noqa: E402

BLOCK_M = INTERPRETER_BLOCKS[0]
# E = 4, K = 24, Nout = 40 (neither a multiple of the 16-wide blocks), 50 rows: a count below one tile (13), an
# expert with none, one of several tiles (20) and one not a multiple of BLOCK_M (17).
COUNTS = [13, 0, 20, 17]
K, N_OUT = 24, 40
# fp32: the kernel sums the same products in another order, ~1e-7 relative on these O(1) values; a wrong row,
# expert or masked edge is off by O(1). bf16: operands and outputs rounded to 8 bits (2^-9 ~ 2e-3 relative each).
FP32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
assert any(c % BLOCK_M for c in COUNTS if c) and 0 in COUNTS


def loop_mm(x, w, counts):
    return torch.cat([rows @ w[e] for e, rows in enumerate(x.split(counts))])


def operands(dtype, counts=COUNTS, experts_=None):
    g = torch.Generator().manual_seed(0)
    num = experts_ or len(counts)
    x = torch.randn(sum(counts), K, generator=g)
    w = torch.randn(num, K, N_OUT, generator=g) * K ** -0.5
    dy = torch.randn(sum(counts), N_OUT, generator=g)
    return x.to(dtype), w.to(dtype), dy.to(dtype)


def grads(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y, x.grad, w.grad


def check_kernel(dtype, tol):
    x, w, dy = operands(dtype)
    ends = torch.cumsum(torch.tensor(COUNTS), 0)
    got = grads(lambda a, b: grouped_mm(a, b, ends), x, w, dy)
    # bf16: the reference runs in fp32 on the same bf16 values
    ref = grads(lambda a, b: loop_mm(a, b, COUNTS), x.float(), w.float(), dy.float())
    assert got[0].dtype == dtype and got[2].dtype == dtype
    for name, a, b in zip(("out", "grad_x", "grad_w"), got, ref):
        torch.testing.assert_close(a.float(), b, **tol, msg=lambda m, name=name: f"{name}: {m}")
    assert not got[2][COUNTS.index(0)].any(), "an expert with no rows must get a zero weight gradient"


def check_fp32():
    check_kernel(torch.float32, FP32_TOL)


def check_bf16():
    check_kernel(torch.bfloat16, BF16_TOL)


def check_expanded_and_empty():
    """A gradient of stride 0 (from .sum()) is read through its strides; no rows at all give an empty output and
    zero weight gradients."""
    x, w, _ = operands(torch.float32)
    ends = torch.cumsum(torch.tensor(COUNTS), 0)
    got = grads(lambda a, b: grouped_mm(a, b, ends).sum(), x, w, torch.tensor(1.0))
    ref = grads(lambda a, b: loop_mm(a, b, COUNTS).sum(), x, w, torch.tensor(1.0))
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, **FP32_TOL)
    x, w, dy = operands(torch.float32, counts=[0, 0, 0])
    y, dx, dw = grads(lambda a, b: grouped_mm(a, b, torch.zeros(3, dtype=torch.int64)), x, w, dy)
    assert y.shape == (0, N_OUT) and dx.shape == (0, K) and dw.shape == w.shape and not dw.any()


def expert_case(dtype=torch.float32, hidden=24, inter=20):
    g = torch.Generator().manual_seed(1)
    num = len(COUNTS)
    x = torch.randn(sum(COUNTS), hidden, generator=g)
    ws = [torch.randn(num, hidden, 2 * inter, generator=g) * hidden ** -0.5,
          torch.randn(num, hidden, inter, generator=g) * hidden ** -0.5,
          torch.randn(num, inter, hidden, generator=g) * inter ** -0.5]
    return torch.tensor(COUNTS), x.to(dtype), [w.to(dtype) for w in ws], torch.randn(x.shape, generator=g)


def ffn_results(counts, x, weights, grad_out, impl):
    xi = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in weights]
    y = experts.expert_ffn(xi, counts, *ws, impl=impl)
    y.float().backward(grad_out)
    return [y, xi.grad, *(w.grad for w in ws)]


def check_expert_ffn():
    """The SwiGLU FFN on the kernel, with no count read back to the host, vs the per-expert loop: output and the
    gradients of x, wi_gate, wi_up and wo."""
    case = expert_case()
    reference = ffn_results(*case, impl="loop")

    def no_sync(*args):
        raise AssertionError("host sync")

    calls = []
    real = experts._triton_grouped
    experts._triton_grouped = lambda x, w, ends: calls.append(w.shape[-1]) or real(x, w, ends)
    saved = torch.Tensor.tolist, torch.Tensor.item
    torch.Tensor.tolist, torch.Tensor.item = no_sync, no_sync
    try:
        got = ffn_results(*case, impl="triton")
    finally:
        torch.Tensor.tolist, torch.Tensor.item = saved
        experts._triton_grouped = real
    assert calls == [40, 20, 24], calls
    for name, a, b in zip(("out", "grad_x", "grad_wi_gate", "grad_wi_up", "grad_wo"), got, reference):
        torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m, name=name: f"{name}: {m}")


def check_autocast_side_by_side():
    """Under bf16 autocast the fp32 gate and up weights are cast into one [E, H, 3I] weight: one kernel GEMM of
    width 3I, fp32 gradients for the fp32 parameters, and the loop's values under the same autocast."""
    case = expert_case()
    widths = []
    real = experts._triton_grouped
    experts._triton_grouped = lambda x, w, ends: widths.append(w.shape[-1]) or real(x, w, ends)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ffn_results(*case, impl="triton")
    finally:
        experts._triton_grouped = real
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = ffn_results(*case, impl="loop")
    assert widths == [60, 24], widths
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    for a, b in zip(got, reference):
        torch.testing.assert_close(a.float(), b.float(), **BF16_TOL)


def check_auto_stays_off_on_cpu():
    """auto keeps the CPU's own paths even where the interpreter could run the kernel."""
    calls = []
    real = experts._triton_grouped
    experts._triton_grouped = lambda *a: calls.append(1) or real(*a)
    try:
        ffn_results(*expert_case(), impl="auto")
    finally:
        experts._triton_grouped = real
    assert not calls


CHECKS = [check_fp32, check_bf16, check_expanded_and_empty, check_expert_ffn, check_autocast_side_by_side,
          check_auto_stays_off_on_cpu]

if __name__ == "__main__":
    results = {}
    for check in CHECKS:
        try:
            check()
            results[check.__name__] = "ok"
        except Exception:
            results[check.__name__] = traceback.format_exc(limit=3)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
