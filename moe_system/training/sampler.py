"""A DistributedSampler that can start an epoch part-way, so a resumed run sees exactly the batches it missed."""

from torch.utils.data import DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Shuffle for this epoch (same permutation as an uninterrupted run) and skip its first start_index samples."""
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index
