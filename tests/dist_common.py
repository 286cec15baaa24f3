"""Shared by the multi-process parity workers (workers/dist_*.py) and their single-process references
(test_parallel*.py).

A parity case trains the tiny OpenMoE for a few optimizer steps on one fixed global batch. The reference is
one process in fp32 that walks the same routing groups (one per data-parallel shard, and per pipeline
micro-batch) and accumulates: LM loss summed over all target tokens / global count, router losses averaged
over the groups. Every correct layout must reproduce its losses, gradient norms and parameters.
"""

import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM

GLOBAL_BATCH = 8
SEQ_LEN = 12
STEPS = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(dispatch: str = "dropless") -> OpenMoeConfig:
    # Router losses weighted up so that their gradients are not lost in the noise of the comparison.
    return OpenMoeConfig.from_preset("tiny", dispatch=dispatch, router_aux_loss_factor=0.1, router_z_loss_factor=0.01,
                                     z_loss_factor=1e-4, capacity_factor_train=1.0, min_capacity=2)


def make_batch() -> dict:
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(2, 1024, (GLOBAL_BATCH, SEQ_LEN), generator=g)
    labels = input_ids.clone()
    labels[:, :3] = -100      # a masked prompt
    labels[1, -4:] = -100     # uneven target counts across shards
    return {"input_ids": input_ids, "labels": labels}


def make_model(config: OpenMoeConfig, starve: bool = False) -> OpenMoeForCausalLM:
    torch.manual_seed(7)
    model = OpenMoeForCausalLM(config)
    if starve:
        starve_upper_experts(model)
    return model


def starve_upper_experts(model) -> None:
    """Gate rows so that experts E/2..E-1 receive no token: rows 0..3 are +-v, +-u, so every token has two
    clearly positive logits among them, while the upper experts' logits are 0 (their rows are zero)."""
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for layer in model.moe_layers():
            num_experts, hidden = layer.gate_weight.shape
            v, u = torch.randn(2, hidden, generator=g)
            rows = torch.zeros(num_experts, hidden)
            rows[0], rows[1], rows[2], rows[3] = v, -v, u, -u
            layer.gate_weight.copy_(rows)


def make_optimizer(params, kind: str):
    if kind == "sgd":  # plain SGD: a wrong clipping coefficient shows directly in the update
        return torch.optim.SGD(params, lr=0.05)
    # eps well above float noise: Adam turns a gradient that is pure rounding noise into a full lr-sized step,
    # which would make two correct runs that reduce in different orders diverge visibly.
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, eps=1e-6)


def routing_groups(batch: dict, dp: int, microbatch: int | None) -> list[dict]:
    """Data-parallel shard r is rows [r*b, (r+1)*b); a pipeline splits each shard into micro-batches."""
    per_rank = GLOBAL_BATCH // dp
    groups = []
    for r in range(dp):
        shard = {k: v[r * per_rank:(r + 1) * per_rank] for k, v in batch.items()}
        size = microbatch or per_rank
        groups += [{k: v[i:i + size] for k, v in shard.items()} for i in range(0, per_rank, size)]
    return groups


def reference_run(case: dict) -> dict:
    """Single-process fp32 training on the case's routing groups: losses, pre-clip grad norms, final params."""
    config = make_config(case.get("dispatch", "dropless"))
    model = make_model(config, case.get("starve", False))
    model.train()
    optimizer = make_optimizer(model.parameters(), case.get("optimizer", "adamw"))
    batch = make_batch()
    groups = routing_groups(batch, case["dp"], case.get("microbatch"))
    num_items = float((batch["labels"][:, 1:] != -100).sum())
    losses, norms, counts = [], [], []
    for _ in range(STEPS):
        parts = torch.zeros(3, dtype=torch.float64)
        for group in groups:
            out = model(input_ids=group["input_ids"], labels=group["labels"], num_items_in_batch=num_items)
            router = config.router_aux_loss_factor * out.aux_loss + config.router_z_loss_factor * out.router_z_loss
            (out.lm_loss + router / len(groups)).backward()
            parts += torch.stack([out.lm_loss, out.aux_loss / len(groups), out.router_z_loss / len(groups)]).double()
            counts.append(sum(layer.last_counts for layer in model.moe_layers()))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), case.get("max_norm", 1e9))))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(parts.tolist())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"losses": losses, "norms": norms, "state": state, "expert_counts": torch.stack(counts).sum(0)}


def launch(worker: str, nproc: int, args: list[str], timeout: int, nnodes: int = 1, extra_env=None):
    """torchrun --standalone a worker with OMP_NUM_THREADS=1, bounded by timeout; returns CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", **(extra_env or {})}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = ["timeout", "-k", "5", str(timeout), sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(REPO, "tests", "workers", worker), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)


def write_records_and_leave(records: list, out_path: str, world: int) -> None:
    """A worker's last act: rank 0 writes what every case measured, then every rank leaves the process group."""
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "records": records}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
