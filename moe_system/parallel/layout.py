"""How ranks are laid out into pipeline, data-parallel, expert-parallel and expert data-parallel groups.

One layout for every plugin, the one Colossal-AI's MoeHybridParallelPlugin builds with
`ProcessGroupMesh(moe_dp, pp, ep, tp=1, sp=1)` (moe_dp outermost, C order, last axis fastest):

    rank = (moe_dp_rank * pp + pp_rank) * ep + ep_rank

* EP group      (all-to-all of tokens):   ep consecutive ranks, so inside one node whenever ep <= GPUs per node.
* expert-DP     (replicas of one expert): ranks ep*pp apart; gradients of an expert are averaged here and,
                                          under ZeRO, its optimizer state is sharded here ("extra DP").
* DP group      (dense params, data):     every rank of one pipeline stage, moe_dp * ep of them.
* PP group      (1F1B p2p):               ranks ep apart.

Example, 8 ranks, ep_zero with extra_dp_size 2: EP groups {0..3} {4..7}, expert replicas {0,4} {1,5} ...
(the reference put the replicas next to each other and stretched EP across nodes; docs/colossalai.md, Process groups).

`validate_layout` is a pure function: an impossible request is refused before any process group exists,
with the sizes that would work.
"""

from dataclasses import dataclass

PLUGINS = ("ep", "ep_zero", "hybrid")
PRECISIONS = ("fp32", "bf16", "fp16")


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message says why and what would."""


@dataclass(frozen=True)
class Layout:
    world: int
    pp: int = 1
    ep: int = 1
    moe_dp: int = 1
    plugin: str = "ep"
    zero_stage: int = 0
    precision: str = "fp32"
    microbatch_size: int | None = None
    rank: int = 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks of one pipeline stage: each reads its own slice of the global batch."""
        return self.moe_dp * self.ep

    @property
    def is_pipeline(self) -> bool:
        return self.pp > 1

    def coords(self, rank: int | None = None) -> dict:
        rank = self.rank if rank is None else rank
        return {"moe_dp": rank // (self.pp * self.ep), "pp": rank // self.ep % self.pp, "ep": rank % self.ep}

    @property
    def data_parallel_rank(self) -> int:
        c = self.coords()
        return c["moe_dp"] * self.ep + c["ep"]

    @property
    def data_parallel_size(self) -> int:
        return self.dp_size

    def ep_group_ranks(self, rank: int | None = None) -> list[int]:
        base = (self.rank if rank is None else rank) // self.ep * self.ep
        return list(range(base, base + self.ep))

    def expert_dp_group_ranks(self, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        stride = self.pp * self.ep
        return list(range(rank % stride, self.world, stride))

    def pp_group_ranks(self, rank: int | None = None) -> list[int]:
        c = self.coords(rank)
        return [(c["moe_dp"] * self.pp + s) * self.ep + c["ep"] for s in range(self.pp)]

    def dp_group_ranks(self, rank: int | None = None) -> list[int]:
        c = self.coords(rank)
        return sorted((m * self.pp + c["pp"]) * self.ep + e for m in range(self.moe_dp) for e in range(self.ep))

    def describe(self) -> str:
        parts = f"pp={self.pp} ep={self.ep} expert-dp={self.moe_dp} dp={self.dp_size}"
        return f"{self.world} process(es), {self.plugin}: {parts}, zero={self.zero_stage}, {self.precision}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _hybrid_options(world: int, num_experts: int, num_layers: int, zero_stage: int) -> list[str]:
    if zero_stage == 2:
        return []
    return [f"--pp_size {pp} --dp_size {world // (pp * ep)} --ep_size {ep}"
            for pp in _divisors(world) if 1 < pp <= num_layers
            for ep in _divisors(world // pp) if num_experts % ep == 0]


def validate_layout(plugin: str, world: int, num_experts: int, num_layers: int, *, zero_stage: int = 0,
                    precision: str = "fp32", extra_dp_size: int = 1, pp_size: int = 1, dp_size: int = 1,
                    ep_size: int = 1, microbatch_size: int | None = None, batch_size: int | None = None,
                    rank: int = 0) -> Layout:
    """Check a requested layout against the world and the model; return it, or raise LayoutError."""
    if plugin not in PLUGINS:
        raise LayoutError(f"unknown plugin {plugin!r}; choose one of {', '.join(PLUGINS)}")
    if precision not in PRECISIONS:
        raise LayoutError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if zero_stage not in (0, 1, 2):
        raise LayoutError(f"--zero_stage must be 0, 1 or 2, got {zero_stage}")
    if world < 1:
        raise LayoutError(f"world size must be positive, got {world}")
    common = dict(plugin=plugin, zero_stage=zero_stage, precision=precision, rank=rank)
    ep_sizes = [ep for ep in _divisors(world) if num_experts % ep == 0]

    if plugin == "ep":
        if num_experts % world:
            zero_ok = [f"--extra_dp_size {world // ep}" for ep in ep_sizes if ep < world]
            raise LayoutError(
                f"--plugin ep puts {num_experts} experts over all {world} processes, but {num_experts} is not "
                f"divisible by {world}. Run with a world size dividing {num_experts} "
                f"({', '.join(map(str, _divisors(num_experts)))}), or --plugin ep_zero with "
                f"{' or '.join(zero_ok) or 'a world size that shares a divisor with the expert count'}")
        return Layout(world=world, ep=world, moe_dp=1, **common)

    if plugin == "ep_zero":
        if extra_dp_size < 1 or world % extra_dp_size:
            raise LayoutError(f"--extra_dp_size {extra_dp_size} must divide the world size {world}; "
                              f"valid: {', '.join(str(world // ep) for ep in ep_sizes)}")
        ep = world // extra_dp_size
        if num_experts % ep:
            raise LayoutError(
                f"--plugin ep_zero with --extra_dp_size {extra_dp_size} gives EP size {world}/{extra_dp_size}={ep}, "
                f"which does not divide the {num_experts} experts; valid --extra_dp_size for {world} processes: "
                f"{', '.join(str(world // e) for e in ep_sizes)}")
        return Layout(world=world, ep=ep, moe_dp=extra_dp_size, **common)

    # hybrid: pipeline x expert data parallel x expert parallel, one 1F1B pipeline per (moe_dp, ep) pair
    options = _hybrid_options(world, num_experts, num_layers, zero_stage)
    hint = f"; sizes that work for {world} processes: {'; '.join(options)}" if options else ""
    if zero_stage == 2:
        raise LayoutError("--plugin hybrid cannot use --zero_stage 2: the 1F1B schedule accumulates gradients over "
                          "micro-batches and ZeRO-2 would reduce-scatter (and drop) each one; use --zero_stage 0 or 1")
    if min(pp_size, dp_size, ep_size) < 1 or pp_size * dp_size * ep_size != world:
        raise LayoutError(f"--pp_size {pp_size} x --dp_size {dp_size} x --ep_size {ep_size} = "
                          f"{pp_size * dp_size * ep_size}, but the world size is {world}{hint}")
    if num_experts % ep_size:
        raise LayoutError(f"--ep_size {ep_size} does not divide the {num_experts} experts{hint}")
    if pp_size > num_layers:
        raise LayoutError(f"--pp_size {pp_size} stages need at least one of the {num_layers} layers each{hint}")
    if pp_size > 1:
        if microbatch_size is None or microbatch_size < 1:
            raise LayoutError("a pipeline needs --microbatch_size >= 1")
        if batch_size is not None:
            if batch_size % microbatch_size:
                raise LayoutError(f"--batch_size {batch_size} is not a multiple of --microbatch_size "
                                  f"{microbatch_size}")
            if batch_size // microbatch_size < pp_size:
                raise LayoutError(
                    f"1F1B needs at least as many micro-batches as stages: --batch_size {batch_size} / "
                    f"--microbatch_size {microbatch_size} = {batch_size // microbatch_size} < --pp_size {pp_size}; "
                    f"use --batch_size >= {pp_size * microbatch_size}")
    return Layout(world=world, pp=pp_size, ep=ep_size, moe_dp=dp_size, microbatch_size=microbatch_size, **common)
