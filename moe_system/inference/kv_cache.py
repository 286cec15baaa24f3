"""A KV cache allocated once at the generation's full length and written in place.

transformers' DynamicCache grows by torch.cat on every token: each step copies the whole cache so far, O(T^2)
bytes over a generation of T tokens. Here each layer owns [B, heads, max_len, head_dim] buffers; a step writes
its new keys and values at the current length and returns views of the filled prefix. The attention therefore
sees exactly the tensors DynamicCache would give it (same shapes, same values), so masks and left padding are
unchanged. The length is a Python int, so slicing needs no host sync, and the layers are not marked
compileable, so generate() does not switch to torch.compile as it would for transformers' StaticCache.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PreallocatedLayer(CacheLayerMixin):
    is_croppable = True

    def __init__(self, max_cache_len: int):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Allocated at the first update, on the device and in the dtype of that layer's keys: a dispatched model
        # keeps each layer's cache beside the layer.
        batch, heads, _, head_dim = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty(batch, heads, self.max_cache_len, head_dim)
        self.values = value_states.new_empty(batch, heads, self.max_cache_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_cache_len:
            raise ValueError(f"the KV cache holds {self.max_cache_len} tokens; {end} do not fit")
        self.keys[:, :, self.length:end].copy_(key_states)
        self.values[:, :, self.length:end].copy_(value_states)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.length = 0  # what lies past the length is never read: no need to zero it

    def crop(self, max_length: int) -> None:
        """Keep the first max_length tokens; a negative max_length drops that many from the end."""
        self.length = min(self.length, max_length if max_length >= 0 else self.length + max_length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))


class PreallocatedCache(Cache):
    def __init__(self, num_layers: int, max_cache_len: int):
        super().__init__(layers=[PreallocatedLayer(max_cache_len) for _ in range(num_layers)])
