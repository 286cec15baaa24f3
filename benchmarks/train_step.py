"""One whole training step (forward, backward, optimizer) on one device.

    python -m benchmarks.train_step --smoke --out smoke.json        # tiny models on CPU, seconds
    python -m benchmarks.train_step --out train_step.json           # OpenMoE-base at sequence 2048, CUDA
    python -m benchmarks.train_step --variants ours hf_grouped_mm --batch_sizes 8 16

Variants (each tried at increasing batch sizes until one runs out of memory or --time_limit_s is reached; the best
tokens/s is reported):
* ours            OpenMoeForCausalLM, bf16 weights, fp32 master weights updated by fused AdamW and copied back
                  (the recipe of the repository's bf16 training through Colossal-AI's mixed-precision optimizer)
* ours_torch_loss like `ours` at the batch size where `ours` did best, with the torch path of the loss
                  (MOE_LOSS_KERNEL=torch) in place of the Triton cross-entropy kernel: its
                  tokens_per_s_ratio_ours_over_this is what the kernel buys
* ours_autocast   the same model with fp32 weights under bf16 autocast and fused AdamW: the peers' recipe
* ours_all_moe    like `ours`, with every layer an MoE layer (moe_layer_interval=1), so the MoE work shows
* ours_compiled   `ours` with its dense blocks compiled (train.py --compile, moe_system/parallel/compile.py), at
                  the batch size where `ours` did best, side by side: compile_speedup = its tokens/s over ours'.
                  Compiled after the checks; the warmup steps (one compile per batch size) are not timed.
                  On the CPU with aot_eager (the graphs without inductor's code generation): smoke only
* hf_<impl>       transformers' Qwen2-MoE classes shaped like OpenMoE-base (12 layers, hidden 768, 12x64
                  heads, 16 experts top-2 every 4th layer, the shared expert standing in for OpenMoE's extra
                  dense FFN, vocab 256,384, untied head), bf16 autocast, fused AdamW, experts_implementation
                  <impl>. Its FFN widths are 4I/3 = 2752 so that its SwiGLU FFNs have our 3-way FFNs' FLOPs.
* hf_liger_flce   hf_grouped_mm with liger-kernel's fused linear cross-entropy in place of head + loss
                  (only where liger-kernel imports)

FLOPs per token (moe_system/training/flops.py, PaLM appendix B, recompute excluded):
    6 * N_active + 12 * L * (heads * head_dim) * T
N_active: the matmul weights a token passes through (attention, dense FFNs, router, k of E experts, the LM
head; embeddings excluded). For the peers the same formula with N_active counted from their modules.
MFU = tokens/s * FLOPs per token / 989e12 (H100 SXM dense bf16 peak), on CUDA only.

Checks before timing: our fused chunked head + loss equals a plain cross-entropy + z-loss over materialised
logits for the same hidden states; liger's loss equals transformers' for the same weights and batch; every
initial loss is finite and near ln(vocab) (random init); FLOPs from flops.py equal the count from our modules.
A failed check records the variant as "mismatch" (never timed) and the script exits with status 1 after
writing the JSON; a variant that errors or runs out of memory is recorded as such and the others still run.
"""

import argparse
import gc
import math
import os
import time

import torch

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
from moe_system.parallel.compile import compile_dense_blocks
from moe_system.training.flops import param_counts, train_flops_per_token

from .common import GiB, H100_BF16_DENSE_TFLOPS, LiveTensorBytes, Mismatch, add_time_limit_argument, deadline, \
    environment, exit_code, guarded, pick_device, synchronize, time_ms, write_json

FULL = dict(preset="base", seq=2048, warmup=2, iters=5, batch_sizes={
    "ours": [4, 8, 16, 32], "ours_torch_loss": [4, 8, 16, 32], "ours_compiled": [4, 8, 16, 32],
    "ours_autocast": [4, 8], "ours_all_moe": [4, 8, 16],
    "hf_grouped_mm": [2, 4, 6, 8], "hf_eager": [2, 4], "hf_liger_flce": [8, 16, 24, 32, 48]})
SMOKE = dict(preset="tiny", seq=64, warmup=1, iters=2, batch_sizes={})
SMOKE_BATCH = 2
DEFAULT_VARIANTS = ["ours", "ours_torch_loss", "ours_compiled", "ours_autocast", "ours_all_moe", "hf_grouped_mm",
                    "hf_liger_flce"]
FLOP_FORMULA = "flops_per_token = 6 * N_active + 12 * num_layers * (heads * head_dim) * seq_len; " \
               "MFU = tokens_per_s * flops_per_token / 989e12"


# ----------------------------------------------------------------------------------------------------------
# Optimizers


def adamw(params, lr=1e-4):
    """Fused AdamW where this device supports it, else the foreach one."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, foreach=True)


class MasterWeightAdamW:
    """bf16 working weights; fp32 master copies that fused AdamW updates, then copied back into the weights."""

    def __init__(self, model, lr=1e-4):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in self.params]
        self.optimizer = adamw(self.masters, lr)

    def step(self):
        for param, master in zip(self.params, self.masters):
            master.grad = param.grad.float()
            param.grad = None
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.masters)

    def zero_grad(self, set_to_none=True):
        for master in self.masters:
            master.grad = None
        for param in self.params:
            param.grad = None

    def state_tensors(self):
        return self.masters + [t for s in self.optimizer.state.values() for t in s.values()
                               if isinstance(t, torch.Tensor)]


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    if isinstance(optimizer, MasterWeightAdamW):
        return optimizer.state_tensors()
    return [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


# ----------------------------------------------------------------------------------------------------------
# Models


def ours_config(preset, all_moe=False) -> OpenMoeConfig:
    # Dropless routing: the single-device grouped_mm path; capacity mode computes the same rows on one device.
    overrides = dict(dispatch="dropless")
    if all_moe:
        overrides["moe_layer_interval"] = 1
    return OpenMoeConfig.from_preset(preset, **overrides)


def hf_config(cfg: OpenMoeConfig, experts_implementation: str):
    from transformers import Qwen2MoeConfig
    width = max(64, round(4 * cfg.intermediate_size / 3 / 64) * 64)
    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim, intermediate_size=width, moe_intermediate_size=width,
        shared_expert_intermediate_size=width, num_experts=cfg.num_experts, num_experts_per_tok=cfg.router_topk,
        decoder_sparse_step=cfg.moe_layer_interval, norm_topk_prob=False, qkv_bias=False,
        tie_word_embeddings=False, max_position_embeddings=max(cfg.max_position_embeddings, 4096),
        output_router_logits=True, attn_implementation="sdpa", experts_implementation=experts_implementation)


def active_matmul_params(model, top_k: int) -> int:
    """Matmul weights one token passes through, counted from the modules: 2-D weights except the embedding,
    and k/E of every stacked [E, ...] expert tensor."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or p.dim() < 2:
            continue
        total += p.numel() * top_k // p.shape[0] if p.dim() == 3 else p.numel()
    return total


class LigerHead(torch.nn.Module):
    """transformers' Qwen2-MoE body, then liger's fused linear cross-entropy over the untied head weight."""

    def __init__(self, model):
        super().__init__()
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        self.model = model
        self.loss = LigerFusedLinearCrossEntropyLoss()

    def forward(self, input_ids, labels):
        from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func
        inner = self.model.model(input_ids=input_ids, output_router_logits=True)
        hidden = inner.last_hidden_state[:, :-1].reshape(-1, inner.last_hidden_state.shape[-1])
        loss = self.loss(self.model.lm_head.weight, hidden, labels[:, 1:].reshape(-1))
        cfg = self.model.config
        aux = load_balancing_loss_func(inner.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
        return loss + cfg.router_aux_loss_coef * aux


def build(variant, preset, device):
    """(model, optimizer, autocast?, forward(ids) -> loss, config record)."""
    cfg = ours_config(preset, all_moe=variant == "ours_all_moe")
    with torch.device(device):
        if variant.startswith("ours"):
            # read by model/loss.py at every call: "" is the default (the kernel on CUDA)
            os.environ["MOE_LOSS_KERNEL"] = "torch" if variant == "ours_torch_loss" else ""
            model = OpenMoeForCausalLM(cfg).train()
            autocast = variant == "ours_autocast"
            if autocast:
                optimizer = adamw(model.parameters())
            else:
                model = model.to(torch.bfloat16)
                optimizer = MasterWeightAdamW(model)
            record = {"model": "OpenMoeForCausalLM", "config": cfg.to_diff_dict(), "param_counts": param_counts(cfg)}
            return model, optimizer, autocast, lambda ids: model(input_ids=ids, labels=ids).loss, cfg, record
        from transformers import Qwen2MoeForCausalLM
        impl = "grouped_mm" if variant == "hf_liger_flce" else variant.removeprefix("hf_")
        hf_cfg = hf_config(cfg, impl)
        model = Qwen2MoeForCausalLM(hf_cfg).train()
    optimizer = adamw(model.parameters())
    record = {"model": "Qwen2MoeForCausalLM", "experts_implementation": impl,
              "config": {k: v for k, v in hf_cfg.to_diff_dict().items() if not k.startswith("_")}}
    if variant == "hf_liger_flce":
        head = LigerHead(model)
        return model, optimizer, True, lambda ids: head(ids, ids), hf_cfg, record
    return model, optimizer, True, lambda ids: model(input_ids=ids, labels=ids).loss, hf_cfg, record


def flops_per_token(variant, model, cfg, seq) -> dict:
    top_k = getattr(cfg, "router_topk", None) or cfg.num_experts_per_tok
    layers, attn_width = cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim
    counted = active_matmul_params(model, top_k)
    result = {"n_active_counted_from_modules": counted,
              "flops_per_token": 6.0 * counted + 12.0 * layers * attn_width * seq}
    if variant.startswith("ours"):
        result["flops_per_token_flops_py"] = train_flops_per_token(cfg, seq)
        if counted != param_counts(cfg)["active_matmul"]:
            raise Mismatch("flops.py's active parameter count differs from the modules'",
                           {"flops_py": param_counts(cfg)["active_matmul"], "modules": counted})
    return result


# ----------------------------------------------------------------------------------------------------------
# Checks


def check_fused_loss(model, cfg, ids) -> dict:
    """Our fused chunked head + loss against cross-entropy + z-loss over materialised logits, one sequence."""
    with torch.no_grad():
        fused = model(input_ids=ids[:1], labels=ids[:1]).lm_loss.float()
        hidden = model.model(input_ids=ids[:1]).last_hidden_state[0, :-1]
        logits = (hidden @ model.lm_head.weight.t()).float()
        targets = ids[0, 1:]
        lse = torch.logsumexp(logits, dim=-1)
        plain = (lse - logits.gather(-1, targets[:, None]).squeeze(-1)).mean() + cfg.z_loss_factor * lse.square().mean()
    diff = abs(float(fused) - float(plain))
    tolerance = 1e-4 * abs(float(plain)) + 1e-5
    check = {"fused_loss": float(fused), "plain_loss": float(plain), "abs_diff": diff, "tolerance": tolerance}
    if diff > tolerance:
        raise Mismatch("our fused head + loss differs from plain cross-entropy + z-loss", check)
    return check


def check_liger_loss(model, ids) -> dict:
    """liger's fused linear cross-entropy against transformers' own loss, same weights and batch."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16):
        reference = model(input_ids=ids[:1], labels=ids[:1], output_router_logits=False).loss.float()
        hidden = model.model(input_ids=ids[:1]).last_hidden_state[0, :-1]
        liger = LigerFusedLinearCrossEntropyLoss()(model.lm_head.weight, hidden, ids[0, 1:]).float()
    diff = abs(float(liger) - float(reference))
    tolerance = 2e-2 * abs(float(reference))  # bf16 logits on one side, liger's own accumulation on the other
    check = {"liger_loss": float(liger), "transformers_loss": float(reference), "abs_diff": diff,
             "tolerance": tolerance}
    if diff > tolerance:
        raise Mismatch("liger's loss differs from transformers' loss", check)
    return check


def liger_unavailable(device) -> str | None:
    if device.type != "cuda":
        return "liger-kernel's fused linear cross-entropy is a Triton kernel: CUDA only"
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception as exc:
        return f"liger-kernel does not import: {type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Running


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_variant(variant, preset, seq, batch_sizes, device, warmup, iters, stop_at=math.inf) -> dict:
    model, optimizer, autocast, forward, cfg, record = build(variant, preset, device)
    result = {**record, "seq_len": seq, "precision": "bf16 autocast, fp32 weights, fused AdamW" if autocast
              else "bf16 weights, fp32 master weights, fused AdamW", "runs": []}
    result.update(flops_per_token(variant, model, cfg, seq))
    vocab = cfg.vocab_size
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, vocab, (1, seq), generator=generator).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        with torch.no_grad():
            initial = float(forward(probe))
    result["check"] = {"initial_loss": initial, "ln_vocab": math.log(vocab)}
    if not (math.isfinite(initial) and abs(initial - math.log(vocab)) < 0.5 * math.log(vocab)):
        raise Mismatch(f"{variant}: initial loss is not near ln(vocab)", result["check"])
    if variant.startswith("ours"):
        result["check"]["fused_head_loss"] = check_fused_loss(model, cfg, probe)
    if variant == "hf_liger_flce":
        result["check"]["liger_vs_transformers_loss"] = check_liger_loss(model, probe)
    if variant == "ours_compiled":  # after the eager checks: the probe's no-grad forward compiles nothing then
        # On the CPU (the smoke run) aot_eager: the same graphs in seconds, where inductor's C++ takes minutes.
        result["compile_backend"] = "inductor" if device.type == "cuda" else "aot_eager"
        compile_dense_blocks(model, backend=result["compile_backend"])

    for batch in batch_sizes:
        if result["runs"] and time.monotonic() > stop_at:
            result["stopped_by_time_limit_before_batch_size"] = batch
            break
        ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        run = {"batch_size": batch, "tokens_per_step": batch * seq}
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timing = time_ms(step, device, warmup, iters)
            if device.type == "cuda":
                run["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            elif variant == "ours_compiled":  # the tracker is a dispatch mode, which compiled code cannot run under
                run["peak_bytes"] = None
            else:  # weights and optimizer state exist before the step; the tracker sees the rest
                static = tensor_bytes(model.parameters()) + tensor_bytes(optimizer_tensors(optimizer))
                with LiveTensorBytes() as tracker:
                    step()
                run["peak_bytes"] = static + tracker.peak
        except torch.OutOfMemoryError as exc:
            run.update(status="oom", error=str(exc).splitlines()[0])
            result["runs"].append(run)
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            break
        tokens_per_s = batch * seq / (timing["ms"] * 1e-3)
        run.update(status="ok", **timing, tokens_per_s=tokens_per_s, peak_gib=run["peak_bytes"] / GiB if run["peak_bytes"] is not None else None,
                   achieved_tflops=tokens_per_s * result["flops_per_token"] / 1e12,
                   mfu=tokens_per_s * result["flops_per_token"] / (H100_BF16_DENSE_TFLOPS * 1e12)
                   if device.type == "cuda" else None)
        result["runs"].append(run)
    ok = [run for run in result["runs"] if run["status"] == "ok"]
    result["best"] = max(ok, key=lambda run: run["tokens_per_s"]) if ok else None
    synchronize(device)
    return result  # the model and optimizer go with this frame; guarded() then empties the CUDA cache


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks that the script runs")
    parser.add_argument("--out", help="write the JSON here (printed otherwise)")
    parser.add_argument("--variants", nargs="+", help=f"default: {DEFAULT_VARIANTS}; also hf_eager, hf_batched_mm")
    parser.add_argument("--batch_sizes", nargs="+", type=int, help="sequences per step, for every variant")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--iters", type=int)
    add_time_limit_argument(parser)
    args = parser.parse_args(argv)

    device = pick_device(args.smoke)
    mode = SMOKE if args.smoke else FULL
    seq = args.seq or mode["seq"]
    warmup = args.warmup if args.warmup is not None else mode["warmup"]
    iters = args.iters if args.iters is not None else mode["iters"]
    stop_at = deadline(args.time_limit_s)
    results = {}
    for variant in args.variants or DEFAULT_VARIANTS:
        reason = liger_unavailable(device) if variant == "hf_liger_flce" else None
        if time.monotonic() > stop_at:
            reason = f"--time_limit_s {args.time_limit_s:g} reached before this variant"
        if reason:
            results[variant] = {"status": "skipped", "reason": reason}
            continue
        batch_sizes = args.batch_sizes or ([SMOKE_BATCH] if args.smoke else mode["batch_sizes"].get(variant, [4]))
        best_ours = (results.get("ours") or {}).get("best")
        if variant in ("ours_torch_loss", "ours_compiled") and best_ours:  # side by side (one compile, not one per size)
            batch_sizes = [best_ours["batch_size"]]
        results[variant] = guarded(lambda: {"status": "ok", **run_variant(variant, mode["preset"], seq, batch_sizes,
                                                                           device, warmup, iters, stop_at)}, device)
    best_ours = (results.get("ours") or {}).get("best")
    for name, result in results.items():
        best = result.get("best")
        if best_ours and best and name != "ours":
            result["tokens_per_s_ratio_ours_over_this"] = best_ours["tokens_per_s"] / best["tokens_per_s"]
        if best_ours and best and name == "ours_compiled":
            result["compile_speedup"] = best["tokens_per_s"] / best_ours["tokens_per_s"]
    write_json(args.out, {
        "benchmark": "train_step", "mode": "smoke" if args.smoke else "full", "environment": environment(device),
        "flop_formula": FLOP_FORMULA, "mfu_peak_tflops": H100_BF16_DENSE_TFLOPS,
        "timing": {"warmup": warmup, "iters": iters, "statistic": "median",
                   "clock": "CUDA events" if device.type == "cuda" else "perf_counter",
                   "work": "forward + backward + optimizer step + zero_grad, random tokens"},
        "peak_memory": "torch.cuda.max_memory_allocated over the timed steps (weights and optimizer included)"
                       if device.type == "cuda" else
                       "weights + optimizer state + live tensor storages during one step (benchmarks/common.py)",
        "variants": results,
    })
    return exit_code([results])


if __name__ == "__main__":
    raise SystemExit(main())
