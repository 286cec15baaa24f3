"""This rank's share of the OpenMoE model: built on the meta device, cut there, materialised on the rank's device.

Built whole on the host, every rank held and initialised the full fp32 model and dropped most of it while
boosting (~47 GB of host memory per rank at 8B, ~185 GB at 34B). Here the model is first built on the meta
device (shapes only) and cut to what the rank holds:

* its experts: num_experts / ep consecutive experts of every MoE layer, from ep_rank * num_experts / ep (the
  EP layer finds them already sliced and keeps them, moe/expert_parallel.py);
* with a pipeline, what its stage holds (policy.stage_modules, the same list the shardformer policy hands to
  Colossal-AI); the other modules' tensors are dropped as shardformer drops them, never materialised.

Only then are the tensors allocated, on the rank's device, and initialised there.

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


def initialise(model: OpenMoeForCausalLM, seed: int, first_expert: int) -> None:
    """Initialise every materialised tensor of a rank model with its own keyed generator (module note)."""
    for name, module in model.named_modules():
        if isinstance(module, OpenMoeSparseMLP):
            if module.gate_weight is None:  # a layer of another pipeline stage
                continue
            layer = int(name.split(".")[-2])  # model.layers.{i}.mlp
            device = module.gate_weight.device
            experts = range(first_expert, first_expert + module.experts.num_experts)
            module.reset_parameters(keyed_generator(device, seed, f"{name}.gate_weight"),
                                    [keyed_generator(device, seed, "expert", layer, e) for e in experts])
        elif not isinstance(module, GroupedExperts):  # an MoE layer's experts are drawn by the layer, above
            # Linear, Embedding, RMSNorm (one tensor each: weight) and the rotary table (computed, not drawn).
            tensor = next(chain(module.parameters(recurse=False), module.buffers(recurse=False)), None)
            if tensor is not None:
                model._init_weights(module, generator=keyed_generator(tensor.device, seed, f"{name}.weight"))


def build_rank_model(config: OpenMoeConfig, *, seed: int, ep_rank: int = 0, ep_size: int = 1,
                     layers: tuple[int, int] | None = None, first: bool = True, last: bool = True,
                     device="cpu") -> OpenMoeForCausalLM:
    """The model one rank holds, materialised on `device` and initialised from `seed`: its experts (EP rank
    ep_rank of ep_size), decoder layers [start, end) = `layers` (default: all), the embedding if `first`, the
    final norm and the head if `last`. Modules it does not hold keep no tensors (None), as after shardformer.
    On device="meta" nothing is allocated or initialised (sizes only)."""
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
    model.to_empty(device=device)  # allocates only the tensors left: this rank's
    if device.type != "meta":
        with torch.no_grad():
            initialise(model, seed, ep_rank * local)
    return model


def build_for_plugin(config: OpenMoeConfig, plugin, seed: int) -> OpenMoeForCausalLM:
    """build_rank_model for this process: its EP rank and pipeline stage as the plugin's shardformer policy will
    see them (the EP group it slices experts over, the stage manager it splits layers with), on the accelerator."""
    group = plugin.shard_config.ep_group
    ep_rank, ep_size = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    stages = plugin.stage_manager
    if stages is None:
        layers, first, last = None, True, True
    else:
        layers = stage_layer_range(stages, config.num_hidden_layers)
        first, last = stages.is_first_stage(), stages.is_last_stage()
    return build_rank_model(config, seed=seed, ep_rank=ep_rank, ep_size=ep_size, layers=layers, first=first,
                            last=last, device=get_accelerator().get_current_device())
