"""The GPU check (benchmarks/suite.py): its part runner, and its --smoke run end to end on CPU."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.suite import Part, run_part

ROOT = Path(__file__).resolve().parents[1]
FILES = {"environment.json", "gpu_tests.json", "train_e2e.json", "moe_layer.json", "train_step.json",
         "router_permute.json", "memory_check.json", "summary.json"}


def python(code: str, *argv) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, argv)]


def test_part_out_of_time_keeps_what_it_wrote_and_the_next_parts_run(tmp_path):
    # Writes its file, then hangs in a child that holds the output pipe: only killing the whole group ends it.
    hangs = python("""
        import json, subprocess, sys, time
        json.dump({"had": "this much"}, open(sys.argv[1], "w"))
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        time.sleep(120)
    """, tmp_path / "hangs.json")
    crashes = python("import sys; sys.exit('error: no such thing')")
    works = python("import json, sys; json.dump({'value': 1.5}, open(sys.argv[1], 'w'))", tmp_path / "works.json")
    for part in (Part("hangs", hangs, timeout_s=3), Part("crashes", crashes, timeout_s=30),
                 Part("works", works, timeout_s=30)):
        run_part(part, tmp_path)

    hung = json.loads((tmp_path / "hangs.json").read_text())
    assert hung["part"]["status"] == "timeout" and hung["had"] == "this much"
    assert 3 <= hung["part"]["wall_s"] < 60
    crashed = json.loads((tmp_path / "crashes.json").read_text())
    assert crashed["part"]["status"] == "failed" and crashed["part"]["returncode"] == 1
    assert "error: no such thing" in crashed["part"]["output_tail"]
    worked = json.loads((tmp_path / "works.json").read_text())
    assert worked["part"]["status"] == "ok" and worked["value"] == 1.5 and "output_tail" not in worked["part"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashes.json", "hangs.json", "works.json"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_smoke_writes_every_file_with_its_figures(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "exit status 0" in proc.stdout
    assert {p.name for p in out.iterdir()} == FILES  # 8 files, nothing else
    data = {name.removesuffix(".json"): json.loads((out / name).read_text()) for name in FILES}
    for name, record in data.items():
        if name != "summary":
            assert record["part"]["status"] == "ok" and finite(record["part"]["wall_s"]), (name, record["part"])

    env_record = data["environment"]
    assert finite(env_record["matmul"]["tflops"]) and env_record["matmul"]["tflops"] > 0
    assert finite(env_record["copy"]["gb_per_s"]) and env_record["copy"]["gb_per_s"] > 0
    assert set(env_record["versions"]) >= {"python", "torch", "transformers", "colossalai", "triton", "accelerate"}

    tests = data["gpu_tests"]  # CUDA hidden in --smoke: every test marked gpu skips, with its reason
    assert tests["cuda"] is False
    if tests.get("note") != "no test is marked gpu":
        assert tests["counts"]["passed"] == tests["counts"]["failed"] == 0 and tests["counts"]["skipped"] > 0
        assert all(s["reason"] for s in tests["skipped"])

    train = data["train_e2e"]
    runs = train["runs"]
    assert list(runs) == ["zero1", "zero2", "mix_eval_save", "resume", "infer", "infer_multi_device", "load_balance"]
    for name in ("zero1", "zero2", "mix_eval_save", "resume", "infer", "infer_multi_device"):
        assert runs[name]["status"] == "ok" and finite(runs[name]["tokens_per_s"]), (name, runs[name])
    for name in ("zero1", "zero2", "mix_eval_save", "resume"):
        assert finite(runs[name]["mfu_of_measured_matmul"]) and runs[name]["mfu"] is None
    assert all(v > 0 for v in runs["mix_eval_save"]["data_tokens"].values())
    assert len(runs["mix_eval_save"]["data_tokens"]) == 2
    assert finite(runs["mix_eval_save"]["summary"]["eval/loss"])
    assert runs["resume"]["resumed_from_step"] == 2 and runs["resume"]["summary"]["steps"] == 4
    assert set(runs["infer_multi_device"]["planned_bytes"]) == {"cpu", "disk"}
    assert runs["load_balance"]["status"] == "not applicable on one device"
    assert runs["load_balance"]["message"].startswith("error: --load_balance")
    assert train["skipped"]["mfu"] and train["skipped"]["max_memory_gib"]  # CUDA only, each with its reason

    for name in ("moe_layer", "router_permute"):
        assert data[name]["mode"] == "smoke" and data[name]["cases"] and data[name]["left_out_by_time_limit"] == []
    assert data["train_step"]["variants"]["hf_liger_flce"]["status"] == "skipped"
    assert data["train_step"]["variants"]["hf_liger_flce"]["reason"]
    configs = data["memory_check"]["configs"]
    assert [c["checkpointing"] for c in configs] == [False, True]
    assert all(finite(c["ratio_estimated_over_measured"]["peak"]) for c in configs)

    summary = data["summary"]
    assert summary["mode"] == "smoke" and summary["exit_status"] == 0
    parts = summary["parts"]
    assert {name: p["status"] for name, p in parts.items()} == {name: "ok" for name in data if name != "summary"}
    assert finite(parts["environment"]["matmul_bf16_tflops"]) and finite(parts["environment"]["copy_gb_per_s"])
    assert finite(parts["train_e2e"]["zero1"]["tokens_per_s"]) and finite(parts["train_e2e"]["infer"]["tokens_per_s"])
    assert finite(parts["train_step"]["hf_grouped_mm"]["ours_over_this"])
    assert all(finite(v) for case in ("smoke/256/uniform/dropless", "smoke/256/skewed/capacity")
               for v in parts["moe_layer"][case]["ours_over_peer"].values())
    assert all(finite(c["estimated_over_measured_peak"]) for c in parts["memory_check"].values()
               if isinstance(c, dict))


def test_benchmarks_start_nothing_after_their_time_limit(tmp_path):
    from benchmarks import router_permute, train_step
    out = tmp_path / "router_permute.json"
    assert router_permute.main(["--smoke", "--time_limit_s", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cases"] == [] and len(result["left_out_by_time_limit"]) == 4

    out = tmp_path / "train_step.json"
    assert train_step.main(["--smoke", "--time_limit_s", "0", "--variants", "ours", "hf_grouped_mm",
                            "--out", str(out)]) == 1  # ours did not run
    variants = json.loads(out.read_text())["variants"]
    assert all(v["status"] == "skipped" and "--time_limit_s 0" in v["reason"] for v in variants.values())


@pytest.mark.slow
def test_gpu_tests_run_on_the_cpu_as_a_dry_run(tmp_path):
    # The gpu-marked tests run for real only where CUDA is; their logic runs here with the switch, so a change that
    # breaks them (an import, a signature, a tolerance) shows in every test run, not first on a GPU.
    env = {**os.environ, "MOE_GPU_TESTS_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout.splitlines()[-1] and "failed" not in proc.stdout.splitlines()[-1]
