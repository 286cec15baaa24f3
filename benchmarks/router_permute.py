"""Router + permute + unpermute alone (expert GEMMs excluded), and host syncs per step.

    python -m benchmarks.router_permute --smoke --out smoke.json
    python -m benchmarks.router_permute --out router_permute.json          # CUDA when present

Timed, forward + backward, on the same input:
* ours              OpenMoeSparseMLP's real forward with the experts replaced by the identity: router (gate
                    GEMM, softmax, top-k, aux and z losses), DispatchPlan (argsort, counts, ranks), gather of
                    the copies, capacity mask, weighted combine.
* torch_reference   the plain reference of moe_layer.py with identity experts: fp32 router, argsort, gather,
                    index_add.

Host synchronisations per forward + backward step, counted on CUDA with torch.cuda.set_sync_debug_mode("warn"):
every synchronising call (.item(), .tolist(), nonzero, a copy to the host ...) raises a warning, and the
warnings of one step (after warm-up) are counted. Counted for the router + permute path, for the whole layer
with grouped_mm experts, and for the whole layer with the per-expert loop (which needs the counts on the
host). On CPU there is nothing to count: every op completes before the next starts, so there is no device
queue for the host to wait on, and the debug mode only watches CUDA; the JSON says "n/a".
"""

import argparse
import time
import warnings

import torch

from moe_system.model import OpenMoeConfig
from moe_system.moe import OpenMoeSparseMLP, capacity

from .common import add_shape_arguments, check_against_reference, deadline, environment, exit_code, guarded, \
    peak_bytes, shape_settings, time_ms, write_json
from .moe_layer import CAPACITY_FACTOR, SHAPES, SMOKE_SHAPES, TOLERANCE, make_input, route_fp32

TOKENS = [4096, 16384, 65536]
SMOKE_TOKENS = [512]


class IdentityExperts(OpenMoeSparseMLP):
    """The real layer with its expert FFN skipped: what remains is routing and data movement."""

    def run_experts(self, rows, plan, cap):
        return rows


def reference_routing_only(x, gate_weight, top_k, cap):
    """moe_layer.grouped_mm_reference without its GEMMs."""
    num_tokens, num_experts = x.shape[0], gate_weight.shape[0]
    weights, experts = route_fp32(x, gate_weight, top_k)
    flat_expert = experts.t().reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    token = order % num_tokens
    row_weight = weights.t().reshape(-1)[order]
    if cap is not None:
        counts = torch.bincount(flat_expert, minlength=num_experts)
        rank = torch.arange(order.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[flat_expert[order]]
        row_weight = row_weight * (rank < cap)
    return torch.zeros_like(x).index_add_(0, token, x[token] * row_weight[:, None].to(x.dtype))


def count_host_syncs(step, device) -> int | str:
    if device.type != "cuda":
        return "n/a"
    step()  # warm-up: first calls may sync for reasons of their own (allocator, kernel loading)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run_case(shape_name, shape, tokens, routing, dispatch, device, dtype, warmup, iters) -> dict:
    hidden, experts, top_k = shape["hidden"], shape["experts"], shape["top_k"]
    cfg = OpenMoeConfig(hidden_size=hidden, intermediate_size=shape["inter"], num_experts=experts,
                        router_topk=top_k, dispatch=dispatch, capacity_factor_train=CAPACITY_FACTOR,
                        router_renormalize=True, num_hidden_layers=1, num_attention_heads=1, head_dim=hidden,
                        vocab_size=8)
    torch.manual_seed(0)
    layer = IdentityExperts(cfg)
    layer.reset_parameters()
    layer = layer.to(device, dtype).train()
    generator = torch.Generator().manual_seed(0)
    x = make_input(tokens, hidden, layer.gate_weight, experts, top_k, routing, dtype, device, generator)
    grad_out = torch.randn(x.shape, generator=generator).to(device, dtype)
    cap = capacity(tokens, experts, top_k, CAPACITY_FACTOR, cfg.min_capacity) if dispatch == "capacity" else None

    implementations = {
        "ours": lambda inp: layer(inp)[0],
        "torch_reference": lambda inp: reference_routing_only(inp.reshape(-1, hidden), layer.gate_weight, top_k,
                                                              cap).view(inp.shape),
    }
    outputs = {}
    for name, forward in implementations.items():
        inp = x.detach().requires_grad_()
        out = forward(inp)
        out.backward(grad_out)
        outputs[name] = (out.detach(), inp.grad)
        layer.gate_weight.grad = None
    rtol, atol = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    case = {"shape": shape_name, "hidden": hidden, "experts": experts, "top_k": top_k, "tokens": tokens,
            "routing": routing, "dispatch": dispatch, "capacity": cap, "dtype": str(dtype).removeprefix("torch."),
            "results": {}}
    def run_impl(name, forward):
        check = check_against_reference(name, outputs[name], outputs["ours"], rtol, atol, "ours")

        def step():
            x.grad = None
            layer.gate_weight.grad = None
            forward(x).backward(grad_out)

        timing = time_ms(step, device, warmup, iters)
        return {"status": "ok", **timing, "tokens_per_s": tokens / (timing["ms"] * 1e-3),
                "peak_bytes": peak_bytes(step, device), "host_syncs_per_step": count_host_syncs(step, device),
                "check": check}

    for name, forward in implementations.items():
        case["results"][name] = guarded(lambda: run_impl(name, forward), device)
    case["host_syncs_full_layer"] = full_layer_syncs(cfg, x, grad_out, device, dtype)
    return case


def full_layer_syncs(cfg, x, grad_out, device, dtype) -> dict:
    """Host syncs of one forward + backward of the real layer (experts included), per expert implementation."""
    counts = {}
    for impl in ("grouped_mm", "loop"):
        layer = OpenMoeSparseMLP(cfg)
        layer.reset_parameters()
        layer = layer.to(device, dtype).train()
        layer.experts.impl = impl

        def step():
            x.grad = None
            layer(x)[0].backward(grad_out)
        try:
            counts[impl] = count_host_syncs(step, device)
        except RuntimeError as exc:  # grouped_mm not available for this device / dtype
            counts[impl] = f"error: {exc}".splitlines()[0]
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--routing", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    parser.add_argument("--dispatch", nargs="+", default=["dropless", "capacity"], choices=["dropless", "capacity"])
    args = parser.parse_args(argv)

    device, dtype, shapes, tokens, warmup, iters = shape_settings(args, SHAPES, SMOKE_SHAPES, TOKENS, SMOKE_TOKENS,
                                                                  warmup=5, iters=20)
    stop_at = deadline(args.time_limit_s)
    cases, left_out = [], []
    for name, shape in shapes.items():
        for t in tokens:
            for routing in args.routing:
                for dispatch in args.dispatch:
                    if time.monotonic() > stop_at:
                        left_out.append(f"{name} tokens={t} {routing} {dispatch}")
                        continue
                    cases.append(run_case(name, shape, t, routing, dispatch, device, dtype, warmup, iters))
    write_json(args.out, {
        "benchmark": "router_permute", "mode": "smoke" if args.smoke else "full", "environment": environment(device),
        "dtype": str(dtype).removeprefix("torch."),
        "flop_formula": "none: no expert GEMMs; the router GEMM (2*T*H*E forward) is included in the time",
        "timing": {"warmup": warmup, "iters": iters, "statistic": "median",
                   "clock": "CUDA events" if device.type == "cuda" else "perf_counter",
                   "work": "forward + backward seeded from the layer output"},
        "host_sync_method": ("torch.cuda.set_sync_debug_mode('warn'), warnings of one step after warm-up"
                             if device.type == "cuda" else
                             "n/a on CPU: ops complete synchronously, there is no device queue to wait on"),
        "cases": cases, "left_out_by_time_limit": left_out,
    })
    return exit_code([case["results"] for case in cases])


if __name__ == "__main__":
    raise SystemExit(main())
