"""Counting, on the CPU, the calls that make a CUDA run wait for the device (host synchronisations).

On CUDA such a call reads a device value back to the host, or sizes its output from device data: the host then
stops queueing work until the device has caught up. The same calls run on the CPU without waiting, so they are
recognised by what they are, at two levels:

* Python (TorchFunctionMode): .tolist(), .numpy() and .cpu(), which never reach the dispatcher for CPU tensors.
* aten (TorchDispatchMode), inside autograd's backward too: scalar reads (.item(), float(t), int(t), bool(t),
  `if t:`), and ops whose output size depends on the data (nonzero, masked_select, unique, bincount,
  boolean-mask indexing, repeat_interleave without output_size), plus equal (a bool on the host).

Not counted: host-to-device copies (the CPU run has none), which only block the host when the source is paged
memory without non_blocking; and reads inside torch.optim, whose non-fused optimizers keep their step counters on
the host even on CUDA (reading them waits for nothing).
"""

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
REPO = Path(__file__).resolve().parents[1]

HOST_READ_METHODS = {"tolist", "numpy", "cpu"}
# Always a sync on CUDA: the op's result is a host value, or its size is computed from the data. bincount reads
# its input's min and max back even with minlength.
ALWAYS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
          aten.bincount.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
          aten.equal.default}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _syncs(func, args, kwargs) -> bool:
    if func in ALWAYS:
        return True
    if func in INDEX_OPS:  # a boolean mask index becomes nonzero() inside the kernel
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if func is aten.repeat_interleave.Tensor:  # the output size is repeats.sum() unless given
        return kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None)
    return False


TORCH_OPTIM = Path(torch.optim.__file__).parent


def _in_torch_optim() -> bool:
    return any(Path(f.filename).is_relative_to(TORCH_OPTIM) for f in traceback.extract_stack())


def _where() -> str:
    """The innermost frame of the package (else of the tests): the line that asked for the value."""
    frames = [(Path(f.filename), f.lineno) for f in reversed(traceback.extract_stack()) if f.filename != __file__]
    for top in ("moe_system", "tests"):
        for path, line in frames:
            if path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] == top:
                return f"{path.relative_to(REPO)}:{line}"
    return "outside the repository"


class _Functions(TorchFunctionMode):
    def __init__(self, locations: Counter):
        super().__init__()
        self.locations = locations

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", None) in HOST_READ_METHODS and getattr(func, "__objclass__", None) is not None
                and not _in_torch_optim()):
            self.locations[f"{func.__name__} at {_where()}"] += 1
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, locations: Counter):
        super().__init__()
        self.locations = locations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs) and not _in_torch_optim():
            self.locations[f"{func.__name__} at {_where()}"] += 1
        return func(*args, **kwargs)


class HostSyncCounter:
    """with HostSyncCounter() as syncs: ...; then syncs.count and syncs.locations ({"op at file:line": n})."""

    def __enter__(self):
        self.locations = Counter()
        self._modes = [_Functions(self.locations), _Ops(self.locations)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False

    @property
    def count(self) -> int:
        return sum(self.locations.values())
