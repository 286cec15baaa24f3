"""The Triton cross-entropy kernel (moe_system/kernels/cross_entropy.py) against the torch path of model/loss.py,
on CPU under Triton's interpreter.

TRITON_INTERPRET=1 is read when triton is first imported, and this test process may have imported it already
(or must not have it set for the other tests), so tests/workers/cross_entropy_kernel.py runs both paths in a
process of its own and saves their results; the comparisons are here. tests/test_gpu.py compares the compiled
kernel at a realistic shape.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "cross_entropy_kernel.py"

# fp32 on both sides, the same formulas in another order (lanes then a tree for the sums, not torch's): per-token
# losses (~6) agree to ~1e-6 and gradients (|g| <= 1) to ~3e-7. A dropped smoothing or z-loss term, or an
# ignored row not masked, is off by >= 1e-2 where it lands.
LOSS_TOL = dict(rtol=1e-6, atol=1e-5)
GRAD_TOL = dict(rtol=1e-5, atol=2e-6)
# The same values, each cast to bf16 once: within one bf16 ulp (2^-7 relative), since the interpreter truncates
# where the GPU rounds to nearest (2^-8).
BF16_GRAD_TOL = dict(rtol=2 ** -7, atol=1e-6)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ce_kernel") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("case", ["plain", "zloss", "smooth_zloss", "smooth_zloss_bf16", "smooth_loss_only"])
def test_chunk_loss_and_gradient_match_torch_path(results, case):
    r, ignored = results["chunk"][case], results["chunk"]["targets"] == -100
    torch.testing.assert_close(r["loss"], r["ref_loss"], **LOSS_TOL)
    assert not r["loss"][ignored].any()
    if r["ref_grad"] is None:
        assert r["grad"] is None
        return
    grad = r["grad"]
    if grad.dtype == torch.float32:
        torch.testing.assert_close(grad, r["ref_grad"], **GRAD_TOL)
    else:  # written into the front half of each fp32 row: a view with row stride 2V
        assert grad.dtype == torch.bfloat16 and grad.stride() == (2 * grad.shape[1], 1)
        torch.testing.assert_close(grad.float(), r["ref_grad"], **BF16_GRAD_TOL)
    assert not grad[ignored].any()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_head_loss_with_kernel_matches_without(results, dtype):
    kernel, torch_path = results["head"][f"{dtype}_triton"], results["head"][f"{dtype}_torch"]
    torch.testing.assert_close(kernel["loss"], torch_path["loss"], rtol=1e-6, atol=0)
    for name in ("grad_hidden", "grad_weight"):
        assert kernel[name].dtype == torch_path[name].dtype == getattr(torch, {"fp32": "float32"}.get(dtype, "bfloat16"))
        if dtype == "fp32":
            torch.testing.assert_close(kernel[name], torch_path[name], **GRAD_TOL)
        else:  # the bf16 gradients of the logits may round one ulp apart, then pass through bf16 GEMMs
            err = ((kernel[name].float() - torch_path[name].float()).norm() / torch_path[name].float().norm()).item()
            assert err < 1e-2, f"{name}: relative L2 error {err:.3g}"
