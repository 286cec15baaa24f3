"""Worker: which tensors handed to torch.distributed collectives would be on the host in a GPU run (torchrun, gloo).

Usage: torchrun --nproc_per_node N tests/workers/collective_devices.py OUT_DIR TRAIN_FLAGS...

NCCL takes device tensors only; gloo takes anything, and on a CPU-only machine every tensor is on the CPU. So a
torch function mode follows where each tensor would live with a GPU. The accelerator's current device is
reported as cpu:0, a device name of its own (tensors made for it still live on the CPU), and a tensor is "host"
when a GPU run would leave it there:
  * made by a factory (torch.tensor, zeros, arange, empty, ...) with no device or a plain "cpu" one, by
    torch.from_numpy or torch.load, or by .cpu() / .to("cpu") (a copy where the CPU call returns the tensor
    itself, so that the original keeps its place);
  * any other op: host when every tensor it takes is (a host scalar beside a device tensor gives a device
    tensor on a GPU too); an op returning one of its inputs (in place, out=) leaves that tensor's tag alone;
  * .to(cpu:0) gives a device tensor, and `x.device` says cpu:0 for one, so `device=x.device` means what it
    means on a GPU;
  * a parameter is host or not as the tensor it was made from, and `p.data = x` gives p the tag of x: the
    plugin's own move (HybridParallelModule.__init__, `module.to(get_accelerator().get_current_device())`,
    colossalai/booster/plugin/hybrid_parallel_plugin.py) is what takes the model to the device, as on a GPU.
    Gradients made by autograd are read through `.grad`, which gives them their parameter's place.
Every collective records each host tensor it is given (op, dtype, shape, the innermost moe_system/ or
colossalai/ frame of the call); collectives called inside another one are not checked again. The *_object
collectives pickle on the host under gloo and on the current device under NCCL, which torch chooses itself,
so what they call inside is not checked.

After the run, a control under the same mode: all_reduce_values on host values (moved: nothing to report),
then an all_reduce of a tensor made without a device (one finding). Rank r writes OUT_DIR/rank{r}.json:
{"calls": {op: count}, "violations": [...], "control": [...]}.
"""

import collections
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

COMM_DEVICE = torch.device("cpu", 0)
DEVICE_GET, DATA_SET = torch.Tensor.device.__get__, torch.Tensor.data.__set__  # compared with ==: made anew on access
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_coalesced", "all_gather_into_tensor",
               "all_gather_single", "broadcast", "all_to_all", "all_to_all_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "gather", "scatter", "reduce", "send", "recv",
               "isend", "irecv", "batch_isend_irecv")
OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list")

host = WeakIdKeyDictionary()  # tensor -> True: would be on the host in a GPU run
calls = collections.Counter()
violations = []
inside = [0]  # depth of wrapped calls: torch's collectives call each other (and re-enter through the mode)


def mark(tensor, is_host: bool) -> None:
    if is_host:
        host[tensor] = True
    else:
        host.pop(tensor, None)


def is_host_device(device) -> bool:
    device = torch.device(device)
    return device.type == "cpu" and device.index is None


def tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class HostTensors(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == DEVICE_GET:
            device = func(*args)
            return (torch.device("cpu") if args[0] in host else COMM_DEVICE) if device.type == "cpu" else device
        if func == DATA_SET:
            func(*args)
            mark(args[0], args[1] in host)
            return None
        result = func(*args, **kwargs)
        inputs = tensors((args, kwargs))
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            self_, target = args[0], None
            if func is torch.Tensor.cpu:
                target = True
            elif any(isinstance(a, torch.Tensor) for a in args[1:]):  # .to(other): other's place
                target = next(a for a in args[1:] if isinstance(a, torch.Tensor)) in host
            else:
                options = {k: v for k, v in kwargs.items() if k != "copy"}  # _parse_to knows no copy
                device = torch._C._nn._parse_to(*args[1:], **options)[0]
                target = None if device is None else is_host_device(device)
            if target is not None:
                if result is self_ and (self_ in host) != target:  # a move on a GPU: a new tensor
                    result = result.clone()
                mark(result, target)
                return result
        if kwargs.get("device") is not None:
            is_host = is_host_device(kwargs["device"])
        else:
            is_host = all(t in host for t in inputs)  # no tensor input: a factory on the default device, the host
        for out in tensors(result):
            if not any(out is t for t in inputs):
                mark(out, is_host)
        return result


def caller() -> str:
    frames = traceback.extract_stack()[:-3]  # without caller, record and the wrapper
    for frame in reversed(frames):
        for package in ("/moe_system/", "/colossalai/"):
            if package in frame.filename:
                path = frame.filename[frame.filename.rindex(package) + 1:]
                return f"{path}:{frame.lineno} ({frame.name})"
    return f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})"


def record(name: str, args, kwargs) -> None:
    calls[name] += 1
    found = tensors((args, kwargs))
    found += [op.tensor for op in tree_flatten(args)[0] if isinstance(op, dist.P2POp)]
    for tensor in found:
        if tensor in host:
            violations.append({"op": name, "dtype": str(tensor.dtype), "shape": list(tensor.shape), "at": caller()})


def checked(name: str, collective):
    def call(*args, **kwargs):
        if name in COLLECTIVES and not inside[0]:
            record(name, args, kwargs)
        inside[0] += 1
        try:
            return collective(*args, **kwargs)
        finally:
            inside[0] -= 1
    return call


def from_numpy(array):
    tensor = _from_numpy(array)
    mark(tensor, True)
    return tensor


def parameter_new(cls, data=None, requires_grad=True):
    param = _parameter_new(cls, data, requires_grad)
    mark(param, data is None or data in host)
    return param


# Before anything imports torch.distributed's functions by name (Colossal-AI 0.5.0 imports none of them).
for _name in COLLECTIVES + OBJECT_COLLECTIVES:
    _wrapped = checked(_name, getattr(distributed_c10d, _name))
    setattr(distributed_c10d, _name, _wrapped)
    setattr(dist, _name, _wrapped)
_from_numpy, torch.from_numpy = torch.from_numpy, from_numpy
_parameter_new = torch.nn.Parameter.__new__
torch.nn.Parameter.__new__ = staticmethod(parameter_new)
HostTensors().__enter__()  # module-level tensors of what is imported below are made under the mode too

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(TESTS)]
from moe_system.parallel import accelerator  # noqa: E402
from moe_system.parallel.comm import all_reduce_values  # noqa: E402
from moe_system.training import interrupt  # noqa: E402
from moe_system.training.args import parse_args  # noqa: E402
from moe_system.training.loop import train  # noqa: E402

# What a GPU's get_current_device() is to the mode: a device that is not the host's.
accelerator.CpuZeroAccelerator.get_current_device = lambda self: COMM_DEVICE


def control() -> list[dict]:
    """Findings of a moved and an unmoved small reduction: exactly the unmoved one's, if the mode works."""
    violations.clear()
    all_reduce_values(torch.zeros(1), dist.group.WORLD)
    dist.all_reduce(torch.zeros(1))
    return list(violations)


def main():
    out_dir = sys.argv[1]
    interrupt.install()
    train(parse_args(sys.argv[2:]))
    found, seen = list(violations), dict(calls)
    result = {"calls": seen, "violations": found, "control": control()}
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
