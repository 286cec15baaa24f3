"""train.py's command line: the reference example's flags (docs/architecture.md, Command line) plus what a real
run needs.

Flags of features not yet built are parsed and refused with a clear error, never silently ignored.
Defaults marked "per preset" come from PRESET_DEFAULTS so that `python train.py` is the tiny CPU demo while
`--model_name 8b` gets the reference's finetuning settings.
"""

import argparse
import math
import os

from ..data import DataError
from ..data.mixture import parse_sources
from ..data.records import is_hub_dataset
from ..model.config import DISPATCH_MODES, PRESETS, ROUTER_NOISE, OpenMoeConfig
from ..model.modeling import RECOMPUTE_MODES

PRESET_DEFAULTS = {
    # tiny: the embedded demo, sized to learn the bundled tasks in a few minutes on 2 CPU cores. lr 1e-3, not
    # higher: with T5X's unscaled attention, 3e-3 stalls at loss ~2.3 (guessing common tokens), measured.
    "tiny": dict(lr=1e-3, batch_size=64, max_length=32, num_epoch=2, warmup_steps=30, lr_scheduler="cosine"),
    # released sizes: the reference finetuning recipe (train.sh: lr 1e-5, batch 1 per rank, length 2048).
    "base": dict(lr=1e-5, batch_size=1, max_length=2048, num_epoch=1, warmup_steps=0, lr_scheduler="constant"),
    "8b": dict(lr=1e-5, batch_size=1, max_length=2048, num_epoch=1, warmup_steps=0, lr_scheduler="constant"),
    "34b": dict(lr=1e-5, batch_size=1, max_length=2048, num_epoch=1, warmup_steps=0, lr_scheduler="constant"),
}

NOT_YET: dict[str, str] = {}  # flag -> feature


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line: the usage block of this many flags runs to 40 lines (--help has them)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train.py", description="Train or finetune an OpenMoE model with expert parallelism.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model_name", default="tiny", choices=sorted(PRESETS), help="architecture preset")
    g.add_argument("--load_checkpoint", default=None, help="start from this Hugging Face-format checkpoint dir")
    g.add_argument("--dispatch", default=None, choices=DISPATCH_MODES, help="MoE dispatch (default: per preset)")
    g.add_argument("--router_topk", type=int, default=None, help="experts per token (default: preset, 2)")
    g.add_argument("--router_noise", default=None, choices=ROUTER_NOISE,
                   help="router noise in training: jitter (x*U(0.99,1.01), Switch) or gaussian (logits+N(0,1/E^2))")
    g.add_argument("--router_renormalize", action="store_true", default=None,
                   help="renormalise the top-k combine weights to sum to 1 (OpenMoE: raw probabilities)")
    g.add_argument("--no_router_fp32", dest="router_fp32", action="store_false", default=None,
                   help="compute the router in the training precision instead of fp32 (not recommended)")
    g.add_argument("--router_bias_update_rate", type=float, default=None,
                   help="aux-loss-free balancing (DeepSeek-V3): per-expert selection bias step; 0 disables")
    g.add_argument("--expert_init_scale", type=float, default=None,
                   help="Switch-style init: experts and gate ~ N(0, scale/fan_in); default 0.1")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--recompute", default="full", choices=RECOMPUTE_MODES,
                   help="with --gradient_checkpointing: full (whole decoder layers: least memory, and what the "
                   "memory planner's --checkpointing assumes) or selective (attention blocks and SwiGLU products; "
                   "never the expert all-to-alls: less recompute and communication, more memory)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the dense blocks (attention, dense FFNs, norms) one by one; the MoE layers "
                   "stay eager. Pays on GPUs; works on the CPU too (inductor's C++ backend), where the first "
                   "step spends a minute or more compiling")
    g.add_argument("--compile_backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="with --compile: torch.compile's backend. inductor generates the fast kernels; aot_eager "
                   "and eager trace the same graphs without code generation (to tell a compiler problem from a "
                   "model one, or to check a set-up quickly)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="bundled",
                   help="'bundled', 'bundled-text', 'synthetic' (random tokens, for throughput), a local "
                   ".jsonl/.json/.parquet/.txt file or dir, or a hub dataset name; a weighted mix as "
                   "comma-separated source:weight, e.g. bundled-text:0.7,data/other.jsonl:0.3")
    g.add_argument("--task_name", default=None,
                   help="configuration of a hub --dataset, e.g. super_natural_instructions (hub data sets only)")
    g.add_argument("--eval_dataset", default=None, help="held-out data, or several comma-separated, each "
                   "reported as eval/<name>/loss and /perplexity (default: the bundled held-out split when "
                   "training on bundled data)")
    g.add_argument("--objective", default="lm", choices=["lm", "ul2"],
                   help="lm: next-token loss on text (on completions for prompt/completion records); ul2: "
                   "OpenMoE's prefix-LM + span-corruption mix on text (prompt+completion used as one text)")
    g.add_argument("--ul2_weights", default=None, help="with --objective ul2: comma-separated name=weight, names "
                   "lm, prefix, span_<mean span>_<rate> (default: OpenMoE's prefix=0.5 and span_3_0.15, "
                   "span_8_0.15, span_3_0.5, span_8_0.5, span_64_0.5 at 0.1 each)")
    g.add_argument("--tokenizer", default=None, help="tokenizer dir or sentencepiece .model (default: bundled)")
    g.add_argument("--max_length", type=int, default=None, help="tokens per row (default: per preset)")
    g.add_argument("--packing", default="pad", choices=["pad", "pack"], help="one example per row, or packed")
    g.add_argument("--on_overlong", default="error", choices=["error", "truncate"],
                   help="--packing pad, --objective lm: an example longer than --max_length stops the run with an "
                   "error, or is cut to --max_length (its tail is not trained on)")
    g.add_argument("--no_mask_prompt", dest="mask_prompt", action="store_false",
                   help="also train on prompt tokens (default: loss on completions only)")
    g.add_argument("--skip_malformed", action="store_true",
                   help="skip (and count) malformed records of local files and hub data sets, training and held-out")
    g.add_argument("--streaming", action="store_true",
                   help="read a .jsonl/.txt --dataset (file or directory) lazily instead of loading it: for data that "
                   "does not fit in memory. Each data-parallel rank reads every n-th record, the files repeat "
                   "endlessly (needs --max_steps; no epochs) and a resumed run skips the rows it consumed")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=None, help="sequences per data-parallel rank per step")
    g.add_argument("--num_epoch", type=int, default=None, help="epochs (default: per preset)")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (at least 1)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per preset)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW decay; norms are never decayed")
    g.add_argument("--lr_scheduler", default=None, choices=["constant", "cosine", "inverse_sqrt"])
    g.add_argument("--warmup_steps", type=int, default=None)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip to this global norm; 0 disables")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_nonfinite_steps", type=int, default=5,
                   help="stop after this many consecutive steps with a non-finite loss or gradient norm (each one "
                   "is skipped; fp16 loss-scale overflows are skipped but not counted unless at the minimum scale)")
    g.add_argument("--router_aux_loss_factor", type=float, default=0.01, help="load-balancing loss factor")
    g.add_argument("--router_z_loss_factor", type=float, default=1e-4, help="router z-loss factor")
    g.add_argument("--z_loss_factor", type=float, default=1e-4, help="output-logit z-loss factor")
    g.add_argument("--label_smoothing", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("parallelism")
    g.add_argument("--plugin", default="ep", choices=["ep", "ep_zero", "hybrid"])
    g.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on GPU, fp32 on CPU")
    g.add_argument("--zero_stage", type=int, default=None, choices=[0, 1, 2],
                   help="default: 0 on one process, 1 otherwise")
    g.add_argument("--extra_dp_size", type=int, default=1, help="ep_zero: replicas of each expert (ZeRO-sharded)")
    g.add_argument("--pp_size", type=int, default=2, help="hybrid: pipeline stages")
    g.add_argument("--dp_size", type=int, default=1, help="hybrid: expert data-parallel size")
    g.add_argument("--ep_size", type=int, default=2, help="hybrid: expert-parallel size")
    g.add_argument("--microbatch_size", type=int, default=1, help="hybrid: sequences per pipeline micro-batch")
    g.add_argument("--load_balance", action="store_true",
                   help="every --load_balance_interval steps, move experts between EP ranks so that the busiest "
                        "rank gets as few tokens as possible (needs ep_size > 1; training is unchanged bit for bit)")
    g.add_argument("--load_balance_interval", type=int, default=1000, help="steps between expert rebalancing")
    g.add_argument("--comm_overlap", action="store_true",
                   help="pipeline the expert-parallel all-to-alls with the expert compute, forward and backward, in "
                   "--comm_overlap_chunks chunks (same results; a no-op when the EP size is 1)")
    g.add_argument("--comm_overlap_chunks", type=int, default=4,
                   help="with --comm_overlap: chunks each MoE layer's routed tokens are split into")
    g.add_argument("--hierarchical_alltoall", action="store_true",
                   help="expert-parallel all-to-alls in two levels, within each node then one exchange per node "
                   "pair (nodes from the launcher's LOCAL_WORLD_SIZE; same results; for EP groups across nodes)")

    g = p.add_argument_group("output")
    g.add_argument("--output_path", default=None, help="default: outputs/openmoe-<model_name>")
    g.add_argument("--save_interval", type=int, default=1000, help="steps between full-state checkpoints")
    g.add_argument("--save_total_limit", type=int, default=3, help="checkpoints kept (oldest removed); 0 keeps all")
    g.add_argument("--resume", default=None, help="'latest' (newest intact checkpoint in --output_path) or a "
                   "checkpoint dir")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start a new run in an --output_path that holds an earlier run's checkpoints; they are "
                   "deleted once this run saved its first checkpoint")
    g.add_argument("--log_interval", type=int, default=10, help="steps between metric records")
    g.add_argument("--eval_interval", type=int, default=0, help="steps between evaluations (0: at the end only)")
    g.add_argument("--eval_samples", type=int, default=200, help="held-out examples used for exact match")
    g.add_argument("--eval_batch_size", type=int, default=8, help="held-out rows per evaluation forward (bounds "
                   "evaluation memory)")
    g.add_argument("--wandb_project", default=None, help="also log to Weights & Biases (needs `pip install wandb`)")
    g.add_argument("--peak_tflops", type=float, default=None,
                   help="per-device peak for MFU (default: 989 on H100-class GPUs, none on CPU)")
    return p


def at_least(low, note: str = ""):
    return (lambda value: value >= low), f"at least {low}" + (f" ({note})" if note else "")


def above(low):
    return (lambda value: value > low), f"above {low}"


# The values every int and float flag takes, checked in one loop; the loop raises KeyError for a numeric flag
# missing here, so a new one cannot go unchecked. Float flags must also be finite (nan fails every comparison,
# but inf passes `> 0`).
RANGES = {
    "router_topk": at_least(1),  # and at most the model's experts: check_against_model
    "router_bias_update_rate": at_least(0, "0 disables it"),
    "expert_init_scale": above(0),
    "max_length": at_least(2, "a row holds BOS and EOS"),  # and at most the model's positions
    "batch_size": at_least(1),
    "num_epoch": at_least(1),
    "max_steps": at_least(1, "leave it out to train --num_epoch epochs"),
    "lr": above(0),
    "weight_decay": at_least(0),
    "warmup_steps": at_least(0),
    "max_grad_norm": at_least(0, "0 disables clipping"),
    "grad_accum_steps": at_least(1),
    "max_nonfinite_steps": at_least(1),
    "router_aux_loss_factor": at_least(0),
    "router_z_loss_factor": at_least(0),
    "z_loss_factor": at_least(0),
    "label_smoothing": ((lambda value: 0 <= value < 1), "at least 0 and below 1"),
    "seed": ((lambda value: 0 <= value < 2**32), "in 0 .. 2**32-1 (numpy's seed range)"),
    "zero_stage": at_least(0),  # argparse's choices say which
    "extra_dp_size": at_least(1),
    "pp_size": at_least(1),
    "dp_size": at_least(1),
    "ep_size": at_least(1),
    "microbatch_size": at_least(1),
    "load_balance_interval": at_least(1),
    "comm_overlap_chunks": at_least(1),
    "save_interval": at_least(1),
    "save_total_limit": ((lambda value: value >= 0), "at least 1, or 0 to keep every checkpoint"),
    "log_interval": at_least(1),
    "eval_interval": at_least(0, "0 evaluates at the end only"),
    "eval_samples": at_least(1),
    "eval_batch_size": at_least(1),
    "peak_tflops": above(0),
}

# Flags that only one plugin reads: the others lay out experts from the world size alone.
PLUGIN_FLAGS = {"pp_size": "hybrid", "dp_size": "hybrid", "ep_size": "hybrid", "microbatch_size": "hybrid",
                "extra_dp_size": "ep_zero"}
BUILT_IN_DATA = ("bundled", "bundled-text", "synthetic")


def given_flags(argv) -> set[str]:
    """The dests of the flags on the command line itself: a parse with every default suppressed."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def conflicts(args, given: set[str]):
    """Each flag that cannot apply to this run, as the message to stop with."""
    for flag, feature in NOT_YET.items():
        if getattr(args, flag):
            yield f"{feature} is not yet available in moe_system; drop --{flag}"
    for flag, plugin in PLUGIN_FLAGS.items():
        if flag in given and args.plugin != plugin:
            yield f"--{flag} applies to --plugin {plugin} only (this run uses --plugin {args.plugin}); " \
                  f"drop --{flag} or pass --plugin {plugin}"
    pipeline = args.plugin == "hybrid" and args.pp_size > 1
    if "microbatch_size" in given and args.plugin == "hybrid" and not pipeline:
        yield "--microbatch_size splits the batch for a pipeline, and --pp_size 1 has none; drop --microbatch_size"
    for flag, needs in (("load_balance_interval", "load_balance"), ("comm_overlap_chunks", "comm_overlap"),
                         ("recompute", "gradient_checkpointing")):
        if flag in given and not getattr(args, needs):
            yield f"--{flag} applies with --{needs} only; pass --{needs} or drop --{flag}"
    if args.ul2_weights and args.objective != "ul2":
        yield "--ul2_weights applies to --objective ul2 only"
    if args.objective == "ul2" and args.packing == "pack":
        yield "--objective ul2 builds one example per row; drop --packing pack"
    if args.objective == "ul2" and not args.mask_prompt:
        yield "--objective ul2 trains on prompt and completion as one text; drop --no_mask_prompt"
    if "on_overlong" in given:
        for bad, why in ((args.packing == "pack", "--packing pack continues a long example in the next row"),
                         (args.objective == "ul2", "--objective ul2 cuts long documents into pieces"),
                         (args.streaming and args.on_overlong != "truncate", "--streaming truncates long examples")):
            if bad:
                yield f"--on_overlong applies to padded lm rows only: {why}; drop --on_overlong"
    if args.streaming:
        for bad, why in ((not args.max_steps, "the stream repeats endlessly; set --max_steps"),
                         ("," in args.dataset, "it reads one file or directory, not a weighted mix"),
                         (args.packing == "pack", "it builds one padded example per row; drop --packing pack"),
                         (args.objective == "ul2", "it trains the lm objective; drop --objective ul2"),
                         ("num_epoch" in given, "the stream has no epochs; drop --num_epoch (--max_steps bounds it)")):
            if bad:
                yield f"--streaming: {why}"
    if args.resume and args.load_checkpoint:
        yield "--resume restores the model it saved; --load_checkpoint would be ignored. Pass one of them"
    if args.resume and args.overwrite_output_dir:
        yield "--resume continues the run in --output_path; --overwrite_output_dir would delete it. Pass one of them"

    try:
        names = [name for name, _ in parse_sources(args.dataset)]
    except DataError as error:
        yield str(error)
        return
    eval_names = args.eval_dataset.split(",") if args.eval_dataset else (["bundled"] if args.dataset == "bundled"
                                                                         else [])  # as train() picks them
    if not all(name.strip() for name in eval_names):
        yield f"--eval_dataset {args.eval_dataset!r} has an empty name; give comma-separated data set names"
    if all(name == "synthetic" for name in names):
        for flag, shown in (("objective", "--objective"), ("packing", "--packing"), ("mask_prompt", "--no_mask_prompt"),
                            ("on_overlong", "--on_overlong")):
            if flag in given:
                yield f"{shown} does not apply to --dataset synthetic (random token rows); drop {shown}"
    if args.task_name and not any(is_hub_dataset(name) for name in names if name != "synthetic"):
        yield f"--task_name picks a configuration of a Hugging Face hub data set, and --dataset {args.dataset} " \
              f"names none (local files and built-in data have no configurations); drop --task_name"
    if args.skip_malformed and all(name in BUILT_IN_DATA for name in names + eval_names):
        yield "--skip_malformed applies to local files and hub data sets; the built-in data has no malformed " \
              "records: drop --skip_malformed"
    # (--eval_samples only caps the held-out examples: a preset may pass it whatever the data)
    if args.eval_interval and not eval_names:
        yield "--eval_interval: this run has no held-out set (only --dataset bundled brings one); pass " \
              "--eval_dataset or drop --eval_interval"


def resumed_model_dir(args) -> str | None:
    """The saved model --resume continues (training/checkpoint.py: the newest checkpoint for 'latest'; the run
    checks it intact, and every checkpoint of a run holds the same architecture), or None where there is none
    to read: the run then says what is wrong with the --resume."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(args.output_path) if args.resume == "latest" else [(None, args.resume)]
    model_dir = os.path.join(found[-1][1], "model") if found else None
    return model_dir if model_dir and os.path.isfile(os.path.join(model_dir, "config.json")) else None


def check_against_model(args) -> str | None:
    """What the model this run trains cannot do: more experts per token than it has, rows past its positions.
    That model is the one --resume saved (whatever --model_name says), or the one --load_checkpoint starts
    from, or the preset (training/loop.py: build_model_config)."""
    from ..model.convert import checkpoint_config  # reads config.json only

    if args.resume:
        model_dir = resumed_model_dir(args)
        try:
            config = checkpoint_config(model_dir) if model_dir else None
        except (OSError, ValueError):  # CheckpointError is a ValueError
            config = None  # damaged: the run's check of the checkpoint's files says so
        if config is None:
            return None
        which = f"the model saved in {os.path.dirname(model_dir)}"
    elif args.load_checkpoint:
        config, which = checkpoint_config(args.load_checkpoint), f"the model in {args.load_checkpoint}"
    else:
        config, which = OpenMoeConfig.from_preset(args.model_name), f"the {args.model_name} preset"
    if args.router_topk is not None and args.router_topk > config.num_experts:
        return f"--router_topk {args.router_topk}: {which} has {config.num_experts} experts per MoE layer; " \
               f"use --router_topk 1 to {config.num_experts}"
    if args.max_length > config.max_position_embeddings:
        return f"--max_length {args.max_length} is beyond the {config.max_position_embeddings} positions of " \
               f"{which}; use --max_length {config.max_position_embeddings} or less"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    """train.py's flags, every one checked before any work: ranges (RANGES), combinations (conflicts) and the
    model's limits. A problem ends the process with one `train.py: error: ...` line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(argv)
    for key, value in PRESET_DEFAULTS[args.model_name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.type not in (int, float) or value is None:
            continue
        test, what = RANGES[action.dest]
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{action.option_strings[0]} must be a finite number ({what}), got {value}")
        if not test(value):
            parser.error(f"{action.option_strings[0]} must be {what}, got {value}")
    for problem in conflicts(args, given):
        parser.error(problem)
    if args.output_path is None:
        args.output_path = f"outputs/openmoe-{args.model_name}"
    problem = check_against_model(args)
    if problem:
        parser.error(problem)
    return args
