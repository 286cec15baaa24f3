"""Weighted data mixes, per-source token counts, streaming text, and train.py with --objective ul2 / a mix."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_system.data import DataError, build_dataset, load_records, load_tokenizer
from moe_system.data.mixture import MixtureRows, SourceTokenCounter, StreamingRows, parse_sources
from moe_system.training.sampler import ResumableDistributedSampler

ROOT = Path(__file__).resolve().parents[1]


class Numbered(torch.utils.data.Dataset):
    """Row i is just its own index, so a mixture's draws can be read off directly."""

    def __init__(self, n, offset):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([self.offset + i])}


def test_parse_sources():
    assert parse_sources("bundled") == [("bundled", 1.0)]
    assert parse_sources("bundled-text:0.7, data/x.jsonl:0.3") == [("bundled-text", 0.7), ("data/x.jsonl", 0.3)]
    assert parse_sources("org/name,b:2") == [("org/name", 1.0), ("b", 2.0)]
    for bad in ["a:-1", "a:0,b:1", ":1", "a:nan,b:1", "a:inf", "a,,b", ""]:
        with pytest.raises(DataError, match="each weight a number above 0"):
            parse_sources(bad)
    with pytest.raises(DataError, match="'x' of 'bundled:x' is not a number"):  # not read as a hub name
        parse_sources("bundled:x")


def test_parse_sources_keeps_an_existing_path_with_a_colon(tmp_path):
    path = tmp_path / "run:2.jsonl"
    path.write_text("")
    assert parse_sources(f"{path},bundled:3") == [(str(path), 1.0), ("bundled", 3.0)]


def test_mixture_draws_by_weight_and_reads_each_source_without_repeats():
    small, large = Numbered(100, 0), Numbered(10_000, 1_000_000)
    mix = MixtureRows([small, large], [0.3, 0.7], seed=1, num_rows=20_000)
    draws = [int(mix[i]["source"]) for i in range(len(mix))]
    share = draws.count(0) / len(draws)
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / len(draws)) ** 0.5, share
    small_rows = [int(mix[i]["input_ids"]) for i in range(len(mix)) if draws[i] == 0]
    # The upweighted small source is cycled: every row once per pass, passes in the same seeded order.
    assert sorted(small_rows[:100]) == list(range(100)) and small_rows[100:200] == small_rows[:100]
    large_rows = [int(mix[i]["input_ids"]) for i in range(len(mix)) if draws[i] == 1]
    assert len(set(large_rows[:10_000])) == min(len(large_rows), 10_000)


def test_mixture_is_deterministic_and_resumes_at_the_exact_sample():
    mix = MixtureRows([Numbered(50, 0), Numbered(70, 1000)], [1, 1], seed=3)
    again = MixtureRows([Numbered(50, 0), Numbered(70, 1000)], [1, 1], seed=3)
    assert len(mix) == 120 and all(torch.equal(mix[i]["input_ids"], again[i]["input_ids"]) for i in range(120))

    def rows(start):
        sampler = ResumableDistributedSampler(mix, num_replicas=2, rank=1, shuffle=True, seed=3)
        sampler.set_epoch(2, start)
        return [int(mix[i]["input_ids"]) for i in sampler]

    full = rows(0)
    assert rows(17) == full[17:]


def test_source_token_counter_counts_real_and_target_tokens():
    counter = SourceTokenCounter(["a", "b"])
    counter.update({"source": torch.tensor([0, 1, 1]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]),
                    "labels": torch.tensor([[-100, 5, -100], [-100, 5, 6], [-100, -100, -100]])})
    assert counter.stats() == {"data/a/tokens": 2, "data/a/target_tokens": 1, "data/b/tokens": 4,
                               "data/b/target_tokens": 2}


def test_streaming_rows_match_build_dataset_shard_by_rank_and_skip(tmp_path):
    tokenizer = load_tokenizer(None)
    records = load_records("bundled")[:40]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = build_dataset(records, tokenizer, 48, on_overlong="truncate")
    whole = list(StreamingRows([str(path)], tokenizer, 48, rank=0, world_size=1))
    assert len(whole) == 40
    assert all(torch.equal(row["input_ids"], expected[i]["input_ids"]) and
               torch.equal(row["labels"], expected[i]["labels"]) for i, row in enumerate(whole))
    rank1 = list(StreamingRows([str(path)], tokenizer, 48, rank=1, world_size=2))
    assert [r["input_ids"].tolist() for r in rank1] == [expected[i]["input_ids"].tolist() for i in range(1, 40, 2)]
    resumed = list(StreamingRows([str(path)], tokenizer, 48, rank=1, world_size=2, skip_rows=5))
    assert [r["input_ids"].tolist() for r in resumed] == [r["input_ids"].tolist() for r in rank1[5:]]
    endless = iter(StreamingRows([str(path)], tokenizer, 48, rank=0, world_size=1, repeat=True))
    assert torch.equal([next(endless) for _ in range(41)][40]["input_ids"], whole[0]["input_ids"])


def run_train(args, tmp_path, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "train.py", "--output_path", str(tmp_path / "run"), "--batch_size", "8",
                          "--log_interval", "1", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / "run" / "summary.json").read_text()), metrics


def test_train_with_ul2_objective(tmp_path):
    summary, metrics = run_train(["--objective", "ul2", "--dataset", "bundled-text", "--max_steps", "3",
                                  "--eval_dataset", "bundled-text"], tmp_path)
    assert summary["steps"] == 3 and summary["final_lm_loss"] > 0 and summary["eval/perplexity"] > 1


def test_train_on_a_two_source_mix_logs_per_source_tokens_and_evaluates_each_set(tmp_path):
    summary, metrics = run_train(["--dataset", "bundled:0.5,bundled-text:0.5", "--packing", "pack", "--max_steps", "3",
                                  "--eval_dataset", "bundled,bundled-text", "--eval_samples", "16"], tmp_path)
    last = [m for m in metrics if "data/bundled/tokens" in m][-1]
    assert last["data/bundled/tokens"] > 0 and last["data/bundled-text/tokens"] > 0
    assert last["data/bundled/tokens"] + last["data/bundled-text/tokens"] <= 3 * 8 * 32
    for name in ("bundled", "bundled-text"):
        assert summary[f"eval/{name}/perplexity"] > 1
    assert "eval/bundled/exact_match" in summary


@pytest.mark.distributed
def test_ul2_mix_under_the_ep_plugin_on_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["timeout", "-k", "5", "200", sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "train.py", "--plugin", "ep", "--objective", "ul2",
                          "--dataset", "bundled:0.5,bundled-text:0.5", "--max_steps", "2", "--batch_size", "4",
                          "--log_interval", "1", "--eval_dataset", "bundled,bundled-text", "--eval_samples", "8",
                          "--output_path", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step2 = [m for m in metrics if "data/bundled/tokens" in m][-1]
    # Counts are summed over both ranks: more than one rank's share of 2 steps x 4 rows could hold.
    assert step2["data/bundled/tokens"] + step2["data/bundled-text/tokens"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval/bundled-text/perplexity"] > 1
