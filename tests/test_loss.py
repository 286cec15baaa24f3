import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
import pytest
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from moe_system.model.loss import chunked_lm_loss


def full_reference(hidden, weight, labels, ls, zf):
    logits = (hidden[:, :-1] @ weight.t()).float().reshape(-1, weight.shape[0])
    targets = labels[:, 1:].reshape(-1)
    valid = targets != -100
    logits, targets = logits[valid], targets[valid]
    ce = F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.0)
    vocab = logits.shape[-1]
    logp = logits.log_softmax(-1)
    if ls > 0:  # T5X: smoothed targets conf / low, minus the entropy of the target distribution
        conf, low = 1 - ls, ls / (vocab - 1)
        soft = torch.full_like(logp, low).scatter(-1, targets[:, None], conf)
        ce = -(soft * logp).sum(-1) + (conf * torch.log(torch.tensor(conf)) + (vocab - 1) * low * torch.log(torch.tensor(low)))
    return (ce + zf * torch.logsumexp(logits, -1) ** 2).mean()


@pytest.mark.parametrize("ls,zf", [(0.0, 0.0), (0.1, 1e-3)])
def test_chunked_loss_equals_full_logits_loss(ls, zf):
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 32, requires_grad=True)
    weight = torch.randn(97, 32, requires_grad=True)
    labels = torch.randint(0, 97, (3, 20))
    labels[0, :7] = -100  # a masked prompt
    labels[2, 15:] = -100  # padding
    loss = chunked_lm_loss(hidden, weight, labels, label_smoothing=ls, z_loss_factor=zf, chunk_tokens=7)
    ref = full_reference(hidden, weight, labels, ls, zf)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(loss, [hidden, weight])
    g_ref = torch.autograd.grad(ref, [hidden, weight])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_num_items_gives_a_global_mean():
    hidden, weight = torch.randn(4, 10, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (4, 10))
    whole = chunked_lm_loss(hidden, weight, labels)
    halves = sum(chunked_lm_loss(hidden[i:i + 2], weight, labels[i:i + 2], num_items=36) for i in (0, 2))
    torch.testing.assert_close(whole, halves)


def test_base_sized_head_never_materialises_full_logits():
    # 1024 targets x 256384 vocab: full fp32 logits are 1.05 GB, and their gradient another 1.05 GB.
    # Chunked by 128 tokens, each chunk's logits are 131 MB; bound the peak well under one full copy.
    code = textwrap.dedent("""
        import resource, torch
        from moe_system.model.loss import chunked_lm_loss
        torch.manual_seed(0)
        hidden = torch.randn(1, 1025, 768, requires_grad=True)
        weight = (torch.randn(256384, 768) * 0.02).requires_grad_()
        labels = torch.randint(0, 256384, (1, 1025))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = chunked_lm_loss(hidden, weight, labels, z_loss_factor=1e-4, chunk_tokens=128)
        loss.backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_mb = float(out.stdout.strip().splitlines()[-1])
    # weight.grad (788 MB fp32) is unavoidable; full logits + their grad would add > 2000 MB on top.
    assert peak_mb < 788 + 450, f"peak grew by {peak_mb:.0f} MB"


GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm}


class HeadGemms(TorchDispatchMode):
    """Records every matrix multiply that reaches the dispatcher: (overload name, operand dtypes)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in GEMMS:
            operands = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2][-2:]
            self.calls.append((str(func), tuple(a.dtype for a in operands)))
        return func(*args, **(kwargs or {}))


def bf16_case(vocab=211, hidden_size=48):
    torch.manual_seed(0)
    hidden = torch.randn(3, 40, hidden_size).to(torch.bfloat16)
    weight = (torch.randn(vocab, hidden_size) * 0.1).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (3, 40))
    labels[0, :11] = -100  # a masked prompt
    labels[2, 30:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("ls,zf", [(0.0, 0.0), (0.1, 1e-2)])
def test_bf16_head_runs_bf16_gemms_and_matches_fp32_reference(ls, zf):
    hidden, weight, labels = bf16_case()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with HeadGemms() as gemms:
        loss = chunked_lm_loss(h, w, labels, label_smoothing=ls, z_loss_factor=zf, chunk_tokens=16)
        loss.backward()
    # Every product over the vocabulary takes bf16 operands (tensor cores on a GPU), none is an fp32 GEMM.
    assert gemms.calls and all(dtypes == (torch.bfloat16,) * 2 for _, dtypes in gemms.calls), gemms.calls
    h_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref = full_reference(h_ref, w_ref, labels, ls, zf)
    ref.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    # The loss: an fp32 softmax over logits rounded to bf16 (2^-9 relative each, here ~1e-5 once averaged over
    # the 98 targets); the z-loss term alone is 5% of it, a dropped or doubled row ~1%.
    torch.testing.assert_close(loss, ref, rtol=5e-4, atol=0)
    # Gradients: dlogits rounded to bf16 once, the GEMM outputs to bf16 once: a relative L2 error of a few 1e-3;
    # a missing term or a wrong row is off by O(1) where it lands.
    for name, got, want in (("hidden", h.grad, h_ref.grad), ("weight", w.grad, w_ref.grad)):
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, f"grad {name}: relative L2 error {err:.3g}"
    assert not h.grad[0, :10].any() and not h.grad[:, -1].any()  # no target, no gradient


def test_chunk_size_comes_from_the_memory_budget(monkeypatch):
    from moe_system.model import OpenMoeConfig
    from moe_system.model import loss as loss_module
    from moe_system.parallel.memory_planner import head_loss_bytes

    # 256k vocabulary: 2 GiB / (8 bytes x 256384) = 1047 tokens, down to whole 64-token tiles.
    assert loss_module.loss_chunk_tokens(256384) == 1024
    assert 8 * 1024 * 256384 <= 2 * 1024 ** 3 < 8 * (1024 + 64) * 256384
    assert loss_module.loss_chunk_tokens(1024) == 2 * 1024 ** 3 // (8 * 1024)  # tiny: any batch in one chunk
    assert loss_module.loss_chunk_tokens(10 ** 8) == 64  # never below one tile
    # loss_chunk_tokens in a config caps the count (configs saved before carry 4096); the default does not.
    assert OpenMoeConfig().loss_chunk_tokens is None
    assert loss_module.loss_chunk_tokens(256384, 4096) == 1024 and loss_module.loss_chunk_tokens(1024, 4096) == 4096
    assert head_loss_bytes(OpenMoeConfig.from_preset("8b"), 16384, 2)["chunk_buffer"] == 8 * 1024 * 256384

    # chunked_lm_loss takes its chunks from that budget: 4 chunks of 64 tokens, 3 GEMMs each.
    monkeypatch.setattr(loss_module, "CHUNK_BUDGET_BYTES", 8 * 64 * 97)
    hidden, weight = torch.randn(2, 128, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    labels = torch.randint(0, 97, (2, 128))
    with HeadGemms() as gemms:
        chunked_lm_loss(hidden, weight, labels).backward()
    assert len(gemms.calls) == 4 * 3, gemms.calls


class NoHostSync(TorchFunctionMode):
    """Fails on the calls that make the host wait for the device on CUDA: reads of tensor values, and shapes
    that depend on them."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.masked_select, torch.masked_select, torch.Tensor.cpu, torch.Tensor.numpy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS:
            raise AssertionError(f"host sync: {func.__name__}")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                raise AssertionError("host sync: boolean-mask indexing")
        return func(*args, **kwargs)


@pytest.mark.parametrize("num_items", ["tensor", "none"])
def test_loss_forward_and_backward_make_no_host_sync(num_items):
    hidden, weight, labels = torch.randn(3, 20, 32, requires_grad=True), torch.randn(97, 32, requires_grad=True), \
        torch.randint(0, 97, (3, 20))
    labels[0, :7] = -100
    count = (labels[:, 1:] != -100).sum()  # as forward_backward's global_target_count: an int64 tensor
    given = count if num_items == "tensor" else None
    with NoHostSync():
        loss = chunked_lm_loss(hidden, weight, labels, z_loss_factor=1e-3, chunk_tokens=16, num_items=given)
        loss.backward()
    assert hidden.grad is not None and weight.grad is not None
    torch.testing.assert_close(loss, chunked_lm_loss(hidden, weight, labels, z_loss_factor=1e-3, chunk_tokens=16,
                                                     num_items=int(count)))
