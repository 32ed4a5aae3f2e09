"""Rotary position embedding, forward and backward, as one fused Triton kernel beside its torch reference.

Eager torch multiplies and adds the halves of the pairs in six kernels and concatenates the results, and the
backward retraces all of it; here each direction is one pass that reads its input once and writes its output
once. The backward of a rotation is the rotation by minus the angle, with the two layouts swapped, so one kernel
serves both directions.

The rotary part of q and k is a slice of a bigger projection, seen through a transpose: the kernel reads x through
its strides rather than copying it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 2048  # pairs a program rotates: whole rows of pairs, stacked to this many


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


@triton.jit
def _rope_kernel(
    x_ptr,  # [A, B, seq, dr], strided: the pairs to rotate
    cos_ptr,  # [seq, dr / 2], contiguous
    sin_ptr,  # [seq, dr / 2], contiguous
    y_ptr,  # [A, B, seq, dr], strided: the rotated pairs
    B,
    seq,
    half,  # dr / 2: pairs per position
    stride_xa, stride_xb, stride_xt, stride_xd,
    stride_ya, stride_yb, stride_yt, stride_yd,
    X_INTERLEAVED: tl.constexpr,  # x's pairs are dims (2i, 2i + 1); otherwise (i, i + half)
    Y_INTERLEAVED: tl.constexpr,  # the same for y
    INVERSE: tl.constexpr,  # rotate by minus the angle
    BLOCK_T: tl.constexpr,  # positions per program
    BLOCK_H: tl.constexpr,  # half rounded up to a power of two
):
    # program p rotates positions [t0, t0 + BLOCK_T) of the (a, b)-th [seq, dr] matrix
    pid = tl.program_id(0)
    t_tiles = tl.cdiv(seq, BLOCK_T)
    ab, t0 = pid // t_tiles, (pid % t_tiles) * BLOCK_T
    a, b = (ab // B).to(tl.int64), (ab % B).to(tl.int64)  # a * stride_xa can pass 2**31
    t = t0 + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_H)
    mask = (t < seq)[:, None] & (i < half)[None, :]

    cos = tl.load(cos_ptr + t[:, None] * half + i[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t[:, None] * half + i[None, :], mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin

    if X_INTERLEAVED:
        x1_dim, x2_dim = 2 * i, 2 * i + 1
    else:
        x1_dim, x2_dim = i, i + half
    x_row = x_ptr + a * stride_xa + b * stride_xb + t[:, None] * stride_xt
    x1 = tl.load(x_row + x1_dim[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + x2_dim[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)

    if Y_INTERLEAVED:
        y1_dim, y2_dim = 2 * i, 2 * i + 1
    else:
        y1_dim, y2_dim = i, i + half
    y_row = y_ptr + a * stride_ya + b * stride_yb + t[:, None] * stride_yt
    tl.store(y_row + y1_dim[None, :] * stride_yd, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + y2_dim[None, :] * stride_yd, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """[..., seq, dr] as [A, B, seq, dr]: a view for up to two leading dims; more are merged by a reshape."""
    if t.ndim > 4:
        return t.reshape(-1, *t.shape[-3:])
    return t[(None,) * (4 - t.ndim)]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, y: torch.Tensor, x_interleaved: bool,
            y_interleaved: bool, inverse: bool) -> None:
    """Write into y the pairs of x rotated by the angles of cos/sin (minus them if `inverse`)."""
    x4, y4 = _as_4d(x), _as_4d(y)
    a, b, seq, dr = x4.shape
    block_h = triton.next_power_of_2(dr // 2)
    block_t = max(1, TILE // block_h)
    grid = (a * b * triton.cdiv(seq, block_t),)
    _rope_kernel[grid](x4, cos, sin, y4, b, seq, dr // 2, *x4.stride(), *y4.stride(),
                       X_INTERLEAVED=x_interleaved, Y_INTERLEAVED=y_interleaved, INVERSE=inverse,
                       BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        y = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(x.dtype, cos.dtype))
        _rotate(x, cos, sin, y, x_interleaved=interleaved, y_interleaved=False, inverse=False)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.x_dtype = interleaved, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        # y = R x with R orthogonal per pair, so dx = R^T dy: dy's halves rotated back into x's layout
        dx = torch.empty(dy.shape, device=dy.device, dtype=ctx.x_dtype)
        _rotate(dy, cos, sin, dx, x_interleaved=False, y_interleaved=ctx.interleaved, inverse=True)
        return dx, None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """`rope_reference(x, cos, sin, interleaved)` as a fused kernel; differentiable in x (cos and sin are constants).

    x [..., seq, dr] is read through its strides when it has at most two leading dims (q's rotary slice
    [b, h, seq, dr], k's [b, 1, seq, dr]); more leading dims are merged first, which copies when they do not merge
    into one stride. The result is a new contiguous tensor, in x's dtype promoted with cos's, as the reference's.
    """
    if x.dtype not in DTYPES or cos.dtype not in DTYPES:
        raise ValueError(f"rope: x and cos must be fp32, bf16 or fp16, found {x.dtype} and {cos.dtype}")
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"rope: x must be [..., seq, dr] with dr even, found shape {tuple(x.shape)}")
    seq, dr = x.shape[-2:]
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (seq, dr // 2):
            raise ValueError(f"rope: {name} must have shape ({seq}, {dr // 2}) for x of shape {tuple(x.shape)}, "
                             f"found {tuple(t.shape)}")
        if t.dtype != cos.dtype or t.device != x.device:
            raise ValueError(f"rope: {name} must be {cos.dtype} on {x.device}, found {t.dtype} on {t.device}")
        if t.requires_grad:
            raise ValueError(f"rope: {name} is taken as a constant and gets no gradient, but it requires one")
    if x.numel() == 0:
        raise ValueError(f"rope: x is empty, shape {tuple(x.shape)}")
    return _Rope.apply(x, cos.contiguous(), sin.contiguous(), interleaved)
