"""Data: the bundled instruction set and tokenizer, record loading, and tokenised fixed-length rows.

    tokenizer = load_tokenizer()                               # bundled unigram tokenizer (pad 0, eos 1)
    records = load_records("bundled", split="train")           # [{"prompt": ..., "completion": ...}, ...]
    rows = build_dataset(records, tokenizer, max_length=64)    # items: input_ids / attention_mask / labels
    rows = UL2Rows(records, tokenizer, max_length=512)         # OpenMoE's UL2 mix (ul2.py)
    rows = MixtureRows([rows_a, rows_b], [0.7, 0.3], seed=0)   # weighted mix (mixture.py; StreamingRows too)
"""

from .errors import DataError
from .examples import IGNORE_INDEX, build_dataset, collate, prompt_ids
from .mixture import MixtureRows, StreamingRows, parse_sources
from .paths import BUNDLED_DIR
from .records import load_records
from .tokenizer import load_tokenizer, train_bundled_tokenizer
from .ul2 import UL2Rows

__all__ = ["DataError", "load_tokenizer", "train_bundled_tokenizer", "load_records", "build_dataset", "prompt_ids",
           "collate", "IGNORE_INDEX", "BUNDLED_DIR", "UL2Rows", "MixtureRows", "StreamingRows", "parse_sources"]
