"""Runs the cross-entropy kernel under Triton's interpreter beside the torch path; saves both sides' results.

    TRITON_INTERPRET=1 python tests/workers/cross_entropy_kernel.py OUT.pt

TRITON_INTERPRET must be set before triton is first imported, so tests/test_cross_entropy_kernel.py runs this
in its own process and compares what it saves. Shapes are tiny: the interpreter runs every block op in numpy.
"""

import os
import sys

import torch

from moe_system.kernels.cross_entropy import loss_and_grad_
from moe_system.model import loss as loss_module

# (label_smoothing, z_loss_factor, gradient dtype or None): smoothing off and on, z-loss on, the 2-byte
# gradient written into the front of each fp32 row, and the loss alone (no gradient written).
CHUNK_CASES = {"plain": (0.0, 0.0, torch.float32), "zloss": (0.0, 1e-2, torch.float32),
               "smooth_zloss": (0.1, 1e-2, torch.float32), "smooth_zloss_bf16": (0.1, 1e-2, torch.bfloat16),
               "smooth_loss_only": (0.1, 0.0, None)}
TOKENS, VOCAB, BLOCK = 6, 300, 128  # 3 blocks per row, the last one partial
HEAD_CASES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def chunk_results() -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(TOKENS, VOCAB, generator=g) * 3
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    targets[[1, 4]] = loss_module.IGNORE_INDEX
    out = {"targets": targets}
    for name, (ls, zf, grad_dtype) in CHUNK_CASES.items():
        confidence, low, minimum = loss_module._smoothing_constants(ls, VOCAB)
        ref_loss, ref_grad = loss_module._chunk_loss_and_grad(logits.clone(), targets, ls, zf, grad_dtype is not None)
        loss, grad = loss_and_grad_(logits.clone(), targets, confidence=confidence, low=low, minimum=minimum,
                                    z_loss_factor=zf, ignore_index=loss_module.IGNORE_INDEX, grad_dtype=grad_dtype,
                                    block=BLOCK)
        out[name] = {"loss": loss, "grad": grad, "ref_loss": ref_loss, "ref_grad": ref_grad}
    return out


def head_results() -> dict:
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 16, generator=g)
    weight = torch.randn(VOCAB, 16, generator=g) * 0.3
    labels = torch.randint(0, VOCAB, (2, 7), generator=g)
    labels[0, :3] = loss_module.IGNORE_INDEX  # a masked prompt
    out = {}
    for name, dtype in HEAD_CASES.items():
        for path in ("triton", "torch"):
            os.environ["MOE_LOSS_KERNEL"] = path
            h = hidden.to(dtype).clone().requires_grad_()
            w = weight.to(dtype).clone().requires_grad_()
            # 4-token chunks: 3 full chunks and a partial one; num_items as data-parallel training passes it
            loss = loss_module.chunked_lm_loss(h, w, labels, label_smoothing=0.1, z_loss_factor=1e-2,
                                               chunk_tokens=4, num_items=torch.tensor(20))
            loss.backward()
            out[f"{name}_{path}"] = {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad}
    return out


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1: the kernels run on CPU tensors"
    torch.save({"chunk": chunk_results(), "head": head_results()}, sys.argv[1])
