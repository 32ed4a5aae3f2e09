"""Rotary position embedding: the torch reference, and the Triton passes the fused MLA attention runs on either
side of its flash kernels.

MLA rotates only each head's last dr dims of q and the one rotary key [b, t, dr] that every head shares. The
attention kernels read q's other dims, k's and v straight from the projections; what they need besides is the
rotated part, so the forward pass writes just that: q's rotary dims [b, t, h, dr] and the key [b, t, dr]. The
backward pass takes the attention's gradients of those, in the same rotated layout: it writes q's rotated back into
q's gradient, and sums the key's over the heads in fp32 before rotating the sum back once. A program holds all the
heads of its tokens as one [tokens, heads, dr/2] tile (a few tokens, so that there are programs enough to fill the
GPU), so the key's rotation and its sum need no atomics, and the result is deterministic.

The rotated dims come out as [first of each pair, second of each pair], whether the input pairs are interleaved
(dims 2i, 2i + 1) or not (i, i + dr/2): q and k get the same permutation, so their dot products do not change.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# elements of the [tokens, heads, dr/2] tile a program holds, per half of the pairs, and its warps: the best of a
# sweep for interleaved pairs on an H200 (benchmarks/results/2026-12-01-nvidia-h200-rope-sweep.md)
TILE = 512
WARPS = 1

# How a tensor's rotary pairs lie, as the kernels read and write them (`_pairs`):
HALVES = tl.constexpr(0)  # dim i pairs with i + dr/2
RUNS = tl.constexpr(1)  # interleaved (2i, 2i + 1), read as one contiguous run of elements per row and split
WORDS = tl.constexpr(2)  # interleaved 16-bit elements, each pair one 32-bit word: pairs aligned to words


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
def _pair_runs(ptr, i, ok):
    """Pointers [tokens, heads, 2 * pairs] to the interleaved pairs i (dims 2i, 2i + 1) at ptr, and their mask: one
    contiguous run per row, as the compiler must see it to load and store whole vectors."""
    pairs = tl.expand_dims(ptr + 2 * i, -1) + tl.arange(0, 2)  # [tokens, heads, pairs, 2]
    mask = tl.broadcast_to(tl.expand_dims(ok, -1), pairs.shape)
    return _flat(pairs), _flat(mask)


@triton.jit
def _flat(x):
    """x [tokens, heads, pairs, 2] as [tokens, heads, 2 * pairs], in order."""
    return tl.reshape(x, (x.shape[0], x.shape[1], 2 * x.shape[2]))


@triton.jit
def _load_pairs(ptr, i, ok, HALF: tl.constexpr, PAIRS: tl.constexpr):
    """The pairs i of the rotary dims at ptr, as [tokens, heads, pairs] fp32 tensors: (firsts, seconds).

    Interleaved pairs read element by element, or as runs split in registers, took 2x the forward's and 4x the
    backward's time of pairs laid out as halves on an H200 (`benchmarks/results/2026-12-01-nvidia-h200-rope-sweep.md`):
    Triton accesses runs 4 bytes at a time. Read as words, a pair is one element of a contiguous row, as the halves'
    elements are, and goes in 16-byte accesses as theirs do."""
    dtype: tl.constexpr = ptr.dtype.element_ty
    if PAIRS == WORDS:
        w = tl.load(ptr.to(tl.pointer_type(tl.uint32)) + i, mask=ok, other=0)  # little-endian: dim 2i in the low half
        x1 = w.to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
        x2 = (w >> 16).to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
    elif PAIRS == RUNS:
        run, mask = _pair_runs(ptr, i, ok)
        x = tl.load(run, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
    else:
        x1 = tl.load(ptr + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF + i, mask=ok, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_pairs(ptr, i, ok, x1, x2, HALF: tl.constexpr, PAIRS: tl.constexpr):
    """`_load_pairs`' inverse: firsts x1 and seconds x2 stored as the pairs i of the rotary dims at ptr."""
    dtype: tl.constexpr = ptr.dtype.element_ty
    if PAIRS == WORDS:
        lo = x1.to(dtype).to(tl.uint16, bitcast=True).to(tl.uint32)
        hi = x2.to(dtype).to(tl.uint16, bitcast=True).to(tl.uint32)
        tl.store(ptr.to(tl.pointer_type(tl.uint32)) + i, lo | (hi << 16), mask=ok)
    elif PAIRS == RUNS:
        run, mask = _pair_runs(ptr, i, ok)
        tl.store(run, _flat(tl.join(x1, x2)).to(dtype), mask=mask)
    else:
        tl.store(ptr + i, x1.to(dtype), mask=ok)
        tl.store(ptr + HALF + i, x2.to(dtype), mask=ok)


@triton.jit
def _rotate(x1, x2, cos, sin):
    """The pairs (x1, x2) rotated by the angles whose cosines and sines are given (pass -sin to rotate back)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _angles(COS, SIN, T, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """This program's offsets, tokens [tokens, 1, 1] (int64: offsets can pass 2**31) and pairs [1, 1, pairs], their
    mask [tokens, 1, pairs], and the cosines and sines there, in fp32."""
    t = (tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T))[:, None, None]
    i = tl.arange(0, BLOCK_HALF)[None, None, :]
    ok = (t < T) & (i < HALF)
    cos = tl.load(COS + t * HALF + i, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * HALF + i, mask=ok, other=0.0).to(tl.float32)
    return t, i, ok, cos, sin


@triton.jit
def _rope_fwd(
    Q,  # [B, T, H * QK], last dim contiguous: each head's rotary dims are its last 2 * HALF
    K_ROT,  # [B, T, 2 * HALF], last dim contiguous: the rotary key of every head
    COS,  # [T, HALF] contiguous
    SIN,  # [T, HALF] contiguous
    Q_OUT,  # [B, T, H, 2 * HALF] contiguous: q's rotary dims, rotated
    K_OUT,  # [B, T, 2 * HALF] contiguous: the key, rotated
    stride_qb, stride_qt,
    stride_rb, stride_rt,
    H, T,
    QK: tl.constexpr, HALF: tl.constexpr,
    PAIRS: tl.constexpr,  # q's and the key's pairs (the rotated buffers' are HALVES)
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # a program per (token block, b) holds all the heads of its tokens as a [tokens, heads, pairs] tile, and the key
    # as a [tokens, 1, pairs] one
    b = tl.program_id(1).to(tl.int64)
    t, i, ok, cos, sin = _angles(COS, SIN, T, HALF, BLOCK_T, BLOCK_HALF)
    x1, x2 = _load_pairs(K_ROT + b * stride_rb + t * stride_rt, i, ok, HALF, PAIRS)
    y1, y2 = _rotate(x1, x2, cos, sin)
    _store_pairs(K_OUT + (b * T + t) * (2 * HALF), i, ok, y1, y2, HALF, HALVES)

    h = tl.arange(0, BLOCK_H)[None, :, None]
    ok = ok & (h < H)
    x1, x2 = _load_pairs(Q + b * stride_qb + t * stride_qt + h * QK + (QK - 2 * HALF), i, ok, HALF, PAIRS)
    y1, y2 = _rotate(x1, x2, cos, sin)
    _store_pairs(Q_OUT + ((b * T + t) * H + h) * (2 * HALF), i, ok, y1, y2, HALF, HALVES)


@triton.jit
def _rope_bwd(
    DQ_ROT,  # [B, T, H, 2 * HALF] contiguous: the gradient of q's rotated dims
    DK_ROT,  # [B, T, H, 2 * HALF] contiguous: of each head's copy of the rotated key
    COS,  # [T, HALF] contiguous
    SIN,  # [T, HALF] contiguous
    DQ,  # [B, T, H * QK] contiguous: q's gradient, whose rotary dims are written here
    DK,  # [B, T, 2 * HALF] contiguous: the rotary key's gradient
    H, T,
    QK: tl.constexpr, HALF: tl.constexpr,
    PAIRS: tl.constexpr,  # q's and the key's pairs (the rotated buffers' are HALVES)
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # a program per (token block, b) holds all the heads of its tokens: the key's gradient sums over them
    b = tl.program_id(1).to(tl.int64)
    t, i, ok, cos, sin = _angles(COS, SIN, T, HALF, BLOCK_T, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)[None, :, None]
    heads_ok = ok & (h < H)
    rows = ((b * T + t) * H + h) * (2 * HALF)

    # the key: summed in fp32 over the heads (masked lanes hold zeros), then rotated back once
    y1, y2 = _load_pairs(DK_ROT + rows, i, heads_ok, HALF, HALVES)
    x1, x2 = _rotate(tl.sum(y1, 1, keep_dims=True), tl.sum(y2, 1, keep_dims=True), cos, -sin)
    _store_pairs(DK + (b * T + t) * (2 * HALF), i, ok, x1, x2, HALF, PAIRS)

    y1, y2 = _load_pairs(DQ_ROT + rows, i, heads_ok, HALF, HALVES)
    x1, x2 = _rotate(y1, y2, cos, -sin)
    _store_pairs(DQ + (b * T + t) * (H * QK) + h * QK + (QK - 2 * HALF), i, heads_ok, x1, x2, HALF, PAIRS)


def _blocks(heads: int, half: int, t: int) -> tuple[dict[str, int], int]:
    """The constexpr pair count, the power-of-two blocks of heads and pairs, and the tokens per program."""
    block_h, block_half = triton.next_power_of_2(heads), triton.next_power_of_2(half)
    block_t = min(max(1, TILE // (block_h * block_half)), triton.next_power_of_2(t))
    return {"HALF": half, "BLOCK_T": block_t, "BLOCK_H": block_h, "BLOCK_HALF": block_half}, block_t


def _pairs(interleaved: bool, *rows: tuple[torch.Tensor, int]) -> int:
    """How the kernels read pairs: WORDS for interleaved 16-bit ones wherever each (tensor, element offset of its
    rotary dims in a row) starts every pair on a word's boundary (address, batch and token strides and offset all
    even: the heads' rotary dims lie an even head width apart), RUNS for other interleaved ones, else HALVES."""
    if not interleaved:
        return HALVES.value
    aligned = all(x.element_size() == 2 and x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0 and x.stride(1) % 2 == 0
                  and first % 2 == 0 for x, first in rows)
    return (WORDS if aligned else RUNS).value


def rotate(q: torch.Tensor, k_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
           interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, t, h*qk] (each head's last dr dims rotary) and the key k_rot [b, t, dr], both last-dim contiguous ->
    q's rotary dims rotated [b, t, h, dr] and the key rotated [b, t, dr], by cos/sin [t, dr/2] (contiguous)."""
    b, t, dr = k_rot.shape
    qk = q.shape[-1] // heads
    q_rot = torch.empty((b, t, heads, dr), dtype=q.dtype, device=q.device)
    k_out = torch.empty((b, t, dr), dtype=q.dtype, device=q.device)
    dims, block_t = _blocks(heads, dr // 2, t)
    _rope_fwd[(triton.cdiv(t, block_t), b)](
        q, k_rot, cos, sin, q_rot, k_out, q.stride(0), q.stride(1), k_rot.stride(0), k_rot.stride(1), heads, t,
        QK=qk, PAIRS=_pairs(interleaved, (q, qk - dr), (k_rot, 0)), **dims, num_warps=WARPS)
    return q_rot, k_out


def rotate_back(dq_rot: torch.Tensor, dk_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dq: torch.Tensor,
                interleaved: bool) -> torch.Tensor:
    """`rotate`'s backward: the gradients of the rotated q dims and of every head's rotated key, both [b, t, h, dr]
    contiguous -> q's rotary dims of dq [b, t, h*qk] (written in place) and the key's gradient [b, t, dr]."""
    b, t, heads, dr = dq_rot.shape
    qk = dq.shape[-1] // heads
    dk = torch.empty((b, t, dr), dtype=dq.dtype, device=dq.device)
    dims, block_t = _blocks(heads, dr // 2, t)
    _rope_bwd[(triton.cdiv(t, block_t), b)](
        dq_rot, dk_rot, cos, sin, dq, dk, heads, t, QK=qk, PAIRS=_pairs(interleaved, (dq, qk - dr)), **dims,
        num_warps=WARPS)
    return dk
