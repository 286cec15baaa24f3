"""Booster layer: turns train.py's --plugin/--zero_stage/--precision into a Colossal-AI plugin for OpenMoE.

Built on MoeHybridParallelPlugin (its process-group mesh, pipeline schedule, ZeRO optimizer and checkpoint
IO). Where 0.5.0 is wrong or too narrow for us this file subclasses; every override names the upstream lines
it replaces (colossalai 0.5.0, paths under colossalai/):

* ZeRO-2: booster/plugin/moe_hybrid_parallel_plugin.py:227-234 silently forces ZeRO-1 (hangs when an expert
  gets no tokens). Our expert weights are stacked tensors that always receive a gradient, zero if unrouted
  (moe/expert_parallel.py), so ZeRO-2 is restored.
* ZeRO with fp32: moe_hybrid_parallel_plugin.py:500 asserts bf16/fp16; ZeRO keeps fp32 masters and runs the
  same with fp32 working weights, so it is allowed.
* ZeRO-0 with EP: moe_hybrid_parallel_plugin.py:438-455 wraps the model in DDP over the whole DP group and
  refuses ep > 1; with a pipeline, hybrid_parallel_plugin.py:161-183 (`sync_dp_grads`) averages expert
  gradients across ranks holding *different* experts. OpenMoeParallelModule.sync_dp_grads averages dense
  gradients over the DP group and expert gradients over the expert-DP group instead.
* Gradient clipping: low_level_optim.py:572-585 adds the per-group norms linearly and never sums expert norms
  across the EP group; hybrid_parallel_plugin.py:366-375/584-663 never reduce expert norms over EP either.
  `true_grad_norm` computes the global L2 norm of the real gradient.
* Non-finite gradients: every optimizer's step takes the true global norm (one fused pass, also without
  clipping) and, when it is inf/nan, skips the inner optimizer's step and clears the gradients, setting
  `skipped_nonfinite` (the norm is all-reduced, so every rank decides the same). fp16's loss-scale overflow skip
  is unchanged and reported as `skipped_overflow`; an overflow at the scaler's minimum scale is also
  `skipped_nonfinite` (no smaller scale can make that gradient finite).
* Pipeline needs torch.distributed.is_hccl_available (pipeline/p2p.py:159): accelerator.install_cpu_support.
* Checkpoint IO: checkpoint_io.py.
"""

import math
import os
import sys
from types import MethodType

import colossalai
import torch
import torch.distributed as dist
from colossalai.accelerator import get_accelerator
from colossalai.booster.plugin import MoeHybridParallelPlugin
from colossalai.booster.plugin.hybrid_parallel_plugin import (
    HybridParallelAMPOptimizer,
    HybridParallelModule,
    HybridParallelNaiveOptimizer,
    HybridParallelZeroOptimizer,
    get_param_info,
)
from colossalai.interface import ModelWrapper, OptimizerWrapper
from colossalai.interface.optimizer import DistributedOptim
from colossalai.nn.optimizer import cast_to_distributed
from colossalai.tensor.moe_tensor.api import is_moe_tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils._pytree import tree_map

from .accelerator import install_cpu_support
from .checkpoint_io import OpenMoeCheckpointIO
from ..moe.hierarchical_all_to_all import build_node_groups, node_shape, ranks_per_node_from_env
from .layout import Layout, LayoutError, validate_layout
from .policy import STAGE_ROUTER_KEYS, OpenMoePolicy
from .ports import free_port

SYNC_BUCKET_ELEMENTS = 32 * 1024 * 1024


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def true_grad_norm(grads_and_experts, dp_group, ep_group, pp_group, sharded: bool) -> float:
    """Global L2 norm of the gradient of every parameter of the model, counted once.

    grads_and_experts: (grad, is_expert) for this rank's gradients. Sharded (ZeRO): this rank holds a distinct
    slice of every dense parameter of its stage and of its experts, so squares add up over the DP group (which
    spans the EP group and the expert replicas). Replicated (ZeRO-0, after the gradient sync): dense gradients
    are equal across DP ranks, expert gradients equal across replicas and distinct across the EP group.
    """
    # On the accelerator: NCCL reduces device tensors only, and a host copy per gradient would sync each time.
    device = get_accelerator().get_current_device()
    squares = torch.zeros(2, dtype=torch.float64, device=device)
    kinds = ([], [])
    for grad, is_expert in grads_and_experts:
        kinds[int(is_expert)].append(grad.detach())
    for i, grads in enumerate(kinds):
        if grads:  # one fused pass per kind; per-tensor norms in fp32, squared and summed in fp64
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            squares[i] = torch.stack([n.to(device) for n in norms]).double().pow(2).sum()
    if sharded:
        total = squares.sum().reshape(1)
        if _group_size(dp_group) > 1:
            dist.all_reduce(total, group=dp_group)
    else:
        if _group_size(ep_group) > 1:
            dist.all_reduce(squares[1:], group=ep_group)
        total = squares.sum().reshape(1)
    if _group_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return float(total.sqrt())


class OpenMoeParallelModule(HybridParallelModule):
    """HybridParallelModule with expert-aware gradient averaging for ZeRO-0, never DDP."""

    def __init__(self, module, *, expert_dp_group, **kwargs):
        super().__init__(module, use_ddp=False, **kwargs)
        self.expert_dp_group = expert_dp_group

    def sync_dp_grads(self):
        """Replaces hybrid_parallel_plugin.py:161-183: dense grads are averaged over the data-parallel group,
        expert grads over their replicas only (EP ranks hold different experts)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # every rank must contribute the same tensors to the same collective
                p.grad = torch.zeros_like(p)
        dense = [p.grad for p in params if not is_moe_tensor(p)]
        experts = [p.grad for p in params if is_moe_tensor(p)]
        for grads, group in ((dense, self.dp_group), (experts, self.expert_dp_group)):
            size = _group_size(group)
            if size == 1:
                continue
            for bucket in _buckets(grads):
                flat = _flatten_dense_tensors(bucket)
                flat.div_(size)
                dist.all_reduce(flat, group=group)
                for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    grad.copy_(synced)

    def forward(self, *args, **kwargs):
        # Router-loss sums passed between pipeline stages stay fp32 (HybridParallelModule.forward would cast
        # every floating input to the training precision, hybrid_parallel_plugin.py:217-222).
        if self.convert_fn is not None:
            args = tree_map(self.convert_fn, args)
            kwargs = {k: v if k in STAGE_ROUTER_KEYS else tree_map(self.convert_fn, v) for k, v in kwargs.items()}
        with self._hook_context():
            return ModelWrapper.forward(self, *args, **kwargs)


def _buckets(grads):
    bucket, size = [], 0
    for grad in grads:
        if bucket and (size + grad.numel() > SYNC_BUCKET_ELEMENTS or grad.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        yield bucket


def _loss_scale_at_floor(mixin) -> bool:
    """fp16: whether the dynamic loss scale already sits at its minimum (an overflow now is no scaling issue)."""
    scaler = getattr(mixin, "grad_scaler", None)
    floor = getattr(scaler, "_min_scale", None)
    return floor is not None and float(scaler.scale) <= float(floor)


class _NonFiniteSkip:
    """What the last step() did, read by the training loop after every step (identical on every rank)."""

    skipped_nonfinite = False  # the global gradient norm was inf/nan: no update, gradients cleared
    skipped_overflow = False  # fp16: the loss scaler found an overflow and backed off: no update


class _ReplicatedGradientsMixin(_NonFiniteSkip):
    """ZeRO-0 optimizers: sync gradients right after backward (outside a pipeline, which syncs once at the
    end of the schedule) and clip by the true global norm."""

    def backward(self, loss, *args, **kwargs):
        super().backward(loss, *args, **kwargs)
        if self.model.require_grad_sync and self.model.stage_manager is None:
            self.model.sync_dp_grads()

    def backward_by_grad(self, tensor, grad, *args, **kwargs):
        super().backward_by_grad(tensor, grad, *args, **kwargs)
        if self.model.require_grad_sync and self.model.stage_manager is None:
            self.model.sync_dp_grads()

    def _compute_grad_norm(self, param_gradient_pairs, norm_type: int = 2) -> float:
        if norm_type != 2:
            raise NotImplementedError("gradient clipping uses the L2 norm")
        model = self.model
        return true_grad_norm(((g, is_moe_tensor(p)) for p, g in param_gradient_pairs), model.dp_group,
                              model.expert_ep_group, model.pp_group, sharded=False)


class OpenMoeNaiveOptimizer(_ReplicatedGradientsMixin, HybridParallelNaiveOptimizer):
    """fp32 ZeRO-0. Replaces hybrid_parallel_plugin.py:380-456 (_compute_grad_norm) and 357-378 (step)."""

    def step(self, *args, **kwargs):
        """Upstream's step, with the norm taken even without clipping and a non-finite one skipping the update."""
        pairs = [(p, p.grad) for group in self.optim.param_groups for p in group["params"] if p.grad is not None]
        norm = self._compute_grad_norm(pairs)
        self._current_grad_norm = norm
        self.skipped_nonfinite = not math.isfinite(norm)
        if self.skipped_nonfinite:
            self.zero_grad()
            return
        if self.max_norm > 0:
            self._clip_grad_norm(norm)
        self.optim.step(*args, **kwargs)


class OpenMoeAMPOptimizer(_ReplicatedGradientsMixin, HybridParallelAMPOptimizer):
    """bf16/fp16 ZeRO-0 with fp32 masters. Replaces hybrid_parallel_plugin.py:584-663 (_compute_grad_norm) and
    amp/naive_amp/mixed_precision_optimizer.py:169-206 (step)."""

    def step(self, *args, **kwargs):
        """Upstream's step (fp16 overflow check, fp32 master grads, unscale and clip, update, copy back), with the
        norm taken even without clipping and a non-finite one skipping the update."""
        at_floor = _loss_scale_at_floor(self.mixed_precision)
        self.skipped_overflow = self.mixed_precision.should_skip_step()  # fp16 only; all-reduced over the world
        self.skipped_nonfinite = self.skipped_overflow and at_floor
        if self.skipped_overflow:
            self.zero_grad()
            return
        for group in self.optim.param_groups:
            for p in group["params"]:
                working = self.master_to_working_map[p]
                if p is not working and working.grad is not None:
                    p.grad, working.grad = working.grad.data.float(), None
        pairs = [(self.master_to_working_map[p], p.grad) for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        norm = self._compute_grad_norm(pairs)  # fp16: still carries the loss scale
        self._current_grad_norm = norm
        self.skipped_nonfinite = not math.isfinite(norm)
        if self.skipped_nonfinite:
            self.zero_grad()
            return
        self._unscale_and_clip_grads(norm)
        self.optim.step(*args, **kwargs)
        for group in self.optim.param_groups:
            for p in group["params"]:
                working = self.master_to_working_map[p]
                if p is not working:
                    working.data.copy_(p.data)

    def get_grad_norm(self, norm_type=2, **kwargs):
        # The norm is taken on fp16 gradients that still carry the loss scale (mixed_precision_optimizer.py).
        norm = self._current_grad_norm
        return None if norm is None else norm / float(getattr(self.mixed_precision, "loss_scale", 1.0))


class OpenMoeZeroOptimizer(_NonFiniteSkip, HybridParallelZeroOptimizer):
    """ZeRO-1/2: dense parameters sharded over the DP group, experts over their expert-DP group."""

    def __init__(self, optimizer, model, *, dp_group, expert_dp_group, ep_group, pp_group, **kwargs):
        held = {id(p) for p in model.parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) in held]
        experts = [p for p in params if is_moe_tensor(p)]
        if expert_dp_group is dp_group:  # ep = 1: the mesh hands out one group object for both
            pg_to_params = {dp_group: params}
        else:
            pg_to_params = {dp_group: [p for p in params if not is_moe_tensor(p)]}
            if experts:  # a pipeline stage may hold no MoE layer (upstream raises, moe_hybrid_parallel_plugin.py:77)
                pg_to_params[expert_dp_group] = experts
        self._norm_groups = (dp_group, ep_group, pp_group)
        super().__init__(optimizer, model, use_pipeline=True, pg_to_param_list=pg_to_params,
                         pp_process_group=pp_group, **kwargs)

    def step(self, closure=None):
        """low_level_optim.py:527-635; a non-finite norm makes _unscale_and_clip_grads (called just before the inner
        optimizer's step) drop the master gradients, so that step leaves every parameter and state alone, and the
        rest (releasing grads, re-gathering the unchanged masters into the working weights) runs as usual."""
        mixin = self.mixed_precision_mixin
        at_floor = _loss_scale_at_floor(mixin)
        self.skipped_nonfinite = self.skipped_overflow = False
        super().step(closure)
        overflow = getattr(mixin, "found_overflow", None)  # set by this step's fp16 overflow check
        if self.require_grad_sync and overflow is not None and overflow.item() > 0:
            self.skipped_overflow, self.skipped_nonfinite = True, at_floor
        if self.skipped_nonfinite:
            self.zero_grad()

    def _compute_grad_norm(self, dp_pg, gradients, norm_type: int = 2) -> float:
        # step() calls this once per process-group store and adds the results linearly
        # (low_level_optim.py:572-575); the real norm is computed once in _unscale_and_clip_grads below.
        return 0.0

    def _unscale_and_clip_grads(self, grad_groups_flat, total_norm):
        """Replaces the norm passed by low_level_optim.py:583-585 with the true global norm."""
        dp_group, ep_group, pp_group = self._norm_groups
        norm = true_grad_norm(((g, False) for g in grad_groups_flat), dp_group, ep_group, pp_group, sharded=True)
        # fp16 gradients still carry the loss scale here (bf16/fp32 mixins have none).
        self._current_grad_norm = norm / float(getattr(self.mixed_precision_mixin, "loss_scale", 1.0))
        self.skipped_nonfinite = not math.isfinite(norm)
        if self.skipped_nonfinite:  # torch optimizers skip parameters without a gradient: no update, no state change
            for group in self.optim.param_groups:
                for master in group["params"]:
                    master.grad = None
        else:
            super()._unscale_and_clip_grads(grad_groups_flat, norm)


class OpenMoeParallelPlugin(MoeHybridParallelPlugin):
    """MoeHybridParallelPlugin with ZeRO-2 back, fp32 ZeRO, correct EP gradient semantics and clipping."""

    def __init__(self, *, zero_stage: int, precision: str, **kwargs):
        # The parent forces stage 2 down to 1 (moe_hybrid_parallel_plugin.py:227-234); build as 1, then restore.
        super().__init__(zero_stage=min(zero_stage, 1), precision=precision, overlap_communication=False,
                         custom_policy=kwargs.pop("custom_policy", None) or OpenMoePolicy(), **kwargs)
        if zero_stage == 2:
            self.zero_stage = 2
            self.zero_config["partition_grad"] = True

    def get_checkpoint_io(self):
        return OpenMoeCheckpointIO(self.mixed_dp_group, self.pp_group, self.tp_group, self.sp_group,
                                   self.ep_group, self.moe_dp_group, self.zero_stage)

    def configure(self, model, optimizer=None, criterion=None, dataloader=None, lr_scheduler=None):
        """Replaces moe_hybrid_parallel_plugin.py:423-525: never DDP, our module and optimizers."""
        param_info = get_param_info(optimizer)
        optimizer = cast_to_distributed(optimizer) if optimizer is not None else None
        if not isinstance(model, ModelWrapper):
            model = OpenMoeParallelModule(
                model, expert_dp_group=self.moe_dp_group, precision=self.precision, shard_config=self.shard_config,
                dp_group=self.dp_group, tp_group=self.tp_group, sp_group=self.sp_group, ddp_config=self.ddp_config,
                custom_policy=self.custom_policy, use_fp8=self.use_fp8)
            model.expert_ep_group, model.pp_group = self.ep_group, self.pp_group
        if optimizer is not None and not isinstance(optimizer, OptimizerWrapper):
            if self.zero_stage == 0:
                if self.precision in ("fp16", "bf16"):
                    optimizer = OpenMoeAMPOptimizer(optimizer, model, use_pipeline=True, param_info=param_info,
                                                    precision=self.precision, max_norm=self.max_norm,
                                                    pp_process_group=self.pp_group, **self.amp_config)
                else:
                    optimizer = OpenMoeNaiveOptimizer(optimizer, model, use_pipeline=True, param_info=param_info,
                                                      max_norm=self.max_norm, pp_process_group=self.pp_group,
                                                      tp_process_group=self.tp_group)
            else:
                optimizer = OpenMoeZeroOptimizer(optimizer, model, dp_group=self.dp_group,
                                                 expert_dp_group=self.moe_dp_group, ep_group=self.ep_group,
                                                 pp_group=self.pp_group, param_info=param_info,
                                                 tp_process_group=self.tp_group, clip_grad_norm=self.max_norm,
                                                 **self.zero_config, **self.amp_config)
            model.update_master_params = MethodType(optimizer.update_master_params, model)
            if isinstance(optimizer.optim, DistributedOptim):
                is_zero = self.zero_stage > 0
                optimizer.optim.setup_distributed(
                    self.tp_group, self.dp_group, optimizer.get_master_to_working_map() if is_zero else {},
                    optimizer.get_param_padding_map() if is_zero else {}, is_zero)
        return model, optimizer, criterion, dataloader, lr_scheduler


def init_distributed(seed: int) -> None:
    """Join the torchrun/colossalai-run world, or make a one-process world when started as `python train.py`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    install_cpu_support()
    colossalai.launch_from_torch(seed=seed, verbose=False)


def default_precision() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def _model_shape(args, config):
    if config is None:
        from ..model import OpenMoeConfig
        if getattr(args, "load_checkpoint", None):
            from ..model.convert import checkpoint_config
            config = checkpoint_config(args.load_checkpoint)
        else:
            config = OpenMoeConfig.from_preset(args.model_name)
    return config.num_experts, config.num_hidden_layers


def build_plugin(args, config=None):
    """-> (plugin, layout). Call after init_distributed; pass the model config when it is known (default: the
    --model_name preset or --load_checkpoint's config). Impossible layouts raise LayoutError before any
    process group exists."""
    world = dist.get_world_size()
    precision = args.precision or default_precision()
    # ZeRO shards optimizer state over the data-parallel ranks; with one process there is nothing to shard.
    zero_stage = args.zero_stage if args.zero_stage is not None else (1 if world > 1 else 0)
    num_experts, num_layers = _model_shape(args, config)
    layout = validate_layout(  # raises LayoutError, which train.py reports in one line
        args.plugin, world, num_experts, num_layers, zero_stage=zero_stage, precision=precision,
        extra_dp_size=args.extra_dp_size, pp_size=args.pp_size, dp_size=args.dp_size, ep_size=args.ep_size,
        microbatch_size=args.microbatch_size, batch_size=getattr(args, "batch_size", None), rank=dist.get_rank())
    if getattr(args, "load_balance", False) and layout.ep == 1:
        raise LayoutError(f"--load_balance moves experts between expert-parallel ranks, and this layout "
                          f"({layout.describe()}) has a single one; drop --load_balance or use more processes "
                          f"with an expert-parallel size above 1")
    # --comm_overlap: the EP layers pipeline their all-to-alls with the experts (no-op when ep = 1).
    overlap_chunks = getattr(args, "comm_overlap_chunks", 4) if getattr(args, "comm_overlap", False) else 1
    node_groups = _hierarchical_groups(layout) if getattr(args, "hierarchical_alltoall", False) else None
    plugin = OpenMoeParallelPlugin(
        tp_size=1, pp_size=layout.pp, ep_size=layout.ep, zero_stage=zero_stage, precision=precision,
        max_norm=args.max_grad_norm or 0.0, microbatch_size=layout.microbatch_size if layout.is_pipeline else None,
        enable_metadata_cache=True, custom_policy=OpenMoePolicy(overlap_chunks=overlap_chunks, node_groups=node_groups))
    if node_groups is not None and dist.get_process_group_ranks(plugin.ep_group) != layout.ep_group_ranks():
        raise RuntimeError("the plugin's EP group is not the layout's: the node subgroups would not match it")
    return plugin, layout


def _hierarchical_groups(layout: Layout):
    """--hierarchical_alltoall: the node subgroups of every EP group (created on every rank, in the same order),
    or None, with a note, where every EP group lies within one node and the flat exchange is the same thing."""
    per_node = ranks_per_node_from_env(layout.world, layout.rank)
    ep_groups = [layout.ep_group_ranks(base) for base in range(0, layout.world, layout.ep)]
    groups = build_node_groups(ep_groups, per_node, layout.rank)
    if layout.rank == 0 and layout.ep == 1:
        print("note: --hierarchical_alltoall has no effect: this layout has no expert parallelism (EP size 1)",
              file=sys.stderr)
    elif layout.rank == 0 and all(node_shape(ranks, per_node)[0] == 1 for ranks in ep_groups):
        print(f"note: --hierarchical_alltoall has no effect: every expert-parallel group ({layout.ep} processes) "
              f"lies within one node ({per_node} processes per node), where it equals the flat all-to-all",
              file=sys.stderr)
    return groups


__all__ = ["Layout", "LayoutError", "OpenMoeParallelPlugin", "build_plugin", "init_distributed", "validate_layout",
           "true_grad_norm"]
