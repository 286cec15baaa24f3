"""The per-token loss of model/loss.py and its gradient over fp32 logits, in two passes over each row.

One program per row (token). Pass 1 reads the row once and keeps, per lane, a running max, the sum of exp(x -
max) rescaled as the max grows, and (label smoothing only) the sum of the logits; together they give logsumexp
and the loss. Pass 2 reads the row again and writes d(loss)/d(logits) over it, in the dtype the next GEMMs take:
an fp32 gradient replaces each logit; a 2-byte one (bf16/fp16) goes into the first half of the row's own bytes,
so the gradient is a [n, V] view with row stride 2V inside the logits' buffer and nothing else is allocated.
The torch path (model/loss.py, _chunk_loss_and_grad) reads and writes the same buffer some 54-66 bytes per
logit; this one reads 8 and writes 2-4 (docs/model.md, Loss).
"""

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # logits per program per step: 16 per thread at 8 warps


@triton.jit
def _loss_and_grad_kernel(logits_ptr, grad_ptr, targets_ptr, loss_ptr, logits_stride, grad_stride,
                          confidence, low, minimum, z_loss_factor, ignore_index,
                          n_cols: tl.constexpr, SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr,
                          BLOCK: tl.constexpr):
    # n_cols is a constant: one compile per vocabulary, and the interpreter (numpy 2) loops only to constants.
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    target = tl.maximum(target, 0)  # any class for ignored rows (as torch's clamp): weighted 0 below
    cols = tl.arange(0, BLOCK)

    # Pass 1: per-lane online max and sum of exponentials; lanes past the row's end hold -inf and add 0.
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    logit_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = start + cols < n_cols
        x = tl.load(logits_row + start + cols, mask=mask, other=float("-inf"))
        new_max = tl.maximum(run_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with nothing yet: exp(-inf) = 0, not nan
        run_sum = run_sum * tl.exp(run_max - shift) + tl.exp(x - shift)
        run_max = new_max
        if SMOOTHING:
            logit_sum += tl.where(mask, x, 0.0)
    row_max = tl.max(run_max, axis=0)
    lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))

    nll = lse - tl.load(logits_row + target)
    loss = confidence * nll - minimum
    if SMOOTHING:  # sum over the non-target classes of -log p, each weighted low
        loss += low * (n_cols * lse - tl.sum(logit_sum, axis=0) - nll)
    loss += z_loss_factor * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))

    if WRITE_GRAD:
        # (confidence - low + low*V + 2*zf*lse) * softmax - (confidence - low) * onehot - low; 0 on ignored rows
        scale = tl.where(valid, confidence - low + low * n_cols + 2 * z_loss_factor * lse, 0.0)
        on_target = tl.where(valid, confidence - low, 0.0)
        off_target = tl.where(valid, low, 0.0)
        grad_row = grad_ptr + row * grad_stride
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(logits_row + offs, mask=mask, other=0.0)
            grad = scale * tl.exp(x - lse) - tl.where(offs == target, on_target, 0.0) - off_target
            # A 2-byte gradient of step k lands on the fp32 logits [k*BLOCK/2, (k+1)*BLOCK/2): in step 0 on logits
            # that other threads have just loaded, later on logits of earlier steps. Every thread has read its
            # logits of this step (and so of all before) once past the barrier; later steps read further right.
            tl.debug_barrier()
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def loss_and_grad_(logits: torch.Tensor, targets: torch.Tensor, *, confidence: float, low: float, minimum: float,
                   z_loss_factor: float, ignore_index: int, grad_dtype: torch.dtype | None,
                   block: int | None = None):
    """Per-token loss [n] (fp32, 0 where targets == ignore_index) of contiguous fp32 logits [n, V] and, with
    grad_dtype, d(loss)/d(logits) in that dtype written over the logits (their values are lost). The constants
    are model/loss.py's (_smoothing_constants); block: logits per step (a power of two; tests use small ones)."""
    n, vocab = logits.shape
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError(f"expected contiguous fp32 logits, got {logits.dtype} with strides {logits.stride()}")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = None
    if grad_dtype is not None:
        # fp32: the logits themselves; 2 bytes: the front half of each row's bytes (row stride 2V elements)
        grad = logits if grad_dtype == torch.float32 else logits.view(grad_dtype)[:, :vocab]
    if n == 0:
        return loss, grad
    block = block or min(MAX_BLOCK, triton.next_power_of_2(vocab))
    _loss_and_grad_kernel[(n,)](
        logits, logits if grad is None else grad, targets, loss, logits.stride(0),
        0 if grad is None else grad.stride(0), float(confidence), float(low), float(minimum), float(z_loss_factor),
        ignore_index, n_cols=vocab, SMOOTHING=bool(low), WRITE_GRAD=grad is not None, BLOCK=block, num_warps=8)
    return loss, grad
