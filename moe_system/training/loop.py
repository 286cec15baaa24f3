"""The training run: data, model, booster, the step loop, evaluation, checkpoints and the final model.

Parallelism enters only through `build_plugin` (moe_system.parallel): the loop is the same for one CPU process
and for expert-parallel runs across nodes. The loop draws a step's batches, runs `train_step` and hands the
outcome to the components that own the rest, each on its own cadence: metrics and the bar (TrainProgress),
expert rebalancing, evaluation and checkpoints.
"""

import json
import os
import time

import torch
import torch.distributed as dist
from colossalai.accelerator import get_accelerator
from colossalai.booster import Booster
from tqdm import tqdm

from ..data import load_tokenizer
from ..model import OpenMoeConfig, OpenMoeForCausalLM
from ..model.convert import checkpoint_config
from ..moe.balancing import update_expert_bias
from ..moe.load import ExpertLoadMeter
from ..parallel.checkpoint_io import load_pretrained_weights
from ..parallel.compile import compile_dense_blocks
from ..parallel.config import ParallelConfig
from ..parallel.launch import init_distributed
from ..parallel.optimizers import adamw
from ..parallel.plugin import build_plugin
from ..parallel.rank_model import build_for_plugin
from ..parallel.rebalance import ExpertRebalancer
from . import interrupt
from .checkpoint import Checkpointer, resolve_resume, save_final_model
from .evaluate import Evaluator, load_eval_sets
from .flops import param_counts, train_flops_per_token
from .metrics import MetricsLogger, TrainProgress, format_load
from .output_dir import claim_output_dir
from .schedule import build_scheduler
from .step import NONFINITE_GRAD, NONFINITE_LOSS, OK, OVERFLOW, TrainState, train_step
from .train_data import build_train_data

H100_BF16_PEAK_TFLOPS = 989.0
WHAT_WAS_SKIPPED = {NONFINITE_LOSS: "loss", NONFINITE_GRAD: "gradient", OVERFLOW: "overflow"}


class NonFiniteLossError(RuntimeError):
    pass


def build_model_config(args, resume_from: str | None = None) -> OpenMoeConfig:
    """The preset, or the architecture of the checkpoint the run starts from (--load_checkpoint) or continues
    (--resume: the model it saved, whatever preset or checkpoint the run began with), with the router and loss
    flags applied."""
    overrides = dict(router_aux_loss_factor=args.router_aux_loss_factor, router_z_loss_factor=args.router_z_loss_factor,
                     z_loss_factor=args.z_loss_factor, label_smoothing=args.label_smoothing)
    for name in ("dispatch", "router_topk", "router_noise", "router_renormalize", "router_fp32",
                 "router_bias_update_rate", "expert_init_scale"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    source = os.path.join(resume_from, "model") if resume_from else args.load_checkpoint
    if source:
        config = checkpoint_config(source)  # ours, or a released Colossal/remote-code/T5X layout
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


def train(args) -> dict:
    init_distributed(args.seed)
    # Writable, locked against a second run, and no earlier run replaced unless asked (--overwrite_output_dir).
    with claim_output_dir(args.output_path, args.resume, args.overwrite_output_dir) as earlier_run:
        return run_training(args, earlier_run)


def run_training(args, earlier_run: list[str]) -> dict:
    resume_from = resolve_resume(args.resume, args.output_path) if args.resume else None
    config = build_model_config(args, resume_from)
    plugin, layout = build_plugin(ParallelConfig.from_args(args), config)
    booster = Booster(plugin=plugin)
    device = get_accelerator().get_current_device()
    tokenizer = load_tokenizer(args.tokenizer, vocab_size=config.vocab_size)
    data = build_train_data(args, tokenizer, config, plugin, layout)
    eval_sets = load_eval_sets(args)
    model = build_model(args, config, plugin)
    if args.gradient_checkpointing:
        model.model.gradient_checkpointing = True
        model.model.recompute = args.recompute
    optimizer = adamw(decay_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = build_scheduler(optimizer, args.lr_scheduler, args.warmup_steps, data.total_steps)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    if args.compile:  # on the plugin's final modules (MoE layers replaced, parameters cast): compiles on step 1
        compile_dense_blocks(model.unwrap(), backend=args.compile_backend)
    if args.load_checkpoint and not resume_from:  # strict, each rank its own slices (a resume replaces them)
        load_pretrained_weights(booster, model, args.load_checkpoint)

    state = TrainState()
    checkpointer = Checkpointer(booster, model, optimizer, scheduler, tokenizer, args, layout, data, plugin.dp_group,
                                earlier_run)
    if resume_from:
        checkpointer.resume(resume_from, state)
    announce(args, config, layout, data, state, resume_from)
    progress = build_progress(args, config, plugin, layout, data, model, state)
    evaluator = Evaluator(booster, model, tokenizer, eval_sets, args, device, progress)
    rebalancer = (ExpertRebalancer(model.unwrap(), optimizer, plugin.ep_group, plugin.moe_dp_group, plugin.pp_group)
                  if args.load_balance else None)
    after_update = []  # aux-loss-free balancing: gate biases follow the load of the steps that updated
    if config.router_bias_update_rate:
        bias_meter = ExpertLoadMeter(model.unwrap().moe_layers())
        after_update.append(lambda: update_expert_bias(bias_meter, config.router_bias_update_rate, plugin.dp_group))

    run_start = time.perf_counter()
    model.train()
    interrupt.stop_at_step_end()
    batches = data.batches(state)
    while state.step < data.total_steps:
        micro_batches = next(batches)
        if interrupt.stop_requested():  # every rank, every step: a signal on any of them stops all here
            progress.close()
            interrupt.exit_saved(state.step, checkpointer.save(state))
        state.consumed += 1
        result = train_step(booster, model, optimizer, scheduler, micro_batches, plugin, device, after_update)
        data.count_tokens(micro_batches)
        state.record(result.outcome)
        if result.outcome != OK:  # no update: counted, logged; K non-finite in a row stop the run
            progress.log_skip(state, WHAT_WAS_SKIPPED[result.outcome])
            stop_if_diverging(state, WHAT_WAS_SKIPPED[result.outcome], args)
            continue
        progress.log_step(state.step, result.parts, scheduler.get_last_lr()[0])
        if rebalancer:
            rebalancer.maybe_rebalance(state.step, args.load_balance_interval, data.total_steps, progress)
        evaluator.maybe_eval(state.step)
        checkpointer.maybe_save(state)
    return finish(args, state, booster, model, tokenizer, checkpointer, evaluator, progress, run_start)


def build_progress(args, config, plugin, layout, data, model, state) -> TrainProgress:
    is_main = dist.get_rank() == 0
    logger = MetricsLogger(args.output_path, enabled=is_main, wandb_project=args.wandb_project, run_config=vars(args))
    bar = tqdm(total=data.total_steps, initial=state.step, desc="train", disable=not is_main, dynamic_ncols=True)
    peak = args.peak_tflops or (H100_BF16_PEAK_TFLOPS if torch.cuda.is_available() else None)
    return TrainProgress(logger, bar, args.log_interval, data.total_steps,
                         tokens_per_step=args.batch_size * args.grad_accum_steps * layout.dp_size * args.max_length,
                         load_meter=ExpertLoadMeter(model.unwrap().moe_layers()),
                         extra_stats=lambda: data.token_stats(plugin.dp_group),
                         flops_per_token=train_flops_per_token(config, args.max_length),
                         peak_flops=peak * 1e12 * layout.world if peak else None)


def announce(args, config, layout, data, state, resume_from) -> None:
    """args.json and the run's one-line description (main rank)."""
    if dist.get_rank() != 0:
        return
    os.makedirs(args.output_path, exist_ok=True)
    with open(os.path.join(args.output_path, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    counts = param_counts(config)
    print(f"OpenMoE-{args.model_name}: {counts['total'] / 1e6:.2f}M parameters, "
          f"{counts['active_blocks'] / 1e6:.2f}M active per token in the blocks; {layout.describe()}; "
          f"{data.describe()} x {args.max_length} tokens, {data.total_steps} steps"
          + (f"; resumed at step {state.step} from {resume_from}" if resume_from else ""))


def stop_if_diverging(state: TrainState, what: str, args) -> None:
    """K non-finite steps in a row stop the run (an fp16 overflow is routine and does not count)."""
    if what != "overflow" and state.bad_in_a_row >= args.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{state.bad_in_a_row} consecutive steps had a non-finite loss or gradient (last at step "
            f"{state.step + 1}: {what}); stopping. The last good checkpoint in {args.output_path} is untouched: "
            f"lower --lr, raise --warmup_steps, keep --max_grad_norm on or use --precision bf16/fp32, then "
            f"--resume latest")


def finish(args, state, booster, model, tokenizer, checkpointer, evaluator, progress, run_start) -> dict:
    """The final checkpoint and model, the final evaluation, summary.json and the closing lines."""
    progress.bar.close()
    summary = {"steps": state.step, "skipped_steps": state.skipped,
               **({"overflow_steps": state.overflows} if state.overflows else {}),
               "final_lm_loss": progress.last_loss, "wall_s": time.perf_counter() - run_start}
    checkpointer.save(state)
    final_dir = os.path.join(args.output_path, "final")
    save_final_model(booster, model, tokenizer, final_dir)
    if evaluator.sets:
        summary.update(evaluator.evaluate())
        progress.logger.log(state.step, summary)
    if dist.get_rank() == 0:
        if progress.last_load:
            print("expert load over the last logged window:\n" + format_load(progress.last_load))
        with open(os.path.join(args.output_path, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print("done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
              + f"; model saved to {final_dir}")
    progress.logger.close()
    return summary
