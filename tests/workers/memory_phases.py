"""Test-only launcher: runs train.py (same arguments) and records this rank's peak resident memory (VmHWM) in each
phase of the run, by wrapping the loop's functions from here (nothing in the library knows about it).

The peak is reset (/proc/self/clear_refs "5") at the start of each phase, so each phase's peak is what stays
resident from before plus what the phase itself adds. Phases, in MiB, written to MEMORY_PHASES_DIR/rankR.json:
  overhead  process start until the model is built (interpreter, torch, Colossal-AI, process groups, data)
  startup   building and boosting the model
  load      --load_checkpoint (a released layout is converted by LOCAL_RANK 0 in this phase)
  resume    --resume: model, optimizer, scheduler and RNG states
  model_load  the model's weights alone, inside load or resume (the checkpoint IO's sharded reader)
  train     the steps since the last phase (optimizer states are created at the first)
  save      a checkpoint, or the final model

Usage: torchrun ... tests/workers/memory_phases.py TRAIN_ARGS.
"""

import json
import os
import re
import runpy
import sys
from pathlib import Path

from colossalai.booster import Booster

import moe_system.training.checkpoint as checkpoint
import moe_system.training.loop as loop
from moe_system.parallel.checkpoint_io import OpenMoeCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
peaks: dict[str, float] = {}


def status_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def end_phase(name: str) -> None:
    """Record the peak since the last phase ended under name (the largest over repeats), and start the next."""
    peaks[name] = max(peaks.get(name, 0.0), status_mib("VmHWM"))
    peaks[f"{name}_end"] = status_mib("VmRSS")  # resident at its end: what the next phase starts from
    Path("/proc/self/clear_refs").write_text("5")
    path = Path(os.environ["MEMORY_PHASES_DIR"]) / f"rank{os.environ['RANK']}.json"
    path.write_text(json.dumps(peaks))


def phase(function, name: str, before: str | None = None):
    def wrapped(*args, **kwargs):
        if before:
            end_phase(before)
        else:
            Path("/proc/self/clear_refs").write_text("5")
        result = function(*args, **kwargs)
        end_phase(name)
        return result
    return wrapped


def main() -> None:
    build_model = loop.build_model

    def build_model_after_overhead(*args, **kwargs):
        end_phase("overhead")
        return build_model(*args, **kwargs)

    loop.build_model = build_model_after_overhead
    boost = Booster.boost

    def boost_then_startup(self, *args, **kwargs):
        result = boost(self, *args, **kwargs)
        end_phase("startup")
        return result

    Booster.boost = boost_then_startup
    loop.load_pretrained_weights = phase(loop.load_pretrained_weights, "load")
    checkpoint.load_checkpoint = phase(checkpoint.load_checkpoint, "resume")
    # The model's weights alone, inside either load (the optimizer's state, read next, would hide a whole-model read)
    OpenMoeCheckpointIO.load_sharded_model = phase(OpenMoeCheckpointIO.load_sharded_model, "model_load")
    checkpoint.save_checkpoint = phase(checkpoint.save_checkpoint, "save", before="train")
    loop.save_final_model = phase(loop.save_final_model, "save", before="train")
    sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


if __name__ == "__main__":
    main()
