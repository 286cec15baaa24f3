"""Resolve what the inference scripts are asked to run: a checkpoint directory or a preset, its tokenizer, a dtype.

Every problem a user can cause (a path that is not a checkpoint, a tokenizer from another model) becomes an
InferenceError with one clear message; the scripts print it and exit with status 2. Checkpoints load with the
strict loader of `train.py --load_checkpoint`: weights that do not match the model exactly are a CheckpointError,
which the scripts report the same way.
"""

from pathlib import Path

import torch
from transformers import AutoConfig

from ..model import PRESETS, OpenMoeConfig, OpenMoeForCausalLM
from ..model.convert import load_any_checkpoint


class InferenceError(Exception):
    """A problem with the user's inputs, reported as a single line."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


def is_preset(spec: str) -> bool:
    """A bare preset name that is not also the name of an existing path."""
    return spec in PRESETS and not Path(spec).exists()


def resolve_dtype(name: str, config=None) -> torch.dtype:
    """"auto" means the dtype the checkpoint was saved in (float32 for a preset)."""
    if name == "auto":
        saved = getattr(config, "dtype", None) if config is not None else None
        if isinstance(saved, torch.dtype):
            return saved
        return DTYPES.get(str(saved).removeprefix("torch."), torch.float32)
    if name not in DTYPES:
        raise InferenceError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


def checkpoint_config(path: str | Path) -> OpenMoeConfig:
    """Read and validate the config of a checkpoint directory written by save_pretrained."""
    path = Path(path)
    if not path.exists():
        presets = ", ".join(PRESETS)
        raise InferenceError(f"checkpoint {str(path)!r} does not exist (and it is not a preset name: {presets}); "
                             "train one with `python train.py`, or pass --model tiny for a random smoke run")
    if not path.is_dir():
        raise InferenceError(f"{path} is a file, not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise InferenceError(f"{path} is not a checkpoint directory: it has no config.json "
                             "(expected a directory written by save_pretrained)")
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise InferenceError(f"{path} is not a checkpoint directory: it has a config.json but no weights "
                             "(*.safetensors or *.bin files)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as err:
        raise InferenceError(f"{path}/config.json is not an OpenMoE config: {err}") from None
    if config.model_type != "openmoe":
        raise InferenceError(f"{path} holds a {config.model_type!r} model, not an OpenMoE one")
    return config


def model_config(spec: str) -> OpenMoeConfig:
    return OpenMoeConfig.from_preset(spec) if is_preset(spec) else checkpoint_config(spec)


def load_model(spec: str, dtype: str = "auto", device: str = "cpu", seed: int = 0):
    """A checkpoint directory, or a preset name for a randomly initialised model (seeded, for smoke runs)."""
    config = model_config(spec)
    torch_dtype = resolve_dtype(dtype, config)
    if is_preset(spec):
        torch.manual_seed(seed)
        with torch.device(device):
            model = OpenMoeForCausalLM._from_config(config, dtype=torch_dtype)
    else:
        model = load_any_checkpoint(spec, dtype=torch_dtype, device_map=device)
    return model.eval()


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InferenceError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N (a GPU index)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InferenceError(f"--device {name} was asked for, but no CUDA device is available: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InferenceError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible "
                                 f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return name


def load_tokenizer_for(model_spec: str, tokenizer_path: str | None, vocab_size: int):
    """--tokenizer if given (a directory, a sentencepiece .model or a hub name), else the tokenizer saved in the
    checkpoint directory, else the bundled one. It must follow the OpenMoE special ids (pad = bos = 0, eos = 1)
    and have no more tokens than the model has embeddings."""
    from ..data import DataError, load_tokenizer

    if tokenizer_path is None and not is_preset(model_spec):
        if any((Path(model_spec) / name).is_file() for name in TOKENIZER_FILES):
            tokenizer_path = model_spec
    try:
        return load_tokenizer(tokenizer_path, vocab_size=vocab_size)
    except DataError as err:
        raise InferenceError(f"{err} (model: {model_spec})") from None
