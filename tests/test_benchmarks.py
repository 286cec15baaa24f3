"""Each benchmark's --smoke mode runs end to end on CPU and writes a complete, numerically checked JSON.

The smoke runs are what keeps the scripts from rotting between GPU runs: same code paths as the full
runs (every implementation is compared with ours before it is timed), tiny shapes.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_smoke(module: str, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(module) / "result.json"
    # One thread: the machines running the suite are shared, and oversubscribed torch threads crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_environment(result: dict, benchmark: str) -> None:
    assert result["benchmark"] == benchmark and result["mode"] == "smoke"
    env = result["environment"]
    for key in ("device_type", "device_name", "torch", "transformers", "date"):
        assert env[key], key
    assert env["device_type"] == "cpu"


@pytest.fixture(scope="module")
def moe_layer(tmp_path_factory):
    return run_smoke("moe_layer", tmp_path_factory)


@pytest.fixture(scope="module")
def train_step(tmp_path_factory):
    return run_smoke("train_step", tmp_path_factory)


@pytest.fixture(scope="module")
def router_permute(tmp_path_factory):
    return run_smoke("router_permute", tmp_path_factory)


@pytest.fixture(scope="module")
def comm_overlap(tmp_path_factory):
    return run_smoke("comm_overlap", tmp_path_factory)


def test_comm_overlap_smoke(comm_overlap):
    check_environment(comm_overlap, "comm_overlap")
    assert comm_overlap["processes"] == 2 and comm_overlap["backend"] == "gloo"
    cases = {c["scenario"]: c for c in comm_overlap["cases"]}
    assert set(cases) == {"real", "both"}
    for case in cases.values():
        results = case["results"]
        assert set(results) == {"1", "4"}  # without overlap, and 4 chunks
        for r in results.values():
            assert r["status"] == "ok", r
            assert max(r["check"]["max_rel_diff"].values()) <= r["check"]["tolerance"]
            for key in ("forward_ms", "backward_ms", "total_ms"):
                assert finite(r[key]) and r[key] > 0
        assert all(finite(results["4"][f"{k}_ratio"]) for k in ("forward", "backward", "total"))
        # flat vs --hierarchical_alltoall (2 processes, one per node: 2 nodes x 1), checked and timed side by side
        hierarchical = case["hierarchical"]
        assert (hierarchical["nodes"], hierarchical["ranks_per_node"]) == (2, 1)
        for chunks, r in hierarchical["results"].items():
            assert r["status"] == "ok", r
            assert max(r["check"]["max_rel_diff"].values()) <= r["check"]["tolerance"]
            assert finite(r["total_ms"]) and finite(r["total_ratio_vs_flat"]) and r["total_ratio_vs_flat"] > 0
        assert set(hierarchical["results"]) == set(results)
    both = cases["both"]
    assert both["injected"]["link_ms_forward"] > 0 and both["injected"]["experts_ms_backward"] > 0
    # The ratios are the benchmark's output, not a pass mark: wall-clock gains depend on the machine and its load.
    # What must hold anywhere is the order of events, which the program (not the clock) decides:
    events = [what for _, what in both["backward_trace_rank0"]["events"]]
    launches = [i for i, what in enumerate(events) if what.startswith("launch")]
    experts = [i for i, what in enumerate(events) if what.startswith("expert backward start")]
    assert len(launches) == 8 and len(experts) == 4
    # the backward launches a gradient exchange before the last chunk's expert backward starts, and waits for
    # one after it.
    assert launches[1] < experts[0] and any(what.startswith("done") for what in events[experts[-1]:])


def test_moe_layer_smoke(moe_layer):
    check_environment(moe_layer, "moe_layer")
    assert "24*T*k*H*I" in moe_layer["flop_formula"]["openmoe_expert"]
    cases = moe_layer["cases"]
    assert {(c["routing"], c["dispatch"]) for c in cases} == {("uniform", "dropless"), ("skewed", "capacity")}
    for case in cases:
        results = case["results"]
        # ours, its loop, the plain grouped_mm reference and transformers' blocks must all have run
        for name in ("ours", "ours_loop", "torch_grouped_mm", "hf_eager", "hf_grouped_mm"):
            assert results[name]["status"] == "ok", (name, results[name])
        assert results["liger_fused_moe"]["status"] == "skipped" and results["liger_fused_moe"]["reason"]
        if os.environ.get("TRITON_INTERPRET") != "1":  # the Triton experts need CUDA or the interpreter
            triton_row = results["ours_triton"]
            assert triton_row["status"] == "skipped" and "TRITON_INTERPRET" in triton_row["reason"]
        for name, r in results.items():
            if r["status"] != "ok":
                continue
            for key in ("ms", "tflops", "peak_bytes"):
                assert finite(r[key]) and r[key] > 0, (name, key, r[key])
            check = r["check"]
            assert check["max_abs_diff_out"] <= check["tolerance"], (name, check)
            assert check["max_abs_diff_grad_input"] <= check["grad_tolerance"], (name, check)
            if name != "ours":
                assert finite(r["ms_ratio_ours_over_this"]) and finite(r["tflops_ratio_ours_over_this"])
        # FLOPs: the 3-way expert is 4/3 of a standard SwiGLU of the same width
        t, k, h, i, e = case["tokens"], case["top_k"], case["hidden"], case["intermediate"], case["experts"]
        assert case["flops"]["openmoe3"] == 24 * t * k * h * i + 6 * t * h * e
    skewed = next(c for c in cases if c["routing"] == "skewed")
    assert skewed["max_over_mean_load"] == pytest.approx(4.0, rel=0.15)
    assert skewed["dropped_fraction"] > 0


def test_train_step_smoke(train_step):
    check_environment(train_step, "train_step")
    assert "6 * N_active" in train_step["flop_formula"]
    variants = train_step["variants"]
    for name in ("ours", "ours_autocast", "ours_all_moe", "hf_grouped_mm"):
        v = variants[name]
        assert v["status"] == "ok", (name, v)
        best = v["best"]
        assert best and finite(best["tokens_per_s"]) and finite(best["peak_bytes"]) and best["peak_bytes"] > 0
        assert abs(v["check"]["initial_loss"] - v["check"]["ln_vocab"]) < 1.0
    for name in ("ours", "ours_all_moe"):
        v = variants[name]
        assert v["flops_per_token"] == v["flops_per_token_flops_py"]
        fused = v["check"]["fused_head_loss"]
        assert fused["abs_diff"] <= fused["tolerance"]
    assert variants["ours_all_moe"]["flops_per_token"] > variants["ours"]["flops_per_token"]
    assert variants["hf_liger_flce"]["status"] == "skipped"
    assert finite(variants["hf_grouped_mm"]["tokens_per_s_ratio_ours_over_this"])
    compiled = variants["ours_compiled"]  # --compile side by side with ours, at ours' best batch size
    assert compiled["status"] == "ok", compiled
    assert compiled["best"]["batch_size"] == variants["ours"]["best"]["batch_size"]
    assert finite(compiled["compile_speedup"]) and compiled["compile_speedup"] > 0


def test_router_permute_smoke(router_permute):
    check_environment(router_permute, "router_permute")
    assert len(router_permute["cases"]) == 4
    for case in router_permute["cases"]:
        for name in ("ours", "torch_reference"):
            r = case["results"][name]
            assert finite(r["ms"]) and finite(r["peak_bytes"]) and finite(r["tokens_per_s"])
            assert r["check"]["max_abs_diff_out"] <= r["check"]["tolerance"]
            assert r["check"]["max_abs_diff_grad_input"] <= r["check"]["grad_tolerance"]
            assert r["host_syncs_per_step"] == "n/a"  # only CUDA has a queue to wait on
        assert case["host_syncs_full_layer"] == {"grouped_mm": "n/a", "loop": "n/a"}
