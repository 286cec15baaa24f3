"""Load raw records: {"prompt", "completion"} instruction pairs or {"text"} documents.

Sources: the bundled data ("bundled", "bundled-text"), local .jsonl/.json/.parquet/.txt files or a directory of
them, and anything else as a Hugging Face hub data set (load_dataset(name, task_name, split=split)).
"""

import json
import logging
import os

from .errors import DataError
from .paths import BUNDLED_DIR
from .tokenizer import env_flag

logger = logging.getLogger(__name__)

EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")
HELDOUT_SPLITS = ("heldout", "validation", "test")
BUNDLED_TEXT_HELDOUT_LINES = 200  # the last lines of text.txt form the bundled-text held-out split


class Records(list):
    """A list of record dicts that also remembers how many malformed ones were skipped."""

    def __init__(self, records=(), skipped: int = 0):
        super().__init__(records)
        self.skipped = skipped


def clean_record(record) -> dict | None:
    """The record reduced to the fields we use, or None if it is malformed."""
    if not isinstance(record, dict):
        return None
    prompt, completion, text = record.get("prompt"), record.get("completion"), record.get("text")
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion}
    if isinstance(text, str):
        return {"text": text}
    return None


class Collector:
    """Validates records one by one: a malformed one raises, or with skip_malformed is counted and dropped."""

    def __init__(self, skip_malformed: bool):
        self.skip_malformed = skip_malformed
        self.records = Records()

    def add(self, record, where: str, problem: str | None = None) -> None:
        cleaned = None if problem else clean_record(record)
        if cleaned is not None:
            self.records.append(cleaned)
            return
        problem = problem or ("need string fields 'prompt' and 'completion', or 'text'; got "
                              + (f"keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__))
        if not self.skip_malformed:
            raise DataError(f"{where}: malformed record ({problem}); fix it or pass --skip_malformed to skip it")
        self.records.skipped += 1

    def finish(self, source: str) -> Records:
        if self.records.skipped:
            logger.warning("skipped %d malformed record(s) in %s", self.records.skipped, source)
        if not self.records:
            raise DataError(f"{source} holds no usable records"
                            + (f" ({self.records.skipped} malformed ones skipped)" if self.records.skipped else ""))
        return self.records


def read_jsonl(path: str, collector: Collector) -> None:
    # Parsed line by line (not through load_dataset) so an error can name the exact line.
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                collector.add(None, f"{path}:{number}", f"invalid JSON: {e.msg}")
                continue
            collector.add(record, f"{path}:{number}")


def read_json(path: str, collector: Collector) -> None:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}); a .json file must hold one list "
                            "of records (use .jsonl for one record per line)") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold a list of records, not a {type(data).__name__}")
    for index, record in enumerate(data, start=1):
        collector.add(record, f"{path}: record {index}")


def read_parquet(path: str, collector: Collector) -> None:
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    for index, row in enumerate(rows, start=1):
        collector.add(row, f"{path}: row {index}")


def read_text(path: str, collector: Collector) -> None:
    """One document per non-empty line, like load_dataset("text")."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                collector.add({"text": line.rstrip("\n")}, path)


READERS = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet, ".txt": read_text}


def named_for(filename: str, split: str) -> bool:
    """train.jsonl, train-00000-of-00002.parquet, train_part1.json belong to split "train"."""
    return os.path.basename(filename).startswith(tuple(split + separator for separator in ".-_"))


def files_for_split(directory: str, split: str) -> list[str]:
    """The data files of a directory for one split: the files named after it; for "train", when no file is,
    every file not named after a held-out split."""
    files = sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(EXTENSIONS))
    names = HELDOUT_SPLITS if split in HELDOUT_SPLITS else (split,)
    for name in names:
        matching = [f for f in files if named_for(f, name)]
        if matching:
            return matching
    if split == "train":
        files = [f for f in files if not any(named_for(f, name) for name in HELDOUT_SPLITS)]
        if files:
            return files
    raise DataError(f"{directory} has no {'/'.join(names)} data file (*.jsonl, *.json, *.parquet, *.txt)")


def load_local(path: str, split: str, skip_malformed: bool) -> Records:
    paths = files_for_split(path, split) if os.path.isdir(path) else [path]
    collector = Collector(skip_malformed)
    for file in paths:
        extension = os.path.splitext(file)[1]
        if extension not in READERS:
            raise DataError(f"{file}: unsupported file type; use one of {', '.join(EXTENSIONS)}")
        if os.path.getsize(file) == 0:
            raise DataError(f"{file} is empty")
        try:
            READERS[extension](file, collector)
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text ({e}); re-encode it as UTF-8") from e
    return collector.finish(path)


def load_bundled_text(split: str) -> Records:
    with open(os.path.join(BUNDLED_DIR, "text.txt"), encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    lines = lines[-BUNDLED_TEXT_HELDOUT_LINES:] if split in HELDOUT_SPLITS else lines[:-BUNDLED_TEXT_HELDOUT_LINES]
    return Records({"text": line} for line in lines)


def load_hub(name: str, task_name: str | None, split: str, skip_malformed: bool) -> Records:
    import datasets

    # Hub data sets call their held-out split "validation" or "test"; try both.
    candidates = ["validation", "test"] if split in HELDOUT_SPLITS else [split]
    rows, error = None, None
    for candidate in candidates:
        try:
            rows = datasets.load_dataset(name, task_name, split=candidate)
            break
        except Exception as e:
            error = e
            if "split" not in str(e).lower():  # only an unknown split is worth trying the next name for
                break
    if rows is None:
        where = f"{name!r}" + (f" (config {task_name!r})" if task_name else "")
        if env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE"):
            raise DataError(f"data set {where} is not a local file and not in the local Hugging Face cache, and we "
                            "are offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set): pass a local .jsonl/.json/"
                            f".parquet/.txt file or 'bundled' ({type(error).__name__}: {error})") from error
        raise DataError(f"could not load data set {where}, split {split!r}, from the Hugging Face hub "
                        f"({type(error).__name__}: {error}); check the name, --task_name and the network, "
                        "or pass a local file") from error
    collector = Collector(skip_malformed)
    for index, row in enumerate(rows, start=1):
        collector.add(row, f"{name} {split}: row {index}")
    return collector.finish(name)


def is_hub_dataset(dataset: str) -> bool:
    """Whether load_records reads this name from the Hugging Face hub: not built in, and not a local path."""
    if dataset in ("bundled", "bundled-text"):
        return False
    path = os.path.expanduser(dataset)
    return not os.path.exists(path) and not path.endswith(EXTENSIONS) and not path.startswith((".", "/", "~"))


def load_records(dataset: str, task_name: str | None = None, split: str = "train", *,
                 skip_malformed: bool = False) -> Records:
    """Records of one split of a data set: dicts with "prompt" and "completion", or with "text".

    "bundled" is the bundled instruction set ("train", or "heldout" alias "validation"/"test"), "bundled-text" the
    bundled plain text. A local file or directory is read directly (its own name picks the split in a directory),
    anything else is a hub data set, task_name its configuration (local and bundled data have none: an error).
    With skip_malformed, malformed records are dropped and counted in `.skipped` of the returned list instead of
    raising.
    """
    if task_name and not is_hub_dataset(dataset):
        raise DataError(f"{dataset!r} is not a hub data set, so it has no configuration to pick with task_name "
                        f"{task_name!r} (--task_name); drop it")
    if split not in ("train",) + HELDOUT_SPLITS and dataset in ("bundled", "bundled-text"):
        raise DataError(f"the bundled data has splits 'train' and 'heldout' (alias 'validation', 'test'), "
                        f"not {split!r}")
    if dataset == "bundled":
        name = "heldout.jsonl" if split in HELDOUT_SPLITS else "train.jsonl"
        return load_local(os.path.join(BUNDLED_DIR, name), split, skip_malformed)
    if dataset == "bundled-text":
        return load_bundled_text(split)
    if is_hub_dataset(dataset):
        return load_hub(dataset, task_name, split, skip_malformed)
    path = os.path.expanduser(dataset)
    if not os.path.exists(path):
        raise DataError(f"data file {dataset!r} does not exist")
    return load_local(path, split, skip_malformed)
