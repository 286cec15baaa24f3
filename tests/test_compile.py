"""--compile: the dense blocks run through torch.compile, the MoE layers eagerly (moe_system/parallel/compile.py).

The structural tests use dynamo with the aot_eager backend (the same graphs and autograd split as inductor, the ops
run eagerly: seconds instead of minutes on the CPU); one parity test uses inductor.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
from moe_system.moe.layer import OpenMoeSparseMLP
from moe_system.parallel.compile import compile_dense_blocks, dense_blocks

ROOT = Path(__file__).resolve().parents[1]
RECOMPUTE = (None, "selective", "full")


def tiny_model(layers: int = 4) -> OpenMoeForCausalLM:
    torch.manual_seed(0)
    return OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny", num_hidden_layers=layers)).train()


def loss_and_grads(model, recompute, ids):
    model.model.gradient_checkpointing = recompute is not None
    model.model.recompute = recompute or "full"
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training(eager, compiled, recompute, dtype=torch.float32):
    # fp32: the compiled graphs reorder and fuse reductions (RMSNorm, SwiGLU, the backward's sums), so the loss
    # agrees to rounding and gradients to a few ulps of their scale, never bitwise. bf16 (the plugins' cast):
    # the same ops in the same precision under aot_eager, to bf16 rounding.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    ids = torch.randint(0, eager.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss_e, grads_e = loss_and_grads(eager, recompute, ids)
    loss_c, grads_c = loss_and_grads(compiled, recompute, ids)
    torch.testing.assert_close(loss_c, loss_e, **tol)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == len(list(eager.parameters()))
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=tol["rtol"] * 10, atol=tol["atol"], msg=name)


def test_compiled_model_trains_like_the_eager_one_in_every_recompute_mode():
    eager = tiny_model()
    compiled = compile_dense_blocks(copy.deepcopy(eager), backend="aot_eager")
    for recompute in RECOMPUTE:
        assert_same_training(eager, compiled, recompute)


def test_compiled_model_trains_in_bf16():
    eager = tiny_model().to(torch.bfloat16)  # what the plugins' bf16 precision does to the model
    assert_same_training(eager, compile_dense_blocks(copy.deepcopy(eager), backend="aot_eager"), None, torch.bfloat16)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    eager = tiny_model(layers=2)  # one dense layer, one MoE layer: every kind of block
    compiled = compile_dense_blocks(copy.deepcopy(eager))
    assert_same_training(eager, compiled, None)
    assert_same_training(eager, compiled, "selective")


def test_each_block_kind_compiles_once_whole_and_never_again():
    """fullgraph: any graph break in a block raises. Dense layers and the MoE layers' pieces share their code,
    so a 4-layer model compiles one graph per kind (dense layer, norm, attention, FFN), not per layer; more
    steps of the same shapes and eval-mode forwards of other shapes compile nothing."""
    model = tiny_model()
    counter = CompileCounterWithBackend("aot_eager")
    compile_dense_blocks(model, backend=counter)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for _ in range(2):
        loss_and_grads(model, None, ids)
    assert counter.frame_count == 4
    model.eval()
    with torch.no_grad():
        for batch, length in ((1, 7), (3, 20), (2, 16)):
            model(input_ids=torch.randint(0, model.config.vocab_size, (batch, length)))
    generated = model.generate(ids[:1, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=3,
                               do_sample=False)
    assert generated.shape == (1, 7)
    model.train()
    loss_and_grads(model, None, ids)
    assert counter.frame_count == 4


@pytest.mark.parametrize("recompute", [False, True])
def test_every_compiled_block_is_one_graph(recompute):
    """dynamo's own account of each block kind: one graph, no break, with and without selective recompute."""
    model = tiny_model(layers=2)
    dense, moe = model.model.layers
    assert not dense.is_moe and moe.is_moe
    x = torch.randn(2, 16, model.config.hidden_size, requires_grad=True)
    cos, sin = model.model.rotary_emb(torch.arange(16).expand(2, -1))
    for block, args, kwargs in ((dense, (x, cos, sin), {"recompute": recompute}), (moe.input_layernorm, (x,), {}),
                                (moe.self_attn, (x, cos, sin), {}), (moe.extra_mlp, (x,), {})):
        explained = torch._dynamo.explain(block)(*args, **kwargs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (type(block).__name__, explained)


def test_moe_layers_stay_eager_and_every_dense_block_is_compiled():
    model = compile_dense_blocks(tiny_model(), backend="aot_eager")
    blocks = dense_blocks(model)
    assert not any(isinstance(m, OpenMoeSparseMLP) for block in blocks for m in block.modules())
    for module in model.modules():
        compiled = "forward" in vars(module)
        if isinstance(module, OpenMoeSparseMLP):
            assert not compiled
        elif any(module is block for block in blocks):
            assert compiled
    dense_params = {id(p) for block in blocks for p in block.parameters()}
    moe_params = {id(p) for m in model.moe_layers() for p in m.parameters()}
    outside = {id(p) for p in (model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight)}
    assert dense_params | moe_params | outside == {id(p) for p in model.parameters()}


def test_state_dict_is_the_same_with_and_without_compile():
    eager = tiny_model()
    compiled = compile_dense_blocks(tiny_model(), backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in compiled.state_dict())
    compiled.load_state_dict(eager.state_dict(), strict=True)
    eager.load_state_dict(compiled.state_dict(), strict=True)


def train(out, *flags, timeout=600):
    cmd = [sys.executable, "train.py", "--dataset", "synthetic", "--batch_size", "2", "--max_length", "16",
           "--save_interval", "2", "--output_path", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_train_py_with_compile_saves_checkpoints_that_resume_without_it(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "run"
    first = train(out, "--compile", "--compile_backend", "aot_eager", "--gradient_checkpointing", "--recompute",
                  "selective", "--max_steps", "2")  # inductor's numbers: test_inductor_compiled_model_matches_eager
    assert first.returncode == 0, first.stderr[-3000:]
    with safe_open(out / "final" / "model-00001.safetensors", "pt") as saved:
        keys = list(saved.keys())
    assert keys and sorted(keys) == sorted(tiny_model().state_dict())
    resumed = train(out, "--resume", "latest", "--max_steps", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stdout


def test_a_block_past_the_recompile_limit_runs_eagerly_with_one_note(capsys):
    """Each new training shape compiles a static graph; past dynamo's limit (8 per block kind) the kind falls back
    to eager, with one note, instead of raising FailOnRecompileLimitHit, and trains as the eager model does."""
    eager = tiny_model(layers=2)
    compiled = compile_dense_blocks(copy.deepcopy(eager), backend="aot_eager")
    torch._dynamo.reset()  # earlier tests' graphs of these code objects count towards the limit
    lengths = range(5, 5 + torch._dynamo.config.recompile_limit + 3)
    for length in lengths:
        ids = torch.randint(0, eager.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        loss_e, grads_e = loss_and_grads(eager, None, ids)
        loss_c, grads_c = loss_and_grads(compiled, None, ids)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --compile")]
    assert len(notes) == 1 and "OpenMoeDecoderLayer" in notes[0] and "drop --compile" in notes[0], notes


# Each multi-process layout with and without --compile (aot_eager: inductor's compile of every graph on each of
# two ranks would take minutes on the CPU; the graphs, their autograd split and their place among the plugins'
# hooks, collectives and pipeline schedule are the same). fp32, where the two runs agree to rounding.
COMPILE_CASES = {
    "ep_z0": dict(plugin="ep", zero=0, precision="fp32"),  # expert parallel over 2 ranks, data-parallel reduction
    "ep_zero_z1": dict(plugin="ep_zero", extra_dp_size=2, zero=1, precision="fp32"),  # ZeRO's gradient hooks
    "ep_zero_z2": dict(plugin="ep_zero", extra_dp_size=2, zero=2, precision="fp32"),
    "hybrid_pp2": dict(plugin="hybrid", zero=0, precision="fp32", pp=2, ep=1, moe_dp=1, microbatch=2),
}


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    from dist_common import launch

    tmp = tmp_path_factory.mktemp("compile")
    cases = [case | {"name": name + suffix} | extra for name, case in COMPILE_CASES.items()
             for suffix, extra in (("", {}), ("_compiled", {"compile": "aot_eager"}))]
    proc = launch("dist_parity.py", 2, [str(tmp), *map(json.dumps, cases)], timeout=400)
    assert proc.returncode == 0, f"rc {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {case["name"]: torch.load(tmp / f"{case['name']}.pt", weights_only=False) for case in cases}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compiled_dense_blocks_train_like_eager_ones_on_two_ranks(name, compile_results):
    eager, compiled = compile_results[name], compile_results[name + "_compiled"]
    # Every rank compiled its blocks once: a dense layer, a norm, an attention, an FFN (each pipeline stage holds
    # a dense and an MoE layer); an evaluation of other shapes afterwards (through the pipeline schedule for pp2)
    # compiled nothing, and no block fell back to eager (either would count more).
    assert compiled["compiled_graphs"] == [4, 4], compiled["compiled_graphs"]
    # fp32, the same ops: rounding only (the graphs may reorder a reduction), as test_parallel's fp32 tolerance.
    torch.testing.assert_close(torch.tensor(compiled["losses"]), torch.tensor(eager["losses"]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(compiled["norms"]), torch.tensor(eager["norms"]), rtol=1e-5, atol=0.0)
    assert compiled["state"].keys() == eager["state"].keys()
    diff = max((compiled["state"][k] - v).abs().max().item() for k, v in eager["state"].items())
    assert diff <= 5e-5, f"{name}: parameters differ by {diff:.3g}"
