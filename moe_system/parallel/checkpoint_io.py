"""Checkpoint IO for OpenMoE layouts, on Colossal-AI's MoECheckpointIO.

Model: `booster.save_model(model, dir, shard=True)` writes one Hugging Face-format checkpoint whatever the
layout: every expert tensor is gathered over its EP group into the canonical [E, ...] order (expert e of the
file is expert e of the single-device model), each pipeline stage writes its own shards, and rank 0 writes
the merged index and config.json. Loading slices each rank's experts out of the canonical tensors, so a
checkpoint saved with ep=2 loads into ep=4 or into `OpenMoeForCausalLM.from_pretrained` on one process.
Both stream: tensors travel to the stage's writer one at a time (experts in bounded pieces), and a load reads
only the rank's own tensors and expert rows, so no rank holds more than its share plus what is in flight.
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
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from colossalai.checkpoint_io import MoECheckpointIO
from colossalai.checkpoint_io.index_file import CheckpointIndexFile
from colossalai.checkpoint_io.utils import (
    StateDictSharder,
    get_model_base_filenames,
    save_state_dict,
    save_state_dict_shards,
)
from colossalai.interface import ModelWrapper, OptimizerWrapper
from colossalai.tensor.moe_tensor.api import is_moe_tensor

from safetensors import safe_open

from ..model.convert import CheckpointError, check_weights, convert_once, expected_shapes, listing, ours_or_converted
from .comm import comm_device
from .rebalance import EXPERT_WEIGHTS, apply_placement, current_placement, expert_parallel_layers

OPTIMIZER_LAYOUT_FILE = "layout.json"
PLACEMENT_FILE = "expert_placement.json"
# The most one piece of an expert gather puts on the communication device (the receiving rank holds ep pieces).
GATHER_BUCKET_BYTES = 1 << 30


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


def canonical_tensors(model: torch.nn.Module, to_all: bool = False):
    """(name, tensor) of this stage in canonical order, one tensor at a time, on the host.

    Expert tensors are gathered over their EP group to its first rank (to_all: to every rank of the group), in
    pieces of at most GATHER_BUCKET_BYTES on the communication device; a rank that receives nothing yields
    nothing, so it never holds more than its piece in flight. Collective over each EP group: every rank of the
    group must run the generator to the end.
    """
    expert_params = {name: p for name, p in model.named_parameters() if is_moe_tensor(p)}
    slots = expert_slots(model)
    for name, tensor in model.state_dict().items():
        param = expert_params.get(name)
        group = _ep_group_of(param) if param is not None else None
        tensor = tensor.detach()
        if group is None or dist.get_world_size(group) == 1:
            if to_all or group is None or dist.get_rank(group) == 0:
                yield name, tensor.cpu()
            continue
        full = _gather_experts(tensor, group, slots.get(name), to_all)
        if full is not None:
            yield name, full


def _gather_experts(local: torch.Tensor, group, slots: torch.Tensor | None, to_all: bool) -> torch.Tensor | None:
    """The [E, ...] canonical tensor from each EP rank's [E/ep, ...] slots, on the host of the group's first rank
    (every rank with to_all; None elsewhere). EP rank j holds physical slots [j*E_local, (j+1)*E_local); a
    re-placed layer's slot p holds canonical expert argsort(slots)[p]."""
    ep, receives = dist.get_world_size(group), to_all or dist.get_rank(group) == 0
    num_local = local.shape[0]
    canonical_of_slot = torch.argsort(slots) if slots is not None else torch.arange(ep * num_local)
    full = torch.empty((ep * num_local, *local.shape[1:]), dtype=local.dtype) if receives else None
    rows = max(1, GATHER_BUCKET_BYTES // max(1, local[:1].numel() * local.element_size() * ep))
    first = dist.get_global_rank(group, 0)
    for start in range(0, num_local, rows):
        piece = local[start:start + rows].contiguous().to(comm_device())
        parts = [torch.empty_like(piece) for _ in range(ep)] if receives else None
        if to_all:
            dist.all_gather(parts, piece, group=group)
        else:
            dist.gather(piece, parts, dst=first, group=group)
        if receives:
            for j, part in enumerate(parts):
                slots_here = torch.arange(j * num_local + start, j * num_local + start + part.shape[0])
                full.index_copy_(0, canonical_of_slot[slots_here], part.cpu())
        del piece, parts
    return full


def canonical_state_dict(model: torch.nn.Module) -> OrderedDict:
    """This stage's whole state dict in canonical order, on every rank of the stage (for tests and one-file
    saves; checkpoints stream through canonical_tensors instead). Collective over each EP group."""
    return OrderedDict(canonical_tensors(model, to_all=True))


def _shards(tensors, size_per_shard: int):
    """Shards of at most size_per_shard MB from (name, tensor) pairs, in their order (Colossal-AI's sharding)."""
    sharder = StateDictSharder(size_per_shard)
    for name, tensor in tensors:
        block, size = sharder.append_param(name, tensor)
        if block is not None:
            yield block, size
    yield sharder.current_block, sharder.current_block_size


class WeightFile:
    """One weight file, read tensor by tensor: safetensors slices (nothing is read until one is indexed), or the
    tensors of a memory-mapped .bin (a pickle, loaded with weights_only)."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (named by {what}); copy the whole checkpoint directory again")
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as f:
                    self.names, self._state = set(f.keys()), None
            else:
                self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self.names = set(self._state)
        except Exception as err:
            raise CheckpointError(f"cannot read weights from {path}: {err} (a damaged or partly copied file: copy "
                                  f"or save the checkpoint again)") from None

    @contextmanager
    def tensor(self, name: str):
        """name's slice. A safetensors file is opened for each read: the file pages read count as this process's
        resident memory while they are mapped, so only the piece being copied is."""
        if name not in self.names:
            raise CheckpointError(f"{self.path} does not hold {name}, which {self.what} places there; copy or save "
                                  f"the checkpoint again")
        if self._state is not None:
            yield self._state[name]
            return
        with safe_open(self.path, framework="pt") as f:
            yield f.get_slice(name)


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
        # Expert data-parallel replicas hold the same experts: the first replica's EP group gathers them to its
        # first rank, the stage's writer, one tensor (or bucket) at a time; the writer holds one shard at most.
        gathers = self.moe_dp_rank == 0 and self.tp_rank == 0 and self.sp_rank == 0
        writer = gathers and self.ep_rank == 0
        if writer or dist.get_rank() == 0:  # every rank that writes here creates it (rank 0 writes the index)
            os.makedirs(checkpoint, exist_ok=True)
        nbytes = 0

        def counted(tensors):
            nonlocal nbytes
            for name, tensor in tensors:
                nbytes += tensor.numel() * tensor.element_size()
                yield name, tensor

        weights_name, index_name = get_model_base_filenames(prefix, use_safetensors)
        if self.pp_size > 1:
            stage = f"-stage-{self.pp_rank + 1:05d}"
            weights_name = weights_name.replace(".bin", f"{stage}.bin").replace(".safetensors", f"{stage}.safetensors")
        stage_index = CheckpointIndexFile(checkpoint)
        tensors = counted(canonical_tensors(model)) if gathers else ()
        save_state_dict_shards(_shards(tensors, size_per_shard), checkpoint, stage_index, weights_name,
                               is_master=writer, use_safetensors=use_safetensors, use_pp_format=self.pp_size > 1)
        # Every stage writer reports its weight map to rank 0 (the first stage's writer), which merges them.
        # total_size in bytes, as Hugging Face indexes have it (Colossal-AI's own writer puts megabytes there).
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
        state = OrderedDict(canonical_tensors(model))  # whole on each stage's first EP rank, empty elsewhere
        if self.pp_size > 1:  # every stage's canonical state to the first stage
            stages = [None] * self.pp_size
            dist.all_gather_object(stages, state, group=self.pp_group)
            state = OrderedDict((k, v) for stage in stages for k, v in stage.items())
        if dist.get_rank() == 0:
            save_state_dict(state, checkpoint, use_safetensors)
        dist.barrier()

    def _load_canonical(self, model: torch.nn.Module, files: dict[str, Path], what: str) -> None:
        """Copy canonical tensors into this rank's parameters and persistent buffers, reading only what the rank
        holds: its experts' rows (by EP rank and current placement) and its stage's dense tensors, one tensor (or
        expert row) at a time, straight to the parameter's device. files: {tensor name: file holding it}."""
        targets = model.state_dict(keep_vars=True)
        missing = [name for name in targets if name not in files]
        if missing:
            raise CheckpointError(f"{what} lacks {len(missing)} tensor(s) of this model: {listing(missing)}; it "
                                  f"was saved for another model, or is incomplete: save or copy it again")
        by_file: dict[Path, list[str]] = {}
        for name in targets:
            by_file.setdefault(files[name], []).append(name)
        slots = expert_slots(model)
        with torch.no_grad():
            for path, names in by_file.items():
                weights = WeightFile(path, what)
                for name in names:
                    self._load_tensor(name, targets[name], weights, slots.get(name))
                del weights  # a .bin: unmapped before the next file

    @staticmethod
    def _load_tensor(name: str, param: torch.Tensor, weights: WeightFile, slots: torch.Tensor | None) -> None:
        group = _ep_group_of(param) if is_moe_tensor(param) else None
        ep = dist.get_world_size(group) if group is not None else 1
        expected = (param.shape[0] * ep, *param.shape[1:]) if ep > 1 else tuple(param.shape)
        with weights.tensor(name) as source:
            shape = tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)
            if shape != expected:
                raise CheckpointError(f"{name} in {weights.path} has shape {shape}, this model needs {expected}: the "
                                      f"checkpoint is of another model; load a checkpoint of this one")
            if ep == 1:
                param.copy_(source[:].to(param.device, param.dtype))
                return
        first = dist.get_rank(group) * param.shape[0]
        canonical = torch.arange(expected[0]) if slots is None else torch.argsort(slots)
        for row, expert in enumerate(canonical[first:first + param.shape[0]].tolist()):
            with weights.tensor(name) as source:  # one expert's rows mapped at a time
                param[row].copy_(source[expert:expert + 1][0].to(param.device, param.dtype))

    def load_sharded_model(self, model: ModelWrapper, checkpoint_index_file: Path, strict: bool = False,
                           low_cpu_mem_mode: bool = True, num_threads: int = 1) -> None:
        assert isinstance(model, ModelWrapper), "boost the model before loading into it"
        index = CheckpointIndexFile.from_file(checkpoint_index_file)
        root = Path(index.root_path)
        self._load_canonical(model.unwrap(), {name: root / file for name, file in index.weight_map.items()},
                             str(checkpoint_index_file))
        model.update_master_params()

    def load_unsharded_model(self, model: ModelWrapper, checkpoint: str, strict: bool = True,
                             low_cpu_mem_mode: bool = True, num_threads: int = 1) -> None:
        names = WeightFile(Path(checkpoint), checkpoint).names
        self._load_canonical(model.unwrap(), dict.fromkeys(names, Path(checkpoint)), checkpoint)
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


def load_pretrained_weights(booster, model: ModelWrapper, path) -> None:
    """--load_checkpoint, after boosting: the weights of a checkpoint in any layout, each rank reading only its
    own slices through booster.load_model (which also refreshes ZeRO's masters). A released layout is converted
    once per node, by LOCAL_RANK 0 while the others wait, into conversion_dir(path), or reused from there.
    Strict: the checkpoint's tensor names and shapes must be exactly this model's (checked from the headers)."""
    problem = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            convert_once(path)
        except CheckpointError as error:
            problem = str(error)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)  # also the barrier: nobody reads before its node's conversion
    problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(problem)
    converted = ours_or_converted(path)
    check_weights(converted, expected_shapes(model.unwrap().config))
    booster.load_model(model, str(converted))


__all__ = ["OpenMoeCheckpointIO", "canonical_state_dict", "load_pretrained_weights", "safe_load", "save_state"]
