"""This rank's share of the OpenMoE model: built on the meta device, cut there, materialised on the rank's device.

Built whole on the host, every rank held and initialised the full fp32 model and dropped most of it while
boosting (~47 GB of host memory per rank at 8B, ~185 GB at 34B). Here the model is first built on the meta
device (shapes only) and cut to what the rank holds:

* its experts: num_experts / ep consecutive experts of every MoE layer, from ep_rank * num_experts / ep (the
  EP layer finds them already sliced and keeps them, moe/expert_parallel.py);
* with a pipeline, what its stage holds (policy.stage_modules, the same list the shardformer policy hands to
  Colossal-AI); the other modules' tensors are dropped as shardformer drops them, never materialised.

Only then are the tensors allocated, on the rank's device, and initialised there, one module at a time in fp32
and then cast to the training precision (so the device never holds the rank's share in fp32 and bf16 at once).

Initialisation does not depend on the layout: a dense tensor draws from a generator seeded by (seed, its name),
and expert e of layer i draws its rows of wi_gate, wi_up and wo from a generator seeded by (seed, i, e). So EP
rank r initialises its experts exactly as a single process initialises those rows, and a pipeline stage its
layers exactly as the whole model does. The distributions are the model's own (OpenMoePreTrainedModel.
_init_weights, OpenMoeSparseMLP.reset_parameters). Random streams differ between device types (CPU, CUDA), so
the weights are the same for every layout on one kind of device, not between kinds.
"""

import hashlib
from itertools import chain

import torch
import torch.distributed as dist
from colossalai.accelerator import get_accelerator
from colossalai.shardformer.shard.utils import set_tensors_to_none

from ..model import OpenMoeConfig, OpenMoeForCausalLM
from ..moe.experts import GroupedExperts
from ..moe.layer import OpenMoeSparseMLP
from .policy import stage_layer_range, stage_modules


def tensor_seed(seed: int, *key) -> int:
    """A seed for one tensor or expert, from the run's seed and a stable key: the same in every process (Python's
    hash() of a string is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *key))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: manual_seed takes a signed 64-bit value


def keyed_generator(device: torch.device, seed: int, *key) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(tensor_seed(seed, *key))


def keep_experts(experts: GroupedExperts, first: int, count: int) -> None:
    """Keep experts [first, first + count) of a meta-device GroupedExperts (a meta slice costs nothing)."""
    for name in ("wi_gate", "wi_up", "wo"):
        setattr(experts, name, torch.nn.Parameter(getattr(experts, name)[first:first + count]))
    experts.num_experts = count


def own_tensor(module: torch.nn.Module) -> torch.Tensor | None:
    return next(chain(module.parameters(recurse=False), module.buffers(recurse=False)), None)


def initialise(model: OpenMoeForCausalLM, name: str, module: torch.nn.Module, seed: int, first_expert: int) -> None:
    """Initialise the module `name` of a rank model, each tensor (or expert) from its own keyed generator."""
    device = own_tensor(module).device
    if isinstance(module, OpenMoeSparseMLP):
        layer = int(name.split(".")[-2])  # model.layers.{i}.mlp
        experts = range(first_expert, first_expert + module.experts.num_experts)
        module.reset_parameters(keyed_generator(device, seed, f"{name}.gate_weight"),
                                [keyed_generator(device, seed, "expert", layer, e) for e in experts])
    else:  # Linear, Embedding, RMSNorm (one tensor each: weight) and the rotary table (computed, not drawn)
        model._init_weights(module, generator=keyed_generator(device, seed, f"{name}.weight"))


def build_rank_model(config: OpenMoeConfig, *, seed: int, ep_rank: int = 0, ep_size: int = 1,
                     layers: tuple[int, int] | None = None, first: bool = True, last: bool = True,
                     device="cpu", dtype: torch.dtype = torch.float32) -> OpenMoeForCausalLM:
    """The model one rank holds, materialised on `device` and initialised from `seed`: its experts (EP rank
    ep_rank of ep_size), decoder layers [start, end) = `layers` (default: all), the embedding if `first`, the
    final norm and the head if `last`. Modules it does not hold keep no tensors (None), as after shardformer.
    Initialised in fp32, then cast to `dtype` (bf16/fp16: the fp32 canonical values rounded, as casting the fp32
    model would give). On device="meta" nothing is allocated or initialised (sizes only)."""
    if ep_size < 1 or config.num_experts % ep_size or not 0 <= ep_rank < ep_size:
        raise ValueError(f"EP rank {ep_rank} of {ep_size} cannot hold an equal share of {config.num_experts} experts")
    start, end = layers if layers is not None else (0, config.num_hidden_layers)
    with torch.device("meta"):
        model = OpenMoeForCausalLM(config)
    local = config.num_experts // ep_size
    for layer in model.moe_layers():
        keep_experts(layer.experts, ep_rank * local, local)
    set_tensors_to_none(model, exclude=set(stage_modules(model, start, end, first, last)))
    device = torch.device(device)
    # Module by module, so that only one module's tensors ever exist in fp32 and in `dtype` at once. Only the
    # tensors left are allocated: this rank's. An MoE layer initialises its experts (GroupedExperts) itself.
    for name, module in model.named_modules():
        if own_tensor(module) is None or isinstance(module, GroupedExperts):
            continue
        module.to_empty(device=device, recurse=isinstance(module, OpenMoeSparseMLP))
        if device.type != "meta":
            with torch.no_grad():
                initialise(model, name, module, seed, ep_rank * local)
        module.to(dtype)
    return model


def build_for_plugin(config: OpenMoeConfig, plugin, seed: int) -> OpenMoeForCausalLM:
    """build_rank_model for this process: its EP rank and pipeline stage as the plugin's shardformer policy will
    see them (the EP group it slices experts over, the stage manager it splits layers with), on the accelerator,
    in the training precision (the module wrapper would cast it to that dtype next)."""
    group = plugin.shard_config.ep_group
    ep_rank, ep_size = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    stages = plugin.stage_manager
    if stages is None:
        layers, first, last = None, True, True
    else:
        layers = stage_layer_range(stages, config.num_hidden_layers)
        first, last = stages.is_first_stage(), stages.is_last_stage()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plugin.precision, torch.float32)
    return build_rank_model(config, seed=seed, ep_rank=ep_rank, ep_size=ep_size, layers=layers, first=first,
                            last=last, device=get_accelerator().get_current_device(), dtype=dtype)
