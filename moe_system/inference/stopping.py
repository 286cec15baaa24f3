"""Stop strings and streamed printing.

A stop string ends a sequence as soon as the decoded continuation contains it, however the model spelled it
in tokens (the reference special-cased "</s>" arriving as the pieces '▁</', 's', '>'). The text of a
completion is cut before the stop string, and the streamer never prints a stop string, not even its first part.
"""

import sys

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

CONTEXT_TOKENS = 8  # prompt tokens decoded together with the continuation, so its first space is not lost


def continuation_text(tokenizer, context_ids: list[int], new_ids: list[int]) -> str:
    """Text that new_ids add after context_ids (decoding new_ids alone would drop a leading space)."""
    head = tokenizer.decode(context_ids, skip_special_tokens=True)
    full = tokenizer.decode(list(context_ids) + list(new_ids), skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new_ids, skip_special_tokens=True)


def find_stop(text: str, stops) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops) -> int:
    """Length of the longest end of text that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class StopStrings(StoppingCriteria):
    """Finishes each row whose continuation contains a stop string; remembers how many tokens it took."""

    def __init__(self, tokenizer, stops, prompt_len: int, contexts: list[list[int]]):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.prompt_len = prompt_len
        self.contexts = contexts
        self.stopped_at: dict[int, int] = {}  # row -> number of new tokens when its stop string appeared

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        for row in range(input_ids.shape[0]):
            if row not in self.stopped_at:
                new = input_ids[row, self.prompt_len:].tolist()
                if find_stop(continuation_text(self.tokenizer, self.contexts[row], new), self.stops) >= 0:
                    self.stopped_at[row] = len(new)
            done[row] = row in self.stopped_at
        return done


class StreamPrinter(BaseStreamer):
    """Prints the continuation of a single sequence as it grows, without any stop string."""

    def __init__(self, tokenizer, stops=(), out=None, prefix: str = "", strip: bool = False):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.out = out or sys.stdout
        self.prefix = prefix
        self.strip = strip  # a chat reply is shown without the space that follows [/INST]
        self.context: list[int] = []
        self.ids: list[int] = []
        self.printed = 0
        self.seen_prompt = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] != 1:
            raise ValueError("StreamPrinter streams one sequence at a time")
        ids = value.reshape(-1).tolist()
        if not self.seen_prompt:  # generate() first hands over the prompt itself
            self.seen_prompt = True
            self.context = ids[-CONTEXT_TOKENS:]
            self.out.write(self.prefix)
            return
        self.ids.extend(ids)
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)
        self.out.write("\n")
        self.out.flush()

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        text = continuation_text(self.tokenizer, self.context, self.ids)
        cut = find_stop(text, self.stops)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        elif not final:
            text = text.rstrip("\ufffd")  # an unfinished multi-byte character
            text = text[:len(text) - held_back(text, self.stops)]
        if self.strip:
            text = text.strip() if final or self.stopped else text.lstrip()
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)
