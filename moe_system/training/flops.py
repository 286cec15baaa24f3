"""Parameter and FLOP accounting for OpenMoE, from the config alone.

Model FLOPs per trained token (PaLM appendix B convention, recompute excluded):
    6 * N_active + 12 * L * (heads * head_dim) * T
where N_active counts the matmul weights a token passes through: attention projections, dense FFNs, the
router, k experts per MoE layer, the extra dense FFN of each MoE layer, and the LM head (embeddings excluded:
a lookup is no matmul). T is the sequence length; the second term is QK^T and AV over the full context.
"""


def _ffn_params(hidden: int, inter: int) -> int:
    return hidden * 2 * inter + hidden * inter + inter * hidden  # 2I-wide gate, up, down


def param_counts(cfg) -> dict:
    """Total parameters and those active per token (excluding embeddings and norms in 'active_matmul')."""
    hidden, inter, experts = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    attn = 4 * hidden * cfg.num_attention_heads * cfg.head_dim
    ffn = _ffn_params(hidden, inter)
    n_moe = len(cfg.moe_layer_indices)
    n_dense = cfg.num_hidden_layers - n_moe
    norms = hidden * (2 * cfg.num_hidden_layers + n_moe + 1)
    embed = head = cfg.vocab_size * hidden
    moe_layer_total = experts * ffn + experts * hidden + ffn  # experts + gate + extra dense FFN
    total = embed + head + norms + cfg.num_hidden_layers * attn + n_dense * ffn + n_moe * moe_layer_total
    blocks_active = (cfg.num_hidden_layers * attn + n_dense * ffn
                     + n_moe * (cfg.router_topk * ffn + experts * hidden + ffn))
    return {
        "total": total,
        "experts": n_moe * experts * ffn,
        "active_blocks": blocks_active,       # decoder blocks only (docs/model.md, Presets)
        "active_matmul": blocks_active + head,
    }


def train_flops_per_token(cfg, seq_len: int) -> float:
    counts = param_counts(cfg)
    return 6.0 * counts["active_matmul"] + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
