"""Non-finite gradients with a finite loss: the step is skipped in every optimizer path, on every rank alike,
counted and logged; K in a row stop the run with one clear message and the last good checkpoint intact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_common import launch

ROOT = Path(__file__).resolve().parents[1]

CASES = [  # the optimizer paths of parallel/plugin.py, with and without clipping; 2 processes each
    dict(name="ep_z0_fp32_clip", plugin="ep", zero=0, precision="fp32", max_norm=1.0),  # OpenMoeNaiveOptimizer
    dict(name="ep_z0_fp32_noclip", plugin="ep", zero=0, precision="fp32", max_norm=0),
    dict(name="ep_z0_bf16", plugin="ep", zero=0, precision="bf16"),  # OpenMoeAMPOptimizer
    dict(name="ep_z0_fp16", plugin="ep", zero=0, precision="fp16"),
    dict(name="ep_z1_fp32_noclip", plugin="ep", zero=1, precision="fp32", max_norm=0),  # OpenMoeZeroOptimizer
    dict(name="ep_z1_fp16", plugin="ep", zero=1, precision="fp16"),
    dict(name="ep_z2_bf16_clip", plugin="ep", zero=2, precision="bf16", max_norm=1.0),
    dict(name="pp2_z0_fp32", plugin="hybrid", zero=0, precision="fp32", pp=2, ep=1, moe_dp=1, microbatch=2),
    dict(name="pp2_z1_bf16", plugin="hybrid", zero=1, precision="bf16", pp=2, ep=1, moe_dp=1, microbatch=2),
]


@pytest.mark.distributed
def test_every_optimizer_path_skips_a_nonfinite_gradient_on_every_rank():
    # The gradient is poisoned on the last rank only: the all-reduced norm must make every rank skip.
    proc = launch("dist_nonfinite.py", 2, [json.dumps(c) for c in CASES], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert all(f"case {c['name']} ok" in proc.stdout for c in CASES), proc.stdout[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_nonfinite_gradients_are_skipped_and_k_in_a_row_stop_the_run(tmp_path, nproc):
    """Step groups 3 and 6-8 get an inf gradient (on rank 1 only with 2 processes: ZeRO-2 under --plugin ep):
    group 3 is skipped and the run goes on; 6, 7, 8 are three in a row and stop it after checkpoint-4."""
    out = tmp_path / "run"
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", "2"]
    layout = [] if nproc == 1 else ["--plugin", "ep", "--zero_stage", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FAULT_INF_GRAD": "3,6,7,8",
           "FAULT_INF_RANKS": "" if nproc == 1 else "1"}
    result = subprocess.run(
        ["timeout", "-k", "5", "200", *launcher, str(ROOT / "tests" / "workers" / "fault_launcher.py"), *layout,
         "--max_steps", "10", "--batch_size", "4", "--save_interval", "1",
         "--save_total_limit", "0", "--log_interval", "1", "--max_nonfinite_steps", "3", "--output_path", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode not in (0, 124), result.stderr[-3000:]
    message = "3 consecutive steps had a non-finite loss or gradient (last at step 5: gradient)"
    assert f"error: {message}" in result.stderr, result.stderr[-3000:]
    assert "NonFiniteLossError" not in result.stderr  # one clear line, not a traceback of it
    assert nproc == 2 or "Traceback" not in result.stderr  # (torchrun itself prints one for a failed worker)
    assert "step 3: non-finite gradient, update skipped (1 in a row)" in result.stdout + result.stderr

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skips = [(r["step"], r["train/skipped_nonfinite"]) for r in records if "train/skipped_nonfinite" in r]
    assert skips == [(2, 1), (4, 2), (4, 3), (4, 4)]  # logged at the last applied step
    assert [r["step"] for r in records if "train/lm_loss" in r] == [1, 2, 3, 4]  # the loss stayed finite

    # Every applied step saved, nothing after the failure, no half-written checkpoint; the weights are finite.
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == [1, 2, 3, 4]
    assert not list(out.glob(".checkpoint-*.partial")) and not (out / "final").exists()
    for step in (3, 4):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["skipped_steps"] == 1 and state["consumed_steps"] == step + 1
        for f in (out / f"checkpoint-{step}" / "model").glob("*.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(f).values()), f
