"""The OpenMoE model family, registered with Hugging Face Auto classes under model_type "openmoe"."""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import PRESETS, OpenMoeConfig
from .modeling import OpenMoeDecoderLayer, OpenMoeForCausalLM, OpenMoeModel, OpenMoePreTrainedModel

AutoConfig.register("openmoe", OpenMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(OpenMoeConfig, OpenMoeForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "OpenMoeConfig", "OpenMoeForCausalLM", "OpenMoeModel", "OpenMoePreTrainedModel",
           "OpenMoeDecoderLayer"]
