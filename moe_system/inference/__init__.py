"""Text generation with OpenMoE models: one device (infer.py) or spread over GPUs, CPU and disk
(infer_multi_device.py)."""

from .chat import format_chat, parse_chat
from .generate import Completion, Generator, SamplingSettings
from .loading import InferenceError, load_model, load_tokenizer_for
from .device_map import auto_device_map, expert_aware_device_map, load_dispatched, parse_max_memory

__all__ = ["format_chat", "parse_chat", "Completion", "Generator", "SamplingSettings", "InferenceError",
           "load_model", "load_tokenizer_for", "auto_device_map", "expert_aware_device_map",
           "load_dispatched", "parse_max_memory"]
