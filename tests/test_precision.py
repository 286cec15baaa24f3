"""Training precision: what must stay exact or fp32 when the plugin casts the model and its inputs to bf16/fp16."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
from moe_system.moe.balancing import update_expert_bias
from moe_system.moe.load import ExpertLoadMeter

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rotary_tables_of_a_cast_model_equal_fp32(dtype):
    """Colossal-AI's mixed-precision module casts the model with .to(dtype); the rotary angles must not follow
    (bf16 frequencies put position 2047 off by radians)."""
    model = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny", max_position_embeddings=4096))
    positions = torch.arange(2048)[None]
    reference = [t.clone() for t in model.model.rotary_emb(positions)]
    model.to(dtype)
    for table, expected in zip(model.model.rotary_emb(positions), reference):
        assert table.dtype == torch.float32
        torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_selection_bias_stays_fp32_and_takes_small_steps_when_the_model_is_cast(dtype):
    model = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny", router_bias_update_rate=1e-3))
    layer = model.moe_layers()[0]
    layer.expert_bias.fill_(0.5 + 1e-3)  # a value bf16 cannot hold: the cast must not round it either
    model.to(dtype)
    assert model.dtype == dtype and layer.expert_bias.dtype == torch.float32
    meter = ExpertLoadMeter([layer])
    layer.routed_total = layer.routed_total + torch.tensor([0, 9, 9, 9, 9, 9, 9, 9])
    update_expert_bias(meter, 1e-3)
    assert layer.expert_bias[0].item() == pytest.approx(0.502, abs=1e-6)  # under-loaded: up by 1e-3
    assert layer.expert_bias[1].item() == pytest.approx(0.500, abs=1e-6)


@pytest.mark.slow
def test_fp16_and_bf16_steps_through_the_plugin_match_fp32(tmp_path):
    """65,536 target tokens per global batch (above fp16's largest finite value) and 13,337 (not a bf16 number):
    the count reaches the model exact, fp16 trains, and each precision's first losses are fp32's."""
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "precision_steps.py"), str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())
    for low, reference, targets in (("fp16-65536", "fp32-65536", 65536), ("bf16-13337", "fp32-13337", 13337)):
        got, expected = runs[low], runs[reference]
        assert got["count"] == targets and got["count_dtype"] == "torch.int64", (low, got["count"])
        # bf16 rounding 13,337 to 13,312 scales the loss by 1.0019; the precisions' own noise is ~1e-5 here.
        for step, (a, b) in enumerate(zip(got["losses"], expected["losses"])):
            assert a == pytest.approx(b, rel=5e-4), (low, step, got["losses"], expected["losses"])
        assert got["losses"][-1] < got["losses"][0] - 0.05, (low, got["losses"])  # it trains
        for table in ("cos", "sin"):
            assert got[table] == pytest.approx(expected[table], abs=1e-6), (low, table)
        assert got["bias_dtype"] == "torch.float32" and got["bias"][0] == pytest.approx(0.501, abs=1e-6), low


def test_checkpoints_record_the_training_dtype_and_inference_auto_follows_it(tmp_path):
    from moe_system.inference.loading import load_model

    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--precision", "bf16", "--dataset", "synthetic", "--max_steps", "1",
           "--batch_size", "2", "--max_length", "16", "--save_interval", "1", "--output_path", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for saved in (out / "final", out / "checkpoint-1" / "model"):
        assert json.loads((saved / "config.json").read_text()).get("dtype") == "bfloat16", saved
    model = load_model(str(out / "final"), "auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_model(str(out / "final"), "float32").dtype == torch.float32  # an explicit --dtype still wins
