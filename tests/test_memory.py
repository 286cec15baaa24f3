"""Per-rank memory of an expert-heavy model on 4 expert-parallel CPU ranks (train.py --plugin ep): each rank holds
its share of the model and no more while it starts, loads a released checkpoint, trains, saves and resumes.

The model is one MoE layer of 32 experts (hidden 512, intermediate 2048: 512 MiB of fp32 experts) and a small
dense part, so a rank that held every expert would stand out. Each phase's peak resident memory
(tests/workers/memory_phases.py) must stay within the process's own overhead (its peak before the model is
built) plus 1.3x what the rank owns then, in multiples of its weights W (dense part + its 8 experts; fp32, no
ZeRO): W while starting and loading; W, gradients, Adam's two moments and the param-sized temporary of its
multi-tensor step (5 W) while training; W, the moments and what the allocator keeps of the step's freed
gradients (4 W) while saving; those and the saved masters being
read (4 W) while resuming, and W while the resume reads the model's weights (each rank its own rows; the
optimizer's state read after them would hide a whole-model read in the resume's peak). A stage's writer (rank 0) also holds the shard it is writing (at most 1 GiB: here
the whole model), and the rank that converts the released checkpoint (LOCAL_RANK 0) holds its largest tensor (an
expert stack, half the model here) while converting: the conversion streams one tensor at a time.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moe_system.model import OpenMoeConfig
from moe_system.model.convert import conversion_dir, expected_shapes

ROOT = Path(__file__).resolve().parents[1]
WORLD = 4
ARCH = dict(vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=4,
            head_dim=64, num_experts=32, moe_layer_interval=1, max_position_embeddings=128)
TRAIN = ["--plugin", "ep", "--zero_stage", "0", "--precision", "fp32", "--dataset", "synthetic", "--batch_size", "2",
         "--max_length", "32", "--log_interval", "1", "--save_interval", "100"]
SLACK = 1.3
MIB = 2 ** 20


def largest_tensor_bytes() -> int:
    return max(4 * torch.Size(shape).numel() for shape in expected_shapes(OpenMoeConfig(**ARCH)).values())


def model_bytes() -> tuple[int, int]:
    """(dense bytes, expert bytes) of the fp32 model."""
    dense = experts = 0
    for name, shape in expected_shapes(OpenMoeConfig(**ARCH)).items():
        nbytes = 4 * torch.Size(shape).numel()
        if ".experts." in name:
            experts += nbytes
        else:
            dense += nbytes
    return dense, experts


def write_released(directory: Path) -> Path:
    """The model as the OpenMoE team released theirs (remote-code config, our tensor names)."""
    directory.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (1 + 0.01 * torch.randn(shape, generator=gen)) if len(shape) == 1
               else 0.02 * torch.randn(shape, generator=gen)
               for name, shape in expected_shapes(OpenMoeConfig(**ARCH)).items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = dict(ARCH, model_type="llama", architectures=["OpenMoeForCausalLM"], hidden_act="swiglu",
                  auto_map={"AutoModelForCausalLM": "modeling_openmoe.OpenMoeForCausalLM"}, router_topk=2,
                  router_noisy_policy=None, router_drop_tks=True, rms_norm_eps=1e-6, tie_word_embeddings=False)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def run(output: Path, phases: Path, *extra, env=()) -> dict[int, dict]:
    phases.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MEMORY_PHASES_DIR": str(phases),
           **dict(env)}
    cmd = ["timeout", "-k", "5", "480", sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", str(ROOT / "tests" / "workers" / "memory_phases.py"), *TRAIN,
           "--output_path", str(output), *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return {rank: json.loads((phases / f"rank{rank}.json").read_text()) for rank in range(WORLD)}


@pytest.fixture(scope="module")
def peaks(tmp_path_factory) -> dict:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("cannot reset the peak resident memory (/proc/self/clear_refs)")
    tmp = tmp_path_factory.mktemp("memory")
    released = write_released(tmp / "released")
    output = tmp / "run"
    loaded = run(output, tmp / "phases-load", "--load_checkpoint", str(released), "--max_steps", "2")
    assert (conversion_dir(released) / "converted_from.json").is_file()  # converted once, beside the source
    # The resumed run takes its architecture from the checkpoint (no preset has it).
    resumed = run(output, tmp / "phases-resume", "--max_steps", "3", "--resume", "latest")
    shutil.rmtree(tmp)
    table = {rank: {**loaded[rank], "resume": resumed[rank]["resume"], "resume_model": resumed[rank]["model_load"]}
             for rank in range(WORLD)}
    print("\nper-rank peak RSS (MiB):", json.dumps(table, indent=1))
    return table


def bound(phase_peaks: dict, owned: float) -> float:
    return phase_peaks["overhead"] + SLACK * owned / MIB


def owned_weights() -> float:
    dense, experts = model_bytes()
    return dense + experts / WORLD


@pytest.mark.distributed
@pytest.mark.slow
def test_startup_holds_the_ranks_share(peaks):
    for rank, p in peaks.items():
        assert p["startup"] <= bound(p, owned_weights()), (rank, p)


@pytest.mark.distributed
@pytest.mark.slow
def test_load_checkpoint_reads_only_the_ranks_slices(peaks):
    for rank, p in peaks.items():
        # LOCAL_RANK 0 converts the released layout for its node, reading and writing one tensor at a time (fp32
        # to fp32: no cast copy)
        converting = largest_tensor_bytes() if rank == 0 else 0
        assert p["load"] <= bound(p, owned_weights() + converting), (rank, p)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("phase, weights", [("train", 5), ("save", 4), ("resume", 4), ("resume_model", 1)])
def test_training_saving_and_resuming_hold_the_ranks_share(peaks, phase, weights):
    whole = sum(model_bytes())
    for rank, p in peaks.items():
        shard = whole if rank == 0 and phase == "save" else 0  # the writer holds the shard being written
        assert p[phase] <= bound(p, weights * owned_weights() + shard), (rank, phase, p)
