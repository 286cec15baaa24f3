"""OpenMoE decoder-only language model (docs/model.md), one readable file in the Hugging Face style.

Architecture facts that differ from Llama: attention without 1/sqrt(d) scaling (T5X), heads*head_dim may differ
from hidden_size, a 2I-wide gate with a three-way SwiGLU product, and every moe_layer_interval-th layer is an MoE
layer followed by an extra dense FFN with its own pre-norm. Router losses travel through the layer outputs so
they keep their graph under (non-reentrant) activation checkpointing.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..moe.experts import recomputed_swiglu, swiglu3
from ..moe.layer import OpenMoeSparseMLP
from .config import OpenMoeConfig
from .loss import chunked_lm_loss, router_loss

# What activation checkpointing recomputes in backward (docs/model.md, Activation recompute): "full" replays whole
# decoder layers, the MoE layers' expert exchanges included; "selective" replays the attention blocks and the
# SwiGLU products only, never routing, dispatch or combine.
RECOMPUTE_MODES = ("selective", "full")


class OpenMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class OpenMoeRotaryEmbedding(nn.Module):
    """T5X rotary embedding over the full head dim: timescale = theta^(2i/d), halves duplicated (rotate_half)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids: torch.Tensor):
        # The frequencies are no buffer: a bf16/fp16 cast of the model would round them (angles off by
        # radians at position 2047). Recomputed in fp32 here, on the positions' device, at negligible cost.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids.device) / self.head_dim
        inv_freq = 1.0 / self.theta ** exponents
        # Angles are computed from the positions themselves, so prefill and cached decoding agree by construction.
        angles = position_ids.float().unsqueeze(-1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # [B, T, d]
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


class OpenMoeAttention(nn.Module):
    def __init__(self, config: OpenMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, past_key_values=None):
        bsz, seq, _ = x.shape
        q, k, v = (proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # T5X convention: no 1/sqrt(head_dim) scaling of the scores.
        is_causal = attn_mask is None and seq > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=1.0)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class OpenMoeMLP(nn.Module):
    def __init__(self, config: OpenMoeConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu3(self.gate_proj(x), self.up_proj(x)))


class OpenMoeDecoderLayer(nn.Module):
    def __init__(self, config: OpenMoeConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = OpenMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = OpenMoeAttention(config, layer_idx)
        self.post_attention_layernorm = OpenMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = OpenMoeSparseMLP(config) if self.is_moe else OpenMoeMLP(config)
        if self.is_moe:
            self.pre_extra_mlp_layernorm = OpenMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.extra_mlp = OpenMoeMLP(config)

    def attention(self, x, cos, sin, attn_mask=None, past_key_values=None):
        return self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past_key_values)

    def forward(self, x, cos, sin, attn_mask=None, past_key_values=None, recompute: bool = False):
        """Returns (hidden, aux_loss, z_loss); the losses are zero scalars for a dense layer. recompute: selective
        activation recompute, the attention block and every SwiGLU product recomputed in backward."""
        if recompute:  # no randomness inside: no RNG state to keep
            x = x + checkpoint(self.attention, x, cos, sin, attn_mask, past_key_values, use_reentrant=False,
                               preserve_rng_state=False)
        else:
            x = x + self.attention(x, cos, sin, attn_mask, past_key_values)
        with recomputed_swiglu(recompute):
            if not self.is_moe:
                zero = x.new_zeros((), dtype=torch.float32)
                return x + self.mlp(self.post_attention_layernorm(x)), zero, zero
            moe_out, aux_loss, z_loss = self.mlp(self.post_attention_layernorm(x))
            x = x + moe_out
            # The released checkpoint applies the always-on dense FFN after the MoE residual, with its own norm.
            x = x + self.extra_mlp(self.pre_extra_mlp_layernorm(x))
        return x, aux_loss, z_loss


class OpenMoePreTrainedModel(PreTrainedModel):
    config_class = OpenMoeConfig
    config: OpenMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["OpenMoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module, generator: torch.Generator | None = None):
        """generator: where a Linear or Embedding weight draws from (default: the global one). An MoE layer draws
        from the global generator here; parallel/rank_model.py passes it one generator per expert."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std, generator=generator)
        elif isinstance(module, OpenMoeRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, OpenMoeSparseMLP):
            module.reset_parameters()


def build_attention_mask(attention_mask, query_len: int, past_len: int, dtype_device_ref: torch.Tensor):
    """Boolean [B, 1, T, past+T] mask (True = attend) from a [B, past+T] padding mask, or None for plain causal.

    Rows that would attend to nothing (left-padding queries) are opened fully: their outputs are never used,
    and an all-False row would make SDPA return NaN.
    """
    if attention_mask is None:
        if past_len == 0 or query_len == 1:
            return None  # pure causal prefill, or one new token that sees the whole cache
        attention_mask = torch.ones(dtype_device_ref.shape[0], past_len + query_len, dtype=torch.bool,
                                    device=dtype_device_ref.device)
    keys = attention_mask.bool()[:, None, None, :]
    q_pos = torch.arange(past_len, past_len + query_len, device=keys.device)[:, None]
    k_pos = torch.arange(attention_mask.shape[-1], device=keys.device)[None, :]
    mask = keys & (k_pos <= q_pos)
    return mask | ~mask.any(dim=-1, keepdim=True)


class OpenMoeModel(OpenMoePreTrainedModel):
    def __init__(self, config: OpenMoeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(OpenMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = OpenMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = OpenMoeRotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.recompute = "full"  # what gradient_checkpointing recomputes: one of RECOMPUTE_MODES
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, *, layers: slice = slice(None), router_sums=None,
                final_norm: bool = True, **kwargs):
        """Runs self.layers[layers] (all of them by default). A pipeline stage runs its own run of layers: from the
        previous stage's hidden states (inputs_embeds: no embedding) and router-loss sums (router_sums), and
        without the final norm unless it is the last stage (parallel/policy.py)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, seq = x.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: count only real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past_len, past_len + seq, device=x.device).expand(bsz, -1)
        cos, sin = self.rotary_emb(position_ids)
        mask = build_attention_mask(attention_mask, seq, past_len, x)

        zero = x.new_zeros((), dtype=torch.float32)
        aux_sum, z_sum = router_sums if router_sums is not None else (zero, zero)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if recompute and self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"unknown recompute mode {self.recompute!r}; use one of {', '.join(RECOMPUTE_MODES)}")
        for layer in self.layers[layers]:
            if recompute and self.recompute == "full":
                # Non-reentrant: the router losses returned from inside keep their graph and train the gate.
                x, aux, z = checkpoint(layer, x, cos, sin, mask, past_key_values, use_reentrant=False)
            else:
                x, aux, z = layer(x, cos, sin, mask, past_key_values, recompute=recompute)
            if layer.is_moe:
                aux_sum, z_sum = aux_sum + aux, z_sum + z
        num_moe = max(len(self.config.moe_layer_indices), 1)
        return OpenMoeModelOutput(self.norm(x) if final_norm else x, past_key_values if use_cache else None,
                                  aux_sum / num_moe, z_sum / num_moe, aux_sum, z_sum)


@dataclass
class OpenMoeModelOutput:
    last_hidden_state: torch.Tensor
    past_key_values: object
    aux_loss: torch.Tensor  # router losses: means over all the model's MoE layers (complete after the last layer)
    z_loss: torch.Tensor
    router_aux_sum: torch.Tensor  # the sums over the layers run so far, for the next pipeline stage
    router_z_sum: torch.Tensor


# transformers 5.24 renamed the KV-cache field that generate() reads from model outputs (and passes back in) from
# past_key_values to cache, and refuses both at once; we fill whichever this version of transformers uses. Our
# output inherits that field rather than declaring both: in 5.24 merely setting a past_key_values field logs a
# deprecation warning on every forward.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class OpenMoeCausalLMOutput(CausalLMOutputWithPast):
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None

    @property
    def kv_cache(self):
        return getattr(self, CACHE_FIELD)


class OpenMoeForCausalLM(OpenMoePreTrainedModel, GenerationMixin):
    def __init__(self, config: OpenMoeConfig):
        super().__init__(config)
        self.model = OpenMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, num_items_in_batch=None,
                return_logits=None, cache=None, no_padding=False, **kwargs):
        """With labels, the loss is computed from the hidden states chunk by chunk and logits are not returned
        (pass return_logits=True to get them too): B x T x 256k fp32 logits would not fit.

        loss = lm_loss + router_aux_loss_factor * aux_loss + router_z_loss_factor * router_z_loss, where lm_loss
        is the per-target-token mean (or the sum divided by num_items_in_batch, for exact global means across
        data-parallel ranks and accumulation steps).

        no_padding: the caller knows attention_mask is all ones (generate() has to be given one: BOS and pad share
        an id). It is then dropped, so attention runs causal without a mask, which SDPA's flash kernel needs.
        """
        past_key_values = past_key_values if past_key_values is not None else cache
        if no_padding:
            attention_mask = None
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache)
        return self.lm_output(out, labels, num_items_in_batch, logits_to_keep, return_logits)

    def lm_output(self, out: OpenMoeModelOutput, labels=None, num_items_in_batch=None, logits_to_keep=0,
                  return_logits=None) -> OpenMoeCausalLMOutput:
        """The head over the decoder's output: the loss with labels, the logits without (or with return_logits)."""
        hidden = out.last_hidden_state
        cfg = self.config
        loss = lm_loss = logits = None
        if labels is not None:
            lm_loss = chunked_lm_loss(hidden, self.lm_head.weight, labels, label_smoothing=cfg.label_smoothing,
                                      z_loss_factor=cfg.z_loss_factor, chunk_tokens=cfg.loss_chunk_tokens,
                                      num_items=num_items_in_batch)
            loss = lm_loss + router_loss(cfg, out.aux_loss, out.z_loss)
        if labels is None or return_logits:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep]).float()
        return OpenMoeCausalLMOutput(loss=loss, logits=logits, lm_loss=lm_loss, aux_loss=out.aux_loss,
                                     router_z_loss=out.z_loss, **{CACHE_FIELD: out.past_key_values})

    def moe_layers(self) -> list[OpenMoeSparseMLP]:
        return [m for m in self.modules() if isinstance(m, OpenMoeSparseMLP)]
