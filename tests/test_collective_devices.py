"""No collective of a training run gets a tensor that a GPU run would leave on the host (NCCL rejects those).

gloo takes host tensors and on a CPU-only machine every tensor is on the CPU, so workers/collective_devices.py
follows, under a torch function mode, where each tensor would live with a GPU, and records each collective
handed a host one. Two runs on two ranks with every feature that reduces something: a weighted mix of two
local files (per-source token counts), expert loads logged every step, expert parallelism with rebalancing
every step, evaluation and a checkpoint every step, then a resumed run.
"""

import json

import pytest
from dist_common import launch

from moe_system.data import load_records


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run(tmp_path, name: str, flags: list[str]) -> tuple[list[dict], str]:
    out = tmp_path / name
    out.mkdir()
    # The CPU path even where a GPU is present: the worker stands in for a GPU itself.
    done = launch("collective_devices.py", 2, [str(out), *flags], timeout=150, extra_env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)], done.stdout


@pytest.mark.distributed
@pytest.mark.slow
def test_no_collective_of_a_training_run_gets_a_host_tensor(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", load_records("bundled")[:40])
    text = write_jsonl(tmp_path / "text.jsonl", load_records("bundled-text")[:40])
    flags = ["--plugin", "ep", "--dataset", f"{pairs}:0.7,{text}:0.3", "--eval_dataset", pairs,
             "--eval_samples", "2", "--batch_size", "2", "--max_length", "24", "--on_overlong", "truncate",
             "--log_interval", "1", "--eval_interval", "1", "--save_interval", "1", "--load_balance",
             "--load_balance_interval", "1", "--output_path", str(tmp_path / "train")]
    # The resumed run takes two steps: rebalancing skips a run's last one.
    first, _ = run(tmp_path, "first", [*flags, "--max_steps", "2"])
    resumed, resumed_stdout = run(tmp_path, "resumed", [*flags, "--max_steps", "4", "--resume", "latest"])
    ranks = first + resumed

    metrics = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = {key: sorted({m["step"] for m in metrics if any(k.startswith(key) for k in m)})
             for key in ("data/", "moe/", "rebalance/", "eval/")}
    assert steps == {"data/": [1, 2, 3, 4], "moe/": [1, 2, 3, 4], "rebalance/": [1, 3], "eval/": [1, 2, 3, 4]}, steps
    assert "resumed at step 2" in resumed_stdout

    found = [v for rank in ranks for v in rank["violations"]]
    assert not found, "collectives given host tensors:\n" + "\n".join(map(str, found))
    # The mode saw the run's collectives: loss parts, token counts and expert loads (all-reduce), the expert
    # exchange (all-to-all), ZeRO's parameter gather.
    for rank in ranks:
        calls = rank["calls"]
        assert calls.get("all_reduce", 0) >= 8 and calls.get("all_to_all_single", 0) >= 8, calls
        assert calls.get("all_gather_into_tensor", 0) >= 2, calls
    # And it tells: of a moved and an unmoved small reduction, exactly the unmoved one is reported.
    for rank in ranks:
        assert [(v["op"], v["shape"]) for v in rank["control"]] == [("all_reduce", [1])], rank["control"]
