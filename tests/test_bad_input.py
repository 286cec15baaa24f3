"""Bad input to train.py: each case ends with one clear `error: ...` line, a non-zero exit, no traceback, and
leaves what an earlier run saved untouched. Flags are checked before any work: most cases parse in-process."""

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_system.training.args import RANGES, build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max_steps", "2", "--batch_size", "4", "--eval_samples", "4", "--log_interval", "1"]
TRAIN_FLAGS = {option for action in build_parser()._actions for option in action.option_strings}


def assert_names_real_flags(message: str):
    """Every --flag an error suggests is one of train.py's."""
    named = set(re.findall(r"--[a-z][a-z0-9_]*", message))
    assert named <= TRAIN_FLAGS, f"{named - TRAIN_FLAGS} named in: {message}"


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
    return ["--dataset", str(jsonl(tmp / "long.jsonl", [record] * 8)), "--max_length", "16"], "--on_overlong truncate"


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


def case_nan_learning_rate(tmp):
    return ["--lr", "nan"], "--lr must be a finite number"


def case_nan_mix_weight(tmp):
    good = json.dumps({"prompt": "1 + 1 =", "completion": " 2"})
    a, b = jsonl(tmp / "a.jsonl", [good] * 8), jsonl(tmp / "b.jsonl", [good] * 8)
    return ["--dataset", f"{a}:nan,{b}:1"], "each weight a number above 0"


def case_max_length_beyond_the_checkpoint(tmp, ckpt):
    return ["--load_checkpoint", str(ckpt), "--max_length", "1024"], "beyond the 512 positions of the model in"


CASES = [case_corrupt_line, case_empty_file, case_overlong_sequence, case_tokenizer_bigger_than_vocab,
         case_missing_shard, case_mismatched_shapes, case_unwritable_output, case_conflicting_flags,
         case_impossible_layout, case_nothing_to_resume, case_streaming_a_hub_dataset, case_nan_learning_rate,
         case_nan_mix_weight, case_max_length_beyond_the_checkpoint]


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
    assert len(lines) == 1 and expected.lower() in lines[0].lower(), err[-3000:]
    assert_names_real_flags(lines[0])
    assert digest(earlier_run) == before  # nothing saved earlier was touched


def test_diverging_run_skips_nonfinite_steps_then_stops(tmp_path):
    # lr 1e30 turns the weights into ~1e30 at the first update; every later loss overflows to inf/nan.
    out = tmp_path / "diverge"
    result = train("--max_steps", "40", "--batch_size", "4", "--lr", "1e30", "--warmup_steps", "0",
                   "--lr_scheduler", "constant", "--max_nonfinite_steps", "3", "--save_interval", "1",
                   "--save_total_limit", "0", "--log_interval", "1", "--output_path", str(out))
    assert result.returncode != 0
    assert "3 consecutive steps had a non-finite loss" in result.stderr and "Traceback" not in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/skipped_nonfinite", 0) for r in records) == 3
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps and steps == list(range(1, steps[-1] + 1))  # every good step saved, nothing after the failure
    assert not list(out.glob(".checkpoint-*.partial")) and not (out / "final").exists()


# (flags, what the one error line says): refused by parse_args, before any process group, data or model exists.
REFUSED = [
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "-0.1"], "--lr must be above 0"),
    (["--weight_decay", "inf"], "--weight_decay must be a finite number"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be at least 0"),
    (["--router_aux_loss_factor", "nan"], "--router_aux_loss_factor must be a finite number"),
    (["--router_z_loss_factor", "-1"], "--router_z_loss_factor must be at least 0"),
    (["--z_loss_factor", "inf"], "--z_loss_factor must be a finite number"),
    (["--label_smoothing", "1"], "--label_smoothing must be at least 0 and below 1"),
    (["--router_bias_update_rate", "-0.01"], "--router_bias_update_rate must be at least 0"),
    (["--expert_init_scale", "0"], "--expert_init_scale must be above 0"),
    (["--peak_tflops", "nan"], "--peak_tflops must be a finite number"),
    (["--router_topk", "0"], "--router_topk must be at least 1"),
    (["--router_topk", "9"], "the tiny preset has 8 experts per MoE layer; use --router_topk 1 to 8"),
    (["--log_interval", "0"], "--log_interval must be at least 1"),
    (["--eval_interval", "-1"], "--eval_interval must be at least 0"),
    (["--save_interval", "0"], "--save_interval must be at least 1"),
    (["--eval_samples", "0"], "--eval_samples must be at least 1"),
    (["--max_steps", "0"], "--max_steps must be at least 1"),
    (["--max_steps", "-5"], "--max_steps must be at least 1"),
    (["--warmup_steps", "-1"], "--warmup_steps must be at least 0"),
    (["--seed", "-1"], "--seed must be in 0 .. 2**32-1"),
    (["--max_length", "1024"], "--max_length 1024 is beyond the 512 positions of the tiny preset"),
    (["--max_length", "1"], "--max_length must be at least 2"),
    (["--dataset", "a.jsonl:nan,b.jsonl:1"], "bad source 'a.jsonl:nan'"),
    (["--dataset", "a.jsonl:inf"], "bad source 'a.jsonl:inf'"),
    (["--dataset", "bundled:x"], "the weight 'x' of 'bundled:x' is not a number"),
    (["--dataset", "bundled:0"], "bad source 'bundled:0'"),
    (["--dataset", "bundled:-1"], "bad source 'bundled:-1'"),
    (["--pp_size", "4"], "--pp_size applies to --plugin hybrid only"),
    (["--dp_size", "2"], "--dp_size applies to --plugin hybrid only"),
    (["--plugin", "ep_zero", "--ep_size", "2"], "--ep_size applies to --plugin hybrid only"),
    (["--microbatch_size", "2"], "--microbatch_size applies to --plugin hybrid only"),
    (["--plugin", "hybrid", "--pp_size", "1", "--microbatch_size", "2"], "--pp_size 1 has none"),
    (["--plugin", "hybrid", "--extra_dp_size", "2"], "--extra_dp_size applies to --plugin ep_zero only"),
    (["--load_balance_interval", "10"], "pass --load_balance or drop --load_balance_interval"),
    (["--comm_overlap_chunks", "2"], "pass --comm_overlap or drop --comm_overlap_chunks"),
    (["--ul2_weights", "lm=1"], "--ul2_weights applies to --objective ul2 only"),
    (["--objective", "ul2", "--no_mask_prompt"], "drop --no_mask_prompt"),
    (["--skip_malformed"], "the built-in data has no malformed records"),
    (["--dataset", "data/rows.jsonl", "--task_name", "cfg"], "names none (local files and built-in data"),
    (["--dataset", "synthetic", "--eval_interval", "8"], "--eval_interval: this run has no held-out set"),
    (["--eval_batch_size", "0"], "--eval_batch_size must be at least 1"),
    (["--dataset", "synthetic", "--objective", "ul2"], "--objective does not apply to --dataset synthetic"),
    (["--packing", "pack", "--on_overlong", "truncate"], "--packing pack continues a long example"),
    (["--streaming", "--dataset", "x.jsonl", "--max_steps", "2", "--num_epoch", "2"], "drop --num_epoch"),
    (["--eval_dataset", "bundled,"], "has an empty name"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[" ".join(argv) for argv, _ in REFUSED])
def test_flag_out_of_range_or_unused_is_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("train.py: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert_names_real_flags(err)


def test_max_length_and_topk_are_checked_against_the_checkpoint_config(tiny_checkpoint, capsys):
    for flags, message in ((["--max_length", "1024"], "beyond the 512 positions of the model in"),
                           (["--router_topk", "9"], "has 8 experts per MoE layer")):
        with pytest.raises(SystemExit):
            parse_args(["--load_checkpoint", str(tiny_checkpoint), *flags])
        assert message in capsys.readouterr().err
    assert parse_args(["--load_checkpoint", str(tiny_checkpoint), "--max_length", "512"]).max_length == 512


def test_every_numeric_flag_has_a_range():
    numeric = {action.dest for action in build_parser()._actions if action.type in (int, float)}
    assert numeric == set(RANGES)


def test_flags_that_apply_are_accepted_and_unused_defaults_stay_out_of_the_way():
    hybrid = parse_args(["--plugin", "hybrid"])
    assert (hybrid.pp_size, hybrid.dp_size, hybrid.ep_size, hybrid.microbatch_size) == (2, 1, 2, 1)
    for argv in (["--plugin", "hybrid", "--pp_size", "2", "--microbatch_size", "2", "--ep_size", "1"],
                 ["--plugin", "ep_zero", "--extra_dp_size", "2"],
                 ["--load_balance", "--load_balance_interval", "5"],
                 ["--comm_overlap", "--comm_overlap_chunks", "2"],
                 ["--dataset", "yizhongw/self_instruct:0.5,data/rows.jsonl:0.5", "--task_name", "cfg"],
                 ["--dataset", "data/rows.jsonl", "--skip_malformed", "--eval_dataset", "data/held.jsonl",
                  "--eval_samples", "10", "--eval_interval", "5"],
                 ["--dataset", "synthetic", "--eval_samples", "8"],
                 ["--max_steps", "1", "--lr", "0.5", "--label_smoothing", "0.1", "--max_grad_norm", "0"]):
        parse_args(argv)


def documented_command_lines() -> list[list[str]]:
    """train.py's flags in every README example and every train.sh launch preset (the latter as train.sh
    passes them to a stand-in `colossalai`, with and without a DATASET of one's own)."""
    commands = []
    for line in (ROOT / "README.md").read_text().replace("\\\n", " ").splitlines():
        words = shlex.split(line.split("#")[0]) if line.startswith(("python train.py", "colossalai run")) else []
        if "train.py" in words and "..." not in words:
            commands.append(words[words.index("train.py") + 1:])
    stand_in = 'colossalai() { printf "%s\\n" "$@"; }; export -f colossalai; bash train.sh "$0"'
    for preset in ("cpu-smoke", "ep", "ep_zero", "hybrid", "ep-2node", "ep_zero-2node"):
        for dataset in ("", "data/rows.jsonl"):
            env = {**os.environ, "TOKENIZER": "/path/to/umt5", "DATASET": dataset}
            words = subprocess.run(["bash", "-c", stand_in, preset], cwd=ROOT, env=env, capture_output=True,
                                   text=True, timeout=60, check=True).stdout.splitlines()
            commands.append(words[words.index("train.py") + 1:])
    return commands


def test_readme_examples_and_train_sh_presets_parse(capsys):
    commands = documented_command_lines()
    assert len(commands) >= 15 and ["--dataset", "bundled-text:0.7,bundled:0.3", "--on_overlong", "truncate"] \
        in commands
    for argv in commands:
        try:
            parse_args(argv)
        except SystemExit:
            pytest.fail(f"train.py {shlex.join(argv)}: {capsys.readouterr().err}")


def test_readme_mix_example_trains(tmp_path):
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("python train.py --dataset bundled-text:0.7,bundled:0.3"))
    out = tmp_path / "mix"
    result = train(*shlex.split(line.split("#")[0])[2:], *FAST, "--output_path", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
