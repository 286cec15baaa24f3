"""What the parallel layer is asked to build: one frozen record, made once from train.py's flags."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    plugin: str = "ep"  # ep | ep_zero | hybrid (parallel/layout.py)
    zero_stage: int | None = None  # None: 1 with several processes, 0 with one
    precision: str | None = None  # None: bf16 on a GPU, fp32 on the CPU
    extra_dp_size: int = 1  # ep_zero: replicas of each expert
    pp_size: int = 1  # hybrid: pipeline stages
    dp_size: int = 1  # hybrid: expert data-parallel size
    ep_size: int = 1  # hybrid: expert-parallel size
    microbatch_size: int | None = None  # hybrid: sequences per pipeline micro-batch
    batch_size: int | None = None  # sequences per data-parallel rank per step (checked against the micro-batch)
    max_grad_norm: float = 0.0  # clip to this global norm; 0 disables
    load_balance: bool = False  # experts move between EP ranks (needs an EP size above 1)
    comm_overlap_chunks: int = 1  # the EP all-to-alls overlap the experts in this many chunks; 1: no overlap
    hierarchical_alltoall: bool = False  # two-level (node-aware) all-to-all

    @classmethod
    def from_args(cls, args) -> "ParallelConfig":
        """From train.py's parsed flags (training/args.py)."""
        return cls(plugin=args.plugin, zero_stage=args.zero_stage, precision=args.precision,
                   extra_dp_size=args.extra_dp_size, pp_size=args.pp_size, dp_size=args.dp_size,
                   ep_size=args.ep_size, microbatch_size=args.microbatch_size, batch_size=args.batch_size,
                   max_grad_norm=args.max_grad_norm or 0.0, load_balance=args.load_balance,
                   comm_overlap_chunks=args.comm_overlap_chunks if args.comm_overlap else 1,
                   hierarchical_alltoall=args.hierarchical_alltoall)
