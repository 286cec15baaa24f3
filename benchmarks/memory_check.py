"""The memory planner's estimate next to a measured training step on one device.

    python -m benchmarks.memory_check --model_name tiny --precision fp32 --batch_size 4 --max_length 128
    python -m benchmarks.memory_check --model_name base --batch_size 4 --max_length 2048 --out base_b4.json  # GPU
    python -m benchmarks.memory_check --model_name base --batch_size 8 --checkpointing --out base_b8_ckpt.json

One process, one device, the `ep` layout of world 1 with ZeRO 0, the planner's assumptions:
* fp32: fp32 weights and AdamW; bf16: bf16 weights, fp32 master weights updated by AdamW (train_step.py).
* gradients stay allocated between steps (zero_grad(set_to_none=False)), as the planner counts them.
Measured: bytes of the weights, gradients and optimizer tensors after one step, and the peak of one more step
(CUDA: torch.cuda.max_memory_allocated; CPU: those bytes + live tensor storages during the step, common.py).
"""

import argparse

import torch

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
from moe_system.parallel.memory_planner import GiB, estimate

from .common import LiveTensorBytes, environment, pick_device, write_json
from .train_step import MasterWeightAdamW, optimizer_tensors


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class KeepGradMasterAdamW(MasterWeightAdamW):
    """MasterWeightAdamW that leaves the bf16 gradients allocated (zeroed), as the planner assumes."""

    def step(self):
        for param, master in zip(self.params, self.masters):
            master.grad = param.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.masters)
        for master in self.masters:
            master.grad = None

    def zero_grad(self, set_to_none=False):
        for param in self.params:
            param.grad.zero_()


def measure(cfg, precision: str, batch_size: int, max_length: int, checkpointing: bool, device,
            recompute: str = "full") -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = OpenMoeForCausalLM(cfg).train()
    model.model.gradient_checkpointing = checkpointing
    model.model.recompute = recompute
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        optimizer = KeepGradMasterAdamW(model)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, max_length), device=device)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    step()  # creates the optimizer state and the gradients
    params = list(model.parameters())
    states = optimizer_tensors(optimizer)
    measured = {
        "weights": tensor_bytes(params),
        "gradients": tensor_bytes(p.grad for p in params),
        "optimizer_tensors": tensor_bytes(states),   # fp32 masters (bf16) + Adam moments + step counters
    }
    static = sum(measured.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        measured["peak"] = torch.cuda.max_memory_allocated(device)
    else:
        with LiveTensorBytes() as tracker:
            step()
        measured["peak"] = static + tracker.peak
    measured["peak_beyond_states"] = measured["peak"] - static
    return measured


def compare(model_name: str, precision: str, batch_size: int, max_length: int, checkpointing: bool, device,
            recompute: str = "full") -> dict:
    cfg = OpenMoeConfig.from_preset(model_name)
    est = estimate(cfg, "ep", 1, zero_stage=0, precision=precision, batch_size=batch_size, max_length=max_length,
                   checkpointing=checkpointing, recompute=recompute)
    c = est.components
    estimated = {
        "weights": c["weights"], "gradients": c["gradients"],
        "optimizer_tensors": c["master_weights"] + c["optimizer_states"],
        "peak": est.peak_bytes,
    }
    estimated["peak_beyond_states"] = est.peak_bytes - sum(estimated[k] for k in ("weights", "gradients",
                                                                                 "optimizer_tensors"))
    measured = measure(cfg, precision, batch_size, max_length, checkpointing, device, recompute)
    return {
        "model_name": model_name, "precision": precision, "batch_size": batch_size, "max_length": max_length,
        "checkpointing": checkpointing, "recompute": recompute, "estimate_components": c, "estimated": estimated, "measured": measured,
        "ratio_estimated_over_measured": {k: estimated[k] / measured[k] for k in estimated if measured[k]},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_name", default="tiny", choices=["tiny", "base", "8b", "34b"])
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--recompute", default="full", choices=["full", "selective"])
    parser.add_argument("--cpu", action="store_true", help="measure on CPU even where CUDA is present")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = pick_device(args.cpu)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    result = compare(args.model_name, precision, args.batch_size, args.max_length, args.checkpointing, device,
                     args.recompute)
    for key, ratio in result["ratio_estimated_over_measured"].items():
        print(f"{key:<20} estimated {result['estimated'][key] / GiB:8.3f} GiB  measured "
              f"{result['measured'][key] / GiB:8.3f} GiB  ratio {ratio:.3f}")
    write_json(args.out, {"benchmark": "memory_check", "environment": environment(device), **result})


if __name__ == "__main__":
    main()
