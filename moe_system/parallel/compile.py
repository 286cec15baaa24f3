"""torch.compile of the dense blocks (--compile), one block at a time; the MoE layers stay eager.

What is compiled (docs/model.md, Compiled dense blocks): every dense decoder layer whole (norms, attention,
SwiGLU FFN, residuals, and the selective-recompute checkpoints inside it, which dynamo traces as part of the
graph), and in every MoE layer each dense piece around the MoE: the input norm, the attention, the norm before
the router and the extra dense FFN with its norm. The MoE layer itself (router, dispatch, experts, combine) runs
eagerly: under expert parallelism it exchanges rows with all-to-alls whose sizes depend on the routing and waits on
the host for the counts, which a graph would break on or recompile for.

Identical blocks share their compiled code (dynamo guards on the module's class and shapes, not on which layer it
is), so a model compiles each kind once, whatever its depth. Training shapes are fixed (every batch is padded or
packed to --max_length, the last partial batch dropped), so the graphs are static (dynamic=False) and compile on
the first step only. The blocks run compiled in training mode only: evaluation and generation (eval mode: other
batch shapes, a KV cache that grows every token) call the same modules eagerly, so they never compile anything.

A training shape that did change compiles a new static graph per shape. train.py changes none (accumulation and
pipeline micro-batches are equal slices of equal batches; a resumed run is a new process), a caller's own loop
might; past torch._dynamo.config.recompile_limit (8) graphs of a block kind, dynamo refuses to compile
more (FailOnRecompileLimitHit under fullgraph). The model's dense blocks then run eagerly for the rest of the process,
with one note on stderr: the step's result is the same either way, only slower, and a run that has trained for
hours must not die of it. Not dynamic shapes instead: SDPA's is_causal, computed from the sequence length, breaks
the graph when that length is symbolic (docs/model.md).

Compiling changes no module and no parameter name: state_dicts and checkpoints are the same with and without it.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._dynamo.exc import FailOnRecompileLimitHit

from ..model.modeling import OpenMoeDecoderLayer


def _compile_for_training(module: nn.Module, fallback: dict, **options) -> None:
    """module's forward runs through torch.compile while module.training, eagerly otherwise. An instance attribute
    (not torch.compile(module), whose wrapper would add `_orig_mod.` to every state_dict key).

    fallback: {"eager": bool}, shared by the blocks of one model. A shape change reaches every block kind in the
    same step, so the first hit of the recompile limit turns them all eager, with one note."""
    eager = module.forward
    compiled = torch.compile(eager, **options)

    def forward(*args, **kwargs):
        if not module.training or fallback["eager"]:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except FailOnRecompileLimitHit:  # raised before the frame runs: nothing of this call has happened yet
            fallback["eager"] = True
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"note: --compile: the dense blocks ({type(module).__name__} first) met more training input "
                      f"shapes than torch.compile keeps graphs for ({torch._dynamo.config.recompile_limit}); they "
                      f"run eagerly from now on (same results, slower). Give every training batch one shape, or "
                      f"drop --compile", file=sys.stderr, flush=True)
            return eager(*args, **kwargs)

    module.forward = forward


def dense_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules compile_dense_blocks compiles: dense layers whole, the dense pieces of MoE layers."""
    blocks = []
    for layer in model.modules():
        if not isinstance(layer, OpenMoeDecoderLayer):
            continue
        if not layer.is_moe:
            blocks.append(layer)
        else:
            blocks += [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm,
                       layer.pre_extra_mlp_layernorm, layer.extra_mlp]
    return blocks


def compile_dense_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compiles model's dense blocks in place (the unwrapped model: after booster.boost, plugin.unwrap()) and
    returns it. Apply after activation checkpointing is configured; either recompute mode composes: selective
    checkpoints are traced inside a dense layer's graph, full recompute replays the compiled layer.

    fullgraph: a graph break inside a block is an error here, not a silent slowdown."""
    fallback = {"eager": False}
    for block in dense_blocks(model):
        _compile_for_training(block, fallback, backend=backend, fullgraph=True, dynamic=False)
    return model
