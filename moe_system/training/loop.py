"""The training run: data, model, booster, the step loop, evaluation, checkpoints and the final model.

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

from ..data import DataError, build_dataset, load_records, load_tokenizer
from ..data.mixture import (MixtureRows, SourceTokenCounter, StreamingRows, parse_sources, source_label,
                            streaming_files)
from ..data.records import is_hub_dataset
from ..data.synthetic import SyntheticTokens
from ..data.ul2 import OPENMOE_UL2_WEIGHTS, UL2Rows
from ..model import OpenMoeConfig, OpenMoeForCausalLM
from ..model.convert import checkpoint_config
from ..moe.balancing import update_expert_bias
from ..moe.load import ExpertLoadMeter
from ..parallel.checkpoint_io import load_pretrained_weights
from ..parallel.config import ParallelConfig
from ..parallel.launch import init_distributed
from ..parallel.plugin import build_plugin
from ..parallel.rank_model import build_for_plugin
from ..parallel.rebalance import ExpertRebalancer, format_rebalance
from . import interrupt
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint, save_final_model
from .evaluate import evaluate_loss, exact_match
from .flops import param_counts, train_flops_per_token
from .metrics import MetricsLogger, format_load
from .output_dir import claim_output_dir
from .sampler import ResumableDistributedSampler
from .schedule import build_scheduler
from .forward_backward import forward_backward, pipeline_forward_backward

H100_BF16_PEAK_TFLOPS = 989.0


class NonFiniteLossError(RuntimeError):
    pass


def build_model_config(args) -> OpenMoeConfig:
    overrides = dict(router_aux_loss_factor=args.router_aux_loss_factor, router_z_loss_factor=args.router_z_loss_factor,
                     z_loss_factor=args.z_loss_factor, label_smoothing=args.label_smoothing)
    for name in ("dispatch", "router_topk", "router_noise", "router_renormalize", "router_fp32",
                 "router_bias_update_rate", "expert_init_scale"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.load_checkpoint:
        config = checkpoint_config(args.load_checkpoint)  # ours, or a released Colossal/remote-code/T5X layout
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    return OpenMoeConfig.from_preset(args.model_name, **overrides)


def build_model(args, config: OpenMoeConfig, plugin) -> OpenMoeForCausalLM:
    torch.manual_seed(args.seed)  # the same random state on every rank afterwards
    # Only this rank's experts and pipeline stage, on its device, initialised as the same seed initialises the
    # whole model (parallel/rank_model.py). --load_checkpoint's weights replace them after boosting; initialising
    # first costs little on the device and leaves nothing undefined.
    return build_for_plugin(config, plugin, args.seed)


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, norms and other vectors do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and "norm" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def micro_batch_groups(dataloader, size: int):
    """Consecutive groups of `size` batches: one group per optimizer step (a trailing partial group is dropped)."""
    group = []
    for batch in dataloader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def train(args) -> dict:
    init_distributed(args.seed)
    # Writable, locked against a second run, and no earlier run replaced unless asked (--overwrite_output_dir).
    with claim_output_dir(args.output_path, args.resume, args.overwrite_output_dir) as earlier_run:
        return run_training(args, earlier_run)


def run_training(args, earlier_run: list[str]) -> dict:
    config = build_model_config(args)
    plugin, layout = build_plugin(ParallelConfig.from_args(args), config)
    booster = Booster(plugin=plugin)
    is_main = dist.get_rank() == 0
    device = get_accelerator().get_current_device()
    resume_from = resolve_resume(args.resume, args.output_path) if args.resume else None

    tokenizer = load_tokenizer(args.tokenizer, vocab_size=config.vocab_size)
    sources = parse_sources(args.dataset)
    if args.streaming:  # read lazily: each data-parallel rank its own records, every stage of a pipeline the same
        datasets = [StreamingRows(streaming_files(args.dataset), tokenizer, args.max_length, repeat=True,
                                  rank=dist.get_group_rank(plugin.dp_group, dist.get_rank()),
                                  world_size=plugin.dp_group.size(), mask_prompt=args.mask_prompt,
                                  skip_malformed=args.skip_malformed)]
        datasets[0].check_every_rank_has_rows(plugin.dp_group)
    else:
        datasets = [build_train_source(args, name, tokenizer, config) for name, _ in sources]
    dataset, token_counter = datasets[0], None
    if len(sources) > 1:  # a weighted mix: rows carry their source, whose token counts are logged
        labels = [source_label(name) for name, _ in sources]
        dataset = MixtureRows(datasets, [weight for _, weight in sources], seed=args.seed, labels=labels)
        token_counter = SourceTokenCounter(labels)
    eval_sources = args.eval_dataset.split(",") if args.eval_dataset else (["bundled"] if args.dataset == "bundled"
                                                                           else [])
    eval_records = {name: load_records(name, None, "heldout", skip_malformed=args.skip_malformed)
                    for name in eval_sources}  # {set name: records}

    model = build_model(args, config, plugin)
    if args.gradient_checkpointing:
        model.model.gradient_checkpointing = True
    counts = param_counts(config)
    if args.streaming:  # sampler-free and endless: no epochs, --max_steps bounds the run (args.py)
        dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, drop_last=True)
        steps_per_epoch, total_steps = None, args.max_steps
    else:
        dataloader = plugin.prepare_dataloader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                               seed=args.seed, distributed_sampler_cls=ResumableDistributedSampler)
        steps_per_epoch = len(dataloader) // args.grad_accum_steps
        if steps_per_epoch == 0:
            raise DataError(f"{len(dataset)} training rows are fewer than one global batch of {args.batch_size} x "
                            f"{args.grad_accum_steps} accumulation x {layout.dp_size} data-parallel ranks; "
                            f"lower --batch_size or --grad_accum_steps")
        total_steps = steps_per_epoch * args.num_epoch
        if args.max_steps:
            total_steps = min(total_steps, args.max_steps)
    optimizer = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = build_scheduler(optimizer, args.lr_scheduler, args.warmup_steps, total_steps)
    model, optimizer, _, dataloader, scheduler = booster.boost(model, optimizer, dataloader=dataloader,
                                                               lr_scheduler=scheduler)
    if args.load_checkpoint and not resume_from:  # strict, each rank its own slices (a resume replaces them)
        load_pretrained_weights(booster, model, args.load_checkpoint)
    load_meter = ExpertLoadMeter(model.unwrap().moe_layers())
    bias_meter = ExpertLoadMeter(model.unwrap().moe_layers()) if config.router_bias_update_rate else None

    rebalancer = (ExpertRebalancer(model.unwrap(), optimizer, plugin.ep_group, plugin.moe_dp_group, plugin.pp_group)
                  if args.load_balance else None)
    # consumed: step-sized groups of batches drawn from the data, skipped steps included (the data position)
    step, skipped, overflows, consumed = 0, 0, 0, 0
    if resume_from:
        state = load_checkpoint(booster, model, optimizer, scheduler, resume_from)
        step, skipped = state["step"], state["skipped_steps"]
        overflows, consumed = state.get("overflow_steps", 0), state.get("consumed_steps", step)
        if token_counter and "source_tokens" in state:
            token_counter.load_state_dict(state["source_tokens"], plugin.dp_group)
    if args.streaming:  # the rows this rank consumed before the checkpoint
        dataset.skip_rows = (state.get("stream_rows_per_rank") if resume_from else None) or \
            consumed * args.grad_accum_steps * args.batch_size

    logger = MetricsLogger(args.output_path, enabled=is_main, wandb_project=args.wandb_project, run_config=vars(args))
    if is_main:
        os.makedirs(args.output_path, exist_ok=True)
        with open(os.path.join(args.output_path, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        print(f"OpenMoE-{args.model_name}: {counts['total'] / 1e6:.2f}M parameters, "
              f"{counts['active_blocks'] / 1e6:.2f}M active per token in the blocks; {layout.describe()}; "
              + (f"streaming {args.dataset}" if args.streaming else f"{len(dataset)} rows")
              + f" x {args.max_length} tokens, {total_steps} steps"
              + (f"; resumed at step {step} from {resume_from}" if resume_from else ""))
    flops_per_token = train_flops_per_token(config, args.max_length)
    peak = args.peak_tflops or (H100_BF16_PEAK_TFLOPS if torch.cuda.is_available() else None)
    tokens_per_step = args.batch_size * args.grad_accum_steps * layout.dp_size * args.max_length

    saved = (None, None)  # (step, path) of the last checkpoint: a stop right after a save does not write it again

    def checkpoint() -> str:
        nonlocal saved
        if saved[0] == step:
            return saved[1]
        state = {"step": step, "skipped_steps": skipped, "overflow_steps": overflows, "consumed_steps": consumed,
                 "epoch": consumed // steps_per_epoch if steps_per_epoch else None,
                 "args": vars(args), "layout": layout.describe()}
        if args.streaming:  # the same on every data-parallel rank: each reads batch_size rows per micro-batch
            state["stream_rows_per_rank"] = consumed * args.grad_accum_steps * args.batch_size
        if token_counter:  # the totals over data-parallel ranks (a collective: every rank saves)
            state["source_tokens"] = token_counter.state_dict(plugin.dp_group)
        saved = step, save_checkpoint(booster, model, optimizer, scheduler, tokenizer, args.output_path, state,
                                      args.save_total_limit or None, replacing=earlier_run)
        return saved[1]

    def skip_update(what: str) -> None:
        """A step with a non-finite loss or gradient: no update, counted, logged; K in a row stop the run."""
        nonlocal skipped, consecutive_bad
        optimizer.zero_grad()
        skipped, consecutive_bad = skipped + 1, consecutive_bad + 1
        logger.log(step, {"train/skipped_nonfinite": skipped})
        if is_main:  # tqdm.write prints even where the bar is disabled
            bar.write(f"step {step + 1}: non-finite {what}, update skipped ({consecutive_bad} in a row)")
        if consecutive_bad >= args.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{consecutive_bad} consecutive steps had a non-finite loss or gradient (last at step {step + 1}: "
                f"{what}); stopping. The last good checkpoint in {args.output_path} is untouched: lower --lr, "
                f"raise --warmup_steps, keep --max_grad_norm on or use --precision bf16/fp32, then --resume latest")

    run_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not is_main, dynamic_ncols=True)
    model.train()
    window_tokens, window_start, window_steps = 0.0, time.perf_counter(), 0
    consecutive_bad, history, last_load = 0, [], {}
    interrupt.stop_at_step_end()
    while step < total_steps:
        if steps_per_epoch:  # map-style data (streaming resumes through dataset.skip_rows)
            epoch, done_in_epoch = divmod(consumed, steps_per_epoch)
            # The reference never called set_epoch (same order every epoch); a resumed run restarts mid-epoch.
            dataloader.sampler.set_epoch(epoch, done_in_epoch * args.grad_accum_steps * args.batch_size)
        for micro_batches in micro_batch_groups(dataloader, args.grad_accum_steps):
            if interrupt.stop_requested():  # every rank, every step: a signal on any of them stops all here
                bar.close()
                logger.close()
                interrupt.exit_saved(step, checkpoint())
            consumed += 1
            if layout.is_pipeline:
                parts = pipeline_forward_backward(booster, model, optimizer, micro_batches, plugin.dp_group,
                                                  plugin.pp_group, device)
            else:
                parts = forward_backward(booster, model, optimizer, micro_batches, plugin.dp_group, device)
            if token_counter:
                for micro_batch in micro_batches:
                    token_counter.update(micro_batch)
            loss = parts["lm_loss"].item()  # identical on every rank, so every rank takes the same branch
            if not torch.isfinite(parts["lm_loss"] + parts["aux_loss"] + parts["router_z_loss"]):
                skip_update("loss")
                continue
            optimizer.step()  # skips the update itself if the global gradient norm (all-reduced) is inf/nan
            if optimizer.skipped_nonfinite:
                skip_update("gradient")
                continue
            if optimizer.skipped_overflow:  # fp16 loss scaler backed off: routine, not counted toward the limit
                optimizer.zero_grad()
                overflows += 1
                logger.log(step, {"train/skipped_overflow": overflows})
                if is_main:
                    bar.write(f"step {step + 1}: fp16 loss-scale overflow, update skipped")
                continue
            consecutive_bad = 0
            optimizer.zero_grad()
            if config.router_bias_update_rate:
                update_expert_bias(bias_meter, config.router_bias_update_rate, plugin.dp_group)
            scheduler.step()
            step += 1
            window_steps += 1
            window_tokens += parts["tokens"].item()
            history.append(loss)
            seconds = max(time.perf_counter() - window_start, 1e-9)
            tokens_per_s = window_tokens / seconds  # target (loss-bearing) tokens only
            # tok_s: every token processed, as perf/tokens_per_s; tgt_tok_s: the target tokens among them.
            bar.set_postfix(loss=f"{loss:.4f}", aux=f"{parts['aux_loss'].item():.3f}",
                            tok_s=f"{tokens_per_step * window_steps / seconds:,.0f}", tgt_tok_s=f"{tokens_per_s:,.0f}")
            bar.update(1)
            if step % args.log_interval == 0 or step in (1, total_steps):
                elapsed = time.perf_counter() - window_start
                record = {"train/lm_loss": loss, "train/aux_loss": parts["aux_loss"],
                          "train/router_z_loss": parts["router_z_loss"], "lr": scheduler.get_last_lr()[0],
                          "perf/target_tokens_per_s": tokens_per_s,
                          "perf/tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                          **load_meter.stats(), **(token_counter.stats(plugin.dp_group) if token_counter else {})}
                if peak:
                    record["perf/mfu"] = record["perf/tokens_per_s"] * flops_per_token / (peak * 1e12 * layout.world)
                if torch.cuda.is_available():
                    record["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                logger.log(step, record)
                last_load = load_meter.stats()
                load_meter.reset()
                window_tokens, window_start, window_steps = 0.0, time.perf_counter(), 0
            if rebalancer and step % args.load_balance_interval == 0 and step < total_steps:
                report = rebalancer.rebalance()
                logger.log(step, report)
                if report and is_main:
                    bar.write(f"step {step}: experts re-placed by load\n" + format_rebalance(report))
            if args.eval_interval and step % args.eval_interval == 0 and eval_records and not layout.is_pipeline:
                logger.log(step, run_eval(model, tokenizer, eval_records, args, device))
            if step % args.save_interval == 0 and step < total_steps:
                checkpoint()
            if step >= total_steps:
                break
        else:
            if args.streaming:  # endless unless a rank's records were all malformed and skipped
                raise DataError(f"--streaming: {args.dataset} gave no usable record to data-parallel rank "
                                f"{dataset.rank}")
    bar.close()

    summary = {"steps": step, "skipped_steps": skipped, **({"overflow_steps": overflows} if overflows else {}),
               "final_lm_loss": history[-1] if history else None,
               "wall_s": time.perf_counter() - run_start}
    checkpoint()
    final_dir = os.path.join(args.output_path, "final")
    save_final_model(booster, model, tokenizer, final_dir)
    if eval_records:
        if not layout.is_pipeline:  # every rank takes part: with EP each forward is a collective
            summary.update(run_eval(model, tokenizer, eval_records, args, device))
        elif is_main:  # pipeline stages cannot run a forward alone: evaluate the saved model in this process
            summary.update(run_eval(OpenMoeForCausalLM.from_pretrained(final_dir).to(device), tokenizer,
                                    eval_records, args, device))
        logger.log(step, summary)
    if is_main:
        if last_load:
            print("expert load over the last logged window:\n" + format_load(last_load))
        with open(os.path.join(args.output_path, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print("done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
              + f"; model saved to {final_dir}")
    logger.close()
    return summary


def build_train_source(args, name: str, tokenizer, config):
    """One training data set: random tokens, UL2 examples (--objective ul2) or next-token rows."""
    if name == "synthetic":
        return SyntheticTokens(config.vocab_size, args.max_length, seed=args.seed)
    task_name = args.task_name if is_hub_dataset(name) else None  # a mix may hold local files beside a hub set
    records = load_records(name, task_name, "train", skip_malformed=args.skip_malformed)
    if args.objective == "ul2":
        return UL2Rows(records, tokenizer, args.max_length, args.ul2_weights or OPENMOE_UL2_WEIGHTS, seed=args.seed)
    return build_dataset(records, tokenizer, args.max_length, mode=args.packing, mask_prompt=args.mask_prompt,
                         on_overlong=args.on_overlong)


def run_eval(model, tokenizer, eval_sets: dict, args, device) -> dict:
    """Held-out loss/perplexity (and exact match for prompt/completion sets) of each set; one set keeps the plain
    eval/... names, several are reported as eval/<set>/..."""
    if len(eval_sets) == 1:
        return eval_one_set(model, tokenizer, next(iter(eval_sets.values())), args, device)
    results = {}
    for name, records in eval_sets.items():
        for key, value in eval_one_set(model, tokenizer, records, args, device).items():
            results[key.replace("eval/", f"eval/{source_label(name)}/", 1)] = value
    return results


def eval_one_set(model, tokenizer, records, args, device) -> dict:
    subset = records[:args.eval_samples]
    rows = build_dataset(subset, tokenizer, args.max_length, mode="pad", on_overlong="truncate")
    batches = torch.utils.data.DataLoader(rows, batch_size=64)
    result = evaluate_loss(model, batches, device)
    if all("prompt" in r for r in subset):
        result["eval/exact_match"] = exact_match(model, tokenizer, subset, device)
    return result
