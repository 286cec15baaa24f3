"""One expert-parallel MoE layer, forward + backward, with and without --comm_overlap.

    python -m benchmarks.comm_overlap --smoke --out smoke.json        # 2 CPU processes, tiny, seconds
    python -m benchmarks.comm_overlap --out comm_overlap.json         # 2 CPU processes, every scenario
    python -m benchmarks.comm_overlap --nproc 4 --chunks 2 4 8 --scenarios both
    python -m benchmarks.comm_overlap --nproc 4 --ranks_per_node 2 --inter_node_slowdown 10 --scenarios slow_link

`--nproc` processes (gloo, spawned by this script, one thread each) form one EP group; each holds an
OpenMoeSparseMLP sharded to num_experts / nproc experts (moe/expert_parallel.py, shard_experts) and routes its
own `--tokens` tokens. The same layer runs with overlap_chunks = 1 (one all-to-all each way, what runs without
--comm_overlap) and with each of `--chunks`, on the same input.

On one CPU, gloo's loopback transfers and the expert GEMMs compete for the same cores, so real overlap has
little to hide. The scenarios therefore inject costs that, like a GPU kernel or a network transfer, take time
without occupying the host thread:
* real          nothing injected: this machine's own GEMMs and gloo transfers.
* slow_link     every all-to-all of rows also takes time on a simulated link, one transfer at a time in launch
                order (a FIFO, like a single NCCL stream); the transfer runs from its launch, and waiting for it
                sleeps until it is done. A transfer costs, per message to another rank, latency + bytes /
                bandwidth; processes are grouped into nodes of --ranks_per_node consecutive ranks, and a message to
                another node costs --inter_node_slowdown times as much (latency and bytes). Rows a rank keeps
                cost nothing. The count exchanges (all-to-all, all_gather of sizes) are not slowed.
* slow_experts  every expert call also sleeps rows * --expert_us_per_row in forward and twice that in
                backward (a backward does two GEMMs per forward GEMM).
* both          both of the above: the case the overlap is for.

What is measured: per iteration, after a barrier, the forward and the backward (seeded from the layer output)
of the slowest rank (max over ranks), median over --iters rounds after --warmup; each round times every chunk
count once (round-robin), so that a shared machine's drifting load weighs on all alike. `ratio` = overlapped / plain
(< 1: overlap faster), for forward, backward and their sum. Before timing, each chunk count's output, input
gradient and expert weight gradients are compared with overlap_chunks = 1 (status "mismatch" and exit 1 when
they differ beyond float rounding). For `both` with the most chunks, rank 0's backward trace (launch and
completion of each gradient exchange, start and end of each chunk's injected expert backward) shows what ran
while an exchange was in flight.

Flat vs hierarchical (--hierarchical_alltoall): where the processes form more than one node, every case also
runs the two-level exchange (moe/hierarchical_all_to_all.py) for each chunk count, checked against the flat one
and timed in the same rounds; `hierarchical` holds its timings and total_ratio_vs_flat (< 1: two levels faster).
In this model it pays when per-message latency on the inter-node link dominates: it sends (N-1) inter-node
messages per exchange instead of (N-1)*L, L times larger, at the price of an intra-node hop for every row.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_system.parallel.ports import free_port

from .common import environment, write_json

SCENARIOS = ("real", "slow_link", "slow_experts", "both")
FULL = dict(tokens=2048, hidden=256, inter=64, experts=8, top_k=2, chunks=[2, 4, 8], link_gbps=0.1,
            latency_ms=0.05, expert_us_per_row=20.0, warmup=2, iters=7)
SMOKE = dict(tokens=256, hidden=64, inter=32, experts=8, top_k=2, chunks=[4], link_gbps=0.01,
             latency_ms=0.05, expert_us_per_row=20.0, warmup=1, iters=3)
# nodes for the link model and the hierarchical variant; 1 rank per node (the default) is N x 1
FULL.update(ranks_per_node=1, inter_node_slowdown=1.0)
SMOKE.update(ranks_per_node=1, inter_node_slowdown=1.0)
TOLERANCE = 1e-5  # relative to the largest entry: float rounding (expert weight grads are summed per chunk)


class SimulatedLink:
    """A FIFO link: a transfer of b bytes launched at t completes at max(t, previous completion) + cost(b)."""

    def __init__(self, gbps: float, latency_ms: float, ranks_per_node: int = 1, inter_node_slowdown: float = 1.0):
        self.bytes_per_s, self.latency = gbps * 1e9, latency_ms * 1e-3
        self.ranks_per_node, self.slowdown = ranks_per_node, inter_node_slowdown
        self.free_at = 0.0
        self.trace = None  # a list to append (time, event) to, when tracing

    def cost(self, nbytes: int) -> float:
        """One message of nbytes within a node."""
        return self.latency + nbytes / self.bytes_per_s

    def transfer_cost(self, input: torch.Tensor, split_sizes, group) -> float:
        """This rank's messages of one all_to_all_single: each to another rank, slowed across nodes."""
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        rows = split_sizes or [input.shape[0] // len(ranks)] * len(ranks)
        row_bytes = input[0].nbytes if input.shape[0] else 0
        me = dist.get_rank()
        total = 0.0
        for peer, count in zip(ranks, rows):
            if peer != me:
                across = peer // self.ranks_per_node != me // self.ranks_per_node
                total += self.cost(count * row_bytes) * (self.slowdown if across else 1.0)
        return total

    def install(self):
        """Replaces dist.all_to_all_single (moe/all_to_all.py calls it through the module); returns an undo."""
        real = dist.all_to_all_single
        link = self

        class DelayedWork:
            def __init__(self, work, done, tag):
                self.work, self.done, self.tag = work, done, tag

            def wait(self, *args, **kwargs):
                self.work.wait(*args, **kwargs)
                _sleep_until(self.done)
                link.event(f"done {self.tag}")
                return True

        def slow(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            work = real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
            if not input.is_floating_point():  # the count exchange: sizes only
                return work
            now = time.perf_counter()
            done = max(now, link.free_at) + link.transfer_cost(input, input_split_sizes, group)
            link.free_at = done
            tag = f"{input.shape[0]}->{output.shape[0]} rows"
            link.event(f"launch {tag}")
            if not async_op:
                _sleep_until(done)
                return work
            return DelayedWork(work, done, tag)

        dist.all_to_all_single = slow
        return lambda: setattr(dist, "all_to_all_single", real)

    def event(self, what: str) -> None:
        if self.trace is not None:
            self.trace.append((time.perf_counter(), what))


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


class _Busy(torch.autograd.Function):
    """Identity that sleeps (an expert kernel that keeps a device, not the host, busy)."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s, link):
        ctx.backward_s, ctx.link, ctx.rows = backward_s, link, x.shape[0]
        time.sleep(forward_s)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.link is not None:
            ctx.link.event(f"expert backward start ({ctx.rows} rows)")
        time.sleep(ctx.backward_s)
        if ctx.link is not None:
            ctx.link.event("expert backward end")
        return grad, None, None, None


def install_slow_experts(us_per_row: float, link):
    """Makes every expert call of the EP layer also sleep; returns an undo."""
    from moe_system.moe import expert_parallel
    real = expert_parallel.expert_ffn

    def slow(x, counts, *weights, **options):
        out = real(x, counts, *weights, **options)
        seconds = x.shape[0] * us_per_row * 1e-6
        return _Busy.apply(out, seconds, 2 * seconds, link)

    expert_parallel.expert_ffn = slow
    return lambda: setattr(expert_parallel, "expert_ffn", real)


def build_layer(cfg: dict, dispatch: str, rank: int, world: int):
    from moe_system.model import OpenMoeConfig
    from moe_system.moe import OpenMoeSparseMLP
    from moe_system.moe.expert_parallel import shard_experts

    config = OpenMoeConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["inter"], num_experts=cfg["experts"],
                           router_topk=cfg["top_k"], dispatch=dispatch, capacity_factor_train=1.25,
                           num_hidden_layers=1, num_attention_heads=1, head_dim=cfg["hidden"], vocab_size=8)
    torch.manual_seed(0)  # the same weights on every rank; each keeps its experts
    layer = OpenMoeSparseMLP(config)
    layer.reset_parameters()
    layer = shard_experts(layer, ep_group=dist.group.WORLD).train()
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(1, cfg["tokens"], cfg["hidden"], generator=g)
    grad_out = torch.randn(x.shape, generator=g)
    return layer, x, grad_out


def forward_backward(layer, x, grad_out):
    x = x.detach().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out = layer(x)[0]
    out.backward(grad_out)
    grads = [p.grad.clone() for p in (layer.experts.wi_gate, layer.experts.wi_up, layer.experts.wo)]
    return out.detach(), x.grad, grads


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if a.numel() else 0.0


def max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def timed(layer, x, grad_out, variants: dict, warmup: int, iters: int) -> dict:
    """variants {key: (chunks, node_groups)} -> {key: timings}. Round-robin: every round times each variant once,
    so that the load of a shared machine, which drifts over seconds, weighs on all of them alike."""
    samples = {key: [] for key in variants}
    for i in range(warmup + iters):
        for key, (chunks, node_groups) in variants.items():
            layer.dispatcher.overlap_chunks, layer.dispatcher.node_groups = chunks, node_groups
            xi = x.detach().requires_grad_()
            layer.zero_grad(set_to_none=True)
            dist.barrier()
            t0 = time.perf_counter()
            out = layer(xi)[0]
            t1 = time.perf_counter()
            out.backward(grad_out)
            t2 = time.perf_counter()
            if i >= warmup:
                samples[key].append(max_over_ranks([(t1 - t0) * 1e3, (t2 - t1) * 1e3]))
    layer.dispatcher.node_groups = None
    timings = {}
    for key, pairs in samples.items():
        total = [f + b for f, b in pairs]
        timings[key] = {"forward_ms": statistics.median(f for f, _ in pairs),
                           "backward_ms": statistics.median(b for _, b in pairs),
                           "total_ms": statistics.median(total), "total_ms_min": min(total),
                           "total_ms_max": max(total)}
    return timings


def run_scenario(cfg: dict, scenario: str, dispatch: str, rank: int, world: int, node_groups) -> dict:
    """One scenario: injects its costs, times every chunk count (flat and, with node_groups, hierarchical),
    removes the costs."""
    link, undo = None, []
    if scenario in ("slow_link", "both"):
        link = SimulatedLink(cfg["link_gbps"], cfg["latency_ms"], cfg["ranks_per_node"], cfg["inter_node_slowdown"])
        undo.append(link.install())
    if scenario in ("slow_experts", "both"):
        undo.append(install_slow_experts(cfg["expert_us_per_row"], link))
    try:
        return _run_scenario(cfg, scenario, dispatch, rank, world, link, node_groups)
    finally:
        for fn in undo:
            fn()


def _run_scenario(cfg: dict, scenario: str, dispatch: str, rank: int, world: int, link, node_groups) -> dict:
    layer, x, grad_out = build_layer(cfg, dispatch, rank, world)
    rows = cfg["tokens"] * cfg["top_k"]
    row_bytes = cfg["hidden"] * x.element_size()
    injected = {}
    if link is not None:
        # rank 0's flat exchange without chunks, for balanced routing (rows / world to every rank)
        injected["link_ms_per_exchange"] = link.transfer_cost(torch.empty(rows - rows % world, cfg["hidden"]), None,
                                                              None) * 1e3
        injected["link_ms_forward"] = injected["link_ms_backward"] = 2 * injected["link_ms_per_exchange"]
    if scenario in ("slow_experts", "both"):
        injected["experts_ms_forward"] = rows * cfg["expert_us_per_row"] * 1e-3
        injected["experts_ms_backward"] = 2 * injected["experts_ms_forward"]

    layer.dispatcher.overlap_chunks = 1
    ref_out, ref_grad_x, ref_grads = forward_backward(layer, x, grad_out)
    results, hierarchical = {}, {}
    for chunks in [1, *cfg["chunks"]]:
        for groups, into in ((None, results), (node_groups, hierarchical)) if node_groups else ((None, results),):
            layer.dispatcher.overlap_chunks, layer.dispatcher.node_groups = chunks, groups
            out, grad_x, grads = forward_backward(layer, x, grad_out)
            check = dict(zip(["out", "grad_input", "grad_experts"], max_over_ranks([
                max_rel_diff(out, ref_out), max_rel_diff(grad_x, ref_grad_x),
                max(max_rel_diff(g, r) for g, r in zip(grads, ref_grads))])))
            status = "mismatch" if max(check.values()) > TOLERANCE else "ok"
            into[str(chunks)] = {"chunks": chunks, "status": status,
                                 "check": {"max_rel_diff": check, "tolerance": TOLERANCE}}
    layer.dispatcher.node_groups = None
    variants = {("flat", int(c)): (int(c), None) for c, entry in results.items() if entry["status"] == "ok"}
    variants.update({("hierarchical", int(c)): (int(c), node_groups) for c, entry in hierarchical.items()
                     if entry["status"] == "ok"})
    for (kind, chunks), timing in timed(layer, x, grad_out, variants, cfg["warmup"], cfg["iters"]).items():
        (results if kind == "flat" else hierarchical)[str(chunks)].update(timing)
    for chunks, entry in hierarchical.items():
        if entry["status"] == "ok" and results[chunks]["status"] == "ok":
            entry["total_ratio_vs_flat"] = entry["total_ms"] / results[chunks]["total_ms"]
            entry["saved_ms_vs_flat"] = results[chunks]["total_ms"] - entry["total_ms"]
    plain = results["1"]
    for entry in results.values():
        if entry["status"] == "ok" and entry is not plain:
            for key in ("forward", "backward", "total"):
                entry[f"{key}_ratio"] = entry[f"{key}_ms"] / plain[f"{key}_ms"]
            entry["saved_ms"] = plain["total_ms"] - entry["total_ms"]
    case = {"scenario": scenario, "dispatch": dispatch, "injected": injected, "results": results}
    if node_groups is not None:
        case["hierarchical"] = {"nodes": node_groups.nodes, "ranks_per_node": node_groups.local,
                                "results": hierarchical}
    if scenario == "both" and link is not None and plain["status"] == "ok":
        layer.dispatcher.overlap_chunks = max(cfg["chunks"])
        xi = x.detach().requires_grad_()
        out = layer(xi)[0]
        dist.barrier()
        link.trace = [(time.perf_counter(), "backward start")]
        out.backward(grad_out)
        link.event("backward end")
        t0 = link.trace[0][0]
        case["backward_trace_rank0"] = {"chunks": layer.dispatcher.overlap_chunks,
                                        "events": [[round((t - t0) * 1e3, 2), what] for t, what in link.trace]}
        link.trace = None
    return case


def _worker(rank: int, world: int, port: int, cfg: dict, cases: list, threads: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from moe_system.moe.hierarchical_all_to_all import build_node_groups
        node_groups = build_node_groups([list(range(world))], cfg["ranks_per_node"], rank)  # None: one node
        results = [run_scenario(cfg, scenario, dispatch, rank, world, node_groups) for dispatch, scenario in cases]
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 scenarios, seconds")
    parser.add_argument("--out", help="write the JSON here (printed otherwise)")
    parser.add_argument("--nproc", type=int, default=2, help="processes = EP size (gloo)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS)
    parser.add_argument("--dispatch", nargs="+", choices=["dropless", "capacity"], help="default: dropless")
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", type=type(value) if not isinstance(value, list) else int,
                            nargs="+" if isinstance(value, list) else None)
    args = parser.parse_args(argv)
    cfg = {key: getattr(args, key) if getattr(args, key) is not None else value
           for key, value in (SMOKE if args.smoke else FULL).items()}
    scenarios = args.scenarios or (["real", "both"] if args.smoke else list(SCENARIOS))
    wanted = [(dispatch, scenario) for dispatch in args.dispatch or ["dropless"] for scenario in scenarios]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cases.pt")
        # Forked workers inherit the imports (colossalai's takes seconds); no thread pool is running yet.
        import moe_system.moe.expert_parallel  # noqa: F401
        mp.start_processes(_worker, args=(args.nproc, free_port(), cfg, wanted, args.threads, out),
                           nprocs=args.nproc, join=True, start_method="fork")
        cases = torch.load(out, weights_only=False)
    write_json(args.out, {
        "benchmark": "comm_overlap", "mode": "smoke" if args.smoke else "full",
        "environment": environment(torch.device("cpu")), "processes": args.nproc, "threads_per_process": args.threads,
        "backend": "gloo", "config": cfg, "dtype": "float32",
        "timing": {"warmup": cfg["warmup"], "iters": cfg["iters"], "statistic": "median", "clock": "perf_counter",
                   "work": "one EP MoE layer: forward (router included), then backward seeded from its output; "
                           "each iteration after a barrier, the slowest rank's time"},
        "measured": "forward_ms / backward_ms / total_ms per overlap_chunks (1 = without --comm_overlap); "
                    "*_ratio = with chunks / without (< 1: overlap faster); saved_ms = total without - with; "
                    "hierarchical (more than one node): the same per chunk count with --hierarchical_alltoall, "
                    "total_ratio_vs_flat = hierarchical / flat total (< 1: two levels faster)",
        "cases": cases,
    })
    bad = any(r["status"] != "ok" for case in cases
              for r in [*case["results"].values(), *case.get("hierarchical", {}).get("results", {}).values()])
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
