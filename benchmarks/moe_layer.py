"""Forward + backward of one MoE layer (router included), ours beside its peers.

    python -m benchmarks.moe_layer --smoke --out smoke.json          # tiny shapes on CPU, seconds
    python -m benchmarks.moe_layer --out moe_layer.json              # docs/performance.md's shapes, CUDA when present
    python -m benchmarks.moe_layer --shapes openmoe-base --tokens 16384 --routing uniform --dispatch dropless

Implementations, all run in the same process on the same input:
* ours                 OpenMoeSparseMLP as it runs: grouped_mm experts, else its fallback (moe_system/moe)
* ours_loop            the same layer with its per-expert loop
* ours_triton          the same layer on our Triton grouped GEMM (moe_system/kernels/grouped_gemm.py), which auto
                       takes where torch._grouped_mm has no kernel (sm80-sm89, fp16); CUDA only (on the CPU only
                       under TRITON_INTERPRET=1)
* torch_grouped_mm     a plain reference written here: argsort, gather, 2 grouped GEMMs, index_add
* hf_<impl>            transformers' MixtralSparseMoeBlock, one entry per registered experts_implementation
* liger_fused_moe      liger-kernel's fused MoE (Triton; only where it imports, i.e. on a GPU with the wheel)

Our expert is OpenMoE's: wo(g[:I] * silu(g[I:]) * up) with a 2I-wide gate g and an I-wide up projection.
transformers' grouped_mm and batched_mm experts call a `_apply_gate` hook, so they are given a [E, 3I, H]
gate_up weight and OpenMoE's gate: they compute exactly our function and are compared with ours directly.
transformers' eager experts and liger's kernel hard-code silu(gate) * up, so they run the standard SwiGLU
of width F = 4I/3 (rounded to a multiple of 64), which has the same FLOPs and parameters as our expert, and
are checked against the plain reference run with that same SwiGLU and the same weights.

Mixtral's router always renormalises the top-k weights; our layer is configured with router_renormalize=True
here so that the functions agree (it costs one [T, k] division).

FLOPs (forward + backward = 3 x forward; every GEMM of m x n x p counts 2mnp):
  OpenMoE expert, per routed copy, forward: 2*H*2I (gate) + 2*H*I (up) + 2*I*H (down) = 8*H*I
  => experts: 24*T*k*H*I.   The usual 18*T*k*H*F is the standard SwiGLU of width F (3 GEMMs of
  H x F); applied to our expert with F = I it undercounts by 25%. 24*T*k*H*I = 18*T*k*H*(4I/3).
  Router: 2*T*H*E forward => 6*T*H*E.  Every copy is counted, also copies dropped by capacity: on one device
  the layer computes them and gives them weight 0.

Each implementation's output and input gradient must equal the reference within a tolerance before it is
timed: otherwise it is recorded as "mismatch", never timed, and the script exits with status 1 once the
JSON is written (an error or out-of-memory in a peer is recorded the same way, so one failing peer does
not lose a GPU run). Tokens are compared where both routers chose the same experts: a peer
whose router computes its logits in bf16 (Mixtral's) can flip a near-tie that ours, in fp32, does not. With
capacity, tokens with a dropped copy are left out for the dropless peers.
"""

import argparse
import copy
import math
import time
import types

import torch
import torch.nn.functional as F

from moe_system.kernels import triton_usable
from moe_system.model import OpenMoeConfig
from moe_system.moe import OpenMoeSparseMLP, capacity
from moe_system.moe.experts import swiglu3

from .common import GiB, Mismatch, add_shape_arguments, check_against_reference, deadline, environment, exit_code, \
    guarded, peak_bytes, shape_settings, time_ms, write_json

# docs/performance.md, Benchmark shapes. Mixtral-like and fine-grained are given as standard SwiGLU widths F there; our
# 3-way expert with I = 3F/4 has exactly their FLOPs and parameter count (4*H*I = 3*H*F).
SHAPES = {
    "openmoe-base": dict(hidden=768, inter=2048, experts=16, top_k=2),
    "openmoe-8b": dict(hidden=2048, inter=8192, experts=32, top_k=2),
    "mixtral-like": dict(hidden=4096, inter=10752, experts=8, top_k=2),     # Mixtral 8x7B: F = 14336
    "fine-grained": dict(hidden=2048, inter=576, experts=128, top_k=8),     # F = 768
}
TOKENS = [4096, 16384, 65536]
SMOKE_SHAPES = {"smoke": dict(hidden=64, inter=96, experts=8, top_k=2)}
SMOKE_TOKENS = [256]
SMOKE_VARIANTS = [("uniform", "dropless"), ("skewed", "capacity")]
CAPACITY_FACTOR = 1.25
SKEW = 4.0            # skewed routing: expert 0 receives SKEW times the mean load
TOLERANCE = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (3e-2, 1e-3)}  # (relative to max |ref|, absolute)

FLOP_FORMULA = {
    "openmoe_expert": "flops = 24*T*k*H*I + 6*T*H*E   (3-way expert: 8*H*I per copy forward; router 2*H*E; x3 fwd+bwd)",
    "swiglu_expert": "flops = 18*T*k*H*F + 6*T*H*E   (standard SwiGLU of width F: 6*H*F per copy forward)",
    "tflops": "flops / (median ms * 1e-3) / 1e12",
}


def native_width(inter: int) -> int:
    """Width F of a standard SwiGLU with our expert's FLOPs (4I/3), rounded to a multiple of 64."""
    return max(64, round(4 * inter / 3 / 64) * 64)


def layer_flops(tokens, hidden, width, experts, top_k, function) -> float:
    per_copy = 8 * hidden * width if function == "openmoe3" else 6 * hidden * width
    return 3.0 * (tokens * top_k * per_copy + 2 * tokens * hidden * experts)


# ----------------------------------------------------------------------------------------------------------
# The plain torch._grouped_mm reference


def gated(h: torch.Tensor, function: str) -> torch.Tensor:
    if function == "openmoe3":  # [S, 3I]: 2I-wide gate then I-wide up
        inter = h.shape[-1] // 3
        return swiglu3(h[:, :2 * inter], h[:, 2 * inter:])
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def route_fp32(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int):
    """Our router's choice (fp32 logits, softmax, top-k), renormalised as Mixtral does."""
    probs = F.linear(x.float(), gate_weight.float()).softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def grouped_mm_reference(x, gate_weight, w_in, w_out, top_k, function, cap=None):
    """x [T, H]; w_in [E, H, 3I or 2F]; w_out [E, I or F, H]. Sort copies by expert, 2 grouped GEMMs, index_add."""
    num_tokens, num_experts = x.shape[0], gate_weight.shape[0]
    weights, experts = route_fp32(x, gate_weight, top_k)
    flat_expert = experts.t().reshape(-1)            # choice-major: first choices rank first (capacity priority)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=num_experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    token = order % num_tokens
    h = torch._grouped_mm(x[token], w_in, offs=offsets)
    rows = torch._grouped_mm(gated(h, function), w_out, offs=offsets)
    row_weight = weights.t().reshape(-1)[order]
    if cap is not None:
        rank = torch.arange(order.numel(), device=x.device) - (offsets - counts)[flat_expert[order]]
        row_weight = row_weight * (rank < cap)
    return torch.zeros_like(x).index_add_(0, token, rows * row_weight[:, None].to(x.dtype))


class ReferenceLayer(torch.nn.Module):
    """The reference with its own weights: w_in holds [gate | up] side by side so that one grouped GEMM does both."""

    def __init__(self, gate_weight, w_in, w_out, top_k, function, cap):
        super().__init__()
        self.gate_weight = torch.nn.Parameter(gate_weight.detach().clone())
        self.w_in = torch.nn.Parameter(w_in.detach().contiguous().clone())
        self.w_out = torch.nn.Parameter(w_out.detach().contiguous().clone())
        self.top_k, self.function, self.cap = top_k, function, cap

    def forward(self, x):
        shape = x.shape
        out = grouped_mm_reference(x.reshape(-1, shape[-1]), self.gate_weight, self.w_in, self.w_out, self.top_k,
                                   self.function, self.cap)
        return out.view(shape)


# ----------------------------------------------------------------------------------------------------------
# Peers


def hf_experts_implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


def openmoe_apply_gate(self, gate_up_out):
    """transformers' `_apply_gate` hook, given OpenMoE's 3-way gate: [S, 3I] -> [S, I]."""
    return gated(gate_up_out, "openmoe3")


def hf_block(impl, hidden, width, experts, top_k, function, gate_weight, gate_up, down, device, dtype):
    """MixtralSparseMoeBlock with the given experts_implementation and weights gate_up [E, n, H], down [E, H, w]."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=hidden, intermediate_size=width, num_local_experts=experts,
                           num_experts_per_tok=top_k, router_jitter_noise=0.0, hidden_act="silu")
    config._experts_implementation = impl   # what from_pretrained(experts_implementation=...) sets
    block = MixtralSparseMoeBlock(config)
    block.gate.weight = torch.nn.Parameter(gate_weight.detach().clone())
    block.experts.gate_up_proj = torch.nn.Parameter(gate_up.detach().contiguous().clone())
    block.experts.down_proj = torch.nn.Parameter(down.detach().contiguous().clone())
    if function == "openmoe3":
        if not hasattr(block.experts, "_apply_gate"):
            import transformers
            raise RuntimeError(f"transformers {transformers.__version__} has no experts `_apply_gate` hook: "
                               "its experts cannot compute OpenMoE's 3-way gate")
        block.experts._apply_gate = types.MethodType(openmoe_apply_gate, block.experts)
    return block.to(device, dtype).train()


class LigerMoE(torch.nn.Module):
    """Mixtral's router followed by liger-kernel's fused MoE (gather + grouped GEMM + SwiGLU + scatter)."""

    def __init__(self, block):
        super().__init__()
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
        self.fused = LigerFusedMoEFunction
        self.block = block

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, weights, experts = self.block.gate(flat)
        out = self.fused.apply(flat, self.block.experts.gate_up_proj, self.block.experts.down_proj,
                               experts.to(torch.int32), weights)
        return out.view(shape)


def liger_available(device) -> str | None:
    """None when liger's fused MoE can run here, else why not."""
    if device.type != "cuda":
        return "liger-kernel's fused MoE is a Triton kernel: CUDA only"
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction  # noqa: F401
    except Exception as exc:  # not installed, or its Triton does not match this torch
        return f"liger-kernel does not import: {type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------------------------------------
# One case


def make_input(tokens, hidden, gate_weight, experts, top_k, routing, dtype, device, generator):
    """[1, T, H] input; for skewed routing, a share of tokens is pushed to expert 0 so it gets SKEW x the mean.

    With a fraction f of tokens forced to expert 0 and the rest near uniform, expert 0 receives about
    f*T + (1-f)*T*k/E copies; setting that to SKEW*T*k/E gives f = (SKEW-1)*k / (E-k).
    """
    x = torch.randn(tokens, hidden, generator=generator)
    gate_weight = gate_weight.detach()
    if routing == "skewed":
        forced = min(1.0, (SKEW - 1) * top_k / (experts - top_k))
        direction = gate_weight[0].float().cpu()
        margin = 4.0 * float((x @ gate_weight.float().cpu().t()).std())  # well above the logits' spread
        chosen = torch.rand(tokens, generator=generator) < forced
        x[chosen] += margin * direction / direction.square().sum()
    return x.to(device, dtype).unsqueeze(0).requires_grad_()


def same_choice(experts_a: torch.Tensor, experts_b: torch.Tensor) -> torch.Tensor:
    return (experts_a.sort(dim=-1).values == experts_b.sort(dim=-1).values).all(dim=-1)


def run_case(shape_name, shape, tokens, routing, dispatch, impls, device, dtype, warmup, iters) -> dict:
    hidden, inter, experts, top_k = shape["hidden"], shape["inter"], shape["experts"], shape["top_k"]
    width = native_width(inter)
    generator = torch.Generator().manual_seed(0)
    cfg = OpenMoeConfig(hidden_size=hidden, intermediate_size=inter, num_experts=experts, router_topk=top_k,
                        dispatch=dispatch, capacity_factor_train=CAPACITY_FACTOR, router_renormalize=True,
                        num_hidden_layers=1, num_attention_heads=1, head_dim=hidden, vocab_size=8)
    torch.manual_seed(0)
    ours = OpenMoeSparseMLP(cfg)
    ours.reset_parameters()
    ours = ours.to(device, dtype).train()

    x = make_input(tokens, hidden, ours.gate_weight, experts, top_k, routing, dtype, device, generator)
    grad_out = torch.randn(x.shape, generator=generator).to(device, dtype)
    cap = capacity(tokens, experts, top_k, CAPACITY_FACTOR, cfg.min_capacity) if dispatch == "capacity" else None

    # The weights of the native-SwiGLU peers (same init scale as our experts), shared by their reference.
    native_gate_up = (torch.randn(experts, 2 * width, hidden, generator=generator) * math.sqrt(0.1 / hidden)).to(dtype)
    native_down = (torch.randn(experts, hidden, width, generator=generator) * math.sqrt(0.1 / width)).to(dtype)

    def ours_weights_in():   # [E, H, 3I]
        return torch.cat([ours.experts.wi_gate, ours.experts.wi_up], dim=-1)

    builders = {
        "ours": lambda: ours,
        "ours_loop": lambda: impl_copy(ours, "loop"),
        "ours_triton": lambda: impl_copy(ours, "triton"),
        "torch_grouped_mm": lambda: ReferenceLayer(ours.gate_weight, ours_weights_in(), ours.experts.wo, top_k,
                                                   "openmoe3", cap),
    }
    function_of = {name: "openmoe3" for name in builders}
    skipped = {}
    if not triton_usable(x):
        del builders["ours_triton"]
        skipped["ours_triton"] = "the Triton kernel needs CUDA (or TRITON_INTERPRET=1 on the CPU) and triton installed"
    for impl in hf_experts_implementations():
        name = f"hf_{impl}"
        if impl in ("eager",):
            function_of[name] = "swiglu2"
            builders[name] = (lambda impl=impl: hf_block(impl, hidden, width, experts, top_k, "swiglu2",
                                                         ours.gate_weight, native_gate_up, native_down, device, dtype))
        elif impl in ("grouped_mm", "batched_mm"):
            function_of[name] = "openmoe3"
            builders[name] = (lambda impl=impl: hf_block(
                impl, hidden, inter, experts, top_k, "openmoe3", ours.gate_weight,
                ours_weights_in().transpose(1, 2), ours.experts.wo.transpose(1, 2), device, dtype))
        else:
            skipped[name] = f"experts_implementation {impl!r} needs kernels fetched from the Hub at run time"
    batched_bytes = tokens * top_k * 4 * hidden * inter * dtype.itemsize   # one weight copy per routed token
    batched_limit = 0.5 * (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 2 * GiB)
    if "hf_batched_mm" in builders and batched_bytes > batched_limit:
        del builders["hf_batched_mm"]
        skipped["hf_batched_mm"] = (f"batched_mm gathers one expert weight copy per routed token: "
                                    f"{batched_bytes / GiB:.1f} GiB > {batched_limit / GiB:.1f} GiB")
    liger_reason = liger_available(device)
    if liger_reason:
        skipped["liger_fused_moe"] = liger_reason
    else:
        function_of["liger_fused_moe"] = "swiglu2"
        builders["liger_fused_moe"] = lambda: LigerMoE(hf_block("eager", hidden, width, experts, top_k, "swiglu2",
                                                                ours.gate_weight, native_gate_up, native_down,
                                                                device, dtype))
    wanted = [name for name in builders if impls is None or name in impls]

    # References: ours for the OpenMoE function, the plain reference with the native weights for SwiGLU.
    out_ours, grad_ours = forward_backward(ours, x, grad_out)
    flat = x.detach().reshape(-1, hidden)
    _, ours_choice = route_fp32(flat, ours.gate_weight, top_k)
    # Tokens none of whose copies ours dropped: the only ones a dropless peer can be compared on.
    kept_all = kept_mask(ours_choice, experts, cap) if cap is not None else torch.ones(tokens, dtype=torch.bool,
                                                                                      device=device)
    native_ref = ReferenceLayer(ours.gate_weight, native_gate_up.transpose(1, 2), native_down.transpose(1, 2),
                                top_k, "swiglu2", None).to(device)
    out_native, grad_native = forward_backward(native_ref, x, grad_out)
    del native_ref

    counts = ours.last_counts.float()
    case = {
        "shape": shape_name, "hidden": hidden, "intermediate": inter, "native_swiglu_width": width,
        "experts": experts, "top_k": top_k, "tokens": tokens, "routing": routing, "dispatch": dispatch,
        "capacity": cap, "dtype": str(dtype).removeprefix("torch."),
        "max_over_mean_load": float(counts.max() / counts.mean()),
        "dropped_fraction": float(ours.last_dropped.sum()) / (tokens * top_k),
        "flops": {"openmoe3": layer_flops(tokens, hidden, inter, experts, top_k, "openmoe3"),
                  "swiglu2": layer_flops(tokens, hidden, width, experts, top_k, "swiglu2")},
        "results": {name: {"status": "skipped", "reason": reason} for name, reason in skipped.items()},
    }
    rtol, atol = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])

    def run_impl(name):
        module = builders[name]()
        function = function_of[name]
        ref_out, ref_grad = (out_ours, grad_ours) if function == "openmoe3" else (out_native, grad_native)
        out, grad = forward_backward(module, x, grad_out)
        # The peers are dropless and route with Mixtral's router, whose logits are in the layer dtype.
        mask = torch.ones_like(kept_all)
        agreement = 1.0
        if name.startswith(("hf_", "liger")):
            gate = module.block.gate if isinstance(module, LigerMoE) else module.gate
            with torch.no_grad():
                _, _, peer_choice = gate(flat)
            agree = same_choice(peer_choice, ours_choice)
            agreement = float(agree.float().mean())
            mask = kept_all & agree
        if int(mask.sum()) < 0.25 * tokens:
            raise Mismatch(f"{name}: too few tokens comparable",
                           {"routing_agreement": agreement, "compared_tokens": int(mask.sum())})
        check = check_against_reference(
            name, (out.view(-1, hidden), grad.view(-1, hidden)), (ref_out.view(-1, hidden), ref_grad.view(-1, hidden)),
            rtol, atol, "ours" if function == "openmoe3" else "torch_grouped_mm with the same SwiGLU weights",
            mask, routing_agreement=agreement, compared_tokens=int(mask.sum()))

        def step():
            x.grad = None
            for p in module.parameters():
                p.grad = None
            out = module(x)
            (out[0] if isinstance(out, tuple) else out).backward(grad_out)

        timing = time_ms(step, device, warmup, iters)
        flops = case["flops"][function]
        return {"status": "ok", "function": function, **timing, "tflops": flops / (timing["ms"] * 1e-3) / 1e12,
                "peak_bytes": peak_bytes(step, device), "check": check}

    for name in wanted:
        case["results"][name] = guarded(lambda: run_impl(name), device)
    add_ratios(case["results"])
    return case


def impl_copy(layer: OpenMoeSparseMLP, impl: str) -> OpenMoeSparseMLP:
    other = copy.deepcopy(layer)
    other.experts.impl = impl
    return other


def kept_mask(choice: torch.Tensor, experts: int, cap: int) -> torch.Tensor:
    """[T] True where every copy of the token fits its expert's capacity (first choices rank first)."""
    flat = choice.t().reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts)
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return (rank < cap).view(choice.shape[1], -1).all(dim=0)


def forward_backward(module, x, grad_out):
    """Output and input gradient of one forward + backward (detached copies)."""
    x = x.detach().requires_grad_()
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out)
    for p in module.parameters():
        p.grad = None
    return out.detach(), x.grad.detach()


def add_ratios(results: dict) -> None:
    """ms_ratio < 1 and tflops_ratio > 1 mean ours is faster than that peer."""
    ours = results.get("ours", {})
    if ours.get("status") != "ok":
        return
    for name, result in results.items():
        if name != "ours" and result.get("status") == "ok":
            result["ms_ratio_ours_over_this"] = ours["ms"] / result["ms"]
            result["tflops_ratio_ours_over_this"] = ours["tflops"] / result["tflops"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--routing", nargs="+", choices=["uniform", "skewed"], help="default: both")
    parser.add_argument("--dispatch", nargs="+", choices=["dropless", "capacity"], help="default: both")
    parser.add_argument("--impls", nargs="+", help="only these implementations (ours is always run first)")
    args = parser.parse_args(argv)

    device, dtype, shapes, tokens, warmup, iters = shape_settings(args, SHAPES, SMOKE_SHAPES, TOKENS, SMOKE_TOKENS,
                                                                  warmup=3, iters=10)
    impls = None if args.impls is None else {"ours", *args.impls}

    if args.smoke and not (args.routing or args.dispatch):
        variants = SMOKE_VARIANTS  # the two extremes exercise every code path; all four would double the time
    else:
        variants = [(r, d) for r in args.routing or ["uniform", "skewed"]
                    for d in args.dispatch or ["dropless", "capacity"]]
    stop_at = deadline(args.time_limit_s)
    cases, left_out = [], []
    for name, shape in shapes.items():
        for t in tokens:
            for routing, dispatch in variants:
                if time.monotonic() > stop_at:
                    left_out.append(f"{name} tokens={t} {routing} {dispatch}")
                    continue
                cases.append(run_case(name, shape, t, routing, dispatch, impls, device, dtype, warmup, iters))
    write_json(args.out, {
        "benchmark": "moe_layer", "mode": "smoke" if args.smoke else "full", "environment": environment(device),
        "dtype": str(dtype).removeprefix("torch."), "flop_formula": FLOP_FORMULA,
        "timing": {"warmup": warmup, "iters": iters, "statistic": "median",
                   "clock": "CUDA events" if device.type == "cuda" else "perf_counter",
                   "work": "forward + backward seeded from the layer output (router losses' backward excluded)"},
        "peak_memory": "bytes allocated beyond the inputs and weights during one forward+backward "
                       + ("(torch.cuda.max_memory_allocated)" if device.type == "cuda"
                          else "(live tensor storages at op boundaries, benchmarks/common.py)"),
        "cases": cases, "left_out_by_time_limit": left_out,
    })
    return exit_code([case["results"] for case in cases])


if __name__ == "__main__":
    raise SystemExit(main())
