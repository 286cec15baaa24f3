"""Worker: a few optimizer steps of a small OpenMoE through the plugin in fp32, fp16 and bf16 on one fixed
batch, in a one-process world; writes what each precision saw as JSON.

Usage: python tests/workers/precision_steps.py OUT_JSON
Per precision: the LM loss of every step, the target-token count as it reached the model's forward (after the
plugin's input cast), the rotary cos/sin tables of the boosted model, and the selection bias after one 1e-3 step
from 0.5.
"""

import json
import os
import sys

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(TESTS)]
from colossalai.booster import Booster  # noqa: E402

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM  # noqa: E402
from moe_system.moe.balancing import update_expert_bias  # noqa: E402
from moe_system.moe.load import ExpertLoadMeter  # noqa: E402
from moe_system.parallel.config import ParallelConfig  # noqa: E402
from moe_system.parallel.launch import init_distributed  # noqa: E402
from moe_system.parallel.plugin import build_plugin  # noqa: E402
from moe_system.training.forward_backward import forward_backward  # noqa: E402

ROWS, SEQ = 2048, 33  # 2048 x 32 = 65,536 target tokens: above fp16's largest finite value, 65,504
STEPS = 3


def small_config() -> OpenMoeConfig:
    return OpenMoeConfig.from_preset("tiny", vocab_size=128, hidden_size=32, intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=2, head_dim=16, num_experts=4,
                                     moe_layer_interval=2, max_position_embeddings=4096,
                                     router_bias_update_rate=1e-3)


def batch(targets: int) -> dict:
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(2, 128, (ROWS, SEQ), generator=g)
    input_ids[:, 1::2] = input_ids[:, 0::2][:, :SEQ // 2]  # something learnable: every odd token repeats
    labels = input_ids.clone()
    flat = labels[:, 1:].reshape(-1)
    flat[:flat.numel() - targets] = -100
    labels[:, 1:] = flat.view(ROWS, SEQ - 1)
    return {"input_ids": input_ids, "labels": labels}


def run(precision: str, targets: int) -> dict:
    config = small_config()
    plugin, _ = build_plugin(ParallelConfig(zero_stage=0, precision=precision, max_grad_norm=1.0), config)
    booster = Booster(plugin=plugin)
    torch.manual_seed(3)
    model = OpenMoeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, *_ = booster.boost(model, optimizer)
    model.train()
    seen = []
    model.unwrap().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["num_items_in_batch"]), with_kwargs=True)
    mb, losses = batch(targets), []
    for _ in range(STEPS):
        parts = forward_backward(booster, model, optimizer, [mb], None, torch.device("cpu"))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(parts["lm_loss"]))
    inner = model.unwrap()
    cos, sin = inner.model.rotary_emb(torch.arange(2048)[None])
    layer = inner.moe_layers()[0]
    layer.expert_bias.fill_(0.5)
    meter = ExpertLoadMeter([layer])
    layer.routed_total = layer.routed_total + torch.tensor([0, 9, 9, 9])  # expert 0 under-loaded: its bias rises
    update_expert_bias(meter, 1e-3)
    return {"losses": losses, "count": float(seen[0]), "count_dtype": str(seen[0].dtype),
            "cos": cos.flatten().tolist()[::97], "sin": sin.flatten().tolist()[::97],
            "bias_dtype": str(layer.expert_bias.dtype), "bias": layer.expert_bias.tolist()}


def main():
    init_distributed(seed=1)
    results = {f"{precision}-{targets}": run(precision, targets)
               for precision, targets in (("fp32", 65536), ("fp16", 65536), ("fp32", 13337), ("bf16", 13337))}
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
