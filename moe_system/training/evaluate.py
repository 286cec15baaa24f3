"""Held-out evaluation: token-level loss / perplexity, and exact match of greedy completions.

Decoding runs a fixed number of steps on every rank (no early exit), because with expert parallelism every
forward is a collective: ranks that stopped early would leave the others waiting in an all-to-all.
"""

import math

import torch

from ..data import prompt_ids
from ..model.loss import chunked_lm_loss


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> list[str]:
    """Greedy completions for a batch of prompts, left-padded, with the KV cache."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    generated = []
    for _ in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(next_ids)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        out = model(input_ids=next_ids, attention_mask=mask, past_key_values=out.kv_cache, use_cache=True)
    tokens = torch.cat(generated, dim=1).tolist()
    eos = tokenizer.eos_token_id
    texts = []
    for row in tokens:
        row = row[:row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], device, batch_size: int = 64) -> float:
    """Fraction of prompt/completion records whose greedy completion equals the reference (whitespace-trimmed)."""
    was_training = model.training
    model.eval()
    hits = 0
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        longest = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in batch)
        outputs = greedy_complete(model, tokenizer, [r["prompt"] for r in batch], longest + 1, device)
        hits += sum(o.strip() == r["completion"].strip() for o, r in zip(outputs, batch))
    model.train(was_training)
    return hits / max(len(records), 1)


@torch.no_grad()
def evaluate_loss(model, batches, device) -> dict:
    """Mean per-target-token cross-entropy (no smoothing, no z-loss) and perplexity over batches."""
    lm = model.unwrap() if hasattr(model, "unwrap") else model
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"].to(device)
        hidden = lm.model(batch["input_ids"].to(device)).last_hidden_state
        n = int((labels[:, 1:] != -100).sum())
        total += chunked_lm_loss(hidden, lm.lm_head.weight, labels, num_items=1).item()
        count += n
    lm.train(was_training)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
