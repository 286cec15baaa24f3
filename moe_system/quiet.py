"""Silence start-up notices from dependencies about optional extras this project never uses.

Imported by moe_system/__init__.py, so it runs before anything imports colossalai or bitsandbytes. Each filter
names one message and the module that emits it; every other warning still reaches the user.
"""

import logging
import warnings

# colossalai imports these optional kernels eagerly and warns when they are absent. We never save asynchronously
# (tensornvme) and our RMSNorm is our own module, not colossalai's apex-fused one.
warnings.filterwarnings("ignore", message="Please install the latest tensornvme", category=UserWarning,
                        module=r"colossalai\.utils\.safetensors")
warnings.filterwarnings("ignore", message=r"Please install apex from source .* fused RMSNorm kernel",
                        category=UserWarning, module=r"colossalai\.shardformer\.layer\.normalization")


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with a given text."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# bitsandbytes (imported through peft) looks for a 4-bit CPU matmul kernel at import; we never quantise to 4 bit.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
