"""The LoRA / CE-LoRA linear on Triton kernels and cuBLAS, each piece beside the torch reference it must match.

A site computes Y = X W^T + s (X' A^T) B^T with W [m, n] frozen, A [r, n], B [m, r], X [T, n] and X' = dropout(X)
(often X itself). W gets no gradient, so besides the forward the one large product is the input gradient dY W;
CE-LoRA replaces it by dY[:, S] R_S + (dY B0) A0 (shared/reference/celora.md). Two kernels do most of it:

- `thin_matmul`: X [T, K] @ [V | V2] for small widths, CE-LoRA's dY [B | B0]. It streams X once and is
  memory-bound, so CE-LoRA's per-channel sums ||dY[:, i]||^2 (for choosing S) ride along at no extra read; it reads
  B and B0 where they lie and writes rows aligned for the dA GEMM that reads dY B out of them. The single r-wide
  products (X' A^T, dY B) are cuBLAS GEMMs, which need neither (the 96 X' A^T of a k2-1b CE-LoRA step took 1.28
  ms of an H200's time on cuBLAS; the step's time did not move measurably). Giving dY [B | B0] to cuBLAS as well
  needs a zero-padded copy of [B | B0] at every step, whose small kernels cost what the GEMMs saved
  (2026-12-02-nvidia-h200-step-adapters-cublas-thin.md).
- `matmul_plus_low_rank`: C = P Q + s L_a L_b, the large product with a low-rank term added to the same fp32
  accumulator, so C is written once. It is the exact input gradient (dY W + s dYB A) and CE-LoRA's (dY[:, S] R_S +
  [dYB | dYB0] [sA; A0], the two low-rank terms as one of rank r + k).

The forward X W^T + s XA B^T is cuBLAS's GEMM with the low-rank term added into its output by a second cuBLAS call
(beta = 1): there this Triton GEMM ran at 0.71x cuBLAS, which costs more than reading and writing Y once more
(H200, bf16, T=16384: 0.84 against 0.98 ms at 7168 -> 2048, 0.98 against 1.02 ms at 2048 -> 7168). The backward's
products keep the kernel: with cuBLAS plus the extra pass, CE-LoRA's dX took 0.54 / 0.43 ms against 0.36 / 0.39 ms
(its GEMM over the kept channels is small, so the extra pass weighs more), and the exact dX was no faster overall.

CE-LoRA's GEMM runs over a packed copy dY[:, S] (torch's index_select), not over dY with its columns gathered inside
the GEMM's loads. That gather runs along dY's contiguous dim: each load is a scalar 2-byte access whose 32-byte sector
is mostly other channels, repeated for every column tile of the output, and Hopper's async copies cannot take it.
Measured on an H200 (bf16, T=16384, keep 0.25): CE-LoRA's dX with the gathering GEMM took 1.6 ms at 7168 -> 2048
and 1.9 ms at 2048 -> 7168, more than the dense dY W it replaces (0.72 / 0.67 ms); writing dY[:, S] out packed from
the thin pass (which reads dY anyway) added 0.07 / 0.43 ms to that pass, its scattered 2-byte stores being the
bottleneck; index_select takes 0.04 / 0.10 ms. The copy is |S|/m of dY, and the GEMM over S is then a dense one.

The weight gradients dA = s (dY B)^T X' and dB = s dY^T XA stay torch matmuls (cuBLAS): each is a product with one
side of rank r that streams X' or dY once, which a Triton kernel would only repeat. `LoRALinearKernel` puts the
pieces together as an autograd.Function.

Numerics: every product accumulates in fp32 and rounds once into its output's dtype, but for the forward, which adds
the low-rank term to the rounded X W^T, as the torch path does. XA and dY B are rounded to the input dtype before
the large product adds them in, as torch's matmuls round them. fp32 operands multiply in full
precision (torch's default), not in tf32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from k2c.runtime.kernels.tuning import autotune

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Under TRITON_INTERPRET=1 (the CPU tests) one small config runs and nothing is timed. Read at import, as Triton
# reads it when it decorates the kernels below.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


# --------------------------------------------------------------------------- torch references
# Plain formulas in fp32, results in the inputs' dtype.


def lora_forward_reference(x, x_adapter, weight, lora_A, lora_B, scale):
    """(Y [T, m], XA [T, r]): XA = X' A^T and Y = X W^T + s XA B^T."""
    xa = x_adapter.float() @ lora_A.float().T
    y = x.float() @ weight.float().T + scale * xa @ lora_B.float().T
    return y.to(x.dtype), xa.to(x.dtype)


def lora_input_grad_reference(dy, weight, lora_A, lora_B, scale):
    """dX [T, n] = dY W + s (dY B) A."""
    dy32 = dy.float()
    return (dy32 @ weight.float() + scale * (dy32 @ lora_B.float()) @ lora_A.float()).to(dy.dtype)


def celora_input_grad_reference(dy, kept, kept_rows, svd_B, svd_A, lora_A, lora_B, scale, channel_norms=False):
    """(dX [T, n], ||dY[:, i]||^2 [m] fp32 or None): dX = dY[:, S] R_S + (dY B0) A0 + s (dY B) A."""
    dy32 = dy.float()
    dx = (dy32[:, kept] @ kept_rows.float() + (dy32 @ svd_B.float()) @ svd_A.float()
          + scale * (dy32 @ lora_B.float()) @ lora_A.float())
    return dx.to(dy.dtype), (dy32.square().sum(0) if channel_norms else None)


def lora_weight_grads_reference(dy, x_adapter, xa, lora_B, scale):
    """(dA [r, n], dB [m, r]): dA = s (dY B)^T X', dB = s dY^T XA."""
    dy32 = dy.float()
    grad_a = scale * (dy32 @ lora_B.float()).T @ x_adapter.float()
    grad_b = scale * dy32.T @ xa.float()
    return grad_a.to(lora_B.dtype), grad_b.to(lora_B.dtype)


# --------------------------------------------------------------------------- kernels


def _matmul_configs() -> list[triton.Config]:
    if INTERPRETED:  # small tiles, so that the tests' shapes cross tile edges in every dim; two tile rows a group
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]
    # bf16 / fp16 on Hopper: 128 x 256 or 256 x 128 tiles keep two warpgroups of wgmma busy; 128 x 128 for small N
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    ]


@autotune(_matmul_configs(), key=["M", "N", "K"])
@triton.jit
def _matmul_plus_low_rank_kernel(
    p_ptr,  # P [M, K]
    q_ptr,  # Q [K, N]
    la_ptr,  # L_a [M, R] (LOW_RANK only)
    lb_ptr,  # L_b [R1, N] (LOW_RANK only)
    lb2_ptr,  # L_b2 [R - R1, N] (TWO_B only): L_b's rows past R1
    c_ptr,  # C [M, N] = P Q + L_a diag(s) [L_b; L_b2], s_j = scale_1 for j < R1, else scale_2
    M, N, K, R, R1,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lam, stride_lar, stride_lbr, stride_lbn, stride_lb2r,
    stride_lb2n, stride_cm, stride_cn,
    scale_1, scale_2,
    LOW_RANK: tl.constexpr,
    TWO_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # R rounded up to a power of two, at least 16 (tl.dot's smallest)
    GROUP_M: tl.constexpr,  # tile rows per group: the programs of a group share Q's column tiles in L2
):
    # program id -> tile (pid_m, pid_n), walking GROUP_M tile rows column by column
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    # rows (tokens) in int64: M * stride_pm can pass 2**31. Indices wrap, so loads need no row or column mask; the
    # wrapped duplicates are never stored.
    rows = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = tl.arange(0, BLOCK_K)

    # main loop: acc += P[rows, k-block] @ Q[k-block, cols]
    p_tile = p_ptr + rows[:, None] * stride_pm + ks[None, :] * stride_pk
    q_tile = q_ptr + ks[:, None] * stride_qk + cols[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_in = ks < K - k * BLOCK_K
        p = tl.load(p_tile, mask=k_in[None, :], other=0.0)
        q = tl.load(q_tile, mask=k_in[:, None], other=0.0)
        acc = tl.dot(p, q, acc, input_precision="ieee")
        p_tile += BLOCK_K * stride_pk
        q_tile += BLOCK_K * stride_qk

    # epilogue: the low-rank term into the same accumulator; s scales the [BLOCK_M, R] factor, the cheap side. (Loading
    # the factors before the loop instead, to hide their latency, made the forward GEMM 4-16% slower on an H200.)
    if LOW_RANK:
        rs = tl.arange(0, BLOCK_R)
        la = tl.load(la_ptr + rows[:, None] * stride_lam + rs[None, :] * stride_lar, mask=rs[None, :] < R, other=0.0)
        lb = tl.load(lb_ptr + rs[:, None] * stride_lbr + cols[None, :] * stride_lbn, mask=rs[:, None] < R1, other=0.0)
        if TWO_B:
            rs2 = tl.maximum(rs - R1, 0)
            lb += tl.load(lb2_ptr + rs2[:, None] * stride_lb2r + cols[None, :] * stride_lb2n,
                          mask=(rs[:, None] >= R1) & (rs[:, None] < R), other=0.0)
        col_scale = tl.where(rs < R1, scale_1, scale_2)
        acc = tl.dot((la.to(tl.float32) * col_scale[None, :]).to(lb.dtype), lb, acc, input_precision="ieee")

    out_rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = c_ptr + out_rows[:, None] * stride_cm + out_cols[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))


# The fewest rows a thin_matmul program takes: the channel sums have a row of partial sums per program
THIN_MIN_BLOCK_M = 32


def _thin_configs() -> list[triton.Config]:
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": THIN_MIN_BLOCK_M, "BLOCK_K": 32})]
    # memory-bound: enough rows per program for a wide grid, deep pipelines to keep loads in flight
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_stages=4, num_warps=4),
        triton.Config({"BLOCK_M": THIN_MIN_BLOCK_M, "BLOCK_K": 128}, num_stages=4, num_warps=4),
    ]


# A trial config with smaller row blocks writes more rows of partial sums than the chosen one: they must be zeros
@autotune(_thin_configs(), key=["M", "K", "R", "SQUARES", "TWO_V", "SPLIT_V"], reset_to_zero=["sq_ptr"])
@triton.jit
def _thin_matmul_kernel(
    x_ptr,  # X [M, K]
    v_ptr,  # V [K, R1]
    v2_ptr,  # V2 [K, R - R1] (TWO_V only): V's columns past R1
    out_ptr,  # X [V | V2] [M, R]
    sq_ptr,  # [cdiv(M, THIN_MIN_BLOCK_M), K] fp32 zeros: row p gets program p's sums of X[:, k]^2 (SQUARES only)
    M, K, R, R1,
    stride_xm, stride_xk, stride_vk, stride_vr, stride_v2k, stride_v2r, stride_om, stride_or,
    SQUARES: tl.constexpr,
    TWO_V: tl.constexpr,
    SPLIT_V: tl.constexpr,  # bf16 X, fp32 V: V's tile as three bf16 parts, three tensor-core products
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # R rounded up to a power of two, at least 16 (tl.dot's smallest)
):
    # program id -> a block of BLOCK_M rows, all K columns
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < M
    ks = tl.arange(0, BLOCK_K)
    rs = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        cols = k * BLOCK_K + ks
        k_in = cols < K
        # masked rows load zeros, so they add nothing to the channel sums
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_in[:, None] & k_in[None, :], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vk + rs[None, :] * stride_vr,
                    mask=k_in[:, None] & (rs[None, :] < R1), other=0.0)
        if TWO_V:
            rs2 = tl.maximum(rs - R1, 0)
            v += tl.load(v2_ptr + cols[:, None] * stride_v2k + rs2[None, :] * stride_v2r,
                         mask=k_in[:, None] & (rs[None, :] >= R1) & (rs[None, :] < R), other=0.0)
        if SPLIT_V:
            # V = hi + mid + lo to 2^-24 of V, each part bf16: every product with a bf16 X is exact in fp32, so the
            # sum is the fp32 product, at tensor-core speed (an fp32 "ieee" dot runs on the CUDA cores: an H200 does
            # about a fifteenth of the bf16 tensor cores' FLOP/s there)
            hi = v.to(tl.bfloat16)
            rest = v - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            acc = tl.dot(x, hi, acc)
            acc = tl.dot(x, mid, acc)
            acc = tl.dot(x, (rest - mid.to(tl.float32)).to(tl.bfloat16), acc)
        else:
            acc = tl.dot(x.to(v.dtype), v, acc, input_precision="ieee")
        if SQUARES:
            xf = x.to(tl.float32)
            tl.store(sq_ptr + tl.program_id(0).to(tl.int64) * K + cols, tl.sum(xf * xf, axis=0), mask=k_in)

    out = out_ptr + rows[:, None] * stride_om + rs[None, :] * stride_or
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & (rs[None, :] < R))


# --------------------------------------------------------------------------- wrappers


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _check(what: str, like: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Every tensor 2D, on like's device, in like's dtype (one of DTYPES)."""
    if like.dtype not in DTYPES:
        raise ValueError(f"{what}: expected fp32, bf16 or fp16 tensors, found {like.dtype}")
    for name, t in tensors.items():
        if t.ndim != 2:
            raise ValueError(f"{what}: {name} must be 2D, found shape {tuple(t.shape)}")
        if t.dtype != like.dtype or t.device != like.device:
            raise ValueError(f"{what}: {name} must be {like.dtype} on {like.device} like the others, "
                             f"found {t.dtype} on {t.device}")


def _shape(what: str, name: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: {name} must have shape {shape}, found {tuple(t.shape)}")


def bf16_split_products(x: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether x (bf16) times v (fp32) runs as exact products of bf16 parts of v. Not under the interpreter, whose
    bf16 dot products are wrong (there x is upcast, as on the other paths)."""
    return x.dtype == torch.bfloat16 and v.dtype == torch.float32 and not INTERPRETED


def empty_aligned_rows(m: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised [m, n] tensor of like's dtype whose rows start every 8 elements (16 bytes in bf16): column
    slices from a multiple of 8 (dY B out of [dY B | dY B0]) then meet cuBLAS's and Triton's alignment for vectorised
    loads. With 60-byte rows, CE-LoRA's dA GEMM ran on a 2-byte-aligned cuBLAS kernel: 2.4 ms of the k2-1b step."""
    wide = -(-n // 8) * 8
    return torch.empty((m, wide), device=like.device, dtype=like.dtype)[:, :n]


def thin_matmul(x, v, channel_norms=False, v2=None):
    """(X V [M, R], ||X[:, k]||^2 [K] fp32 or None), one pass over X [M, K].

    V [K, R] with R small; any strides (V may be a transposed view, A^T of A [r, n]). v2 [K, R2] gives X [V | V2]
    [M, R + R2] without concatenating the two. An fp32 V (and v2) may multiply a bf16 or fp16 X: X is upcast as it
    is loaded, never copied, and X V is fp32 (for a bf16 X on a GPU, as products of V's bf16 parts; see the
    kernel). The channel sums are summed per program, then over the programs in a fixed order: they choose CE-LoRA's
    kept channels, so a last-bit difference from run to run could change the set.
    """
    like = v if v.dtype == torch.float32 else x
    _check("thin_matmul", x, x=x)
    _check("thin_matmul", like, v=v, **({"v2": v2} if v2 is not None else {}))
    (M, K), R1 = x.shape, v.shape[1]
    _shape("thin_matmul", "v", v, (K, R1))
    R = R1 + (v2.shape[1] if v2 is not None else 0)
    if v2 is not None:
        _shape("thin_matmul", "v2", v2, (K, R - R1))
    else:  # unused pointer: any tensor will do
        v2 = v
    out = empty_aligned_rows(M, R, like)
    sq = torch.zeros((triton.cdiv(M, THIN_MIN_BLOCK_M), K), device=x.device, dtype=torch.float32) \
        if channel_norms else None
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    _thin_matmul_kernel[grid](
        x, v, v2, out, out if sq is None else sq,  # without SQUARES the sums' pointer is unused: any tensor will do
        M, K, R, R1,
        x.stride(0), x.stride(1), v.stride(0), v.stride(1), v2.stride(0), v2.stride(1), out.stride(0), out.stride(1),
        SQUARES=channel_norms, TWO_V=R > R1, SPLIT_V=bf16_split_products(x, v), BLOCK_R=_block_r(R),
    )
    return out, (sq.sum(0) if sq is not None else None)


def matmul_plus_low_rank(p, q, low_a=None, low_b=None, scale=1.0, low_b2=None, scale2=1.0, out_dtype=None):
    """C [M, N] = P Q + scale * L_a L_b, in P's dtype (or out_dtype, rounded once from the fp32 accumulator); one
    kernel, C written once.

    P [M, K], Q [K, N], L_a [M, R], L_b [R, N] (both None: no low-rank term). Any strides: Q may be a transposed view
    (W^T). With low_b2 [R2, N], L_a is [M, R + R2] and the term is scale * L_a[:, :R] L_b + scale2 * L_a[:, R:]
    L_b2, without concatenating or scaling any factor.
    """
    low_rank = low_a is not None
    if low_rank != (low_b is not None) or (low_b2 is not None and not low_rank):
        raise ValueError("matmul_plus_low_rank: give both low-rank factors or neither")
    factors = {"low_a": low_a, "low_b": low_b, **({"low_b2": low_b2} if low_b2 is not None else {})}
    _check("matmul_plus_low_rank", p, p=p, q=q, **(factors if low_rank else {}))
    M, (K, N) = p.shape[0], q.shape
    _shape("matmul_plus_low_rank", "p", p, (M, K))
    R = low_a.shape[1] if low_rank else 0
    R1 = R - (low_b2.shape[0] if low_b2 is not None else 0)
    if low_rank:
        _shape("matmul_plus_low_rank", "low_a", low_a, (M, R))
        _shape("matmul_plus_low_rank", "low_b", low_b, (R1, N))
    else:  # unused pointers: any tensor will do
        low_a = low_b = p
    if low_b2 is not None:
        _shape("matmul_plus_low_rank", "low_b2", low_b2, (R - R1, N))
    else:
        low_b2 = low_b
    c = torch.empty((M, N), device=p.device, dtype=out_dtype or p.dtype)
    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _matmul_plus_low_rank_kernel[grid](
        p, q, low_a, low_b, low_b2, c,
        M, N, K, R, R1,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), low_a.stride(0), low_a.stride(1),
        low_b.stride(0), low_b.stride(1), low_b2.stride(0), low_b2.stride(1), c.stride(0), c.stride(1),
        float(scale), float(scale2),
        LOW_RANK=low_rank, TWO_B=R > R1, BLOCK_R=_block_r(R),
    )
    return c


# --------------------------------------------------------------------------- the linear's products


def _lora_shapes(what: str, m: int, n: int, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    r = lora_A.shape[0]
    _shape(what, "lora_A", lora_A, (r, n))
    _shape(what, "lora_B", lora_B, (m, r))


def _check_celora(what, like, m, n, kept, kept_rows, svd_B, svd_A) -> None:
    """S, R_S, B0 and A0 fit a W [m, n] in like's dtype and on its device."""
    _check(what, like, kept_rows=kept_rows, svd_B=svd_B, svd_A=svd_A)
    k = svd_B.shape[1]
    _shape(what, "svd_B", svd_B, (m, k))
    _shape(what, "svd_A", svd_A, (k, n))
    if kept.dtype != torch.int64 or kept.ndim != 1 or kept.device != like.device:
        raise ValueError(f"{what}: kept must be a 1D int64 tensor on {like.device}, "
                         f"found {kept.dtype} of shape {tuple(kept.shape)} on {kept.device}")
    _shape(what, "kept_rows", kept_rows, (kept.shape[0], n))


def lora_forward(x, x_adapter, weight, lora_A, lora_B, scale):
    """(Y [T, m], XA [T, r]): XA = X' A^T first (thin, r columns), then Y = X W^T (cuBLAS) + s XA B^T added in."""
    _check("lora_forward", x, x=x, x_adapter=x_adapter, weight=weight, lora_A=lora_A, lora_B=lora_B)
    m, n = weight.shape
    _lora_shapes("lora_forward", m, n, lora_A, lora_B)
    _shape("lora_forward", "x", x, (x.shape[0], n))
    _shape("lora_forward", "x_adapter", x_adapter, tuple(x.shape))
    xa = x_adapter @ lora_A.T
    return (x @ weight.T).addmm_(xa, lora_B.T, alpha=scale), xa


def lora_input_grad(dy, weight, lora_A, lora_B, scale, dy_B=None):
    """dX [T, n] = dY W + s (dY B) A: one GEMM with the low-rank term in its epilogue.

    dy_B: dY B [T, r] when the caller has it already (dA needs it too); computed here otherwise.
    """
    _check("lora_input_grad", dy, dy=dy, weight=weight, lora_A=lora_A, lora_B=lora_B)
    m, n = weight.shape
    _lora_shapes("lora_input_grad", m, n, lora_A, lora_B)
    _shape("lora_input_grad", "dy", dy, (dy.shape[0], m))
    if dy_B is None:
        dy_B = dy @ lora_B
    return matmul_plus_low_rank(dy, weight, dy_B, lora_A, scale)


def celora_input_grad(dy, kept, kept_rows, svd_B, svd_A, lora_A, lora_B, scale, channel_norms=False):
    """(dX [T, n], ||dY[:, i]||^2 [m] fp32 or None): CE-LoRA's dX = dY[:, S] R_S + (dY B0) A0 + s (dY B) A.

    One thin pass over dY gives [dY B | dY B0] (and the channel sums, when asked); then one GEMM over the kept
    channels, on dY[:, S] packed (see the module's docstring), adds the rank-(r + k) term [dYB | dYB0] [sA; A0] to
    the same accumulator. kept: S [|S|] int64 (ascending, as the runtime keeps it, makes the copy read dY's rows in
    order); kept_rows: R[S, :].
    """
    _check("celora_input_grad", dy, dy=dy, lora_A=lora_A, lora_B=lora_B)
    m, n = dy.shape[1], lora_A.shape[1]
    _lora_shapes("celora_input_grad", m, n, lora_A, lora_B)
    _check_celora("celora_input_grad", dy, m, n, kept, kept_rows, svd_B, svd_A)
    dy_lowrank, sq = thin_matmul(dy, lora_B, channel_norms, v2=svd_B)
    dx = matmul_plus_low_rank(dy.index_select(1, kept), kept_rows, dy_lowrank, lora_A, scale, low_b2=svd_A)
    return dx, sq


def scaled_mm(a, b, scale):
    """scale * (a @ b) in one GEMM: the scale is addmm's alpha, applied to the fp32 product before it is rounded
    (beta = 0 ignores addmm's input, here an unwritten scalar, so nothing is read or filled for it)."""
    return torch.addmm(a.new_empty(()).expand(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scale)


def lora_weight_grads(dy, x_adapter, xa, lora_B, scale, dy_B=None):
    """(dA [r, n], dB [m, r]) = (s (dY B)^T X', s dY^T XA) as torch matmuls; a None input skips its gradient.

    These stream X' and dY once each with r-wide partners; cuBLAS does that at memory speed, so no kernel here.
    dy_B: dY B [T, r] when the caller has it already.
    """
    grad_a = grad_b = None
    if x_adapter is not None:
        if dy_B is None:
            dy_B = dy @ lora_B
        grad_a = scaled_mm(dy_B.T, x_adapter, scale)
    if xa is not None:
        grad_b = scaled_mm(dy.T, xa, scale)
    return grad_a, grad_b


class LoRALinearKernel(torch.autograd.Function):
    """x, x_adapter [T, n], W [m, n] (frozen), A [r, n], B [m, r] -> Y [T, m], forward and backward on the kernels.

    x_adapter is dropout(x), or x itself: then the adapter's share of dX joins the base GEMM's accumulator.
    celora = (kept, kept_rows, svd_B, svd_A) gives CE-LoRA's input gradient (see `celora_input_grad`); None the exact
    one. select, with celora, makes this backward a refresh step: it is called with ||dY[:, i]||^2 [m] (fp32, summed
    in the pass that computes dY [B | B0]) and returns the (kept, kept_rows) to use, so S is chosen from this very dY
    at no extra read of it; celora's own kept and kept_rows are then unused (None before the first choice). select
    is not called when x needs no gradient.
    """

    @staticmethod
    def forward(ctx, x, x_adapter, weight, lora_A, lora_B, scale, celora=None, select=None):
        if ctx.needs_input_grad[2]:
            raise RuntimeError("LoRALinearKernel: the base weight must be frozen (requires_grad=False): "
                               "it gets no gradient")
        if select is not None and celora is None:
            raise ValueError("LoRALinearKernel: select chooses CE-LoRA's kept channels, so it needs celora")
        if celora is not None and select is None:  # with select, S and R_S are chosen in the backward
            _check_celora("LoRALinearKernel", weight, *weight.shape, *celora)
        y, xa = lora_forward(x, x_adapter, weight, lora_A, lora_B, scale)
        # X' only for dA, XA only for dB; W, A and B are parameters and cost nothing to keep
        ctx.save_for_backward(x_adapter if ctx.needs_input_grad[3] else None,
                              xa if ctx.needs_input_grad[4] else None, weight, lora_A, lora_B)
        ctx.scale, ctx.celora, ctx.select, ctx.shared = scale, celora, select, x_adapter is x
        return y

    @staticmethod
    def backward(ctx, dy):
        x_adapter, xa, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_x_adapter = ctx.needs_input_grad[:2]
        scale, shared = ctx.scale, ctx.shared
        dx = dx_adapter = None
        if need_x and ctx.celora is not None:
            kept, kept_rows, svd_B, svd_A = ctx.celora
            r = lora_B.shape[1]
            # dY B first, on rows aligned to 16 bytes: the slice feeds cuBLAS (dA) at full speed
            dy_lowrank, sq = thin_matmul(dy, lora_B, ctx.select is not None, v2=svd_B)
            if ctx.select is not None:
                kept, kept_rows = ctx.select(sq)
            dy_kept = dy.index_select(1, kept)
            dy_B = dy_lowrank[:, :r]
            if shared:
                dx = matmul_plus_low_rank(dy_kept, kept_rows, dy_lowrank, lora_A, scale, low_b2=svd_A)
            else:
                dx = matmul_plus_low_rank(dy_kept, kept_rows, dy_lowrank[:, r:], svd_A)
        else:
            dy_B = dy @ lora_B
            if need_x:
                dx = matmul_plus_low_rank(dy, weight, *((dy_B, lora_A) if shared else ()), scale=scale)
        if need_x_adapter and not shared:
            dx_adapter = scaled_mm(dy_B, lora_A, scale)
        grad_a, grad_b = lora_weight_grads(dy, x_adapter, xa, lora_B, scale, dy_B=dy_B)
        return dx, dx_adapter, None, grad_a, grad_b, None, None, None
