import math

import pytest

from moe_system.model import OpenMoeConfig
from moe_system.training.args import parse_args
from moe_system.training.flops import train_flops_per_token
from moe_system.training.schedule import lr_multiplier


def test_preset_defaults_fill_only_what_was_not_given():
    args = parse_args(["--model_name", "8b", "--lr", "2e-5"])
    assert args.lr == 2e-5 and args.max_length == 2048 and args.batch_size == 1
    assert args.output_path == "outputs/openmoe-8b"
    assert parse_args([]).model_name == "tiny"


def test_lr_schedules():
    assert lr_multiplier("constant", 5, 10, 100) == pytest.approx(0.6)   # linear warmup
    assert lr_multiplier("cosine", 10, 10, 100) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    # inverse square root: continuous at the end of warmup, then 1/sqrt(step)
    assert lr_multiplier("inverse_sqrt", 9, 10, 10**6) == pytest.approx(1.0)
    assert lr_multiplier("inverse_sqrt", 39, 10, 10**6) == pytest.approx(math.sqrt(10 / 40))


def test_flops_per_token_matches_the_published_estimate():
    # docs/performance.md, Where the FLOPs go: OpenMoE-base costs about 2.0-2.3 GFLOP per token
    # forward+backward at sequence 2048, more than half of it in the LM head.
    cfg = OpenMoeConfig.from_preset("base")
    flops = train_flops_per_token(cfg, 2048)
    assert 2.0e9 < flops < 2.3e9
    head = 6 * cfg.vocab_size * cfg.hidden_size
    assert 0.5 < head / flops < 0.62


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    from moe_system.training.metrics import MetricsLogger
    import json
    logger = MetricsLogger(str(tmp_path), enabled=True)
    logger.log(3, {"train/lm_loss": 1.5, "note": "text is kept in jsonl only"})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "train/lm_loss": 1.5,
                                                                    "note": "text is kept in jsonl only"}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_wandb_is_optional_and_asked_for_explicitly(tmp_path, monkeypatch):
    import sys
    from moe_system.training.metrics import MetricsLogger
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    MetricsLogger(str(tmp_path), enabled=True).close()  # not asked for: fine
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(str(tmp_path), enabled=True, wandb_project="p")


@pytest.mark.distributed
def test_router_options_and_synthetic_data_under_expert_parallelism(tmp_path):
    """Two processes, ep=2: random-token batches, jitter noise and aux-loss-free balancing train, and the learned
    selection bias is saved with the model (the same on every rank: counts are summed over data-parallel ranks)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch
    import moe_system.model  # noqa: F401
    from transformers import AutoModelForCausalLM

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--dataset", "synthetic", "--router_bias_update_rate", "0.01", "--router_noise", "jitter",
           "--max_steps", "3", "--batch_size", "4", "--max_length", "16", "--output_path", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    biases = [layer.mlp.expert_bias for layer in model.model.layers if layer.is_moe]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    for b in biases:  # three updates of +-0.01 each
        assert torch.allclose((b / 0.01).round() * 0.01, b, atol=1e-6) and b.abs().max() <= 0.03 + 1e-6
    assert model.config.router_noise == "jitter" and model.config.router_bias_update_rate == 0.01
