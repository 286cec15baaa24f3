"""Booster layer: turns a ParallelConfig (train.py's --plugin/--zero_stage/--precision/...) into a Colossal-AI
plugin for OpenMoE.

Read `build_plugin` top to bottom: resolve the defaults, validate the layout, then the plugin with our policy
(policy.py: expert-parallel MoE layers and pipeline stages). Built on MoeHybridParallelPlugin (its
process-group mesh, pipeline schedule, ZeRO optimizer and checkpoint IO). Where 0.5.0 is wrong or too narrow
for us this file subclasses; every override names the upstream lines it replaces (colossalai 0.5.0, paths under
colossalai/):

* ZeRO-2: booster/plugin/moe_hybrid_parallel_plugin.py:227-234 silently forces ZeRO-1 (hangs when an expert
  gets no tokens). Our expert weights are stacked tensors that always receive a gradient, zero if unrouted
  (moe/expert_parallel.py), so ZeRO-2 is restored.
* ZeRO with fp32: moe_hybrid_parallel_plugin.py:500 asserts bf16/fp16; ZeRO keeps fp32 masters and runs the
  same with fp32 working weights, so it is allowed.
* ZeRO-0 with EP: moe_hybrid_parallel_plugin.py:438-455 wraps the model in DDP over the whole DP group and
  refuses ep > 1; with a pipeline, hybrid_parallel_plugin.py:161-183 (`sync_dp_grads`) averages expert
  gradients across ranks holding *different* experts. OpenMoeParallelModule.sync_dp_grads averages dense
  gradients over the DP group and expert gradients over the expert-DP group instead.
* Router-loss sums between pipeline stages: hybrid_parallel_plugin.py:217-222 casts every floating input to the
  training precision; OpenMoeParallelModule.forward keeps them fp32.
* configure (moe_hybrid_parallel_plugin.py:423-525): never DDP, our module and the optimizers of
  optimizers.py (true global gradient norm, non-finite steps skipped).
* ZeRO communication overlap: moe_hybrid_parallel_plugin.py:227-234 also forces `overlap_communication` off (the
  same hang: an unrouted expert's gradient hook never fires). Our experts always get a gradient, so on CUDA the
  reduction runs on a side stream as the backward goes (on CPU upstream's `record_stream` path fails).
* no_sync under ZeRO-2: hybrid_parallel_plugin.py:1500-1504 asserts; ZeRO-2 keeps reducing every micro-batch.
* Checkpoint IO: checkpoint_io.py.
"""

import sys
from contextlib import nullcontext
from types import MethodType

import torch
import torch.distributed as dist
from colossalai.booster.plugin import MoeHybridParallelPlugin
from colossalai.booster.plugin.hybrid_parallel_plugin import HybridParallelModule, get_param_info
from colossalai.interface import ModelWrapper, OptimizerWrapper
from colossalai.interface.optimizer import DistributedOptim
from colossalai.nn.optimizer import cast_to_distributed
from colossalai.tensor.moe_tensor.api import is_moe_tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils._pytree import tree_map

from ..moe.hierarchical_all_to_all import build_node_groups, node_shape, ranks_per_node_from_env
from .checkpoint_io import OpenMoeCheckpointIO
from .comm import group_size
from .config import ParallelConfig
from .layout import Layout, LayoutError, validate_layout
from .optimizers import OpenMoeAMPOptimizer, OpenMoeNaiveOptimizer, OpenMoeZeroOptimizer
from .policy import STAGE_ROUTER_KEYS, OpenMoePolicy

SYNC_BUCKET_ELEMENTS = 32 * 1024 * 1024


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
            size = group_size(group)
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


class OpenMoeParallelPlugin(MoeHybridParallelPlugin):
    """MoeHybridParallelPlugin with ZeRO-2 back, fp32 ZeRO, correct EP gradient semantics and clipping."""

    def __init__(self, *, zero_stage: int, precision: str, **kwargs):
        # The parent forces stage 2 down to 1 and overlap off (moe_hybrid_parallel_plugin.py:227-234); build as
        # that, then restore both.
        super().__init__(zero_stage=min(zero_stage, 1), precision=precision, overlap_communication=False,
                         custom_policy=kwargs.pop("custom_policy", None) or OpenMoePolicy(), **kwargs)
        if zero_stage == 2:
            self.zero_stage = 2
            self.zero_config["partition_grad"] = True
        self.zero_config["overlap_communication"] = torch.cuda.is_available()

    def no_sync(self, model, optimizer):
        """Gradient accumulation without a reduction per micro-batch (ZeRO-0: the model's flag, ZeRO-1: the
        optimizer's). ZeRO-2 keeps its reduce-scatter per micro-batch: upstream asserts that no_sync and partitioned
        gradients are incompatible (hybrid_parallel_plugin.py:1500-1504, low_level_optim.py:452-454)."""
        return nullcontext() if self.zero_stage == 2 else super().no_sync(model, optimizer)

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


def default_precision() -> str:
    return "bf16" if torch.cuda.is_available() else "fp32"


def build_plugin(parallel: ParallelConfig, model_config) -> tuple[OpenMoeParallelPlugin, Layout]:
    """-> (plugin, layout) for the model of model_config. Call after launch.init_distributed. Impossible layouts
    raise LayoutError before any process group exists."""
    world = dist.get_world_size()
    precision = parallel.precision or default_precision()
    # ZeRO shards optimizer state over the data-parallel ranks; with one process there is nothing to shard.
    zero_stage = parallel.zero_stage if parallel.zero_stage is not None else (1 if world > 1 else 0)
    layout = validate_layout(  # raises LayoutError, which train.py reports in one line
        parallel.plugin, world, model_config.num_experts, model_config.num_hidden_layers, zero_stage=zero_stage,
        precision=precision, extra_dp_size=parallel.extra_dp_size, pp_size=parallel.pp_size,
        dp_size=parallel.dp_size, ep_size=parallel.ep_size, microbatch_size=parallel.microbatch_size,
        batch_size=parallel.batch_size, rank=dist.get_rank())
    if parallel.load_balance and layout.ep == 1:
        raise LayoutError(f"--load_balance moves experts between expert-parallel ranks, and this layout "
                          f"({layout.describe()}) has a single one; drop --load_balance or use more processes "
                          f"with an expert-parallel size above 1")
    # The EP layers pipeline their all-to-alls with the experts in comm_overlap_chunks chunks (no-op when ep = 1).
    # --hierarchical_alltoall: every exchange goes intra-node, then inter-node.
    node_groups = _hierarchical_groups(layout) if parallel.hierarchical_alltoall else None
    policy = OpenMoePolicy(overlap_chunks=parallel.comm_overlap_chunks, node_groups=node_groups)
    plugin = OpenMoeParallelPlugin(
        tp_size=1, pp_size=layout.pp, ep_size=layout.ep, zero_stage=zero_stage, precision=precision,
        max_norm=parallel.max_grad_norm, microbatch_size=layout.microbatch_size if layout.is_pipeline else None,
        enable_metadata_cache=True, custom_policy=policy)
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


__all__ = ["Layout", "LayoutError", "OpenMoeParallelPlugin", "ParallelConfig", "build_plugin", "validate_layout"]
