"""OpenMoE's UL2-style objective for a decoder-only model (docs/model.md, Pretraining recipe): a weighted mix of
prefix-LM and T5 span-corruption examples, optionally with plain next-token prediction, all under the ordinary
causal mask.

Every example is one token sequence with loss only on its target part (labels are not shifted; the model does):

    lm:       [bos] + tokens + [eos]                          loss on tokens + eos
    prefix:   [bos] + prefix + suffix + [eos]                 loss on suffix + eos (split point uniform at random)
    span:     [bos] + corrupted + s0 span0 s1 span1 ... + [eos]   loss on the sentinel/span targets + eos

where `corrupted` is the text with noise span i replaced by sentinel s_i = <extra_id_i>. Noise masks follow T5's
`random_spans_noise_mask`: round(length * rate) noise tokens in round(noise / mean_span) spans, span lengths from
a uniformly random segmentation, noise and non-noise spans interleaved starting with non-noise.

Weights (`--ul2_weights`) are "name=weight" pairs separated by commas; names are `lm`, `prefix` and
`span_<mean span length>_<corruption rate>`. The default is OpenMoE's mix:

    prefix=0.5,span_3_0.15=0.1,span_8_0.15=0.1,span_3_0.5=0.1,span_8_0.5=0.1,span_64_0.5=0.1

Two limits shape long documents: a row holds max_length tokens, and the tokenizer has only 32 sentinels. A span
example therefore corrupts the longest prefix of its piece for which both fit (a corrupted text of n tokens
grows by two tokens per span); the rest of that piece is not used by that example.

Example i is a pure function of (seed, i): its objective, split point and mask come from a numpy Generator seeded
with [seed, i], so runs are reproducible and a resumed run rebuilds exactly the examples it skipped. Prompt/
completion records are used as one text, prompt + completion.
"""

import re

import numpy as np
import torch

from .errors import DataError
from .examples import IGNORE_INDEX, special_ids, tokenize
from .tokenizer import NUM_SENTINELS

OPENMOE_UL2_WEIGHTS = "prefix=0.5,span_3_0.15=0.1,span_8_0.15=0.1,span_3_0.5=0.1,span_8_0.5=0.1,span_64_0.5=0.1"
SPAN_NAME = re.compile(r"span_(\d+(?:\.\d+)?)_(0?\.\d+|1(?:\.0*)?|0)$")


def parse_span_name(name: str) -> tuple[float, float] | None:
    """(mean span length, corruption rate) of a "span_<mean>_<rate>" objective, None for other names."""
    match = SPAN_NAME.match(name)
    if not match:
        return None
    mean_span, rate = float(match.group(1)), float(match.group(2))
    if mean_span < 1 or not 0 < rate < 1:
        raise DataError(f"{name}: need a mean span length >= 1 and a corruption rate strictly between 0 and 1")
    return mean_span, rate


def parse_ul2_weights(text: str) -> dict[str, float]:
    """"prefix=0.5,span_3_0.15=0.1,..." -> {"prefix": 0.5, ...}, normalised to sum to 1."""
    weights = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or weight < 0 or not (name in ("lm", "prefix") or parse_span_name(name)):
            raise DataError(f"--ul2_weights: bad entry {item!r}; expected name=weight with name 'lm', 'prefix' "
                            f"or 'span_<mean>_<rate>' (e.g. {OPENMOE_UL2_WEIGHTS})")
        weights[name] = weights.get(name, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise DataError("--ul2_weights: the weights sum to zero")
    return {name: weight / total for name, weight in weights.items() if weight > 0}


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split num_items into num_segments positive lengths, each segmentation equally likely (as T5)."""
    # Choosing num_segments - 1 distinct cut points among the num_items - 1 gaps is exactly that.
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [num_items])))


def span_lengths(length: int, rate: float, mean_span: float, rng: np.random.Generator):
    """(non-noise lengths, noise lengths): equally many spans, to interleave non-noise first (T5 semantics)."""
    num_noise = min(max(int(round(length * rate)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)  # every span needs at least one token
    return random_segmentation(length - num_noise, num_spans, rng), random_segmentation(num_noise, num_spans, rng)


def noise_mask(length: int, rate: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of `length` tokens, True on noise: T5's random_spans_noise_mask."""
    keep, noise = span_lengths(length, rate, mean_span, rng)
    return np.concatenate([np.repeat([False, True], [k, n]) for k, n in zip(keep, noise)])


def corrupted_length(n: int, rate: float, mean_span: float) -> tuple[int, int]:
    """(sequence length with bos and eos, number of spans) of span-corrupting n tokens: each span adds a sentinel
    to the input and one to the target."""
    num_noise = min(max(int(round(n * rate)), 1), n - 1)
    num_spans = min(max(int(round(num_noise / mean_span)), 1), num_noise, n - num_noise)
    return n + 2 * num_spans + 2, num_spans


def span_budget(max_tokens: int, max_length: int, rate: float, mean_span: float) -> int:
    """The most tokens (<= max_tokens) whose span corruption fits in max_length with at most NUM_SENTINELS spans."""
    # Start near the analytic bound (length grows by 2 * rate / mean_span per token) and step down past rounding.
    n = min(max_tokens, int((max_length - 2) / (1 + 2 * rate / mean_span)) + 2,
            int((NUM_SENTINELS + 0.5) * mean_span / rate) + 2)
    while n > 2:
        total, spans = corrupted_length(n, rate, mean_span)
        if total <= max_length and spans <= NUM_SENTINELS:
            return n
        n -= 1
    return n


def span_corruption(tokens: list[int], rate: float, mean_span: float, rng, bos: int, eos: int,
                    sentinels: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one span-corruption example of tokens (at least 2 of them)."""
    keep, noise = span_lengths(len(tokens), rate, mean_span, rng)
    corrupted, targets, position = [], [], 0
    for i, (k, n) in enumerate(zip(keep, noise)):
        corrupted += tokens[position:position + k] + [sentinels[i]]
        targets += [sentinels[i]] + tokens[position + k:position + k + n]
        position += k + n
    ids = [bos] + corrupted + targets + [eos]
    return ids, [IGNORE_INDEX] * (1 + len(corrupted)) + targets + [eos]


def prefix_lm(tokens: list[int], rng, bos: int, eos: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): loss on a suffix of at least one token; the split point is uniform over the gaps."""
    split = int(rng.integers(1, len(tokens))) if len(tokens) > 1 else 0
    return [bos] + tokens + [eos], [IGNORE_INDEX] * (1 + split) + tokens[split:] + [eos]


def text_of(record: dict) -> str:
    if "text" in record:
        return record["text"]
    if "prompt" in record and "completion" in record:
        return record["prompt"] + record["completion"]
    raise DataError(f"record has neither 'text' nor 'prompt'+'completion' (keys: {sorted(record)})")


def sentinel_ids(tokenizer) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(NUM_SENTINELS)])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise DataError(f"the UL2 objective needs the sentinel tokens <extra_id_0>..<extra_id_{NUM_SENTINELS - 1}> "
                        "in the tokenizer; use the bundled tokenizer or a T5/umT5 one")
    return ids


class UL2Rows(torch.utils.data.Dataset):
    """UL2 examples built on the fly from tokenised text pieces, as fixed-length rows (input_ids/attention_mask/
    labels), like TokenRows. Documents longer than a row are cut into pieces of max_length - 2 tokens first."""

    def __init__(self, records: list[dict], tokenizer, max_length: int, weights: str | dict = OPENMOE_UL2_WEIGHTS,
                 seed: int = 0):
        if max_length < 8:
            raise DataError(f"the UL2 objective needs max_length >= 8, not {max_length}")
        self.weights = parse_ul2_weights(weights) if isinstance(weights, str) else dict(weights)
        self.names = list(self.weights)
        self.probabilities = np.array([self.weights[n] for n in self.names])
        self.spans = {name: parse_span_name(name) for name in self.names}
        self.bos, self.eos = special_ids(tokenizer)
        self.sentinels = sentinel_ids(tokenizer)
        self.max_length, self.seed = max_length, seed
        piece = max_length - 2
        self.pieces = [doc[start:start + piece] for doc in tokenize(tokenizer, [text_of(r) for r in records])
                       for start in range(0, len(doc), piece)]
        self.pieces = [p for p in self.pieces if len(p) >= 2]  # nothing to split or corrupt in fewer
        if not self.pieces:
            raise DataError("no text of at least 2 tokens to build UL2 examples from")

    def __len__(self) -> int:
        return len(self.pieces)

    def example(self, index: int) -> tuple[list[int], list[int], str]:
        """(input_ids, labels, objective name) of example index, unpadded."""
        rng = np.random.default_rng([self.seed, index])
        name = self.names[rng.choice(len(self.names), p=self.probabilities)]
        tokens = self.pieces[index]
        if name == "lm":
            return [self.bos] + tokens + [self.eos], [IGNORE_INDEX] + tokens + [self.eos], name
        if name == "prefix":
            return *prefix_lm(tokens, rng, self.bos, self.eos), name
        mean_span, rate = self.spans[name]
        tokens = tokens[:span_budget(len(tokens), self.max_length, rate, mean_span)]
        return *span_corruption(tokens, rate, mean_span, rng, self.bos, self.eos, self.sentinels), name

    def __getitem__(self, index: int) -> dict:
        ids, labels, _ = self.example(index)
        padding = self.max_length - len(ids)
        return {"input_ids": torch.tensor(ids + [self.bos] * padding),
                "attention_mask": torch.tensor([1] * len(ids) + [0] * padding),
                "labels": torch.tensor(labels + [IGNORE_INDEX] * padding)}
