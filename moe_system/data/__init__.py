"""Data: the bundled instruction set and tokenizer, record loading, and tokenised fixed-length rows.

    tokenizer = load_tokenizer()                               # bundled unigram tokenizer (pad 0, eos 1)
    records = load_records("bundled", split="train")           # [{"prompt": ..., "completion": ...}, ...]
    rows = build_dataset(records, tokenizer, max_length=64)    # items: input_ids / attention_mask / labels
"""

from .errors import DataError
from .examples import IGNORE_INDEX, build_dataset, collate, prompt_ids
from .paths import BUNDLED_DIR
from .records import load_records
from .tokenizer import load_tokenizer, train_bundled_tokenizer

__all__ = ["DataError", "load_tokenizer", "train_bundled_tokenizer", "load_records", "build_dataset", "prompt_ids",
           "collate", "IGNORE_INDEX", "BUNDLED_DIR"]
