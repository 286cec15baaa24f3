"""Optimizer wrappers for OpenMoE's booster (plugin.py installs them): true global gradient norms, and a step
that skips non-finite gradients. Every override names the upstream lines it replaces (colossalai 0.5.0, paths
under colossalai/):

* Gradient clipping: low_level_optim.py:572-585 adds the per-group norms linearly and never sums expert norms
  across the EP group; hybrid_parallel_plugin.py:366-375/584-663 never reduce expert norms over EP either.
  `true_grad_norm` computes the global L2 norm of the real gradient.
* Non-finite gradients: every optimizer's step takes the true global norm (one fused pass, also without
  clipping) and, when it is inf/nan, skips the inner optimizer's step and clears the gradients, setting
  `skipped_nonfinite` (the norm is all-reduced, so every rank decides the same). fp16's loss-scale overflow skip
  is unchanged and reported as `skipped_overflow`; an overflow at the scaler's minimum scale is also
  `skipped_nonfinite` (no smaller scale can make that gradient finite).
"""

import math

import torch
import torch.distributed as dist
from colossalai.accelerator import get_accelerator
from colossalai.booster.plugin.hybrid_parallel_plugin import (
    HybridParallelAMPOptimizer,
    HybridParallelNaiveOptimizer,
    HybridParallelZeroOptimizer,
)
from colossalai.tensor.moe_tensor.api import is_moe_tensor

from .comm import group_size


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
        if group_size(dp_group) > 1:
            dist.all_reduce(total, group=dp_group)
    else:
        if group_size(ep_group) > 1:
            dist.all_reduce(squares[1:], group=ep_group)
        total = squares.sum().reshape(1)
    if group_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return float(total.sqrt())


def adamw(param_groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, on CUDA with its fused kernel: one launch per parameter group and dtype for the whole
    update instead of a chain of foreach kernels. The wrappers below unscale and clip the gradients themselves and
    call the inner optimizer's step() without arguments (low_level_optim.py:588, hybrid_parallel_plugin.py:378),
    which the fused step accepts: its grad_scale / found_inf serve torch's GradScaler only. Elsewhere (CPU runs)
    the default implementation, as before."""
    params = [p for group in param_groups for p in group["params"]]
    return torch.optim.AdamW(param_groups, fused=bool(params) and all(p.is_cuda for p in params), **kwargs)


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
