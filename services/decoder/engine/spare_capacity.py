"""A DynamicCache layer that appends in place, into columns reserved past its end.

transformers' `DynamicLayer.update` concatenates, so every forward copies the layer's whole
cache to add its new columns. At 16 rows x 3,400 cached tokens on the default model that copy
(`aten::cat`) is ~0.55 s of a ~0.9 s step, at every width. `SpareCapacityLayer` keeps a buffer
[B, H_kv, capacity, D] per tensor and holds `keys` / `values` as its prefix views
buffer[:, :, :length]. An update that fits writes its columns in place; one that does not
allocates length + new + max(`spare_columns`, new) columns and copies once.

Everything else done to a cache keeps working, because it goes through `keys` / `values`:
- `crop` slices, and the slice is still a prefix of the buffer: the next update writes over
  the cut columns;
- `keep_accepted` writes kept columns in place, into the buffer;
- whatever assigns new tensors (compact's gather, append_rows' cat, `batch_select_indices`,
  a caller's prefix cache) leaves the layer holding a tensor that is not its buffer's prefix.
  The buffer is dropped at once (no second copy held), and the next update adopts the tensor
  with one copy, as DynamicLayer would have paid anyway.

Columns past `length` are never read: attention, masks and `get_seq_length` see only the
view. A tensor the layer was given is never written: the first update copies it into a
buffer of the layer's own.

>>> import torch
>>> layer = SpareCapacityLayer(spare_columns=4)
>>> keys, _ = layer.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8))
>>> tuple(keys.shape), layer.capacity
((1, 2, 3, 8), 7)
>>> buffer = layer.keys.data_ptr()
>>> _ = layer.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))  # fits: in place
>>> layer.get_seq_length(), layer.keys.data_ptr() == buffer
(7, True)
>>> layer.crop(-2)  # a view of the same buffer
>>> _ = layer.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))  # 5 + 3 > 7: grows
>>> layer.get_seq_length(), layer.capacity
(8, 12)
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _is_prefix_view(tensor: torch.Tensor | None, buffer: torch.Tensor | None) -> bool:
    """Whether `tensor` is buffer[:, :, :n] for some n (same storage start, strides and other dims)."""
    if tensor is None or buffer is None or tensor.dim() != 4:
        return False
    return (
        tensor.data_ptr() == buffer.data_ptr()
        and tensor.stride() == buffer.stride()
        and tensor.shape[:2] == buffer.shape[:2]
        and tensor.shape[3] == buffer.shape[3]
        and tensor.shape[2] <= buffer.shape[2]
    )


class _BufferedTensor:
    """A layer's `keys` or `values`: stored as `_<name>`; assigning a tensor that is not a prefix
    view of the layer's `_<name>_buffer` drops that buffer."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot, self.buffer = f"_{name}", f"_{name}_buffer"

    def __get__(self, layer, owner: type | None = None):
        return self if layer is None else getattr(layer, self.slot)

    def __set__(self, layer, tensor: torch.Tensor | None) -> None:
        setattr(layer, self.slot, tensor)
        if not _is_prefix_view(tensor, getattr(layer, self.buffer)):
            setattr(layer, self.buffer, None)


class SpareCapacityLayer(DynamicLayer):
    """A DynamicLayer whose updates write in place while its buffer has room."""

    def __init__(self, spare_columns: int) -> None:
        if spare_columns < 0:
            raise ValueError(f"spare_columns must be >= 0, got {spare_columns}")
        self.spare_columns = spare_columns
        self._keys_buffer: torch.Tensor | None = None  # [B, H_kv, capacity, D]
        self._values_buffer: torch.Tensor | None = None
        super().__init__()

    # Assigning a foreign tensor releases the buffer at once (see _BufferedTensor); transformers'
    # own methods (crop, batch_select_indices, reset) assign them too.
    keys = _BufferedTensor()
    values = _BufferedTensor()

    @property
    def capacity(self) -> int:
        """Columns the buffer holds (0 before the first update or after a foreign assignment)."""
        return 0 if self._keys_buffer is None else self._keys_buffer.shape[2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, self._keys_buffer = self._append(self._keys, key_states, self._keys_buffer)
        values, self._values_buffer = self._append(self._values, value_states, self._values_buffer)
        # prefix views of the buffers just written: stored directly, the setter's check would only repeat it
        self._keys, self._values = keys, values
        return keys, values

    def _append(self, held: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """held [B, H, L, D] (or lazy_initialization's empty 1-D tensor) and new [B, H, Q, D]
        -> (the view [B, H, L + Q, D], the buffer it lies in)."""
        length = held.shape[2] if held.dim() == 4 else 0
        end = length + new.shape[2]
        if not _is_prefix_view(held, buffer) or end > buffer.shape[2] or buffer.shape[:2] != new.shape[:2]:
            # At least this update's own width in reserve: a prefill in equal chunks then
            # copies on every other chunk, not every one.
            reserve = max(self.spare_columns, new.shape[2])
            buffer = new.new_empty((new.shape[0], new.shape[1], end + reserve, new.shape[3]))
            if length:
                buffer[:, :, :length] = held
        buffer[:, :, length:end] = new
        return buffer[:, :, :end], buffer


def with_spare_capacity(cache: DynamicCache, spare_columns: int) -> DynamicCache:
    """`cache` with each plain full-attention layer replaced, in place, by a SpareCapacityLayer
    holding the same tensors (not copied now: the first update does); returns `cache`.
    Layers added later (a cache built without a config) are SpareCapacityLayers too."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            spare = SpareCapacityLayer(spare_columns)
            if layer.is_initialized:
                spare.dtype, spare.device, spare.is_initialized = layer.dtype, layer.device, True
                spare.keys, spare.values = layer.keys, layer.values
            cache.layers[index] = spare
        # other kinds (sliding, linear attention) stay: check_cache decides whether the engine takes them
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = functools.partial(SpareCapacityLayer, spare_columns)
    return cache
