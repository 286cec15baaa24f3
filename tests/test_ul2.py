"""The UL2 objective: corruption statistics over many samples, mixture frequencies, no target leaking into inputs."""

import collections

import numpy as np
import pytest

from moe_system.data import DataError, IGNORE_INDEX, load_records, load_tokenizer
from moe_system.data.ul2 import (OPENMOE_UL2_WEIGHTS, UL2Rows, noise_mask, parse_ul2_weights, random_segmentation)

SPAN_CONFIGS = [(3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.5)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def long_records():
    # Documents of ~1000+ tokens (bundled text lines joined), so that even a 64-token mean span has room.
    lines = [r["text"] for r in load_records("bundled-text")]
    return [{"text": " ".join(lines[i:i + 60])} for i in range(0, 1800, 60)]


def split_span_example(ids, labels, sentinels):
    """(kept input tokens with sentinels, target part) of a span-corruption example, checking the label layout."""
    first_target = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:first_target])  # no loss on the corrupted input
    assert labels[first_target:] == ids[first_target:]  # loss on every target token, eos included
    return ids[1:first_target], ids[first_target:-1]


def spans_of(part, sentinels):
    """[(sentinel, tokens after it up to the next sentinel)] and the tokens before the first sentinel."""
    lead, spans = [], []
    for token in part:
        if token in sentinels:
            spans.append((token, []))
        elif spans:
            spans[-1][1].append(token)
        else:
            lead.append(token)
    return lead, spans


def test_noise_mask_matches_the_configured_rate_and_span_length():
    rng = np.random.default_rng(0)
    for mean_span, rate in SPAN_CONFIGS:
        lengths, noise = [], 0
        for _ in range(300):
            mask = noise_mask(512, rate, mean_span, rng)
            assert not mask[0] and mask[-1]  # T5: starts with kept tokens, ends with noise
            edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(int), [0]))))
            lengths += list(edges[1::2] - edges[::2])
            noise += int(mask.sum())
        assert abs(noise / (300 * 512) - rate) < 0.01
        assert abs(np.mean(lengths) - mean_span) / mean_span < 0.05
        assert np.std(lengths) > 0  # random segmentation, not equal spans


def test_random_segmentation_is_positive_and_complete():
    rng = np.random.default_rng(1)
    for items, segments in [(10, 1), (10, 10), (100, 7)]:
        parts = random_segmentation(items, segments, rng)
        assert len(parts) == segments and parts.sum() == items and parts.min() >= 1


def test_span_examples_measure_the_configured_statistics_and_never_leak(tokenizer, long_records):
    sentinels = set(range(3, 35))
    for mean_span, rate in SPAN_CONFIGS:
        name = f"span_{mean_span}_{rate}"
        rows = UL2Rows(long_records, tokenizer, max_length=512, weights={name: 1.0}, seed=3)
        noise = kept = spans = 0
        for index in range(len(rows)):
            ids, labels, objective = rows.example(index)
            assert objective == name and len(ids) <= 512 and ids[0] == 0 and ids[-1] == 1
            corrupted, target = split_span_example(ids, labels, sentinels)
            lead, input_spans = spans_of(corrupted, sentinels)
            none, target_spans = spans_of(target, sentinels)
            assert not none and target[0] == 3
            # Each sentinel pairs one input gap with one target span, in order, and all are distinct.
            assert [s for s, _ in input_spans] == [s for s, _ in target_spans] == list(range(3, 3 + len(target_spans)))
            # Filling every gap with its target span gives back the original text exactly: masked tokens appear
            # only in the target, kept tokens only in the input.
            restored = list(lead)
            for (_, after_gap), (_, span) in zip(input_spans, target_spans):
                assert span
                restored += span + after_gap
            original = rows.pieces[index]
            assert restored == original[:len(restored)]
            noise += sum(len(s) for _, s in target_spans)
            kept += len(corrupted) - len(input_spans)
            spans += len(target_spans)
        assert abs(noise / (noise + kept) - rate) < 0.02, (name, noise / (noise + kept))
        assert abs(noise / spans - mean_span) / mean_span < 0.1, (name, noise / spans)


def test_prefix_lm_labels_only_the_suffix(tokenizer, long_records):
    rows = UL2Rows(long_records, tokenizer, max_length=64, weights="prefix=1", seed=0)
    splits = []
    for index in range(200):
        ids, labels, _ = rows.example(index)
        assert ids == [0] + rows.pieces[index] + [1]  # the text itself, uncorrupted
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert first >= 2 and labels[first:] == ids[first:] and set(labels[:first]) == {IGNORE_INDEX}
        splits.append((first - 1) / len(rows.pieces[index]))
    assert 0.4 < np.mean(splits) < 0.6  # split point uniform over the text


def test_mixture_frequencies_follow_the_weights(tokenizer):
    records = load_records("bundled-text")
    rows = UL2Rows(records, tokenizer, max_length=32, seed=7)
    counts = collections.Counter(rows.example(i)[2] for i in range(len(rows)))
    weights = parse_ul2_weights(OPENMOE_UL2_WEIGHTS)
    for name, weight in weights.items():
        sigma = (weight * (1 - weight) / len(rows)) ** 0.5
        assert abs(counts[name] / len(rows) - weight) < 4 * sigma, (name, counts[name] / len(rows))
    for index in range(len(rows)):  # every row fits and keeps loss on its targets only
        row = rows[index]
        assert row["input_ids"].shape == (32,) and (row["labels"] != IGNORE_INDEX).sum() >= 2


def test_examples_are_deterministic_given_seed_and_index(tokenizer):
    records = load_records("bundled-text")[:50]
    a, b = UL2Rows(records, tokenizer, 32, seed=5), UL2Rows(records, tokenizer, 32, seed=5)
    assert [a.example(i) for i in range(len(a))] == [b.example(i) for i in reversed(range(len(b)))][::-1]
    c = UL2Rows(records, tokenizer, 32, seed=6)
    assert [a.example(i) for i in range(len(a))] != [c.example(i) for i in range(len(c))]


def test_prompt_completion_records_become_one_text_and_plain_lm_labels_everything(tokenizer):
    rows = UL2Rows([{"prompt": "copy: a b ->", "completion": " a b"}], tokenizer, 32, weights="lm=1")
    ids, labels, name = rows.example(0)
    assert name == "lm" and labels == [IGNORE_INDEX] + ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "copy: a b -> a b"


@pytest.mark.parametrize("bad", ["prefix", "prefix=x", "span_3=0.1", "span_3_1.5=0.1", "foo=1", "prefix=0"])
def test_bad_weights_are_refused(bad):
    with pytest.raises(DataError):
        parse_ul2_weights(bad)
