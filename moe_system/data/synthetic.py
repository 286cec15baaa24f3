"""Random-token rows for throughput runs without any data (as fairseq's `dummy_lm` task).

Row i is a deterministic function of (seed, i), so runs are repeatable and resumable; every position is a
target. Ids avoid the special tokens 0-2 so routing sees "real" token embeddings only.
"""

import torch
from torch.utils.data import Dataset


class SyntheticTokens(Dataset):
    def __init__(self, vocab_size: int, max_length: int, num_rows: int = 1_000_000, seed: int = 0):
        self.vocab_size, self.max_length, self.num_rows, self.seed = vocab_size, max_length, num_rows, seed

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ids = torch.randint(3, self.vocab_size, (self.max_length,), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
