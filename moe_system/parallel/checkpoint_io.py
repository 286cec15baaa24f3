"""Checkpoint IO for OpenMoE layouts, on Colossal-AI's MoECheckpointIO.

Model: `booster.save_model(model, dir, shard=True)` writes one Hugging Face-format checkpoint whatever the
layout: every expert tensor is gathered over its EP group into the canonical [E, ...] order (expert e of the
file is expert e of the single-device model), each pipeline stage writes its own shards, and rank 0 writes
the merged index and config.json. Loading slices each rank's experts out of the canonical tensors, so a
checkpoint saved with ep=2 loads into ep=4 or into `OpenMoeForCausalLM.from_pretrained` on one process.
Upstream (checkpoint_io/moe_checkpoint.py:116-247) writes each EP rank's local [E/ep, ...] stack under the
same key, so the merged index keeps one rank's experts only; its load (inherited from
hybrid_parallel_checkpoint_io.py) copies full tensors into local slices.

Experts re-placed by load rebalancing (rebalance.py) are put back in canonical order on save and sliced by the
current placement on load.

Optimizer: each rank saves its own optimizer state (ZeRO shards, fp32 masters' moments) plus the layout it
was saved under and the expert placement, and loading requires the same layout (the placement is restored). This replaces moe_checkpoint.py:369-515/516-623,
which key expert states by a parameter id shared by all EP ranks (our experts are one stacked tensor per
layer, so one rank's states would overwrite the others') and call `.cuda()` (moe_checkpoint.py:284, 697, 787).
"""

import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
from colossalai.checkpoint_io import MoECheckpointIO
from colossalai.checkpoint_io.index_file import CheckpointIndexFile
from colossalai.checkpoint_io.utils import (
    StateDictSharder,
    get_model_base_filenames,
    load_shard_state_dict,
    save_state_dict,
    save_state_dict_shards,
)
from colossalai.interface import ModelWrapper, OptimizerWrapper
from colossalai.tensor.moe_tensor.api import is_moe_tensor

from ..model.convert import CheckpointError
from .rebalance import EXPERT_WEIGHTS, apply_placement, current_placement, expert_parallel_layers

OPTIMIZER_LAYOUT_FILE = "layout.json"
PLACEMENT_FILE = "expert_placement.json"


def _numpy_array_globals() -> list:
    """What numpy arrays pickle through: RNG states saved before they were stored as tensors hold one."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def save_state(state, path) -> None:
    """torch.save through a Python file: a full disk then raises OSError(ENOSPC), where torch's own writer
    reports only '[enforce fail at inline_container.cc]'."""
    with open(path, "wb") as f:
        torch.save(state, f)


def safe_load(path):
    """torch.load of tensors and plain containers only (numbers, strings, lists, dicts, numpy arrays): a
    checkpoint from elsewhere cannot run code while it is read."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"refused to load {path}: it holds Python objects other than tensors and plain "
                              f"containers, and reading it could run code ({str(error).splitlines()[-1][:200]}); "
                              f"resume only from checkpoints saved by moe_system") from None


def _ep_group_of(param):
    return getattr(param, "ep_group", None)


def placements(model: torch.nn.Module) -> dict[str, list[int]]:
    """{MoE layer name: slot of each canonical expert} of every re-placed layer."""
    return {name: module.expert_slot.tolist() for name, module in model.named_modules()
            if getattr(module, "expert_slot", None) is not None}


def expert_slots(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{expert parameter name: slot of each canonical expert} for layers whose experts were re-placed."""
    return {f"{name}.experts.{weight}": torch.tensor(slots) for name, slots in placements(model).items()
            for weight in EXPERT_WEIGHTS}


def canonical_state_dict(model: torch.nn.Module) -> OrderedDict:
    """This stage's state dict with every expert tensor gathered over its EP group into canonical order.

    Collective over each EP group: every rank of the stage must call it.
    """
    expert_params = {name: p for name, p in model.named_parameters() if is_moe_tensor(p)}
    slots = expert_slots(model)
    state = OrderedDict()
    for name, tensor in model.state_dict().items():
        param = expert_params.get(name)
        group = _ep_group_of(param) if param is not None else None
        tensor = tensor.detach()
        if group is not None and dist.get_world_size(group) > 1:
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts, dim=0)  # EP rank j holds slots [j*E_local, (j+1)*E_local)
            if name in slots:  # physical slots -> canonical experts
                tensor = tensor[slots[name].to(tensor.device)]
        state[name] = tensor.cpu()
    return state


def _shards(state: OrderedDict, size_per_shard: int):
    sharder = StateDictSharder(size_per_shard)
    for name, tensor in state.items():
        block, size = sharder.append_param(name, tensor)
        if block is not None:
            yield block, size
    yield sharder.current_block, sharder.current_block_size


class OpenMoeCheckpointIO(MoECheckpointIO):
    def __init__(self, global_dp_group, pp_group, tp_group, sp_group, ep_group, moe_dp_group, zero_stage: int):
        super().__init__(global_dp_group, pp_group, tp_group, sp_group, ep_group, moe_dp_group, zero_stage,
                         verbose=False)
        self.zero_stage = zero_stage

    def _layout_record(self) -> dict:
        return {"world": dist.get_world_size(), "pp": self.pp_size, "ep": self.ep_size, "moe_dp": self.moe_dp_size,
                "zero_stage": self.zero_stage}

    # ---------------------------------------------------------------- model
    def save_sharded_model(self, model: ModelWrapper, checkpoint: str, gather_dtensor: bool = True,
                           prefix: str | None = None, size_per_shard: int = 1024, use_safetensors: bool = False,
                           use_async: bool = False) -> None:
        assert isinstance(model, ModelWrapper), "boost the model before saving it"
        model = model.unwrap()
        state = canonical_state_dict(model)
        writer = self.moe_dp_rank == 0 and self.ep_rank == 0 and self.tp_rank == 0 and self.sp_rank == 0
        if writer or dist.get_rank() == 0:  # every rank that writes here creates it (rank 0 writes the index)
            os.makedirs(checkpoint, exist_ok=True)
        weights_name, index_name = get_model_base_filenames(prefix, use_safetensors)
        if self.pp_size > 1:
            stage = f"-stage-{self.pp_rank + 1:05d}"
            weights_name = weights_name.replace(".bin", f"{stage}.bin").replace(".safetensors", f"{stage}.safetensors")
        stage_index = CheckpointIndexFile(checkpoint)
        save_state_dict_shards(_shards(state, size_per_shard), checkpoint, stage_index, weights_name,
                               is_master=writer, use_safetensors=use_safetensors, use_pp_format=self.pp_size > 1)
        # Every stage writer reports its weight map to rank 0 (the first stage's writer), which merges them.
        # total_size in bytes, as Hugging Face indexes have it (Colossal-AI's own writer puts megabytes there).
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        report = {"total_size": nbytes, "weight_map": dict(stage_index.weight_map)} if writer else None
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, report)
        if dist.get_rank() == 0:
            index = CheckpointIndexFile(checkpoint)
            index.append_meta_data("total_size", sum(r["total_size"] for r in reports if r))
            for r in reports:
                for key, filename in (r or {}).get("weight_map", {}).items():
                    index.append_weight_map(key, filename)
            index.write_index_file(index_name)
            model.config.save_pretrained(checkpoint)  # from_pretrained needs config.json next to the shards
        dist.barrier()

    def save_unsharded_model(self, model: ModelWrapper, checkpoint: str, gather_dtensor: bool,
                             use_safetensors: bool, use_async: bool = False) -> None:
        """One file with the whole model in canonical order (upstream hangs with ep > 1, moe_checkpoint.py:686)."""
        model = model.unwrap()
        state = canonical_state_dict(model)
        if self.pp_size > 1:  # every stage's canonical state to the first stage
            stages = [None] * self.pp_size
            dist.all_gather_object(stages, state, group=self.pp_group)
            state = OrderedDict((k, v) for stage in stages for k, v in stage.items())
        if dist.get_rank() == 0:
            save_state_dict(state, checkpoint, use_safetensors)
        dist.barrier()

    def _load_canonical(self, model: torch.nn.Module, read) -> None:
        """Copy canonical tensors into this rank's parameters, slicing experts by EP rank."""
        missing = []
        slots = expert_slots(model)
        with torch.no_grad():
            for name, param in model.state_dict(keep_vars=True).items():  # parameters and persistent buffers
                tensor = read(name)
                if tensor is None:
                    missing.append(name)
                    continue
                group = _ep_group_of(param) if is_moe_tensor(param) else None
                if group is not None and dist.get_world_size(group) > 1:
                    local = param.shape[0]
                    first = dist.get_rank(group) * local
                    if name in slots:  # the canonical experts that sit in this rank's slots
                        tensor = tensor[torch.argsort(slots[name])[first:first + local]]
                    else:
                        tensor = tensor[first:first + local]
                if tensor.shape != param.shape:
                    raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit "
                                     f"{tuple(param.shape)}")
                param.copy_(tensor.to(param.dtype))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} parameter(s) of this model, e.g. {missing[:3]}")

    def load_sharded_model(self, model: ModelWrapper, checkpoint_index_file: Path, strict: bool = False,
                           low_cpu_mem_mode: bool = True, num_threads: int = 1) -> None:
        assert isinstance(model, ModelWrapper), "boost the model before loading into it"
        index = CheckpointIndexFile.from_file(checkpoint_index_file)
        use_safetensors = "safetensors" in Path(checkpoint_index_file).name
        loaded: dict[str, dict] = {}

        def read(name):
            filename = index.weight_map.get(name)
            if filename is None:
                return None
            if filename not in loaded:
                loaded[filename] = load_shard_state_dict(Path(index.root_path) / filename, use_safetensors)
            return loaded[filename][name]

        self._load_canonical(model.unwrap(), read)
        model.update_master_params()

    def load_unsharded_model(self, model: ModelWrapper, checkpoint: str, strict: bool = True,
                             low_cpu_mem_mode: bool = True, num_threads: int = 1) -> None:
        if str(checkpoint).endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(checkpoint)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self._load_canonical(model.unwrap(), state.get)
        model.update_master_params()

    # ---------------------------------------------------------------- optimizer
    def save_sharded_optimizer(self, optimizer: OptimizerWrapper, checkpoint: str, gather_dtensor: bool = True,
                               prefix: str | None = None, size_per_shard: int = 1024, use_async: bool = False):
        assert isinstance(optimizer, OptimizerWrapper), "boost the optimizer before saving it"
        rank = dist.get_rank()
        # Per-rank states follow the physical expert placement (rebalance.py); record it to restore it on load.
        stage_placements = [None] * dist.get_world_size()
        dist.all_gather_object(stage_placements, placements(optimizer.model.unwrap()))
        os.makedirs(checkpoint, exist_ok=True)  # by every rank: each writes its own file here
        if rank == 0:
            with open(os.path.join(checkpoint, OPTIMIZER_LAYOUT_FILE), "w") as f:
                json.dump(self._layout_record(), f)
            with open(os.path.join(checkpoint, PLACEMENT_FILE), "w") as f:
                json.dump({k: v for stage in stage_placements for k, v in stage.items()}, f)
        dist.barrier()
        # The fp32 master weights too: the model checkpoint holds bf16/fp16 working weights, and resuming from
        # those alone would round every master weight.
        masters = [p.detach().cpu() for group in optimizer.optim.param_groups for p in group["params"]]
        state = {"optim": optimizer.optim.state_dict(), "masters": masters}
        mixin = getattr(optimizer, "mixed_precision_mixin", None) or getattr(optimizer, "mixed_precision", None)
        if mixin is not None and hasattr(mixin, "grad_scaler"):
            state["grad_scaler"] = mixin.grad_scaler.state_dict()
        save_state(state, os.path.join(checkpoint, f"rank{rank:05d}.pt"))
        dist.barrier()

    def load_sharded_optimizer(self, optimizer: OptimizerWrapper, checkpoint_index_file, prefix: str = "",
                               low_cpu_mem_mode: bool = True, num_threads: int = 1):
        directory = Path(checkpoint_index_file)
        directory = directory if directory.is_dir() else directory.parent
        with open(directory / OPTIMIZER_LAYOUT_FILE) as f:
            saved = json.load(f)
        if saved != self._layout_record():
            raise CheckpointError(
                f"optimizer state was saved under layout {saved}, this run is {self._layout_record()}; resume "
                f"with the same layout, or start a new run from the weights alone with --load_checkpoint "
                f"{directory.parent / 'model'} (model weights load into any layout)")
        self._restore_placement(optimizer.model.unwrap(), directory / PLACEMENT_FILE)
        state = safe_load(directory / f"rank{dist.get_rank():05d}.pt")
        optimizer.optim.load_state_dict(state["optim"])
        with torch.no_grad():  # call after booster.load_model, which resets masters from the working weights
            masters = [p for group in optimizer.optim.param_groups for p in group["params"]]
            for master, saved in zip(masters, state["masters"], strict=True):
                master.copy_(saved)
        mixin = getattr(optimizer, "mixed_precision_mixin", None) or getattr(optimizer, "mixed_precision", None)
        if "grad_scaler" in state and mixin is not None and hasattr(mixin, "grad_scaler"):
            mixin.grad_scaler.load_state_dict(state["grad_scaler"])

    @staticmethod
    def _restore_placement(model: torch.nn.Module, path: Path) -> None:
        """Move the working experts (loaded in this run's placement) to the placement the optimizer state was
        saved in; the masters and states then load as saved."""
        saved = json.loads(path.read_text()) if path.is_file() else {}
        names = {id(module): name for name, module in model.named_modules()}
        for _, layer in expert_parallel_layers(model):
            target = saved.get(names[id(layer)], list(range(layer.num_experts)))
            if target != current_placement(layer):
                apply_placement(layer, target)

    def load_optimizer(self, optimizer: OptimizerWrapper, checkpoint: str, prefix: str = None,
                       low_cpu_mem_mode: bool = True, num_threads: int = 1):
        # Ours is a directory with layout.json. Upstream's formats are not read: their loaders unpickle with
        # torch.load's defaults (checkpoint_io/moe_checkpoint.py:566, utils.py:685), which a caller may loosen.
        if not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_LAYOUT_FILE)):
            raise CheckpointError(f"{checkpoint} is not an optimizer state saved by moe_system (no "
                                  f"{OPTIMIZER_LAYOUT_FILE}); start from the weights alone with --load_checkpoint")
        return self.load_sharded_optimizer(optimizer, checkpoint)

    def save_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        if self.coordinator.is_master():
            save_state(lr_scheduler.state_dict(), checkpoint)

    def load_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        lr_scheduler.load_state_dict(safe_load(checkpoint))

    def save_unsharded_optimizer(self, optimizer, checkpoint, gather_dtensor, use_async: bool = False):
        raise NotImplementedError("save the optimizer with shard=True (one file per rank, any layout)")


__all__ = ["OpenMoeCheckpointIO", "canonical_state_dict", "safe_load", "save_state"]
