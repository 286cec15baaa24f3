"""Each rank's share of the model (moe_system/parallel/rank_model.py): the same canonical initial weights for every
layout, only the rank's tensors materialised, and exactly the parameter count the memory planner assumes."""

import os
import subprocess
import sys

import pytest
import torch

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
from moe_system.parallel import memory_planner
from moe_system.parallel.layout import validate_layout
from moe_system.parallel.rank_model import build_rank_model

SEED = 11


def tiny_config():
    return OpenMoeConfig.from_preset("tiny", router_bias_update_rate=0.01)  # with the expert_bias buffer too


def reassemble(config, shares) -> dict:
    """Canonical tensors from rank models: experts put back at their EP offsets, everything else taken from
    whichever rank holds it (all holders must agree bitwise)."""
    merged = {}
    for (ep_rank, ep_size), model in shares:
        local = config.num_experts // ep_size
        for name, tensor in model.state_dict().items():
            if ".experts." in name:
                shape = (config.num_experts, *tensor.shape[1:])
                whole = merged.setdefault(name, torch.full(shape, float("nan"), dtype=tensor.dtype))
                whole[ep_rank * local:(ep_rank + 1) * local] = tensor
            elif name in merged:
                assert torch.equal(merged[name], tensor), f"{name} differs between ranks"
            else:
                merged[name] = tensor.clone()
    return merged


def assert_same_model(merged: dict, full: OpenMoeForCausalLM) -> None:
    want = full.state_dict()
    assert set(merged) == set(want)
    for name, tensor in want.items():
        assert torch.equal(merged[name], tensor), f"{name}: not the single-process initial value"


@pytest.mark.parametrize("ep_size", [2, 4, 8])
def test_every_ep_layout_starts_from_the_single_process_weights(ep_size):
    config = tiny_config()
    full = build_rank_model(config, seed=SEED)
    shares = [((r, ep_size), build_rank_model(config, seed=SEED, ep_rank=r, ep_size=ep_size)) for r in range(ep_size)]
    for _, model in shares:
        assert model.model.layers[1].mlp.experts.wo.shape[0] == config.num_experts // ep_size
    assert_same_model(reassemble(config, shares), full)


def test_a_bf16_share_is_the_fp32_canonical_model_rounded():
    config = tiny_config()
    full = build_rank_model(config, seed=SEED).to(torch.bfloat16)
    shares = [((r, 2), build_rank_model(config, seed=SEED, ep_rank=r, ep_size=2, dtype=torch.bfloat16))
              for r in range(2)]
    assert all(p.dtype == torch.bfloat16 for _, model in shares for p in model.parameters())
    assert_same_model(reassemble(config, shares), full)


def test_pipeline_stages_times_ep_start_from_the_single_process_weights():
    config = tiny_config()
    full = build_rank_model(config, seed=SEED)
    shares = []
    for stage, layers in enumerate([(0, 2), (2, 4)]):
        for r in range(2):
            model = build_rank_model(config, seed=SEED, ep_rank=r, ep_size=2, layers=layers, first=stage == 0,
                                     last=stage == 1)
            held = {int(n.split(".")[2]) for n, _ in model.named_parameters() if n.startswith("model.layers.")}
            assert held == set(range(*layers))
            # What the stage does not hold has no tensors at all (as after shardformer), not even meta ones.
            assert (model.lm_head.weight is None) == (stage == 0)
            assert (model.model.embed_tokens.weight is None) == (stage == 1)
            assert all(p.device.type == "cpu" for p in model.parameters())
            shares.append(((r, 2), model))
    assert_same_model(reassemble(config, shares), full)


def test_distributions_are_the_models_own_and_the_seed_matters():
    config = tiny_config()
    model = build_rank_model(config, seed=SEED)
    reference = OpenMoeForCausalLM(config)  # the model's own init, from the global generator
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        got, want = got.detach(), want.detach()
        if "norm" in name:
            assert torch.equal(got, want), name
        else:  # >= 1024 draws per tensor: the two std estimates agree to a few percent
            assert float(got.std()) == pytest.approx(float(want.std()), rel=0.15), name
            assert abs(float(got.mean())) < 4 * float(want.std()) / got.numel() ** 0.5, name
    for name, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    other = build_rank_model(config, seed=SEED + 1)
    assert not torch.equal(other.model.layers[1].mlp.experts.wo, model.model.layers[1].mlp.experts.wo)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


LAYOUTS = [  # what --plugin ep, ep_zero and hybrid give on 8 and 32 GPUs
    ("ep", 8, {}), ("ep", 32, {}),
    ("ep_zero", 8, dict(extra_dp_size=2)), ("ep_zero", 32, dict(extra_dp_size=4)),
    ("hybrid", 8, dict(pp_size=2, dp_size=1, ep_size=4)), ("hybrid", 32, dict(pp_size=4, dp_size=2, ep_size=4)),
]


@pytest.mark.parametrize("preset", ["8b", "34b"])
@pytest.mark.parametrize("plugin,world,sizes", LAYOUTS)
def test_each_rank_holds_what_the_memory_planner_counts(preset, plugin, world, sizes):
    config = OpenMoeConfig.from_preset(preset)
    extra = dict(microbatch_size=1) if plugin == "hybrid" else {}
    layout = validate_layout(plugin, world, config.num_experts, config.num_hidden_layers, **sizes, **extra)
    stages = memory_planner.stage_layers(config.num_hidden_layers, layout.pp)
    counts = {}
    for rank in range(world):
        c = layout.coords(rank)
        if (c["pp"], c["ep"]) in counts:  # expert-data-parallel replicas hold the same share
            continue
        layers, first, last = stages[c["pp"]], c["pp"] == 0, c["pp"] == layout.pp - 1
        model = build_rank_model(config, seed=SEED, ep_rank=c["ep"], ep_size=layout.ep, layers=(layers.start,
                                 layers.stop), first=first, last=last, device="meta")
        held = sum(p.numel() for p in model.parameters())
        assert held == sum(memory_planner.rank_params(config, layers, first, last, layout.ep)), rank
        counts[c["pp"], c["ep"]] = held
    est = memory_planner.estimate(config, plugin, world, batch_size=4, **sizes, **extra)
    assert est.params_dense + est.params_expert_local == counts[est.stage, 0]


@pytest.mark.distributed
@pytest.mark.slow
def test_train_py_under_pipeline_and_ep_starts_from_the_single_process_weights(tmp_path):
    """4 processes, --plugin hybrid pp=2 x ep=2, one step at a learning rate far below any weight's rounding step
    (each update rounds back to the weight): the saved model is the initial one, gathered from the four ranks'
    shares, and must be the single-process model of the same seed bit for bit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    cmd = ["timeout", "-k", "5", "240", sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "4", "train.py", "--plugin", "hybrid", "--pp_size", "2", "--ep_size", "2",
           "--microbatch_size", "1", "--batch_size", "2", "--max_steps", "1", "--lr", "1e-30", "--warmup_steps", "0", "--seed", str(SEED), "--eval_samples", "2", "--output_path", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    saved = OpenMoeForCausalLM.from_pretrained(out / "final")
    full = build_rank_model(saved.config, seed=SEED)
    assert_same_model(saved.state_dict(), full)
