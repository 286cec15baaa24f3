"""Convert released OpenMoE checkpoints into our Hugging Face format, and load our checkpoints strictly.

Source layouts (docs/model.md, Released checkpoints):
- "colossal": hpcai-tech/openmoe-{base,8b}, read by the Colossal-AI example as a LlamaConfig plus OpenMoE fields.
- "orion": OrionZheng/openmoe-*, the OpenMoE team's release for remote code: "model_type": "llama" plus an
  "auto_map" naming modeling_openmoe.OpenMoeForCausalLM.
- "t5x": the original JAX parameters, as one flat .npz keyed by T5X paths (see read_t5x_npz for why .npz).

Both PyTorch releases were written by `save_pretrained` of the Colossal-AI `OpenMoeForCausalLM`
(convert_openmoe_ckpt.py), whose tensor names and shapes we kept. So for them, what changes is everything
around the tensors: the config format, .bin pickles instead of safetensors, shard indexes and dtype. The rotary
sin/cos tables are not in those files: the Colossal-AI model holds them as plain attributes and the later fork
(64bc50b4b) as non-persistent buffers, so state_dict() never saw them; if a file ever has them, they are reported
as unexpected rather than silently dropped. T5X differs in names and in the orientation of dense kernels.

Conversion is strict. Every source tensor must be used and every tensor of our model produced with the right
shape, or a CheckpointError lists all the problems, found from the headers before any weight is read. Then each
tensor is read, converted and written into its shard on its own, so memory holds one tensor, not the model. The
output is written into a temporary directory beside the destination and renamed into place when complete, so a
failed conversion leaves no destination behind.
"""

import argparse
import copy
import errno
import json
import os
import shutil
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open

from .config import PRESETS, OpenMoeConfig
from .modeling import OpenMoeForCausalLM

SOURCES = ("auto", "colossal", "orion", "t5x")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# (index, single file) pairs in from_pretrained's order of preference: safetensors first when a repository ships
# both. Transformers <= 4.34, which wrote the released checkpoints, saved .bin pickles by default.
WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin"))
# safetensors' codes for the dtypes a checkpoint may hold
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# Only the sentencepiece model travels with the weights: released tokenizer configs may point at remote code.
SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")
# Written last into every conversion (before it is renamed into place): the source it came from, with its files'
# sizes. --load_checkpoint reuses a conversion only when this matches its source.
CONVERTED_MARKER = "converted_from.json"
LISTED = 20  # names shown per kind of problem; the count says how many more there are
T5X_EXPORT_HINT = (
    "a native T5X checkpoint (msgpack + tensorstore) needs t5x and flax to read, which we do not depend on. "
    "Export its parameters once, where t5x is installed, into a flat .npz keyed by T5X paths:\n"
    "  from t5x import checkpoints; from flax import traverse_util; import numpy as np\n"
    "  params = traverse_util.flatten_dict(checkpoints.load_t5x_checkpoint(PATH)['target'], sep='/')\n"
    "  np.savez(OUT_DIR + '/params.npz', **{k: np.asarray(v) for k, v in params.items()})\n"
    "then convert OUT_DIR with --source t5x and --preset or --config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted or loaded exactly; the message names every problem found."""


def listing(names) -> str:
    names = list(names)
    shown = ", ".join(names[:LISTED])
    return shown + (f" ... and {len(names) - LISTED} more" if len(names) > LISTED else "")


def raise_problems(what: str, missing=(), unexpected=(), mismatched=()) -> None:
    parts = [f"{len(items)} {kind}: {listing(items)}"
             for kind, items in (("missing", missing), ("unexpected", unexpected), ("with a wrong shape", mismatched))
             if items]
    if parts:
        raise CheckpointError(f"{what} does not match the model; " + "; ".join(parts))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# Configs


def released_value(raw: dict, *names, default):
    """The first of several spellings that the released configs use for one setting."""
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    return default


def config_from_released(raw: dict, where: str) -> OpenMoeConfig:
    """Our config from a released config.json: a LlamaConfig plus the OpenMoE fields of set_openmoe_args.

    Two spellings exist. The fork / OrionZheng configs (openmoe_34b_config.json at fb8c5ec40) use the
    set_openmoe_args names: router_topk, router_capacity_factor_{train,eval}, router_min_capacity,
    router_noisy_policy, router_drop_tks, plus rms_norm_eps and token ids. The Colossal-AI example configs
    (openmoe_{base,8b}_config.json, e.g. at dc003c30) have no model_type and say topk, capacity_factor_*,
    min_capacity, noisy_policy, drop_tks, gated and layer_norm_epsilon. The example ignores those and uses the
    set_openmoe_args defaults, which have the same values, so reading either spelling gives the same model.
    """
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_experts", "moe_layer_interval")
    absent = [name for name in required if raw.get(name) is None]
    if absent:
        raise CheckpointError(f"{where} lacks required OpenMoE fields: {', '.join(absent)}")
    heads = raw["num_attention_heads"]
    released_noise = released_value(raw, "router_noisy_policy", "noisy_policy", default=None)
    noise = {"none": "none", "jitter": "jitter", "gaussian": "gaussian"}.get(str(released_noise).lower())

    unsupported = []
    if raw.get("num_key_value_heads") not in (None, heads):
        unsupported.append(f"num_key_value_heads={raw['num_key_value_heads']} (we have multi-head attention only)")
    if raw.get("hidden_act") not in (None, "swiglu"):
        unsupported.append(f"hidden_act={raw['hidden_act']!r} (OpenMoE's is 'swiglu')")
    if released_value(raw, "mlp_gated", "gated", default=True) is not True:
        unsupported.append("an ungated MLP (mlp_gated / gated false)")
    if raw.get("attention_bias"):
        unsupported.append("attention_bias")
    if raw.get("rope_scaling") is not None:
        unsupported.append(f"rope_scaling={raw['rope_scaling']!r}")
    if raw.get("tie_word_embeddings"):
        unsupported.append("tie_word_embeddings (OpenMoE's embedding and LM head are separate)")
    if noise is None:
        unsupported.append(f"router noise {released_noise!r}")
    if unsupported:
        raise CheckpointError(f"{where} describes a model we cannot represent: {'; '.join(unsupported)}")
    if raw.get("rope_theta", 1e4) != 1e4:
        # The released code hard-codes the T5X timescale 1e4 (generate_fixed_pos_embedding(..., 1.0, 1e4)), so
        # that is what the weights were trained and served with, whatever the config says.
        warnings.warn(f"{where} says rope_theta={raw['rope_theta']}, but the released OpenMoE code always used "
                      "1e4; converting with 1e4")
    fields = dict(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        num_experts=raw["num_experts"], moe_layer_interval=raw["moe_layer_interval"],
        # LlamaRMSNorm reads rms_norm_eps (LlamaConfig default 1e-6); layer_norm_epsilon is never read.
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=1e4,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        router_topk=released_value(raw, "router_topk", "topk", default=2),
        capacity_factor_train=released_value(raw, "router_capacity_factor_train", "capacity_factor_train",
                                             default=1.25),
        capacity_factor_eval=released_value(raw, "router_capacity_factor_eval", "capacity_factor_eval", default=2.0),
        min_capacity=released_value(raw, "router_min_capacity", "min_capacity", default=4),
        router_noise=noise,
        dispatch="capacity" if released_value(raw, "router_drop_tks", "drop_tks", default=True) else "dropless",
    )
    # Given only when the config states them; otherwise ours apply (umT5 token ids, our loss defaults).
    optional = ("pad_token_id", "bos_token_id", "eos_token_id", "initializer_range", "router_aux_loss_factor",
                "router_z_loss_factor", "z_loss_factor", "label_smoothing")
    fields.update({name: raw[name] for name in optional if raw.get(name) is not None})
    try:
        return OpenMoeConfig(**fields)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


def resolve_config(spec) -> OpenMoeConfig:
    """An architecture for a checkpoint without one (T5X): an OpenMoeConfig, a preset name, or a config.json path
    (ours, or a released Llama-style one)."""
    if isinstance(spec, OpenMoeConfig):
        return copy.deepcopy(spec)
    if isinstance(spec, str) and spec in PRESETS and not Path(spec).exists():
        return OpenMoeConfig.from_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"config {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    raw = read_json(path)
    if raw.get("model_type") == "openmoe":
        return OpenMoeConfig.from_dict(raw)
    return config_from_released(raw, str(path))


def detect_layout(src) -> str:
    """What a directory holds: "openmoe" (ours), "colossal", "orion" or "t5x"."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a checkpoint directory")
    config_path = src / "config.json"
    if config_path.is_file():
        raw = read_json(config_path)
        if raw.get("model_type") == "openmoe":
            return "openmoe"
        if "num_experts" in raw and "moe_layer_interval" in raw:
            # The OpenMoE team's release loads through remote code, which its config names in auto_map.
            return "orion" if "auto_map" in raw else "colossal"
        raise CheckpointError(f"{config_path} is not an OpenMoE config (model_type {raw.get('model_type')!r}, "
                              "no num_experts and moe_layer_interval)")
    if any(src.glob("*.npz")):
        return "t5x"
    if (src / "checkpoint").is_file() or any(src.glob("target.*")):
        raise CheckpointError(f"{src}: {T5X_EXPORT_HINT}")
    raise CheckpointError(f"{src} holds neither a config.json nor a T5X .npz: not a checkpoint we can convert")


def checkpoint_config(path, *, source: str = "auto", t5x_config=None) -> OpenMoeConfig:
    """Our config for a checkpoint in any layout (t5x_config: the architecture of a T5X one)."""
    layout = detect_layout(path) if source == "auto" else source
    if layout == "openmoe":
        return OpenMoeConfig.from_pretrained(path)
    if layout == "t5x":
        if t5x_config is None:
            raise CheckpointError(f"{path} is a T5X checkpoint, which has no config: convert it with "
                                  f"`python -m moe_system.model.convert {path} OUT` and --preset "
                                  f"({'/'.join(p for p in PRESETS if p != 'tiny')}) or --config config.json")
        return resolve_config(t5x_config)
    if t5x_config is not None:
        raise CheckpointError(f"{path} is a {layout} checkpoint with its own config.json; "
                              "a separate config is only for T5X checkpoints")
    return config_from_released(read_json(Path(path) / "config.json"), str(Path(path) / "config.json"))


def expected_shapes(config: OpenMoeConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor our model saves for this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = OpenMoeForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
# Reading weights


def hf_weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a Hugging Face checkpoint directory, and the index's weight map when it is sharded."""
    for index_name, single_name in WEIGHT_FILES:
        index_path = directory / index_name
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path} has no weight_map")
            files = sorted({directory / name for name in weight_map.values()})
            absent = [path.name for path in files if not path.is_file()]
            if absent:
                raise CheckpointError(f"{index_path} names shard files that do not exist: {listing(absent)}")
            return files, weight_map
        if (directory / single_name).is_file():
            return [directory / single_name], None
    raise CheckpointError(f"{directory} holds no weights (no model.safetensors[.index.json] or "
                          "pytorch_model.bin[.index.json])")


class LazyWeights(Mapping):
    """A checkpoint's tensors by name, each read from disk when looked up and not kept, so that a conversion holds
    one tensor at a time. headers: each name's shape and dtype as a meta tensor, read from the file headers alone."""

    def __init__(self, headers: dict[str, torch.Tensor], read):
        self.headers, self._read = headers, read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.headers:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self):
        return iter(self.headers)

    def __len__(self) -> int:
        return len(self.headers)


def read_weight_file(path: Path, name: str | None = None):
    """The headers of a weight file ({name: meta tensor}, nothing read), or the one tensor name.

    Each read opens the file again and its tensor is a view of the file's pages: mapped pages count as this
    process's resident memory while mapped, so only the tensor in use is. A .bin is memory-mapped the same way.
    """
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                if name is not None:
                    return f.get_tensor(name)
                slices = {key: f.get_slice(key) for key in f.keys()}
                unknown = {key: s.get_dtype() for key, s in slices.items() if s.get_dtype() not in SAFETENSORS_DTYPES}
                if unknown:
                    raise CheckpointError(f"{path} holds tensors of a dtype we cannot convert: "
                                          f"{listing(f'{key} ({code})' for key, code in unknown.items())}")
                return {key: torch.empty(s.get_shape(), dtype=SAFETENSORS_DTYPES[s.get_dtype()], device="meta")
                        for key, s in slices.items()}
        # weights_only: a .bin is a pickle, and we load nothing but tensors from it.
        state = torch.load(path, map_location="meta" if name is None else "cpu", weights_only=True,
                           mmap=name is not None)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot read weights from {path}: {err} (a damaged or partly copied file: copy or "
                              "save the checkpoint again)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return state if name is None else state[name]


def read_hf_weights(directory) -> LazyWeights:
    """Every tensor of a Hugging Face checkpoint directory, read when used; the headers are read here.

    The index must agree with its shards. from_pretrained (transformers 5.23) ignores a tensor the index lists
    but no shard holds, and stops with a bare FileNotFoundError on a missing shard file.
    """
    directory = Path(directory)
    files, weight_map = hf_weight_files(directory)
    headers, file_of, misplaced = {}, {}, []
    for path in files:
        for name, meta in read_weight_file(path).items():
            if name in headers or (weight_map is not None and weight_map.get(name) != path.name):
                misplaced.append(f"{name} in {path.name}")
            headers[name], file_of[name] = meta, path
    unlisted = [f"{name} ({file})" for name, file in (weight_map or {}).items() if name not in headers]
    problems = [f"{what}: {listing(items)}" for what, items in (
        ("the index lists tensors no shard holds", unlisted),
        ("shards hold tensors their index does not place there (or twice)", misplaced)) if items]
    if problems:
        raise CheckpointError(f"{directory}: " + "; ".join(problems))
    return LazyWeights(headers, lambda name: read_weight_file(file_of[name], name))


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        # numpy has no bfloat16: an array saved from JAX's bfloat16 (ml_dtypes) reads back as 2-byte raw values.
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def npy_header(archive: zipfile.ZipFile, member: str) -> torch.Tensor:
    """The shape and dtype (as a meta tensor) of one .npy in an .npz, from its header alone."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    return torch.empty(shape, dtype=numpy_to_torch(np.empty(0, dtype)).dtype, device="meta")


def read_t5x_npz(directory) -> LazyWeights:
    """T5X parameters from the one .npz in directory, keyed by their paths ("decoder/layers_0/.../kernel"), each
    read when used; the headers are read here.

    Why .npz: a native T5X checkpoint is a msgpack tree plus tensorstore (zarr) arrays, readable only with
    t5x/flax/tensorstore, which we neither have nor want as dependencies, while numpy reads an .npz safely
    (allow_pickle=False) and the export from a native checkpoint is three lines (see T5X_EXPORT_HINT). Keys may
    keep the "target/" prefix of the full checkpoint tree.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.npz"))
    if len(files) != 1:
        found = f"{len(files)} ({listing(f.name for f in files)})" if files else f"none; {T5X_EXPORT_HINT}"
        raise CheckpointError(f"{directory}: a T5X checkpoint here is exactly one .npz of parameters, found {found}")
    try:
        with zipfile.ZipFile(files[0]) as archive:
            arrays = [(member.removesuffix(".npy"), npy_header(archive, member)) for member in archive.namelist()]
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"cannot read {files[0]}: {err}") from None
    headers, member_of = {}, {}
    for name, meta in arrays:
        key = name.removeprefix("target/")
        if key in headers:
            raise CheckpointError(f"{files[0]} holds {key} twice (with and without target/)")
        headers[key], member_of[key] = meta, name

    def read(key: str) -> torch.Tensor:
        try:
            with np.load(files[0], allow_pickle=False) as archive:
                return numpy_to_torch(archive[member_of[key]])
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {key} from {files[0]}: {err}") from None

    return LazyWeights(headers, read)


# ---------------------------------------------------------------------------------------------------------------
# Mapping tensors


class Rule(NamedTuple):
    target: str  # our name
    source: str  # the source's name
    transpose: bool = False  # flax kernels are [in, out]; torch Linear weights are [out, in]


def t5x_rules(config: OpenMoeConfig) -> list[Rule]:
    """T5X path -> our name for every tensor (docs/model.md, Released checkpoints; the reference's
    convert_openmoe_ckpt.py)."""

    def dense_ffn(ours: str, theirs: str) -> list[Rule]:
        # wi_0 is the 2I-wide gate, wi_1 the up projection, wo the down projection.
        return [Rule(ours + "gate_proj.weight", theirs + "wi_0/kernel", True),
                Rule(ours + "up_proj.weight", theirs + "wi_1/kernel", True),
                Rule(ours + "down_proj.weight", theirs + "wo/kernel", True)]

    rules = [Rule("model.embed_tokens.weight", "token_embedder/embedding")]  # [V, H] in both
    for i in range(config.num_hidden_layers):
        ours, theirs = f"model.layers.{i}.", f"decoder/layers_{i}/"
        rules.append(Rule(ours + "input_layernorm.weight", theirs + "pre_self_attention_layer_norm/scale"))
        for proj, name in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            rules.append(Rule(ours + f"self_attn.{proj}_proj.weight", theirs + f"self_attention/{name}/kernel", True))
        rules.append(Rule(ours + "post_attention_layernorm.weight", theirs + "pre_mlp_layer_norm/scale"))
        if config.is_moe_layer(i):
            rules.append(Rule(ours + "mlp.gate_weight", theirs + "mlp/router/router_weights/w/kernel", True))
            # Expert kernels are stacked [E, in, out], which is already our grouped layout: no transpose.
            for param, name in (("wi_gate", "wi_0"), ("wi_up", "wi_1"), ("wo", "wo")):
                rules.append(Rule(ours + f"mlp.experts.{param}", theirs + f"mlp/expert/{name}/kernel"))
            rules.append(Rule(ours + "pre_extra_mlp_layernorm.weight", theirs + "pre_extra_mlp_layer_norm/scale"))
            rules += dense_ffn(ours + "extra_mlp.", theirs + "extra_mlp/")
        else:
            rules += dense_ffn(ours + "mlp.", theirs + "mlp/")
    rules.append(Rule("model.norm.weight", "decoder/decoder_norm/scale"))
    rules.append(Rule("lm_head.weight", "decoder/logits_dense/kernel", True))
    return rules


def check_rules(headers: dict, rules: list[Rule], expected: dict, what: str) -> None:
    """Before any tensor is read: every source tensor used, every target produced, each with the right shape."""
    assert sorted(rule.target for rule in rules) == sorted(expected), "rules must produce exactly our tensors"
    missing = [rule.source for rule in rules if rule.source not in headers]
    unexpected = sorted(set(headers) - {rule.source for rule in rules})
    mismatched = []
    for rule in rules:
        if rule.source not in headers:
            continue
        shape, want = tuple(headers[rule.source].shape), expected[rule.target]
        want_source = want[::-1] if rule.transpose else want  # reported in the source's own orientation
        if shape != want_source:
            mismatched.append(f"{rule.source} {shape}, expected {want_source}")
    raise_problems(what, missing, unexpected, mismatched)


def read_source(src: Path, layout: str, config: OpenMoeConfig) -> tuple[LazyWeights, dict[str, Rule]]:
    """The source's tensors (read when used) and the rule producing each of our tensors, checked from headers."""
    expected = expected_shapes(config)
    if layout == "t5x":
        tensors, rules, what = read_t5x_npz(src), t5x_rules(config), f"T5X checkpoint {src}"
    else:
        # Colossal-AI and OrionZheng files already use our names and shapes (see the module docstring).
        tensors, what = read_hf_weights(src), f"{layout} checkpoint {src}"
        rules = [Rule(name, name) for name in expected]
    check_rules(tensors.headers, rules, expected, what)
    return tensors, {rule.target: rule for rule in rules}


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def output_dtype(headers: dict, dtype: torch.dtype | None) -> torch.dtype:
    """One dtype for all tensors: the requested one, else the source's own, else float32 for a mixed source."""
    if dtype is not None:
        return dtype
    found = {tensor.dtype for tensor in headers.values()}
    return found.pop() if len(found) == 1 else torch.float32


def converted_tensor(tensors: LazyWeights, rule: Rule, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensors[rule.source]
    return (tensor.t() if rule.transpose else tensor).to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Writing


def copy_sentencepiece(src: Path, dst: Path) -> None:
    for name in SENTENCEPIECE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def move_into_place(partial: Path, dst: Path) -> None:
    if dst.exists():
        # Overwriting: set the old directory aside first so that dst is never half-written.
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(partial, dst)
        shutil.rmtree(old)
    else:
        os.rename(partial, dst)


def write_safetensors(path: Path, metas: dict[str, torch.Tensor], tensor_of) -> None:
    """A safetensors file of the meta tensors' names, shapes and dtypes, laid out as safetensors' save_file lays
    it out (names sorted, header padded to 8 bytes), whose data is written one tensor_of(name) at a time: the
    header needs only the shapes, so no more than one tensor is ever held."""
    names = sorted(metas)
    header, offset = {"__metadata__": {"format": "pt"}}, 0  # from_pretrained refuses files without the format
    for name in names:
        nbytes = metas[name].numel() * metas[name].element_size()
        header[name] = {"dtype": SAFETENSORS_CODES[metas[name].dtype], "shape": list(metas[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # every tensor's data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            tensor = tensor_of(name)
            assert tensor.shape == metas[name].shape and tensor.dtype == metas[name].dtype and tensor.is_contiguous()
            f.write(tensor.reshape(-1).view(torch.uint8).numpy())
        assert f.tell() == 8 + len(encoded) + offset


def write_checkpoint(tensors: LazyWeights, rule_of: dict[str, Rule], config: OpenMoeConfig, dtype: torch.dtype,
                     src: Path, dst: Path, max_shard_size) -> None:
    """What save_pretrained writes (the same shards, index, config.json and generation_config.json), streamed:
    each tensor is read, converted and written before the next is read."""
    with torch.device("meta"):
        model = OpenMoeForCausalLM(config)
    targets = {name: torch.empty(t.shape, dtype=dtype, device="meta") for name, t in model.state_dict().items()}
    try:
        split = split_torch_state_dict_into_shards(targets, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
    except ValueError as err:
        raise CheckpointError(f"max shard size {max_shard_size!r}: {err}") from None
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        for file, names in split.filename_to_tensors.items():
            write_safetensors(partial / file, {name: targets[name] for name in names},
                              lambda name: converted_tensor(tensors, rule_of[name], dtype))
        if split.is_sharded:
            index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        model.config.save_pretrained(partial)
        if model.can_generate():
            model.generation_config.save_pretrained(partial)
        copy_sentencepiece(src, partial)
        # Read back the names and shapes written: a save that dropped or renamed a tensor fails here.
        check_weights(partial, expected_shapes(config))
        (partial / CONVERTED_MARKER).write_text(json.dumps(source_record(src)))
        move_into_place(partial, dst)
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"disk full while converting {src} into {dst.parent} (it needs about the "
                                  f"checkpoint's size, {_gib(src)} GiB); free up space there, or convert "
                                  f"elsewhere with `python -m moe_system.model.convert {src} DST` and pass "
                                  f"--load_checkpoint DST") from None
        raise


def _gib(path: Path) -> str:
    return f"{sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()) / 2 ** 30:.1f}"


def convert_checkpoint(src_dir, dst_dir, *, source: str = "auto", t5x_config=None, dtype=None,
                       max_shard_size="2GB", overwrite: bool = False) -> Path:
    """Convert a released OpenMoE checkpoint into our format at dst_dir (safetensors shards + config.json).

    source: "auto" (detect), "colossal", "orion" or "t5x". t5x_config: the architecture of a T5X checkpoint, which
    has none (an OpenMoeConfig, a preset name or a config.json path). dtype: output dtype (default: the source's).
    Raises CheckpointError, without creating dst_dir, when anything does not match.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if source not in SOURCES:
        raise CheckpointError(f"unknown source layout {source!r}; choose one of {', '.join(SOURCES)}")
    layout = detect_layout(src) if source == "auto" else source
    if layout == "openmoe":
        raise CheckpointError(f"{src} is already in our format; load it with load_pretrained_strict")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    if dst.exists() and (not dst.is_dir() or dst.resolve() == src.resolve()):
        raise CheckpointError(f"{dst} cannot be replaced: it is not a directory, or it is the source itself")
    dtype = resolve_dtype(dtype)
    config = checkpoint_config(src, source=layout, t5x_config=t5x_config)
    tensors, rule_of = read_source(src, layout, config)
    write_checkpoint(tensors, rule_of, config, output_dtype(tensors.headers, dtype), src, dst, max_shard_size)
    return dst


def source_record(src: Path) -> dict:
    """What a conversion was made from: the source directory and the size of each of its files."""
    src = Path(src).resolve()
    return {"source": str(src), "files": {p.name: p.stat().st_size for p in sorted(src.iterdir()) if p.is_file()}}


def conversion_dir(src) -> Path:
    """Where --load_checkpoint keeps the conversion of a released checkpoint: beside it, named after it."""
    src = Path(src).resolve()
    return src.with_name(f"{src.name}-openmoe")


def is_conversion_of(dst: Path, src: Path) -> bool:
    marker = dst / CONVERTED_MARKER
    return marker.is_file() and read_json(marker) == source_record(src)


def ours_or_converted(src) -> Path:
    """The directory in our format that holds src's weights: src itself, or its conversion_dir."""
    return Path(src) if detect_layout(src) == "openmoe" else conversion_dir(src)


def convert_once(src, *, source: str = "auto", t5x_config=None) -> Path:
    """ours_or_converted(src), converting a released checkpoint there first unless a complete conversion of this
    very source is already there. Processes converting at once (one per node on a shared filesystem) each write
    a private copy and rename it into place; the first wins and the others use its copy."""
    src = Path(src)
    layout = detect_layout(src) if source == "auto" else source
    if layout == "openmoe":
        return src
    dst = conversion_dir(src)
    if dst.exists():
        if is_conversion_of(dst, src):
            return dst
        raise CheckpointError(f"{dst} exists but is not a complete conversion of {src} (its {CONVERTED_MARKER} is "
                              f"missing or names another source); remove it, or convert with `python -m "
                              f"moe_system.model.convert {src} DST` and pass --load_checkpoint DST")
    private = dst.with_name(f".{dst.name}.{os.uname().nodename}-{os.getpid()}")
    try:
        convert_checkpoint(src, private, source=layout, t5x_config=t5x_config, overwrite=True)
        try:
            os.rename(private, dst)
        except OSError:
            if not is_conversion_of(dst, src):
                raise
    except PermissionError as err:
        raise CheckpointError(f"cannot write the conversion of {src} beside it ({err}); convert it before the "
                              f"launch with `python -m moe_system.model.convert {src} DST` and pass "
                              f"--load_checkpoint DST") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Strict loading


def check_weights(path: Path, expected: dict) -> None:
    found = {name: tuple(tensor.shape) for name, tensor in read_hf_weights(path).headers.items()}
    raise_problems(f"checkpoint {path}", missing=sorted(set(expected) - set(found)),
                   unexpected=sorted(set(found) - set(expected)),
                   mismatched=[f"{name} {found[name]}, expected {shape}" for name, shape in expected.items()
                               if name in found and found[name] != shape])


def load_pretrained_strict(path, config=None, **kwargs) -> OpenMoeForCausalLM:
    """OpenMoeForCausalLM.from_pretrained that accepts nothing but an exact match.

    On its own, transformers 5.23 loads a checkpoint with missing tensors (left at their random init) or
    unexpected ones and only logs a report; it ignores tensors an index lists but no shard holds, and a missing
    shard file stops it with a bare FileNotFoundError. Here each of those, and shape mismatches, is a
    CheckpointError naming the tensors or files, raised before any weight is loaded. config: our config to use
    (e.g. with training overrides); kwargs go to from_pretrained (dtype, device_map, ...).
    """
    path = Path(path)
    if config is None:
        layout = detect_layout(path)
        if layout != "openmoe":
            raise CheckpointError(f"{path} is a {layout} checkpoint, not ours: convert it first with "
                                  f"`python -m moe_system.model.convert {path} OUT_DIR`, or use load_any_checkpoint")
        config = OpenMoeConfig.from_pretrained(path)
    check_weights(path, expected_shapes(config))
    kwargs.pop("output_loading_info", None)
    model, info = OpenMoeForCausalLM.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    # A second net under the header check, in case from_pretrained itself renames or drops anything.
    raise_problems(f"checkpoint {path}", info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                   [str(item) for item in info.get("mismatched_keys", ())])
    return model


def load_any_checkpoint(path, *, source: str = "auto", t5x_config=None, **kwargs) -> OpenMoeForCausalLM:
    """Our model from a checkpoint in any supported layout, strictly. A released one is converted into a temporary
    directory first (it needs free disk space for one copy); kwargs go to load_pretrained_strict."""
    layout = detect_layout(path) if source == "auto" else source
    if layout == "openmoe":
        return load_pretrained_strict(path, **kwargs)
    with tempfile.TemporaryDirectory(prefix="openmoe-convert-") as tmp:
        converted = convert_checkpoint(path, Path(tmp) / "converted", source=layout, t5x_config=t5x_config)
        return load_pretrained_strict(converted, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_system.model.convert",
        description="Convert a released OpenMoE checkpoint (Colossal-AI hpcai-tech/openmoe-*, OrionZheng/openmoe-*, "
                    "or T5X parameters exported to .npz) into this project's Hugging Face format.")
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--source", choices=SOURCES, default="auto", help="source layout (default: detect)")
    arch = parser.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=[name for name in PRESETS if name != "tiny"],
                      help="architecture of a T5X checkpoint")
    arch.add_argument("--config", help="architecture of a T5X checkpoint: a config.json (ours or a released one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="output dtype (default: the source's)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest output shard (default: 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dst = convert_checkpoint(args.src, args.dst, source=args.source, t5x_config=args.preset or args.config,
                                 dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = OpenMoeConfig.from_pretrained(dst)
    print(f"converted {args.src} -> {dst} ({config.num_hidden_layers} layers, {config.num_experts} experts, "
          f"{config.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
