"""The loop's parts on their own: the progress counters a checkpoint stores, what one optimizer step reports,
and evaluation that holds neither a batch's full-vocabulary logits nor more rows than --eval_batch_size."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_system.training import step as step_module
from moe_system.training.step import NONFINITE_GRAD, NONFINITE_LOSS, OK, OVERFLOW, TrainState, train_step

ROOT = Path(__file__).resolve().parents[1]


def test_train_state_round_trip_keeps_the_checkpoint_keys():
    state = TrainState(step=7, skipped=2, overflows=1, consumed=10, bad_in_a_row=1)
    saved = json.loads(json.dumps(state.state_dict()))  # as trainer_state.json holds it
    assert saved == {"step": 7, "skipped_steps": 2, "overflow_steps": 1, "consumed_steps": 10}
    restored = TrainState()
    restored.load_state_dict(saved)
    assert restored == TrainState(step=7, skipped=2, overflows=1, consumed=10)  # a resume starts a clean record


def test_train_state_loads_a_checkpoint_without_overflow_and_position():
    restored = TrainState()
    restored.load_state_dict({"step": 5, "skipped_steps": 1})
    assert (restored.step, restored.overflows, restored.consumed) == (5, 0, 5)


def test_train_state_counts_each_outcome():
    state = TrainState()
    for outcome in (OK, NONFINITE_LOSS, NONFINITE_GRAD, OVERFLOW, OK):
        state.record(outcome)
    assert (state.step, state.skipped, state.overflows, state.bad_in_a_row) == (2, 2, 1, 0)
    state.record(NONFINITE_GRAD)
    state.record(OVERFLOW)  # routine: neither breaks nor extends a run of bad steps
    assert state.bad_in_a_row == 1


class FakeOptimizer:
    def __init__(self, nonfinite=False, overflow=False):
        self.nonfinite, self.overflow, self.calls = nonfinite, overflow, []

    def step(self):
        self.calls.append("step")
        self.skipped_nonfinite, self.skipped_overflow = self.nonfinite, self.overflow

    def zero_grad(self):
        self.calls.append("zero_grad")


class FakeScheduler:
    steps = 0

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("loss, optimizer, outcome", [
    (1.0, FakeOptimizer(), OK),
    (float("nan"), FakeOptimizer(), NONFINITE_LOSS),
    (1.0, FakeOptimizer(nonfinite=True), NONFINITE_GRAD),
    (1.0, FakeOptimizer(overflow=True), OVERFLOW),
    (1.0, FakeOptimizer(nonfinite=True, overflow=True), NONFINITE_GRAD),  # fp16 overflow at the minimum scale
])
def test_train_step_outcomes(monkeypatch, loss, optimizer, outcome):
    parts = {"lm_loss": torch.tensor(loss), "aux_loss": torch.tensor(0.1), "router_z_loss": torch.tensor(0.0),
             "tokens": torch.tensor(8.0)}
    monkeypatch.setattr(step_module, "forward_backward", lambda *args: parts)
    plugin = type("Plugin", (), {"pp_size": 1, "dp_group": None})()
    scheduler, hooks = FakeScheduler(), []
    result = train_step(None, None, optimizer, scheduler, [{}], plugin, "cpu", [lambda: hooks.append(1)])
    # read back once, as Python numbers
    assert result.outcome == outcome and result.parts == pytest.approx({k: v.item() for k, v in parts.items()},
                                                                       nan_ok=True)
    updated = outcome == OK
    assert (hooks == [1]) == updated and scheduler.steps == int(updated)  # hooks and LR only after an update
    assert optimizer.calls == (["zero_grad"] if outcome == NONFINITE_LOSS else ["step", "zero_grad"])


def test_exact_match_prefills_only_the_last_position_and_bounds_the_batch():
    from moe_system.data import load_records, load_tokenizer
    from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
    from moe_system.training.evaluate import exact_match

    torch.manual_seed(0)
    model = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny"))
    tokenizer = load_tokenizer(None, vocab_size=model.config.vocab_size)
    records = [r for r in load_records("bundled", None, "heldout") if "prompt" in r][:5]
    shapes = []
    model.register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.logits.shape)))
    exact_match(model, tokenizer, records, "cpu", batch_size=2)
    assert shapes and all(shape[1] == 1 for shape in shapes)  # never [B, T, vocab]
    assert max(shape[0] for shape in shapes) == 2


def test_shared_rounds_deal_batches_out_by_key_and_pad_the_short_rounds():
    from moe_system.training.evaluate import shared_rounds

    assert shared_rounds([None] * 5, 2) == [(None, [0, 1]), (None, [2, 3]), (None, [4, None])]
    assert shared_rounds([None] * 3, 1) == [(None, [0]), (None, [1]), (None, [2])]
    # Capacity dispatch: one shape per round, so the expert slots are sized alike on every rank.
    assert shared_rounds([(2, 9), (2, 9), (1, 9)], 2) == [((2, 9), [0, 1]), ((1, 9), [2, None])]


def test_one_process_evaluates_without_collectives_and_extra_decode_steps_change_no_completion(monkeypatch):
    """World 1 (no group): no reduction is made; decoding further than a batch needs (as ranks decoding together
    do) gives the same completions."""
    import torch.distributed as dist

    from moe_system.data import build_dataset, load_records, load_tokenizer
    from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
    from moe_system.training.evaluate import evaluate_loss, exact_match, greedy_complete

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective in a single process")

    monkeypatch.setattr(dist, "all_reduce", no_collective)
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny"))
    tokenizer = load_tokenizer(None, vocab_size=model.config.vocab_size)
    records = [r for r in load_records("bundled", None, "heldout") if "prompt" in r][:3]
    prompts = [r["prompt"] for r in records]
    assert greedy_complete(model, tokenizer, prompts, 3, "cpu", decode_steps=8) == \
        greedy_complete(model, tokenizer, prompts, 3, "cpu")
    rows = build_dataset(records, tokenizer, 32, mode="pad", on_overlong="truncate")
    assert math.isfinite(evaluate_loss(model, torch.utils.data.DataLoader(rows, batch_size=2), "cpu")["eval/loss"])
    assert 0.0 <= exact_match(model, tokenizer, records, "cpu", batch_size=2) <= 1.0


def _reference_loss(final_dir: Path, eval_samples: int, max_length: int, dataset: str = "bundled",
                    batch_size: int = 64) -> float:
    """The held-out loss of the saved model in this one process."""
    import moe_system.model  # noqa: F401
    from transformers import AutoModelForCausalLM

    from moe_system.data import build_dataset, load_records, load_tokenizer
    from moe_system.training.evaluate import evaluate_loss

    model = AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(None, vocab_size=model.config.vocab_size)
    records = load_records(dataset, None, "heldout")[:eval_samples]
    rows = build_dataset(records, tokenizer, max_length, mode="pad", on_overlong="truncate")
    return evaluate_loss(model, torch.utils.data.DataLoader(rows, batch_size=batch_size), "cpu")["eval/loss"]


@pytest.mark.distributed
@pytest.mark.slow
def test_pipeline_evaluates_through_the_schedule_like_one_process(tmp_path):
    """Two gloo ranks, pp=2: the periodic and the final held-out loss (uneven last batch, label smoothing and z-loss
    on) equal the saved model's loss in one process, and training continues after a periodic evaluation; exact
    match is skipped with one note."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--plugin", "hybrid", "--pp_size", "2", "--ep_size", "1", "--microbatch_size", "2", "--zero_stage", "0",
           "--precision", "fp32", "--max_steps", "2", "--batch_size", "4", "--max_length", "32",
           "--eval_interval", "1", "--eval_samples", "11", "--eval_batch_size", "4", "--label_smoothing", "0.1",
           "--z_loss_factor", "0.01", "--output_path", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    periodic = [r["eval/loss"] for r in records if "eval/loss" in r and "steps" not in r]
    summary = json.loads((out / "summary.json").read_text())
    want = _reference_loss(out / "final", eval_samples=11, max_length=32)
    assert len(periodic) == 2 and periodic[1] == pytest.approx(want, rel=1e-5)  # training went on after step 1's
    assert summary["eval/loss"] == pytest.approx(want, rel=1e-5) and "eval/exact_match" not in summary
    assert (result.stdout + result.stderr).count("exact match is not evaluated with a pipeline") == 1


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ep, moe_dp, samples, rows_per_replica, dispatch", [
    (2, 1, 11, (7, 4), "dropless"),  # batches of 4, 4 and 3: replica 0 holds batches 0 and 2, replica 1 batch 1
    (1, 2, 3, (3, 0), "dropless"),  # one batch: replica 1 has none
    # Capacity: the replicas' micro-batches meet in equal-split exchanges sized by their rows, so the short batch's
    # round must pair it with padding of its own size (a full-size partner would not fit the exchange).
    (2, 1, 11, (7, 4), "capacity"),
])
def test_pipeline_replicas_split_the_held_out_rows_and_agree_with_one_process(tmp_path, ep, moe_dp, samples,
                                                                               rows_per_replica, dispatch):
    """Four gloo ranks, pp=2 x dp=2 (the replicas either one EP group, whose all-to-alls pair up across them, or
    expert replicas): the held-out batches are shared out over the replicas, each stage of a replica runs only
    that replica's rows, and the loss (periodic and final) is the saved model's in one process (dropless: under
    capacity the micro-batches' token pools decide what is dropped)."""
    from moe_system.parallel.layout import Layout

    out = tmp_path / "run"
    counts = tmp_path / "counts"
    counts.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           str(ROOT / "tests" / "workers" / "counted_eval.py"), str(counts),
           "--plugin", "hybrid", "--pp_size", "2", "--ep_size", str(ep), "--dp_size", str(moe_dp),
           "--microbatch_size", "2", "--zero_stage", "0", "--precision", "fp32", "--max_steps", "2",
           "--batch_size", "4", "--max_length", "32", "--eval_dataset", "bundled", "--eval_interval", "1",
           "--eval_samples", str(samples), "--eval_batch_size", "4", "--dispatch", dispatch,
           "--output_path", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluations = 3  # after steps 1 and 2, and the final one
    rows = {rank: json.loads((counts / f"eval_rows-{rank}.json").read_text()) for rank in range(4)}
    replica = {rank: Layout(world=4, pp=2, ep=ep, moe_dp=moe_dp, rank=rank).data_parallel_rank for rank in range(4)}
    # Both stages of a replica run its rows (a replica without rows still runs the others' micro-batch count).
    assert {rank: sum(calls) for rank, calls in rows.items()} == {
        rank: rows_per_replica[replica[rank]] * evaluations for rank in range(4)}, rows
    if dispatch == "capacity":
        return
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    periodic = [r["eval/loss"] for r in records if "eval/loss" in r and "steps" not in r]
    summary = json.loads((out / "summary.json").read_text())
    want = _reference_loss(out / "final", eval_samples=samples, max_length=32)
    assert len(periodic) == 2 and periodic[1] == pytest.approx(want, rel=1e-5)
    assert summary["eval/loss"] == pytest.approx(want, rel=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("flags, split", [
    (["--plugin", "ep", "--zero_stage", "0"], (3, 2)),  # ep 2, dropless: batches 0 and 2 on rank 0, 1 on rank 1
    (["--plugin", "ep_zero", "--zero_stage", "1", "--extra_dp_size", "2"], (3, 2)),  # expert replicas
    (["--plugin", "ep", "--zero_stage", "0", "--dispatch", "capacity"], None),  # rounds of one shape
])
def test_ranks_off_the_pipeline_split_the_held_out_rows_and_agree_with_one_process(tmp_path, flags, split):
    """Two gloo ranks without a pipeline, 5 held-out prompt/completion rows in batches of 2: each row's loss and
    greedy completion are evaluated on exactly one rank, every rank runs as many forwards, and the loss and exact
    match equal the saved model's in one process (completion by completion)."""
    from transformers import AutoModelForCausalLM

    from moe_system.data import load_records, load_tokenizer

    records = [r for r in load_records("bundled", None, "heldout") if "prompt" in r][:5]
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in records))
    out, counts = tmp_path / "run", tmp_path / "counts"
    counts.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "workers" / "counted_eval.py"), str(counts), *flags, "--precision", "fp32",
           "--max_steps", "2", "--batch_size", "2", "--max_length", "32", "--eval_dataset", str(held),
           "--eval_batch_size", "2", "--output_path", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads((counts / f"eval_calls-{rank}.json").read_text()) for rank in range(2)]
    # One evaluation (the final one): every row on exactly one rank, the ranks in step.
    assert sum(sum(c["loss_rows"]) for c in calls) == 5, calls
    completed = sorted(pair for c in calls for pair in c["completions"])
    assert sorted(p for p, _ in completed) == sorted(r["prompt"] for r in records), calls
    if split is not None:
        assert [sum(c["loss_rows"]) for c in calls] == list(split), calls
        assert [len(c["completions"]) for c in calls] == list(split), calls
    assert calls[0]["forwards"] == calls[1]["forwards"] > 0, calls

    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    tokenizer = load_tokenizer(None, vocab_size=model.config.vocab_size)
    # Each row's completion is the single process's greedy one. A step whose two best logits are closer than
    # another CPU's rounding could be (reduction order differs between layouts) may go either way: such rows are
    # left out of the comparison, never all of them.
    steps = {}  # the run's batches of 2, each decoded as far as its longest reference plus one
    for start in range(0, 5, 2):
        batch = records[start:start + 2]
        longest = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in batch)
        steps.update({r["prompt"]: longest + 1 for r in batch})
    decided = 0
    for prompt, got in completed:
        text, margin = _greedy_with_margin(model, tokenizer, prompt, steps[prompt])
        if margin > 1e-3:
            assert got == text, (prompt, got, text)
            decided += 1
    assert decided >= 3, decided
    # The run's exact match is the fraction of its own completions equal to the references.
    hits = sum(got.strip() == next(r for r in records if r["prompt"] == p)["completion"].strip() for p, got in completed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/exact_match"] == pytest.approx(hits / 5, abs=1e-12)
    assert summary["eval/loss"] == pytest.approx(
        _reference_loss(out / "final", eval_samples=5, max_length=32, dataset=str(held), batch_size=2), rel=1e-5)


@torch.no_grad()
def _greedy_with_margin(model, tokenizer, prompt: str, steps: int) -> tuple[str, float]:
    """One process's greedy completion of prompt (up to steps tokens, cut at EOS) and the smallest gap between
    the two best logits over the steps it took."""
    from moe_system.data import prompt_ids

    ids, new, margin = torch.tensor([prompt_ids(tokenizer, prompt)]), [], float("inf")
    for _ in range(steps):
        top = model(input_ids=ids).logits[0, -1].topk(2)
        margin = min(margin, float(top.values[0] - top.values[1]))
        token = int(top.indices[0])
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True), margin


def test_a_resumed_run_takes_the_architecture_its_checkpoint_saved(tmp_path):
    """A run started from --load_checkpoint of a model no preset describes resumes as that model (train.py refuses
    --load_checkpoint beside --resume, so the preset would otherwise be built and fail to load)."""
    from moe_system.model import OpenMoeConfig
    from moe_system.training.args import parse_args
    from moe_system.training.loop import build_model_config

    saved = OpenMoeConfig.from_preset("tiny", num_experts=6, hidden_size=48)
    saved.save_pretrained(tmp_path / "checkpoint-3" / "model")
    args = parse_args(["--model_name", "tiny", "--output_path", str(tmp_path), "--router_aux_loss_factor", "0.5"])
    config = build_model_config(args, resume_from=str(tmp_path / "checkpoint-3"))
    assert (config.num_experts, config.hidden_size) == (6, 48)
    assert config.router_aux_loss_factor == 0.5  # the run's flags still apply
    assert build_model_config(args).num_experts == OpenMoeConfig.from_preset("tiny").num_experts
