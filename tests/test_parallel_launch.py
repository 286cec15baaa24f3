"""`colossalai run` launches of train.py: one node, and a real two-node job on this machine.

The two "nodes" are the hostfile entries 127.0.0.1 and localhost: colossalai run starts one
`torchrun --nnodes 2 --node_rank i` per entry (locally, through fabric, no ssh), and the two node ranks
rendezvous over loopback into one world with EP across the nodes. Bounded by `timeout`, OMP_NUM_THREADS=1.
"""

import os
import subprocess
import sys

import pytest
from dist_common import REPO

from moe_system.parallel.ports import free_port

VENV_BIN = os.path.dirname(sys.executable)
TRAIN_ARGS = ["--plugin", "ep", "--max_steps", "2", "--batch_size", "2", "--eval_samples", "2",
              "--log_interval", "1"]


def _colossalai_run(launcher_args: list[str], output: str, timeout: int = 150):
    # A small, clean environment: colossalai run re-exports every variable as `export K="V"` on each node.
    env = {"PATH": VENV_BIN + os.pathsep + "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = ["timeout", "-k", "5", str(timeout), os.path.join(VENV_BIN, "colossalai"), "run", *launcher_args,
           "--master_port", str(free_port()), "train.py", *TRAIN_ARGS, "--output_path", output]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def _check(proc, hosts: list[str], output: str):
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for host in hosts:
        assert f"{host}: success" in log, log[-3000:]
    assert "2 process(es), ep: pp=1 ep=2" in log
    assert os.path.isfile(os.path.join(output, "final", "config.json"))


@pytest.mark.distributed
def test_colossalai_run_single_node(tmp_path):
    out = str(tmp_path / "run")
    _check(_colossalai_run(["--nproc_per_node", "2"], out), ["127.0.0.1"], out)


@pytest.mark.distributed
def test_colossalai_run_two_nodes_over_loopback(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1\nlocalhost\n")
    out = str(tmp_path / "run")
    proc = _colossalai_run(["--hostfile", str(hostfile), "--nproc_per_node", "1"], out)
    _check(proc, ["127.0.0.1", "localhost"], out)  # one process per node, so world 2 means both nodes joined


@pytest.mark.parametrize("name", ["train.sh", "hostfile.example"])
def test_launch_files_exist(name):
    assert os.path.isfile(os.path.join(REPO, name))


def test_train_sh_flags_all_exist():
    """Every --flag in train.sh is an option of train.py or of the launcher."""
    from moe_system.training.args import build_parser

    known = {a for action in build_parser()._actions for a in action.option_strings}
    launcher = {"--nproc_per_node", "--hostfile"}  # colossalai run's own
    lines = open(os.path.join(REPO, "train.sh")).read().splitlines()
    text = " ".join(line for line in lines if not line.lstrip().startswith("#"))
    flags = {tok.split("=")[0] for tok in text.split() if tok.startswith("--")}
    assert flags - known - launcher == set()
