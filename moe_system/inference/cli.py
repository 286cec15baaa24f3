"""Command lines of infer.py (one device) and infer_multi_device.py (accelerate over GPUs, CPU and disk)."""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from ..model.convert import CheckpointError
from .generate import Generator, SamplingSettings, check_text
from .loading import (DTYPE_CHOICES, InferenceError, checkpoint_config, load_model,
                      load_tokenizer_for, model_config, pick_device, resolve_dtype)
from .process_memory import MIB, fmt_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from .device_map import (STRATEGIES, auto_device_map, device_name, empty_model, expert_aware_device_map,
                        load_dispatched, parse_max_memory, planned_bytes, read_device_map)
from .session import Session, read_prompt_file

DEFAULT_MODEL = "outputs/openmoe-tiny/final"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def add_model_args(parser: argparse.ArgumentParser, presets: bool) -> None:
    what = "checkpoint directory written by save_pretrained (ours or a converted release)"
    if presets:
        what += ", or a preset name (tiny, base, 8b, 34b) for a randomly initialised smoke run"
    parser.add_argument("--model", default=DEFAULT_MODEL, help=what)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory, sentencepiece .model or hub name (default: the one saved with "
                             "the checkpoint, else the bundled tokenizer)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights and compute dtype (auto: as saved in the checkpoint)")


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prompts (without --prompt or --prompt_file: one prompt per stdin line)")
    group.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for a batch")
    group.add_argument("--prompt_file", default=None,
                       help="a file of prompts: one per line, or JSON lines with a \"prompt\" field (.jsonl)")
    group.add_argument("--chat", action="store_true",
                       help="wrap prompts in the OpenMoE chat template ([INST] ... [/INST]); stdin keeps the "
                            "conversation (/reset clears it)")
    group.add_argument("--system", default=None, help="system message for --chat")
    group.add_argument("--batch_size", type=int, default=8, help="prompts generated together (left padding)")
    group.add_argument("--no_stream", action="store_true", help="print each completion only when it is finished")
    group.add_argument("--output", default=None, help="also write one JSON record per completion to this file")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max_new_tokens", type=int, default=64, help="at most this many tokens per prompt")
    group.add_argument("--greedy", action="store_true", help="greedy decoding (also: --temperature 0)")
    group.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    group.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass (1 = off)")
    group.add_argument("--top_k", type=int, default=0, help="0 = off")
    group.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off; >1 discourages repeats")
    group.add_argument("--stop", action="append", default=[],
                       help="stop when the continuation contains this text (repeatable); it is cut from the output")
    group.add_argument("--seed", type=int, default=None, help="seed for sampling (and for a preset's weights)")


def sampling_settings(args) -> SamplingSettings:
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                repetition_penalty=args.repetition_penalty, stop=tuple(args.stop))
    settings.validate()
    if args.batch_size < 1:
        raise InferenceError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise InferenceError(f"--seed must be in 0 .. 2**64 - 1, got {args.seed}")
    check_output_file("--output", args.output)
    return settings


def check_output_file(flag: str, path: str | None) -> None:
    """Refuse a file that could not be written, before any loading, rather than fail after generating."""
    if path is None:
        return
    folder = Path(path).resolve().parent
    if Path(path).is_dir():
        raise InferenceError(f"{flag} {path} is a directory: give a file name")
    if not folder.is_dir():
        raise InferenceError(f"cannot write {flag} {path}: its folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InferenceError(f"cannot write {flag} {path}: its folder {folder} is not writable")


def check_offload_folder(path: str | None) -> None:
    if path is None:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise InferenceError(f"--offload_folder {path} is not a writable folder ({err.strerror}): "
                             "give one you can write, or leave it out for a temporary one") from None


def write_json(flag: str, path: str, value) -> None:
    try:
        with open(path, "w") as f:
            json.dump(value, f, indent=1)
    except OSError as err:
        raise InferenceError(f"cannot write {flag} {path}: {err.strerror}") from None


def collect_prompts(args) -> list[str] | None:
    """The prompts of a one-shot run, or None for an interactive stdin session."""
    prompts = list(args.prompt or [])
    for prompt in prompts:
        check_text(prompt, "--prompt")
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
        if not prompts:
            raise InferenceError(f"prompt file {args.prompt_file} has no prompts")
    return prompts or None


def run_session(generator: Generator, settings: SamplingSettings, args, prompts: list[str] | None) -> None:
    session = Session(generator, settings, chat=args.chat, system=args.system, stream=not args.no_stream,
                      batch_size=args.batch_size, output=args.output)
    try:
        if prompts is None:
            try:
                session.interactive(iter(sys.stdin), show_prompt=sys.stdin.isatty())
            except UnicodeDecodeError:
                raise InferenceError("standard input is not UTF-8 text: send UTF-8, or pass the prompts with "
                                     "--prompt_file") from None
        else:
            session.run_prompts(prompts)
    finally:
        session.close()
    print(f"[infer] {generator.stats.summary()}", file=sys.stderr)


def infer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer.py", description="Generate text with an OpenMoE model.",
                                     formatter_class=HelpFormatter)
    add_model_args(parser, presets=True)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    add_prompt_args(parser)
    add_sampling_args(parser)
    return parser


def infer_main(argv=None) -> int:
    args = infer_parser().parse_args(argv)
    try:
        settings = sampling_settings(args)
        device = pick_device(args.device)
        config = model_config(args.model)
        tokenizer = load_tokenizer_for(args.model, args.tokenizer, config.vocab_size)
        prompts = collect_prompts(args)
        model = load_model(args.model, args.dtype, device, seed=args.seed or 0)
        print(f"[infer] {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{model.dtype}, {device}", file=sys.stderr)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        run_session(Generator(model, tokenizer), settings, args, prompts)
    except (InferenceError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def multi_device_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infer_multi_device.py",
        description="Generate with an OpenMoE checkpoint spread over GPUs, CPU memory and disk (accelerate).",
        formatter_class=HelpFormatter)
    add_model_args(parser, presets=False)
    group = parser.add_argument_group("placement")
    group.add_argument("--max_memory", default=None,
                       help="limits per device, e.g. 0=38GiB,1=38GiB,cpu=50GiB; what does not fit goes to disk "
                            "(default: all free memory)")
    group.add_argument("--device_map", default="balanced",
                       help=f"{' or '.join(STRATEGIES)} (automatic, whole decoder layers), or a JSON file "
                            "{module: GPU index | cpu | disk}")
    group.add_argument("--expert_aware", action="store_true",
                       help="keep the dense parts on the fastest devices and put the experts in what is left")
    group.add_argument("--offload_folder", default=None,
                       help="folder for disk-offloaded weights that are not read straight from the checkpoint "
                            "(default: a temporary folder)")
    group.add_argument("--save_device_map", default=None, help="write the chosen map as JSON (usable as --device_map)")
    group.add_argument("--stats_json", default=None, help="write the map, memory and speed figures as JSON")
    add_prompt_args(parser)
    add_sampling_args(parser)
    return parser


def choose_device_map(args, model, max_memory, dtype) -> dict:
    if args.device_map not in STRATEGIES:
        if args.expert_aware:
            raise InferenceError("--expert_aware builds its own map; it cannot be combined with a --device_map file")
        return read_device_map(args.device_map, model)
    if args.expert_aware:
        return expert_aware_device_map(model, max_memory, dtype)
    return auto_device_map(model, max_memory, dtype, args.device_map)


def print_device_map(device_map: dict, planned: dict) -> None:
    print(f"[placement] device map ({len(device_map)} entries):", file=sys.stderr)
    width = max(len(name) for name in device_map) if device_map else 0
    for name, device in device_map.items():
        print(f"  {name or '(whole model)':<{width}}  {device_name(device)}", file=sys.stderr)
    print("[placement] weights per device: " + ", ".join(f"{device_name(d)} {fmt_bytes(n)}"
                                                         for d, n in planned.items()), file=sys.stderr)


def measured_memory(planned: dict, rss_before: int) -> dict:
    """What each device holds now: allocated GPU memory, this process's RSS, and the disk-mapped weights."""
    measured = {}
    for device in planned:
        if isinstance(device, int):
            measured[device_name(device)] = torch.cuda.memory_allocated(device)
    measured["cpu"] = rss_bytes()
    if "disk" in planned:
        measured["disk"] = planned["disk"]
    grown = measured["cpu"] - rss_before
    lines = [f"cpu RSS {fmt_bytes(measured['cpu'])} (+{fmt_bytes(grown)} since before loading)"]
    lines += [f"{name} allocated {fmt_bytes(n)}" for name, n in measured.items() if name.startswith("cuda")]
    if "disk" in measured:
        lines.append(f"disk {fmt_bytes(measured['disk'])} read on each forward")
    print("[memory] after loading: " + ", ".join(lines), file=sys.stderr)
    return measured


def multi_device_main(argv=None) -> int:
    args = multi_device_parser().parse_args(argv)
    offload_dir = None
    try:
        settings = sampling_settings(args)
        check_output_file("--save_device_map", args.save_device_map)
        check_output_file("--stats_json", args.stats_json)
        config = checkpoint_config(args.model)
        tokenizer = load_tokenizer_for(args.model, args.tokenizer, config.vocab_size)
        prompts = collect_prompts(args)
        check_offload_folder(args.offload_folder)  # last: it creates the folder
        dtype = resolve_dtype(args.dtype, config)
        max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
        skeleton = empty_model(config)
        device_map = choose_device_map(args, skeleton, max_memory, dtype)
        planned = planned_bytes(skeleton, device_map, dtype)
        print_device_map(device_map, planned)
        if args.save_device_map:
            write_json("--save_device_map", args.save_device_map, device_map)
        offload_folder = args.offload_folder
        if offload_folder is None and "disk" in device_map.values():
            offload_dir = tempfile.TemporaryDirectory(prefix="openmoe-offload-")
            offload_folder = offload_dir.name

        rss_before = rss_bytes()
        exact_peak = reset_peak_rss()
        model = load_dispatched(args.model, device_map, dtype, offload_folder)
        measured = measured_memory(planned, rss_before)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        generator = Generator(model, tokenizer)
        run_session(generator, settings, args, prompts)
        peak = peak_rss_bytes()
        limit = max_memory.get("cpu") if max_memory else None
        print(f"[memory] peak RSS while loading and generating {fmt_bytes(peak)}: "
              f"+{fmt_bytes(peak - rss_before)} over the {fmt_bytes(rss_before)} before loading"
              + (f" (cpu limit {limit})" if limit else ""), file=sys.stderr)
        if args.stats_json:
            stats = {"device_map": {k: device_name(v) for k, v in device_map.items()},
                     "planned_bytes": {device_name(k): v for k, v in planned.items()},
                     "measured_bytes": measured, "max_memory": {str(k): v for k, v in (max_memory or {}).items()},
                     "rss_before_load": rss_before, "peak_rss": peak, "peak_rss_growth": peak - rss_before,
                     "peak_is_since_load": exact_peak, "new_tokens": generator.stats.new_tokens,
                     "seconds": generator.stats.seconds, "tokens_per_s": generator.stats.tokens_per_s,
                     "peak_rss_growth_mib": (peak - rss_before) / MIB}
            write_json("--stats_json", args.stats_json, stats)
    except (InferenceError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if offload_dir is not None:
            offload_dir.cleanup()
    return 0
