"""train.py --streaming: a .jsonl file read lazily, sharded by data-parallel rank (the same rows for every stage of a
pipeline), bounded by --max_steps, resumed at the exact row; bad combinations end with one clear error."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_system.data import DataError, load_records, load_tokenizer
from moe_system.data.mixture import SourceTokenCounter, StreamingRows, streaming_files
from moe_system.training.args import parse_args

ROOT = Path(__file__).resolve().parents[1]
RECORDS = 30  # a short file: 8 steps of 8 rows wrap around it twice, on one rank and on two
GLOBAL_BATCH = 8


def launcher(nproc: int) -> list[str]:
    return [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", str(nproc)]


def train(nproc: int, data: Path, out: Path, *extra, script="train.py", fault=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(fault or {})}
    batch = GLOBAL_BATCH if "hybrid" in extra else GLOBAL_BATCH // nproc  # the same global batch of rows
    cmd = ["timeout", "-k", "5", "200", *launcher(nproc), str(ROOT / script), "--streaming", "--dataset", str(data),
           "--max_steps", "8", "--save_interval", "4", "--log_interval", "1", "--batch_size", str(batch),
           "--precision", "fp32", "--output_path", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def final_weights(out: Path) -> dict:
    weights = {}
    for f in sorted((out / "final").glob("*.safetensors")):
        weights.update(load_file(f))
    assert weights
    return weights


def first_loss(out: Path) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["train/lm_loss"] for r in records if r["step"] == 1 and "train/lm_loss" in r)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "train.jsonl"
    lines = [json.dumps(r) for r in load_records("bundled")[:RECORDS]]
    lines.insert(7, "")  # blank lines are no records
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    @functools.cache
    def run(nproc: int) -> Path:
        out = tmp_path_factory.mktemp(f"straight{nproc}")
        result = train(nproc, data, out)
        assert result.returncode == 0, result.stderr[-3000:]
        return out
    return run


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_streaming_kill_then_resume_is_bit_exact(data, straight, tmp_path, nproc):
    reference = straight(nproc)
    state = json.loads((reference / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stream_rows_per_rank"] == 4 * GLOBAL_BATCH // nproc and state["epoch"] is None

    out = tmp_path / "broken"  # SIGKILL right after checkpoint-4 was published
    killed = train(nproc, data, out, script="tests/workers/fault_launcher.py", fault={"FAULT_KILL_AFTER_SAVE": "1"})
    assert killed.returncode not in (0, 124) and (out / "checkpoint-4").is_dir() and not (out / "final").exists()
    resumed = train(nproc, data, out, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stdout and "streaming" in resumed.stdout

    a, b = final_weights(reference), final_weights(out)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.distributed
def test_streaming_shards_by_data_parallel_rank_and_feeds_a_pipeline_one_stream(data, straight, tmp_path):
    """Step 1 is the same global batch of records 0-7 (the same initial weights, dropless routing) whether one
    process reads them, two EP ranks read the even and the odd ones, or a two-stage pipeline (one data-parallel
    rank) reads them all on both stages: its last stage takes the labels of the rows its first stage embedded."""
    one = first_loss(straight(1))
    ep = first_loss(straight(2))
    out = tmp_path / "pipeline"
    result = train(2, data, out, "--plugin", "hybrid", "--pp_size", "2", "--ep_size", "1", "--microbatch_size", "4",
                   "--max_steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ep == pytest.approx(one, rel=1e-5) and first_loss(out) == pytest.approx(one, rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--streaming", "--dataset", "x.jsonl"], "set --max_steps"),
    (["--streaming", "--dataset", "a.jsonl:0.5,b.jsonl:0.5", "--max_steps", "2"], "not a weighted mix"),
    (["--streaming", "--dataset", "x.jsonl", "--max_steps", "2", "--packing", "pack"], "drop --packing pack"),
    (["--streaming", "--dataset", "x.jsonl", "--max_steps", "2", "--objective", "ul2"], "drop --objective ul2"),
])
def test_streaming_refuses_bad_flag_combinations(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_streaming_reads_local_jsonl_or_txt_only(tmp_path):
    for spec in ("bundled", "synthetic", "yizhongw/self_instruct", str(tmp_path / "missing.jsonl")):
        with pytest.raises(DataError, match="drop --streaming"):
            streaming_files(spec)
    (tmp_path / "rows.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="drop --streaming"):
        streaming_files(str(tmp_path / "rows.parquet"))
    with pytest.raises(DataError, match="no .jsonl or .txt"):
        streaming_files(str(tmp_path))
    for name in ("b.txt", "a.jsonl"):
        (tmp_path / name).write_text("")
    assert streaming_files(str(tmp_path)) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]


def test_streaming_rows_skip_malformed_and_need_a_record_per_rank(tmp_path):
    tokenizer = load_tokenizer(None)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n{"oops": 1}\n\n{"text": "two"}\n')
    with pytest.raises(DataError, match="--skip_malformed"):
        list(StreamingRows([str(path)], tokenizer, 16, rank=0, world_size=1))
    rows = list(StreamingRows([str(path)], tokenizer, 16, rank=0, world_size=1, skip_malformed=True))
    assert len(rows) == 2
    StreamingRows([str(path)], tokenizer, 16, rank=0, world_size=3).check_every_rank_has_rows()
    with pytest.raises(DataError, match="3 record.s. for 4 data-parallel ranks"):
        StreamingRows([str(path)], tokenizer, 16, rank=0, world_size=4).check_every_rank_has_rows()


def test_source_token_counts_round_trip_through_a_checkpoint_state():
    counter = SourceTokenCounter(["a", "b"])
    counter.update({"source": torch.tensor([0, 1]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
                    "labels": torch.tensor([[-100, 5, -100], [-100, 5, 6]])})
    state = json.loads(json.dumps(counter.state_dict()))  # as saved in trainer_state.json
    restored = SourceTokenCounter(["b", "a", "c"])  # matched by label; a new source starts at zero
    restored.load_state_dict(state)
    assert restored.stats() == {"data/b/tokens": 3, "data/b/target_tokens": 2, "data/a/tokens": 2,
                                "data/a/target_tokens": 1, "data/c/tokens": 0, "data/c/target_tokens": 0}
