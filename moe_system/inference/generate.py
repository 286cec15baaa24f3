"""Batched generation for OpenMoE: prompt encoding, left padding, sampling settings, stop strings, timing.

A prompt is "<pad>" + text: ids [0] + tokenizer(text, add_special_tokens=False) (moe_system.data.prompt_ids),
the format the models were trained on. Rows are left-padded with an attention mask, which generate() must
always receive here: the BOS and the pad are the same id, and without a mask transformers would take the BOS
for padding.
"""

import math
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteriaList

from ..data import prompt_ids
from ..model.modeling import CACHE_FIELD
from .kv_cache import PreallocatedCache
from .loading import InferenceError
from .stopping import CONTEXT_TOKENS, StopStrings, continuation_text, find_stop


@dataclass
class SamplingSettings:
    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        # Written so that nan fails each test: every comparison with nan is False.
        if not self.max_new_tokens >= 1:
            raise InferenceError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise InferenceError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"--top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not self.top_k >= 0:
            raise InferenceError(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.repetition_penalty < math.inf:
            raise InferenceError(f"--repetition_penalty must be a finite number > 0 (1 = off), "
                                 f"got {self.repetition_penalty}")
        if "" in self.stop:
            raise InferenceError("--stop needs a non-empty text (an empty one would cut every completion)")

    def generation_config(self, config, max_new_tokens: int) -> GenerationConfig:
        sample = not self.greedy and self.temperature > 0
        knobs = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) if sample else {}
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                                repetition_penalty=self.repetition_penalty, bos_token_id=config.bos_token_id,
                                pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
                                use_cache=True, **knobs)


def check_text(text: str, where: str = "a prompt") -> None:
    """Bytes that are not UTF-8 reach us from argv or a terminal as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InferenceError(f"{where} is not UTF-8 text: {text[:40]!r}; send UTF-8") from None


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]  # the new tokens, through the EOS or the token that completed a stop string
    finish: str  # "eos", "stop" or "length"


@dataclass
class GenerationStats:
    sequences: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, sequences: int, new_tokens: int, seconds: float) -> None:
        self.sequences += sequences
        self.new_tokens += new_tokens
        self.seconds += seconds

    def summary(self) -> str:
        return (f"{self.sequences} sequence(s), {self.new_tokens} new tokens in {self.seconds:.2f} s: "
                f"{self.tokens_per_s:.1f} tokens/s")


def input_device(model) -> torch.device:
    """Where prompts go: the embedding's device (for a dispatched model, the first GPU it uses, else the CPU)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        target = device_map.get("model.embed_tokens", next(iter(device_map.values())))
        return torch.device("cpu") if target in ("cpu", "disk") else torch.device(
            f"cuda:{target}" if isinstance(target, int) else target)
    return model.get_input_embeddings().weight.device


class Generator:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.context = model.config.max_position_embeddings
        self.device = input_device(model)
        self.stats = GenerationStats()

    def encode(self, text: str) -> list[int]:
        check_text(text)
        return prompt_ids(self.tokenizer, text)

    def room(self, prompt_ids: list[list[int]], max_new_tokens: int) -> int:
        """New tokens that fit in the context after the longest prompt; a prompt that does not fit is an error."""
        longest = max(len(ids) for ids in prompt_ids)
        if longest >= self.context:
            raise InferenceError(f"the prompt is {longest} tokens long but the model's context is {self.context} "
                                 "tokens: shorten it (one token must be left to generate)")
        return min(max_new_tokens, self.context - longest)

    def left_pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def generate(self, prompts: list[str], settings: SamplingSettings, streamer=None) -> list[Completion]:
        """One batch: every prompt is encoded, left-padded and continued; returns the completions in order."""
        prompt_ids = [self.encode(p) for p in prompts]
        max_new = self.room(prompt_ids, settings.max_new_tokens)
        input_ids, mask = self.left_pad(prompt_ids)
        contexts = [ids[-CONTEXT_TOKENS:] for ids in prompt_ids]
        stops = StopStrings(self.tokenizer, settings.stop, input_ids.shape[1], contexts)
        start = time.perf_counter()
        # Prompts of one length: no padding, so the model attends causally without a mask (flash attention).
        no_padding = len({len(ids) for ids in prompt_ids}) == 1
        # Sized for the whole generation up front, so decoding writes each token's keys and values in place.
        cache = PreallocatedCache(self.config.num_hidden_layers, input_ids.shape[1] + max_new)
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, no_padding=no_padding,
                                  **{CACHE_FIELD: cache},
                                  generation_config=settings.generation_config(self.config, max_new),
                                  stopping_criteria=StoppingCriteriaList([stops]), streamer=streamer)
        seconds = time.perf_counter() - start
        completions = [self._completion(prompt, row[input_ids.shape[1]:].tolist(), context, stops.stopped_at.get(i),
                                        settings.stop)
                       for i, (prompt, row, context) in enumerate(zip(prompts, out.cpu(), contexts))]
        self.stats.add(len(prompts), sum(len(c.token_ids) for c in completions), seconds)
        return completions

    def _completion(self, prompt: str, new_ids: list[int], context: list[int], stopped_at, stops) -> Completion:
        eos = self.config.eos_token_id
        finish = "length"
        if eos in new_ids:
            new_ids, finish = new_ids[:new_ids.index(eos) + 1], "eos"
        if stopped_at is not None and stopped_at <= len(new_ids):
            new_ids, finish = new_ids[:stopped_at], "stop"
        text = continuation_text(self.tokenizer, context, [t for t in new_ids if t != eos])
        cut = find_stop(text, stops)
        if cut >= 0:
            text = text[:cut]
        return Completion(prompt, text, new_ids, finish)
