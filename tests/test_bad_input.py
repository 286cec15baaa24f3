"""Bad input to train.py: each case ends with one clear `error: ...` line, a non-zero exit, no traceback, and
leaves what an earlier run saved untouched."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max_steps", "2", "--batch_size", "4", "--eval_samples", "4", "--log_interval", "1"]


def train(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("earlier")
    result = train(*FAST, "--output_path", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import moe_system.model  # noqa: F401
    from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
    path = tmp_path_factory.mktemp("ckpt")
    OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny")).save_pretrained(path, max_shard_size="3MB")
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def case_corrupt_line(tmp):
    good = json.dumps({"prompt": "1 + 1 =", "completion": " 2"})
    return ["--dataset", str(jsonl(tmp / "bad.jsonl", [good, good, "{not json", good]))], "bad.jsonl"


def case_empty_file(tmp):
    (tmp / "empty.jsonl").write_text("")
    return ["--dataset", str(tmp / "empty.jsonl")], "empty"


def case_overlong_sequence(tmp):
    record = json.dumps({"prompt": "copy: " + "a " * 40 + "->", "completion": " " + "a " * 40})
    return ["--dataset", str(jsonl(tmp / "long.jsonl", [record] * 8)), "--max_length", "16"], "max_length"


def case_tokenizer_bigger_than_vocab(tmp):
    import moe_system.model  # noqa: F401
    from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
    OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny", vocab_size=256)).save_pretrained(tmp / "small_vocab")
    return ["--load_checkpoint", str(tmp / "small_vocab")], "vocab"


def case_missing_shard(tmp, ckpt):
    broken = copy_checkpoint(ckpt, tmp / "missing_shard")
    next(iter(sorted(broken.glob("model-*.safetensors")))).unlink()
    return ["--load_checkpoint", str(broken)], "missing"


def case_mismatched_shapes(tmp, ckpt):
    broken = copy_checkpoint(ckpt, tmp / "mismatched")
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 512
    (broken / "config.json").write_text(json.dumps(config))
    return ["--load_checkpoint", str(broken)], "shape"


def case_unwritable_output(tmp):
    (tmp / "a_file").write_text("")
    return [], "not a writable directory"


def case_conflicting_flags(tmp, ckpt):
    return ["--resume", "latest", "--load_checkpoint", str(ckpt)], "--resume"


def case_impossible_layout(tmp):
    return ["--plugin", "hybrid", "--pp_size", "2", "--ep_size", "1", "--zero_stage", "2"], "cannot use --zero_stage 2"


def case_nothing_to_resume(tmp):
    return ["--resume", "latest"], "no checkpoint-STEP"


def case_streaming_a_hub_dataset(tmp):
    return ["--streaming", "--dataset", "yizhongw/self_instruct"], "drop --streaming"


CASES = [case_corrupt_line, case_empty_file, case_overlong_sequence, case_tokenizer_bigger_than_vocab,
         case_missing_shard, case_mismatched_shapes, case_unwritable_output, case_conflicting_flags,
         case_impossible_layout, case_nothing_to_resume, case_streaming_a_hub_dataset]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_bad_input_gives_one_clear_error(case, tmp_path, earlier_run, tiny_checkpoint):
    needs_ckpt = "ckpt" in case.__code__.co_varnames[:case.__code__.co_argcount]
    args, expected = case(tmp_path, tiny_checkpoint) if needs_ckpt else case(tmp_path)
    output = tmp_path / "a_file" / "out" if case is case_unwritable_output else (
        tmp_path / "fresh" if case is case_nothing_to_resume else earlier_run)
    # Into the earlier run's directory: as a new run that would replace it, had the input been good.
    overwrite = ["--overwrite_output_dir"] if output == earlier_run and "--resume" not in args else []
    before = digest(earlier_run)
    result = train(*FAST, *args, *overwrite, "--output_path", str(output))
    assert result.returncode != 0
    err = result.stderr
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines and expected.lower() in " ".join(lines).lower(), err[-3000:]
    assert digest(earlier_run) == before  # nothing saved earlier was touched


def test_diverging_run_skips_nonfinite_steps_then_stops(tmp_path):
    # lr inf turns the weights into inf/nan at the first update; every later loss is non-finite.
    out = tmp_path / "diverge"
    result = train("--max_steps", "40", "--batch_size", "4", "--lr", "inf", "--warmup_steps", "0",
                   "--lr_scheduler", "constant", "--max_nonfinite_steps", "3", "--save_interval", "1",
                   "--save_total_limit", "0", "--log_interval", "1", "--output_path", str(out))
    assert result.returncode != 0
    assert "3 consecutive steps had a non-finite loss" in result.stderr and "Traceback" not in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/skipped_nonfinite", 0) for r in records) == 3
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps and steps == list(range(1, steps[-1] + 1))  # every good step saved, nothing after the failure
    assert not list(out.glob(".checkpoint-*.partial")) and not (out / "final").exists()
