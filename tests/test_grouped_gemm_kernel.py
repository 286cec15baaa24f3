"""The Triton grouped GEMM (moe_system/kernels/grouped_gemm.py) on the CPU, under Triton's interpreter.

TRITON_INTERPRET=1 is read when triton is first imported, and this pytest process may import triton without it
(or a GPU test may need the compiled kernels): the interpreted checks run in one subprocess,
tests/workers/grouped_gemm_interpreted.py, whose results each test below reads.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_system.moe import expert_ffn

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["check_fp32", "check_bf16", "check_expanded_and_empty", "check_expert_ffn", "check_autocast_side_by_side",
          "check_auto_stays_off_on_cpu"]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    out = tmp_path_factory.mktemp("grouped_gemm") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "grouped_gemm_interpreted.py"), str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("check", CHECKS)
def test_interpreted_kernel(interpreted, check):
    assert set(interpreted) == set(CHECKS)
    assert interpreted[check] == "ok", interpreted[check]


def test_unknown_or_unusable_implementation_is_refused():
    x, counts = torch.randn(3, 8), torch.tensor([3])
    weights = [torch.randn(1, 8, 8), torch.randn(1, 8, 4), torch.randn(1, 4, 8)]
    with pytest.raises(ValueError, match="use auto, grouped_mm, triton, bmm or loop"):
        expert_ffn(x, counts, *weights, impl="cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process: the kernel can run on the CPU")
    with pytest.raises(ValueError, match="'triton' needs triton and a CUDA device"):
        expert_ffn(x, counts, *weights, impl="triton")
