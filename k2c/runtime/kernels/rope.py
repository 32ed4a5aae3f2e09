"""Rotary position embedding's torch reference: the rotation that k2c.runtime.kernels.attention_inputs fuses with
MLA's q/k/v layout (one pass each way), and the oracle of its tests."""

from __future__ import annotations

import torch


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the pairs of x [..., seq, dr] by cos/sin [seq, dr/2].

    Interleaved pairs are dims (0, 1), (2, 3), ...; the others pair dim i with i + dr/2. Either way the result is
    [first of each pair, second of each pair].
    """
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
