"""Dynamic expert load rebalancing (`--load_balance`): move experts between EP ranks by measured load.

Every `--load_balance_interval` steps, after the optimizer step:
1. each MoE layer's routed-token counts since the last rebalance (moe/load.py) are summed over the EP group and
   then the expert-DP group, so every rank of the stage sees the same global load;
2. every rank runs the same deterministic placement search (moe/expert_placement.py);
3. each moved expert travels with everything that belongs to it: the working weights, and for each of them the
   optimizer's fp32 master and every per-element state (Adam's exp_avg and exp_avg_sq). Adam's `step` is one
   count per tensor, equal for all experts, so it stays. Under ZeRO the master and states are flat shards over
   the expert-DP group: they are gathered into this rank's [E_local, ...] experts, exchanged, and re-sharded.
   One all_to_all_single per tensor over the existing EP group moves exactly the experts that change rank;
   no process group is created.
4. the layer's `expert_slot` table is updated, so routing sends expert e's tokens to its new home.

The gate is not permuted: the router keeps producing canonical expert ids and only the table changes, so no
gate row and none of its optimizer state moves, and the model computes bit-for-bit the same function
(tests/workers/dist_rebalance.py checks identical losses and parameters against a run without rebalancing). The
reference instead swapped gate rows and their Adam moments, and under ep_zero swapped single scalars of the
flat ZeRO shards instead of experts (docs/moe.md, Expert load rebalancing).
"""

import torch
import torch.distributed as dist

from ..moe.expert_parallel import AllToAllDispatch
from ..moe.layer import OpenMoeSparseMLP
from ..moe.load import ExpertLoadMeter, global_counts, load_stats
from ..moe.expert_placement import balanced_placement, imbalance, moved_experts, rank_loads

EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")


def current_placement(layer) -> list[int]:
    return list(range(layer.num_experts)) if layer.expert_slot is None else layer.expert_slot.tolist()


def expert_parallel_layers(model) -> list[tuple[int, OpenMoeSparseMLP]]:
    """(index among the model's MoE layers, layer) of every layer of this pipeline stage whose experts are spread
    over ranks (a pipeline stage releases the weights of the layers it does not hold)."""
    return [(i, layer) for i, layer in enumerate(model.moe_layers())
            if isinstance(layer.dispatcher, AllToAllDispatch) and layer.dispatcher.ep_size > 1
            and layer.experts.wo is not None]


def move_experts(local: torch.Tensor, old: list[int], new: list[int], group) -> torch.Tensor:
    """local [E_local, ...]: this rank's experts in their old slots -> its experts under the new placement.

    old/new: slot of each canonical expert. Rank r sends to rank d the experts that d holds under `new` and r
    held under `old`, in the order of d's new slots; an all-to-all moves them all at once."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    per_rank = len(old) // ep
    expert_at = [0] * len(new)
    for expert, slot in enumerate(new):
        expert_at[slot] = expert
    send_rows, send_splits, recv_slots, recv_splits = [], [], [], []
    for peer in range(ep):
        rows = [old[e] - rank * per_rank for e in expert_at[peer * per_rank:(peer + 1) * per_rank]
                if old[e] // per_rank == rank]
        send_rows += rows
        send_splits.append(len(rows))
        slots = [j for j in range(per_rank) if old[expert_at[rank * per_rank + j]] // per_rank == peer]
        recv_slots += slots
        recv_splits.append(len(slots))
    flat = local.reshape(per_rank, -1)
    received = flat.new_empty(flat.shape)
    index = torch.tensor(send_rows, device=flat.device, dtype=torch.long)
    dist.all_to_all_single(received, flat[index].contiguous(), recv_splits, send_splits, group=group)
    out = torch.empty_like(flat)
    out[torch.tensor(recv_slots, device=flat.device, dtype=torch.long)] = received
    return out.view(local.shape)


class _ExpertTensor:
    """One tensor that holds (part of) this rank's experts of a parameter: the working weight, a master, or an
    optimizer state. ZeRO keeps masters and states as this rank's 1/n flat shard of the padded parameter."""

    def __init__(self, tensor: torch.Tensor, shape: torch.Size, shard_group=None, padding: int = 0):
        self.tensor, self.shape, self.group, self.padding = tensor, shape, shard_group, padding

    def gather(self) -> torch.Tensor:
        if self.group is None:
            return self.tensor.view(self.shape)
        parts = [torch.empty_like(self.tensor) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, self.tensor.contiguous(), group=self.group)
        return torch.cat(parts)[:self.shape.numel()].view(self.shape)

    def write(self, full: torch.Tensor) -> None:
        if self.group is None:
            self.tensor.copy_(full.view(self.tensor.shape))
            return
        flat = torch.nn.functional.pad(full.reshape(-1), [0, self.padding])
        self.tensor.copy_(flat.chunk(dist.get_world_size(self.group))[dist.get_rank(self.group)])


def _master_of(optimizer, param):
    """(master tensor, ZeRO shard group or None, padding), or None when this rank's optimizer does not hold param
    (a layer of another pipeline stage)."""
    working_to_master = optimizer.get_working_to_master_map() if optimizer is not None else None
    if working_to_master is None:  # fp32 ZeRO-0: the optimizer updates the working weights themselves
        held = optimizer is not None and any(p is param for g in optimizer.optim.param_groups for p in g["params"])
        return (param, None, 0) if held else None
    master = working_to_master.get(id(param))
    if master is None:
        return None
    if hasattr(optimizer, "param_to_pg"):  # ZeRO-1/2: flat shards over the parameter's process group
        return master, optimizer.param_to_pg[param], optimizer.get_param_padding_size(param)
    return master, None, 0


def expert_tensors(optimizer, param) -> list[_ExpertTensor]:
    """Everything that must move with param's experts: the working weight, its master and per-element states."""
    tensors = [_ExpertTensor(param.data, param.shape)]
    found = _master_of(optimizer, param)
    if found is None:
        return tensors
    master, group, padding = found
    if master.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():  # not a view of the weight
        tensors.append(_ExpertTensor(master.data, param.shape, group, padding))
    for name, value in optimizer.optim.state.get(master, {}).items():
        if not torch.is_tensor(value) or value.numel() == 1:
            continue  # per-tensor scalars (Adam's step) are the same for every expert
        if value.shape != master.shape:
            raise RuntimeError(f"optimizer state {name!r} of shape {tuple(value.shape)} does not follow its "
                               f"parameter {tuple(master.shape)}; expert rebalancing cannot move it")
        tensors.append(_ExpertTensor(value, param.shape, group, padding))
    return tensors


@torch.no_grad()
def apply_placement(layer: OpenMoeSparseMLP, new: list[int], optimizer=None) -> None:
    """Move layer's experts (and, given the boosted optimizer, their masters and optimizer states) to `new`."""
    old = current_placement(layer)
    if new == old:
        return
    if sorted(new) != list(range(layer.num_experts)):
        raise ValueError(f"placement {new} is not a permutation of {layer.num_experts} slots")
    for name in EXPERT_WEIGHTS:
        for tensor in expert_tensors(optimizer, getattr(layer.experts, name)):
            tensor.write(move_experts(tensor.gather(), old, new, layer.dispatcher.ep_group))
    layer.expert_slot = torch.tensor(new, dtype=torch.long, device=layer.gate_weight.device)


class ExpertRebalancer:
    """Measures load between rebalancing points and re-places experts of every expert-parallel MoE layer."""

    def __init__(self, model, optimizer, ep_group, expert_dp_group, pp_group=None):
        assert ep_group is not None and dist.get_world_size(ep_group) > 1, "build_plugin refuses this layout"
        self.layers = expert_parallel_layers(model)  # this pipeline stage's
        self.optimizer, self.groups, self.pp_group = optimizer, [ep_group, expert_dp_group], pp_group
        self.meter = ExpertLoadMeter([layer for _, layer in self.layers])

    def held(self, layer) -> bool:
        return _master_of(self.optimizer, layer.experts.wo) is not None

    def rebalance(self, placements: dict[int, list[int]] | None = None) -> dict:
        """Re-place the experts from the load since the last call (or to the given {moe layer index: placement},
        for tests); returns the metrics: per layer, expert shares, dropped fraction, rank loads before and after."""
        counts = global_counts(self.meter.counts(), self.groups).cpu()
        dropped = global_counts(self.meter.dropped(), self.groups).cpu()
        metrics = {}
        for (index, layer), load, lost in zip(self.layers, counts, dropped):
            if not self.held(layer) or (placements is None and load.sum() == 0):
                continue
            old = current_placement(layer)
            new = placements[index] if placements is not None else balanced_placement(load.tolist(), old, layer.dispatcher.ep_size)
            prefix = f"rebalance/layer{index}"
            metrics.update(load_stats(prefix, load, lost))
            for when, placement in (("before", old), ("after", new)):
                metrics[f"{prefix}/rank_imbalance_{when}"] = imbalance(load.tolist(), placement, layer.dispatcher.ep_size)
                total = max(float(load.sum()), 1.0)
                for rank, share in enumerate(rank_loads(load.tolist(), placement, layer.dispatcher.ep_size)):
                    metrics[f"{prefix}/rank{rank}_{when}"] = share / total
            metrics[f"{prefix}/moved_experts"] = moved_experts(old, new, layer.experts.num_experts)
            apply_placement(layer, new, self.optimizer)
        self.meter.reset()
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:  # every stage's layers, for the log
            stages = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(stages, metrics, group=self.pp_group)
            metrics = {k: v for stage in stages for k, v in stage.items()}
        return metrics

    def maybe_rebalance(self, step: int, every: int, last_step: int, progress) -> None:
        """Every `every` steps but the last: re-place, log the metrics and print the new placement."""
        if step % every or step >= last_step:
            return
        report = self.rebalance()
        progress.logger.log(step, report)
        if report:
            progress.write(f"step {step}: experts re-placed by load\n" + format_rebalance(report))


def format_rebalance(metrics: dict) -> str:
    """One console line per layer: rank imbalance before -> after and how many experts moved."""
    lines = []
    for key in sorted(k for k in metrics if k.endswith("/rank_imbalance_before")):
        prefix = key[:-len("/rank_imbalance_before")]
        lines.append(f"  {prefix.split('/')[-1]}: rank load max/mean {metrics[key]:.3f} -> "
                     f"{metrics[prefix + '/rank_imbalance_after']:.3f}, {metrics[prefix + '/moved_experts']} "
                     f"expert(s) moved, expert max/mean {metrics[prefix + '/imbalance']:.2f}")
    return "\n".join(lines)
