"""Triton kernels for the GPU paths torch has no fast kernel for.

Every kernel here also runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, read when triton is
first imported): that is how the tests check them against the reference paths on a machine without a GPU.
"""

import importlib.util
import os

import torch


def triton_usable(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on this tensor's device: CUDA with triton installed, or CPU under the
    interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    if tensor.device.type == "cuda":
        return True
    return tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
