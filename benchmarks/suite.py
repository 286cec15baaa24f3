"""The GPU check: everything the project measures on one GPU, in one command, every part under its own time limit.

    python -m benchmarks.suite [--smoke] [--out DIR] [--only PART ...] [--timeout_<part> SECONDS ...]

Parts, in order of value. Each runs as its own subprocess (killed with its children when its time is up) and
leaves its one JSON file in --out as soon as it ends: a part that hangs or runs out of time loses only itself,
and its file still says so ("part": {"status": "timeout", ...}) with whatever it had written by then.

  environment     versions, driver, and the ceilings MFU and ratios are read against: a bf16 matmul (8192^3 on
                  CUDA) in TFLOP/s and a device copy in GB/s, best of several
  gpu_tests       `pytest -m gpu -q tests`, summarised from its JUnit XML: passed / failed / skipped, with names
  train_e2e       train.py through Colossal-AI on one process (ZeRO 1, ZeRO 2, a weighted mix of two local
                  files with eval and a save, --resume latest), then infer.py and infer_multi_device.py on the
                  saved model: tokens/s, MFU, peak memory
  moe_layer       benchmarks/moe_layer.py at OpenMoE-base and 8B shapes, 16k tokens, dropless and capacity
  train_step      benchmarks/train_step.py at growing batch sizes (each variant stops at its first OOM)
  router_permute  benchmarks/router_permute.py at 16k tokens
  memory_check    the memory planner's estimate against a measured step, with and without checkpointing
  summary         summary.json and the same table on screen

--smoke runs every part on CPU at tiny shapes (train_e2e with the tiny preset in fp32) and writes the same files
with the same fields; what only CUDA can measure is listed under "skipped" with the reason. The exit status is 1
when any part failed or ran out of time, or an implementation of ours disagreed with its reference (the
benchmarks exit 1 then), and is set only once every file is written.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUTS = {  # seconds; 505 in all, so that the whole check fits in 9 minutes (train_step: 40 s of compiling)
    "environment": 20, "gpu_tests": 80, "train_e2e": 170, "moe_layer": 60, "train_step": 100, "router_permute": 30,
    "memory_check": 45}
BENCHMARK_ARGS = {  # full mode; --smoke passes --smoke instead
    "moe_layer": ["--shapes", "openmoe-base", "openmoe-8b", "--tokens", "16384", "--routing", "uniform",
                  "--dispatch", "dropless", "capacity", "--warmup", "2", "--iters", "5"],
    "train_step": ["--variants", "ours", "ours_torch_loss", "ours_compiled", "hf_grouped_mm", "hf_liger_flce",
                   "ours_autocast", "ours_all_moe",
                   "--batch_sizes", "2", "4", "8", "16", "32", "64", "--warmup", "1", "--iters", "3"],
    "router_permute": ["--shapes", "openmoe-base", "openmoe-8b", "--tokens", "16384", "--warmup", "3", "--iters", "10"],
}
BENCHMARK_TIME_SHARE = 0.75  # a benchmark starts no new case after this share of its limit: its file is written
TAIL_CHARS = 4000


# ----------------------------------------------------------------------------------------------------------
# The runner: one subprocess per part, one file per part


@dataclass
class Part:
    name: str           # its file is <name>.json
    command: list[str]  # run from the repository root; it may write the file itself, whole or in pieces
    timeout_s: float


def child_env(**extra) -> dict:
    # Nothing here may wait on a network; output unbuffered so that a killed part's tail is complete.
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ,
            "PYTHONUNBUFFERED": "1", **extra}


def write_json_atomic(path: Path, record: dict) -> None:
    """Whole or not at all: a part killed while writing leaves its previous version."""
    from .common import finite_json
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite_json(record), indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # a benchmark killed in the middle of writing its JSON
        return {"unreadable_file": f"{type(exc).__name__}: {exc}"}


def run_part(part: Part, out_dir: Path) -> dict:
    """Run one part; its file gets a "part" record (status ok / failed / timeout, wall seconds, exit status)."""
    path = out_dir / f"{part.name}.json"
    path.unlink(missing_ok=True)  # a file left from an earlier run must not pass for this one's
    start = time.monotonic()
    # The part's temporary files (checkpoints of base are ~10 GB) go to a folder removed however it ends.
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{part.name}-") as scratch:
        proc = subprocess.Popen(part.command, cwd=ROOT, env=child_env(TMPDIR=scratch), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=part.timeout_s)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: train.py's or pytest's children go with it
            output, _ = proc.communicate()
            status = "timeout"
        except BaseException:  # Ctrl-C: a part in its own session does not hear the terminal's signal
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    info = {"name": part.name, "status": status, "wall_s": round(time.monotonic() - start, 2),
            "timeout_s": part.timeout_s, "returncode": proc.returncode, "command": shlex.join(part.command)}
    if status != "ok":
        info["output_tail"] = output[-TAIL_CHARS:]
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
    record = {"part": info, **read_json(path)}
    write_json_atomic(path, record)
    print(f"{part.name:<15} {status:<8} {info['wall_s']:7.1f} s  -> {path}", flush=True)
    return record


def build_parts(args, out_dir: Path) -> list[Part]:
    mode = ["--smoke"] if args.smoke else []
    parts = []
    for name in TIMEOUTS:
        timeout = getattr(args, f"timeout_{name}")
        if name in BENCHMARK_ARGS:
            command = [sys.executable, "-m", f"benchmarks.{name}", *(mode or BENCHMARK_ARGS[name]),
                       "--time_limit_s", f"{BENCHMARK_TIME_SHARE * timeout:.0f}",
                       "--out", str(out_dir / f"{name}.json")]
        else:
            command = [sys.executable, "-m", "benchmarks.suite", "--part", name, "--out", str(out_dir), *mode,
                       f"--timeout_{name}", str(timeout)]
        parts.append(Part(name, command, timeout))
    return parts


# ----------------------------------------------------------------------------------------------------------
# Parts run inside the suite (python -m benchmarks.suite --part NAME): each saves its record as it grows


def part_environment(args, save) -> bool:
    import torch

    from .common import environment, pick_device, time_ms
    device = pick_device(args.smoke)
    record = {"environment": environment(device), "versions": versions(), "driver": driver()}
    save(record)
    cuda = device.type == "cuda"
    n = 8192 if cuda else 256
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    t = time_ms(lambda: torch.mm(a, b, out=c), device, warmup=10 if cuda else 2, iters=20 if cuda else 5)
    record["matmul"] = {"m_n_k": [n, n, n], "dtype": "bfloat16", "tflops": 2 * n ** 3 / (t["ms_min"] * 1e-3) / 1e12,
                        "statistic": "best of the timed calls", **t}
    save(record)
    del a, b, c
    size = 2 ** 30 if cuda else 2 ** 26
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=10)
    record["copy"] = {"bytes": size, "gb_per_s": 2 * size / (t["ms_min"] * 1e-3) / 1e9,
                      "counted": "bytes read + bytes written, best of the timed copies", **t}
    save(record)
    return True


def versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "colossalai", "triton", "accelerate"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def driver() -> dict:
    import torch
    record = {"torch_cuda": torch.version.cuda}
    if not shutil.which("nvidia-smi"):
        return {**record, "nvidia_smi": "absent"}
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=15)
    return {**record, "nvidia_smi": proc.stdout.strip() or proc.stderr.strip()}


def part_gpu_tests(args, save) -> bool:
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests", f"--junitxml={xml}",
                   "-p", "no:cacheprovider"]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout_gpu_tests)
        record = {"command": shlex.join(command), "returncode": proc.returncode, "cuda": torch.cuda.is_available(),
                  "pytest_summary": (proc.stdout.strip().splitlines() or [""])[-1]}
        if xml.exists():
            record.update(junit_summary(xml))
    if proc.returncode == 5:  # pytest: nothing selected
        record["note"] = "no test is marked gpu"
    elif not record["cuda"] and "counts" in record:
        record["skipped_reason"] = "no CUDA device: the tests marked gpu skip"
    if proc.returncode not in (0, 5):
        record["output_tail"] = (proc.stdout + proc.stderr)[-TAIL_CHARS:]
    save(record)
    return proc.returncode in (0, 5)


def junit_summary(path: Path) -> dict:
    import xml.etree.ElementTree as ET
    passed, failed, skipped = [], [], []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = next((case.find(tag) for tag in ("failure", "error") if case.find(tag) is not None), None)
        if bad is not None:
            failed.append({"name": name, "message": (bad.get("message") or bad.text or "")[:2000]})
        elif case.find("skipped") is not None:
            skipped.append({"name": name, "reason": case.find("skipped").get("message", "")})
        else:
            passed.append(name)
    return {"counts": {"passed": len(passed), "failed": len(failed), "skipped": len(skipped)},
            "passed": passed, "failed": failed, "skipped": skipped}


def run_cli(argv: list[str], timeout: float) -> dict:
    """One train.py / infer*.py process: its command, exit status, wall time and output."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          errors="replace", timeout=timeout)
    run = {"command": shlex.join(["python", *argv]), "returncode": proc.returncode,
           "wall_s": round(time.monotonic() - start, 2), "status": "ok" if proc.returncode == 0 else "failed"}
    run["output"] = proc.stdout + proc.stderr  # read by the caller, then dropped
    if proc.returncode:
        run["error"] = run["output"][-TAIL_CHARS:]
    return run


def train_figures(output_path: Path, flops_per_token: float, ceiling_tflops: float | None) -> dict:
    """The last logged window of metrics.jsonl (the first step is a window of its own) and summary.json."""
    perf = [r for r in map(json.loads, (output_path / "metrics.jsonl").read_text().splitlines())
            if "perf/tokens_per_s" in r]
    last = perf[-1]
    figures = {"tokens_per_s": last["perf/tokens_per_s"], "window_end_step": last["step"],
               "mfu": last.get("perf/mfu"),
               "max_memory_gib": max((r["perf/max_memory_gib"] for r in perf if "perf/max_memory_gib" in r),
                                     default=None),
               "data_tokens": {k: v for k, v in last.items() if k.startswith("data/") and k.endswith("/tokens")},
               "summary": json.loads((output_path / "summary.json").read_text())}
    if ceiling_tflops:  # the share of the measured matmul ceiling (environment.json), on any device
        figures["mfu_of_measured_matmul"] = last["perf/tokens_per_s"] * flops_per_token / (ceiling_tflops * 1e12)
    return figures


def part_train_e2e(args, save) -> bool:
    import torch

    from moe_system.model import OpenMoeConfig
    from moe_system.training.flops import train_flops_per_token
    cuda = torch.cuda.is_available() and not args.smoke
    model, precision, seq, batch, steps = ("tiny", "fp32", 32, 8, 4) if args.smoke else ("base", "bf16", 2048, 16, 10)
    ceiling = read_json(Path(args.out) / "environment.json").get("matmul", {}).get("tflops")
    record = {"model_name": model, "precision": precision, "device": "cuda" if cuda else "cpu",
              "matmul_ceiling_tflops": ceiling, "runs": {}}
    if not cuda:
        record["skipped"] = {
            "mfu": "train.py reports MFU against a GPU's peak, and a CPU has none (mfu_of_measured_matmul is given)",
            "max_memory_gib": "CUDA only (torch.cuda.max_memory_allocated)",
            "infer_multi_device on a GPU": "no GPU: the model is split over CPU memory and disk instead"}
    timeout = args.timeout_train_e2e
    common = ["train.py", "--model_name", model, "--precision", precision, "--plugin", "ep", "--comm_overlap"]
    ok = True

    with tempfile.TemporaryDirectory() as tmp:  # under the runner's scratch folder (TMPDIR)
        tmp = Path(tmp)

        def train(name: str, argv: list[str], max_length: int) -> dict:
            nonlocal ok
            run = run_cli(common + argv, timeout)
            output = run.pop("output")
            if run["status"] == "ok":
                out = Path(argv[argv.index("--output_path") + 1])
                fpt = train_flops_per_token(OpenMoeConfig.from_preset(model), max_length)
                run.update(train_figures(out, fpt, ceiling))
                found = re.search(r"resumed at step (\d+)", output)
                run["resumed_from_step"] = int(found.group(1)) if found else None
            ok &= run["status"] == "ok"
            record["runs"][name] = run
            save(record)
            return run

        # 1-2. Throughput: random tokens, ZeRO 1 and 2 (the ep plugin shards over the data-parallel ranks; one
        # process is a world of one, which ZeRO accepts). --comm_overlap is accepted and a no-op at EP size 1.
        for stage in (1, 2):
            out = tmp / f"zero{stage}"
            train(f"zero{stage}", ["--dataset", "synthetic", "--zero_stage", str(stage), "--batch_size", str(batch),
                                   "--max_length", str(seq), "--max_steps", str(steps),
                                   "--log_interval", str(steps // 2), "--output_path", str(out)], seq)
            shutil.rmtree(out, ignore_errors=True)  # a full-state checkpoint of base is ~10 GB

        # 3-4. A weighted mix of two local files, evaluated and saved, then resumed from the checkpoint.
        for name in ("a", "b"):
            with open(tmp / f"{name}.jsonl", "w") as f:
                for i in range(40):
                    f.write(json.dumps({"prompt": f"{name}: {i} + {i} =", "completion": f" {2 * i}"}) + "\n")
        mix = ["--dataset", f"{tmp / 'a.jsonl'}:0.7,{tmp / 'b.jsonl'}:0.3", "--eval_dataset", str(tmp / "b.jsonl"),
               "--eval_samples", "8", "--zero_stage", "1", "--batch_size", "4", "--max_length", "64",
               "--log_interval", "1", "--output_path", str(tmp / "mix")]
        first = train("mix_eval_save", mix + ["--max_steps", "2"], 64)
        if first["status"] == "ok":
            resumed = train("resume", mix + ["--max_steps", "4", "--resume", "latest"], 64)
            if resumed["status"] == "ok" and (resumed["resumed_from_step"] != 2 or resumed["summary"]["steps"] != 4):
                resumed.update(status="failed", error=f"expected to resume at step 2 and end at step 4; resumed at "
                                                      f"{resumed['resumed_from_step']}, ended at "
                                                      f"{resumed['summary']['steps']}")
                ok = False
                save(record)

        # 5-6. Generation from the saved model: one device, then spread (GPU + CPU memory, or CPU + disk).
        final = tmp / "mix" / "final"
        if final.is_dir():
            prompts = [arg for p in ("a: 3 + 3 =", "b: 5 + 5 =", "a: 7 + 7 =", "b: 9 + 9 =") for arg in ("--prompt", p)]
            sampling = ["--max_new_tokens", "32", "--temperature", "1.0", "--top_p", "1.0", "--seed", "0",
                        "--no_stream"]
            run = run_cli(["infer.py", "--model", str(final), *prompts, *sampling], timeout)
            found = re.search(r"(\d+) new tokens in ([\d.]+) s: ([\d.]+) tokens/s", run.pop("output"))
            if found:
                run.update(new_tokens=int(found.group(1)), seconds=float(found.group(2)),
                           tokens_per_s=float(found.group(3)))
            record["runs"]["infer"] = run
            stats = tmp / "stats.json"
            max_memory = "0=800MiB,cpu=64GiB" if cuda else "cpu=8MB"  # base bf16 is 1.5 GiB, tiny fp32 13 MB
            run = run_cli(["infer_multi_device.py", "--model", str(final), "--max_memory", max_memory,
                           "--stats_json", str(stats), *prompts, *sampling], timeout)
            run.pop("output")
            if stats.exists():
                figures = json.loads(stats.read_text())
                run.update(max_memory=max_memory, planned_bytes=figures["planned_bytes"],
                           new_tokens=figures["new_tokens"], tokens_per_s=figures["tokens_per_s"],
                           peak_rss_growth_mib=figures["peak_rss_growth_mib"])
            record["runs"]["infer_multi_device"] = run
            ok &= all(record["runs"][k]["status"] == "ok" for k in ("infer", "infer_multi_device"))
            save(record)

        # 7. --load_balance moves experts between EP ranks: train.py refuses it where there is one.
        run = run_cli(common + ["--dataset", "synthetic", "--zero_stage", "1", "--load_balance", "--max_steps", "2",
                                "--output_path", str(tmp / "load_balance")], timeout)
        lines = run.pop("output").strip().splitlines()
        if run["returncode"] and lines and lines[-1].startswith("error: --load_balance"):
            run.update(status="not applicable on one device", message=lines[-1])
            run.pop("error")
        ok &= run["status"] in ("ok", "not applicable on one device")
        record["runs"]["load_balance"] = run
        save(record)
    return ok


def part_memory_check(args, save) -> bool:
    import gc

    import torch

    from .common import GiB, environment, pick_device
    from .memory_check import compare
    device = pick_device(args.smoke)
    cuda = device.type == "cuda"
    configs = [("base", 4, 2048, False), ("base", 8, 2048, True)] if cuda else \
        [("tiny", 4, 128, False), ("tiny", 4, 128, True)]
    record = {"environment": environment(device), "configs": []}
    ok = True
    for model, batch, seq, checkpointing in configs:
        try:
            result = {"status": "ok", **compare(model, "bf16" if cuda else "fp32", batch, seq, checkpointing, device)}
            result["peak_gib"] = {k: result[which]["peak"] / GiB for k, which in
                                  (("estimated", "estimated"), ("measured", "measured"))}
        except torch.OutOfMemoryError as exc:
            result = {"status": "oom", "model_name": model, "batch_size": batch, "max_length": seq,
                      "checkpointing": checkpointing, "error": str(exc).splitlines()[0]}
            ok = False
        record["configs"].append(result)
        save(record)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return ok


IN_SUITE = {"environment": part_environment, "gpu_tests": part_gpu_tests, "train_e2e": part_train_e2e,
            "memory_check": part_memory_check}


# ----------------------------------------------------------------------------------------------------------
# The summary


def fmt(value, spec=".3g") -> str:
    return "-" if value is None else format(value, spec)


def key_figures(name: str, data: dict) -> tuple[dict, list[str]]:
    """(the figures summary.json keeps, the lines the screen shows) for one part's file."""
    if name == "environment":
        figures = {"device": data.get("environment", {}).get("device_name"),
                   "matmul_bf16_tflops": data.get("matmul", {}).get("tflops"),
                   "copy_gb_per_s": data.get("copy", {}).get("gb_per_s")}
        return figures, [f"{figures['device']}: matmul {fmt(figures['matmul_bf16_tflops'])} TFLOP/s bf16, "
                         f"copy {fmt(figures['copy_gb_per_s'])} GB/s"]
    if name == "gpu_tests":
        figures = {**data.get("counts", {}), "failed_names": [f["name"] for f in data.get("failed", [])]}
        if "note" in data:
            figures["note"] = data["note"]
        text = data.get("note") or ", ".join(f"{v} {k}" for k, v in data.get("counts", {}).items())
        return figures, [text + (f"; failed: {', '.join(figures['failed_names'])}" if figures["failed_names"] else "")]
    if name == "train_e2e":
        figures, lines = {}, []
        for run_name, run in data.get("runs", {}).items():
            keep = {k: run.get(k) for k in ("status", "tokens_per_s", "mfu", "mfu_of_measured_matmul",
                                             "max_memory_gib") if k in run}
            figures[run_name] = keep
            extra = "".join(f", {label} {fmt(run[k])}" for k, label in
                            (("mfu", "MFU"), ("mfu_of_measured_matmul", "of matmul"), ("max_memory_gib", "GiB"))
                            if run.get(k) is not None)
            speed = f", {run['tokens_per_s']:,.0f} tok/s" if run.get("tokens_per_s") is not None else ""
            lines.append(f"{run_name}: {run.get('status')}{speed}{extra}")
        return figures, lines
    if name in ("moe_layer", "router_permute"):
        figures, lines = {}, []
        for case in data.get("cases", []):
            label = f"{case['shape']}/{case['tokens']}/{case['routing']}/{case['dispatch']}"
            results = case["results"]
            if name == "moe_layer":
                ratios = {peer: r["tflops_ratio_ours_over_this"] for peer, r in results.items()
                          if "tflops_ratio_ours_over_this" in r}
                ours = f"ours {fmt(results['ours'].get('tflops'))} TFLOP/s"
            else:
                reference = results.get("torch_reference", {}).get("tokens_per_s")
                ratios = {"torch_reference": results["ours"]["tokens_per_s"] / reference
                          if reference and results["ours"].get("tokens_per_s") else None}
                ours = f"ours {fmt(results['ours'].get('tokens_per_s'), ',.0f')} tok/s"
            not_ok = {peer: r["status"] for peer, r in results.items() if r.get("status") not in ("ok", "skipped")}
            figures[label] = {"ours_over_peer": ratios, **({"not_ok": not_ok} if not_ok else {})}
            shown = " ".join(f"{peer} {fmt(v, '.2f')}" for peer, v in ratios.items())
            lines.append(f"{label}: {ours}; ours/peer {shown}" + (f"; not ok: {not_ok}" if not_ok else ""))
        if data.get("left_out_by_time_limit"):
            figures["left_out_by_time_limit"] = data["left_out_by_time_limit"]
            lines.append(f"left out (time limit): {len(data['left_out_by_time_limit'])} case(s)")
        return figures, lines
    if name == "train_step":
        figures, lines = {}, []
        for variant, v in data.get("variants", {}).items():
            best = v.get("best") or {}
            figures[variant] = {"status": v.get("status"), "tokens_per_s": best.get("tokens_per_s"),
                                "batch_size": best.get("batch_size"), "mfu": best.get("mfu"),
                                "ours_over_this": v.get("tokens_per_s_ratio_ours_over_this")}
            f = figures[variant]
            if best:
                lines.append(f"{variant}: {f['status']}, {f['tokens_per_s']:,.0f} tok/s at batch {f['batch_size']}, "
                             f"MFU {fmt(f['mfu'])}" + (f", ours/this {f['ours_over_this']:.2f}"
                                                       if f["ours_over_this"] is not None else ""))
            else:
                lines.append(f"{variant}: {f['status']} ({(v.get('reason') or v.get('error') or '')[:90]})")
        return figures, lines
    if name == "memory_check":
        figures, lines = {}, []
        for c in data.get("configs", []):
            label = f"{c['model_name']} b{c['batch_size']}x{c['max_length']}{' ckpt' if c['checkpointing'] else ''}"
            ratio = c.get("ratio_estimated_over_measured", {}).get("peak")
            figures[label] = {"status": c["status"], "estimated_over_measured_peak": ratio, **c.get("peak_gib", {})}
            lines.append(f"{label}: estimate/measured peak {fmt(ratio, '.3f')} "
                         f"({fmt(c.get('peak_gib', {}).get('estimated'))} / "
                         f"{fmt(c.get('peak_gib', {}).get('measured'))} GiB)")
        return figures, lines
    return {}, []


def summarise(out_dir: Path, ran: dict[str, str]) -> tuple[dict, list[str]]:
    """summary.json's record and the screen: every part's status, wall time and key figures; exit status 1
    when any part run now did not end "ok"."""
    parts, screen = {}, []
    for name in TIMEOUTS:
        data = read_json(out_dir / f"{name}.json")
        info = data.get("part", {"status": "not run"})
        figures, lines = key_figures(name, data) if data else ({}, [])
        parts[name] = {"status": info["status"], "wall_s": info.get("wall_s"), "file": f"{name}.json", **figures}
        head = f"{name:<15} {info['status']:<8} {fmt(info.get('wall_s'), '7.1f'):>7} s"
        screen += [f"{head}  {lines[0] if lines else ''}"] + [" " * (len(head) + 2) + line for line in lines[1:]]
    exit_status = int(any(status != "ok" for status in ran.values()))
    screen.append(f"exit status {exit_status}" + ("" if not exit_status else ": not ok: " + ", ".join(
        f"{name} ({status})" for name, status in ran.items() if status != "ok")))
    return {"exit_status": exit_status, "parts": parts}, screen


def default_out_dir(smoke: bool) -> Path:
    device = "cpu"
    if not smoke and shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=15)
        device = re.sub(r"[^a-z0-9]+", "-", (proc.stdout.splitlines() or ["gpu"])[0].lower()).strip("-") or "gpu"
    base = ROOT / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-{device}{'-smoke' if smoke else ''}"
    out, n = base, 1
    while out.exists():  # never write over an earlier run's results
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks that every part runs")
    parser.add_argument("--out", help="results folder (default: benchmarks/results/<date>-<device>/)")
    parser.add_argument("--only", nargs="+", choices=list(TIMEOUTS), metavar="PART",
                        help=f"run these parts only: {', '.join(TIMEOUTS)}")
    for name, seconds in TIMEOUTS.items():
        parser.add_argument(f"--timeout_{name}", type=float, default=seconds, metavar="S",
                            help=f"time limit of {name} (default {seconds} s)")
    parser.add_argument("--part", choices=list(IN_SUITE), help=argparse.SUPPRESS)  # the runner's subprocesses
    args = parser.parse_args(argv)
    if args.part:
        path = Path(args.out) / f"{args.part}.json"
        return 0 if IN_SUITE[args.part](args, lambda record: write_json_atomic(path, record)) else 1

    if args.smoke:  # on CPU also where a GPU is present: train.py and infer.py would otherwise take it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    out_dir = Path(args.out) if args.out else default_out_dir(args.smoke)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.exit(2, f"error: --out {out_dir}: cannot create that folder ({exc.strerror}); give another\n")
    ran = {}
    for part in build_parts(args, out_dir):
        if not args.only or part.name in args.only:
            ran[part.name] = run_part(part, out_dir)["part"]["status"]
    summary, screen = summarise(out_dir, ran)
    write_json_atomic(out_dir / "summary.json", {"mode": "smoke" if args.smoke else "full", **summary})
    print("\n".join(["", f"GPU check summary ({out_dir})", *screen]))
    return summary["exit_status"]


if __name__ == "__main__":
    raise SystemExit(main())
