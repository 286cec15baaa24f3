"""Language-model loss over a large vocabulary without materialising B x T x V logits.

Per target token (T5X style, openmoe_spec.md §2.4): label-smoothed cross-entropy minus its constant minimum,
plus the output z-loss z_loss_factor * logsumexp(logits)^2. Tokens labelled -100 (prompt, padding) are ignored.
The head runs over chunks of target tokens; each chunk is checkpointed, so its fp32 logits live only while
that chunk is computed (in forward, and again in backward).
"""

import math

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def token_losses(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                 z_loss_factor: float = 0.0) -> torch.Tensor:
    """Per-row loss for fp32 logits [N, V] and targets [N]."""
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(-1, targets[:, None]).squeeze(-1)
    loss = nll
    if label_smoothing > 0:
        vocab = logits.shape[-1]
        confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        others = vocab * lse - logits.sum(dim=-1) - nll  # sum over non-target classes of -log p
        # Subtracting the entropy of the smoothed target makes a perfect prediction score 0, as T5X does.
        minimum = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
        loss = confidence * nll + low * others - minimum
    if z_loss_factor > 0:
        loss = loss + z_loss_factor * lse.square()
    return loss


def _chunk_loss_sum(hidden, weight, targets, label_smoothing, z_loss_factor):
    logits = (hidden @ weight.t()).float()
    return token_losses(logits, targets, label_smoothing, z_loss_factor).sum()


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
    total = hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum()  # keeps the graph when empty
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss_sum, hidden[start:end], head_weight, targets[start:end],
                                   label_smoothing, z_loss_factor, use_reentrant=False)
    denominator = num_items if num_items is not None else max(targets.numel(), 1)
    return total / denominator
