"""Per-GPU memory planner for OpenMoE training under the ep, ep_zero and hybrid layouts.

    python -m moe_system.parallel.memory_planner --model_name 8b --plugin ep_zero --world 8 --extra_dp_size 2 \
        --zero_stage 1 --precision bf16 --batch_size 1 --max_length 2048 [--checkpointing] \
        [--gpu_memory 80GiB --suggest]

An analytic estimate, component by component, of the rank that needs the most (the first pipeline stage
holds the most in-flight activations, the last one the LM head). Every formula is stated where it is used.

Layouts (parallel/layout.py): ep: EP over the whole world, dense DP over the world; ep_zero: EP size
world / extra_dp_size, each expert replicated extra_dp_size (= moe_dp) times; hybrid: pp * moe_dp * ep =
world. In every layout the dense DP group has moe_dp * ep ranks per pipeline stage.

Model states (bytes per parameter held by the rank; N = the group the state is sharded over: the dense DP
group for dense parameters, the expert-DP group of size moe_dp for expert parameters; ZeRO as in
Rajbhandari et al. 2020, "ZeRO", section 3: stage 1 shards optimizer states, stage 2 also gradients):
    precision   weights   gradients                 fp32 master          Adam m + v
    fp32        4         4                         0 (weights are)      8 / N if ZeRO >= 1
    bf16/fp16   2         2, or 2 / N with ZeRO 2   4 / N if ZeRO >= 1   8 / N if ZeRO >= 1
At the optimizer step the gradients are also converted to fp32 for the master weights (4 bytes per master
parameter this rank updates); that happens after the activations are freed, so it competes with them for
the peak instead of adding to it.

Activations (saved for backward, per token and per decoder layer, b = bytes of the activation dtype: 2 for
bf16/fp16, 4 for fp32; H hidden, A = heads * head_dim, I intermediate, k top-k, E experts). Counted op by
op from what autograd keeps in moe_system/model/modeling.py and moe_system/moe:
    RMSNorm                 4H + 2bH   fp32 copy of the input (variance), normalised input, output
    attention               3bA (q, k after RoPE, v: SDPA's inputs) + 2bA (SDPA output, its reshaped copy
                            for o_proj) + 4*heads (log-sum-exp) + 4bd when b != 4 (cos/sin cast per call)
    dense FFN (3-way)       6bI        2I gate output, silu half, its product, up output, final product
    MoE router              4H when b != 4 (fp32 input copy) + 8E (fp32 logits and probabilities)
    MoE experts             k * (bH + 6bI + bH)   permuted copies, the 3-way FFN per copy, combine's gather
    dense layer  = norm + attention + norm + FFN
    MoE layer    = norm + attention + norm + router + experts + norm + extra dense FFN
With activation checkpointing and full recompute (--recompute full) each layer keeps only its input (bH per
token); in backward one layer at a time is recomputed, so its full activations come back for that layer only.
With selective recompute (--recompute selective, docs/model.md) the attention block (its norm and attention)
keeps only its input, bH, and every SwiGLU 4bI instead of 6bI per row (gate and up outputs; silu and the
product are recomputed); in backward one attention block at a time comes back.
Backward working set: the gradient of the widest intermediate of a layer, 2I*b per copy (k*2I*b per token
for an MoE layer). Fused head + loss (model/loss.py): an fp32 [V, H] weight-gradient accumulator and the
gradients of the hidden states (bH per token); while a chunk of c tokens is processed (c from the loss's 2 GiB
budget), its c*V fp32 logits and one more c*V fp32 buffer beside them (8*c*V bytes).

All-to-all buffers (ep > 1): the dispatched rows in flight, sent and received: 2 * k * tokens * H * b
(times the capacity factor in capacity mode, where every expert gets its full slots).

Not modelled: the CUDA caching allocator's fragmentation and reserve, ZeRO's communication buckets,
NCCL's own buffers, the CUDA context (~0.5 GiB outside torch's count). Gradients are counted as held
throughout (they are allocated during backward when the optimizer sets them to None).
"""

import argparse
import re
import sys
from dataclasses import dataclass

from ..model.config import OpenMoeConfig
from ..model.loss import CHUNK_BYTES_PER_LOGIT, loss_chunk_tokens
from .layout import PLUGINS, LayoutError, validate_layout

GiB = 1024 ** 3
STATE_BYTES = {  # bytes per parameter: weights, gradients, fp32 master copy, Adam moments
    "fp32": dict(weight=4, grad=4, master=0, adam=8),
    "bf16": dict(weight=2, grad=2, master=4, adam=8),
    "fp16": dict(weight=2, grad=2, master=4, adam=8),
}


# ----------------------------------------------------------------------------------------------------------
# Parameters


def ffn_params(hidden: int, inter: int) -> int:
    return hidden * 2 * inter + hidden * inter + inter * hidden  # 2I-wide gate, up, down


def layer_params(cfg, layer_idx: int) -> tuple[int, int]:
    """(dense, expert) parameters of one decoder layer; expert counts all E experts."""
    hidden = cfg.hidden_size
    attention = 4 * hidden * cfg.num_attention_heads * cfg.head_dim
    if not cfg.is_moe_layer(layer_idx):
        return attention + ffn_params(hidden, cfg.intermediate_size) + 2 * hidden, 0
    # router [E, H], extra dense FFN, three norms
    dense = attention + cfg.num_experts * hidden + ffn_params(hidden, cfg.intermediate_size) + 3 * hidden
    return dense, cfg.num_experts * ffn_params(hidden, cfg.intermediate_size)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Colossal-AI's split (PipelineStageManager.distribute_layers): equal shares, the remainder to middle stages."""
    sizes = [num_layers // pp] * pp
    remainder = num_layers % pp
    start = pp // 2 - remainder // 2
    for i in range(start, start + remainder):
        sizes[i] += 1
    bounds = [sum(sizes[:i]) for i in range(pp + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(pp)]


def stage_params(cfg, layers: range, first: bool, last: bool) -> tuple[int, int]:
    """(dense, expert) parameters of a pipeline stage: its layers, the embedding on the first stage, the final
    norm and the head on the last."""
    dense = expert = 0
    for i in layers:
        d, e = layer_params(cfg, i)
        dense, expert = dense + d, expert + e
    if first:
        dense += cfg.vocab_size * cfg.hidden_size
    if last:
        dense += cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    return dense, expert


def rank_params(cfg, layers: range, first: bool, last: bool, ep: int) -> tuple[int, int]:
    """(dense, expert) parameters one rank holds: its stage's dense ones and num_experts / ep experts of each of
    the stage's MoE layers (what parallel/rank_model.py materialises)."""
    dense, expert_all = stage_params(cfg, layers, first, last)
    return dense, expert_all // cfg.num_experts * (cfg.num_experts // ep)


def model_state_bytes(dense: int, expert_local: int, dp: int, moe_dp: int, zero_stage: int, precision: str) -> dict:
    """Weights, gradients, master weights and Adam moments held by one rank (see the module note)."""
    s = STATE_BYTES[precision]
    dense_shard = dp if zero_stage >= 1 else 1
    expert_shard = moe_dp if zero_stage >= 1 else 1
    grad_dense = dp if zero_stage == 2 else 1
    grad_expert = moe_dp if zero_stage == 2 else 1
    return {
        "weights": s["weight"] * (dense + expert_local),
        "gradients": s["grad"] * (dense / grad_dense + expert_local / grad_expert),
        "master_weights": s["master"] * (dense / dense_shard + expert_local / expert_shard),
        "optimizer_states": s["adam"] * (dense / dense_shard + expert_local / expert_shard),
        # fp32 gradients for the master shard, made at the step (bf16/fp16 only; fp32 steps in place)
        "step_fp32_gradients": (4 if s["master"] else 0) * (dense / dense_shard + expert_local / expert_shard),
    }


# ----------------------------------------------------------------------------------------------------------
# Activations


def act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def norm_act(cfg, b: int) -> int:
    return 4 * cfg.hidden_size + 2 * b * cfg.hidden_size


def attention_act(cfg, b: int) -> int:
    inner = cfg.num_attention_heads * cfg.head_dim
    rope_casts = 4 * b * cfg.head_dim if b != 4 else 0
    return 5 * b * inner + 4 * cfg.num_attention_heads + rope_casts


def dense_ffn_act(cfg, b: int) -> int:
    return 6 * b * cfg.intermediate_size


def moe_act(cfg, b: int, rows_per_token: float) -> float:
    router = (4 * cfg.hidden_size if b != 4 else 0) + 8 * cfg.num_experts
    experts = rows_per_token * (2 * b * cfg.hidden_size + 6 * b * cfg.intermediate_size)
    return router + experts


def layer_act_per_token(cfg, layer_idx: int, b: int, rows_per_token: float, selective: bool = False) -> float:
    """Bytes saved for backward per token by one decoder layer (module note); selective: under selective
    recompute."""
    act = 2 * norm_act(cfg, b) + attention_act(cfg, b)
    swiglu_rows = 1
    if not cfg.is_moe_layer(layer_idx):
        act += dense_ffn_act(cfg, b)
    else:
        act += moe_act(cfg, b, rows_per_token) + norm_act(cfg, b) + dense_ffn_act(cfg, b)
        swiglu_rows += rows_per_token
    if selective:
        act -= attention_block_act(cfg, b) - b * cfg.hidden_size + swiglu_rows * 2 * cfg.intermediate_size * b
    return act


def attention_block_act(cfg, b: int) -> float:
    """What selective recompute brings back for one layer in backward: its attention block's activations."""
    return norm_act(cfg, b) + attention_act(cfg, b)


def backward_working_set_per_token(cfg, layer_idx: int, b: int, rows_per_token: float) -> float:
    copies = rows_per_token if cfg.is_moe_layer(layer_idx) else 1
    return copies * 2 * cfg.intermediate_size * b


def head_loss_bytes(cfg, tokens: int, b: int) -> dict:
    """Fused head + loss: what it keeps for backward, and its chunk buffer while it runs."""
    chunk = min(loss_chunk_tokens(cfg.vocab_size, cfg.loss_chunk_tokens), tokens)
    return {
        "saved": 4 * cfg.vocab_size * cfg.hidden_size + norm_act(cfg, b) * tokens + b * cfg.hidden_size * tokens,
        "chunk_buffer": CHUNK_BYTES_PER_LOGIT * chunk * cfg.vocab_size,
    }


# ----------------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Estimate:
    layout: object
    stage: int
    components: dict      # bytes, the rank's model states and peak activation parts
    peak_bytes: float
    params_dense: int
    params_expert_local: int

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB


def estimate(cfg: OpenMoeConfig, plugin: str, world: int, *, zero_stage: int = 0, precision: str = "bf16",
             batch_size: int = 1, max_length: int = 2048, checkpointing: bool = False, recompute: str = "full",
             extra_dp_size: int = 1,
             pp_size: int = 1, dp_size: int = 1, ep_size: int = 1, microbatch_size: int | None = None,
             num_microbatches: int | None = None) -> Estimate:
    """Peak memory of the most loaded rank. batch_size: sequences per data-parallel rank per step; with a
    pipeline, the step is split into micro-batches of microbatch_size (default: batch_size // pp_size).
    recompute: what checkpointing recomputes, "full" or "selective" (train.py --recompute)."""
    if plugin == "hybrid" and pp_size > 1 and microbatch_size is None:
        microbatch_size = max(1, batch_size // pp_size)
    layout = validate_layout(plugin, world, cfg.num_experts, cfg.num_hidden_layers, zero_stage=zero_stage,
                             precision=precision, extra_dp_size=extra_dp_size, pp_size=pp_size, dp_size=dp_size,
                             ep_size=ep_size, microbatch_size=microbatch_size, batch_size=batch_size)
    b = act_bytes(precision)
    micro = microbatch_size if layout.pp > 1 else batch_size
    tokens = micro * max_length
    in_flight_max = num_microbatches or (batch_size // micro)
    factor = cfg.capacity_factor_train if cfg.dispatch == "capacity" and layout.ep > 1 else 1.0
    rows = cfg.router_topk * factor    # expert rows per token on this rank (balanced routing)

    best = None
    for stage, layers in enumerate(stage_layers(cfg.num_hidden_layers, layout.pp)):
        first, last = stage == 0, stage == layout.pp - 1
        dense, expert_local = rank_params(cfg, layers, first, last, layout.ep)
        states = model_state_bytes(dense, expert_local, layout.dp_size, layout.moe_dp, zero_stage, precision)
        # 1F1B: stage s holds the activations of up to (pp - s) micro-batches before its first backward.
        in_flight = min(layout.pp - stage, in_flight_max) if layout.pp > 1 else 1
        per_layer = [layer_act_per_token(cfg, i, b, rows) for i in layers]
        working = max((backward_working_set_per_token(cfg, i, b, rows) for i in layers), default=0)
        if checkpointing and recompute == "selective":
            kept = sum(layer_act_per_token(cfg, i, b, rows, selective=True) for i in layers) * tokens * in_flight
            recomputed = attention_block_act(cfg, b) * tokens if layers else 0
        elif checkpointing:
            kept = len(layers) * b * cfg.hidden_size * tokens * in_flight
            recomputed = max(per_layer, default=0) * tokens
        else:
            kept = sum(per_layer) * tokens * in_flight
            recomputed = 0
        head = head_loss_bytes(cfg, tokens, b) if last else {"saved": 0, "chunk_buffer": 0}
        has_moe = any(cfg.is_moe_layer(i) for i in layers)
        a2a = 2 * rows * tokens * cfg.hidden_size * b if layout.ep > 1 and has_moe else 0
        # The peak is at the end of the forward (all saved, the loss's saved tensors and its chunk buffer) or
        # in the backward, after the loss's tensors are freed (saved + a recomputed layer + the working set);
        # the all-to-all buffers live during the forward. The fp32 gradient copies of the step come later.
        activation_peak = kept + max(head["saved"] + head["chunk_buffer"], recomputed + working * tokens, a2a)
        step_transient = states["step_fp32_gradients"]
        components = {
            "weights": states["weights"], "gradients": states["gradients"],
            "master_weights": states["master_weights"], "optimizer_states": states["optimizer_states"],
            "activations_saved": kept, "head_loss_saved": head["saved"],
            "head_loss_chunk_buffer": head["chunk_buffer"], "recomputed_layer": recomputed,
            "backward_working_set": working * tokens, "all_to_all_buffers": a2a,
            "step_fp32_gradients": step_transient,
        }
        static = states["weights"] + states["gradients"] + states["master_weights"] + states["optimizer_states"]
        peak = static + max(activation_peak, step_transient)
        if best is None or peak > best.peak_bytes:
            best = Estimate(layout, stage, components, peak, dense, expert_local)
    return best


# ----------------------------------------------------------------------------------------------------------
# Suggestions


def candidate_layouts(cfg, world: int, precision: str):
    """Every (plugin, sizes, zero stage) that parallel/layout.py accepts for this world and model."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    zero_stages = (0,) if precision == "fp32" else (0, 1, 2)
    for zero in zero_stages:
        yield dict(plugin="ep", zero_stage=zero)
        for extra in divisors:
            if extra > 1:
                yield dict(plugin="ep_zero", zero_stage=zero, extra_dp_size=extra)
        for pp in divisors:
            for ep in divisors:
                if pp > 1 and world % (pp * ep) == 0:
                    yield dict(plugin="hybrid", zero_stage=zero, pp_size=pp, ep_size=ep, dp_size=world // (pp * ep))


def max_batch(cfg, layout_args: dict, world: int, precision: str, max_length: int, checkpointing: bool,
              budget: float, limit: int = 1024) -> int:
    """Largest batch (sequences per data-parallel rank per step) whose estimate fits the budget; 0 if none."""
    best = 0
    for batch in range(1, limit + 1):
        try:
            est = estimate(cfg, world=world, precision=precision, batch_size=batch, max_length=max_length,
                           checkpointing=checkpointing, **pipeline_args(layout_args, batch))
        except LayoutError:
            continue
        if est.peak_bytes > budget:
            break
        best = batch
    return best


def pipeline_args(layout_args: dict, batch: int) -> dict:
    # With a pipeline, one micro-batch per stage (the fewest 1F1B accepts) of batch // pp sequences each.
    if layout_args.get("pp_size", 1) > 1:
        return {**layout_args, "microbatch_size": max(1, batch // layout_args["pp_size"])}
    return layout_args


def suggest(cfg, world: int, precision: str, max_length: int, budget: float) -> list[dict]:
    rows = []
    for layout_args in candidate_layouts(cfg, world, precision):
        for checkpointing in (False, True):
            try:
                validate_layout(layout_args["plugin"], world, cfg.num_experts, cfg.num_hidden_layers,
                                precision=precision, microbatch_size=1,
                                **{k: v for k, v in layout_args.items() if k != "plugin"})
            except LayoutError:
                continue
            batch = max_batch(cfg, layout_args, world, precision, max_length, checkpointing, budget)
            if batch:
                est = estimate(cfg, world=world, precision=precision, batch_size=batch, max_length=max_length,
                               checkpointing=checkpointing, **pipeline_args(layout_args, batch))
                rows.append({**layout_args, "checkpointing": checkpointing, "max_batch_size": batch,
                             "global_batch": batch * est.layout.dp_size, "peak_gib": est.peak_gib})
    # First what costs no throughput (no recomputation, no pipeline bubble), then the most sequences per step.
    return sorted(rows, key=lambda r: (r["checkpointing"], r.get("pp_size", 1) > 1, -r["global_batch"],
                                       r["peak_gib"]))


# ----------------------------------------------------------------------------------------------------------
# CLI


def parse_memory(text: str) -> float:
    """'80GiB', '80GB' (10^9), '81920MiB' or a bare number of GiB -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|MiB|MB|TiB|TB)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"cannot read a memory size from {text!r}; write e.g. 80GiB")
    units = {None: GiB, "GiB": GiB, "GB": 1e9, "MiB": 1024 ** 2, "MB": 1e6, "TiB": 1024 ** 4, "TB": 1e12}
    return float(match.group(1)) * units[match.group(2)]


def format_table(est: Estimate, cfg, args) -> str:
    lay = est.layout
    lines = [f"{args.model_name}: {lay.describe()}, batch {args.batch_size} x {args.max_length} tokens"
             f"{f', checkpointing ({args.recompute} recompute)' if args.checkpointing else ''}",
             f"most loaded rank: pipeline stage {est.stage} ({est.params_dense / 1e6:.1f}M dense parameters, "
             f"{est.params_expert_local / 1e6:.1f}M expert parameters, {cfg.num_experts // lay.ep} experts per layer)",
             f"{'component':<26}{'GiB':>10}"]
    lines += [f"{name:<26}{value / GiB:>10.2f}" for name, value in est.components.items()]
    lines.append(f"{'peak (estimate)':<26}{est.peak_gib:>10.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Estimate per-GPU training memory of OpenMoE")
    parser.add_argument("--model_name", default="base", choices=["tiny", "base", "8b", "34b"])
    parser.add_argument("--plugin", default="ep", choices=PLUGINS)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--extra_dp_size", type=int, default=1)
    parser.add_argument("--pp_size", type=int, default=1)
    parser.add_argument("--dp_size", type=int, default=1)
    parser.add_argument("--ep_size", type=int, default=1)
    parser.add_argument("--microbatch_size", type=int)
    parser.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2])
    parser.add_argument("--precision", default="bf16", choices=sorted(STATE_BYTES))
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per data-parallel rank per step")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--checkpointing", action="store_true", help="train.py --gradient_checkpointing")
    parser.add_argument("--recompute", default="full", choices=["full", "selective"],
                        help="with --checkpointing: what is recomputed (train.py --recompute)")
    parser.add_argument("--dispatch", choices=["dropless", "capacity"], help="default: the preset's")
    parser.add_argument("--gpu_memory", type=parse_memory, help="e.g. 80GiB; with --suggest, the budget")
    parser.add_argument("--suggest", action="store_true", help="list the layouts that fit --gpu_memory")
    args = parser.parse_args(argv)

    cfg = OpenMoeConfig.from_preset(args.model_name, **({"dispatch": args.dispatch} if args.dispatch else {}))
    try:
        est = estimate(cfg, args.plugin, args.world, zero_stage=args.zero_stage, precision=args.precision,
                       batch_size=args.batch_size, max_length=args.max_length, checkpointing=args.checkpointing,
                       recompute=args.recompute, extra_dp_size=args.extra_dp_size, pp_size=args.pp_size, dp_size=args.dp_size,
                       ep_size=args.ep_size, microbatch_size=args.microbatch_size)
        print(format_table(est, cfg, args))
        if args.gpu_memory:
            verdict = "fits" if est.peak_bytes <= args.gpu_memory else "does NOT fit"
            print(f"{verdict} in {args.gpu_memory / GiB:.1f} GiB")
    except LayoutError as exc:
        print(f"layout refused: {exc}", file=sys.stderr)
        if not args.suggest:
            return 2
    if args.suggest:
        if not args.gpu_memory:
            parser.error("--suggest needs --gpu_memory")
        rows = suggest(cfg, args.world, args.precision, args.max_length, args.gpu_memory)
        print(f"\nlayouts of {args.world} GPUs that fit {args.gpu_memory / GiB:.1f} GiB at sequence {args.max_length}"
              f" ({args.precision}); without recomputation or pipeline first, then most sequences per step"
              f" ({len(rows)} in all, {min(20, len(rows))} shown):")
        if not rows:
            print("  none: more GPUs, a shorter sequence or fewer bytes per parameter are needed")
        for r in rows[:20]:
            sizes = {"ep": "", "ep_zero": f" --extra_dp_size {r.get('extra_dp_size')}",
                     "hybrid": f" --pp_size {r.get('pp_size')} --dp_size {r.get('dp_size')}"
                               f" --ep_size {r.get('ep_size')}"}
            print(f"  --plugin {r['plugin']}{sizes[r['plugin']]} --zero_stage {r['zero_stage']}"
                  f"{' --checkpointing' if r['checkpointing'] else ''}: batch_size <= {r['max_batch_size']}"
                  f" per rank ({r['global_batch']} sequences per step, {r['peak_gib']:.1f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
