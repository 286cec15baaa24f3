"""Converters from the released OpenMoE layouts (Colossal-AI, OrionZheng, T5X) to ours, and strict loading.

Each layout test writes a tiny synthetic checkpoint the way that release stores it, converts it, loads the result
and compares its logits with a reference forward computed straight from the source tensors. The reference is
written here from the architecture's description (docs/model.md), not from our model code, so a wrong transpose, swapped
gate/up projections or swapped gate halves all fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moe_system.model import OpenMoeConfig
from moe_system.model.convert import (CONVERTED_MARKER, CheckpointError, Rule, checkpoint_config,
                                      config_from_released, conversion_dir, convert_checkpoint, convert_once,
                                      detect_layout, expected_shapes, is_conversion_of, load_any_checkpoint,
                                      load_pretrained_strict, main, read_t5x_npz, t5x_rules)

# Layer 0 is dense and layer 1 MoE; heads * head_dim != hidden, and H, I, 2I all differ so that most transposes
# also change shapes.
ARCH = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            head_dim=12, num_experts=4, moe_layer_interval=2)
# Four tokens and four experts: no expert can receive more than min_capacity (4) tokens, so nothing is dropped.
TOKENS = [0, 17, 42, 5]


# ---------------------------------------------------------------------------------------------------------------
# Reference forward, float64, every matrix as [in, out]


def reference_logits(p: dict, tokens: list[int]) -> torch.Tensor:
    heads, hd, inter = ARCH["num_attention_heads"], ARCH["head_dim"], ARCH["intermediate_size"]
    x = p["embed"][tokens]
    seq = x.shape[0]
    # T5X rotary: timescale 1e4^(2i/d), the angle table duplicated over both halves of the head.
    angle = torch.arange(seq, dtype=torch.float64)[:, None] / 1e4 ** (torch.arange(0, hd, 2).double() / hd)
    angle = torch.cat([angle, angle], dim=-1)

    def rope(t):
        rotated = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], dim=-1)
        return t * angle.cos() + rotated * angle.sin()

    def norm(v, scale):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

    def ffn(v, wi0, wi1, wo):
        gate = v @ wi0  # first half linear, second half through SiLU, times the up projection
        return (gate[:, :inter] * F.silu(gate[:, inter:]) * (v @ wi1)) @ wo

    future = torch.ones(seq, seq).triu(1).bool()
    for layer in p["layers"]:
        h = norm(x, layer["ln_attn"])
        q, k, v = ((h @ layer[name]).view(seq, heads, hd).transpose(0, 1) for name in ("q", "k", "v"))
        scores = (rope(q) @ rope(k).transpose(1, 2)).masked_fill(future, float("-inf"))  # no 1/sqrt(d)
        attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, heads * hd)
        x = x + attended @ layer["o"]
        h = norm(x, layer["ln_mlp"])
        if "router" not in layer:
            x = x + ffn(h, *layer["mlp"])
            continue
        probs = (h @ layer["router"]).softmax(-1)
        weights, chosen = probs.topk(2, dim=-1)  # top-2, raw softmax weights
        moe = torch.zeros_like(x)
        for t in range(seq):
            for w, e in zip(weights[t], chosen[t]):
                moe[t] += w * ffn(h[t:t + 1], layer["wi0"][e], layer["wi1"][e], layer["wo"][e])[0]
        x = x + moe
        x = x + ffn(norm(x, layer["ln_extra"]), *layer["extra"])
    return norm(x, p["final_norm"]) @ p["head"]


def reference_params_from_torch_layout(t: dict) -> dict:
    """From Colossal-AI / OrionZheng names; torch Linear weights are [out, in], so they are transposed here."""
    def linear(name):
        return t[name].double().T

    def vec(name):
        return t[name].double()

    layers = []
    for i in range(ARCH["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        layer = dict(ln_attn=vec(pre + "input_layernorm.weight"), ln_mlp=vec(pre + "post_attention_layernorm.weight"),
                     **{n: linear(pre + f"self_attn.{n}_proj.weight") for n in "qkvo"})
        dense = "mlp." if i % 2 == 0 else "extra_mlp."
        layer["mlp" if i % 2 == 0 else "extra"] = [linear(pre + dense + f"{n}_proj.weight")
                                                  for n in ("gate", "up", "down")]
        if i % 2 == 1:
            layer.update(router=linear(pre + "mlp.gate_weight"), ln_extra=vec(pre + "pre_extra_mlp_layernorm.weight"),
                         wi0=vec(pre + "mlp.experts.wi_gate"), wi1=vec(pre + "mlp.experts.wi_up"),
                         wo=vec(pre + "mlp.experts.wo"))
        layers.append(layer)
    return dict(embed=vec("model.embed_tokens.weight"), layers=layers, final_norm=vec("model.norm.weight"),
                head=linear("lm_head.weight"))


def reference_params_from_t5x(t: dict) -> dict:
    """From T5X paths; flax kernels are already [in, out]."""
    def get(name):
        return t[name].double()

    layers = []
    for i in range(ARCH["num_hidden_layers"]):
        pre = f"decoder/layers_{i}/"
        layer = dict(ln_attn=get(pre + "pre_self_attention_layer_norm/scale"),
                     ln_mlp=get(pre + "pre_mlp_layer_norm/scale"),
                     **{n: get(pre + f"self_attention/{name}/kernel")
                        for n, name in zip("qkvo", ("query", "key", "value", "out"))})
        dense = "mlp/" if i % 2 == 0 else "extra_mlp/"
        layer["mlp" if i % 2 == 0 else "extra"] = [get(pre + dense + f"{n}/kernel") for n in ("wi_0", "wi_1", "wo")]
        if i % 2 == 1:
            layer.update(router=get(pre + "mlp/router/router_weights/w/kernel"),
                         ln_extra=get(pre + "pre_extra_mlp_layer_norm/scale"),
                         wi0=get(pre + "mlp/expert/wi_0/kernel"), wi1=get(pre + "mlp/expert/wi_1/kernel"),
                         wo=get(pre + "mlp/expert/wo/kernel"))
        layers.append(layer)
    return dict(embed=get("token_embedder/embedding"), layers=layers, final_norm=get("decoder/decoder_norm/scale"),
                head=get("decoder/logits_dense/kernel"))


# ---------------------------------------------------------------------------------------------------------------
# Synthetic checkpoints


def random_tensors(shapes: dict) -> dict:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm scales near 1
            out[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.3 * torch.randn(shape, generator=gen)
    return out


def released_torch_tensors() -> dict:
    """Tensors named and shaped as the Colossal-AI OpenMoeForCausalLM saves them."""
    h, i, e, v = ARCH["hidden_size"], ARCH["intermediate_size"], ARCH["num_experts"], ARCH["vocab_size"]
    inner = ARCH["num_attention_heads"] * ARCH["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(ARCH["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        shapes |= {pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
                   pre + "self_attn.q_proj.weight": (inner, h), pre + "self_attn.k_proj.weight": (inner, h),
                   pre + "self_attn.v_proj.weight": (inner, h), pre + "self_attn.o_proj.weight": (h, inner)}
        dense = pre + ("mlp." if layer % 2 == 0 else "extra_mlp.")
        shapes |= {dense + "gate_proj.weight": (2 * i, h), dense + "up_proj.weight": (i, h),
                   dense + "down_proj.weight": (h, i)}
        if layer % 2 == 1:
            shapes |= {pre + "mlp.gate_weight": (e, h), pre + "mlp.experts.wi_gate": (e, h, 2 * i),
                       pre + "mlp.experts.wi_up": (e, h, i), pre + "mlp.experts.wo": (e, i, h),
                       pre + "pre_extra_mlp_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return random_tensors(shapes)


def t5x_tensors() -> dict:
    h, i, e, v = ARCH["hidden_size"], ARCH["intermediate_size"], ARCH["num_experts"], ARCH["vocab_size"]
    inner = ARCH["num_attention_heads"] * ARCH["head_dim"]
    shapes = {"token_embedder/embedding": (v, h)}
    for layer in range(ARCH["num_hidden_layers"]):
        pre = f"decoder/layers_{layer}/"
        shapes |= {pre + "pre_self_attention_layer_norm/scale": (h,), pre + "pre_mlp_layer_norm/scale": (h,),
                   pre + "self_attention/query/kernel": (h, inner), pre + "self_attention/key/kernel": (h, inner),
                   pre + "self_attention/value/kernel": (h, inner), pre + "self_attention/out/kernel": (inner, h)}
        dense = pre + ("mlp/" if layer % 2 == 0 else "extra_mlp/")
        shapes |= {dense + "wi_0/kernel": (h, 2 * i), dense + "wi_1/kernel": (h, i), dense + "wo/kernel": (i, h)}
        if layer % 2 == 1:
            shapes |= {pre + "mlp/router/router_weights/w/kernel": (h, e),
                       pre + "mlp/expert/wi_0/kernel": (e, h, 2 * i), pre + "mlp/expert/wi_1/kernel": (e, h, i),
                       pre + "mlp/expert/wo/kernel": (e, i, h), pre + "pre_extra_mlp_layer_norm/scale": (h,)}
    shapes |= {"decoder/decoder_norm/scale": (h,), "decoder/logits_dense/kernel": (h, v)}
    return random_tensors(shapes)


def write_shards(directory, tensors: dict, fmt: str) -> None:
    """Two shards plus an index, the way save_pretrained shards (.bin: transformers <= 4.34's default)."""
    names = sorted(tensors)
    shards = [names[:len(names) // 2], names[len(names) // 2:]]
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        file = f"{stem}-{n:05d}-of-00002.{ext}"
        part = {name: tensors[name].contiguous() for name in shard}
        if fmt == "bin":
            torch.save(part, directory / file)
        else:
            save_file(part, directory / file, metadata={"format": "pt"})
        weight_map |= {name: file for name in shard}
    (directory / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def colossal_config() -> dict:
    # The Colossal-AI example's spelling (openmoe_8b_config.json): no model_type, topk, capacity_factor_*, gated.
    return dict(architectures=["OpenMoeForCausalLM"], dropout_rate=0.0, layer_norm_epsilon=1e-6,
                hidden_act="swiglu", topk=2, capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=4,
                noisy_policy=None, drop_tks=True, expert_parallel=None, gated=True, **ARCH)


def orion_config() -> dict:
    # The fork / OrionZheng spelling (openmoe_34b_config.json at fb8c5ec40).
    return dict(architectures=["OpenMoeForCausalLM"],
                auto_map={"AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"}, model_type="llama",
                attention_bias=False, bos_token_id=0, eos_token_id=1, pad_token_id=0, hidden_act="swiglu",
                max_position_embeddings=2048, mlp_gated=True, num_key_value_heads=ARCH["num_attention_heads"],
                pretraining_tp=1, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=10000.0, router_topk=2,
                router_capacity_factor_train=1.25, router_capacity_factor_eval=2.0, router_min_capacity=4,
                router_noisy_policy=None, router_drop_tks=True, router_aux_loss_factor=0.01,
                router_z_loss_factor=0.0001, z_loss_factor=0.01, label_smoothing=0.001, tie_word_embeddings=False,
                torch_dtype="float32", use_cache=True, enable_kernel=False, **ARCH)


def write_released(directory, layout: str, tensors: dict):
    directory.mkdir()
    config = colossal_config() if layout == "colossal" else orion_config()
    (directory / "config.json").write_text(json.dumps(config))
    write_shards(directory, tensors, "bin" if layout == "colossal" else "safetensors")
    return directory


def write_t5x(directory, tensors: dict):
    directory.mkdir()
    np.savez(directory / "params.npz", **{"target/" + name: t.numpy() for name, t in tensors.items()})
    return directory


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double()


def assert_nothing_written(tmp_path, dst):
    assert not dst.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}")]


# ---------------------------------------------------------------------------------------------------------------
# Each layout converts to the same function


@pytest.mark.parametrize("layout", ["colossal", "orion"])
def test_released_pytorch_layouts_convert_to_matching_logits(tmp_path, layout):
    tensors = released_torch_tensors()
    src = write_released(tmp_path / "src", layout, tensors)
    (src / "spiece.model").write_bytes(b"umt5 sentencepiece")
    assert detect_layout(src) == layout
    dst = convert_checkpoint(src, tmp_path / "dst")
    assert (dst / "spiece.model").read_bytes() == b"umt5 sentencepiece"  # the tokenizer travels with the weights

    model = AutoModelForCausalLM.from_pretrained(dst)
    expected = reference_logits(reference_params_from_torch_layout(tensors), TOKENS)
    torch.testing.assert_close(logits_of(model), expected, rtol=1e-4, atol=1e-4)
    cfg = model.config
    assert (cfg.model_type, cfg.num_experts, cfg.moe_layer_interval, cfg.head_dim) == ("openmoe", 4, 2, 12)
    assert (cfg.router_topk, cfg.capacity_factor_train, cfg.capacity_factor_eval, cfg.min_capacity) == (2, 1.25, 2.0, 4)
    assert (cfg.dispatch, cfg.router_noise, cfg.rms_norm_eps, cfg.rope_theta) == ("capacity", "none", 1e-6, 1e4)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 0, 1)


def test_t5x_converts_to_matching_logits_in_shards(tmp_path):
    tensors = t5x_tensors()
    src = write_t5x(tmp_path / "src", tensors)
    assert detect_layout(src) == "t5x"
    dst = convert_checkpoint(src, tmp_path / "dst", t5x_config=OpenMoeConfig(**ARCH), max_shard_size="20KB")

    assert (dst / "model.safetensors.index.json").is_file()
    model = load_pretrained_strict(dst)
    expected = reference_logits(reference_params_from_t5x(tensors), TOKENS)
    torch.testing.assert_close(logits_of(model), expected, rtol=1e-4, atol=1e-4)


def test_dtype_is_converted_exactly(tmp_path):
    tensors = released_torch_tensors()
    dst = convert_checkpoint(write_released(tmp_path / "src", "orion", tensors), tmp_path / "dst", dtype="bfloat16")
    state = load_file(dst / "model.safetensors")
    assert set(state) == set(tensors)
    assert all(torch.equal(state[name], tensor.to(torch.bfloat16)) for name, tensor in tensors.items())
    assert load_pretrained_strict(dst).dtype == torch.bfloat16


def test_bfloat16_npz_arrays_read_as_bfloat16(tmp_path):
    # JAX's bfloat16 has no numpy dtype: np.savez stores it as 2-byte raw values.
    values = torch.randn(3, 5).to(torch.bfloat16)
    tmp_path.joinpath("t5x").mkdir()
    np.savez(tmp_path / "t5x" / "p.npz", w=values.view(torch.int16).numpy().view("V2"))
    read = read_t5x_npz(tmp_path / "t5x")["w"]
    assert read.dtype == torch.bfloat16 and torch.equal(read, values)


# ---------------------------------------------------------------------------------------------------------------
# Nothing is skipped silently, and nothing partial is written


def test_missing_tensor_is_named_and_nothing_is_written(tmp_path):
    tensors = released_torch_tensors()
    del tensors["model.layers.1.mlp.experts.wo"]
    src, dst = write_released(tmp_path / "src", "colossal", tensors), tmp_path / "dst"
    with pytest.raises(CheckpointError, match=r"1 missing: model\.layers\.1\.mlp\.experts\.wo"):
        convert_checkpoint(src, dst)
    assert_nothing_written(tmp_path, dst)


def test_missing_t5x_tensor_is_named_by_its_t5x_path(tmp_path):
    tensors = t5x_tensors()
    del tensors["decoder/layers_1/mlp/expert/wo/kernel"]
    src, dst = write_t5x(tmp_path / "src", tensors), tmp_path / "dst"
    with pytest.raises(CheckpointError, match="missing: decoder/layers_1/mlp/expert/wo/kernel"):
        convert_checkpoint(src, dst, t5x_config=OpenMoeConfig(**ARCH))
    assert_nothing_written(tmp_path, dst)


def test_unexpected_tensor_is_an_error(tmp_path):
    # E.g. a rotary table saved as a persistent buffer: we recompute it, but never drop a tensor unannounced.
    tensors = released_torch_tensors() | {"model.layers.0.self_attn.sin": torch.zeros(2048, 12)}
    src, dst = write_released(tmp_path / "src", "orion", tensors), tmp_path / "dst"
    with pytest.raises(CheckpointError, match=r"1 unexpected: model\.layers\.0\.self_attn\.sin"):
        convert_checkpoint(src, dst)
    assert_nothing_written(tmp_path, dst)


def test_wrong_shapes_are_errors(tmp_path):
    tensors = released_torch_tensors()
    tensors["model.layers.1.mlp.experts.wi_up"] = tensors["model.layers.1.mlp.experts.wi_up"].transpose(1, 2)
    with pytest.raises(CheckpointError, match=r"wrong shape: model\.layers\.1\.mlp\.experts\.wi_up \(4, 24, 16\)"):
        convert_checkpoint(write_released(tmp_path / "src", "colossal", tensors), tmp_path / "dst")
    t5x = t5x_tensors()
    t5x["decoder/layers_0/self_attention/query/kernel"] = t5x["decoder/layers_0/self_attention/query/kernel"].T
    with pytest.raises(CheckpointError, match=r"query/kernel \(24, 16\), expected \(16, 24\)"):
        convert_checkpoint(write_t5x(tmp_path / "t5x", t5x), tmp_path / "dst", t5x_config=OpenMoeConfig(**ARCH))
    assert_nothing_written(tmp_path, tmp_path / "dst")


def test_inconsistent_shard_index_is_an_error(tmp_path):
    src = write_released(tmp_path / "src", "orion", released_torch_tensors())
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index lists tensors no shard holds: model.layers.0.mlp.ghost"):
        convert_checkpoint(src, tmp_path / "dst")
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist: model-00002-of-00002.safetensors"):
        convert_checkpoint(src, tmp_path / "dst")
    assert_nothing_written(tmp_path, tmp_path / "dst")


def test_existing_destination_is_replaced_only_with_overwrite(tmp_path):
    src = write_released(tmp_path / "src", "orion", released_torch_tensors())
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(src, dst)
    assert (dst / "old.txt").is_file()
    convert_checkpoint(src, dst, overwrite=True)
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors").is_file()


def test_unsupported_released_configs_are_refused():
    with pytest.raises(CheckpointError, match="num_key_value_heads=1"):
        config_from_released(orion_config() | {"num_key_value_heads": 1}, "config.json")
    with pytest.raises(CheckpointError, match="lacks required OpenMoE fields: num_experts"):
        config_from_released({k: v for k, v in colossal_config().items() if k != "num_experts"}, "config.json")


# ---------------------------------------------------------------------------------------------------------------
# Strict loading of our own format


def test_load_pretrained_strict_refuses_what_from_pretrained_lets_through(tmp_path):
    src = write_released(tmp_path / "src", "orion", released_torch_tensors())
    dst = convert_checkpoint(src, tmp_path / "dst")
    state = load_file(dst / "model.safetensors")
    del state["model.layers.1.mlp.experts.wo"]
    save_file(state | {"model.layers.1.mlp.stray": torch.zeros(1)}, dst / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing: model\.layers\.1\.mlp\.experts\.wo; "
                                              r"1 unexpected: model\.layers\.1\.mlp\.stray"):
        load_pretrained_strict(dst)

    sharded = convert_checkpoint(src, tmp_path / "sharded", max_shard_size="20KB")
    (sharded / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist: model-00002-of-00004.safetensors"):
        load_pretrained_strict(sharded)


def test_load_pretrained_strict_refuses_a_released_layout(tmp_path):
    src = write_released(tmp_path / "src", "colossal", released_torch_tensors())
    with pytest.raises(CheckpointError, match="colossal checkpoint, not ours: convert it first"):
        load_pretrained_strict(src)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_converts_t5x_with_a_config_file_and_reports_errors(tmp_path, capsys):
    tensors = t5x_tensors()
    src = write_t5x(tmp_path / "src", tensors)
    OpenMoeConfig(**ARCH).save_pretrained(tmp_path / "arch")
    assert main([str(src), str(tmp_path / "dst"), "--config", str(tmp_path / "arch" / "config.json")]) == 0
    model = load_pretrained_strict(tmp_path / "dst")
    expected = reference_logits(reference_params_from_t5x(tensors), TOKENS)
    torch.testing.assert_close(logits_of(model), expected, rtol=1e-4, atol=1e-4)

    # The tiny parameters are not a base model: exit status 2, one message, and no output directory.
    capsys.readouterr()
    assert main([str(src), str(tmp_path / "base"), "--preset", "base"]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: T5X checkpoint") and "wrong shape: token_embedder/embedding" in message
    assert_nothing_written(tmp_path, tmp_path / "base")


def test_load_any_checkpoint_converts_a_released_layout_on_the_fly(tmp_path):
    tensors = released_torch_tensors()
    src = write_released(tmp_path / "src", "colossal", tensors)
    model = load_any_checkpoint(src)
    expected = reference_logits(reference_params_from_torch_layout(tensors), TOKENS)
    torch.testing.assert_close(logits_of(model), expected, rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_once_converts_beside_the_source_and_reuses_a_complete_conversion(tmp_path):
    src = write_released(tmp_path / "src", "orion", released_torch_tensors())
    dst = convert_once(src)
    assert dst == conversion_dir(src) == tmp_path / "src-openmoe" and is_conversion_of(dst, src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "src-openmoe"]  # no partial left behind
    written = (dst / "model.safetensors").stat().st_mtime_ns
    assert convert_once(src) == dst and (dst / "model.safetensors").stat().st_mtime_ns == written  # reused
    assert convert_once(dst) == dst  # ours already

    (dst / CONVERTED_MARKER).unlink()  # e.g. a directory of the same name from elsewhere
    with pytest.raises(CheckpointError, match=r"src-openmoe exists but is not a complete conversion of .*src"):
        convert_once(src)


def test_conversion_writes_on_a_rank_other_than_the_first(tmp_path, monkeypatch):
    # One rank per node converts for its node: on the second node it is not global rank 0.
    import transformers.distributed.mixin as mixin
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 8)
    src = write_released(tmp_path / "src", "orion", released_torch_tensors())
    assert (convert_once(src) / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# Streaming: the same files as save_pretrained, one tensor in memory at a time


def saved_by_save_pretrained(directory, config, state: dict, dtype) -> dict[str, bytes]:
    """The files save_pretrained writes for a model holding state (the whole-model way of writing a conversion)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict({name: t.to(dtype) for name, t in state.items()}, strict=True, assign=True)
    model.save_pretrained(directory, max_shard_size="20KB")
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize("layout, dtype", [("colossal", None), ("orion", "bfloat16")])
def test_streamed_conversion_writes_what_save_pretrained_writes(tmp_path, layout, dtype):
    tensors = released_torch_tensors()
    src = write_released(tmp_path / "src", layout, tensors)
    dst = convert_checkpoint(src, tmp_path / "dst", dtype=dtype, max_shard_size="20KB")
    written = {p.name: p.read_bytes() for p in dst.iterdir() if p.name != CONVERTED_MARKER}
    expected = saved_by_save_pretrained(tmp_path / "reference", checkpoint_config(src), tensors,
                                        getattr(torch, dtype or "float32"))
    assert len([name for name in written if name.endswith(".safetensors")]) > 1  # sharded, with an index
    assert written.keys() == expected.keys()
    for name in written:
        assert written[name] == expected[name], name


def test_streamed_t5x_conversion_holds_the_t5x_tensors_exactly(tmp_path):
    tensors = t5x_tensors()
    dst = convert_checkpoint(write_t5x(tmp_path / "src", tensors), tmp_path / "dst",
                             t5x_config=OpenMoeConfig(**ARCH), max_shard_size="20KB", dtype="bfloat16")
    state = {name: t for shard in dst.glob("*.safetensors") for name, t in load_file(shard).items()}
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    ours = reference_params_from_torch_layout(state)
    theirs = reference_params_from_t5x({name: t.to(torch.bfloat16) for name, t in tensors.items()})
    flat = lambda p: [p["embed"], p["final_norm"], p["head"]] + [  # noqa: E731
        t for layer in p["layers"] for v in layer.values() for t in (v if isinstance(v, list) else [v])]
    assert len(flat(ours)) == len(flat(theirs)) == 26
    assert all(torch.equal(a, b) for a, b in zip(flat(ours), flat(theirs)))


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    import moe_system.model.convert as convert
    src = write_released(tmp_path / "src", "orion", released_torch_tensors())
    read, reads = convert.converted_tensor, []

    def interrupted(*args):
        reads.append(1)
        if len(reads) == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the weights
        return read(*args)

    monkeypatch.setattr(convert, "converted_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_once(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no destination, no partial copy
    monkeypatch.setattr(convert, "converted_tensor", read)
    dst = convert_once(src)
    assert is_conversion_of(dst, src) and convert_once(src) == dst



def test_a_full_disk_while_converting_is_one_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import errno

    import moe_system.model.convert as convert
    src = write_released(tmp_path / "src", "orion", released_torch_tensors())
    write, writes = convert.write_safetensors, []

    def full(*args):
        writes.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert, "write_safetensors", full)
    with pytest.raises(CheckpointError, match="disk full while converting .*free up space"):
        convert_once(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no destination, no partial copy
    assert convert.main([str(src), str(tmp_path / "dst")]) == 2  # the command line: one error line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk full while converting"), err
    assert writes and not (tmp_path / "dst").exists()
    monkeypatch.setattr(convert, "write_safetensors", write)
    assert is_conversion_of(convert_once(src), src)

# A released checkpoint of 280 MiB whose largest tensor (an expert stack) is 32 MiB.
BIG = dict(ARCH, vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
           num_attention_heads=4, head_dim=64, num_experts=16, moe_layer_interval=1)
# Converts a tiny checkpoint (imports and first-use allocations: the process's overhead), then a big one, and prints
# the resident memory before the big one and its peak. VmHWM counts mapped file pages too, so this bounds the
# conversion's anonymous memory and the source pages it keeps mapped together.
PEAK_SCRIPT = """
import json, re, sys
from pathlib import Path
from moe_system.model import OpenMoeConfig
from moe_system.model.convert import convert_checkpoint
def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
tiny, big, dtype = json.loads(sys.argv[1])
def convert(src, dst, arch):
    convert_checkpoint(src, dst, dtype=dtype, t5x_config=OpenMoeConfig(**arch) if arch else None)
convert(*tiny)
Path("/proc/self/clear_refs").write_text("5")
overhead = status("VmRSS")
convert(*big)
print(json.dumps({"overhead": overhead, "peak": status("VmHWM")}))
"""


def write_big_released(directory, layout: str) -> tuple[int, int]:
    """A checkpoint of BIG in layout; (its bytes, its largest tensor's bytes)."""
    config = OpenMoeConfig(**BIG)
    shapes = expected_shapes(config)
    rules = t5x_rules(config) if layout == "t5x" else [Rule(name, name) for name in shapes]
    tensors = {rule.source: torch.full(shapes[rule.target][::-1] if rule.transpose else shapes[rule.target], 0.02)
               for rule in rules}
    if layout == "t5x":
        write_t5x(directory, tensors)
    else:
        directory.mkdir()
        config_json = (colossal_config() if layout == "colossal" else orion_config()) | BIG
        config_json["num_key_value_heads"] = BIG["num_attention_heads"]
        (directory / "config.json").write_text(json.dumps(config_json))
        write_shards(directory, tensors, "bin" if layout == "colossal" else "safetensors")
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    return sum(sizes), max(sizes)


@pytest.mark.slow
@pytest.mark.parametrize("layout, dtype", [("orion", None), ("colossal", "bfloat16"), ("t5x", None)])
def test_conversion_holds_one_tensor_at_a_time(tmp_path, layout, dtype):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak resident memory (/proc/self/clear_refs)")
    if layout == "t5x":
        tiny = write_t5x(tmp_path / "tiny", t5x_tensors())
    else:
        tiny = write_released(tmp_path / "tiny", layout, released_torch_tensors())
    total, largest = write_big_released(tmp_path / "big", layout)
    t5x = layout == "t5x"  # a T5X checkpoint has no config: its architecture is given
    runs = [[str(tiny), str(tmp_path / "tiny-out"), ARCH if t5x else None],
            [str(tmp_path / "big"), str(tmp_path / "big-out"), BIG if t5x else None], dtype]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["timeout", "-k", "5", "300", sys.executable, "-c", PEAK_SCRIPT, json.dumps(runs)],
                            cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    memory = json.loads(result.stdout.splitlines()[-1])
    # One tensor read (as big as the largest expert stack) and its converted copy, with test_memory.py's slack.
    held = memory["peak"] - memory["overhead"]
    assert total > 8 * largest and held <= 1.3 * 2 * largest, (held / 2**20, largest / 2**20, total / 2**20)
    head = load_file(tmp_path / "big-out" / "model.safetensors")["lm_head.weight"]
    assert head.eq(torch.tensor(0.02).to(getattr(torch, dtype or "float32"))).all()
