"""Causal flash attention at MLA head dims that also returns each head's max pre-softmax logit.

Why: MuonClip's QK-Clip needs, after every forward, the largest logit of each head. The torch path gets it by
materialising the [b, h, t, t] scores, several times the cost of the attention itself; FlexAttention returns it
(`AuxRequest(max_scores=True)`) but runs about 2.6x slower than SDPA at MLA head dims. Here the forward is
FlashAttention-2's online softmax, whose running row max already is the max logit: each program writes the max
over its query rows into a [b * h, row blocks] buffer, and one tiny amax gives [h]. No pass over the scores is
added.

Head dims: MLA's query/key head dim is 192 (128 without rope + 64 with rope), not a power of two, and the value
head dim (128) differs from it. Triton blocks are powers of two of at least 16 (`tl.dot`'s minimum), so the qk
head dim is covered by two blocks, D_HEAD + D_TAIL (192 = 128 + 64, 96 = 64 + 32): both dot products accumulate
into one, with no padding to 256. Sizes that do not split into such blocks mask the padded columns (24 = 16 + 16
with 8 masked); powers of two use one block (D_TAIL = 0).

The work, as in FlashAttention-2 and the Triton fused-attention tutorial:
- forward: a program per (query block, b * h) walks the key blocks wholly below the diagonal without a mask, then
  the diagonal block with the causal mask; it stores out, each row's logsumexp (base 2) and its block's max logit.
- backward: a program per (query block, b * h) computes delta = rowsum(dO * O) for its rows, stores it, and walks
  the key blocks up to the diagonal for dQ; then a program per (key block, b * h) walks the query blocks from the
  diagonal on for dK and dV, reading that delta (so no separate preprocess pass over O and dO). Both recompute the
  probabilities from the saved logsumexp; neither needs atomics.

Logits are computed in fp32 from the operands' dtype (bf16 / fp16; fp32 operands use tf32 dot products on a GPU,
Triton's default). `head_scale` must be positive (QK-Clip's scales are in (0, 1]): the kernels take the row max of
the unscaled dot products.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from k2c.runtime.kernels import ATTENTION_MAX_HEAD_DIM
from k2c.runtime.kernels.tuning import autotune

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x log2 e), the fast one
MAX_HEAD_DIM = ATTENTION_MAX_HEAD_DIM
# Under TRITON_INTERPRET=1 (the CPU tests) one small config runs and nothing is timed; read at import, as Triton
# reads it.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def _configs(gpu: list[tuple[int, int, int, int]], interpreted: tuple[int, int]) -> list[triton.Config]:
    """The autotuner's candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU; under TRITON_INTERPRET one
    small config, since every program then runs in numpy."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": interpreted[0], "BLOCK_N": interpreted[1]})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu]


# Candidates: the winners and close seconds of autotuning over a wider set on an H200 (Triton 3.6, bf16, B=4, H=16,
# T=4096). At qk 192 / v 128: forward 128x64 w8 s3, dQ 128x64 w8 s3, dK/dV 32x128 w8 s3; at 128 / 128: forward
# 64x64 w4 s3 and 128x128 w8 s3 within 1%, dQ 128x64 w8 s3, dK/dV 64x64 w4 s2. The forward and the dQ kernel need
# BLOCK_M % BLOCK_N == 0 (their diagonal block is whole key blocks), the dK/dV kernel BLOCK_N % BLOCK_M == 0 (its
# diagonal is whole query blocks).
FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)], (32, 16))
DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)], (32, 16))
DKDV_CONFIGS = _configs([(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2)], (16, 32))
TUNING_KEY = ["T", "QK_DIM", "V_DIM"]


@triton.jit
def _below(offs, n: tl.constexpr, END: tl.constexpr):
    """offs < n for a block of offsets that ends at END: a constant when END <= n, so that no predicate is built."""
    if END <= n:
        ok = tl.full(offs.shape, True, tl.int1)
    else:
        ok = offs < n
    return ok


@triton.jit
def _attn_fwd(
    Q,  # [B, H, T, QK_DIM], last dim contiguous
    K,  # [B, H, T, QK_DIM], last dim contiguous
    V,  # [B, H, T, V_DIM], last dim contiguous
    HEAD_SCALE,  # [H] fp32, or None
    Out,  # [B, H, T, V_DIM], last dim contiguous
    LSE,  # [B * H, T] fp32: each row's log2 of sum(exp2(logit * log2 e))
    BLOCK_MAX,  # [B * H, max_stride] fp32, -inf where no program writes: max logit over each query block
    sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    max_stride, H, T,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
    D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # a program per (query block, b * h); the longest rows first, so that the short ones fill the last wave
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    logit_scale = sm_scale
    if HEAD_SCALE is not None:
        logit_scale = logit_scale * tl.load(HEAD_SCALE + off_h)
    qk_scale = logit_scale * LOG2E  # logits in units of log2, for exp2

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_dh = tl.arange(0, D_HEAD)
    dh_ok = _below(offs_dh, QK_DIM, D_HEAD)
    offs_dv = tl.arange(0, D_V)
    dv_ok = _below(offs_dv, V_DIM, D_V)
    q_ptrs = q_base + offs_m[:, None] * stride_qt
    q_head = tl.load(q_ptrs + offs_dh[None, :], mask=m_ok[:, None] & dh_ok[None, :], other=0.0)
    if D_TAIL > 0:
        offs_dt = D_HEAD + tl.arange(0, D_TAIL)
        dt_ok = _below(offs_dt, QK_DIM, D_HEAD + D_TAIL)
        q_tail = tl.load(q_ptrs + offs_dt[None, :], mask=m_ok[:, None] & dt_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of logit * log2 e
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(logit * log2 e - m_i)
    acc = tl.zeros([BLOCK_M, D_V], tl.float32)
    for phase in tl.static_range(2):
        if phase == 0:  # the key blocks wholly below the diagonal: every key exists and is visible
            lo, hi = 0, start_m
        else:  # the diagonal block: causal mask, and keys past T
            lo, hi = start_m, tl.minimum(start_m + BLOCK_M, T)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if phase == 0:
                n_ok = tl.full([BLOCK_N], True, tl.int1)
            else:
                n_ok = offs_n < T
            # -- logits of this key block: q @ k^T, the head dim in one or two blocks --
            k_ptrs = k_base + offs_n[None, :] * stride_kt
            kT_head = tl.load(k_ptrs + offs_dh[:, None], mask=dh_ok[:, None] & n_ok[None, :], other=0.0)
            qk = tl.dot(q_head, kT_head)
            if D_TAIL > 0:
                kT_tail = tl.load(k_ptrs + offs_dt[:, None], mask=dt_ok[:, None] & n_ok[None, :], other=0.0)
                qk = tl.dot(q_tail, kT_tail, qk)
            if phase == 1:
                qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
            # -- online softmax: the running max is also the max logit --
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            # -- out += p @ v --
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_dv[None, :],
                        mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_ij

    # -- epilogue: out, logsumexp for the backward, and this block's max logit --
    acc = acc / l_i[:, None]
    row = bh.to(tl.int64) * T + offs_m
    tl.store(LSE + row, m_i + tl.math.log2(l_i), mask=m_ok)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    block_max = tl.max(tl.where(m_ok, m_i, float("-inf")), 0) / LOG2E
    tl.store(BLOCK_MAX + bh * max_stride + tl.program_id(0), block_max)


@triton.jit
def _attn_bwd_dq(
    Q,  # [B, H, T, QK_DIM], last dim contiguous
    K,  # [B, H, T, QK_DIM], last dim contiguous
    V,  # [B, H, T, V_DIM], last dim contiguous
    HEAD_SCALE,  # [H] fp32, or None
    DO,  # [B, H, T, V_DIM], last dim contiguous
    Out,  # [B, H, T, V_DIM], last dim contiguous, from the forward
    LSE,  # [B * H, T] fp32, from the forward
    DELTA,  # [B * H, T] fp32, written here: rowsum(dO * O), for this kernel and the dK/dV one
    DQ,  # [B, H, T, QK_DIM] contiguous
    sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt,
    H, T,
    stride_ob, stride_oh, stride_ot,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
    D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # a program per (query block, b * h); the longest rows first
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    logit_scale = sm_scale
    if HEAD_SCALE is not None:
        logit_scale = logit_scale * tl.load(HEAD_SCALE + off_h)
    qk_scale = logit_scale * LOG2E

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_dh = tl.arange(0, D_HEAD)
    dh_ok = _below(offs_dh, QK_DIM, D_HEAD)
    offs_dv = tl.arange(0, D_V)
    dv_ok = _below(offs_dv, V_DIM, D_V)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt
    q_head = tl.load(q_ptrs + offs_dh[None, :], mask=m_ok[:, None] & dh_ok[None, :], other=0.0)
    dq_head = tl.zeros([BLOCK_M, D_HEAD], tl.float32)
    if D_TAIL > 0:
        offs_dt = D_HEAD + tl.arange(0, D_TAIL)
        dt_ok = _below(offs_dt, QK_DIM, D_HEAD + D_TAIL)
        q_tail = tl.load(q_ptrs + offs_dt[None, :], mask=m_ok[:, None] & dt_ok[None, :], other=0.0)
        dq_tail = tl.zeros([BLOCK_M, D_TAIL], tl.float32)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dt + offs_dv[None, :],
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    row = bh.to(tl.int64) * T + offs_m
    lse = tl.load(LSE + row, mask=m_ok, other=float("inf"))  # rows past T: p = 0
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :],
                mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + row, delta, mask=m_ok)

    for phase in tl.static_range(2):
        if phase == 0:  # the key blocks wholly below the diagonal
            lo, hi = 0, start_m
        else:  # the diagonal block: causal mask, and keys past T
            lo, hi = start_m, tl.minimum(start_m + BLOCK_M, T)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if phase == 0:
                n_ok = tl.full([BLOCK_N], True, tl.int1)
            else:
                n_ok = offs_n < T
            # -- p, recomputed from the logsumexp --
            k_ptrs = k_base + offs_n[None, :] * stride_kt
            kT_head = tl.load(k_ptrs + offs_dh[:, None], mask=dh_ok[:, None] & n_ok[None, :], other=0.0)
            qk = tl.dot(q_head, kT_head)
            if D_TAIL > 0:
                kT_tail = tl.load(k_ptrs + offs_dt[:, None], mask=dt_ok[:, None] & n_ok[None, :], other=0.0)
                qk = tl.dot(q_tail, kT_tail, qk)
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            if phase == 1:
                p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            # -- dS = p * (dO @ v^T - delta), dq += dS @ k --
            vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_dv[:, None],
                         mask=dv_ok[:, None] & n_ok[None, :], other=0.0)
            dp = tl.dot(do, vT)
            ds = (p * (dp - delta[:, None])).to(kT_head.dtype)
            dq_head = tl.dot(ds, tl.trans(kT_head), dq_head)
            if D_TAIL > 0:
                dq_tail = tl.dot(ds, tl.trans(kT_tail), dq_tail)

    # -- epilogue: the logits' scale applies to dq once --
    dq_ptrs = DQ + row[:, None] * QK_DIM
    tl.store(dq_ptrs + offs_dh[None, :], (dq_head * logit_scale).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & dh_ok[None, :])
    if D_TAIL > 0:
        tl.store(dq_ptrs + offs_dt[None, :], (dq_tail * logit_scale).to(DQ.dtype.element_ty),
                 mask=m_ok[:, None] & dt_ok[None, :])


@triton.jit
def _attn_bwd_dkdv(
    Q,  # [B, H, T, QK_DIM], last dim contiguous
    K,  # [B, H, T, QK_DIM], last dim contiguous
    V,  # [B, H, T, V_DIM], last dim contiguous
    HEAD_SCALE,  # [H] fp32, or None
    DO,  # [B, H, T, V_DIM], last dim contiguous
    LSE,  # [B * H, T] fp32, from the forward
    DELTA,  # [B * H, T] fp32, from the dQ kernel
    DK,  # [B, H, T, QK_DIM] contiguous
    DV,  # [B, H, T, V_DIM] contiguous
    sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt,
    H, T,
    QK_DIM: tl.constexpr, V_DIM: tl.constexpr,
    D_HEAD: tl.constexpr, D_TAIL: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # a program per (key block, b * h); the first key blocks see the most queries and come first
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_db + off_h * stride_dh
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = DELTA + bh.to(tl.int64) * T

    logit_scale = sm_scale
    if HEAD_SCALE is not None:
        logit_scale = logit_scale * tl.load(HEAD_SCALE + off_h)
    qk_scale = logit_scale * LOG2E

    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    offs_dh = tl.arange(0, D_HEAD)
    dh_ok = _below(offs_dh, QK_DIM, D_HEAD)
    offs_dv = tl.arange(0, D_V)
    dv_ok = _below(offs_dv, V_DIM, D_V)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt
    k_head = tl.load(k_ptrs + offs_dh[None, :], mask=n_ok[:, None] & dh_ok[None, :], other=0.0)
    dk_head = tl.zeros([BLOCK_N, D_HEAD], tl.float32)
    if D_TAIL > 0:
        offs_dt = D_HEAD + tl.arange(0, D_TAIL)
        dt_ok = _below(offs_dt, QK_DIM, D_HEAD + D_TAIL)
        k_tail = tl.load(k_ptrs + offs_dt[None, :], mask=n_ok[:, None] & dt_ok[None, :], other=0.0)
        dk_tail = tl.zeros([BLOCK_N, D_TAIL], tl.float32)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_dv[None, :],
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    dv = tl.zeros([BLOCK_N, D_V], tl.float32)

    for phase in tl.static_range(2):
        if phase == 0:  # the diagonal: queries of this key block, causal mask
            lo, hi = start_n, tl.minimum(start_n + BLOCK_N, T)
        else:  # the query blocks wholly below it (the last one may run past T)
            lo, hi = start_n + BLOCK_N, T
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            # -- p^T, recomputed from the logsumexp; rows past T get lse = inf, so p = 0 --
            q_ptrs = q_base + offs_m[None, :] * stride_qt
            qT_head = tl.load(q_ptrs + offs_dh[:, None], mask=dh_ok[:, None] & m_ok[None, :], other=0.0)
            qkT = tl.dot(k_head, qT_head)
            if D_TAIL > 0:
                qT_tail = tl.load(q_ptrs + offs_dt[:, None], mask=dt_ok[:, None] & m_ok[None, :], other=0.0)
                qkT = tl.dot(k_tail, qT_tail, qkT)
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
            if phase == 0:
                pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
            # -- dv += p^T @ dO --
            do = tl.load(do_base + offs_m[:, None] * stride_dt + offs_dv[None, :],
                         mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv)
            # -- dS^T = p^T * (dP^T - delta), dk += dS^T @ q --
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
            dpT = tl.dot(v, tl.trans(do))
            dsT = (pT * (dpT - delta[None, :])).to(qT_head.dtype)
            dk_head = tl.dot(dsT, tl.trans(qT_head), dk_head)
            if D_TAIL > 0:
                dk_tail = tl.dot(dsT, tl.trans(qT_tail), dk_tail)

    # -- epilogue: the logits' scale applies to dk once, not to every dS --
    row = bh.to(tl.int64) * T + offs_n
    dk_ptrs = DK + row[:, None] * QK_DIM
    tl.store(dk_ptrs + offs_dh[None, :], (dk_head * logit_scale).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & dh_ok[None, :])
    if D_TAIL > 0:
        tl.store(dk_ptrs + offs_dt[None, :], (dk_tail * logit_scale).to(DK.dtype.element_ty),
                 mask=n_ok[:, None] & dt_ok[None, :])
    tl.store(DV + row[:, None] * V_DIM + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & dv_ok[None, :])


_attn_fwd_tuned = autotune(FWD_CONFIGS, key=TUNING_KEY)(_attn_fwd)
_attn_bwd_dq_tuned = autotune(DQ_CONFIGS, key=TUNING_KEY)(_attn_bwd_dq)
_attn_bwd_dkdv_tuned = autotune(DKDV_CONFIGS, key=TUNING_KEY)(_attn_bwd_dkdv)
MIN_FWD_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in FWD_CONFIGS)  # sizes the block-max buffer for any config


def _head_blocks(qk_dim: int, v_dim: int) -> dict[str, int]:
    """The constexpr head-dim blocks: qk as D_HEAD + D_TAIL (powers of two >= 16; D_TAIL = 0 when one block is
    exact), v as one block D_V. Padded columns are masked."""
    if qk_dim <= 16 or qk_dim & (qk_dim - 1) == 0:
        head, tail = max(qk_dim, 16), 0
    else:
        head = 1 << (qk_dim.bit_length() - 1)
        tail = max(16, triton.next_power_of_2(qk_dim - head))
    return {"QK_DIM": qk_dim, "V_DIM": v_dim, "D_HEAD": head, "D_TAIL": tail,
            "D_V": max(16, triton.next_power_of_2(v_dim))}


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale: float, head_scale: torch.Tensor | None):
        b, h, t, qk_dim = q.shape
        dims = _head_blocks(qk_dim, v.shape[-1])
        # laid out [b, t, h, dv], as the output projection reads it: merging the heads then copies nothing
        out = torch.empty((b, t, h, dims["V_DIM"]), dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty((b * h, t), dtype=torch.float32, device=q.device)
        block_max = torch.full((b * h, triton.cdiv(t, MIN_FWD_BLOCK_M)), -math.inf, dtype=torch.float32,
                               device=q.device)
        _attn_fwd_tuned[lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)](
            q, k, v, head_scale, out, lse, block_max, softmax_scale, *_strides(q), *_strides(k), *_strides(v),
            *_strides(out), block_max.stride(0), h, t, **dims)
        ctx.save_for_backward(q, k, v, out, lse, head_scale)
        ctx.softmax_scale = softmax_scale
        max_logit = block_max.view(b, h, -1).amax(dim=(0, 2))
        ctx.mark_non_differentiable(max_logit)
        return out, max_logit

    @staticmethod
    def backward(ctx, dout, _dmax_logit):
        q, k, v, out, lse, head_scale = ctx.saved_tensors
        b, h, t, qk_dim = q.shape
        dims = _head_blocks(qk_dim, v.shape[-1])
        dout = _last_dim_contiguous(dout)
        delta = torch.empty_like(lse)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        args = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout), h, t)
        _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)](
            q, k, v, head_scale, dout, out, lse, delta, dq, ctx.softmax_scale, *args, *_strides(out), **dims)
        _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(t, meta["BLOCK_N"]), b * h)](
            q, k, v, head_scale, dout, lse, delta, dk, dv, ctx.softmax_scale, *args, **dims)
        return dq, dk, dv, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
              head_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention: q, k [b, h, t, dqk], v [b, h, t, dv] -> (out [b, h, t, dv] in q's dtype, max_logit [h] fp32).

    out is a view of [b, t, h, dv] storage, so that out.transpose(1, 2) is contiguous.

    Query i sees keys 0..i. Head h's logits are `softmax_scale * head_scale[h] * q . k`; `head_scale` [h] is
    QK-Clip's positive per-head scale for frozen weights, a constant (no gradient flows to it). `max_logit` is the
    max over batch, queries and unmasked keys of those logits; it has no gradient. dq, dk and dv flow through
    autograd. Needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"attention: {name} must be [batch, heads, seq, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"attention: {name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"attention: {name} is {x.dtype} on {x.device}, q is {q.dtype} on {q.device}")
    if not (q.is_cuda or INTERPRETED):
        raise ValueError(f"attention: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share "
                         "[batch, heads, seq], and k the head dim of q")
    if q.shape[2] == 0 or q.shape[3] > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"attention: needs seq >= 1 and head dims <= {MAX_HEAD_DIM}, got q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}")
    if head_scale is not None:
        if head_scale.shape != (q.shape[1],) or not head_scale.is_floating_point() or head_scale.device != q.device:
            raise ValueError(f"attention: head_scale must be a float tensor [{q.shape[1]}] on {q.device}, got "
                             f"{head_scale.dtype} {tuple(head_scale.shape)} on {head_scale.device}")
        head_scale = head_scale.detach().to(torch.float32).contiguous()
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _Attention.apply(q, k, v, float(softmax_scale), head_scale)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                        head_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k2c's torch numerics, which the kernel must match: scores materialised in q's dtype, softmax in fp32; the max
    logit, as the kernel's, carries no gradient."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * softmax_scale  # [b, h, t, t]
    if head_scale is not None:
        scores = scores * head_scale.to(scores.dtype).view(-1, 1, 1)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    with torch.no_grad():
        max_logit = scores.amax(dim=(0, 2, 3)).float()  # masked entries are -inf and never win
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v, max_logit
