"""moe_system: training and inference for OpenMoE-family Mixture-of-Experts language models."""

__version__ = "0.1.0"
