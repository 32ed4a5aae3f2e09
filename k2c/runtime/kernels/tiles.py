"""Triton helpers on register tiles that more than one kernel family uses."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def column_halves(tile, ROWS: tl.constexpr, HALF: tl.constexpr):
    """A [ROWS, 2 HALF] tile as its left and right [ROWS, HALF] halves: an epilogue that works on one half at a
    time needs half the registers (or shared memory) for its temporaries."""
    return tl.split(tl.permute(tl.reshape(tile, (ROWS, 2, HALF)), (0, 2, 1)))
