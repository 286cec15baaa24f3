"""--comm_overlap: the expert-parallel exchange overlapped in chunks, forward and backward.

* chunk sizes and flag parsing (pure);
* layer/model level on 2 and 4 gloo processes (tests/workers/dist_overlap.py): losses, MoE outputs and every gradient
  with 2, 3, 4 and 7 chunks against one plain exchange, in dropless and capacity modes, with experts that get
  no token, under non-reentrant activation checkpointing (full and selective), and in eval; the all-to-alls
  each forward and backward issue;
* train.py under torchrun, 4 processes, --plugin hybrid (pipeline x EP): the logged losses with
  --comm_overlap (and activation checkpointing) equal those without.
Plugin-level parity of ep, ep_zero and hybrid with --comm_overlap is in test_parallel.py (OVERLAP_TWINS).

Tolerances (fp32). Chunking splits each expert's GEMM into GEMMs of fewer rows, and the CPU BLAS picks its kernel
(and so its summation order) by shape, machine and thread count: outputs and input gradients agree to rounding
(measured ~1e-6 relative at worst), never bit for bit on every machine. Expert weight gradients add the chunks'
contributions in another order: ~1e-7 relative (measured up to 9e-7 for single entries). Activation checkpointing
replays the very same GEMMs in the same order, so there the comparison is exact.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from dist_common import REPO, launch

from moe_system.moe.expert_parallel import chunk_counts
from moe_system.training.args import parse_args

REL_TOL = 1e-5   # outputs and gradients, relative to the tensor's largest entry
LOSS_TOL = 1e-6  # absolute, on losses of ~7


def test_chunk_counts_split_every_expert_block_evenly():
    counts = torch.tensor([0, 1, 3, 4, 7, 12, 2])
    for chunks in (1, 2, 3, 4, 7):
        per_chunk = chunk_counts(counts, chunks)
        assert per_chunk.shape == (chunks, counts.numel())
        assert torch.equal(per_chunk.sum(0), counts)
        assert (per_chunk.max(0).values - per_chunk.min(0).values).max() <= 1  # near-equal parts
        for e, c in enumerate(counts.tolist()):  # the same assignment as row r -> chunk r * n // c
            expected = torch.bincount(torch.arange(c) * chunks // max(c, 1), minlength=chunks)
            assert torch.equal(per_chunk[:, e], expected)


def test_comm_overlap_flags():
    args = parse_args(["--comm_overlap"])
    assert args.comm_overlap and args.comm_overlap_chunks == 4
    assert parse_args(["--comm_overlap", "--comm_overlap_chunks", "2"]).comm_overlap_chunks == 2
    with pytest.raises(SystemExit):
        parse_args(["--comm_overlap", "--comm_overlap_chunks", "0"])


@pytest.fixture(scope="module", params=[2, 4])
def layer_parity(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap") / "result.json"
    proc = launch("dist_overlap.py", request.param, [str(out)], timeout=150)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    assert result["world"] == request.param
    return result["records"]


@pytest.mark.distributed
def test_overlapped_layers_match_the_plain_exchange(layer_parity):
    lines = []
    for r in layer_parity:
        name = f"{r['dispatch']}{' unrouted' if r['starve'] else ''} chunks={r['chunks']}"
        if r.get("eval"):
            assert r["out_abs_diff"] <= 1e-7, r  # forward only, no_grad
            if r["starve"]:
                assert r["unrouted_experts"] > 0, r  # a rank really received no rows
            continue
        name += f" checkpointing={r['checkpointing']}" * bool(r["checkpointing"])
        lines.append(f"{name}: loss {r['loss_abs_diff']:.2g}, out {r['out_rel_diff']:.2g}, expert grads "
                     f"{r['expert_grad_rel_diff']:.2g}, other grads {r['other_grad_rel_diff']:.2g} (relative)")
        assert r["loss_abs_diff"] <= LOSS_TOL, r
        for key in ("out_rel_diff", "expert_grad_rel_diff", "other_grad_rel_diff"):
            assert r[key] <= REL_TOL, (key, r)
    print("\n".join(lines))


@pytest.mark.distributed
def test_checkpointing_recomputes_the_overlapped_exchange_exactly(layer_parity):
    """Non-reentrant checkpointing re-runs the forward (fully: its collectives too) inside the backward: the result
    is bit for bit the one without checkpointing."""
    plain = {(r["dispatch"], r["starve"], r["chunks"]): r for r in layer_parity
             if not r.get("eval") and not r["checkpointing"]}
    for r in layer_parity:
        if r.get("eval") or not r["checkpointing"]:
            continue
        key = (r["dispatch"], r["starve"], r["chunks"])
        if r["chunks"] == 1:
            assert all(v == 0 for k, v in r.items() if k.endswith("diff")), r
        else:
            assert {k: v for k, v in r.items() if k.endswith("diff")} == \
                   {k: v for k, v in plain[key].items() if k.endswith("diff")}, r


@pytest.mark.distributed
def test_selective_recompute_never_replays_the_all_to_alls(layer_parity):
    """Full recompute replays every MoE layer's count exchange and row exchanges inside the backward; selective
    recompute leaves the backward's all-to-alls those of a run without checkpointing."""
    plain = {(r["dispatch"], r["starve"], r["chunks"]): r for r in layer_parity
             if not r.get("eval") and not r["checkpointing"]}
    checked = set()
    for r in layer_parity:
        if r.get("eval") or not r["checkpointing"]:
            continue
        base = plain[(r["dispatch"], r["starve"], r["chunks"])]
        assert r["forward_all_to_alls"] == base["forward_all_to_alls"] > 0, r
        assert base["backward_all_to_alls"] > 0, base
        replayed = base["forward_all_to_alls"] if r["checkpointing"] == "full" else 0
        assert r["backward_all_to_alls"] == base["backward_all_to_alls"] + replayed, (r, base)
        checked.add(r["checkpointing"])
    assert checked == {"full", "selective"}


def _train(tmp_path, name: str, extra: list[str]):
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = ["timeout", "-k", "5", "150", sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "4", "train.py", "--plugin", "hybrid", "--pp_size", "2", "--ep_size", "2",
           "--dataset", "synthetic", "--max_steps", "3", "--batch_size", "4", "--max_length", "16",
           "--log_interval", "1", "--save_interval", "100", "--output_path", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "args.json").read_text())["comm_overlap"] == ("--comm_overlap" in extra)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [[r[k] for k in ("train/lm_loss", "train/aux_loss", "train/router_z_loss")] for r in rows
            if "train/lm_loss" in r]


@pytest.mark.distributed
@pytest.mark.slow
def test_train_py_hybrid_with_comm_overlap_gives_the_same_losses(tmp_path):
    plain = _train(tmp_path, "plain", [])
    overlapped = _train(tmp_path, "overlap", ["--comm_overlap", "--comm_overlap_chunks", "3",
                                              "--gradient_checkpointing"])
    assert len(plain) == len(overlapped) == 3
    print(f"train.py hybrid pp2 x ep2, losses without / with --comm_overlap: {plain} / {overlapped}")
    # Three optimizer steps from gradients that differ by rounding (chunked GEMMs): losses agree to ~1e-7 relative.
    torch.testing.assert_close(torch.tensor(overlapped), torch.tensor(plain), rtol=1e-5, atol=0.0)
