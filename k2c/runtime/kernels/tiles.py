"""What more than one kernel family uses: Triton helpers on register tiles, and the pieces of a tensor descriptor."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors a kernel makes on the device (Triton asks for it per launch): give it
    to `triton.set_allocator` before such a launch."""
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRETED else torch.cuda.current_device())


def addressable(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address t: its last dim contiguous, its other strides and its start on
    16-byte boundaries (the tensor memory accelerator's rule)."""
    size = t.element_size()
    return (t.stride(-1) == 1 and all(s * size % 16 == 0 for s in t.stride()[:-1])
            and t.data_ptr() % 16 == 0)


@triton.jit
def column_halves(tile, ROWS: tl.constexpr, HALF: tl.constexpr):
    """A [ROWS, 2 HALF] tile as its left and right [ROWS, HALF] halves: an epilogue that works on one half at a
    time needs half the registers (or shared memory) for its temporaries."""
    return tl.split(tl.permute(tl.reshape(tile, (ROWS, 2, HALF)), (0, 2, 1)))
