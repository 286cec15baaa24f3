"""Held-out evaluation: token-level loss / perplexity, and exact match of greedy completions.

Every data-parallel rank evaluates its share of the batches and the sums are added over the ranks. With expert
parallelism every forward is a collective (an all-to-all over the EP group), so every rank runs the same number
of forwards with the same number of decode steps (no early exit): a rank whose share is shorter runs padding
forwards, never mixed into a real batch, whose outputs are dropped (`shared_rounds`).

Memory: the loss never materialises full-vocabulary logits (chunked over tokens), prompts are prefilled keeping
only the last position's logits, and batches hold --eval_batch_size rows. With a pipeline every stage evaluates
its own layers through the schedule (forward only), each data-parallel replica its share of the batches; greedy
decoding is not run there.
"""

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..data import build_dataset, load_records, prompt_ids
from ..data.mixture import source_label
from ..model.loss import chunked_lm_loss
from ..parallel.comm import all_reduce_values, group_size


def shared_rounds(keys: list, ranks: int) -> list[tuple]:
    """Batches (keys[i]: batch i's key) dealt out over `ranks` processes that run every forward together, as
    rounds (key, [batch index of rank 0, rank 1, ...]), None where that rank runs a padding forward of the
    round's key. Batches of one key share rounds, in order: with all keys equal, batch i goes to rank i mod
    ranks. Under capacity dispatch the key is the batch's shape: each rank sizes the expert slots from its own
    token count, and the equal-split exchange needs the same size on every rank of the EP group."""
    by_key = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    rounds = []
    for key, members in by_key.items():
        for start in range(0, len(members), ranks):
            share = members[start:start + ranks]
            rounds.append((key, share + [None] * (ranks - len(share))))
    return rounds


def _rank_of(group) -> tuple[int, int]:
    """(processes, this one's index) of group; None: a single process."""
    return group_size(group), dist.get_rank(group) if group is not None else 0


def _loss_metrics(sums: torch.Tensor, groups) -> dict:
    """[summed token losses, target tokens], added over each group in turn -> eval/loss and eval/perplexity."""
    for group in groups:
        sums = all_reduce_values(sums, group)
    total, count = sums.tolist()
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def greedy_tokens(model, rows: list[list[int]], steps: int, device) -> list[list[int]]:
    """`steps` greedy tokens after each row of prompt ids, left-padded, with the KV cache: one prefill forward
    (keeping only the last position's logits, not [B, T, vocab]) and `steps` decode forwards."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    generated = []
    for _ in range(steps):
        next_ids = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(next_ids)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        out = model(input_ids=next_ids, attention_mask=mask, past_key_values=out.kv_cache, use_cache=True)
    return torch.cat(generated, dim=1).tolist()


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int, device,
                    decode_steps: int | None = None) -> list[str]:
    """Greedy completions of at most max_new_tokens tokens for a batch of prompts. decode_steps (at least
    max_new_tokens): the forwards to run, when ranks that decode together need a common count; the tokens past
    max_new_tokens are dropped (a causal model's first tokens do not depend on them)."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    tokens = greedy_tokens(model, rows, max(decode_steps or 0, max_new_tokens), device)
    eos = tokenizer.eos_token_id
    texts = []
    for row in tokens:
        row = row[:max_new_tokens]
        row = row[:row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], device, batch_size: int = 8, group=None,
                equal_shapes: bool = False) -> float:
    """Fraction of prompt/completion records whose greedy completion equals the reference (whitespace-trimmed).
    Each batch of batch_size records is completed with as many new tokens as its longest reference plus one.
    group: the ranks that share the batches out (shared_rounds; equal_shapes: by the shape of their prefill);
    all ranks of a round decode as many steps as its longest batch needs, and the hits are added over them."""
    ranks, rank = _rank_of(group)
    was_training = model.training
    model.eval()
    batches = [records[start:start + batch_size] for start in range(0, len(records), batch_size)]
    prompts = [[prompt_ids(tokenizer, r["prompt"]) for r in batch] for batch in batches]
    new_tokens = [max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in batch) + 1
                  for batch in batches]
    keys = [(len(rows), max(map(len, rows))) if equal_shapes else None for rows in prompts]
    hits = 0
    for key, members in shared_rounds(keys, ranks):
        steps = max(new_tokens[i] for i in members if i is not None)
        i = members[rank]
        if i is None:  # a prompt of the round's shape (one token where any will do); its tokens are dropped
            rows, width = key or (1, 1)
            greedy_tokens(model, [[0] * width] * rows, steps, device)
            continue
        batch = batches[i]
        outputs = greedy_complete(model, tokenizer, [r["prompt"] for r in batch], new_tokens[i], device, steps)
        hits += sum(o.strip() == r["completion"].strip() for o, r in zip(outputs, batch))
    model.train(was_training)
    return all_reduce_values(hits, group).item() / max(len(records), 1)


@torch.no_grad()
def evaluate_loss(model, batches, device, group=None, equal_shapes: bool = False) -> dict:
    """Mean per-target-token cross-entropy (no smoothing, no z-loss) and perplexity over batches. group: the ranks
    that share the batches out (shared_rounds; equal_shapes: by shape), the sums added over them."""
    ranks, rank = _rank_of(group)
    lm = model.unwrap() if hasattr(model, "unwrap") else model
    was_training = lm.training
    lm.eval()
    batches = list(batches)
    keys = [tuple(b["input_ids"].shape) if equal_shapes else None for b in batches]
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [summed token losses, target tokens]
    for key, members in shared_rounds(keys, ranks):
        i = members[rank]
        if i is None:  # a batch of the round's shape (one token where any will do); its output is dropped
            lm.model(torch.zeros(key or (1, 1), dtype=torch.long, device=device))
            continue
        labels = batches[i]["labels"].to(device)
        hidden = lm.model(batches[i]["input_ids"].to(device)).last_hidden_state
        loss = chunked_lm_loss(hidden, lm.lm_head.weight, labels, chunk_tokens=lm.config.loss_chunk_tokens,
                               num_items=1)
        sums += torch.stack([loss.double(), (labels[:, 1:] != -100).sum().double()])
    lm.train(was_training)
    return _loss_metrics(sums, [group])


# The 1F1B schedule's per-batch bookkeeping, which a forward-only pass of another batch size would change.
_SCHEDULE_STATE = ("num_microbatches", "last_batch_size", "enable_metadata_cache", "send_tensor_metadata",
                   "send_grad_metadata", "tensor_metadata_recv", "grad_metadata_recv")


@contextmanager
def plain_lm_loss(config):
    """The model's loss without label smoothing and z-loss while evaluating: the held-out loss is the plain
    cross-entropy on every layout."""
    kept = config.label_smoothing, config.z_loss_factor
    config.label_smoothing, config.z_loss_factor = 0.0, 0.0
    try:
        yield
    finally:
        config.label_smoothing, config.z_loss_factor = kept


@torch.no_grad()
def pipeline_evaluate_loss(booster, model, batches, pp_group, dp_group, device) -> dict:
    """evaluate_loss through the pipeline schedule, forward only: each stage runs its own layers and the last
    one the loss; every rank returns the same numbers. The data-parallel replicas share the batches out in
    rounds of batches with the same number of rows (shared_rounds), and the token-loss sums and target counts are
    added over the replicas' last stages. Collective over the whole world: with expert parallelism a stage's
    all-to-alls span the replicas, so in every round each replica runs the same micro-batches, of the same shapes
    (capacity dispatch sizes its exchange from them), a replica without a batch on rows without targets."""
    lm, schedule = model.unwrap(), booster.plugin.scheduler
    replicas, replica = _rank_of(dp_group)
    was_training = lm.training
    model.eval()
    sums = []  # last stage: [summed token losses, target tokens] of each micro-batch

    def criterion(out, micro_batch):
        targets = (micro_batch["labels"][:, 1:] != -100).sum()
        sums.append(torch.stack([out.lm_loss.detach().double(), targets.double()]))
        return out.lm_loss

    def run(batch):
        batch = {"input_ids": batch["input_ids"].to(device), "labels": batch["labels"].to(device),
                 "num_items_in_batch": 1.0}  # a sum over tokens; not a tensor: given whole to each
        booster.execute_pipeline(iter([batch]), model, criterion, optimizer=None, return_loss=True)

    batches = list(batches)
    kept = {name: getattr(schedule, name) for name in _SCHEDULE_STATE}
    # Eval micro-batches may differ in shape from training's (a shorter last one): send shapes every time.
    schedule.enable_metadata_cache, schedule.tensor_metadata_recv, schedule.grad_metadata_recv = False, None, None
    schedule.send_tensor_metadata = schedule.send_grad_metadata = True
    try:  # no_sync: execute_pipeline would otherwise all-reduce (zero-filled) gradients after the schedule
        with plain_lm_loss(lm.config), model.no_sync():
            for rows, members in shared_rounds([len(b["labels"]) for b in batches], replicas):
                if members[replica] is not None:
                    run(batches[members[replica]])
                else:  # copies of one row, no targets: they add nothing to either sum
                    padding = batches[0]["input_ids"][:1].repeat(rows, 1)
                    run({"input_ids": padding, "labels": torch.full_like(padding, -100)})
    finally:
        for name, value in kept.items():
            setattr(schedule, name, value)
        lm.train(was_training)
    local = torch.stack(sums).sum(dim=0) if sums else torch.zeros(2, dtype=torch.float64)
    return _loss_metrics(local, [pp_group, dp_group])


def load_eval_sets(args) -> dict:
    """{set name: held-out records}: --eval_dataset's sets, or the bundled held-out split with --dataset bundled."""
    names = args.eval_dataset.split(",") if args.eval_dataset else (["bundled"] if args.dataset == "bundled" else [])
    return {name: load_records(name, None, "heldout", skip_malformed=args.skip_malformed) for name in names}


class Evaluator:
    """Held-out loss/perplexity (and exact match for prompt/completion sets) of each set, every --eval_interval
    steps and at the end; one set keeps the plain eval/... names, several are reported as eval/<set>/...
    Every rank takes part, each with its share of the rows: with EP or a pipeline each forward is a collective."""

    def __init__(self, booster, model, tokenizer, eval_sets: dict, args, device, progress):
        self.booster, self.model, self.tokenizer, self.sets = booster, model, tokenizer, eval_sets
        self.args, self.device, self.progress = args, device, progress
        self.pipeline = booster.plugin.pp_size > 1
        # Off the pipeline every rank holds the same dense weights: the data-parallel group is the whole world.
        self.group = booster.plugin.dp_group
        lm = model.unwrap() if hasattr(model, "unwrap") else model
        self.equal_shapes = lm.config.dispatch == "capacity" and booster.plugin.ep_size > 1
        self.noted = False

    def maybe_eval(self, step: int) -> None:
        if self.args.eval_interval and step % self.args.eval_interval == 0 and self.sets:
            self.progress.logger.log(step, self.evaluate())

    def evaluate(self) -> dict:
        if len(self.sets) == 1:
            return self.evaluate_set(next(iter(self.sets.values())))
        results = {}
        for name, records in self.sets.items():
            for key, value in self.evaluate_set(records).items():
                results[key.replace("eval/", f"eval/{source_label(name)}/", 1)] = value
        return results

    def evaluate_set(self, records: list[dict]) -> dict:
        subset = records[:self.args.eval_samples]
        rows = build_dataset(subset, self.tokenizer, self.args.max_length, mode="pad", on_overlong="truncate")
        batches = torch.utils.data.DataLoader(rows, batch_size=self.args.eval_batch_size)
        if self.pipeline:
            plugin = self.booster.plugin
            result = pipeline_evaluate_loss(self.booster, self.model, batches, plugin.pp_group, plugin.dp_group,
                                            self.device)
        else:
            result = evaluate_loss(self.model, batches, self.device, self.group, self.equal_shapes)
        if all("prompt" in r for r in subset):
            if not self.pipeline:
                result["eval/exact_match"] = exact_match(self.model, self.tokenizer, subset, self.device,
                                                         self.args.eval_batch_size, self.group, self.equal_shapes)
            elif not self.noted:  # greedy decoding would need the whole model on one device
                self.progress.write("note: exact match is not evaluated with a pipeline (--plugin hybrid); "
                                    "run infer.py on the saved model for it")
                self.noted = True
        return result
