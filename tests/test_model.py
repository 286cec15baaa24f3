import torch
import pytest

from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM
from moe_system.training.flops import param_counts


def tiny(**overrides):
    cfg = OpenMoeConfig.from_preset("tiny", **overrides)
    torch.manual_seed(0)
    return OpenMoeForCausalLM(cfg).eval()


# Released sizes (docs/model.md, Presets): total and per-token activated block parameters.
@pytest.mark.parametrize("name,total,active", [("base", 0.80e9, 0.142e9), ("8b", 11.86e9, 2.75e9), ("34b", 46.3e9, None)])
def test_parameter_counts_match_released_sizes(name, total, active):
    cfg = OpenMoeConfig.from_preset(name)
    with torch.device("meta"):
        model = OpenMoeForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == param_counts(cfg)["total"]  # the analytic count used for FLOPs agrees with the modules
    assert abs(n - total) / total < 0.01, f"{name}: {n / 1e9:.3f}B vs {total / 1e9}B"
    if active is not None:
        assert abs(param_counts(cfg)["active_blocks"] - active) / active < 0.01


def test_architecture_details():
    cfg = OpenMoeConfig.from_preset("8b")
    with torch.device("meta"):
        model = OpenMoeForCausalLM(cfg)
    assert [i for i, l in enumerate(model.model.layers) if l.is_moe] == [5, 11, 17, 23]
    layer = model.model.layers[5]
    assert layer.self_attn.q_proj.weight.shape == (24 * 128, 2048)  # heads*head_dim != hidden
    assert layer.mlp.experts.wi_gate.shape == (32, 2048, 2 * 8192)
    assert layer.mlp.experts.wo.shape == (32, 8192, 2048)
    assert layer.extra_mlp.gate_proj.weight.shape == (2 * 8192, 2048)
    assert not cfg.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight


def test_attention_is_unscaled_t5x_style():
    model = tiny()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 128)
    cos, sin = model.model.rotary_emb(torch.arange(5)[None])
    out = attn(x, cos, sin)
    from moe_system.model.modeling import apply_rotary
    q = apply_rotary(attn.q_proj(x).view(1, 5, 4, 48).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(1, 5, 4, 48).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(1, 5, 4, 48).transpose(1, 2)
    scores = q @ k.transpose(-1, -2)  # no 1/sqrt(d)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_generate_with_cache_equals_without(dispatch):
    model = tiny(dispatch=dispatch)
    ids = torch.randint(3, 1024, (2, 7))
    mask = torch.ones_like(ids)
    a = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=True)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_cached_decode_logits_match_full_forward():
    # The released code had a decode-time RoPE off-by-one; positions here come from the tokens themselves.
    model = tiny()
    ids = torch.randint(3, 1024, (1, 10))
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    cache, steps = out.kv_cache, [out.logits[:, -1]]
    for t in range(6, 10):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 5:9], rtol=1e-4, atol=1e-4)


def test_left_padded_batch_matches_single_rows():
    model = tiny()
    rows = [torch.randint(3, 1024, (n,)) for n in (4, 9, 6)]
    width = 9
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        single = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                max_new_tokens=8, do_sample=False)
        assert torch.equal(batch[i, width:], single[0, len(r):]), i


def test_save_pretrained_sharded_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny()
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is OpenMoeForCausalLM
    ids = torch.randint(3, 1024, (2, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_router_losses_train_the_gate_under_checkpointing():
    # The reference lost these gradients (reentrant checkpointing ran the router under no_grad).
    model = tiny()
    model.train()
    model.model.gradient_checkpointing = True
    ids = torch.randint(3, 1024, (2, 16))
    out = model(ids, labels=ids)
    gate = model.model.layers[1].mlp.gate_weight
    (grad_aux,) = torch.autograd.grad(out.aux_loss, gate, retain_graph=True)
    (grad_z,) = torch.autograd.grad(out.router_z_loss, gate)
    assert grad_aux.abs().sum() > 0 and grad_z.abs().sum() > 0


def test_checkpointing_gives_same_gradients():
    ids = torch.randint(3, 1024, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = tiny()
        model.train()
        if ckpt:
            model.model.gradient_checkpointing = True
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def train_step(recompute, ids, **overrides):
    """A tiny model's gradients after one loss.backward: recompute None (no checkpointing), "selective" or "full"."""
    model = tiny(**overrides).train()
    model.model.gradient_checkpointing = recompute is not None
    model.model.recompute = recompute or "selective"
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_selective_recompute_gives_exactly_the_gradients_without_checkpointing(dispatch):
    # Router noise on: selective recompute never replays the router, so its random draw happens once either way.
    overrides = dict(dispatch=dispatch, capacity_factor_train=0.5, router_noise="jitter")
    ids = torch.randint(3, 1024, (2, 16))
    plain = train_step(None, ids, **overrides)
    selective = train_step("selective", ids, **overrides)
    assert plain.keys() == selective.keys() and all(g is not None for g in selective.values())
    # Recompute replays the same ops on the same inputs, dense and MoE layers alike. Compared to rounding: a BLAS
    # may pick another kernel for the backward's GEMMs on another CPU, and gradient sums may be accumulated in
    # another order once the checkpoint's graph is rebuilt.
    for name in plain:
        torch.testing.assert_close(selective[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)


def saved_activation_bytes(model, ids, monkeypatch) -> int:
    """Bytes of the distinct activation storages one forward leaves for its backward: what autograd saves outside
    checkpoints, and the inputs a checkpoint holds to recompute from (parameters excluded)."""
    from moe_system.model import modeling
    from moe_system.moe import experts

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}  # data_ptr -> storage, held so that no address is reused while counting

    def keep(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage()
        return t

    real = modeling.checkpoint

    def counted_checkpoint(fn, *args, **kwargs):
        for arg in args:
            keep(arg)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(modeling, "checkpoint", counted_checkpoint)
    monkeypatch.setattr(experts, "checkpoint", counted_checkpoint)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(ids, labels=ids)
    return sum(s.nbytes() for s in kept.values())


def test_selective_recompute_saves_activations_between_none_and_full(monkeypatch):
    ids = torch.randint(3, 1024, (4, 32))
    saved = {}
    for recompute in (None, "selective", "full"):
        model = tiny().train()
        model.model.gradient_checkpointing = recompute is not None
        model.model.recompute = recompute or "selective"
        saved[recompute] = saved_activation_bytes(model, ids, monkeypatch)
    print(f"activation bytes saved for backward: {saved}")
    assert saved["full"] < saved["selective"] < saved[None]


def test_recompute_flag():
    from moe_system.training.args import parse_args

    assert parse_args(["--gradient_checkpointing"]).recompute == "full"  # what the memory planner models
    assert parse_args(["--gradient_checkpointing", "--recompute", "selective"]).recompute == "selective"
    for bad in (["--gradient_checkpointing", "--recompute", "attention"], ["--recompute", "selective"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_decoder_in_stages_equals_the_whole_model():
    """What a pipeline stage runs: its layers from the previous stage's hidden states and router-loss sums."""
    model = tiny(num_hidden_layers=4)
    assert len(model.config.moe_layer_indices) == 2
    ids = torch.randint(3, 1024, (2, 12))
    whole = model(ids, labels=ids)
    first = model.model(ids, layers=slice(0, 2), final_norm=False)
    assert torch.count_nonzero(first.router_aux_sum) == 1  # one of the two MoE layers so far
    last = model.model(ids, inputs_embeds=first.last_hidden_state, layers=slice(2, 4),
                       router_sums=(first.router_aux_sum, first.router_z_sum))
    staged = model.lm_output(last, labels=ids)
    for name in ("loss", "lm_loss", "aux_loss", "router_z_loss"):
        torch.testing.assert_close(getattr(staged, name), getattr(whole, name), rtol=1e-6, atol=0.0)
