"""The fast paths on a CUDA device: grouped-GEMM experts (torch's and our Triton kernel), the fused LM head + loss
and its Triton cross-entropy kernel, cached generation, the SDPA backend of training, the compiled dense blocks,
host synchronisations per training step, and bf16 checkpoints.

    pytest -q -m gpu tests -rA                                   # on a CUDA machine (sm90+ for grouped GEMM)
    MOE_GPU_TESTS_DEVICE=cpu pytest -q tests/test_gpu.py -rA     # the same logic on the CPU, as a dry run
    (add TRITON_INTERPRET=1 to the dry run to run the Triton kernels too, under Triton's interpreter)

Without CUDA (and without the switch) every test here is skipped. With the switch, the parts that only mean
something on CUDA (flash-only SDPA, the sync-debug count) are skipped one by one with the reason; the rest runs
the same code at the same shapes. Each test prints its key figures (relative errors, counts): -rA shows them.
"""

import json
import math
import os
import subprocess
import sys
import warnings
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moe_system.moe.experts as experts_module
from moe_system.inference.loading import load_model
from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
from moe_system.model.loss import chunked_lm_loss
from moe_system.model.modeling import OpenMoeAttention, OpenMoeRotaryEmbedding, build_attention_mask
from moe_system.moe import OpenMoeSparseMLP, expert_ffn
from moe_system.moe.experts import grouped_mm_supported
from moe_system.training.forward_backward import forward_backward

ROOT = Path(__file__).resolve().parents[1]
DEVICE_SWITCH = "MOE_GPU_TESTS_DEVICE"
CPU_DRY_RUN = os.environ.get(DEVICE_SWITCH, "") == "cpu"
ON_CUDA = torch.cuda.is_available() and not CPU_DRY_RUN

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not ON_CUDA and not CPU_DRY_RUN,
                                 reason=f"needs CUDA ({DEVICE_SWITCH}=cpu runs the same checks on the CPU)")]

# bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 ~ 2e-3 of a value, and the handful on the way
# (matmul outputs, the SwiGLU product, casts of gradients) give a relative L2 error of a few 1e-3; a wrong
# expert, row order or missing term is off by O(1) in the rows it touches, >= 5e-2 even for one row in 400.
BF16_TOL = 2e-2
FP32_TOL = 1e-4  # fp32 matmuls with another summation order (no TF32: see the fixture below)


@pytest.fixture(scope="module")
def device():
    return torch.device("cuda") if ON_CUDA else torch.device("cpu")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    # TF32 would make "fp32" matmuls on CUDA 10-bit-mantissa ones; the fp32 references must be real fp32.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (L2 over all entries): one scale-free figure per tensor."""
    actual, expected = actual.detach().float(), expected.detach().float().to(actual.device)
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def report(test: str, **figures) -> None:
    print(f"[gpu figures] {test}: " + ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


# --- 1. grouped-GEMM experts ------------------------------------------------------------------------------------

def grouped_mm_calls(monkeypatch) -> list:
    """Record every torch._grouped_mm call the experts make (their dtypes), so a silent fall-back to the
    per-expert loop shows."""
    calls = []
    real = experts_module._grouped

    def spy(x, weight, offsets):
        calls.append(x.dtype)
        return real(x, weight, offsets)

    monkeypatch.setattr(experts_module, "_grouped", spy)
    return calls


def require_grouped_mm(device) -> None:
    x = torch.empty(1, 128, dtype=torch.bfloat16, device=device)
    if not grouped_mm_supported(x, x):
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
            pytest.skip("torch._grouped_mm needs sm90 or newer")
        pytest.fail(f"torch._grouped_mm is not usable for bf16 on {device} with torch {torch.__version__}: "
                    "the experts would fall back to the per-expert loop")


def test_grouped_experts_bf16_match_fp32_loop(device, monkeypatch):
    """expert_ffn in bf16 (auto: grouped GEMM) vs the per-expert loop in fp32 on the same bf16 values, with
    uneven groups and experts that get no rows."""
    require_grouped_mm(device)
    torch.manual_seed(0)
    counts = torch.tensor([37, 0, 130, 5, 0, 64, 1, 19], device=device)
    hidden, inter = 128, 256
    x = torch.randn(int(counts.sum()), hidden, device=device).bfloat16()
    weights = [(torch.randn(8, hidden, 2 * inter, device=device) * hidden ** -0.5).bfloat16(),
               (torch.randn(8, hidden, inter, device=device) * hidden ** -0.5).bfloat16(),
               (torch.randn(8, inter, hidden, device=device) * inter ** -0.5).bfloat16()]
    grad_out = torch.randn(x.shape, device=device)

    calls = grouped_mm_calls(monkeypatch)
    results = {}
    for name, dtype, impl in (("grouped_bf16", torch.bfloat16, "auto"), ("loop_fp32", torch.float32, "loop")):
        xi = x.detach().to(dtype).requires_grad_()
        ws = [w.detach().to(dtype).requires_grad_() for w in weights]
        y = expert_ffn(xi, counts, *ws, impl=impl)
        y.backward(grad_out.to(dtype))
        results[name] = [y, xi.grad, *(w.grad for w in ws)]
    assert calls and set(calls) == {torch.bfloat16}, "bf16 experts did not run on torch._grouped_mm"

    names = ["out", "grad_x", "grad_wi_gate", "grad_wi_up", "grad_wo"]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, results["grouped_bf16"], results["loop_fp32"])}
    report("grouped experts bf16 vs fp32 loop", **errors)
    assert results["grouped_bf16"][0].dtype == torch.bfloat16
    for n, err in errors.items():
        assert err < BF16_TOL, f"{n}: relative error {err:.3g} (bf16 tolerance {BF16_TOL})"


def test_autocast_experts_run_gate_and_up_as_one_grouped_gemm(device, monkeypatch):
    """Under bf16 autocast with fp32 weights, gate and up are cast side by side into one [E, H, 3I] grouped GEMM;
    its output and the fp32 gradients match the fp32 per-expert loop."""
    require_grouped_mm(device)
    torch.manual_seed(0)
    counts = torch.tensor([37, 0, 130, 5, 0, 64, 1, 19], device=device)
    hidden, inter = 128, 256
    x = torch.randn(int(counts.sum()), hidden, device=device).bfloat16().float()
    weights = [(torch.randn(8, hidden, 2 * inter, device=device) * hidden ** -0.5).bfloat16().float(),
               (torch.randn(8, hidden, inter, device=device) * hidden ** -0.5).bfloat16().float(),
               (torch.randn(8, inter, hidden, device=device) * inter ** -0.5).bfloat16().float()]
    grad_out = torch.randn(x.shape, device=device)
    widths = []
    real = experts_module._grouped
    monkeypatch.setattr(experts_module, "_grouped",
                        lambda a, w, o: widths.append((a.dtype, w.shape[-1])) or real(a, w, o))
    results = {}
    for name, autocast in (("fused_bf16", True), ("loop_fp32", False)):
        xi = x.detach().clone().requires_grad_()
        ws = [w.detach().clone().requires_grad_() for w in weights]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = expert_ffn(xi, counts, *ws, impl="auto" if autocast else "loop")
        y.float().backward(grad_out)
        results[name] = [y, xi.grad, *(w.grad for w in ws)]
    assert widths == [(torch.bfloat16, 3 * inter), (torch.bfloat16, hidden)], widths
    names = ["out", "grad_x", "grad_wi_gate", "grad_wi_up", "grad_wo"]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, results["fused_bf16"], results["loop_fp32"])}
    report("autocast fused gate+up grouped GEMM vs fp32 loop", **errors)
    assert all(g.dtype == torch.float32 for g in results["fused_bf16"][2:])
    for n, err in errors.items():
        assert err < BF16_TOL, f"{n}: relative error {err:.3g} (bf16 tolerance {BF16_TOL})"


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_sparse_moe_layer_bf16_grouped_matches_fp32_loop(device, monkeypatch, dispatch):
    """The whole MoE layer (route, permute, experts, combine) in bf16 on grouped GEMM vs an fp32 copy on the
    per-expert loop: same routing (the router runs in fp32 on the same values), close outputs and gradients."""
    require_grouped_mm(device)
    cfg = OpenMoeConfig.from_preset("tiny", dispatch=dispatch, capacity_factor_train=0.5)
    torch.manual_seed(0)
    with torch.device(device):
        fast = OpenMoeSparseMLP(cfg)
        fast.reset_parameters()
        reference = OpenMoeSparseMLP(cfg)
    fast = fast.to(torch.bfloat16).train()
    reference.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    reference.experts.impl = "loop"
    reference.train()
    x = torch.randn(2, 96, cfg.hidden_size, device=device).bfloat16()
    grad_out = torch.randn(x.shape, device=device)

    calls = grouped_mm_calls(monkeypatch)
    results = {}
    for name, layer in (("fast", fast), ("reference", reference)):
        xi = x.detach().to(layer.gate_weight.dtype).requires_grad_()
        out, aux, z = layer(xi)
        (out.float() * grad_out).sum().backward()
        results[name] = dict(out=out, aux=aux, z=z, grad_x=xi.grad, grad_gate=layer.gate_weight.grad,
                             grad_wi_gate=layer.experts.wi_gate.grad, grad_wo=layer.experts.wo.grad)
    assert calls and set(calls) == {torch.bfloat16}, "the bf16 layer did not run its experts on torch._grouped_mm"
    assert torch.equal(fast.last_counts, reference.last_counts), "routing differs between bf16 and fp32 inputs"
    assert torch.equal(fast.last_dropped, reference.last_dropped)
    dropped = int(fast.last_dropped.sum())
    if dispatch == "capacity":
        assert dropped > 0, "capacity_factor 0.5 must drop copies for this check to cover the drop path"

    errors = {k: rel_err(results["fast"][k], results["reference"][k]) for k in results["fast"]}
    report(f"MoE layer {dispatch} bf16 grouped vs fp32 loop", dropped=dropped, **errors)
    for k, err in errors.items():
        assert err < BF16_TOL, f"{k}: relative error {err:.3g} (bf16 tolerance {BF16_TOL})"


def test_triton_grouped_experts_bf16_match_fp32_loop_without_host_sync(device, monkeypatch):
    """expert_ffn(impl="triton") (moe_system/kernels/grouped_gemm.py) in bf16 at OpenMoE-base's expert shape with
    uneven groups (none, one row, counts off the 64-row tile) vs the fp32 per-expert loop on the same values;
    on CUDA its forward + backward synchronises with the host 0 times, and auto takes it for fp16 operands
    (torch._grouped_mm has no fp16 kernel). The CPU dry run needs TRITON_INTERPRET=1 (set before triton's first
    import) and shrinks the shape for the interpreter."""
    from moe_system.kernels import triton_usable
    if not triton_usable(torch.empty(0, device=device)):
        pytest.skip("the Triton kernel runs on the CPU only under TRITON_INTERPRET=1 (tests/test_grouped_gemm_kernel"
                    ".py runs it there at small shapes)")
    torch.manual_seed(0)
    if ON_CUDA:
        counts = [611, 0, 1030, 5, 0, 777, 64, 1, 900, 333, 0, 1200, 129, 700, 1000, 1441]  # 8192 rows, 16 experts
        hidden, inter = 768, 2048
    else:
        counts, hidden, inter = [37, 0, 65, 5, 0, 48, 17, 1], 32, 48
    num = len(counts)
    counts = torch.tensor(counts, device=device)
    x = torch.randn(int(counts.sum()), hidden, device=device).bfloat16()
    weights = [(torch.randn(num, hidden, 2 * inter, device=device) * hidden ** -0.5).bfloat16(),
               (torch.randn(num, hidden, inter, device=device) * hidden ** -0.5).bfloat16(),
               (torch.randn(num, inter, hidden, device=device) * inter ** -0.5).bfloat16()]
    grad_out = torch.randn(x.shape, device=device)
    kernel_calls = []
    real = experts_module._triton_grouped
    monkeypatch.setattr(experts_module, "_triton_grouped",
                        lambda a, w, ends: kernel_calls.append(a.dtype) or real(a, w, ends))

    def run(dtype, impl, counter=None):
        xi = x.detach().to(dtype).requires_grad_()
        ws = [w.detach().to(dtype).requires_grad_() for w in weights]
        g = grad_out.to(dtype)
        with counter or nullcontext():
            y = expert_ffn(xi, counts, *ws, impl=impl)
            y.backward(g)
        return [y, xi.grad, *(w.grad for w in ws)]

    run(torch.bfloat16, "triton")  # warm-up: compiles the kernels
    syncs = SyncCounter() if ON_CUDA else None
    fast = run(torch.bfloat16, "triton", syncs)
    reference = run(torch.float32, "loop")
    assert kernel_calls and set(kernel_calls) == {torch.bfloat16}
    names = ["out", "grad_x", "grad_wi_gate", "grad_wi_up", "grad_wo"]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, fast, reference)}
    report("triton grouped experts bf16 vs fp32 loop", rows=x.shape[0], hidden=hidden, inter=inter,
           host_syncs=syncs.count if syncs else "not counted on the CPU", **errors)
    assert fast[0].dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in fast[1:])
    for n, err in errors.items():
        assert err < BF16_TOL, f"{n}: relative error {err:.3g} (bf16 tolerance {BF16_TOL})"
    assert not fast[4][1].any() and not fast[4][4].any(), "experts with no rows must get zero gradients"
    if not ON_CUDA:
        return
    assert syncs.count == 0, f"the Triton experts synchronised with the host: {dict(syncs.locations)}"
    kernel_calls.clear()
    half = run(torch.float16, "auto")
    assert len(kernel_calls) == 3 and set(kernel_calls) == {torch.float16}, "auto did not take the Triton kernel"
    assert rel_err(half[0], reference[0]) < BF16_TOL


# --- 2. fused chunked LM head + loss ------------------------------------------------------------------------

def full_logits_loss(hidden, weight, labels, label_smoothing, z_loss_factor):
    """The T5X loss on materialised fp32 logits, with torch's cross-entropy on smoothed target distributions."""
    logits = (hidden[:, :-1].float() @ weight.float().t()).reshape(-1, weight.shape[0])
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    logits, targets = logits[keep], targets[keep]
    vocab = logits.shape[-1]
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    soft = torch.full_like(logits, low).scatter(-1, targets[:, None], confidence)
    loss = F.cross_entropy(logits, soft, reduction="none")
    if label_smoothing:  # minus the entropy of the target distribution: a perfect prediction scores 0
        loss = loss + confidence * math.log(confidence) + (vocab - 1) * low * math.log(low)
    return (loss + z_loss_factor * torch.logsumexp(logits, -1).square()).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("label_smoothing,z_loss_factor", [(0.0, 0.0), (0.1, 1e-2)], ids=["plain", "smooth+zloss"])
def test_fused_head_loss_matches_full_logits(device, dtype, label_smoothing, z_loss_factor):
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 3, 80, 128, 1000
    hidden = torch.randn(batch, seq, hidden_size, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device) * 0.1).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[0, :30] = -100  # a masked prompt
    labels[2, 50:] = -100  # right padding

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    # 48-token chunks: several full chunks and a partial last one over the 186 targets
    loss = chunked_lm_loss(h, w, labels, label_smoothing=label_smoothing, z_loss_factor=z_loss_factor,
                           chunk_tokens=48)
    loss.backward()
    h_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = full_logits_loss(h_ref, w_ref, labels, label_smoothing, z_loss_factor)
    ref.backward()

    # The loss is a mean over 186 tokens, whose bf16 rounding errors average out: a much tighter bound than the
    # gradients', and tight enough to see the z-loss term (7% of the loss here) or the smoothing go missing.
    loss_tol, grad_tol = (1e-3, BF16_TOL) if dtype == torch.bfloat16 else (1e-5, FP32_TOL)
    loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
    grad_errors = dict(grad_hidden=rel_err(h.grad, h_ref.grad), grad_head=rel_err(w.grad, w_ref.grad))
    report(f"fused loss {dtype} ls={label_smoothing} zf={z_loss_factor}", loss_value=loss.item(), loss_err=loss_err,
           **grad_errors)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert not bool(h.grad[0, :29].any()), "positions whose next token is masked must get no gradient"
    assert loss_err < loss_tol, f"loss {loss.item():.6g} vs {ref.item():.6g} on full logits (tolerance {loss_tol})"
    for k, err in grad_errors.items():
        assert err < grad_tol, f"{k}: relative error {err:.3g} (tolerance {grad_tol} for {dtype})"


def test_fused_head_bf16_gemms_run_in_bf16_with_fp32_results(device, monkeypatch):
    """A bf16 head over 8 chunks: every GEMM over the vocabulary takes bf16 operands (none is an fp32 GEMM, which
    Hopper runs ~12x slower); on CUDA (sm80+) the logits come out of the GEMM in fp32 and each chunk's weight
    gradient is added to the fp32 sum inside its GEMM (mm / addmm with out_dtype); the loss holds its chunk's
    budget and the fp32 weight gradient, no per-chunk [V, H] product."""
    from test_loss import HeadGemms  # tests/ is on sys.path (rootdir import mode), as for dist_common
    import moe_system.model.loss as loss_module
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab, chunk = 2, 513, 128, 16384, 128
    hidden = torch.randn(batch, seq, hidden_size, device=device).to(torch.bfloat16)
    weight = (torch.randn(vocab, hidden_size, device=device) * 0.05).to(torch.bfloat16)
    # The Triton kernel (CUDA) keeps only the fp32 logits, the torch path one more [c, V] fp32 buffer.
    bytes_per_logit = (loss_module.KERNEL_CHUNK_BYTES_PER_LOGIT if loss_module.use_loss_kernel(weight)
                       else loss_module.CHUNK_BYTES_PER_LOGIT)
    monkeypatch.setattr(loss_module, "CHUNK_BUDGET_BYTES", bytes_per_logit * chunk * vocab)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[0, :100] = -100  # a masked prompt
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with HeadGemms() as gemms:
        loss = chunked_lm_loss(h, w, labels, z_loss_factor=1e-4)
        loss.backward()
    h_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = full_logits_loss(h_ref, w_ref, labels, 0.0, 1e-4)
    ref.backward()
    loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
    grad_errors = dict(grad_hidden=rel_err(h.grad, h_ref.grad), grad_head=rel_err(w.grad, w_ref.grad))
    ops = Counter(name for name, _ in gemms.calls)
    report("bf16 head GEMMs", ops=dict(ops), loss_err=loss_err, **grad_errors)
    assert all(dtypes == (torch.bfloat16,) * 2 for _, dtypes in gemms.calls), gemms.calls
    assert sum(ops.values()) == 3 * math.ceil(batch * seq / chunk), ops  # logits, grad hidden, grad weight per chunk
    assert loss_err < 5e-4, f"loss {loss.item():.6g} vs {ref.item():.6g} on full fp32 logits"
    for k, err in grad_errors.items():
        assert err < BF16_TOL, f"{k}: relative error {err:.3g} (tolerance {BF16_TOL} for bf16)"
    if not ON_CUDA:
        return
    if torch.cuda.get_device_capability(device)[0] >= 8:
        assert ops["aten.mm.dtype"] == ops["aten.addmm.dtype_out"] == math.ceil(batch * seq / chunk), ops
    peak = torch.cuda.max_memory_allocated() - base
    # fp32 weight gradient (4VH) and, in backward, its scaled fp32 copy and bf16 cast (6VH); one chunk's 8cV
    # (4cV with the kernel); 4 MiB for the rest (hidden-state gradients, per-row vectors). A per-chunk [V, H]
    # product would add 2-4VH.
    bound = 10 * vocab * hidden_size + bytes_per_logit * chunk * vocab + 4 * 2 ** 20
    report("bf16 head memory", peak_mib=peak / 2 ** 20, bound_mib=bound / 2 ** 20)
    assert peak <= bound, f"the loss peaked at {peak / 2 ** 20:.0f} MiB over its inputs (bound {bound / 2 ** 20:.0f})"


# --- 3. cached generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["plain", "smooth"])
def test_cross_entropy_kernel_matches_torch_path(device, monkeypatch, label_smoothing):
    """The compiled Triton loss kernel against the torch path at a realistic shape: a bf16 head over a 50k
    vocabulary, 4096 tokens (two chunks of the kernel's, four of the torch path's), a masked prompt, z-loss."""
    if not ON_CUDA:
        pytest.skip("the compiled kernel needs CUDA (tests/test_cross_entropy_kernel.py runs it under the interpreter)")
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 2, 2048, 512, 50304
    hidden = torch.randn(batch, seq, hidden_size, device=device).to(torch.bfloat16)
    weight = (torch.randn(vocab, hidden_size, device=device) * 0.05).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    labels[0, :300] = -100
    results = {}
    for path in ("triton", "torch"):
        monkeypatch.setenv("MOE_LOSS_KERNEL", path)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = chunked_lm_loss(h, w, labels, label_smoothing=label_smoothing, z_loss_factor=1e-4, chunk_tokens=2048)
        loss.backward()
        results[path] = (loss.detach(), h.grad, w.grad)
    (loss, gh, gw), (ref, gh_ref, gw_ref) = results["triton"], results["torch"]
    # The same fp32 logits on both sides; only the summation order and the exp differ (~1e-6 relative), then
    # the logits' gradient is rounded to bf16 on both sides and may land one ulp apart.
    loss_err = abs(loss.item() - ref.item()) / abs(ref.item())
    grad_errors = dict(grad_hidden=rel_err(gh, gh_ref), grad_head=rel_err(gw, gw_ref))
    report(f"cross-entropy kernel ls={label_smoothing}", loss_value=loss.item(), loss_err=loss_err, **grad_errors)
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert not bool(gh[0, :299].any()), "positions whose next token is masked must get no gradient"
    assert loss_err < 1e-5, f"loss {loss.item():.6g} with the kernel vs {ref.item():.6g} without"
    for k, err in grad_errors.items():
        assert err < 5e-3, f"{k}: relative error {err:.3g} between the kernel and the torch path"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_greedy_generation_equals_uncached(device, dtype):
    """fp32: identical token ids. bf16: greedy ids can split at a near-tie (the cached step and the full
    recompute round differently), so the logits are compared, at every step up to and including the first one
    where the ids differ (the inputs of those steps are the same in both runs)."""
    model = load_model("tiny", dtype=dtype, device=str(device), seed=0)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), device=device)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = model.config.pad_token_id, 0  # one left-padded row: the masked path too
    runs = [model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                           use_cache=use_cache, pad_token_id=model.config.pad_token_id, eos_token_id=None,
                           output_logits=True, return_dict_in_generate=True)
            for use_cache in (True, False)]
    cached, uncached = (run.sequences[:, ids.shape[1]:] for run in runs)
    assert cached.shape == uncached.shape == (2, 16)
    differs = (cached != uncached).any(dim=0).nonzero()
    same_steps = int(differs[0]) if len(differs) else 16
    compared = min(same_steps + 1, 16)
    logits = [torch.stack(run.logits[:compared]) for run in runs]
    err = rel_err(logits[0], logits[1])
    report(f"cached vs uncached generation {dtype}", identical_steps=same_steps, logits_err=err,
           logits_steps_compared=compared)
    if dtype == "float32":
        assert torch.equal(cached, uncached), f"fp32 greedy ids differ from step {same_steps}"
        assert err < FP32_TOL
    else:
        assert err < BF16_TOL, f"bf16 cached logits: relative error {err:.3g} (tolerance {BF16_TOL})"


# --- 4. the SDPA backend of training ------------------------------------------------------------------------

def flash_only():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def record_sdpa_calls(monkeypatch) -> list[dict]:
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        calls.append(dict(dtype=q.dtype, head_dim=q.shape[-1], mask=attn_mask is not None, causal=is_causal,
                          scale=scale))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def check_flash_eligible(calls: list[dict]) -> None:
    assert calls, "no scaled_dot_product_attention call was seen"
    masked = [c for c in calls if c["mask"]]
    assert not masked, (f"{len(masked)} of {len(calls)} training attention calls pass an explicit attn_mask, which "
                        "rules the flash backend out (flash takes only is_causal): training pays for the math or "
                        "memory-efficient kernel")
    assert all(c["causal"] and c["scale"] == 1.0 and c["dtype"] == torch.bfloat16 for c in calls), calls


def test_training_forward_backward_runs_on_flash_attention(device, monkeypatch):
    """The model's training call (forward_backward: input_ids and labels, no padding mask), bf16, tiny preset,
    with only the flash backend allowed on CUDA: every attention call is causal with scale 1.0 and no mask."""
    cfg = OpenMoeConfig.from_preset("tiny")
    torch.manual_seed(0)
    with torch.device(device):
        model = OpenMoeForCausalLM(cfg)
    model = model.to(torch.bfloat16).train()
    ids = torch.randint(3, cfg.vocab_size, (4, 256))
    calls = record_sdpa_calls(monkeypatch)
    with flash_only() if ON_CUDA else nullcontext():
        try:
            forward_backward(PlainBackward(), model, None, [{"input_ids": ids, "labels": ids}], None, device)
        except RuntimeError as err:
            pytest.fail(f"the training step cannot run on the flash SDPA backend alone: {str(err)[:400]}")
    report("training attention", calls=len(calls), flash_only=ON_CUDA, **calls[0])
    check_flash_eligible(calls)
    if not ON_CUDA:
        pytest.skip("flash-only SDPA is a CUDA backend (the CPU's flash kernel also takes masks): ran the step on "
                    "the CPU and checked the call's arguments only")


@pytest.mark.parametrize("preset", ["base", "34b"])
def test_attention_at_released_head_shapes_runs_on_flash(device, monkeypatch, preset):
    """One attention layer at a released preset's heads x head_dim and sequence length (2048; 256 on the CPU),
    bf16, with the mask the model builds for training (none): forward and backward on flash alone."""
    cfg = OpenMoeConfig.from_preset(preset)
    seq = 2048 if ON_CUDA else 256
    torch.manual_seed(0)
    with torch.device(device):
        attention = OpenMoeAttention(cfg, 0).to(torch.bfloat16)
        rotary = OpenMoeRotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    x = torch.randn(1, seq, cfg.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rotary(torch.arange(seq, device=device)[None])
    mask = build_attention_mask(None, seq, 0, x)
    calls = record_sdpa_calls(monkeypatch)
    with flash_only() if ON_CUDA else nullcontext():
        try:
            attention(x, cos, sin, mask).float().square().mean().backward()
        except RuntimeError as err:
            pytest.fail(f"{preset} attention (heads {cfg.num_attention_heads} x {cfg.head_dim}) cannot run on the "
                        f"flash SDPA backend alone: {str(err)[:400]}")
    report(f"{preset} attention", seq=seq, heads=cfg.num_attention_heads, flash_only=ON_CUDA, **calls[0])
    check_flash_eligible(calls)
    assert torch.isfinite(x.grad).all()
    if not ON_CUDA:
        pytest.skip("flash-only SDPA is a CUDA backend: checked the call's arguments on the CPU only")


# --- 5. host synchronisations per training step ----------------------------------------------------------

class PlainBackward:
    """What forward_backward needs of a Booster on one device without Colossal-AI: backward(loss, optimizer)."""

    def backward(self, loss, optimizer):
        loss.backward()


SYNC_MESSAGE = "synchronizing CUDA operation"


class SyncCounter:
    """Counts host synchronisations with torch.cuda.set_sync_debug_mode("warn"), by the Python line that made them.

    Warnings from backward (run on autograd's device thread) are replayed on the calling thread when it ends.
    """

    def __enter__(self):
        self.locations = Counter()
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(*exc)
        for record in self._records:
            if SYNC_MESSAGE in str(record.message):
                self.locations[f"{Path(record.filename).name}:{record.lineno}"] += 1
        return False

    @property
    def count(self) -> int:
        return sum(self.locations.values())


def sync_bound(config: OpenMoeConfig, micro_batches: int = 1) -> dict:
    """Host synchronisations one forward_backward implies, counted by reading the code (dropless, one device):

    * forward_backward.py: the inputs and the global target count go to the device with non_blocking copies, which
      do not wait for the device; from pageable memory (no pin_memory here, unlike the training loader) the driver
      may still stage them synchronously: up to 1 + 2 per micro-batch;
    * the MoE layers count and sort tokens on the device (no bincount): none (tests/test_host_syncs.py counts the
      calls on the CPU);
    * loss.py: none (ignored tokens are weighted 0, not selected; num_items stays a device tensor).
    bf16 experts on grouped GEMM add none (the per-expert loop would add counts.tolist() per expert call);
    plain AdamW keeps its step counters on the CPU and adds none (fused AdamW's live on the device).
    """
    return {"copies_in": 1 + 2 * micro_batches, "moe_layers": 0, "loss": 0, "optimizer": 0}


def test_host_syncs_per_training_step(device):
    """forward_backward + AdamW step on the tiny preset in bf16, dropless, one device, no Colossal-AI.
    The loop around it adds its own reads (loss.item(), the isfinite check, tokens.item(), the progress bar's
    aux.item(); Colossal-AI's optimizer reads the gradient norm): not counted here."""
    cfg = OpenMoeConfig.from_preset("tiny")
    assert cfg.dispatch == "dropless"
    torch.manual_seed(0)
    with torch.device(device):
        model = OpenMoeForCausalLM(cfg)
    model = model.to(torch.bfloat16).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, cfg.vocab_size, (4, 128))  # on the CPU, as the data loader gives them
    micro_batches = [{"input_ids": ids, "labels": ids}]
    bound = sync_bound(cfg, len(micro_batches))
    before = model.lm_head.weight.detach().clone()

    def step(counter_fb=None, counter_opt=None):
        with counter_fb or nullcontext():
            parts = forward_backward(PlainBackward(), model, optimizer, micro_batches, None, device)
        with counter_opt or nullcontext():
            optimizer.step()
            optimizer.zero_grad()
        return parts

    step()  # warm-up: optimizer state, statistics moved to the device, kernels and handles created once
    if not ON_CUDA:
        parts = step()
        assert torch.isfinite(parts["lm_loss"]) and not torch.equal(model.lm_head.weight, before)
        report("host syncs per step", bound=bound, lm_loss=parts["lm_loss"].item())
        pytest.skip("counting host synchronisations needs CUDA's sync debug mode: ran two steps on the CPU only")

    fb, opt = SyncCounter(), SyncCounter()
    parts = step(fb, opt)
    assert torch.isfinite(parts["lm_loss"]) and not torch.equal(model.lm_head.weight, before)
    limit_fb = bound["copies_in"] + bound["moe_layers"] + bound["loss"]
    report("host syncs per step", forward_backward=fb.count, optimizer=opt.count, bound_forward_backward=limit_fb,
           bound_optimizer=bound["optimizer"], where=dict(fb.locations + opt.locations))
    assert fb.count <= limit_fb, (f"forward+backward synchronised with the host {fb.count} times, more than the "
                                  f"{limit_fb} the code implies {bound}; by line: {dict(fb.locations)}")
    assert opt.count <= bound["optimizer"], f"the optimizer step synchronised {opt.count} times: {dict(opt.locations)}"


def test_training_adamw_is_fused_on_cuda(device):
    """The training loop's AdamW (parallel/optimizers.py adamw) takes the fused kernel on CUDA and updates as the
    default implementation does; on the CPU it is the default one."""
    from moe_system.parallel.optimizers import adamw
    from moe_system.training.loop import decay_groups
    torch.manual_seed(0)
    with torch.device(device):
        model = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny"))
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for p, q in zip(model.parameters(), twin):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    optimizer = adamw(decay_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    reference = torch.optim.AdamW(twin, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, fused=False)
    for _ in range(2):
        optimizer.step()
        reference.step()
    fused = [bool(group["fused"]) for group in optimizer.param_groups]
    errors = [rel_err(p, q) for p, q in zip(model.parameters(), twin) if p.ndim >= 2]
    report("training AdamW", fused=fused, max_param_err=max(errors))
    assert fused == [ON_CUDA] * 2
    assert max(errors) < 1e-6  # fp32 state and update either way; only the order of a few operations differs


# --- 6. bf16 checkpoints ---------------------------------------------------------------------------------------

def test_bf16_checkpoint_loads_as_bf16_and_generates(device, tmp_path):
    torch.manual_seed(0)
    saved = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny")).to(torch.bfloat16).eval()
    saved.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype="auto", device=str(device))
    dtypes = {p.dtype for p in model.parameters()}
    devices = {p.device.type for p in model.parameters()}
    report("bf16 checkpoint", dtypes=sorted(map(str, dtypes)), devices=sorted(devices))
    assert dtypes == {torch.bfloat16}, f"dtype='auto' loaded a bf16 checkpoint as {dtypes}"
    assert devices == {device.type}

    ids = torch.randint(3, 1024, (2, 6), device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    expected = saved.to(device).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                         do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, 14)
    assert torch.equal(out, expected), "the loaded bf16 model generates differently from the one saved"


# --- 7. the training step through Colossal-AI's Booster ------------------------------------------------------

def test_train_script_one_process_world(device, tmp_path):
    """python train.py in a one-process world (Colossal-AI launch, Booster, the default precision: bf16 on CUDA),
    two steps of the tiny preset on synthetic tokens."""
    import importlib.util
    if importlib.util.find_spec("colossalai") is None:
        pytest.skip("colossalai is not installed (on the GPU machine: pip install --target from .whl/)")
    output = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if not ON_CUDA:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even where a GPU is present
    cmd = [sys.executable, "train.py", "--model_name", "tiny", "--dataset", "synthetic", "--max_steps", "2",
           "--batch_size", "4", "--max_length", "128", "--log_interval", "1", "--output_path", str(output)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    memory = [r["perf/max_memory_gib"] for r in records if "perf/max_memory_gib" in r]
    speed = [r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r]
    report("train.py one process", steps=summary["steps"], final_lm_loss=summary["final_lm_loss"],
           tokens_per_s=speed[-1] if speed else None, max_memory_gib=memory[-1] if memory else None)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["final_lm_loss"])
    if ON_CUDA:
        assert memory and memory[-1] > 0, "train.py did not run on the GPU (no CUDA memory was recorded)"


# --- offloaded experts fetched to the device ---------------------------------------------------------------------

def test_chosen_experts_fetch_matches_resident_experts(device):
    """Experts in (pinned-staged) CPU memory, copied non_blocking to the device: the resident experts' rows."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
    from moe_system.inference.expert_offload import ChosenExpertsFetch
    from moe_system.moe.experts import GroupedExperts
    torch.manual_seed(0)
    experts = GroupedExperts(8, 64, 128)
    experts.reset_parameters(1.0)
    stored = PrefixedDataset(OffloadedWeightsLoader(state_dict={f"e.{n}": p.detach() for n, p in
                                                                experts.named_parameters()}), "e.")
    fetch = ChosenExpertsFetch(experts, stored, device)
    counts = torch.tensor([0, 3, 0, 0, 2, 0, 0, 1], device=device)
    rows = torch.randn(6, 64, device=device)
    with torch.no_grad():
        out = fetch(rows, counts)
        expected = experts.to(device)(rows, counts)
    layer_bytes = sum(p.numel() * p.element_size() for p in experts.parameters())
    report("chosen experts fetch", err=rel_err(out, expected), bytes_share=fetch.bytes_copied / layer_bytes)
    assert out.device == rows.device and rel_err(out, expected) < FP32_TOL
    assert fetch.bytes_copied == 3 * layer_bytes // 8


# --- compiled dense blocks (--compile) -------------------------------------------------------------------------

def test_compiled_dense_blocks_train_like_eager_in_bf16(device):
    """--compile on the device: inductor's graphs of the dense blocks (the MoE layers eager) give the eager bf16
    model's loss and gradients to bf16 rounding, with selective recompute too, and compile each block kind once
    (a second step of the same shapes compiles nothing). The CPU dry run uses aot_eager: the same graphs without
    inductor's C++ code generation, which takes minutes there."""
    import copy
    from torch._dynamo.testing import CompileCounterWithBackend
    from moe_system.parallel.compile import compile_dense_blocks

    torch.manual_seed(0)
    with torch.device(device):
        eager = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny")).to(torch.bfloat16).train()
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor" if ON_CUDA else "aot_eager")
    compile_dense_blocks(compiled, backend=counter)
    ids = torch.randint(0, eager.config.vocab_size, (4, 128), device=device)
    figures = {}
    for recompute in (None, "selective", None):
        results = []
        for model in (eager, compiled):
            model.model.gradient_checkpointing = recompute is not None
            model.model.recompute = recompute or "full"
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        (loss_e, grads_e), (loss_c, grads_c) = results
        figures[f"loss_rel_err_{recompute}"] = rel_err(loss_c, loss_e)
        figures[f"max_grad_rel_err_{recompute}"] = max(rel_err(grads_c[n], g) for n, g in grads_e.items())
        assert figures[f"loss_rel_err_{recompute}"] < BF16_TOL and figures[f"max_grad_rel_err_{recompute}"] < BF16_TOL
    figures["compiled_frames"] = counter.frame_count
    report("compiled dense blocks", **figures)
    assert counter.frame_count == 6  # dense layer, norm, attention, FFN; the layer and FFN again under recompute
