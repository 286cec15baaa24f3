"""What a user sees on stderr from a short training run and from inference on its result: no notices from
dependencies about optional extras we never use, no deprecation warnings our own calls cause, and a progress
bar whose tok_s counts every processed token (the perf/tokens_per_s figure)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run("train.py", "--max_steps", "3", "--batch_size", "4", "--eval_samples", "4", "--log_interval", "1",
                 "--output_path", str(out))
    return out, result.stderr


def warning_lines(stderr: str) -> list[str]:
    lines = re.split(r"[\r\n]+", stderr)
    return [line for line in lines if re.search(r"warn|deprecat|Failed to load|Please install", line, re.I)]


def test_entry_points_show_no_dependency_warnings(trained):
    out, train_stderr = trained
    assert warning_lines(train_stderr) == []
    for script in ("infer.py", "infer_multi_device.py"):
        result = run(script, "--model", str(out / "final"), "--greedy", "--max_new_tokens", "4",
                     "--prompt", "3 4 + 2 5 =")
        assert warning_lines(result.stderr) == [], script


def test_progress_bar_shows_processed_tokens_per_s(trained):
    out, stderr = trained
    bar = [line for line in re.split(r"[\r\n]+", stderr) if "tok_s=" in line][-1]

    def figure(name):
        return float(re.search(rf"\b{name}=([\d,.]+)", bar).group(1).replace(",", ""))

    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if "perf/tokens_per_s" in line][-1]
    # The bar and the record of the last step time the same window, a few statements apart.
    assert 0.5 < figure("tok_s") / last["perf/tokens_per_s"] < 2, (bar, last)
    assert 0.5 < figure("tgt_tok_s") / last["perf/target_tokens_per_s"] < 2, (bar, last)
    assert figure("tgt_tok_s") < figure("tok_s")  # prompts and padding are processed but carry no loss
