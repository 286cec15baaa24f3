"""What a run across nodes relies on, checked with gloo ranks on one machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchrun(worker: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "workers" / worker), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.distributed
def test_an_output_path_not_shared_by_every_rank_is_refused_before_training(tmp_path):
    shared, elsewhere = tmp_path / "run", tmp_path / "node2" / "run"
    result = torchrun("per_rank_output_path.py", str(elsewhere), "--dataset", "synthetic", "--max_steps", "1",
                      "--batch_size", "2", "--max_length", "16", "--output_path", str(shared))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "not the same directory on every rank" in errors[0] and "rank(s) 1 of 2" in errors[0]
    assert "filesystem shared by all nodes" in errors[0] and "same path" in errors[0]
    # No rank printed a traceback (torchrun adds its own summary of the failed processes, through its own code).
    assert f'File "{ROOT / "moe_system"}' not in result.stderr and "Error:" not in result.stderr.replace(
        "ChildFailedError:", ""), result.stderr[-3000:]
    # Nothing was trained or written, and the directory is free for the next run (no probe, no lock left).
    assert sorted(p.name for p in shared.iterdir()) == [], list(shared.iterdir())
    assert not elsewhere.exists()
