"""Offloaded experts that copy only the experts the router chose.

accelerate's offload hook copies every weight of a module to the execution device before its forward: for an MoE
layer's stacked experts that is all E experts (8B: ~4.3 GB per layer per decoded token), though a token uses top-k
of them. The experts' forward is given the expert-sorted rows and the row count of each expert, so the experts
that have rows are known before any expert GEMM: only their slices of wi_gate, wi_up and wo are read from where
the weights are kept (CPU memory or the safetensors on disk) and copied, through pinned memory on CUDA so that the
copy is asynchronous to the host. The GEMMs then run on those experts alone, with the zero counts left out: each
row still meets exactly its own expert's weights.
"""

import torch
from accelerate.hooks import remove_hook_from_module
from safetensors import safe_open

from ..moe.experts import expert_ffn

EXPERT_WEIGHTS = ("wi_gate", "wi_up", "wo")


def stored_rows(weights_map, name: str, chosen: list[int]) -> torch.Tensor:
    """Rows `chosen` of an offloaded tensor, reading no more than they need where the storage allows it."""
    loader, key = weights_map.dataset, weights_map.prefix + name  # accelerate's PrefixedDataset
    info = getattr(loader, "index", {}).get(key, {})
    if key not in getattr(loader, "state_dict", {}) and info.get("safetensors_file") is not None:
        with safe_open(info["safetensors_file"], framework="pt", device="cpu") as f:
            stored = f.get_slice(info.get("weight_name", key))
            rows = torch.cat([stored[e:e + 1] for e in chosen])
        return rows.to(getattr(torch, info["dtype"])) if "dtype" in info else rows
    return weights_map[name][chosen]  # in CPU memory (or a converted .dat file): index what is there


class ChosenExpertsFetch:
    """The forward of an offloaded GroupedExperts: fetch the chosen experts, run them on execution_device."""

    def __init__(self, experts, weights_map, execution_device):
        self.experts = experts
        self.weights_map = weights_map
        self.device = torch.device(execution_device)
        self.bytes_copied = 0  # expert weight bytes brought to the execution device so far

    def fetch(self, name: str, chosen: list[int]) -> torch.Tensor:
        rows = stored_rows(self.weights_map, name, chosen)
        self.bytes_copied += rows.numel() * rows.element_size()
        if self.device.type != "cuda":
            return rows.to(self.device)
        pinned = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True).copy_(rows)
        return pinned.to(self.device, non_blocking=True)  # ordered before the GEMMs on the same stream

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # The one host sync of an offloaded layer: the copy has to know which experts to read.
        chosen = counts.nonzero().flatten().tolist()
        weights = [self.fetch(name, chosen) for name in EXPERT_WEIGHTS]
        index = torch.tensor(chosen, dtype=torch.long, device=counts.device)
        out = expert_ffn(rows.to(self.device), counts[index].to(self.device), *weights, self.experts.impl)
        return out.to(rows.device)


def fetch_only_chosen_experts(model) -> list[ChosenExpertsFetch]:
    """Every MoE layer whose experts accelerate offloads (their own hook with offload on) gets a ChosenExpertsFetch
    forward instead of that hook; their parameters stay on the meta device. Returns the fetchers."""
    fetchers = []
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if not name.endswith(".mlp.experts") or not getattr(hook, "offload", False):
            continue
        fetch = ChosenExpertsFetch(module, hook.weights_map, hook.execution_device)
        remove_hook_from_module(module)
        module.forward = fetch
        fetchers.append(fetch)
    return fetchers
