import torch
import torch.nn.functional as F
import pytest

from moe_system.model import OpenMoeConfig
from moe_system.moe import DispatchPlan, OpenMoeSparseMLP, capacity, expert_ffn, route
from moe_system.moe.experts import swiglu3


def layer(**overrides):
    cfg = OpenMoeConfig.from_preset("tiny", **overrides)
    torch.manual_seed(0)
    moe = OpenMoeSparseMLP(cfg)
    moe.reset_parameters()
    return moe


def naive_moe(moe, x, cap):
    """Token-by-token reference of OpenMoE's sparse MLP, with the reference's capacity priority."""
    logits = x.float() @ moe.gate_weight.float().t()
    probs = logits.softmax(-1)
    weights, experts = probs.topk(moe.top_k, dim=-1)
    used = [0] * moe.num_experts
    keep = torch.zeros_like(weights, dtype=torch.bool)
    for choice in range(moe.top_k):          # all first choices before any second choice
        for t in range(x.shape[0]):          # then sequence order
            e = experts[t, choice].item()
            keep[t, choice] = cap is None or used[e] < cap
            used[e] += 1
    out = torch.zeros_like(x)
    w = moe.experts
    for t in range(x.shape[0]):
        for choice in range(moe.top_k):
            if keep[t, choice]:
                e = experts[t, choice]
                h = swiglu3(x[t] @ w.wi_gate[e], x[t] @ w.wi_up[e]) @ w.wo[e]
                out[t] += weights[t, choice] * h
    return out, keep


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_sparse_mlp_matches_token_by_token_reference(dispatch):
    moe = layer(dispatch=dispatch, capacity_factor_train=0.5).train()
    x = torch.randn(2, 24, 128)
    out, aux, z = moe(x)
    cap = moe.capacity(48)
    ref, keep = naive_moe(moe, x.view(-1, 128), cap)
    torch.testing.assert_close(out.view(-1, 128), ref, rtol=1e-5, atol=1e-5)
    if dispatch == "capacity":
        assert (~keep).any(), "the test must drop something to check the priority order"
        assert moe.last_dropped.sum().item() == (~keep).sum().item()
    assert moe.last_counts.sum().item() == 48 * moe.top_k


def test_capacity_formula():
    # floor(k*cf*S/E), made even, at least min_capacity (docs/moe.md, Capacity)
    assert capacity(2048, 32, 2, 1.25, 4) == 160
    assert capacity(100, 16, 2, 1.25, 4) == 16  # floor(15.6)=15 -> 16
    assert capacity(10, 16, 2, 1.25, 4) == 4


def test_dispatch_plan_orders_first_choices_first():
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])  # 3 tokens, top-2
    plan = DispatchPlan.build(experts, 2)
    assert plan.counts.tolist() == [3, 3]
    # expert 0 rows: token0 (1st), token2 (1st), token1 (2nd); expert 1: token1 (1st), token0 (2nd), token2 (2nd)
    assert plan.token_of_row.tolist() == [0, 2, 1, 1, 0, 2]
    assert plan.kept(2).tolist() == [[True, True], [True, False], [True, False]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_mm_equals_per_expert_loop(dtype, tol):
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 17, 3, 0, 9, 1, 13])  # includes experts with no tokens
    x = torch.randn(int(counts.sum()), 64, dtype=dtype, requires_grad=True)
    w = [torch.randn(8, 64, 2 * 96, dtype=dtype) * 0.1, torch.randn(8, 64, 96, dtype=dtype) * 0.1,
         torch.randn(8, 96, 64, dtype=dtype) * 0.1]
    results = []
    for impl in ("grouped_mm", "loop"):
        ws = [t.clone().requires_grad_() for t in w]
        xi = x.detach().clone().requires_grad_()
        y = expert_ffn(xi, counts, *ws, impl=impl)
        y.backward(torch.ones_like(y))
        results.append([y, xi.grad, *(t.grad for t in ws)])
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def expert_case(counts, dtype, hidden=64, inter=96):
    torch.manual_seed(0)
    num = len(counts)
    x = torch.randn(sum(counts), hidden, dtype=dtype)
    weights = [torch.randn(num, hidden, 2 * inter) * 0.1, torch.randn(num, hidden, inter) * 0.1,
               torch.randn(num, inter, hidden) * 0.1]
    return torch.tensor(counts), x, [w.to(dtype) for w in weights], torch.randn(x.shape).to(dtype)


def expert_results(counts, x, weights, grad_out, **kwargs):
    """expert_ffn's output and the gradients of x, wi_gate, wi_up and wo."""
    xi = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in weights]
    y = expert_ffn(xi, counts, *ws, **kwargs)
    y.backward(grad_out)
    return [y, xi.grad, *(w.grad for w in ws)]


# bf16: each of the few roundings on the way is off by up to 2^-9 of a value; a wrong row or expert is off by O(1).
EXPERT_TOLS = {torch.float32: 1e-6, torch.bfloat16: 2e-2}
DROPLESS_COUNTS = [5, 0, 17, 3, 0, 9, 1, 13]  # uneven, with experts that get no rows
CAPACITY_COUNTS = [6] * 8                      # capacity-mode expert parallelism: every expert gets cap rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [DROPLESS_COUNTS, CAPACITY_COUNTS, [0] * 4], ids=["dropless", "capacity", "empty"])
@pytest.mark.parametrize("impl", ["grouped_mm", "bmm"])
def test_expert_paths_equal_per_expert_loop(impl, counts, dtype):
    case = expert_case(counts, dtype)
    tol = EXPERT_TOLS[dtype]
    for a, b in zip(expert_results(*case, impl=impl), expert_results(*case, impl="loop")):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_known_equal_counts_run_one_batched_gemm_without_a_host_sync(monkeypatch):
    import moe_system.moe.experts as experts
    case = expert_case(CAPACITY_COUNTS, torch.float32, hidden=60)  # 60 fp32: not 16-byte aligned, no grouped GEMM
    reference = expert_results(*case, impl="loop")

    def no_sync(*args):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(experts, "_per_expert", no_sync)
    for a, b in zip(expert_results(*case, rows_per_expert=6), reference):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("counts,batched", [(DROPLESS_COUNTS, True), ([200, 0, 3], False)])
def test_fallback_pads_small_experts_into_one_batched_gemm(monkeypatch, counts, batched):
    """Without grouped GEMM: experts of at most PAD_ROWS rows go through one padded bmm, larger ones the loop."""
    import moe_system.moe.experts as experts
    monkeypatch.setattr(experts, "grouped_mm_supported", lambda *a: False)
    loops = []
    real = experts._per_expert
    monkeypatch.setattr(experts, "_per_expert", lambda *a: loops.append(1) or real(*a))
    case = expert_case(counts, torch.float32)
    out = expert_results(*case)
    assert bool(loops) != batched
    for a, b in zip(out, expert_results(*case, impl="loop")):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "bmm"])
def test_autocast_runs_gate_and_up_as_one_gemm(monkeypatch, impl):
    """Under autocast the weights are cast each call anyway; gate and up, cast side by side, are one GEMM. Same
    values as the two projections on the cast weights, and fp32 gradients for the fp32 parameters."""
    import moe_system.moe.experts as experts
    counts, x, weights, grad_out = expert_case(DROPLESS_COUNTS, torch.float32)
    widths = []
    real_grouped, real_bmm = experts._grouped, torch.bmm
    monkeypatch.setattr(experts, "_grouped", lambda a, w, o: widths.append(w.shape[-1]) or real_grouped(a, w, o))
    monkeypatch.setattr(torch, "bmm", lambda a, w: widths.append(w.shape[-1]) or real_bmm(a, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = expert_results(counts, x, weights, grad_out, impl=impl)
    assert widths == [3 * 96, 64]  # [E, H, 3I] then wo, where the two projections made three GEMMs
    monkeypatch.undo()
    bf16 = [t.bfloat16() for t in (x, *weights)]
    separate = expert_results(counts, bf16[0], bf16[1:], grad_out.bfloat16(), impl="loop")
    assert fused[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in fused[1:])
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_swiglu_without_grad_matches_the_autograd_version():
    torch.manual_seed(0)
    gate, up = torch.randn(7, 2 * 5), torch.randn(7, 5)
    expected = swiglu3(gate.clone().requires_grad_(), up.clone())
    with torch.no_grad():
        torch.testing.assert_close(swiglu3(gate.clone(), up.clone()), expected.detach(), rtol=1e-6, atol=1e-6)


def test_aux_loss_balanced_value_and_z_loss():
    # Uniform router: every expert gets the same share; aux = E * sum f*P = k.
    x = torch.randn(64, 16)
    gate = torch.zeros(8, 16)
    r = route(x, gate, 2)
    counts = torch.bincount(r.expert_idx.flatten(), minlength=8).float()
    assert torch.isclose(r.aux_loss, 8 * (counts / 64 * (1 / 8)).sum())
    assert torch.isclose(r.z_loss, torch.tensor(8.0).log() ** 2)


def test_router_noise_only_in_training_and_renormalize():
    x = torch.randn(32, 16)
    gate = torch.randn(8, 16)
    a = route(x, gate, 2, noise="gaussian", training=False)
    b = route(x, gate, 2, noise="gaussian", training=True)
    assert torch.equal(a.weights, route(x, gate, 2).weights)
    assert not torch.equal(a.weights, b.weights)
    r = route(x, gate, 2, renormalize=True)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(32))


def test_router_runs_in_fp32_for_bf16_inputs():
    moe = layer().to(torch.bfloat16)
    out, aux, z = moe(torch.randn(1, 16, 128, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and aux.dtype == torch.float32 and z.dtype == torch.float32


def test_router_fp32_option_changes_only_router_precision():
    torch.manual_seed(0)
    x = torch.randn(64, 128, dtype=torch.bfloat16)
    gate = (torch.randn(8, 128) * 0.5).to(torch.bfloat16)
    fp32 = route(x, gate, 2, fp32=True)
    ref = (x.float() @ gate.float().t()).softmax(-1)
    torch.testing.assert_close(fp32.weights, ref.topk(2, dim=-1).values)
    low = route(x, gate, 2, fp32=False)
    assert low.weights.dtype == torch.float32            # softmax still in fp32
    assert not torch.equal(low.weights, fp32.weights)    # but the bf16 matmul rounds the logits


def test_selection_bias_changes_choice_not_weights():
    x, gate = torch.randn(32, 16), torch.randn(8, 16)
    bias = torch.zeros(8)
    bias[3] = 10.0  # expert 3 is always picked
    r = route(x, gate, 2, selection_bias=bias)
    assert (r.expert_idx == 3).any(-1).all()
    probs = (x @ gate.t()).softmax(-1)
    torch.testing.assert_close(r.weights, probs.gather(-1, r.expert_idx))  # raw probabilities, bias excluded


def test_aux_loss_free_balancing_reduces_imbalance():
    from moe_system.moe.balancing import update_expert_bias
    from moe_system.moe.load import ExpertLoadMeter
    moe = layer(router_bias_update_rate=0.002).train()
    meter = ExpertLoadMeter([moe])
    with torch.no_grad():
        moe.gate_weight[0] += 0.1  # a router that overloads expert 0 (max/mean load 1.75)
    x = torch.randn(512, 128)
    imbalance = []
    for _ in range(80):
        moe(x)
        counts = moe.last_counts.float()
        imbalance.append((counts.max() / counts.mean()).item())
        update_expert_bias(meter, 0.002)
    settled = sum(imbalance[-20:]) / 20  # sign updates can oscillate around balance: compare averages
    assert imbalance[0] > 1.5 and settled < 1.2, imbalance[::8]
    assert "mlp.expert_bias" not in OpenMoeForCausalLM_keys()  # off by default: released checkpoints unchanged


def OpenMoeForCausalLM_keys():
    from moe_system.model import OpenMoeForCausalLM
    with torch.device("meta"):
        return {k.split("layers.1.")[-1] for k in OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny")).state_dict()}


def test_expert_init_scale():
    for scale in (0.1, 1.0):
        moe = layer(expert_init_scale=scale)
        assert abs(moe.experts.wi_up.std().item() - (scale / 128) ** 0.5) < 0.05 * (scale / 128) ** 0.5
        assert abs(moe.experts.wo.std().item() - (scale / 256) ** 0.5) < 0.05 * (scale / 256) ** 0.5


def test_autocast_keeps_the_router_in_fp32_and_the_experts_on_grouped_gemm(monkeypatch):
    import moe_system.moe.experts as experts
    moe = layer().train()
    x = torch.randn(2, 16, 128)
    used = []
    real = experts._grouped
    monkeypatch.setattr(experts, "_grouped", lambda *a: used.append(a[0].dtype) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux, z = moe(x)
        routing = route(x.view(-1, 128), moe.gate_weight, 2)
    assert used and set(used) == {torch.bfloat16}          # grouped GEMM in the autocast dtype, not the loop
    torch.testing.assert_close(routing.weights, route(x.view(-1, 128), moe.gate_weight, 2).weights)  # fp32 router
    ref, _, _ = layer().train()(x)
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


def test_expert_parallel_layer_keeps_its_parameters_and_its_function():
    from moe_system.moe.expert_parallel import AllToAllDispatch, shard_experts
    from moe_system.moe.layer import LocalDispatch

    moe = layer().train()
    assert isinstance(moe.dispatcher, LocalDispatch)
    x = torch.randn(2, 24, 128)
    want = moe(x)[0]
    params = list(moe.parameters())
    assert shard_experts(moe, ep_group=None, overlap_chunks=3) is moe  # one process: every expert is local
    assert isinstance(moe.dispatcher, AllToAllDispatch) and moe.dispatcher.overlap_chunks == 3
    assert all(a is b for a, b in zip(moe.parameters(), params)) and moe.experts.wo.shape[0] == moe.num_experts
    torch.testing.assert_close(moe(x)[0], want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="overlap_chunks must be at least 1"):
        shard_experts(layer(), ep_group=None, overlap_chunks=0)
