"""The training data of a run: its rows (map-style, streamed, or a weighted mix of sources), the loader over them,
how many steps they make, and where in them a run stands.

The position is TrainState.consumed: the step-sized groups of batches drawn so far, skipped steps included. A
resumed run continues from it: map-style data through the sampler's epoch and offset, streamed data by skipping
the rows this rank already read.
"""

import torch
import torch.distributed as dist

from ..data import DataError, build_dataset, load_records
from ..data.mixture import MixtureRows, SourceTokenCounter, StreamingRows, parse_sources, source_label, \
    streaming_files
from ..data.records import is_hub_dataset
from ..data.synthetic import SyntheticTokens
from ..data.ul2 import OPENMOE_UL2_WEIGHTS, UL2Rows
from .sampler import ResumableDistributedSampler


class TrainData:
    def __init__(self, args, dataset, loader, token_counter, steps_per_epoch: int | None, total_steps: int):
        self.args, self.dataset, self.loader, self.token_counter = args, dataset, loader, token_counter
        self.steps_per_epoch = steps_per_epoch  # None when streaming: endless, --max_steps bounds the run
        self.total_steps = total_steps
        self.rows_per_step = args.grad_accum_steps * args.batch_size  # per data-parallel rank

    def describe(self) -> str:
        return f"streaming {self.args.dataset}" if self.args.streaming else f"{len(self.dataset)} rows"

    def batches(self, state):
        """Endless step-sized groups of micro-batches, from the position state.consumed (read at each pass)."""
        while True:
            if self.steps_per_epoch:
                epoch, done_in_epoch = divmod(state.consumed, self.steps_per_epoch)
                # The reference never called set_epoch (same order every epoch); a resumed run restarts mid-epoch.
                self.loader.sampler.set_epoch(epoch, done_in_epoch * self.rows_per_step)
            yield from micro_batch_groups(self.loader, self.args.grad_accum_steps)
            if self.args.streaming:  # endless unless a rank's records were all malformed and skipped
                raise DataError(f"--streaming: {self.args.dataset} gave no usable record to data-parallel rank "
                                f"{self.dataset.rank}")

    def count_tokens(self, micro_batches: list[dict]) -> None:
        if self.token_counter:
            for micro_batch in micro_batches:
                self.token_counter.update(micro_batch)

    def token_stats(self, dp_group) -> dict:
        return self.token_counter.stats(dp_group) if self.token_counter else {}

    def state_dict(self, consumed: int, dp_group) -> dict:
        """The position's derived values and the mix's token counts, for trainer_state.json."""
        state = {"epoch": consumed // self.steps_per_epoch if self.steps_per_epoch else None}
        if self.args.streaming:  # the same on every data-parallel rank: each reads batch_size rows per micro-batch
            state["stream_rows_per_rank"] = consumed * self.rows_per_step
        if self.token_counter:  # the totals over data-parallel ranks (a collective: every rank saves)
            state["source_tokens"] = self.token_counter.state_dict(dp_group)
        return state

    def load_state_dict(self, saved: dict, consumed: int, dp_group) -> None:
        if self.token_counter and "source_tokens" in saved:
            self.token_counter.load_state_dict(saved["source_tokens"], dp_group)
        if self.args.streaming:  # the rows this rank consumed before the checkpoint
            self.dataset.skip_rows = saved.get("stream_rows_per_rank") or consumed * self.rows_per_step


def build_train_data(args, tokenizer, config, plugin, layout) -> TrainData:
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
    # Page-locked batches: their non_blocking copies to the GPU (forward_backward.py) never wait for the device.
    pin = torch.cuda.is_available()
    if args.streaming:  # sampler-free and endless: no epochs, --max_steps bounds the run (args.py)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, drop_last=True, pin_memory=pin)
        return TrainData(args, dataset, loader, token_counter, None, args.max_steps)
    loader = plugin.prepare_dataloader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                       seed=args.seed, distributed_sampler_cls=ResumableDistributedSampler,
                                       pin_memory=pin)
    steps_per_epoch = len(loader) // args.grad_accum_steps
    if steps_per_epoch == 0:
        raise DataError(f"{len(dataset)} training rows are fewer than one global batch of {args.batch_size} x "
                        f"{args.grad_accum_steps} accumulation x {layout.dp_size} data-parallel ranks; "
                        f"lower --batch_size or --grad_accum_steps")
    total_steps = steps_per_epoch * args.num_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    return TrainData(args, dataset, loader, token_counter, steps_per_epoch, total_steps)


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


def micro_batch_groups(dataloader, size: int):
    """Consecutive groups of `size` batches: one group per optimizer step (a trailing partial group is dropped)."""
    group = []
    for batch in dataloader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
