"""moe_system: training and inference for OpenMoE-family Mixture-of-Experts language models."""

from . import quiet  # noqa: F401  (first: it filters dependency notices emitted while they are imported)

__version__ = "0.1.0"
