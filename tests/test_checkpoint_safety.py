"""What a run does to the checkpoints in its --output_path: it never replaces an earlier run unasked, shares the
directory with no second run, resumes past a damaged checkpoint, publishes durably, loads no pickled code and
ends a full disk with one clear error."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_system.training.args import parse_args
from moe_system.training.checkpoint import list_checkpoints
from test_bad_input import FAST, ROOT, digest, train

SAVE_EVERY_STEP = [*FAST, "--save_interval", "1", "--save_total_limit", "0"]


def env(**faults) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **faults}


def with_faults(faults: dict, *args, nproc=1, timeout=300) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(nproc)]
    return subprocess.run(["timeout", "-k", "5", str(timeout), *launcher,
                           str(ROOT / "tests" / "workers" / "fault_launcher.py"), *args],
                          cwd=ROOT, env=env(**faults), capture_output=True, text=True)


def torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    return with_faults({}, *args, nproc=2, timeout=timeout)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def steps(output: Path) -> list[int]:
    return [step for step, _ in list_checkpoints(str(output))]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A finished run with checkpoint-1, checkpoint-2 and final/; tests copy it before they change anything."""
    out = tmp_path_factory.mktemp("saved") / "run"
    result = train(*SAVE_EVERY_STEP, "--output_path", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---------------------------------------------------------------- --save_total_limit
def test_save_total_limit_is_at_least_one_or_zero_for_all(capsys):
    assert parse_args(["--save_total_limit", "0"]).save_total_limit == 0
    assert parse_args(["--save_total_limit", "1"]).save_total_limit == 1
    with pytest.raises(SystemExit) as exc:
        parse_args(["--save_total_limit", "-1"])
    assert exc.value.code == 2
    assert "--save_total_limit must be at least 1, or 0 to keep every checkpoint, got -1" in capsys.readouterr().err


# ---------------------------------------------------------------- an earlier run in --output_path
def test_a_new_run_does_not_replace_an_earlier_one_unless_asked(saved_run, tmp_path):
    out = copy_of(saved_run, tmp_path)
    before = digest(out)
    refused = train(*SAVE_EVERY_STEP, "--output_path", str(out))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert error_lines(refused) == [
        f"error: --output_path {out} already holds an earlier run (checkpoint-1, checkpoint-2, final); continue it "
        f"with --resume latest, replace it with --overwrite_output_dir, or choose another --output_path"]
    assert digest(out) == before

    replaced = train(*FAST, "--max_steps", "1", "--save_interval", "1", "--save_total_limit", "1",
                     "--overwrite_output_dir", "--output_path", str(out))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert steps(out) == [1]  # the earlier checkpoint-2 went with the run it belonged to, not the new step 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


@pytest.mark.distributed
def test_every_rank_stops_with_the_refusal(saved_run, tmp_path):
    out = copy_of(saved_run, tmp_path)
    refused = torchrun(*FAST, "--output_path", str(out), timeout=120)
    assert refused.returncode not in (0, 124)
    # every rank stops on the refusal (neither waits at a collective: no timeout), and the user reads it once
    assert len([line for line in error_lines(refused) if "already holds an earlier run" in line]) == 1
    assert len(re.findall(r"exitcode\s*: 1 ", refused.stderr)) == 2  # torchrun's summary: both ranks exited 1
    assert "OutputDirError" not in refused.stderr  # no traceback of it


# ---------------------------------------------------------------- one run at a time
def test_a_second_run_is_refused_while_the_first_holds_the_directory_and_a_killed_one_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *FAST, "--max_steps", "100000", "--save_interval", "100000",
                              "--output_path", str(out)], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        lock = out / ".lock"
        while not (lock.is_file() and lock.read_text().startswith(f"pid {first.pid} ")):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.1)
        second = train(*FAST, "--output_path", str(out))
        assert second.returncode == 1 and "Traceback" not in second.stderr
        lines = error_lines(second)
        assert len(lines) == 1 and f"is in use by another run (pid {first.pid} on " in lines[0], second.stderr[-3000:]
    finally:
        first.kill()  # SIGKILL: nothing releases the lock but the kernel
        first.wait()
    assert lock.is_file()  # left behind, naming a dead process
    third = train(*FAST, "--output_path", str(out))
    assert third.returncode == 0, third.stderr[-3000:]
    assert not lock.exists()


# ---------------------------------------------------------------- damaged checkpoints
def truncate(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return f"has {size // 2} bytes, {size} were saved"


def flip_a_byte(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "does not match its checksum"


DAMAGE = {  # name: (file in checkpoint-2, how)
    "truncated_optimizer": ("optimizer/rank00000.pt", truncate),
    "truncated_model_shard": ("model/model-00001.safetensors", truncate),
    "truncated_trainer_state": ("trainer_state.json", truncate),
    "flipped_byte_in_rng": ("rng/rank0.pt", flip_a_byte),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_latest_falls_back_past_a_damaged_checkpoint(saved_run, tmp_path, damage):
    out = copy_of(saved_run, tmp_path)
    name, how = DAMAGE[damage]
    what = how(out / "checkpoint-2" / name)
    resumed = train(*SAVE_EVERY_STEP, "--max_steps", "3", "--resume", "latest", "--output_path", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"warning: checkpoint-2 is damaged ({name} {what}); skipping it" in resumed.stderr
    assert f"resumed at step 1 from {out / 'checkpoint-1'}" in resumed.stdout
    assert steps(out) == [1, 2, 3]


def test_resume_of_a_damaged_checkpoint_by_path_is_a_clear_error(saved_run, tmp_path):
    out = copy_of(saved_run, tmp_path)
    what = truncate(out / "checkpoint-2" / "optimizer" / "rank00000.pt")
    target = out / "checkpoint-2"
    result = train(*SAVE_EVERY_STEP, "--resume", str(target), "--output_path", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert error_lines(result) == [f"error: --resume {target}: the checkpoint is damaged (optimizer/rank00000.pt "
                                   f"{what}); pass an earlier checkpoint-STEP, or --resume latest for the newest "
                                   f"intact one"]


def test_every_checkpoint_damaged_is_a_clear_error(saved_run, tmp_path):
    out = copy_of(saved_run, tmp_path)
    for step in (1, 2):
        truncate(out / f"checkpoint-{step}" / "scheduler.pt")
    result = train(*SAVE_EVERY_STEP, "--resume", "latest", "--output_path", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("warning: ")] == [
        f"warning: checkpoint-{step} is damaged (scheduler.pt has {size // 2} bytes, {size} were saved); skipping it"
        for step, size in ((2, (saved_run / "checkpoint-2" / "scheduler.pt").stat().st_size),
                           (1, (saved_run / "checkpoint-1" / "scheduler.pt").stat().st_size))]
    assert error_lines(result)[0].startswith(f"error: --resume latest: every checkpoint in {out} is damaged")


@pytest.mark.distributed
@pytest.mark.slow
def test_all_ranks_fall_back_together_when_one_ranks_file_is_damaged(tmp_path):
    out = tmp_path / "run"
    first = torchrun(*SAVE_EVERY_STEP, "--plugin", "ep", "--zero_stage", "1", "--output_path", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    truncate(out / "checkpoint-2" / "optimizer" / "rank00001.pt")  # checksummed by rank 1 only
    resumed = torchrun(*SAVE_EVERY_STEP, "--plugin", "ep", "--zero_stage", "1", "--max_steps", "3",
                       "--resume", "latest", "--output_path", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "warning: checkpoint-2 is damaged (optimizer/rank00001.pt has" in resumed.stderr
    assert f"resumed at step 1 from {out / 'checkpoint-1'}" in resumed.stdout
    assert steps(out) == [1, 2, 3]


# ---------------------------------------------------------------- publishing
def test_every_file_and_directory_is_fsynced_before_the_checkpoint_is_published(tmp_path):
    out, log = tmp_path / "run", tmp_path / "fsync.log"
    result = with_faults({"FAULT_FSYNC_LOG": str(log)}, *FAST, "--max_steps", "1", "--output_path", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    synced = set(log.read_text().splitlines())
    partial = out / ".checkpoint-1.partial"
    written = [partial / f.relative_to(out / "checkpoint-1") for f in (out / "checkpoint-1").rglob("*")]
    assert written and not [str(f) for f in written if str(f) not in synced]
    assert str(partial) in synced and str(out) in synced  # the directory entries, before and after the rename
    assert {str(out / ".final.partial" / f.name) for f in (out / "final").iterdir()} <= synced


def test_a_crash_while_replacing_a_checkpoint_keeps_the_old_one(saved_run, tmp_path):
    """Resuming from checkpoint-1 saves checkpoint-2 again; SIGKILL right before the new one is renamed in."""
    out = copy_of(saved_run, tmp_path)
    resume = ("--resume", str(out / "checkpoint-1"))
    killed = with_faults({"FAULT_KILL_IN_PUBLISH": "2"}, *SAVE_EVERY_STEP, *resume, "--output_path", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = train(*SAVE_EVERY_STEP, "--max_steps", "3", "--resume", "latest", "--output_path", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step 2 from {out / 'checkpoint-2'}" in resumed.stdout
    assert steps(out) == [1, 2, 3] and not list(out.glob(".checkpoint-*"))


# ---------------------------------------------------------------- no pickled code
class CreatesAFile:
    """Unpickling this calls open(path, 'w'): what a hostile checkpoint could do with any other callable."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("name", ["rng/rank0.pt", "optimizer/rank00000.pt", "scheduler.pt"])
def test_a_checkpoint_holding_pickled_code_is_refused_without_running_it(saved_run, tmp_path, name):
    out = copy_of(saved_run, tmp_path)
    marker = tmp_path / "code-ran"
    target = out / "checkpoint-2" / name
    torch.save({"state": CreatesAFile(str(marker))}, target)
    manifest = out / "checkpoint-2" / "manifest.json"  # whoever can write the file can rewrite its manifest
    if manifest.exists():
        files = json.loads(manifest.read_text())["files"]
        files[name] = {"size": target.stat().st_size, "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}
        manifest.write_text(json.dumps({"files": files}))

    result = train(*SAVE_EVERY_STEP, "--resume", "latest", "--output_path", str(out))
    assert not marker.exists()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: refused to load {target}: it holds Python objects"), \
        result.stderr[-3000:]


# ---------------------------------------------------------------- full disk
def test_a_full_disk_while_saving_is_one_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = with_faults({"FAULT_ENOSPC_IN_SAVE": "2"}, *SAVE_EVERY_STEP, "--output_path", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: disk full while saving checkpoint-2 into {out} ("), lines
    assert "the earlier checkpoints are intact" in lines[0] and "then --resume latest" in lines[0]
    assert steps(out) == [1] and not list(out.glob(".checkpoint-*")) and not (out / "final").exists()
    resumed = train(*SAVE_EVERY_STEP, "--resume", "latest", "--output_path", str(out))
    assert resumed.returncode == 0 and "resumed at step 1" in resumed.stdout, resumed.stderr[-3000:]


def test_a_save_the_free_space_cannot_hold_is_refused_before_writing(tmp_path):
    out = tmp_path / "run"
    result = with_faults({"FAULT_DISK_FREE": "1000"}, *SAVE_EVERY_STEP, "--output_path", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: disk full: checkpoint-2 needs about "), lines
    assert f"MB (as much as the last checkpoint) and {out} has 1 KB free" in lines[0]
    assert steps(out) == [1] and not list(out.glob(".checkpoint-*"))
