import os

import pytest

# Tests never reach a hub. The bundled tokenizer is trained once and cached (~/.cache/moe_system).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Idle OpenMP threads sleep instead of spinning: the suite starts many processes on few cores, and spinning threads
# of one process starve the others (a 2-thread run beside one busy process measured 5x slower spinning).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
