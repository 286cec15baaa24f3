"""Language-model loss over a large vocabulary without materialising B x T x V logits.

Per target token (T5X style, docs/model.md, Loss): label-smoothed cross-entropy minus its constant minimum,
plus the output z-loss z_loss_factor * logsumexp(logits)^2. Tokens labelled -100 (prompt, padding) are ignored.

The head and the loss are fused: chunk by chunk, the forward computes the fp32 logits, the loss, and at once
the gradients of the loss with respect to the hidden states and the head weight (accumulated in place). Only
one chunk's logits exist at a time, nothing is recomputed in backward, and the weight gradient is never held
twice — a 256k-vocabulary head costs one [chunk, V] buffer instead of B x T x V logits and their gradient.

Precision: the three head GEMMs (logits, gradient of the hidden states, gradient of the weight) take their
operands in the weight's dtype, so a bf16/fp16 head runs on the tensor cores; the logits, the loss and the
weight gradient's sum over chunks are fp32. Ignored tokens are computed like the others and weighted 0, so
that nothing here waits for the device (no data-dependent shapes, no reads of device values on the host).

On CUDA the per-chunk loss and gradient run as one Triton kernel (kernels/cross_entropy.py: two passes over the
logits instead of some ten torch passes, the gradient written over the logits); _chunk_loss_and_grad is the
torch path, the reference and the CPU's. MOE_LOSS_KERNEL=triton|torch forces either (triton on CPU needs
TRITON_INTERPRET=1, which the tests use).
"""

import math
import os

import torch
import torch.nn.functional as F

from ..kernels import triton_usable

IGNORE_INDEX = -100

# On the torch path a chunk of c tokens peaks at 8 bytes per logit: its fp32 logits [c, V] plus one more [c, V]
# fp32 buffer beside them (logsumexp's exp; later the working-dtype copy of the logits' gradient, <= 4 bytes).
CHUNK_BYTES_PER_LOGIT = 8
# The kernel writes the gradient, in the GEMMs' dtype, over the logits: the fp32 logits are all there is, so a
# chunk holds twice the tokens in the same budget (256k vocabulary: 2048).
KERNEL_CHUNK_BYTES_PER_LOGIT = 4
CHUNK_BUDGET_BYTES = 2 * 1024 ** 3


def loss_chunk_tokens(vocab_size: int, limit: int | None = None, bytes_per_logit: int = CHUNK_BYTES_PER_LOGIT) -> int:
    """Tokens per chunk: floor(CHUNK_BUDGET_BYTES / (bytes_per_logit * vocab_size)), rounded down to a multiple
    of 64 (whole GEMM tiles) and at least 64, so that a chunk's logits and temporaries stay within the 2 GiB
    budget (256k vocabulary: 1024 tokens on the torch path); never more than limit (the config's
    loss_chunk_tokens) when one is set."""
    tokens = max(64, CHUNK_BUDGET_BYTES // (bytes_per_logit * vocab_size) // 64 * 64)
    return min(tokens, limit) if limit else tokens


def use_loss_kernel(weight: torch.Tensor) -> bool:
    """The Triton kernel on CUDA where triton imports, the torch path elsewhere; MOE_LOSS_KERNEL forces one."""
    forced = os.environ.get("MOE_LOSS_KERNEL", "")
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"MOE_LOSS_KERNEL={forced!r}: expected triton or torch (or unset for the default)")
    if forced == "torch":
        return False
    usable = triton_usable(weight)
    if forced == "triton" and not usable:
        raise RuntimeError(f"MOE_LOSS_KERNEL=triton, but no Triton kernel can run on {weight.device} "
                           "(CUDA with triton installed, or CPU under TRITON_INTERPRET=1)")
    return usable and (forced == "triton" or weight.is_cuda)


def _fp32_output_gemms(weight: torch.Tensor) -> bool:
    # cuBLAS multiplies bf16/fp16 operands into an fp32 output (accumulating into it) on sm80 and newer only.
    return (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(weight.device)[0] >= 8)


def _smoothing_constants(label_smoothing: float, vocab: int):
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    # Entropy of the smoothed target: subtracting it makes a perfect prediction score 0, as T5X does.
    minimum = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20)) if label_smoothing else 0.0
    return confidence, low, minimum


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, z_loss_factor: float,
                         need_grad: bool):
    """Per-row loss [n] of fp32 logits [n, V], 0 on the rows whose target is IGNORE_INDEX; with need_grad also
    d(loss)/d(logits) (0 on ignored rows), computed in place over logits."""
    vocab = logits.shape[-1]
    confidence, low, minimum = _smoothing_constants(label_smoothing, vocab)
    valid = targets != IGNORE_INDEX
    targets = targets.clamp(min=0)  # any class for ignored rows: their loss and gradient are dropped below
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets[:, None]).squeeze(-1)
    nll = lse - target_logit
    loss = confidence * nll - minimum
    if label_smoothing:
        loss = loss + low * (vocab * lse - logits.sum(dim=-1) - nll)  # sum over non-target classes of -log p
    if z_loss_factor:
        loss = loss + z_loss_factor * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if not need_grad:
        return loss, None
    # d/dlogits: (confidence - low + low*V + 2*zf*lse) * softmax - (confidence - low) * onehot - low, times valid
    probs = logits.sub_(lse[:, None]).exp_()
    probs.mul_(torch.where(valid, confidence - low + low * vocab + 2 * z_loss_factor * lse, 0.0)[:, None])
    probs.scatter_add_(-1, targets[:, None], torch.where(valid, -(confidence - low), 0.0)[:, None])
    if low:
        probs.sub_(torch.where(valid, low, 0.0)[:, None])
    return loss, probs


class FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, label_smoothing, z_loss_factor, chunk_tokens, denominator, need_grad,
                kernel):
        fp32_out = _fp32_output_gemms(weight)
        if kernel:
            from ..kernels.cross_entropy import loss_and_grad_  # imports triton: only where it runs
            confidence, low, minimum = _smoothing_constants(label_smoothing, weight.shape[0])
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        # fp32: the weight gradient is a sum over every chunk, which bf16 would round once per chunk.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            logits = torch.mm(h, weight.t(), out_dtype=torch.float32) if fp32_out else (h @ weight.t()).float()
            if kernel:  # the gradient comes back in the weight's dtype, over the logits' bytes
                loss, dlogits = loss_and_grad_(logits, targets[start:start + chunk_tokens], confidence=confidence,
                                               low=low, minimum=minimum, z_loss_factor=z_loss_factor,
                                               ignore_index=IGNORE_INDEX, grad_dtype=weight.dtype if need_grad else None)
            else:
                loss, dlogits = _chunk_loss_and_grad(logits, targets[start:start + chunk_tokens], label_smoothing,
                                                     z_loss_factor, need_grad)
            total += loss.sum()
            del logits  # so that the cast below frees the fp32 buffer before the GEMMs and the next chunk
            if need_grad:
                dlogits = dlogits.to(weight.dtype)  # GEMM operands in the working dtype (a no-op in fp32)
                torch.mm(dlogits, weight, out=grad_hidden[start:start + chunk_tokens])
                if fp32_out:  # the chunk's product is added to the fp32 sum inside the GEMM
                    torch.addmm(grad_weight, dlogits.t(), h, out_dtype=torch.float32, out=grad_weight)
                elif dlogits.dtype == grad_weight.dtype:
                    grad_weight.addmm_(dlogits.t(), h)
                else:  # no mixed-dtype GEMM here (CPU, pre-sm80): the chunk's product is rounded once
                    grad_weight += dlogits.t() @ h
                del dlogits
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.denominator = denominator
        ctx.weight_dtype = weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / ctx.denominator
        return (grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype),
                None, None, None, None, None, None, None)


def router_loss(cfg, aux_loss: torch.Tensor, z_loss: torch.Tensor) -> torch.Tensor:
    """The routers' part of the training loss: load balancing and router z-loss (means over the MoE layers), each
    weighted by its factor in the model config."""
    return cfg.router_aux_loss_factor * aux_loss + cfg.router_z_loss_factor * z_loss


def chunked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, *,
                    label_smoothing: float = 0.0, z_loss_factor: float = 0.0, chunk_tokens: int | None = None,
                    num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of hidden [B, T, H] under head_weight [V, H] against unshifted labels [B, T].

    Divides the summed loss by num_items when given (the global count of target tokens, so that data-parallel
    ranks and accumulation steps add up to one exact global mean), else by the local count of targets.
    chunk_tokens: at most this many tokens per chunk (loss_chunk_tokens); the memory budget decides the rest.
    """
    # Position t predicts labels[t + 1]; the last position of each row has no target (ignored). Keeping every
    # position makes hidden a view, and its gradient needs no scatter into a zero-filled [B, T, H].
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    if num_items is None:
        num_items = (targets != IGNORE_INDEX).sum().clamp(min=1)
    # Grad mode is off inside Function.forward, so decide here whether the fused gradients are needed.
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    kernel = use_loss_kernel(head_weight)
    chunk = loss_chunk_tokens(head_weight.shape[0], chunk_tokens,
                              KERNEL_CHUNK_BYTES_PER_LOGIT if kernel else CHUNK_BYTES_PER_LOGIT)
    return FusedLinearLoss.apply(hidden, head_weight, targets, label_smoothing, z_loss_factor, chunk, num_items,
                                 need_grad, kernel)
