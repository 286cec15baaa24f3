"""Turn records into fixed-length rows of token ids for training and evaluation.

An instruction example is laid out as in OpenMoE, with the pad token as BOS:

    input_ids = [pad] + tok(prompt) + tok(completion) + [eos]
    labels    = -100 on [pad] and the prompt (mask_prompt=True), the ids themselves on completion and eos

A text record is [pad] + tok(text) + [eos], labelled everywhere except the BOS. Labels are not shifted: the
model shifts them (Hugging Face convention). Prompt and completion are tokenised separately so that the boundary
between them is exact, in one batched tokenizer call each.
"""

import logging

import torch

from .errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips


def special_ids(tokenizer) -> tuple[int, int]:
    bos, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise DataError("the tokenizer needs a pad token (used as BOS and padding) and an eos token; "
                        "load it with moe_system.data.load_tokenizer")
    return bos, eos


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Ids to generate a completion from: [pad] + tok(prompt), the same prefix the model was trained on."""
    bos, _ = special_ids(tokenizer)
    return [bos] + tokenize(tokenizer, [prompt])[0]


def encode_examples(records: list[dict], tokenizer, mask_prompt: bool = True) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every record, unpadded."""
    bos, eos = special_ids(tokenizer)
    pairs, texts = [], []
    for index, record in enumerate(records):
        if "prompt" in record and "completion" in record:
            pairs.append(index)
        elif "text" in record:
            texts.append(index)
        else:
            raise DataError(f"record {index} has neither 'prompt'+'completion' nor 'text' (keys: {sorted(record)})")
    prompts = tokenize(tokenizer, [records[i]["prompt"] for i in pairs])
    completions = tokenize(tokenizer, [records[i]["completion"] for i in pairs])
    documents = tokenize(tokenizer, [records[i]["text"] for i in texts])

    examples = [None] * len(records)
    for index, prompt, completion in zip(pairs, prompts, completions):
        ids = [bos] + prompt + completion + [eos]
        shown = [IGNORE_INDEX] * len(prompt) if mask_prompt else prompt
        examples[index] = (ids, [IGNORE_INDEX] + shown + completion + [eos])
    for index, document in zip(texts, documents):
        examples[index] = ([bos] + document + [eos], [IGNORE_INDEX] + document + [eos])
    return examples


def pad_rows(examples, max_length: int, on_overlong: str, pad_id: int):
    """One example per row, right-padded."""
    overlong = [i for i, (ids, _) in enumerate(examples) if len(ids) > max_length]
    if overlong and on_overlong == "error":
        first, longest = overlong[0], max(len(examples[i][0]) for i in overlong)
        raise DataError(f"record {first} is {len(examples[first][0])} tokens long (with BOS and EOS), more than "
                        f"max_length {max_length}; {len(overlong)} record(s) are too long, the longest has "
                        f"{longest} tokens. Raise --max_length to {longest} or truncate them "
                        "(--on_overlong truncate)")
    if overlong:
        logger.warning("truncated %d of %d examples to %d tokens", len(overlong), len(examples), max_length)
    input_ids, attention_mask, labels = [], [], []
    for ids, target in examples:
        ids, target = ids[:max_length], target[:max_length]
        padding = max_length - len(ids)
        input_ids.append(ids + [pad_id] * padding)
        attention_mask.append([1] * len(ids) + [0] * padding)
        labels.append(target + [IGNORE_INDEX] * padding)
    return input_ids, attention_mask, labels


def pack_rows(examples, max_length: int, pad_id: int):
    """All examples back to back (each keeps its BOS and EOS), cut into rows of max_length; the last row is padded.

    Attention is not blocked between documents packed into one row; the eos-then-bos boundary tells them apart.
    """
    stream_ids = [token for ids, _ in examples for token in ids]
    stream_labels = [label for _, labels in examples for label in labels]
    input_ids, attention_mask, labels = [], [], []
    for start in range(0, len(stream_ids), max_length):
        ids, target = stream_ids[start:start + max_length], stream_labels[start:start + max_length]
        padding = max_length - len(ids)
        input_ids.append(ids + [pad_id] * padding)
        attention_mask.append([1] * len(ids) + [0] * padding)
        labels.append(target + [IGNORE_INDEX] * padding)
    return input_ids, attention_mask, labels


class TokenRows(torch.utils.data.Dataset):
    """Rows of input_ids / attention_mask / labels, each a 1-D LongTensor of max_length."""

    def __init__(self, input_ids, attention_mask, labels):
        # Stored as int32 (half the memory of int64 for large sets), handed out as int64 as embeddings expect.
        self.input_ids = torch.tensor(input_ids, dtype=torch.int32)
        self.attention_mask = torch.tensor(attention_mask, dtype=torch.int32)
        self.labels = torch.tensor(labels, dtype=torch.int32)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index].long(), "attention_mask": self.attention_mask[index].long(),
                "labels": self.labels[index].long()}


def build_dataset(records: list[dict], tokenizer, max_length: int, *, mode: str = "pad", mask_prompt: bool = True,
                  on_overlong: str = "error") -> TokenRows:
    """Rows of exactly max_length tokens: one example per row ("pad") or examples packed back to back ("pack").

    In "pad" mode an example longer than max_length is an error, or cut to max_length with on_overlong="truncate".
    In "pack" mode a long example simply continues in the next row.
    """
    if mode not in ("pad", "pack"):
        raise DataError(f"mode must be 'pad' or 'pack', not {mode!r}")
    if on_overlong not in ("error", "truncate"):
        raise DataError(f"on_overlong must be 'error' or 'truncate', not {on_overlong!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 (BOS and EOS), not {max_length}")
    if not records:
        raise DataError("no records to build a data set from")
    examples = encode_examples(records, tokenizer, mask_prompt)
    pad_id, _ = special_ids(tokenizer)
    if mode == "pad":
        return TokenRows(*pad_rows(examples, max_length, on_overlong, pad_id))
    return TokenRows(*pack_rows(examples, max_length, pad_id))


def collate(batch: list[dict]) -> dict:
    """Stack rows into [batch, max_length] tensors. torch's default_collate does the same for these rows, so a
    DataLoader without collate_fn works too."""
    return {key: torch.stack([row[key] for row in batch]) for key in batch[0]}
