"""RMSNorm, forward and backward, as fused Triton kernels beside the torch reference they must match.

Eager torch spends about ten kernels and as many round trips through memory on a norm and its gradient; here the
forward is one pass over x and the backward one pass over x and dy, plus a small reduction of the weight gradient.
The weight gradient is summed per program into its own row of partial sums and those rows are then added up in
torch: no atomics, so the result is the same on every run.

`add_rmsnorm` folds the residual add before a norm into the same kernels (`ADD`): the forward also reads delta and
writes h = residual + delta, and the backward adds the gradient that h gets from its other consumer (the next
residual add) to the norm's, so that h's whole gradient, which is residual's and delta's, leaves in the same pass.
That saves the add's pass and autograd's sum of h's two gradients.

`copies` hands the norm's output out as that many tensors (views of one), one for each op that reads it
(fan_out_norms): autograd then hands the backward each reader's gradient apart, and the kernel sums them as it reads
them, where autograd would have run a pass over memory for each sum.

Numerics are the reference's: normalise in fp32, round to x's dtype, then multiply by the gain; h is the sum rounded
to the dtype, as torch's add rounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from k2c.runtime.kernels import RMSNORM_MAX_COPIES as MAX_COPIES  # dy pointers of the backward kernel
from k2c.runtime.kernels import RMSNORM_MAX_DIM as MAX_DIM  # a whole row is one tile: the mean needs all of it

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 4096  # elements a program holds: short rows are stacked until a tile is this full
FORWARD_PER_THREAD = 16
# The backward's reductions across a row and over its tiles run best with few warps: with 32 elements a thread
# (4 warps a tile) it took 0.27x the time of 8 a thread at [16384, 1536] (47 vs 170 us) and 0.30x at [16384, 512]
# (27 vs 88 us) on an H200: 3.2 TB/s at 1536, three quarters of a device-to-device copy's rate
BACKWARD_PER_THREAD = 32


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim: normalised in fp32, rounded to x's dtype, then scaled."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@triton.jit
def _rmsnorm_forward_kernel(
    x_ptr,  # [rows, dim], rows stride_x apart
    delta_ptr,  # [rows, dim], rows stride_delta apart: added to x (ADD only)
    w_ptr,  # [dim]
    h_ptr,  # [rows, dim], contiguous: x + delta in x's dtype, the rows that are normalised (ADD only)
    y_ptr,  # [rows, dim], contiguous
    rstd_ptr,  # [rows], fp32: 1 / rms of each row, kept for the backward
    rows,
    dim,
    stride_x,
    stride_delta,
    eps,
    ADD: tl.constexpr,  # normalise x + delta, and store that sum, instead of x
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # dim rounded up to a power of two
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    row_ok = row < rows
    mask = row_ok[:, None] & (col < dim)[None, :]
    row = row.to(tl.int64)  # rows * dim can pass 2**31

    x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    if ADD:
        delta = tl.load(delta_ptr + row[:, None] * stride_delta + col[None, :], mask=mask, other=0.0)
        # torch's add rounds the sum to the dtype, and the reference normalises that rounded sum
        h = (x + delta.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row[:, None] * dim + col[None, :], h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / dim + eps)
    tl.store(rstd_ptr + row, rstd, mask=row_ok)

    # the reference rounds the normalised row to x's dtype before the gain multiplies it
    n = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + col, mask=col < dim, other=0.0).to(tl.float32)
    tl.store(y_ptr + row[:, None] * dim + col[None, :], (n * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_backward_kernel(
    dy_ptr,  # [rows, dim], rows stride_dy apart
    dy2_ptr, dy3_ptr, dy4_ptr,  # [rows, dim] each, rows stride_dy2.. apart: the other readers' gradients (DYS > 1..)
    x_ptr,  # [rows, dim], rows stride_x apart
    w_ptr,  # [dim]
    rstd_ptr,  # [rows], fp32, from the forward
    dh_ptr,  # [rows, dim], rows stride_dh apart: the gradient x gets from its other consumers (ADD only)
    dx_ptr,  # [rows, dim], contiguous
    dw_partial_ptr,  # [programs, dim], fp32: row p is program p's share of the weight gradient
    rows,
    dim,
    stride_dy, stride_dy2, stride_dy3, stride_dy4,
    stride_x,
    stride_dh,
    DYS: tl.constexpr,  # how many of dy, dy2, dy3, dy4 to sum: y's whole gradient
    ADD: tl.constexpr,  # add dh into dx: x's whole gradient
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # dim rounded up to a power of two
):
    pid = tl.program_id(0)  # this program takes row tiles pid, pid + programs, pid + 2 * programs, ...
    programs = tl.num_programs(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < dim
    w = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)

    for tile in range(pid, tl.cdiv(rows, BLOCK_M), programs):
        row = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = row < rows
        mask = row_ok[:, None] & col_ok[None, :]
        row = row.to(tl.int64)
        x = tl.load(x_ptr + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if DYS > 1:
            dy += tl.load(dy2_ptr + row[:, None] * stride_dy2 + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if DYS > 2:
            dy += tl.load(dy3_ptr + row[:, None] * stride_dy3 + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if DYS > 3:
            dy += tl.load(dy4_ptr + row[:, None] * stride_dy4 + col[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)

        n = x * rstd[:, None]
        # y = w * round(n): w's gradient sees the rounded n; x's passes through the rounding unchanged
        dw += tl.sum(dy * n.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        dn = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n)) along the row
        dx = rstd[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / dim)[:, None])
        if ADD:
            dx += tl.load(dh_ptr + row[:, None] * stride_dh + col[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row[:, None] * dim + col[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

    tl.store(dw_partial_ptr + pid * dim + col, dw, mask=col_ok)


def _tile(dim: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, stacked to about TILE elements, about `per_thread` of them per
    thread."""
    block_n = triton.next_power_of_2(dim)
    block_m = max(1, TILE // block_n)
    return block_m, block_n, min(16, max(1, block_m * block_n // (32 * per_thread)))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., dim] as [rows, dim] with unit column stride: a view where one exists, else a contiguous copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _backward_programs(x: torch.Tensor, tiles: int) -> int:
    """Enough programs to fill the GPU, each looping over row tiles; every program adds one row of partial sums."""
    if x.is_cuda:
        return min(tiles, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(tiles, 4)  # the CPU interpreter runs programs one after another: any count is right, few is quick


def _forward(x_rows: torch.Tensor, weight: torch.Tensor, eps: float,
             delta_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, y, rstd) over rows [rows, dim]: h the rows normalised, x itself or with delta a new x + delta; y their
    norm; rstd [rows] fp32."""
    rows, dim = x_rows.shape
    y = torch.empty((rows, dim), device=x_rows.device, dtype=x_rows.dtype)
    rstd = torch.empty(rows, device=x_rows.device, dtype=torch.float32)
    h = x_rows if delta_rows is None else torch.empty_like(y)
    delta = x_rows if delta_rows is None else delta_rows  # without the add the kernel reads no delta, writes no h
    block_m, block_n, num_warps = _tile(dim, FORWARD_PER_THREAD)
    grid = (triton.cdiv(rows, block_m),)
    _rmsnorm_forward_kernel[grid](x_rows, delta, weight, h, y, rstd, rows, dim, x_rows.stride(0), delta.stride(0),
                                  eps, ADD=delta_rows is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                                  num_warps=num_warps)
    return h, y, rstd


def _backward(dys: list[torch.Tensor], x_rows: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
              dh_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) over rows [rows, dim], y's gradient the sum of dys (1 to MAX_COPIES of them, as rows); with dh,
    dx is the norm's input gradient plus dh."""
    rows, dim = x_rows.shape
    dx = torch.empty((rows, dim), device=x_rows.device, dtype=x_rows.dtype)
    block_m, block_n, num_warps = _tile(dim, BACKWARD_PER_THREAD)
    programs = _backward_programs(x_rows, triton.cdiv(rows, block_m))
    dw_partial = torch.empty((programs, dim), device=x_rows.device, dtype=torch.float32)
    dh = dys[0] if dh_rows is None else dh_rows  # a stand-in the kernel does not read
    padded = dys + dys[:1] * (MAX_COPIES - len(dys))  # stand-ins too
    _rmsnorm_backward_kernel[(programs,)](*padded, x_rows, weight, rstd, dh, dx, dw_partial, rows, dim,
                                          *(dy.stride(0) for dy in padded), x_rows.stride(0), dh.stride(0),
                                          DYS=len(dys), ADD=dh_rows is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                                          num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


def _copies(y: torch.Tensor, copies: int) -> tuple[torch.Tensor, ...]:
    """y handed out `copies` times: views, each with a gradient of its own in the backward."""
    return (y,) + tuple(y.view_as(y) for _ in range(copies - 1))


def _given(dys: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor]:
    """The readers' gradients that autograd gave (a reader that did not reach the loss gives None), as rows."""
    return [_as_rows(dy) for dy in dys if dy is not None]


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, copies: int) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        x_rows, y, rstd = _forward(_as_rows(x), weight, eps)
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.shape = x.shape
        return _copies(y.view(x.shape), copies)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        given = _given(dys)
        if not given:
            return None, None, None, None
        x_rows, weight, rstd = ctx.saved_tensors
        dx, dweight = _backward(given, x_rows, weight, rstd)
        return dx.view(ctx.shape), dweight, None, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                copies: int) -> tuple[torch.Tensor, ...]:
        # an output that nothing reads (the final norm's h) gets None, not zeros that the backward would add
        ctx.set_materialize_grads(False)
        h, y, rstd = _forward(_as_rows(residual), weight, eps, _as_rows(delta))
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape = residual.shape
        return (h.view(residual.shape),) + _copies(y.view(residual.shape), copies)

    @staticmethod
    def backward(ctx, dh: torch.Tensor | None, *dys: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        given = _given(dys)
        if not given:  # y unused: h's gradient is all there is
            return dh, dh, None, None, None
        h, weight, rstd = ctx.saved_tensors
        dx, dweight = _backward(given, h, weight, rstd, None if dh is None else _as_rows(dh))
        # h = residual + delta: h's whole gradient is each one's; autograd never adds into a gradient that another
        # input still holds (tests/test_kernel_norm_rope_swiglu.py checks both inputs with other consumers)
        dx = dx.view(ctx.shape)
        return dx, dx, dweight, None, None


def _check(fn: str, name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """The kernels' demands on x, the rows to normalise, and on the gain; `name` is x's name in `fn`'s arguments."""
    if x.dtype not in DTYPES:
        raise ValueError(f"{fn}: {name} must be fp32, bf16 or fp16, found {x.dtype}")
    if x.ndim == 0 or x.numel() == 0:
        raise ValueError(f"{fn}: {name} must have a last dim and at least one row, found shape {tuple(x.shape)}")
    dim = x.shape[-1]
    if dim > MAX_DIM:
        raise ValueError(f"{fn}: the last dim must be at most {MAX_DIM}, found {dim}")
    if weight.shape != (dim,):
        raise ValueError(f"{fn}: weight must have shape ({dim},) for {name} of shape {tuple(x.shape)}, "
                         f"found {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"{fn}: weight must have {name}'s dtype {x.dtype}, found {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight must be on {name}'s device {x.device}, found {weight.device}")


def _check_copies(fn: str, copies: int) -> None:
    if not 1 <= copies <= MAX_COPIES:
        raise ValueError(f"{fn}: copies must be 1 to {MAX_COPIES}, found {copies}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            copies: int = 1) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`rmsnorm_reference(x, weight, eps)` as fused kernels; differentiable in x and weight. With copies > 1, a
    tuple of that many views of the output, one for each reader (the backward sums their gradients).

    x [..., dim] (fp32, bf16 or fp16) may be any view whose rows are evenly spaced with unit column stride (a
    slice of the last dim, say); other layouts are copied once to contiguous. weight [dim] has x's dtype.
    """
    _check("rmsnorm", "x", x, weight)
    _check_copies("rmsnorm", copies)
    ys = _RMSNorm.apply(x, weight.contiguous(), float(eps), copies)
    return ys if copies > 1 else ys[0]


def add_rmsnorm_reference(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, y): h = residual + delta as torch adds it, y = rmsnorm_reference(h, weight, eps)."""
    h = residual + delta
    return h, rmsnorm_reference(h, weight, eps)


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                copies: int = 1) -> tuple[torch.Tensor, ...]:
    """`add_rmsnorm_reference(residual, delta, weight, eps)` as the fused kernels, one pass each way; differentiable
    in residual, delta and weight. With copies > 1, (h, y, y, ...): y that many times, as views, one for each
    reader (the backward sums their gradients).

    residual and delta [..., dim] have one shape, dtype and device, with the layouts `rmsnorm` takes; h and y are
    contiguous. The backward returns one tensor as the gradient of both residual and delta.
    """
    _check("add_rmsnorm", "residual", residual, weight)
    if delta.shape != residual.shape or delta.dtype != residual.dtype or delta.device != residual.device:
        raise ValueError(f"add_rmsnorm: delta must match residual's shape, dtype and device {tuple(residual.shape)} "
                         f"{residual.dtype} {residual.device}, found {tuple(delta.shape)} {delta.dtype} "
                         f"{delta.device}")
    _check_copies("add_rmsnorm", copies)
    return _AddRMSNorm.apply(residual, delta, weight.contiguous(), float(eps), copies)
