"""Small reductions (token counts, expert loads, flags) hand collectives tensors on the accelerator's device.

NCCL rejects CPU tensors and gloo, the tests' backend, takes them, so a real reduction cannot tell. Here the
accelerator reports the meta device, which no tensor reaches by accident, every group has two ranks, and each
collective records the devices of its tensors and stops the call (a meta tensor holds no values to go on with).
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from colossalai.accelerator import get_accelerator

from moe_system.data import load_tokenizer
from moe_system.data.mixture import SourceTokenCounter, StreamingRows
from moe_system.moe.balancing import update_expert_bias
from moe_system.moe.load import ExpertLoadMeter, global_counts
from moe_system.training import interrupt

COMM_DEVICE = torch.device("meta")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "isend", "irecv")


class Reached(Exception):
    """A collective was called (its tensors' devices are recorded)."""


def tensors_in(args) -> list[torch.Tensor]:
    found = []
    for arg in args:
        if torch.is_tensor(arg):
            found.append(arg)
        elif isinstance(arg, (list, tuple)):
            found += tensors_in(arg)
    return found


@pytest.fixture
def devices(monkeypatch, tmp_path):
    """The device of every tensor handed to a collective, in a one-process gloo world posing as two ranks."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    seen = []

    def collective(*args, **kwargs):
        seen.extend(t.device for t in tensors_in([*args, *kwargs.values()]))
        raise Reached

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, collective)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(type(get_accelerator()), "get_current_device", lambda self: COMM_DEVICE)
    yield seen
    monkeypatch.undo()
    dist.destroy_process_group()


def counter():
    counts = SourceTokenCounter(["a", "b"])
    counts.update({"source": torch.tensor([0, 1]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
                   "labels": torch.tensor([[-100, 5, -100], [-100, 5, 6]])})
    return counts


def meter():
    moe = SimpleNamespace(routed_total=torch.zeros(4), dropped_total=torch.zeros(4), expert_bias=torch.zeros(4))
    load = ExpertLoadMeter([moe])
    moe.routed_total += torch.tensor([3.0, 1.0, 0.0, 0.0])
    return load


def streaming(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n')
    return StreamingRows([str(path)], load_tokenizer(None), 16, rank=0, world_size=2, skip_malformed=True)


CALLS = {
    "mixture token counts for the log": lambda group, tmp_path: counter().stats(group),
    "mixture token counts for a checkpoint": lambda group, tmp_path: counter().state_dict(group),
    "expert loads of a stage without MoE layers": lambda group, tmp_path: global_counts([], [group]),
    "expert loads": lambda group, tmp_path: global_counts(meter().counts(), [group]),
    "expert bias update": lambda group, tmp_path: update_expert_bias(meter(), 0.01, group),
    "stop request": lambda group, tmp_path: interrupt.stop_requested(),
    "streaming rows for every rank": lambda group, tmp_path: streaming(tmp_path).check_every_rank_has_rows(group),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_small_reductions_use_the_accelerator_device(devices, call, tmp_path):
    with pytest.raises(Reached):
        call(dist.group.WORLD, tmp_path)
    assert devices and all(device == COMM_DEVICE for device in devices), devices
