"""Colossal-AI shardformer policy for OpenMoE: EP-aware MoE layers and pipeline stages.

* Every MoE layer (`model.layers.{i}.mlp` for i in config.moe_layer_indices) keeps this rank's experts and
  exchanges its rows over the EP group (moe/expert_parallel.py: shardformer calls
  `AllToAllDispatch.from_native_module` with the EP group, and with the number of chunks its all-to-alls are
  overlapped in: --comm_overlap, and with this rank's node subgroups of its EP group: --hierarchical_alltoall).
* With a pipeline, each stage holds a contiguous run of decoder layers (the embedding on the first stage,
  the final norm and LM head on the last, the rotary table everywhere) and runs `pipeline_stage_forward`: the
  model's own forward over its layers. Router losses are summed over the stage's MoE layers and travel with the
  hidden states to the next stage, so the last stage computes the same loss as the single-device model and the
  gates of every stage train.
"""

from functools import partial

import torch

from colossalai.shardformer.policies.base_policy import ModulePolicyDescription, Policy, \
    SubModuleReplacementDescription

from ..model.modeling import OpenMoeForCausalLM
from ..moe.expert_parallel import AllToAllDispatch

# Keys of the tensors passed between pipeline stages. The router sums stay fp32: the plugin's module does not
# cast them to the training precision (plugin.OpenMoeParallelModule).
STAGE_HIDDEN = "hidden_states"
STAGE_ROUTER_KEYS = ("router_aux_sum", "router_z_sum")


def stage_layer_range(stage_manager, num_layers: int) -> tuple[int, int]:
    start, end = stage_manager.get_stage_index(stage_manager.distribute_layers(num_layers))
    return int(start), int(end)


def stage_modules(model: OpenMoeForCausalLM, start: int, end: int, first: bool, last: bool) -> list:
    """The modules a pipeline stage holds: the rotary table, decoder layers [start, end), the embedding on the
    first stage, the final norm and the LM head on the last (parallel/rank_model.py builds only these)."""
    inner = model.model
    held = [inner.rotary_emb, *inner.layers[start:end]]
    if first:
        held.append(inner.embed_tokens)
    if last:
        held += [inner.norm, model.lm_head]
    return held


def pipeline_stage_forward(self: OpenMoeForCausalLM, input_ids=None, labels=None, hidden_states=None,
                           router_aux_sum=None, router_z_sum=None, num_items_in_batch=None, attention_mask=None,
                           stage_manager=None, stage_index=None, **kwargs):
    """One pipeline stage of OpenMoeForCausalLM.forward for training (causal, right padding, no cache): the model's
    own decoder over this stage's layers, from the previous stage's hidden states and router-loss sums.

    Non-last stages return the tensors for the next stage; the last returns the model's usual output.
    num_items_in_batch: a number, or one copy per row of the global target count (training/forward_backward.py).
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("pipeline stages train on right-padded rows with a causal mask; drop attention_mask")
    first, last = stage_manager.is_first_stage(), stage_manager.is_last_stage()
    out = self.model(input_ids, inputs_embeds=None if first else hidden_states, layers=slice(*stage_index),
                     router_sums=None if first else (router_aux_sum, router_z_sum), final_norm=last)
    if not last:
        return {STAGE_HIDDEN: out.last_hidden_state, "router_aux_sum": out.router_aux_sum,
                "router_z_sum": out.router_z_sum}
    if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.dim() == 1:
        num_items_in_batch = num_items_in_batch[0]
    return self.lm_output(out, labels, num_items_in_batch)


class OpenMoePolicy(Policy):
    def __init__(self, overlap_chunks: int = 1, node_groups=None):
        """overlap_chunks > 1: the EP layers pipeline their all-to-alls with the experts in that many chunks.
        node_groups (moe/hierarchical_all_to_all.py): the EP layers exchange intra- then inter-node."""
        super().__init__()
        self.overlap_chunks, self.node_groups = overlap_chunks, node_groups

    def config_sanity_check(self):
        if self.shard_config.enable_tensor_parallelism or self.shard_config.enable_sequence_parallelism:
            raise NotImplementedError("OpenMoE supports expert, data and pipeline parallelism; not TP/SP")

    def preprocess(self):
        return self.model

    def module_policy(self):
        cfg = self.model.config
        policy = {}
        ep_group = self.shard_config.ep_group
        if ep_group is not None:
            kwargs = {"ep_group": ep_group, "overlap_chunks": self.overlap_chunks, "node_groups": self.node_groups}
            replacements = [SubModuleReplacementDescription(suffix=f"layers.{i}.mlp",
                                                            target_module=AllToAllDispatch,
                                                            kwargs=kwargs, ignore_if_not_exist=True)
                            for i in cfg.moe_layer_indices]
            policy[type(self.model.model)] = ModulePolicyDescription(sub_module_replacement=replacements)
        stage_manager = self.pipeline_stage_manager
        if stage_manager is not None:
            if stage_manager.is_interleave:
                raise NotImplementedError("OpenMoE pipelines use the 1F1B schedule")
            stage_index = stage_layer_range(stage_manager, cfg.num_hidden_layers)
            forward = partial(pipeline_stage_forward, stage_manager=stage_manager, stage_index=stage_index)
            self.append_or_create_method_replacement(description={"forward": forward}, policy=policy,
                                                     target_key=type(self.model))
        return policy

    def postprocess(self):
        return self.model

    def get_held_layers(self):
        stage_manager = self.pipeline_stage_manager
        if stage_manager is None:
            return [self.model]
        start, end = stage_layer_range(stage_manager, len(self.model.model.layers))
        return stage_modules(self.model, start, end, stage_manager.is_first_stage(), stage_manager.is_last_stage())

    def get_shared_params(self):
        return []  # untied embedding and head
