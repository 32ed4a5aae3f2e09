"""What every kernel test shares: the tolerance table's check, for the interpreter runs of the kernels."""

from __future__ import annotations

import torch

from k2c.runtime.kernels import TOLERANCES

DTYPES = (torch.float32, torch.float16)  # what the interpreter computes right (its bf16 dot products are not)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[str(dtype).removeprefix("torch.")]


def assert_close(what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """got within the tolerance of `dtype` (got's by default) of want, as max |got - want| against max |want|."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    atol, rtol = tolerance(dtype or got.dtype)
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= atol + rtol * scale, f"{what}: max abs error {err:.3g} over a max of {scale:.3g}"
