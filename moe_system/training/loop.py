"""The training run: data, model, booster, the step loop, evaluation and the final Hugging Face checkpoint.

Parallelism enters only through `build_plugin` (moe_system.parallel): the loop is the same for one CPU process
and for expert-parallel runs across nodes.
"""

import json
import os
import time

import torch
import torch.distributed as dist
from colossalai.accelerator import get_accelerator
from colossalai.booster import Booster
from tqdm import tqdm

from ..data import build_dataset, load_records, load_tokenizer
from ..model import OpenMoeConfig, OpenMoeForCausalLM
from ..model.convert import checkpoint_config, load_any_checkpoint
from ..parallel.plugin import build_plugin, init_distributed
from .evaluate import evaluate_loss, exact_match
from .flops import param_counts, train_flops_per_token
from .metrics import ExpertLoadMeter, MetricsLogger, format_load
from .schedule import build_scheduler
from .step import forward_backward

H100_BF16_PEAK_TFLOPS = 989.0


def build_model_config(args) -> OpenMoeConfig:
    overrides = dict(router_aux_loss_factor=args.router_aux_loss_factor, router_z_loss_factor=args.router_z_loss_factor,
                     z_loss_factor=args.z_loss_factor, label_smoothing=args.label_smoothing)
    for name in ("dispatch", "router_topk", "router_noise"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.load_checkpoint:
        config = checkpoint_config(args.load_checkpoint)  # ours, or a released Colossal/remote-code/T5X layout
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    return OpenMoeConfig.from_preset(args.model_name, **overrides)


def build_model(args, config: OpenMoeConfig) -> OpenMoeForCausalLM:
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    if not args.load_checkpoint:
        return OpenMoeForCausalLM(config)
    # Strict: the reference loaded with strict=False and trained uninitialised experts into NaNs.
    return load_any_checkpoint(args.load_checkpoint, config=config)


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, norms and other vectors do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "norm" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args) -> dict:
    init_distributed(args.seed)
    plugin, layout = build_plugin(args)
    booster = Booster(plugin=plugin)
    is_main = dist.get_rank() == 0
    device = get_accelerator().get_current_device()

    config = build_model_config(args)
    tokenizer = load_tokenizer(args.tokenizer, vocab_size=config.vocab_size)
    train_records = load_records(args.dataset, args.task_name, "train", skip_malformed=args.skip_malformed)
    dataset = build_dataset(train_records, tokenizer, args.max_length, mode=args.packing, mask_prompt=args.mask_prompt)
    eval_source = args.eval_dataset or ("bundled" if args.dataset == "bundled" else None)
    eval_records = load_records(eval_source, None, "heldout") if eval_source else []

    model = build_model(args, config)
    if args.gradient_checkpointing:
        model.model.gradient_checkpointing = True
    counts = param_counts(config)
    dataloader = plugin.prepare_dataloader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                           seed=args.seed)
    steps_per_epoch = len(dataloader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} training rows are fewer than one global batch of "
                         f"{args.batch_size} x {layout.dp_size} data-parallel ranks; lower --batch_size")
    total_steps = steps_per_epoch * args.num_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    optimizer = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = build_scheduler(optimizer, args.lr_scheduler, args.warmup_steps, total_steps)
    model, optimizer, _, dataloader, scheduler = booster.boost(model, optimizer, dataloader=dataloader,
                                                               lr_scheduler=scheduler)
    load_meter = ExpertLoadMeter(model.unwrap().moe_layers())

    logger = MetricsLogger(args.output_path, enabled=is_main)
    if is_main:
        os.makedirs(args.output_path, exist_ok=True)
        with open(os.path.join(args.output_path, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        print(f"OpenMoE-{args.model_name}: {counts['total'] / 1e6:.2f}M parameters, "
              f"{counts['active_blocks'] / 1e6:.2f}M active per token in the blocks; {layout.describe()}; "
              f"{len(dataset)} rows x {args.max_length} tokens, {total_steps} steps")
    flops_per_token = train_flops_per_token(config, args.max_length)
    peak = args.peak_tflops or (H100_BF16_PEAK_TFLOPS if torch.cuda.is_available() else None)

    step, history = 0, []
    bar = tqdm(total=total_steps, desc="train", disable=not is_main, dynamic_ncols=True)
    model.train()
    window_tokens, window_start = 0.0, time.perf_counter()
    run_start = time.perf_counter()
    while step < total_steps:
        epoch = step // steps_per_epoch
        dataloader.sampler.set_epoch(epoch)  # the reference never called it: same order every epoch
        for batch in dataloader:
            parts = forward_backward(booster, model, optimizer, batch, plugin.dp_group, device)
            load_meter.update()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            window_tokens += parts["tokens"].item()
            loss = parts["lm_loss"].item()
            history.append(loss)
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", aux=f"{parts['aux_loss'].item():.3f}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            if step % args.log_interval == 0 or step in (1, total_steps):
                record = {"train/lm_loss": loss, "train/aux_loss": parts["aux_loss"], "lr": scheduler.get_last_lr()[0],
                          "train/router_z_loss": parts["router_z_loss"], "perf/target_tokens_per_s": tokens_per_s,
                          **load_meter.stats()}
                if peak:
                    row_tokens = args.batch_size * layout.dp_size * args.max_length * step
                    rate = row_tokens / (time.perf_counter() - run_start)
                    record["perf/mfu"] = rate * flops_per_token / (peak * 1e12 * layout.world)
                logger.log(step, record)
                last_load = load_meter.stats()
                load_meter.reset()
                window_tokens, window_start = 0.0, time.perf_counter()
            if args.eval_interval and step % args.eval_interval == 0 and eval_records:
                logger.log(step, run_eval(model, tokenizer, eval_records, args, device))
            if step >= total_steps:
                break
    bar.close()
    wall = time.perf_counter() - run_start

    summary = {"steps": step, "final_lm_loss": history[-1], "wall_s": wall}
    if eval_records:
        summary.update(run_eval(model, tokenizer, eval_records, args, device))
        logger.log(step, summary)
    if is_main:
        print(f"expert load over the last {args.log_interval} steps:\n" + format_load(last_load))
    final_dir = os.path.join(args.output_path, "final")
    save_model(booster, model, tokenizer, final_dir)
    if is_main:
        with open(os.path.join(args.output_path, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print("done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
              + f"; model saved to {final_dir}")
    logger.close()
    return summary


def run_eval(model, tokenizer, records, args, device) -> dict:
    subset = records[:args.eval_samples]
    rows = build_dataset(subset, tokenizer, args.max_length, mode="pad")
    batches = torch.utils.data.DataLoader(rows, batch_size=64)
    result = evaluate_loss(model, batches, device)
    if all("prompt" in r for r in subset):
        result["eval/exact_match"] = exact_match(model, tokenizer, subset, device)
    return result


def save_model(booster, model, tokenizer, path: str) -> None:
    """A Hugging Face-format checkpoint (safetensors shards + config + tokenizer) that from_pretrained loads."""
    booster.save_model(model, path, shard=True, use_safetensors=True)
    if dist.get_rank() == 0:
        model.unwrap().config.save_pretrained(path)
        tokenizer.save_pretrained(path)
    dist.barrier()
