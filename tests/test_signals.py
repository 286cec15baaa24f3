"""Ctrl-C and SIGTERM stop a run at a step every rank agrees on, with a checkpoint, one line and exit 130/143; a
second signal exits at once. A rank that fails shows its one error once; the ranks it leaves behind add one short
line, never a traceback."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_system.data import load_records
from moe_system.training.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
# Endless for a test, and no periodic checkpoint: any checkpoint is the one the signal made.
ARGS = ["--max_steps", "100000", "--save_interval", "100000", "--log_interval", "1", "--batch_size", "2",
        "--precision", "fp32", "--eval_samples", "4"]
STOPPED = re.compile(r"^interrupted at step (\d+); checkpoint saved to (\S+); continue with --resume latest$", re.M)
TIMEOUT = 300


def command(nproc: int, out: Path, *extra, script="train.py") -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(nproc)]
    return [*launcher, str(ROOT / script), *ARGS, "--output_path", str(out), *extra]


class Run:
    """A training run in the background; output goes to files (a full pipe would stall it)."""

    def __init__(self, cmd: list[str], out: Path, fault: dict | None = None):
        self.out, self.log = out, out.parent / f"{out.name}.log"
        self.stdout, self.stderr = open(f"{self.log}.out", "w"), open(f"{self.log}.err", "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(fault or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.stdout, stderr=self.stderr,
                                     start_new_session=True)  # its own process group, as a terminal's job

    def wait_for_steps(self, steps: int) -> None:
        metrics, deadline = self.out / "metrics.jsonl", time.time() + TIMEOUT
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
            assert self.proc.poll() is None, f"run ended early:\n{self.finish()[1][-3000:]}"
            assert time.time() < deadline, "no progress"
            time.sleep(0.1)

    def worker(self, rank: int) -> int:
        """The pid of a torchrun worker by its rank."""
        for pid in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split():
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
        raise AssertionError(f"no worker with rank {rank}")

    def finish(self) -> tuple[str, str]:
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stdout.close()
        self.stderr.close()
        return Path(f"{self.log}.out").read_text(), Path(f"{self.log}.err").read_text()


def assert_no_traceback_of_ours(nproc: int, err: str) -> None:
    if nproc == 1:
        assert "Traceback" not in err, err[-3000:]
    else:  # torchrun prints its own (SignalException, ChildFailedError); none from a worker running train.py
        assert 'train.py", line' not in err and "[rank" not in err, err[-3000:]
    assert "Connection closed by peer" not in err and "KeyboardInterrupt" not in err, err[-3000:]


def assert_stopped_with_checkpoint(out: Path, stdout: str) -> int:
    lines = STOPPED.findall(stdout)
    assert len(lines) == 1, stdout[-3000:]  # one line, from rank 0
    step, path = int(lines[0][0]), lines[0][1]
    assert step >= 2 and list_checkpoints(str(out)) == [(step, str(out / f"checkpoint-{step}"))] and path == str(
        out / f"checkpoint-{step}")
    assert not (out / "final").exists()
    return step


def resume(nproc: int, out: Path, step: int) -> None:
    result = subprocess.run(["timeout", "-k", "5", str(TIMEOUT),
                             *command(nproc, out, "--resume", "latest", "--max_steps", str(step + 1))],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed at step {step} from {out / f'checkpoint-{step}'}" in result.stdout
    assert "steps=" + str(step + 1) in result.stdout


# Who gets the signal: the process itself (1 process); torchrun, which forwards it to every worker; the whole process
# group, as Ctrl-C in a terminal does (each worker gets it twice: from the terminal and from torchrun); one worker.
@pytest.mark.slow
@pytest.mark.parametrize("nproc, sig, target", [
    pytest.param(1, signal.SIGTERM, "process", id="1proc-sigterm"),
    pytest.param(1, signal.SIGINT, "process", id="1proc-sigint"),
    pytest.param(2, signal.SIGTERM, "process", marks=pytest.mark.distributed, id="torchrun-sigterm"),
    pytest.param(2, signal.SIGINT, "group", marks=pytest.mark.distributed, id="torchrun-ctrl-c"),
    pytest.param(2, signal.SIGTERM, "rank 1", marks=pytest.mark.distributed, id="torchrun-sigterm-rank1-only"),
])
def test_a_signal_saves_a_checkpoint_and_exits(tmp_path, nproc, sig, target):
    out = tmp_path / "run"
    run = Run(command(nproc, out), out)
    run.wait_for_steps(3)
    if target == "group":
        os.killpg(run.proc.pid, sig)
    else:
        os.kill(run.worker(1) if target == "rank 1" else run.proc.pid, sig)
    stdout, stderr = run.finish()

    if nproc == 1:
        assert run.proc.returncode == 128 + sig, stderr[-3000:]
    elif target == "rank 1":  # both workers exit 143; torchrun reports them and exits 1
        assert run.proc.returncode == 1 and "exitcode: 143" in stderr and "ChildFailedError" in stderr, stderr[-3000:]
    else:  # torchrun waits for its workers to save and exit, then ends with its own SignalException
        assert run.proc.returncode == 1 and f"got signal: {sig}" in stderr, stderr[-3000:]
    assert_no_traceback_of_ours(nproc, stderr)
    step = assert_stopped_with_checkpoint(out, stdout)
    if sig == signal.SIGTERM and target == "process":
        resume(nproc, out, step)


@pytest.mark.slow
def test_a_signal_during_a_save_lets_it_finish_then_exits(tmp_path):
    out = tmp_path / "run"
    run = Run(command(1, out, "--save_interval", "3", script="tests/workers/fault_launcher.py"), out,
              fault={"FAULT_SIGNAL_IN_SAVE": "1"})
    stdout, stderr = run.finish()
    assert run.proc.returncode == 143, stderr[-3000:]
    assert_no_traceback_of_ours(1, stderr)
    assert assert_stopped_with_checkpoint(out, stdout) == 3  # that very checkpoint, not one more step and save


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_saving(tmp_path):
    out = tmp_path / "run"
    run = Run(command(1, out, script="tests/workers/fault_launcher.py"), out, fault={"FAULT_SIGNAL_IN_SAVE": "1"})
    run.wait_for_steps(3)
    run.proc.send_signal(signal.SIGTERM)  # the second SIGTERM comes in the middle of the save this one starts
    stdout, stderr = run.finish()
    assert run.proc.returncode == 143, stderr[-3000:]
    assert_no_traceback_of_ours(1, stderr)
    assert stdout.count("SIGTERM again: exiting now without saving") == 1, stdout[-3000:]
    assert not STOPPED.search(stdout) and list_checkpoints(str(out)) == []  # the half-written one is not published


@pytest.mark.slow
@pytest.mark.parametrize("when", ["importing", "building"])
def test_a_signal_during_startup_exits_at_once(tmp_path, when):
    out = tmp_path / "run"
    run = Run(command(1, out), out)
    if when == "importing":
        time.sleep(1.0)
    else:  # the output directory is made right after the process group: the model and data are next
        deadline = time.time() + TIMEOUT
        while not out.exists():
            assert run.proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
    assert run.proc.poll() is None
    run.proc.send_signal(signal.SIGINT)
    start = time.time()
    stdout, stderr = run.finish()
    assert run.proc.returncode == 130 and time.time() - start < 10, stderr[-3000:]
    assert_no_traceback_of_ours(1, stderr)
    assert stdout.count("interrupted (SIGINT) during startup; nothing to save yet") == 1, stdout[-3000:]
    assert list_checkpoints(str(out)) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_without_data_stops_every_rank_with_one_error(tmp_path):
    """Rank 1's only record is malformed and skipped: found by all ranks before the first step, reported once."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(load_records("bundled")[0]) + '\n{"oops": 1}\n')
    out = tmp_path / "run"
    run = Run(command(2, out, "--streaming", "--dataset", str(data), "--skip_malformed", "--max_steps", "4"), out)
    stdout, stderr = run.finish()
    assert run.proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --streaming: {data} gave no usable record to data-parallel rank(s) 1 (all of theirs "
                      f"are malformed, skipped by --skip_malformed); fix the records or use fewer data-parallel "
                      f"ranks"], stderr[-3000:]
    assert_no_traceback_of_ours(2, stderr)
    assert "stopping because another rank failed" not in stderr  # every rank found it: none of them was left behind


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_worker_leaves_one_short_line_from_the_survivor(tmp_path):
    out = tmp_path / "run"
    run = Run(command(2, out), out)
    run.wait_for_steps(3)
    os.kill(run.worker(1), signal.SIGKILL)
    stdout, stderr = run.finish()
    assert run.proc.returncode == 1 and "ChildFailedError" in stderr  # torchrun's own summary, as it is
    assert stderr.count("rank 0: stopping because another rank failed") == 1, stderr[-3000:]
    assert_no_traceback_of_ours(2, stderr)
    assert not STOPPED.search(stdout) and list_checkpoints(str(out)) == []
