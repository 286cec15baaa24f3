"""Kill a training run with SIGKILL mid-way, resume it, and land on exactly the parameters of a run that was
never interrupted (fp32 on CPU: every operation is deterministic, so bit-exact is the right bar)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max_steps", "12", "--save_interval", "4", "--log_interval", "4", "--batch_size", "8",
        "--eval_samples", "8", "--precision", "fp32", "--zero_stage", "0"]


def command(nproc: int, output: Path, *extra) -> list[str]:
    launcher = [sys.executable, "train.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "train.py"]
    return [*launcher, *ARGS, "--output_path", str(output), *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def final_weights(output: Path) -> dict:
    files = sorted((output / "final").glob("*.safetensors"))
    assert files, f"no weights in {output / 'final'}"
    weights = {}
    for f in files:
        weights.update(load_file(f))
    return weights


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_is_bit_exact(tmp_path, nproc):
    straight = tmp_path / "straight"
    subprocess.run(command(nproc, straight), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)

    broken = tmp_path / "broken"
    proc = subprocess.Popen(command(nproc, broken), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (broken / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: torchrun and its workers
    proc.wait()
    assert not (broken / "final").exists()

    resumed = subprocess.run(command(nproc, broken, "--resume", "latest"), cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stdout

    a, b = final_weights(straight), final_weights(broken)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def test_resume_with_nothing_to_resume_is_a_clear_error(tmp_path):
    out = subprocess.run(command(1, tmp_path / "empty", "--resume", "latest"), cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "no checkpoint-STEP directory" in out.stderr


def test_resume_into_another_layout_is_refused_and_the_weights_load_anywhere(tmp_path):
    out = tmp_path / "ep2"
    first = subprocess.run(command(2, out, "--max_steps", "4"), cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run(command(1, out, "--resume", "latest"), cwd=ROOT, env=env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode != 0 and "Traceback" not in resumed.stderr
    assert "resume with the same layout" in resumed.stderr
    weights = out / "checkpoint-4" / "model"
    fresh = subprocess.run(command(1, tmp_path / "ep1", "--load_checkpoint", str(weights)), cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
