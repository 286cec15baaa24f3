"""Host synchronisations of a training step, counted on the CPU (tests/sync_counter.py says what counts as one).

The MoE layers count and reorder tokens on the device only; expert parallelism reads back exactly one thing per
dropless layer, the split sizes of its uneven all-to-all (flat or two-level); the step adds one read of its loss
parts and the optimizer its gradient norm, with or without a pipeline. tests/test_gpu.py counts the real ones on
CUDA with sync debug mode.
"""

import json

import pytest
import torch
from dist_common import launch
from sync_counter import HostSyncCounter

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM

# Where each remaining sync of a step comes from (the model's own layers add none on one device):
LOSS_SYNCS = 0  # model/loss.py: ignored tokens are weighted 0, not selected; num_items stays a device tensor
STEP_SYNCS = 1  # training/step.py: one .tolist() of the stacked loss parts (log, and the finite check)
OPTIMIZER_SYNCS = 1  # parallel/optimizers.py: float() of the all-reduced gradient norm (skip decision, clipping)
EP_SYNCS_PER_LAYER = {"dropless": 1, "capacity": 0}  # the uneven all-to-all's split sizes; capacity: equal splits


def test_expert_counts_equal_bincount():
    from moe_system.moe.router import expert_counts

    g = torch.Generator().manual_seed(0)
    for num_experts, size in ((8, 0), (8, 1), (8, 37), (64, 4096)):
        idx = torch.randint(0, num_experts // 2, (size,), generator=g)  # upper experts get nothing
        assert torch.equal(expert_counts(idx, num_experts), torch.bincount(idx, minlength=num_experts))


def tiny_model(dispatch: str, rebalanced: bool = False) -> OpenMoeForCausalLM:
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny", dispatch=dispatch, min_capacity=2)).train()
    if rebalanced:  # experts moved by load rebalancing: the slot map joins the path
        for layer in model.moe_layers():
            layer.expert_slot = torch.randperm(layer.num_experts)
    return model


@pytest.mark.parametrize("dispatch, rebalanced", [("dropless", False), ("dropless", True), ("capacity", False)])
def test_model_forward_backward_has_no_host_sync(dispatch, rebalanced):
    """The decoder to its hidden states and the router losses, and their backward, on one device: no sync at all."""
    model = tiny_model(dispatch, rebalanced)
    ids = torch.randint(3, model.config.vocab_size, (2, 32))
    with HostSyncCounter() as syncs:
        out = model.model(input_ids=ids)
        (out.last_hidden_state.square().mean() + out.aux_loss + out.z_loss).backward()
    assert syncs.count == 0, dict(syncs.locations)
    assert all(p.grad is not None for p in model.parameters() if p is not model.lm_head.weight)


def test_counter_sees_what_would_sync():
    x, w = torch.arange(4.0), torch.ones(4, requires_grad=True)
    with HostSyncCounter() as syncs:
        x.tolist(), float(x[0]), bool(x[1] > 0), x[x > 1], torch.bincount(x.long()), x.nonzero()
        if x.sum():
            pass
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]), output_size=3)  # sized: no sync
        (w * x)[torch.tensor([0, 2])].sum().backward()  # integer indexing, forward and backward: no sync
    assert syncs.count == 8, dict(syncs.locations)


@pytest.fixture(scope="module", params=[1, 2])
def counted_step(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("syncs") / "result.json"
    proc = launch("dist_host_syncs.py", request.param, [str(out)], timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = json.loads(out.read_text())["ranks"]
    assert len(ranks) == request.param
    return ranks


@pytest.mark.distributed
def test_train_step_syncs_only_where_stated(counted_step):
    """One train_step through the default plugin's booster (one process: ZeRO-0; two: EP over both, ZeRO-1)."""
    for rank in counted_step:
        step = rank["step"]
        ep_layers = step["moe_layers"] if rank["world"] > 1 else 0  # one device: the MoE layers add none
        expected = ep_layers * EP_SYNCS_PER_LAYER["dropless"] + LOSS_SYNCS + STEP_SYNCS + OPTIMIZER_SYNCS
        assert step["count"] == expected, step["where"]


@pytest.mark.distributed
def test_expert_parallel_layers_sync_once_per_dropless_layer(counted_step):
    """Two gloo ranks, every MoE layer an EP layer: forward to the hidden states and backward; with two chunks
    (--comm_overlap) as well, whose count exchange covers every chunk at once; and through the two-level exchange
    (--hierarchical_alltoall), whose one gather of the counts gives both this rank's and the split matrix."""
    if counted_step[0]["world"] == 1:
        pytest.skip("expert parallelism needs two processes")
    for rank in counted_step:
        cases = [("dropless", 1), ("dropless", 2), ("capacity", 1)]
        assert [(r["dispatch"], r["chunks"], r["hierarchical"]) for r in rank["layers"]] == \
            [(*case, False) for case in cases] + [(*case, True) for case in cases]
        for record in rank["layers"]:
            expected = record["moe_layers"] * EP_SYNCS_PER_LAYER[record["dispatch"]]
            assert record["count"] == expected, record


@pytest.mark.distributed
def test_pipeline_train_step_syncs_only_where_stated(counted_step):
    """A two-stage 1F1B pipeline (plugin hybrid): the global target count reaches the last stage's loss on the
    device, so both stages sync only for the step's loss parts and the gradient norm."""
    if counted_step[0]["world"] == 1:
        pytest.skip("a pipeline needs two processes")
    for rank in counted_step:
        step = rank["pipeline_step"]
        assert step["count"] == LOSS_SYNCS + STEP_SYNCS + OPTIMIZER_SYNCS, step["where"]
