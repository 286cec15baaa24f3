"""moe_system.data: bundled data generator, bundled tokenizer, record loading, tokenised rows."""

import json
import os

import pytest
import torch

from moe_system.data import (BUNDLED_DIR, DataError, build_dataset, collate, load_records, load_tokenizer,
                             prompt_ids, train_bundled_tokenizer)
from moe_system.data.make_bundled import TASKS, write_bundled

BUNDLED_FILES = ("train.jsonl", "heldout.jsonl", "text.txt")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The bundled tokenizer is trained once into a private cache for this module."""
    path = tmp_path_factory.mktemp("moe_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_SYSTEM_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return load_tokenizer()


def tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- bundled data -----------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    write_bundled(str(tmp_path / "a"))
    write_bundled(str(tmp_path / "b"))
    for name in BUNDLED_FILES:
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes(), name
        with open(os.path.join(BUNDLED_DIR, name), "rb") as f:
            assert first == f.read(), f"{name} is stale: run python -m moe_system.data.make_bundled"
    assert sum(os.path.getsize(os.path.join(BUNDLED_DIR, name)) for name in BUNDLED_FILES) < 3_000_000


def test_bundled_splits_are_disjoint_and_well_formed():
    train, heldout = load_records("bundled"), load_records("bundled", split="heldout")
    assert len(train) == sum(n for _, n, _ in TASKS.values()) == 20_000
    assert len(heldout) == sum(n for _, _, n in TASKS.values()) == 500
    assert load_records("bundled", split="validation") == heldout == load_records("bundled", split="test")
    train_prompts = {r["prompt"] for r in train}
    assert not train_prompts & {r["prompt"] for r in heldout}
    for record in train + heldout:
        assert record["prompt"].endswith((" =", " ->")) and record["completion"].startswith(" ")
    # Every task is in the held-out split (they are recognisable by their prompt).
    kinds = {r["prompt"].split(":")[0] if ":" in r["prompt"] else ("+" if "+" in r["prompt"] else "-")
             for r in heldout}
    assert kinds == {"+", "-", "copy", "reverse", "sort", "capital", "opposite"}


def test_bundled_answers_are_right():
    for record in load_records("bundled", split="heldout"):
        prompt, answer = record["prompt"], record["completion"].split()
        if "+" in prompt or (" - " in prompt and ":" not in prompt):
            a, op, b = prompt[:-2].replace(" ", "").partition("+" if "+" in prompt else "-")
            assert int("".join(answer)) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        elif prompt.startswith("reverse:"):
            assert answer == prompt[len("reverse:"):-3].split()[::-1]
        elif prompt.startswith("sort:"):
            assert answer == sorted(prompt[len("sort:"):-3].split())


def test_bundled_text_splits():
    train, heldout = load_records("bundled-text"), load_records("bundled-text", split="heldout")
    assert len(heldout) == 200 and len(train) > 2000
    assert all(set(r) == {"text"} and r["text"].strip() for r in train + heldout)
    with pytest.raises(DataError, match="splits 'train' and 'heldout'"):
        load_records("bundled", split="dev")


# --- tokenizer --------------------------------------------------------------------------------------------

def test_tokenizer_training_is_deterministic(tmp_path):
    train_bundled_tokenizer(str(tmp_path / "a"))
    train_bundled_tokenizer(str(tmp_path / "b"))
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_tokenizer_conventions(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 256 < len(tokenizer) <= 1024
    sentinels = [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(32)]
    assert len(set(sentinels)) == 32 and tokenizer.unk_token_id not in sentinels
    assert tokens(tokenizer, "a <extra_id_0> b")[1] == sentinels[0]
    digits = "0 1 2 3 4 5 6 7 8 9"
    ids = tokens(tokenizer, digits)
    assert len(ids) == 10 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == digits
    # Characters outside the corpus go to byte pieces, not <unk>, and decode back.
    ids = tokens(tokenizer, "naïve 日本!")
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == "naïve 日本!"


def test_hf_ids_match_sentencepiece(tokenizer, cache_dir):
    import sentencepiece as spm
    model = next(cache_dir.glob("tokenizers/bundled-*/spiece.model"))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    texts = [r["prompt"] + r["completion"] for r in load_records("bundled", split="heldout")[:50]]
    texts += ["Hello, world: 2024 is (not) a year!", "naïve café"]
    for text in texts:
        assert tokens(tokenizer, text) == sp.encode(text), text


def test_bundled_examples_are_short_and_split_cleanly(tokenizer):
    for record in load_records("bundled", split="heldout"):
        prompt, completion = tokens(tokenizer, record["prompt"]), tokens(tokenizer, record["completion"])
        assert len(prompt) + len(completion) + 2 <= 40
        # Tokenising the parts separately gives the same ids as the whole string.
        assert prompt + completion == tokens(tokenizer, record["prompt"] + record["completion"])


def test_bundled_tokenizer_is_cached(tmp_path, monkeypatch, tokenizer):
    import moe_system.data.tokenizer as tokenizer_module
    monkeypatch.setenv("MOE_SYSTEM_CACHE", str(tmp_path))
    first = load_tokenizer()
    entries = os.listdir(tmp_path / "tokenizers")
    assert len(entries) == 1 and entries[0].startswith("bundled-")  # no temporary directory left behind
    monkeypatch.setattr(tokenizer_module, "train_bundled_tokenizer", lambda out: pytest.fail("retrained"))
    second = load_tokenizer()
    assert tokens(first, "capital: France ->") == tokens(second, "capital: France ->")
    assert len(first) == len(tokenizer)


def test_tokenizer_from_model_file_and_directory(tokenizer, cache_dir, tmp_path):
    bundled = next(cache_dir.glob("tokenizers/bundled-*"))
    text = "opposite: hot big -> cold small"
    assert tokens(load_tokenizer(str(bundled / "spiece.model")), text) == tokens(tokenizer, text)
    assert tokens(load_tokenizer(str(bundled)), text) == tokens(tokenizer, text)
    tokenizer.save_pretrained(tmp_path / "saved")
    assert tokens(load_tokenizer(str(tmp_path / "saved")), "naïve") == tokens(tokenizer, "naïve")
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def test_offline_hub_tokenizer_is_an_error(monkeypatch, cache_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        load_tokenizer("google/umt5-small")


def test_tokenizer_bigger_than_vocab_is_an_error(tokenizer):
    with pytest.raises(DataError, match=f"has {len(tokenizer)} tokens but the model's vocab is 100"):
        load_tokenizer(vocab_size=100)
    assert len(load_tokenizer(vocab_size=1024)) == len(tokenizer)


# --- records ----------------------------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_jsonl_round_trip(tmp_path):
    records = [{"prompt": "a ->", "completion": " b"}, {"text": "plain words"}, {"prompt": "é", "completion": ""}]
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(r) for r in records])
    assert load_records(path) == records


def test_parquet_json_and_txt_round_trip(tmp_path):
    import pyarrow
    import pyarrow.parquet
    records = [{"prompt": f"{i} ->", "completion": f" {i + 1}"} for i in range(5)]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), tmp_path / "data.parquet")
    assert load_records(str(tmp_path / "data.parquet")) == records
    (tmp_path / "data.json").write_text(json.dumps(records))
    assert load_records(str(tmp_path / "data.json")) == records
    path = write_lines(tmp_path / "data.txt", ["first line", "", "second line"])
    assert load_records(path) == [{"text": "first line"}, {"text": "second line"}]


def test_directory_picks_files_by_split(tmp_path):
    write_lines(tmp_path / "part-a.jsonl", [json.dumps({"text": "a"})])
    write_lines(tmp_path / "part-b.txt", ["b"])
    write_lines(tmp_path / "validation-00000-of-00001.jsonl", [json.dumps({"text": "v"})])
    assert load_records(str(tmp_path)) == [{"text": "a"}, {"text": "b"}]
    assert load_records(str(tmp_path), split="heldout") == [{"text": "v"}]
    write_lines(tmp_path / "train.jsonl", [json.dumps({"text": "t"})])
    assert load_records(str(tmp_path)) == [{"text": "t"}]
    (tmp_path / "validation-00000-of-00001.jsonl").unlink()
    with pytest.raises(DataError, match="no heldout/validation/test data file"):
        load_records(str(tmp_path), split="test")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "completion": " c"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, "{not json", good, json.dumps({"question": "?"})])
    with pytest.raises(DataError, match=f"{path}:3"):
        load_records(path)
    records = load_records(path, skip_malformed=True)
    assert len(records) == 3 and records.skipped == 2
    path = write_lines(tmp_path / "fields.jsonl", [good, json.dumps({"prompt": "p", "completion": 3})])
    with pytest.raises(DataError, match=f"{path}:2: malformed record"):
        load_records(path)


def test_empty_and_missing_files_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_records(str(tmp_path / "empty.jsonl"))
    write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no usable records"):
        load_records(str(tmp_path / "blank.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_task_name_is_only_for_hub_data_sets(tmp_path):
    from moe_system.data.records import is_hub_dataset

    write_lines(tmp_path / "rows.jsonl", [json.dumps({"text": "a b"})])
    for local in (str(tmp_path / "rows.jsonl"), "bundled", "bundled-text"):
        assert not is_hub_dataset(local)
        with pytest.raises(DataError, match="no configuration to pick with task_name 'cfg'"):
            load_records(local, "cfg")
    assert load_records(str(tmp_path / "rows.jsonl")) == [{"text": "a b"}]
    assert is_hub_dataset("yizhongw/self_instruct") and not is_hub_dataset("./missing")


def test_offline_hub_dataset_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="offline"):
        load_records("yizhongw/self_instruct", "super_natural_instructions")


def test_hub_dataset_errors_and_heldout_split(monkeypatch):
    import datasets
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(name, config, split):
        raise ConnectionError("Couldn't reach the hub")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="could not load data set 'org/set'.*Couldn't reach"):
        load_records("org/set")

    asked = []

    def test_split_only(name, config, split):
        asked.append(split)
        if split != "test":
            raise ValueError(f'Unknown split "{split}". Should be one of [train, test].')
        return [{"prompt": "p", "completion": " c", "extra": 1}]
    monkeypatch.setattr(datasets, "load_dataset", test_split_only)
    assert load_records("org/set", split="heldout") == [{"prompt": "p", "completion": " c"}]
    assert asked == ["validation", "test"]


# --- tokenised rows ---------------------------------------------------------------------------------------

def test_pad_rows_mask_the_prompt_exactly(tokenizer):
    record = {"prompt": "1 2 + 3 4 =", "completion": " 4 6"}
    prompt, completion = tokens(tokenizer, record["prompt"]), tokens(tokenizer, record["completion"])
    n = 1 + len(prompt) + len(completion) + 1
    row = build_dataset([record], tokenizer, 16)[0]
    assert all(row[k].dtype == torch.long and row[k].shape == (16,) for k in row)
    assert row["input_ids"].tolist() == [0] + prompt + completion + [1] + [0] * (16 - n)
    assert row["attention_mask"].tolist() == [1] * n + [0] * (16 - n)
    assert row["labels"].tolist() == [-100] * (1 + len(prompt)) + completion + [1] + [-100] * (16 - n)
    unmasked = build_dataset([record], tokenizer, 16, mask_prompt=False)[0]
    assert unmasked["labels"].tolist() == [-100] + prompt + completion + [1] + [-100] * (16 - n)
    assert prompt_ids(tokenizer, record["prompt"]) == [0] + prompt


def test_text_rows_label_everything_but_bos(tokenizer):
    text = tokens(tokenizer, "The capital of France is Paris.")
    row = build_dataset([{"text": "The capital of France is Paris."}], tokenizer, 12)[0]
    n = len(text) + 2
    assert row["labels"].tolist() == [-100] + text + [1] + [-100] * (12 - n)


def test_overlong_example_is_an_error_or_truncated(tokenizer):
    records = [{"prompt": "a ->", "completion": " b"},
               {"prompt": "copy: a b c d e f g ->", "completion": " a b c d e f g"}]
    length = 1 + len(tokens(tokenizer, records[1]["prompt"])) + len(tokens(tokenizer, records[1]["completion"])) + 1
    with pytest.raises(DataError, match=f"record 1 is {length} tokens long.*max_length 8.*--max_length"):
        build_dataset(records, tokenizer, 8)
    rows = build_dataset(records, tokenizer, 8, on_overlong="truncate")
    full = build_dataset(records, tokenizer, length)
    assert rows[1]["input_ids"].tolist() == full[1]["input_ids"][:8].tolist()
    assert rows[1]["attention_mask"].tolist() == [1] * 8


def test_pack_rows_are_full_and_hold_every_token_once(tokenizer):
    records = load_records("bundled", split="heldout")[:40]
    expected_ids, expected_labels = [], []
    for row in build_dataset(records, tokenizer, 40):  # each example alone, to know its tokens
        keep = row["attention_mask"].bool()
        expected_ids += row["input_ids"][keep].tolist()
        expected_labels += row["labels"][keep].tolist()
    packed = build_dataset(records, tokenizer, 32, mode="pack")
    assert len(packed) == -(-len(expected_ids) // 32)
    for row in list(packed)[:-1]:
        assert row["attention_mask"].all() and row["input_ids"].shape == (32,)
    got_ids = torch.cat([row["input_ids"][row["attention_mask"].bool()] for row in packed]).tolist()
    got_labels = torch.cat([row["labels"][row["attention_mask"].bool()] for row in packed]).tolist()
    assert got_ids == expected_ids and got_labels == expected_labels
    last = packed[len(packed) - 1]
    assert (last["labels"][~last["attention_mask"].bool()] == -100).all()


def test_full_bundled_set_fits_the_tiny_preset_and_batches(tokenizer):
    rows = build_dataset(load_records("bundled"), tokenizer, 64)
    text_rows = build_dataset(load_records("bundled-text"), tokenizer, 64)
    assert len(rows) == 20_000 and len(text_rows) > 2000
    batch = next(iter(torch.utils.data.DataLoader(rows, batch_size=4)))
    assert batch["input_ids"].shape == (4, 64) and batch["labels"].dtype == torch.long
    assert all(torch.equal(batch[k], collate([rows[i] for i in range(4)])[k]) for k in batch)
    with pytest.raises(DataError, match="mode must be"):
        build_dataset(load_records("bundled", split="heldout"), tokenizer, 64, mode="stream")
