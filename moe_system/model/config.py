"""OpenMoE configuration and the released size presets (docs/model.md, Presets)."""

from transformers import PretrainedConfig

# Architecture of the released checkpoints. Tiny is ours: small enough to train on 2 CPU cores in minutes,
# yet with every structural feature (heads*head_dim != hidden, MoE + extra dense FFN, 8 experts so EP 2/4/8 divide).
PRESETS = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, head_dim=48, num_experts=8, moe_layer_interval=2,
                 max_position_embeddings=512, dispatch="dropless"),
    "base": dict(vocab_size=256384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, head_dim=64, num_experts=16, moe_layer_interval=4),
    "8b": dict(vocab_size=256384, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
               num_attention_heads=24, head_dim=128, num_experts=32, moe_layer_interval=6),
    "34b": dict(vocab_size=256384, hidden_size=3072, intermediate_size=12288, num_hidden_layers=32,
                num_attention_heads=24, head_dim=128, num_experts=32, moe_layer_interval=4),
}

DISPATCH_MODES = ("capacity", "dropless")
ROUTER_NOISE = ("none", "jitter", "gaussian")


class OpenMoeConfig(PretrainedConfig):
    model_type = "openmoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=256384,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=0.02,
        # MoE
        num_experts=16,
        moe_layer_interval=4,
        router_topk=2,
        dispatch="capacity",
        capacity_factor_train=1.25,
        capacity_factor_eval=2.0,
        min_capacity=4,
        router_noise="none",
        router_renormalize=False,
        router_fp32=True,
        router_bias_update_rate=0.0,
        expert_init_scale=0.1,
        # losses (read by the model's forward; the training CLI overrides them)
        router_aux_loss_factor=0.01,
        router_z_loss_factor=1e-4,
        z_loss_factor=1e-4,
        label_smoothing=0.0,
        loss_chunk_tokens=None,
        # tokens: umT5 conventions, a leading <pad> acts as BOS
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        use_cache=True,
        **kwargs,
    ):
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        if router_noise not in ROUTER_NOISE:
            raise ValueError(f"router_noise must be one of {ROUTER_NOISE}, got {router_noise!r}")
        if not 1 <= router_topk <= num_experts:
            raise ValueError(f"router_topk={router_topk} must be between 1 and num_experts={num_experts}")
        if tie_word_embeddings:
            raise ValueError("OpenMoE has an untied embedding and LM head; tie_word_embeddings must be False")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.num_experts = num_experts
        self.moe_layer_interval = moe_layer_interval
        self.router_topk = router_topk
        self.dispatch = dispatch
        self.capacity_factor_train = capacity_factor_train
        self.capacity_factor_eval = capacity_factor_eval
        self.min_capacity = min_capacity
        self.router_noise = router_noise
        self.router_renormalize = router_renormalize
        self.router_fp32 = router_fp32  # router matmul, softmax and losses in fp32 whatever the training precision
        self.router_bias_update_rate = router_bias_update_rate  # aux-loss-free balancing step; 0 disables it
        self.expert_init_scale = expert_init_scale
        self.router_aux_loss_factor = router_aux_loss_factor
        self.router_z_loss_factor = router_z_loss_factor
        self.z_loss_factor = z_loss_factor
        self.label_smoothing = label_smoothing
        # A cap on the tokens per chunk of the fused head + loss; the chunk's memory budget sets the count
        # below it (model/loss.py, loss_chunk_tokens). Configs saved with 4096 keep that as their cap.
        self.loss_chunk_tokens = loss_chunk_tokens
        self.use_cache = use_cache  # transformers 5.x base config has no use_cache attribute
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OpenMoeConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown OpenMoE preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def is_moe_layer(self, layer_idx: int) -> bool:
        # The released models put an MoE layer at every moe_layer_interval-th layer: (i+1) % interval == 0.
        return self.moe_layer_interval > 0 and (layer_idx + 1) % self.moe_layer_interval == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]
