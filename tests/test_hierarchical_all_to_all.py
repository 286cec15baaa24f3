"""--hierarchical_alltoall: the two-level (intra-node, then inter-node) all-to-all of moe/hierarchical_all_to_all.py.

* the layout checks (pure): which EP groups split evenly over nodes, and LOCAL_WORLD_SIZE;
* train.py on 4 processes as 2 nodes x 2 (one torchrun per node on localhost): the losses of the flat run;
  within one node, a note and the same losses;
* on 4 gloo processes simulated as 2 nodes x 2 and 4 x 1 (tests/workers/dist_hierarchical.py): the primitive
  delivers exactly what the flat all-to-all delivers (rows, rows sent back, gradients; random uneven splits with
  zeros, and equal splits), and the EP layer through it matches the flat one (loss, outputs, every gradient),
  dropless and capacity, with and without overlap chunks.
The exchange only moves rows: the primitive must agree exactly, and the layer sees the same rows in the same
order, so its GEMMs are the same (tolerance kept at rounding level all the same).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from dist_common import REPO, launch

from moe_system.moe.hierarchical_all_to_all import _regroup, node_shape, ranks_per_node_from_env
from moe_system.parallel.layout import LayoutError, validate_layout
from moe_system.parallel.ports import free_port
from moe_system.training.args import parse_args

REL_TOL = 1e-6


def test_node_shape_of_the_plugin_ep_groups():
    layout = validate_layout("ep_zero", 8, 8, 2, extra_dp_size=2)               # EP groups {0..3} {4..7}
    assert layout.ep_group_ranks(5) == [4, 5, 6, 7]
    assert node_shape(layout.ep_group_ranks(5), 2) == (2, 2)                   # 2 nodes x 2 ranks
    assert node_shape(layout.ep_group_ranks(5), 1) == (4, 1)
    assert node_shape(layout.ep_group_ranks(5), 4) == (1, 4)                   # one node: flat
    assert node_shape(layout.ep_group_ranks(0), 8) == (1, 4)
    # 6 processes per node: ranks 4, 5 on node 0 and 6, 7 on node 1 is still even
    assert node_shape([4, 5, 6, 7], 6) == (2, 2)
    with pytest.raises(LayoutError, match="spread evenly") as err:
        node_shape([0, 1, 2, 3, 4, 5, 6, 7], 3)                                  # 3 + 3 + 2
    assert "3 on node 0, 3 on node 1, 2 on node 2" in str(err.value)
    with pytest.raises(LayoutError, match="spread evenly"):
        node_shape([0, 2, 1, 3], 2)                                              # not node-major


def test_ranks_per_node_comes_from_the_launcher(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks_per_node_from_env(8, 5) == 4
    with pytest.raises(LayoutError, match="same number of processes on every node"):
        ranks_per_node_from_env(6, 5)
    with pytest.raises(LayoutError, match="consecutive"):
        ranks_per_node_from_env(8, 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(LayoutError, match="torchrun"):
        ranks_per_node_from_env(8, 5)


def test_regroup_swaps_the_block_order():
    x = torch.arange(7)
    sizes = [[1, 0, 2], [3, 1, 0]]                                               # blocks (i, j), i-major
    assert _regroup(x, sizes).tolist() == [0, 3, 4, 5, 6, 1, 2]                  # (0,0) (1,0) (0,1) (1,1) (0,2) (1,2)


def test_flag_parses():
    assert parse_args(["--hierarchical_alltoall"]).hierarchical_alltoall
    assert not parse_args([]).hierarchical_alltoall


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("hierarchical") / "result.json"
    proc = launch("dist_hierarchical.py", 4, [str(out)], timeout=180)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    assert result["world"] == 4
    return result["records"]


@pytest.mark.distributed
def test_primitive_delivers_what_the_flat_all_to_all_delivers(parity):
    primitive = [r for r in parity if r["kind"] == "primitive"]
    assert {(r["per_node"], r["equal"]) for r in primitive} == {(2, False), (2, True), (1, False), (1, True)}
    for r in primitive:
        assert r["max_abs_diff"] == 0.0, r  # rows moved, never summed: identical


@pytest.mark.distributed
def test_ep_layer_through_it_matches_the_flat_exchange(parity):
    layers = [r for r in parity if r["kind"] == "layer"]
    assert {(r["dispatch"], r["chunks"]) for r in layers} == {(d, c) for d in ("dropless", "capacity") for c in (1, 3)}
    for r in layers:
        assert r["loss_abs_diff"] <= 1e-6, r
        for key in ("out_rel_diff", "expert_grad_rel_diff", "other_grad_rel_diff"):
            assert r[key] <= REL_TOL, (key, r)


def _train(tmp_path, name: str, nodes: int, extra: list[str]) -> list[list[float]]:
    """train.py on 4 processes: one torchrun (nodes=1), or one per node on localhost, as on a real cluster."""
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    train = ["train.py", "--dataset", "synthetic", "--max_steps", "2", "--batch_size", "2", "--max_length", "16",
             "--log_interval", "1", "--save_interval", "100", "--output_path", str(out), *extra]
    run = ["timeout", "-k", "5", "200", sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        cmds = [[*run, "--standalone", "--nproc_per_node", "4", *train]]
    else:
        port = str(free_port())
        cmds = [[*run, "--nnodes", str(nodes), "--node_rank", str(i), "--nproc_per_node", str(4 // nodes),
                 "--master_addr", "127.0.0.1", "--master_port", port, *train] for i in range(nodes)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    results = [proc.communicate() for proc in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [[r[k] for k in ("train/lm_loss", "train/aux_loss", "train/router_z_loss")] for r in rows
            if "train/lm_loss" in r], results[0][1]


@pytest.mark.distributed
@pytest.mark.slow
def test_train_py_across_two_nodes_gives_the_flat_losses(tmp_path):
    flat, _ = _train(tmp_path, "flat", 1, [])
    hierarchical, _ = _train(tmp_path, "hierarchical", 2, ["--hierarchical_alltoall"])
    assert len(flat) == len(hierarchical) == 2
    torch.testing.assert_close(torch.tensor(hierarchical), torch.tensor(flat), rtol=1e-6, atol=0.0)
    # within one node the flag changes nothing, and says so
    within, err = _train(tmp_path, "within", 1, ["--hierarchical_alltoall"])
    assert "note: --hierarchical_alltoall has no effect" in err and "within one node" in err
    torch.testing.assert_close(torch.tensor(within), torch.tensor(flat), rtol=1e-6, atol=0.0)
