"""Bad input to infer.py and infer_multi_device.py: each case ends with one clear `error: ...` line and exit
status 2, is found before any weight is loaded, and writes nothing. Checkpoints load as strictly as
`train.py --load_checkpoint`: a missing, unexpected, wrongly shaped or unreadable tensor is an error, never a
randomly initialised weight."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_system.data import load_tokenizer
from moe_system.inference.cli import infer_main, multi_device_main
from moe_system.inference.device_map import parse_max_memory
from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM

REPO = Path(__file__).resolve().parents[1]
MAINS = {"infer.py": infer_main, "infer_multi_device.py": multi_device_main}
DROPPED = "model.layers.1.mlp.experts.wo"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny")).save_pretrained(path, max_shard_size="4MB")
    load_tokenizer(None).save_pretrained(path)
    return path


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Every case must be refused from headers and flags alone, before from_pretrained reads a weight."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")
    monkeypatch.setattr(OpenMoeForCausalLM, "from_pretrained", refuse)


def edit_shards(src: Path, dst: Path, edit) -> Path:
    """A copy of a checkpoint whose tensors edit(dict) changed, with its index kept consistent."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {}
    for shard in sorted(dst.glob("model-*.safetensors")):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
        index["weight_map"].update({name: shard.name for name in tensors})
    index_path.write_text(json.dumps(index))
    return dst


def missing_tensor(src, dst):
    return edit_shards(src, dst, lambda tensors: tensors.pop(DROPPED, None)), f"1 missing: {DROPPED}"


def unexpected_tensor(src, dst):
    def add(tensors):
        if "lm_head.weight" in tensors:
            tensors["model.layers.0.self_attn.extra"] = torch.zeros(3)
    return edit_shards(src, dst, add), "1 unexpected: model.layers.0.self_attn.extra"


def wrong_shape(src, dst):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["intermediate_size"] *= 2
    (dst / "config.json").write_text(json.dumps(config))
    return dst, "with a wrong shape: model.layers.0.mlp.gate_proj.weight"


def truncated_shard(src, dst):
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    return dst, f"cannot read weights from {shard}"


def expect_one_error(main, argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], err
    return errors[0]


@pytest.mark.parametrize("script", MAINS)
@pytest.mark.parametrize("damage", [missing_tensor, unexpected_tensor, wrong_shape, truncated_shard],
                         ids=lambda f: f.__name__)
def test_checkpoints_load_strictly(script, damage, checkpoint, tmp_path, capsys, no_weight_loading):
    broken, match = damage(checkpoint, tmp_path / "broken")
    expect_one_error(MAINS[script], ["--model", str(broken), "--prompt", "x", "--output", str(tmp_path / "o.jsonl")],
                     capsys, match)
    assert not (tmp_path / "o.jsonl").exists()


def test_a_missing_tensor_stops_the_script(checkpoint, tmp_path):
    broken, match = missing_tensor(checkpoint, tmp_path / "broken")
    result = subprocess.run([sys.executable, "infer.py", "--model", str(broken), "--prompt", "x", "--greedy",
                             "--max_new_tokens", "2"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and match in result.stderr.splitlines()[-1], result.stderr


def non_utf8_prompt_file(tmp):
    (tmp / "prompts.txt").write_bytes(b"caf\xe9 au lait\n")
    return ["--prompt_file", str(tmp / "prompts.txt")]


def unwritable_offload_folder(tmp):
    (tmp / "a_file").write_text("")
    return ["--offload_folder", str(tmp / "a_file" / "offload")]


def file_as_offload_folder(tmp):
    (tmp / "a_file").write_text("")
    return ["--offload_folder", str(tmp / "a_file")]


# (scripts, arguments or a function of the test's folder giving them, what the error line says)
BOTH, MULTI = tuple(MAINS), ("infer_multi_device.py",)
CASES = [
    (("infer.py",), ["--device", "gpu0"], "--device 'gpu0' is not a device"),
    (("infer.py",), ["--device", "tpu"], "is not a device"),
    (BOTH, ["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (BOTH, ["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (BOTH, ["--temperature", "-1"], "--temperature"),
    (BOTH, ["--top_p", "nan"], "--top_p must be in (0, 1]"),
    (BOTH, ["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (BOTH, ["--top_k", "-1"], "--top_k must be >= 0"),
    (BOTH, ["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (BOTH, ["--repetition_penalty", "nan"], "--repetition_penalty must be a finite number > 0"),
    (BOTH, ["--repetition_penalty", "inf"], "--repetition_penalty must be a finite number > 0"),
    (BOTH, ["--repetition_penalty", "0"], "--repetition_penalty"),
    (BOTH, ["--stop", ""], "--stop needs a non-empty text"),
    (BOTH, ["--seed", str(2**64)], "--seed must be in 0 .. 2**64 - 1"),
    (BOTH, ["--batch_size", "0"], "--batch_size must be at least 1"),
    (BOTH, ["--prompt", "caf\udce9"], "--prompt is not UTF-8 text"),  # what argv holds for a non-UTF-8 byte
    (BOTH, non_utf8_prompt_file, "prompts.txt is not UTF-8 text (byte 0xe9 at offset 3): save it as UTF-8"),
    (BOTH, ["--model", "some-org/some-model"], "does not exist"),
    (BOTH, ["--tokenizer", "some-org/some-tokenizer"], "we are offline"),
    (MULTI, unwritable_offload_folder, "is not a writable folder (Not a directory)"),
    (MULTI, file_as_offload_folder, "is not a writable folder"),
    (MULTI, ["--save_device_map", "/no/such/folder/map.json"], "cannot write --save_device_map"),
    (MULTI, ["--stats_json", "/no/such/folder/stats.json"], "cannot write --stats_json"),
    (MULTI, ["--max_memory", "cpu=lots"], "not a size like 38GiB"),
]


@pytest.mark.parametrize("scripts,args,match", CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_flags_give_one_clear_error(scripts, args, match, checkpoint, tmp_path, capsys, no_weight_loading):
    args = args(tmp_path) if callable(args) else args
    for script in scripts:
        argv = ["--model", str(checkpoint), "--prompt", "x", "--output", str(tmp_path / "o.jsonl"), *args]
        expect_one_error(MAINS[script], argv, capsys, match)
        assert not (tmp_path / "o.jsonl").exists()


def test_max_memory_takes_plain_bytes():
    # The error message offers "1000000" as an example, so a bare number of bytes must parse.
    assert parse_max_memory("cpu=1000000") == {"cpu": 1000000}
