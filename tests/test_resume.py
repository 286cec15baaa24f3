"""Kill a training run with SIGKILL mid-way, resume it, and land on exactly the parameters of a run that was
never interrupted (fp32 on CPU: every operation is deterministic, so bit-exact is the right bar)."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from moe_system.training.checkpoint import list_checkpoints

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


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run per process count (checkpoints at steps 4, 8, 12), made once for the tests that
    compare against it or resume from a copy of it."""
    @functools.cache
    def run(nproc: int) -> Path:
        out = tmp_path_factory.mktemp(f"straight{nproc}") / "run"
        subprocess.run(command(nproc, out), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=600)
        return out
    return run


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_is_bit_exact(tmp_path, nproc, straight_run):
    straight = straight_run(nproc)

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


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_into_another_layout_is_refused_and_the_weights_load_anywhere(tmp_path, straight_run):
    out = tmp_path / "ep2"
    shutil.copytree(straight_run(2), out)  # a copy: the refused resume must not reach the shared run
    resumed = subprocess.run(command(1, out, "--resume", "latest", "--max_steps", "16"), cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode != 0 and "Traceback" not in resumed.stderr
    assert "resume with the same layout" in resumed.stderr
    weights = out / "checkpoint-4" / "model"
    fresh = subprocess.run(command(1, tmp_path / "ep1", "--load_checkpoint", str(weights)), cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_while_saving_leaves_the_previous_checkpoint_and_resumes_bit_exact(tmp_path):
    """SIGKILL in the middle of writing checkpoint-8 (model and optimizer written, not yet published): the
    .checkpoint-8.partial leftover is no checkpoint, --resume latest takes checkpoint-4, and the run ends with the
    weights of an uninterrupted one. A two-source mix: the per-source token counts continue across the resume."""
    mix = ("--dataset", "bundled:0.5,bundled-text:0.5", "--packing", "pack", "--log_interval", "1")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(command(1, straight, *mix), cwd=ROOT, env=env(), check=True, capture_output=True, timeout=300)

    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "fault_launcher.py"),
                             *command(1, broken, *mix)[2:]],
                            cwd=ROOT, env={**env(), "FAULT_KILL_IN_SAVE": "2"}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = broken / ".checkpoint-8.partial"
    assert list((partial / "model").glob("*.safetensors")) and (partial / "optimizer").is_dir()
    assert not (partial / "trainer_state.json").exists() and not (broken / "checkpoint-8").exists()
    assert list_checkpoints(str(broken)) == [(4, str(broken / "checkpoint-4"))]

    resumed = subprocess.run(command(1, broken, *mix, "--resume", "latest"), cwd=ROOT, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step 4 from {broken / 'checkpoint-4'}" in resumed.stdout
    assert not partial.exists() and [s for s, _ in list_checkpoints(str(broken))] == [4, 8, 12]

    a, b = final_weights(straight), final_weights(broken)
    assert a.keys() == b.keys() and all((a[key] == b[key]).all() for key in a)

    def token_counts(run: Path) -> dict:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if "data/bundled/tokens" in r][-1]
        return {k: v for k, v in last.items() if k.startswith("data/")} | {"step": last["step"]}

    assert token_counts(straight) == token_counts(broken)
    assert token_counts(broken)["step"] == 12 and token_counts(broken)["data/bundled-text/tokens"] > 0


def saved_run(output: Path, **architecture) -> Path:
    """An output directory whose checkpoint-2 saved a model of the tiny preset with these sizes changed (its flags
    are read before any checkpoint file but the model's config.json)."""
    from moe_system.model import OpenMoeConfig

    checkpoint = output / "checkpoint-2"
    OpenMoeConfig.from_preset("tiny", **architecture).save_pretrained(checkpoint / "model")
    (checkpoint / "trainer_state.json").write_text("{}")
    return checkpoint


def test_resume_flags_are_checked_against_the_saved_model_not_the_preset(tmp_path, capsys):
    from moe_system.training.args import parse_args

    # The tiny preset has 512 positions and 8 experts; the saved model more of both: what it allows is accepted.
    checkpoint = saved_run(tmp_path / "larger", max_position_embeddings=1024, num_experts=16)
    for resume in ("latest", str(checkpoint)):
        args = parse_args(["--resume", resume, "--output_path", str(tmp_path / "larger"), "--max_length", "1024",
                           "--router_topk", "12"])
        assert (args.max_length, args.router_topk) == (1024, 12)
    # Fewer of both: what the preset would allow is refused, naming the saved model's limit.
    saved_run(tmp_path / "smaller", max_position_embeddings=16, num_experts=4)
    for flags, message in ((["--router_topk", "6"], "has 4 experts per MoE layer; use --router_topk 1 to 4"),
                           (["--max_length", "32"], "beyond the 16 positions of the model saved in")):
        with pytest.raises(SystemExit):
            parse_args(["--resume", "latest", "--output_path", str(tmp_path / "smaller"), *flags])
        assert message in capsys.readouterr().err


def test_resume_beyond_the_saved_model_is_one_error_line(tmp_path):
    output = tmp_path / "smaller"
    saved_run(output, max_position_embeddings=16)
    out = subprocess.run([sys.executable, "train.py", "--resume", "latest", "--output_path", str(output),
                          "--max_length", "32"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--max_length 32 is beyond the 16 positions of the model saved in" in lines[0], \
        out.stderr[-3000:]
