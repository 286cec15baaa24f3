"""What every benchmark shares: the environment record, timing, peak memory, and the JSON file.

Timing: on CUDA, CUDA events around each call with a synchronize after it; on CPU, perf_counter. Warm-up calls
are discarded and the median of the timed calls is reported (the mean would carry one-off stalls).

Peak memory: on CUDA, torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated
before the call (inputs and weights are not the call's). The CPU allocator keeps no statistics, so on CPU a
dispatch mode tracks every tensor storage created during the call and sums those still alive after each op:
the peak of live tensor bytes at op boundaries (scratch space inside one op is not seen).
"""

import datetime
import gc
import json
import math
import platform
import statistics
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 1024 ** 3
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM spec, dense bf16 (no sparsity): the MFU denominator


def pick_device(smoke: bool) -> torch.device:
    if not smoke and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def add_shape_arguments(parser) -> None:
    """The command-line flags the per-shape benchmarks (moe_layer, router_permute) share."""
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks that the script runs")
    parser.add_argument("--out", help="write the JSON here (printed otherwise)")
    parser.add_argument("--shapes", nargs="+", help="subset of the benchmark's shape names")
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iters", type=int)
    add_time_limit_argument(parser)


def add_time_limit_argument(parser) -> None:
    parser.add_argument("--time_limit_s", type=float,
                        help="start nothing new after this many seconds (the JSON lists what was left out), so that "
                             "a run under a hard time limit still writes its file")


def deadline(time_limit_s: float | None) -> float:
    """time.monotonic() after which a benchmark starts nothing new (never, without a limit)."""
    return math.inf if time_limit_s is None else time.monotonic() + time_limit_s


def shape_settings(args, shapes: dict, smoke_shapes: dict, tokens: list, smoke_tokens: list, warmup: int,
                   iters: int):
    """(device, dtype, shapes, tokens, warmup, iters) from add_shape_arguments' flags; smoke mode shrinks all."""
    device = pick_device(args.smoke)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    chosen = smoke_shapes if args.smoke else {name: shapes[name] for name in (args.shapes or shapes)}
    chosen_tokens = args.tokens or (smoke_tokens if args.smoke else tokens)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else warmup)
    iters = args.iters if args.iters is not None else (3 if args.smoke else iters)
    return device, dtype, chosen, chosen_tokens, warmup, iters


def environment(device: torch.device) -> dict:
    import transformers
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = "unavailable"
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """Median and spread of fn()'s wall time in milliseconds over iters calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "iters": iters}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive, sampled after every op.

    A storage is counted when an op returns it and none of the op's inputs shares it (so views and in-place
    results of pre-existing tensors, e.g. weights, are not); it stops counting once freed (a weak reference
    to the storage expires). Autograd's saved tensors and the backward pass are seen like any other op.
    """

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {StorageWeakRef(t.untyped_storage()).cdata
                  for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in self.live or ref.cdata in inputs or storage.nbytes() == 0:
                continue
            self.live[ref.cdata] = (ref, storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory that one call of fn allocates beyond what existed before it (see the module note)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as tracker:
        fn()
    return tracker.peak


class Mismatch(AssertionError):
    """An implementation's output differs from the reference; it is not timed."""

    def __init__(self, message: str, check: dict):
        super().__init__(message)
        self.check = check


def guarded(run, device: torch.device) -> dict:
    """run() -> result dict. A failure becomes a result too (status mismatch, oom or error), so that one peer
    failing on the GPU does not lose the measurements of the others."""
    try:
        return run()
    except Mismatch as exc:
        return {"status": "mismatch", "error": str(exc), "check": exc.check}
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "error": str(exc).splitlines()[0]}
    except Exception as exc:  # a peer that does not run here (kernel, dtype, version): record why
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def exit_code(result_sets: list[dict]) -> int:
    """1 when any implementation disagreed with the reference or ours did not run, else 0."""
    for results in result_sets:
        if any(r.get("status") == "mismatch" for r in results.values()):
            return 1
        if "ours" in results and results["ours"].get("status") != "ok":
            return 1
    return 0


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a.float() - b.float()).abs()
    if mask is not None:
        diff = diff[mask]
    return float(diff.max()) if diff.numel() else 0.0


def check_against_reference(name: str, got: tuple, want: tuple, rtol: float, atol: float, reference: str,
                            mask: torch.Tensor | None = None, **extra) -> dict:
    """got/want: (output, input gradient). Each may differ from the reference's by rtol * max|reference| + atol
    (over the rows in mask); returns the figures, or raises Mismatch with them, and the extra fields, in it."""
    (out, grad), (ref_out, ref_grad) = got, want
    check = {"reference": reference, "max_abs_diff_out": max_abs_diff(out, ref_out, mask),
             "max_abs_diff_grad_input": max_abs_diff(grad, ref_grad, mask),
             "tolerance": rtol * float(ref_out.abs().max()) + atol,
             "grad_tolerance": rtol * float(ref_grad.abs().max()) + atol, **extra}
    if check["max_abs_diff_out"] > check["tolerance"]:
        raise Mismatch(f"{name}: output differs from {reference}", check)
    if check["max_abs_diff_grad_input"] > check["grad_tolerance"]:
        raise Mismatch(f"{name}: input gradient differs from {reference}", check)
    return check


def finite_json(value):
    """NaN and infinities are not JSON: write them as null so that a reader notices."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str | None, result: dict) -> None:
    text = json.dumps(finite_json(result), indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text if not path else f"wrote {path}")
