"""Colossal-AI shardformer policy for OpenMoE. One process: nothing to replace or split."""

from colossalai.shardformer.policies.base_policy import Policy


class OpenMoePolicy(Policy):
    def config_sanity_check(self):
        pass

    def preprocess(self):
        return self.model

    def module_policy(self):
        return {}

    def postprocess(self):
        return self.model

    def get_held_layers(self):
        return [self.model]

    def get_shared_params(self):
        return []
