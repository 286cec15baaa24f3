"""Worker: expert rebalancing must not change training (torchrun, gloo).

Usage: torchrun --nproc_per_node N tests/workers/dist_rebalance.py OUT_DIR CASE_JSON [CASE_JSON ...]

Per case (plugin, zero, precision, ep / extra_dp_size / pp, dispatch), three runs from the same initial weights
on the same data, STEPS optimizer steps each:
  plain     no rebalancing;
  moved     experts forcibly re-placed after steps 2 and 4 (every expert changes rank the first time), then the
            placement search on the measured load after step 5; a full checkpoint is saved after step 4;
  resumed   a fresh model and optimizer (experts in canonical slots) that load that checkpoint and run steps
            5..STEPS like `moved` did.
Rank 0 writes per-step losses, canonical parameters, and what happened to the placement.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

# Run as a script: its own folder (tests/workers) is on sys.path; dist_common and moe_system are not.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]
from dist_common import make_batch, make_config, make_model, make_optimizer, routing_groups  # noqa: E402
from dist_parity import train_step  # noqa: E402

from colossalai.booster import Booster  # noqa: E402

from moe_system.parallel.checkpoint_io import canonical_state_dict  # noqa: E402
from moe_system.parallel.config import ParallelConfig  # noqa: E402
from moe_system.parallel.launch import init_distributed  # noqa: E402
from moe_system.parallel.plugin import build_plugin  # noqa: E402
from moe_system.parallel import rebalance  # noqa: E402
from moe_system.parallel.rebalance import ExpertRebalancer, current_placement  # noqa: E402

STEPS = 6
SAVE_AFTER = 4


def forced_placement(num_experts: int, ep: int, step: int) -> list[int]:
    """After step 2: expert e to the mirrored rank (every expert moves). After step 4: a fixed shuffle."""
    local = num_experts // ep
    if step == 2:
        return [((ep - 1 - e // local) * local) + (local - 1 - e % local) for e in range(num_experts)]
    return torch.randperm(num_experts, generator=torch.Generator().manual_seed(5)).tolist()


def boosted(case: dict, config):
    parallel = ParallelConfig(plugin=case["plugin"], zero_stage=case["zero"], precision=case["precision"],
                              extra_dp_size=case.get("extra_dp_size", 1), pp_size=case.get("pp", 1),
                              ep_size=case.get("ep", 1), microbatch_size=case.get("microbatch"))
    plugin, layout = build_plugin(parallel, config)
    booster = Booster(plugin=plugin)
    model = make_model(config)
    optimizer = make_optimizer(model.parameters(), "adamw")
    model, optimizer, *_ = booster.boost(model, optimizer)
    model.train()
    return plugin, layout, booster, model, optimizer


def gathered_state(plugin, layout, model) -> dict:
    stages = [None] * layout.pp
    dist.all_gather_object(stages, canonical_state_dict(model.unwrap()), group=plugin.pp_group)
    return {k: v for stage in stages for k, v in stage.items()}


def local_experts(model) -> dict:
    return {f"{i}.{name}": getattr(layer.experts, name).detach().clone()
            for i, layer in enumerate(model.unwrap().moe_layers()) for name in ("wi_gate", "wo")
            if getattr(layer.experts, name) is not None}


def run(case: dict, config, mode: str, checkpoint: str) -> dict:
    plugin, layout, booster, model, optimizer = boosted(case, config)
    if case.get("weights_only"):  # the reference's ep_zero bug: experts move, their Adam moments stay behind
        rebalance.expert_tensors = lambda optimizer, param: [rebalance._ExpertTensor(param.data, param.shape)]
    shard = routing_groups(make_batch(), layout.dp_size, None)[layout.data_parallel_rank]
    rebalancer = ExpertRebalancer(model.unwrap(), optimizer, plugin.ep_group, plugin.moe_dp_group, plugin.pp_group)
    num_experts, ep = config.num_experts, layout.ep
    losses, searched, first = [], {}, 0
    if mode == "resumed":
        booster.load_model(model, os.path.join(checkpoint, "model"))
        booster.load_optimizer(optimizer, os.path.join(checkpoint, "optimizer"))
        first = SAVE_AFTER
    for step in range(first + 1, STEPS + 1):
        losses.append(train_step(plugin, layout, booster, model, optimizer, shard)[0])
        if mode == "moved" and step in (2, 4):
            layers = {i: forced_placement(num_experts, ep, step) for i, _ in rebalancer.layers}
            rebalancer.rebalance(layers)
        if mode == "moved" and step == SAVE_AFTER:
            booster.save_model(model, os.path.join(checkpoint, "model"), shard=True, use_safetensors=True)
            booster.save_optimizer(optimizer, os.path.join(checkpoint, "optimizer"), shard=True)
        if mode == "moved" and step == 5:
            searched = rebalancer.rebalance()
    placements = {i: current_placement(layer) for i, layer in rebalancer.layers if rebalancer.held(layer)}
    return {"losses": losses, "state": gathered_state(plugin, layout, model), "placements": placements,
            "local": local_experts(model), "searched": searched}


def main():
    out_dir, cases = sys.argv[1], [json.loads(c) for c in sys.argv[2:]]
    init_distributed(seed=1)
    for case in cases:
        config = make_config(case.get("dispatch", "dropless"))
        checkpoint = os.path.join(out_dir, f"{case['name']}-ckpt")
        runs = {mode: run(case, config, mode, checkpoint) for mode in ("plain", "moved", "resumed")}
        # Did this rank end up holding other experts than without rebalancing? (any rank is enough)
        changed = torch.tensor([float(any(not torch.equal(runs["plain"]["local"][k], v)
                                          for k, v in runs["moved"]["local"].items()))])
        dist.all_reduce(changed)
        if dist.get_rank() == 0:
            torch.save({name: {k: v for k, v in r.items() if k != "local"} for name, r in runs.items()}
                       | {"local_experts_changed": bool(changed.item())},
                       os.path.join(out_dir, f"{case['name']}.pt"))
            print(f"case {case['name']} done", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
