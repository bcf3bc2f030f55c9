"""Addresses a TensorRT execution context may be given: 256-byte aligned, contiguous.

TensorRT requires every I/O address to be aligned to 256 bytes (the CUDA
runtime's allocations are). A slice of a larger tensor along the batch
starts `start * row bytes` into it, which is not aligned unless the row size
is a multiple of 256: such a slice is copied into an aligned buffer before it
is bound (an output is bound to an aligned buffer and copied back after).
"""

from __future__ import annotations

import torch

ALIGNMENT = 256


def is_aligned(t: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    """Whether `t`'s first element (any shape, any dtype) sits on an `alignment`-byte boundary."""
    return t.data_ptr() % alignment == 0


def aligned_empty(shape, dtype: torch.dtype, device, alignment: int = ALIGNMENT) -> torch.Tensor:
    """A new contiguous tensor whose first element sits on an `alignment`-byte boundary, whatever the allocator gives."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= int(d)
    raw = torch.empty(numel * itemsize + alignment, dtype=torch.uint8, device=device)
    skip = (-raw.data_ptr()) % alignment
    return raw[skip : skip + numel * itemsize].view(dtype).view(tuple(shape))


def bindable(t: torch.Tensor, alignment: int = ALIGNMENT) -> torch.Tensor:
    """`t` itself when contiguous and aligned, else an aligned contiguous copy of it (same shape and dtype)."""
    if t.is_contiguous() and is_aligned(t, alignment):
        return t
    out = aligned_empty(t.shape, t.dtype, t.device, alignment)
    out.copy_(t)
    return out


def slice_offset_bytes(shape, dtype: torch.dtype, batch_slice: slice) -> int:
    """Bytes from the start of a contiguous [B, ...] tensor to the first element of `batch_slice`."""
    row = torch.empty((), dtype=dtype).element_size()
    for d in shape[1:]:
        row *= int(d)
    return (batch_slice.start or 0) * row
