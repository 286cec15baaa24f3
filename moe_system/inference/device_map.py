"""Device maps for loading an OpenMoE checkpoint over GPUs, CPU memory and a disk offload folder (accelerate).

Three ways to get a map: accelerate's automatic one under --max_memory limits, which never splits a decoder
layer (the model's _no_split_modules); an expert-aware one, which keeps every dense part (embeddings, attention,
norms, dense and extra MLPs, routers, LM head) on the fastest devices and puts the stacked experts of each MoE
layer in what is left, since a token uses only top-k of them; or an explicit JSON file {module: device}.
Devices are GPU indices (0, 1, ...), "cpu" or "disk"; weights on "cpu" or "disk" are brought to the first GPU
(or the CPU, on a machine without one) for each forward.
"""

import json
import warnings
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import (check_device_map, compute_module_sizes, convert_file_size_to_int,
                              get_balanced_memory, get_max_memory, infer_auto_device_map)
from transformers import AutoModelForCausalLM

from ..model.convert import load_pretrained_strict
from .expert_offload import fetch_only_chosen_experts
from .loading import InferenceError

STRATEGIES = ("balanced", "sequential")


def parse_max_memory(text: str) -> dict:
    """"0=38GiB,1=38GiB,cpu=1000000" -> {0: "38GiB", 1: "38GiB", "cpu": 1000000}."""
    limits = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise InferenceError(f"--max_memory entry {item!r} is not DEVICE=SIZE (e.g. 0=38GiB or cpu=50GiB)")
        key = key.removeprefix("cuda:")
        if key.isdigit():
            key = int(key)
            if key >= torch.cuda.device_count():
                raise InferenceError(f"--max_memory names GPU {key}, but {torch.cuda.device_count()} GPU(s) "
                                     "are visible")
        elif key != "cpu":
            raise InferenceError(f"--max_memory device {key!r} is not a GPU index or 'cpu' (the disk takes "
                                 "whatever is left)")
        if value.isdigit():
            value = int(value)  # bytes; accelerate reads a bare number only as an int
        try:
            convert_file_size_to_int(value)
        except ValueError:
            raise InferenceError(f"--max_memory size {value!r} is not a size like 38GiB, 500MB or 1000000") from None
        limits[key] = value
    if not limits:
        raise InferenceError("--max_memory is empty")
    return limits


def empty_model(config):
    """The model's modules with weights on the meta device: sizes and names without allocating anything."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def device_order(max_memory: dict) -> list:
    """Fastest first: GPUs by index, then CPU memory, then the disk (unlimited)."""
    gpus = sorted(k for k in max_memory if isinstance(k, int))
    return gpus + (["cpu"] if "cpu" in max_memory else []) + ["disk"]


def auto_device_map(model, max_memory: dict | None, dtype: torch.dtype, strategy: str = "balanced") -> dict:
    """accelerate's map: GPUs first, then CPU, then disk, whole decoder layers only."""
    no_split = list(model._no_split_modules)
    max_memory = dict(max_memory) if max_memory is not None else get_max_memory()
    if strategy == "balanced" and sum(isinstance(k, int) for k in max_memory) > 1:
        max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split, dtype=dtype)
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def placement_units(model) -> list[tuple[str, bool]]:
    """(map key, is_experts) in model order: dense layers whole; MoE layers by part, their experts a unit of their
    own. The router weight sits on the MoE module beside the experts, so it is keyed by its parameter name."""
    units = [("model.embed_tokens", False), ("model.rotary_emb", False)]
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        if not layer.is_moe:
            units.append((prefix, False))
            continue
        units += [(f"{prefix}.{name}", False) for name, _ in layer.named_children() if name != "mlp"]
        units += [(f"{prefix}.mlp.{name}", False) for name, _ in layer.mlp.named_parameters(recurse=False)]
        units.append((f"{prefix}.mlp.experts", True))
    return units + [("model.norm", False), ("lm_head", False)]


def expert_aware_device_map(model, max_memory: dict | None, dtype: torch.dtype) -> dict:
    """Dense units fill the devices fastest first (first fit); the experts of each MoE layer then take what is
    left, in the same order, so the GPUs hold every dense weight before they hold any expert."""
    max_memory = dict(max_memory) if max_memory is not None else get_max_memory()
    sizes = compute_module_sizes(model, dtype=dtype)
    order = device_order(max_memory)
    room = {d: float("inf") if d == "disk" else convert_file_size_to_int(max_memory[d]) for d in order}
    units = placement_units(model)
    # Weights execute on the GPUs, or on the CPU when there is none; what is kept elsewhere is copied onto the
    # first of them for its forward, so like accelerate's own map, leave room there for the largest unit.
    executing = [d for d in order if isinstance(d, int)] or [d for d in order if d == "cpu"]
    if executing and sizes[""] > sum(room[d] for d in executing):
        room[executing[0]] -= max(sizes[name] for name, _ in units)
    placed = {}
    for experts_pass in (False, True):
        for name, is_experts in units:
            if is_experts == experts_pass:
                device = next(d for d in order if sizes[name] <= room[d])
                room[device] -= sizes[name]
                placed[name] = device
    return {name: placed[name] for name, _ in units}


def read_device_map(path: str, model) -> dict:
    """An explicit map from a JSON file {module or parameter name: GPU index | "cpu" | "disk"}."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as err:
        raise InferenceError(f"cannot read --device_map file {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise InferenceError(f"--device_map file {path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise InferenceError(f"--device_map file {path} must hold a non-empty JSON object {{module: device}}")
    device_map = {}
    for name, device in raw.items():
        if isinstance(device, str) and device.removeprefix("cuda:").isdigit():
            device = int(device.removeprefix("cuda:"))
        if not (device in ("cpu", "disk") or isinstance(device, int) and not isinstance(device, bool)):
            raise InferenceError(f"--device_map: {name!r} -> {device!r} is not a GPU index, 'cpu' or 'disk'")
        if isinstance(device, int) and device >= torch.cuda.device_count():
            raise InferenceError(f"--device_map puts {name!r} on GPU {device}, but {torch.cuda.device_count()} "
                                 "GPU(s) are visible")
        device_map[name] = device
    known = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    unknown = [name for name in device_map if name and name not in known]
    if unknown:
        raise InferenceError(f"--device_map names what the model does not have: {', '.join(unknown[:5])}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_device_map(model, device_map)
    except ValueError as err:
        raise InferenceError(f"--device_map file {path}: {err}") from None
    return device_map


def planned_bytes(model, device_map: dict, dtype: torch.dtype) -> dict:
    """Weight bytes the map puts on each device."""
    sizes = compute_module_sizes(model, dtype=dtype)
    per_device = {}
    for name, device in device_map.items():
        per_device[device] = per_device.get(device, 0) + sizes[name]
    return per_device


def device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def load_dispatched(path: str, device_map: dict, dtype: torch.dtype, offload_folder: str):
    """Load the checkpoint straight into the map: nothing is materialised outside the devices it names, and
    disk-mapped weights stay in the checkpoint's safetensors (or in offload_folder when converted).

    Strictly, as `train.py --load_checkpoint` does: the tensor names and shapes in the safetensors headers are
    checked against the model built on the meta device before any weight is read."""
    with warnings.catch_warnings():
        # Router weights are keyed by parameter name, which accelerate's check warns about but supports.
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        model = load_pretrained_strict(path, device_map=device_map, offload_folder=offload_folder, dtype=dtype)
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if name.endswith(".mlp.experts") and hook is not None:
            # Experts may run on another device than their layer: hand the rows back where they came from.
            hook.io_same_device = True
    fetch_only_chosen_experts(model)
    return model.eval()
