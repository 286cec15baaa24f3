"""Language-model loss over a large vocabulary without materialising B x T x V logits.

Per target token (T5X style, docs/model.md, Loss): label-smoothed cross-entropy minus its constant minimum,
plus the output z-loss z_loss_factor * logsumexp(logits)^2. Tokens labelled -100 (prompt, padding) are ignored.

The head and the loss are fused: chunk by chunk, the forward computes the fp32 logits, the loss, and at once
the gradients of the loss with respect to the hidden states and the head weight (accumulated in place). Only
one chunk's logits exist at a time, nothing is recomputed in backward, and the weight gradient is never held
twice — a 256k-vocabulary head costs one [chunk, V] buffer instead of B x T x V logits and their gradient.
"""

import math

import torch

IGNORE_INDEX = -100


def _smoothing_constants(label_smoothing: float, vocab: int):
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    # Entropy of the smoothed target: subtracting it makes a perfect prediction score 0, as T5X does.
    minimum = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20)) if label_smoothing else 0.0
    return confidence, low, minimum


def _chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, z_loss_factor: float,
                         need_grad: bool):
    """Summed loss of fp32 logits [n, V]; with need_grad also d(loss)/d(logits), computed in place over logits."""
    vocab = logits.shape[-1]
    confidence, low, minimum = _smoothing_constants(label_smoothing, vocab)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets[:, None]).squeeze(-1)
    nll = lse - target_logit
    loss = confidence * nll - minimum
    if label_smoothing:
        loss = loss + low * (vocab * lse - logits.sum(dim=-1) - nll)  # sum over non-target classes of -log p
    if z_loss_factor:
        loss = loss + z_loss_factor * lse.square()
    if not need_grad:
        return loss.sum(), None
    # d/dlogits: (confidence - low + low*V + 2*zf*lse) * softmax - (confidence - low) * onehot - low
    probs = logits.sub_(lse[:, None]).exp_()
    probs.mul_((confidence - low + low * vocab + 2 * z_loss_factor * lse)[:, None])
    probs.scatter_add_(-1, targets[:, None], torch.full_like(lse[:, None], -(confidence - low)))
    if low:
        probs.sub_(low)
    return loss.sum(), probs


class FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, label_smoothing, z_loss_factor, chunk_tokens, denominator, need_grad):
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            logits = (h @ weight.t()).float()
            loss, dlogits = _chunk_loss_and_grad(logits, targets[start:start + chunk_tokens], label_smoothing,
                                                 z_loss_factor, need_grad)
            total += loss
            if need_grad:
                grad_hidden[start:start + chunk_tokens] = (dlogits.to(weight.dtype) @ weight)
                grad_weight.addmm_(dlogits.t(), h.float())
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
                None, None, None, None, None, None)


def router_loss(cfg, aux_loss: torch.Tensor, z_loss: torch.Tensor) -> torch.Tensor:
    """The routers' part of the training loss: load balancing and router z-loss (means over the MoE layers), each
    weighted by its factor in the model config."""
    return cfg.router_aux_loss_factor * aux_loss + cfg.router_z_loss_factor * z_loss


def chunked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, *,
                    label_smoothing: float = 0.0, z_loss_factor: float = 0.0, chunk_tokens: int = 4096,
                    num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of hidden [B, T, H] under head_weight [V, H] against unshifted labels [B, T].

    Divides the summed loss by num_items when given (the global count of target tokens, so that data-parallel
    ranks and accumulation steps add up to one exact global mean), else by the local count of targets.
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    hidden, targets = hidden[rows], targets[rows]
    denominator = num_items if num_items is not None else max(targets.numel(), 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.item()
    # Grad mode is off inside Function.forward, so decide here whether the fused gradients are needed.
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    return FusedLinearLoss.apply(hidden, head_weight, targets, label_smoothing, z_loss_factor, chunk_tokens,
                                 float(denominator), need_grad)
