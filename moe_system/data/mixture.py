"""Weighted data mixes (as open_lm's --train-data-mix-weights), per-source token counts, and streaming text.

`--dataset` names one source or several with weights, comma-separated, each `source:weight`:

    --dataset bundled                                  one source, as before
    --dataset bundled-text:0.7,data/other.jsonl:0.3    70% / 30% of the rows drawn from each

A source is anything `load_records` accepts (or "synthetic"); a trailing ":<number>" is its weight (weights are
normalised; a source without one gets weight 1).

MixtureRows is map-style and index-based: which source and which of its rows sample i is, is a pure function of
(seed, i), fixed when the mixture is built. So the DistributedSampler shuffles and shards it like any data set and
ResumableDistributedSampler resumes it at the exact sample. Each source is read in a seeded random order and only
repeats after a full pass (an upweighted small source is cycled, a downweighted large one partly used per epoch).

StreamingRows reads a .jsonl/.txt file lazily for data that does not fit in memory: records are sharded by rank
(record r goes to rank r % world), and a resumed run skips the rows this rank already consumed. train.py
--streaming uses it over one file or a directory of them (`streaming_files`), sharded by data-parallel rank.
"""

import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from ..parallel.comm import all_reduce_values
from .errors import DataError
from .examples import IGNORE_INDEX, encode_examples, special_ids
from .records import clean_record


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """"a:0.7,b:0.3" -> [("a", 0.7), ("b", 0.3)]; a name with no weight -> (name, 1.0). Weights are finite
    numbers above 0; anything after the last ':' is a weight (hub names hold no ':'), except in an existing path."""
    forms = "give name or name:weight, comma-separated, each weight a number above 0 " \
            "(e.g. bundled-text:0.7,data/other.jsonl:0.3)"
    sources = []
    for item in spec.split(","):
        item = item.strip()
        name, sep, weight = item.rpartition(":")
        if not sep or os.path.exists(os.path.expanduser(item)):
            name, weight = item, "1"
        try:
            value = float(weight)
        except ValueError:
            raise DataError(f"--dataset: the weight {weight!r} of {item!r} is not a number; {forms}") from None
        if not name or not (math.isfinite(value) and value > 0):
            raise DataError(f"--dataset: bad source {item!r}; {forms}")
        sources.append((name, value))
    return sources


def source_label(name: str) -> str:
    """Short metric name for a source: the file or directory name without extension."""
    return os.path.splitext(os.path.basename(name.rstrip("/")))[0] or name


class MixtureRows(torch.utils.data.Dataset):
    """Rows from several data sets, drawn by weight. Each row also carries "source": its data set's number."""

    def __init__(self, datasets: list, weights: list[float], seed: int = 0, num_rows: int | None = None,
                 labels: list[str] | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise DataError("a mixture needs one weight per data set")
        self.datasets = datasets
        self.labels = labels or [str(i) for i in range(len(datasets))]
        self.weights = np.asarray(weights, dtype=float) / sum(weights)
        # One epoch defaults to as many rows as the sources hold together.
        self.num_rows = num_rows or sum(len(d) for d in datasets)
        rng = np.random.default_rng([seed, 0x3137])
        self.source = rng.choice(len(datasets), size=self.num_rows, p=self.weights).astype(np.int32)
        # Sample i is the k-th draw of its source: row order[k % len] of a seeded permutation of that source.
        self.row = np.zeros(self.num_rows, dtype=np.int64)
        for s, dataset in enumerate(datasets):
            draws = np.flatnonzero(self.source == s)
            order = np.random.default_rng([seed, s]).permutation(len(dataset))
            self.row[draws] = order[np.arange(len(draws)) % len(dataset)]

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        source = int(self.source[index])
        return {**self.datasets[source][int(self.row[index])], "source": torch.tensor(source)}


class SourceTokenCounter:
    """Cumulative per-source token counts (all real tokens and target tokens), summed over data-parallel ranks."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.counts = torch.zeros(2, len(labels), dtype=torch.float64)

    def update(self, batch: dict) -> None:
        if "source" not in batch:
            return
        source = batch["source"].long()
        n = len(self.labels)
        self.counts[0] += torch.bincount(source, weights=batch["attention_mask"].sum(1).double(), minlength=n)
        self.counts[1] += torch.bincount(source, weights=(batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).double(),
                                         minlength=n)

    def total(self, group=None) -> torch.Tensor:
        """Counts summed over the group's ranks (on the CPU, as kept). Collective: every rank of it must call it
        at the same step."""
        return all_reduce_values(self.counts, group).cpu()

    def state_dict(self, group=None) -> dict:
        """The group's summed counts, for a checkpoint (JSON-able). Collective, as total()."""
        counts = self.total(group)
        return {"labels": list(self.labels), "tokens": counts[0].tolist(), "target_tokens": counts[1].tolist()}

    def load_state_dict(self, state: dict, group=None) -> None:
        """Restores saved totals: the group's first rank holds them, the others start from zero, so the summed
        counts continue where they were (under any number of ranks). Sources are matched by label."""
        self.counts.zero_()
        if group is not None and dist.get_world_size(group) > 1 and dist.get_rank(group) != 0:
            return
        for saved, label in enumerate(state["labels"]):
            if label in self.labels:
                i = self.labels.index(label)
                self.counts[0, i], self.counts[1, i] = state["tokens"][saved], state["target_tokens"][saved]

    def stats(self, group=None) -> dict:
        """Collective when the group has several ranks: every rank of it must call it at the same step."""
        counts = self.total(group)
        result = {}
        for i, label in enumerate(self.labels):
            result[f"data/{label}/tokens"] = counts[0, i].item()
            result[f"data/{label}/target_tokens"] = counts[1, i].item()
        return result


class StreamingRows(torch.utils.data.IterableDataset):
    """Padded rows (as build_dataset's "pad" mode, over-long examples truncated) read lazily from .jsonl/.txt files.

    Record r of the files (counting across them in order) belongs to rank r % world_size, so ranks never see the
    same record; skip_rows drops this rank's first rows (a resumed run passes the rows it already consumed). With
    repeat=True the files are read again and again (an endless stream for step-bounded runs). A malformed record
    raises, or with skip_malformed is dropped (deterministically, so skip_rows still lands on the same row).
    """

    def __init__(self, paths: list[str], tokenizer, max_length: int, *, rank: int | None = None,
                 world_size: int | None = None, skip_rows: int = 0, mask_prompt: bool = True, repeat: bool = False,
                 skip_malformed: bool = False):
        for path in paths:
            if not path.endswith((".jsonl", ".txt")):
                raise DataError(f"{path}: streaming reads .jsonl or .txt files")
            if not os.path.isfile(path):
                raise DataError(f"data file {path!r} does not exist")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.paths, self.tokenizer, self.max_length = paths, tokenizer, max_length
        self.skip_rows, self.mask_prompt, self.repeat = skip_rows, mask_prompt, repeat
        self.skip_malformed = skip_malformed
        self.pad_id, _ = special_ids(tokenizer)

    def check_every_rank_has_rows(self, group=None) -> None:
        """Raises unless the files hold a record for every rank; reads only the first world_size records. With
        skip_malformed, also unless every rank has a usable one: a collective over the data-parallel group (every
        rank raises the same error before the first step, instead of one rank at the end of its records)."""
        found = 0
        for path in self.paths:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    found += bool(line.strip())
                    if found >= self.world_size:
                        break
        if found < self.world_size:
            raise DataError(f"{', '.join(self.paths)}: {found} record(s) for {self.world_size} data-parallel ranks; "
                            f"streaming needs at least one record per rank")
        if not self.skip_malformed:  # a malformed record raises on its own
            return
        empty = [0] * self.world_size
        empty[self.rank] = int(next(self.records(), None) is None)  # reads up to this rank's first usable record
        empty = all_reduce_values(empty, group, dtype=torch.int32).cpu()
        if empty.any():
            ranks = ", ".join(str(r) for r in empty.nonzero().flatten().tolist())
            raise DataError(f"--streaming: {', '.join(self.paths)} gave no usable record to data-parallel rank(s) "
                            f"{ranks} (all of theirs are malformed, skipped by --skip_malformed); fix the records "
                            f"or use fewer data-parallel ranks")

    def records(self):
        """This rank's records, one at a time (a line is parsed only when its turn comes)."""
        number = 0
        for path in self.paths:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    mine = number % self.world_size == self.rank
                    number += 1
                    if not mine:
                        continue
                    if path.endswith(".txt"):
                        yield {"text": line.rstrip("\n")}
                        continue
                    try:
                        record = clean_record(json.loads(line))
                    except json.JSONDecodeError:
                        record = None
                    if record is None:
                        if self.skip_malformed:
                            continue
                        raise DataError(f"{path}: malformed record in line {line[:80]!r}; fix it or pass "
                                        f"--skip_malformed to skip it")
                    yield record

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise DataError("StreamingRows shards by rank only; use num_workers <= 1")
        produced = 0
        while True:
            for record in self.records():
                produced += 1
                if produced <= self.skip_rows:  # consumed before the resume: skip without tokenising
                    continue
                (ids, labels), = encode_examples([record], self.tokenizer, self.mask_prompt)
                ids, labels = ids[:self.max_length], labels[:self.max_length]
                padding = self.max_length - len(ids)
                yield {"input_ids": torch.tensor(ids + [self.pad_id] * padding),
                       "attention_mask": torch.tensor([1] * len(ids) + [0] * padding),
                       "labels": torch.tensor(labels + [IGNORE_INDEX] * padding)}
            if not self.repeat or produced == 0:
                return


def streaming_files(spec: str) -> list[str]:
    """--streaming's --dataset: one .jsonl/.txt file, or a directory whose .jsonl/.txt files are read in name order."""
    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, name) for name in os.listdir(spec) if name.endswith((".jsonl", ".txt")))
        if not files:
            raise DataError(f"--streaming: directory {spec!r} holds no .jsonl or .txt file")
        return files
    if not os.path.isfile(spec) or not spec.endswith((".jsonl", ".txt")):
        raise DataError(f"--streaming reads a local .jsonl or .txt file or a directory of them; --dataset {spec!r} "
                        f"is not one (built-in, hub, .json and .parquet data sets load into memory: drop --streaming)")
    return [spec]
