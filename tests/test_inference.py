"""infer.py and infer_multi_device.py end to end on a randomly initialised tiny checkpoint, plus their parts:
the chat template, stop strings and streaming, left-padded batches, offloaded placement and its memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_system.data import load_tokenizer
from moe_system.inference import Generator, SamplingSettings, format_chat, parse_chat
from moe_system.inference.chat import CHAT_STOPS
from moe_system.inference.cli import infer_main, multi_device_main
from moe_system.inference.device_map import (empty_model, expert_aware_device_map, parse_max_memory,
                                            placement_units)
from moe_system.inference.stopping import StreamPrinter, find_stop, held_back
from moe_system.model import OpenMoeConfig, OpenMoeForCausalLM

REPO = Path(__file__).resolve().parents[1]
GREEDY = ["--greedy", "--max_new_tokens", "12"]
PROMPTS = ["The quick brown fox", "Once upon a time there was", "x"]


def save_checkpoint(path: Path, tokenizer, shard_size="4MB", **overrides) -> Path:
    torch.manual_seed(0)
    model = OpenMoeForCausalLM(OpenMoeConfig.from_preset("tiny", **overrides))
    model.save_pretrained(path, max_shard_size=shard_size)  # sharded, like the training run's checkpoints
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that wait
    # for a busy core made single tests take 30 s instead of 0.1 s. The scripts' subprocesses get one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return save_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.fixture(scope="module")
def model(checkpoint):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def generator(model, tokenizer):
    return Generator(model, tokenizer)


def greedy(n=12, **kw):
    return SamplingSettings(max_new_tokens=n, greedy=True, **kw)


def run_script(script, *args, stdin=None):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --- chat template -----------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief.\nAnswer in English."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": " two  spaces "},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?\n"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "q"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_round_trips(messages):
    text = format_chat(messages)
    assert parse_chat(text) == messages
    assert parse_chat("<pad>" + text) == messages  # with the BOS that prompt encoding adds


def test_chat_template_is_llama2_style():
    text = format_chat([{"role": "system", "content": "SYS"}, {"role": "user", "content": "U1"},
                        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}])
    assert text == "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nU1 [/INST] A1 </s><pad>[INST] U2 [/INST]"
    # A reply still being generated parses as an open assistant message.
    assert parse_chat("[INST] U [/INST] partial")[-1] == {"role": "assistant", "content": "partial"}


@pytest.mark.parametrize("messages,match", [
    ([], "at least one user"),
    ([{"role": "assistant", "content": "a"}], "should be from the user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "should be from the assistant"),
    ([{"role": "user", "content": "see [/INST] here"}], "template marker"),
])
def test_chat_template_rejects_bad_conversations(messages, match):
    with pytest.raises(ValueError, match=match):
        format_chat(messages)
    with pytest.raises(ValueError, match="not an OpenMoE chat prompt"):
        parse_chat("hello [/INST]")


# --- generation --------------------------------------------------------------------------------------------

def test_generation_with_cache_equals_without(model, generator):
    input_ids, mask = generator.left_pad([generator.encode(p) for p in PROMPTS])
    outs = [model.generate(input_ids=input_ids, attention_mask=mask,
                           generation_config=greedy().generation_config(model.config, 12), use_cache=cache)
            for cache in (True, False)]
    assert torch.equal(*outs)


def test_left_padded_batch_equals_single_prompts(generator):
    batch = generator.generate(PROMPTS, greedy())
    for prompt, completion in zip(PROMPTS, batch):
        (single,) = generator.generate([prompt], greedy())
        assert completion.token_ids == single.token_ids and completion.text == single.text
    assert generator.encode("x") == [0] + generator.tokenizer("x", add_special_tokens=False)["input_ids"]


def test_sampling_is_seeded_and_honours_its_settings(generator):
    settings = SamplingSettings(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.3)
    torch.manual_seed(3)
    a = generator.generate(PROMPTS, settings)
    torch.manual_seed(3)
    b = generator.generate(PROMPTS, settings)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    config = settings.generation_config(generator.config, 10)
    assert config.do_sample and config.top_k == 20 and config.repetition_penalty == 1.3
    assert not greedy().generation_config(generator.config, 10).do_sample


def test_stop_strings_cut_the_text_and_the_stream(generator, tokenizer, capsys):
    (free,) = generator.generate([PROMPTS[0]], greedy(16))
    text = free.text
    assert len(text) > 6
    stop = text[3:6]  # a stop string that may span tokens
    streamed = StreamPrinter(tokenizer, (stop,))
    (cut,) = generator.generate([PROMPTS[0]], greedy(16, stop=(stop,)), streamer=streamed)
    assert cut.finish == "stop" and cut.text == text[:text.find(stop)]
    assert len(cut.token_ids) < len(free.token_ids) and cut.token_ids == free.token_ids[:len(cut.token_ids)]
    assert capsys.readouterr().out == cut.text + "\n"


def test_stop_helpers():
    assert find_stop("abc</s>def[INST]", CHAT_STOPS) == 3
    assert find_stop("nothing here", CHAT_STOPS) == -1
    assert held_back("text </", CHAT_STOPS) == 2 and held_back("text [IN", CHAT_STOPS) == 3
    assert held_back("text", CHAT_STOPS) == 0


# --- infer.py ----------------------------------------------------------------------------------------------

def test_infer_script_end_to_end(checkpoint, generator, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n\n")
    result = run_script("infer.py", "--model", checkpoint, "--prompt_file", prompt_file, *GREEDY,
                        "--batch_size", 2, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr
    expected = generator.generate(PROMPTS, greedy())
    got = records(tmp_path / "out.jsonl")
    assert [r["token_ids"] for r in got] == [c.token_ids for c in expected]
    for prompt, completion in zip(PROMPTS, expected):
        assert prompt + completion.text in result.stdout


def test_infer_interactive_chat_keeps_the_conversation(checkpoint, tmp_path):
    result = run_script("infer.py", "--model", checkpoint, "--chat", "--system", "Be brief.", *GREEDY,
                        "--output", tmp_path / "chat.jsonl", stdin="Hello there\n\nHow are you?\n/reset\nAgain\n")
    assert result.returncode == 0, result.stderr
    turns = records(tmp_path / "chat.jsonl")
    assert [t["prompt"] for t in turns] == ["Hello there", "How are you?", "Again"]
    second = parse_chat(turns[1]["input"])
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == turns[0]["completion"].strip() and second[3]["content"] == "How are you?"
    assert len(parse_chat(turns[2]["input"])) == 2  # /reset started a new conversation


def test_infer_preset_smoke_run(capsys):
    assert infer_main(["--model", "tiny", "--prompt", "hi", "--prompt", "there", *GREEDY, "--no_stream"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("--- 1/2\nhi") and "tokens/s" in out.err


def expect_error(main, argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    return err


def test_infer_errors_are_clear(tmp_path, tokenizer, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(infer_main, ["--model", str(empty), "--prompt", "x"], capsys,
                 "not a checkpoint directory: it has no config.json")
    expect_error(infer_main, ["--model", str(tmp_path / "missing"), "--prompt", "x"], capsys, "does not exist")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(OpenMoeConfig.from_preset("tiny").to_json_string())
    expect_error(infer_main, ["--model", str(no_weights), "--prompt", "x"], capsys, "no weights")
    small_vocab = save_checkpoint(tmp_path / "small_vocab", tokenizer, vocab_size=512)
    expect_error(infer_main, ["--model", str(small_vocab), "--prompt", "x"], capsys,
                 f"has {len(tokenizer)} tokens but the model's vocab is 512")
    expect_error(infer_main, ["--model", "tiny", "--prompt", "word " * 600], capsys,
                 "tokens long but the model's context is 512")
    expect_error(infer_main, ["--model", "tiny", "--prompt", "x", "--top_p", "0"], capsys, "--top_p must be in (0, 1]")
    expect_error(infer_main, ["--model", "tiny", "--prompt_file", str(tmp_path / "nope.txt")], capsys, "prompt file")


# --- infer_multi_device.py ---------------------------------------------------------------------------------

def test_parse_max_memory():
    assert parse_max_memory("cpu=50GiB") == {"cpu": "50GiB"}
    for bad, match in [("cpu", "DEVICE=SIZE"), ("cpu=lots", "not a size"), ("tpu=1GB", "not a GPU index"),
                       ("7=1GB", "GPU 7")]:
        with pytest.raises(Exception, match=match):
            parse_max_memory(bad)


def test_expert_aware_map_keeps_dense_parts_first(checkpoint):
    from transformers import AutoConfig
    skeleton = empty_model(AutoConfig.from_pretrained(checkpoint))
    device_map = expert_aware_device_map(skeleton, {"cpu": "9MiB"}, torch.float32)
    units = dict(placement_units(skeleton))
    dense_on_cpu = [name for name, dev in device_map.items() if not units[name] and dev == "cpu"]
    experts = {name: dev for name, dev in device_map.items() if units[name]}
    assert set(experts) == {"model.layers.1.mlp.experts", "model.layers.3.mlp.experts"}
    assert len(dense_on_cpu) == sum(not e for e in units.values())  # every dense unit fits in RAM...
    assert set(experts.values()) == {"disk"}  # ...and the experts, which do not, are on disk


def test_multi_device_offloaded_greedy_equals_full_model(checkpoint, generator, tmp_path):
    expected = [c.token_ids for c in generator.generate(PROMPTS, greedy())]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    explicit = tmp_path / "map.json"
    explicit.write_text(json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                                    "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu",
                                    "model.norm": "disk", "lm_head": "cpu"}))
    for placement in (["--max_memory", "cpu=9MiB"], ["--max_memory", "cpu=9MiB", "--expert_aware"],
                      ["--device_map", explicit]):
        out = tmp_path / "out.jsonl"
        result = run_script("infer_multi_device.py", "--model", checkpoint, "--prompt_file", prompt_file, *GREEDY,
                            "--output", out, "--stats_json", tmp_path / "stats.json", *placement)
        assert result.returncode == 0, result.stderr
        stats = json.loads((tmp_path / "stats.json").read_text())
        assert "disk" in stats["device_map"].values() and stats["planned_bytes"]["disk"] > 0
        assert "[placement] device map" in result.stderr and "[memory]" in result.stderr
        assert [r["token_ids"] for r in records(out)] == expected, placement


def test_multi_device_errors_are_clear(checkpoint, tmp_path, capsys):
    base = ["--model", str(checkpoint), "--prompt", "x"]
    expect_error(multi_device_main, ["--model", "tiny", "--prompt", "x"], capsys, "does not exist")
    expect_error(multi_device_main, base + ["--max_memory", "cpu:5GB"], capsys, "DEVICE=SIZE")
    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps({"model.embed_tokens": "cpu"}))
    expect_error(multi_device_main, base + ["--device_map", str(bad_map)], capsys, "does not give any device")
    bad_map.write_text(json.dumps({"model.nothing": "cpu", "": "cpu"}))
    expect_error(multi_device_main, base + ["--device_map", str(bad_map)], capsys, "model.nothing")
    bad_map.write_text("{")
    expect_error(multi_device_main, base + ["--device_map", str(bad_map)], capsys, "not valid JSON")


def test_offloaded_resident_memory_stays_within_the_limit(tmp_path, tokenizer):
    """A 115 MiB model under cpu=32MiB: the process grows by at most the limit plus a small runtime allowance
    (imports done lazily, activations), where the same model fully loaded grows by its whole size. Measured as
    the peak RSS of the script's own process from just before loading to the end of generation."""
    big = save_checkpoint(tmp_path / "big", tokenizer, "1GB", hidden_size=256, intermediate_size=512,
                          num_hidden_layers=6, moe_layer_interval=1, num_experts=8)
    size_mib = sum(f.stat().st_size for f in big.glob("*.safetensors")) / 2**20
    # The allowance covers lazy imports and activations, plus the weights of the layer being computed: offloaded
    # layers are read from disk through mmap, and those file pages (up to ~17 MiB for the largest layer here)
    # count in RSS while in use, and so do the pages around the chosen experts' rows an expert-aware read touches.
    # Measured 37-79 MiB of growth, depending on the page cache and the machine's load; the full load: ~122.
    limit_mib, allowance_mib = 32, 56
    runs = {}
    limited = ["--max_memory", f"cpu={limit_mib}MiB"]
    for name, extra in (("full", []), ("offloaded", limited), ("expert_aware", limited + ["--expert_aware"])):
        result = run_script("infer_multi_device.py", "--model", big, "--prompt", PROMPTS[0], "--greedy",
                            "--max_new_tokens", 4, "--output", tmp_path / f"{name}.jsonl",
                            "--stats_json", tmp_path / f"{name}.json", *extra)
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        runs[name]["tokens"] = records(tmp_path / f"{name}.jsonl")[0]["token_ids"]
    full = runs.pop("full")
    assert full["peak_rss_growth_mib"] >= 0.9 * size_mib > limit_mib + allowance_mib, full
    for offloaded in runs.values():
        assert offloaded["tokens"] == full["tokens"]
        assert offloaded["planned_bytes"].get("cpu", 0) <= limit_mib * 2**20
        assert offloaded["peak_rss_growth_mib"] <= limit_mib + allowance_mib, offloaded
    assert runs["expert_aware"]["device_map"]["model.layers.0.self_attn"] == "cpu"


def test_both_scripts_run_a_converted_release_checkpoint(tmp_path, tokenizer, monkeypatch):
    # A synthetic checkpoint in the Colossal-AI release layout (hpcai-tech/openmoe-*), converted to ours.
    import test_convert as released
    from moe_system.model.convert import convert_checkpoint
    monkeypatch.setitem(released.ARCH, "vocab_size", 1024)  # room for the bundled tokenizer
    source = released.write_released(tmp_path / "release", "colossal", released.released_torch_tensors())
    converted = convert_checkpoint(source, tmp_path / "converted")
    tokenizer.save_pretrained(converted)
    runs = {}
    for script, extra in (("infer.py", []), ("infer_multi_device.py", ["--max_memory", "cpu=1KiB"])):
        result = run_script(script, "--model", converted, "--prompt", PROMPTS[0], *GREEDY, *extra,
                            "--output", tmp_path / f"{script}.jsonl")
        assert result.returncode == 0, result.stderr
        runs[script] = records(tmp_path / f"{script}.jsonl")[0]["token_ids"]
    assert runs["infer.py"] == runs["infer_multi_device.py"] and len(runs["infer.py"]) > 0


def record_attention(monkeypatch) -> list:
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append({"queries": q.shape[-2], "mask": attn_mask is not None, "causal": is_causal})
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_unpadded_batch_generates_without_a_mask(model, generator, monkeypatch):
    """Prompts of one length: prefill attends causally with no mask (SDPA's flash kernel needs exactly that) and
    decoding with none either; the tokens are those of the masked path. A left-padded batch keeps its mask."""
    prompts = ["The capital of France is", "The capital of Spain is"]
    ids = [generator.encode(p) for p in prompts]
    assert len(ids[0]) == len(ids[1])
    input_ids, mask = generator.left_pad(ids)
    config = greedy().generation_config(model.config, 12)
    masked = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    calls = record_attention(monkeypatch)
    batch = generator.generate(prompts, greedy())
    assert [c.token_ids for c in batch] == [row[input_ids.shape[1]:].tolist()[:len(c.token_ids)]
                                            for row, c in zip(masked, batch)]
    prefill = [c for c in calls if c["queries"] > 1]
    assert prefill and all(c == {"queries": input_ids.shape[1], "mask": False, "causal": True} for c in prefill)
    assert not any(c["mask"] for c in calls)
    calls.clear()
    generator.generate(PROMPTS, greedy())  # different lengths: left padding, masked
    assert len({len(generator.encode(p)) for p in PROMPTS}) > 1 and all(c["mask"] for c in calls if c["queries"] > 1)


def test_no_padding_forward_drops_the_mask(model, monkeypatch):
    """model(..., attention_mask=all ones, no_padding=True): prefill runs causal without a mask, same logits."""
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=ones).logits
        calls = record_attention(monkeypatch)
        unmasked = model(input_ids=ids, attention_mask=ones, no_padding=True).logits
    assert calls and all(c == {"queries": 9, "mask": False, "causal": True} for c in calls)
    torch.testing.assert_close(unmasked, masked, rtol=1e-5, atol=1e-5)


# --- KV cache ----------------------------------------------------------------------------------------------

class CacheCats(torch.overrides.TorchFunctionMode):
    """Counts torch.cat calls along the sequence axis of [B, heads, T, head_dim] tensors: a KV cache growing."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.cat:
            tensors, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            self.count += tensors[0].ndim == 4 and dim in (2, -2)
        return func(*args, **kwargs)


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:1], ["The capital of France is", "The capital of Spain is"]],
                         ids=["left_padded", "single", "unpadded"])
def test_preallocated_cache_generates_the_dynamic_cache_tokens(model, generator, prompts):
    """Greedy ids from the generator's preallocated cache equal those of generate()'s own DynamicCache."""
    from moe_system.inference.kv_cache import PreallocatedCache
    ids = [generator.encode(p) for p in prompts]
    input_ids, mask = generator.left_pad(ids)
    no_padding = len({len(i) for i in ids}) == 1
    with CacheCats() as cats:
        reference = model.generate(input_ids=input_ids, attention_mask=mask, no_padding=no_padding,
                                   generation_config=greedy().generation_config(model.config, 12))
    assert cats.count > 0  # the reference really is the concatenating cache
    used = []
    real_init = PreallocatedCache.__init__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PreallocatedCache, "__init__", lambda self, *a: (used.append(self), real_init(self, *a))[1])
        completions = generator.generate(prompts, greedy())
    assert len(used) == 1 and used[0].get_seq_length() > input_ids.shape[1]
    for row, completion in zip(reference, completions):
        new = row[input_ids.shape[1]:].tolist()
        assert completion.token_ids == new[:len(completion.token_ids)] and len(completion.token_ids) > 0


def test_decoding_writes_the_cache_in_place(generator, monkeypatch):
    """No per-token concatenation: every layer's keys live in one buffer for the whole generation."""
    key_ptrs = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        key_ptrs.append((q.shape[-2], k.shape[-2], k.data_ptr()))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with CacheCats() as cats:
        (completion,) = generator.generate([PROMPTS[1]], greedy(8))
    assert cats.count == 0
    layers = generator.config.num_hidden_layers
    decode = [call for call in key_ptrs if call[0] == 1]
    assert len(decode) >= 2 * layers and len(completion.token_ids) == len(decode) // layers + 1
    for layer in range(layers):
        steps = decode[layer::layers]
        assert len({ptr for _, _, ptr in steps}) == 1, steps  # the same buffer at every step...
        assert [keys for _, keys, _ in steps] == list(range(steps[0][1], steps[0][1] + len(steps)))  # ...growing


# --- offloaded experts -------------------------------------------------------------------------------------

def test_offloaded_experts_copy_only_the_chosen_ones(tmp_path, tokenizer):
    """Experts kept on disk or in CPU memory under an expert-aware map: the same greedy tokens as the model fully
    loaded, and a one-token forward brings at most top_k / E of an MoE layer's expert bytes to the device."""
    from moe_system.inference.device_map import load_dispatched
    from moe_system.inference.expert_offload import ChosenExpertsFetch
    path = save_checkpoint(tmp_path / "ckpt", tokenizer, num_experts=8)
    full = OpenMoeForCausalLM.from_pretrained(path).eval()
    expected = [c.token_ids for c in Generator(full, tokenizer).generate(PROMPTS, greedy(6))]
    layer_bytes = sum(w.numel() * w.element_size() for w in full.model.layers[1].mlp.experts.parameters())
    device_map = {name: "disk" if is_experts else "cpu" for name, is_experts in placement_units(full)}
    model = load_dispatched(str(path), device_map, torch.float32, str(tmp_path / "offload"))
    fetchers = [m.forward for m in model.modules() if isinstance(m.forward, ChosenExpertsFetch)]
    assert len(fetchers) == len(model.config.moe_layer_indices)
    assert [c.token_ids for c in Generator(model, tokenizer).generate(PROMPTS, greedy(6))] == expected
    share = model.config.router_topk / model.config.num_experts
    for tokens in ([[0, 42]], [[7]]):
        before = [f.bytes_copied for f in fetchers]
        with torch.no_grad():
            model(input_ids=torch.tensor(tokens))
        for start, fetch in zip(before, fetchers):  # each token brings at most its top_k experts
            assert 0 < fetch.bytes_copied - start <= len(tokens[0]) * share * layer_bytes


def test_offloaded_experts_read_only_the_chosen_rows():
    """Experts kept in CPU memory (accelerate's in-memory state dict) or in safetensors: the chosen rows."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
    from moe_system.inference.expert_offload import stored_rows
    wo = torch.randn(8, 3, 5)
    in_memory = PrefixedDataset(OffloadedWeightsLoader(state_dict={"layer.experts.wo": wo}), "layer.experts.")
    assert torch.equal(stored_rows(in_memory, "wo", [1, 6]), wo[[1, 6]])
