"""MLA's causal attention, read straight from its projections, as flash attention that also returns each head's
max pre-softmax logit.

Why the max logit: MuonClip's QK-Clip needs, after every forward, the largest logit of each head. The torch path
gets it by materialising the [b, h, t, t] scores, several times the cost of the attention itself; FlexAttention
returns it (`AuxRequest(max_scores=True)`) but runs about 2.6x slower than SDPA at MLA head dims. Here the forward
is FlashAttention-2's online softmax, whose running row max already is the max logit: each program writes the max
over its query rows into a [b * h, row blocks] buffer, and one tiny amax gives [h]. No pass over the scores is
added.

Why from the projections: a head of MLA's q is [dn dims without rope | dr rotary dims], its key [dn dims from kv_b's
output | the one rotary key of the token, shared by every head], its value the other dims of kv_b's output. Laying
out q, k and v as [b, h, t, d] tensors first moves every byte of both projections twice (once each way, about 4 ms
a step at k2-1b's shape on an H200). Instead the kernels split the qk dot product in two, as MLA's heads split: the
dims without rope are read in place through strides from q's and kv_b's outputs, v likewise, and the rotary part
from what `rope.rotate` writes (q's rotary dims [b, t, h, dr] and the key [b, t, dr], the key read by every head
with a head stride of 0). The backward writes dq's dims without rope into q's gradient, and dk's and dv into kv_b's,
in place, and leaves the rotary ones to `rope.rotate_back`. Triton blocks are powers of two of at least 16, so
dims that are not are padded and masked (dn 24 as a block of 32).

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
from k2c.runtime.kernels import rope as rope_kernel
from k2c.runtime.kernels.tuning import autotune

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x log2 e), the fast one
MAX_HEAD_DIM = ATTENTION_MAX_HEAD_DIM
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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
TUNING_KEY = ["T", "DN", "DR", "DV"]


@triton.jit
def _below(offs, n: tl.constexpr, END: tl.constexpr):
    """offs < n for a block of offsets that ends at END: a constant when END <= n, so that no predicate is built."""
    if END <= n:
        ok = tl.full(offs.shape, True, tl.int1)
    else:
        ok = offs < n
    return ok


@triton.jit
def _logit_scales(sm_scale, HEAD_SCALE, off_h):
    """Head off_h's logit scale (softmax_scale, times QK-Clip's head scale where there is one), and that scale in
    units of log2, for exp2."""
    logit_scale = sm_scale
    if HEAD_SCALE is not None:
        logit_scale = logit_scale * tl.load(HEAD_SCALE + off_h)
    return logit_scale, logit_scale * LOG2E


@triton.jit
def _head_dims(DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BLOCK_DN: tl.constexpr,
               BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The offsets of a head's dims without rope, its rotary dims and its value dims, each with its mask."""
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    return (offs_dn, _below(offs_dn, DN, BLOCK_DN), offs_dr, _below(offs_dr, DR, BLOCK_DR), offs_dv,
            _below(offs_dv, DV, BLOCK_DV))


@triton.jit
def _attn_fwd(
    Q,  # [B, H, T, DN] strided, last dim contiguous: q's dims without rope
    Q_ROT,  # [B, H, T, DR] strided, last dim contiguous: q's rotary dims, rotated
    K,  # [B, H, T, DN] strided, last dim contiguous: k's dims without rope
    K_ROT,  # [B, H, T, DR] strided, last dim contiguous: the rotated key (head stride 0 when the heads share it)
    V,  # [B, H, T, DV] strided, last dim contiguous
    HEAD_SCALE,  # [H] fp32, or None
    Out,  # [B, H, T, DV] strided, last dim contiguous
    LSE,  # [B * H, T] fp32: each row's log2 of sum(exp2(logit * log2 e))
    BLOCK_MAX,  # [B * H, max_stride] fp32, -inf where no program writes: max logit over each query block
    sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_qrb, stride_qrh, stride_qrt,
    stride_kb, stride_kh, stride_kt,
    stride_krb, stride_krh, stride_krt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    max_stride, H, T,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,  # the dims rounded up to powers of 2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # a program per (query block, b * h); the longest rows first, so that the short ones fill the last wave
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    kr_base = K_ROT + off_b * stride_krb + off_h * stride_krh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    logit_scale, qk_scale = _logit_scales(sm_scale, HEAD_SCALE, off_h)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_dn, dn_ok, offs_dr, dr_ok, offs_dv, dv_ok = _head_dims(DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_dn[None, :],
                mask=m_ok[:, None] & dn_ok[None, :], other=0.0)
    q_rot = tl.load(Q_ROT + off_b * stride_qrb + off_h * stride_qrh + offs_m[:, None] * stride_qrt + offs_dr[None, :],
                    mask=m_ok[:, None] & dr_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of logit * log2 e
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(logit * log2 e - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
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
            # -- logits of this key block: q @ k^T, the dims without rope and the rotary ones --
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_dn[:, None], mask=dn_ok[:, None] & n_ok[None, :],
                         other=0.0)
            kT_rot = tl.load(kr_base + offs_n[None, :] * stride_krt + offs_dr[:, None],
                             mask=dr_ok[:, None] & n_ok[None, :], other=0.0)
            qk = tl.dot(q_rot, kT_rot, tl.dot(q, kT))
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
    Q, Q_ROT, K, K_ROT, V,  # as the forward's
    HEAD_SCALE,  # [H] fp32, or None
    DO,  # [B, H, T, DV] strided, last dim contiguous
    Out,  # [B, H, T, DV] strided, last dim contiguous, from the forward
    LSE,  # [B * H, T] fp32, from the forward
    DELTA,  # [B * H, T] fp32, written here: rowsum(dO * O), for this kernel and the dK/dV one
    DQ,  # [B, H, T, DN] strided, last dim contiguous: the gradient of Q
    DQ_ROT,  # [B, H, T, DR] strided, last dim contiguous: of Q_ROT
    sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_qrb, stride_qrh, stride_qrt,
    stride_kb, stride_kh, stride_kt,
    stride_krb, stride_krh, stride_krt,
    stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt,
    H, T,
    stride_ob, stride_oh, stride_ot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_dqrb, stride_dqrh, stride_dqrt,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # a program per (query block, b * h); the longest rows first
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    kr_base = K_ROT + off_b * stride_krb + off_h * stride_krh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    logit_scale, qk_scale = _logit_scales(sm_scale, HEAD_SCALE, off_h)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    offs_dn, dn_ok, offs_dr, dr_ok, offs_dv, dv_ok = _head_dims(DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_dn[None, :],
                mask=m_ok[:, None] & dn_ok[None, :], other=0.0)
    q_rot = tl.load(Q_ROT + off_b * stride_qrb + off_h * stride_qrh + offs_m[:, None] * stride_qrt + offs_dr[None, :],
                    mask=m_ok[:, None] & dr_ok[None, :], other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DN], tl.float32)
    dq_rot = tl.zeros([BLOCK_M, BLOCK_DR], tl.float32)
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
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_dn[:, None], mask=dn_ok[:, None] & n_ok[None, :],
                         other=0.0)
            kT_rot = tl.load(kr_base + offs_n[None, :] * stride_krt + offs_dr[:, None],
                             mask=dr_ok[:, None] & n_ok[None, :], other=0.0)
            qk = tl.dot(q_rot, kT_rot, tl.dot(q, kT))
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
            if phase == 1:
                p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            # -- dS = p * (dO @ v^T - delta), dq += dS @ k --
            vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_dv[:, None],
                         mask=dv_ok[:, None] & n_ok[None, :], other=0.0)
            dp = tl.dot(do, vT)
            ds = (p * (dp - delta[:, None])).to(kT.dtype)
            dq = tl.dot(ds, tl.trans(kT), dq)
            dq_rot = tl.dot(ds, tl.trans(kT_rot), dq_rot)

    # -- epilogue: the logits' scale applies to dq once --
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_dn[None, :],
             (dq * logit_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & dn_ok[None, :])
    tl.store(DQ_ROT + off_b * stride_dqrb + off_h * stride_dqrh + offs_m[:, None] * stride_dqrt + offs_dr[None, :],
             (dq_rot * logit_scale).to(DQ_ROT.dtype.element_ty), mask=m_ok[:, None] & dr_ok[None, :])


@triton.jit
def _attn_bwd_dkdv(
    Q, Q_ROT, K, K_ROT, V,  # as the forward's
    HEAD_SCALE,  # [H] fp32, or None
    DO,  # [B, H, T, DV] strided, last dim contiguous
    LSE,  # [B * H, T] fp32, from the forward
    DELTA,  # [B * H, T] fp32, from the dQ kernel
    DK,  # [B, H, T, DN] strided, last dim contiguous: the gradient of K
    DK_ROT,  # [B, H, T, DR] strided, last dim contiguous: of this head's read of K_ROT (the heads' sum is the caller's)
    DVALUE,  # [B, H, T, DV] strided, last dim contiguous: of V
    sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_qrb, stride_qrh, stride_qrt,
    stride_kb, stride_kh, stride_kt,
    stride_krb, stride_krh, stride_krt,
    stride_vb, stride_vh, stride_vt,
    stride_db, stride_dh, stride_dt,
    H, T,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dkrb, stride_dkrh, stride_dkrt,
    stride_dvb, stride_dvh, stride_dvt,
    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # a program per (key block, b * h); the first key blocks see the most queries and come first
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    qr_base = Q_ROT + off_b * stride_qrb + off_h * stride_qrh
    do_base = DO + off_b * stride_db + off_h * stride_dh
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = DELTA + bh.to(tl.int64) * T

    logit_scale, qk_scale = _logit_scales(sm_scale, HEAD_SCALE, off_h)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < T
    offs_dn, dn_ok, offs_dr, dr_ok, offs_dv, dv_ok = _head_dims(DN, DR, DV, BLOCK_DN, BLOCK_DR, BLOCK_DV)
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_dn[None, :],
                mask=n_ok[:, None] & dn_ok[None, :], other=0.0)
    k_rot = tl.load(K_ROT + off_b * stride_krb + off_h * stride_krh + offs_n[:, None] * stride_krt + offs_dr[None, :],
                    mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_dv[None, :],
                mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DN], tl.float32)
    dk_rot = tl.zeros([BLOCK_N, BLOCK_DR], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    for phase in tl.static_range(2):
        if phase == 0:  # the diagonal: queries of this key block, causal mask
            lo, hi = start_n, tl.minimum(start_n + BLOCK_N, T)
        else:  # the query blocks wholly below it (the last one may run past T)
            lo, hi = start_n + BLOCK_N, T
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            # -- p^T, recomputed from the logsumexp; rows past T get lse = inf, so p = 0 --
            qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_dn[:, None], mask=dn_ok[:, None] & m_ok[None, :],
                         other=0.0)
            qT_rot = tl.load(qr_base + offs_m[None, :] * stride_qrt + offs_dr[:, None],
                             mask=dr_ok[:, None] & m_ok[None, :], other=0.0)
            qkT = tl.dot(k_rot, qT_rot, tl.dot(k, qT))
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
            dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
            dk = tl.dot(dsT, tl.trans(qT), dk)
            dk_rot = tl.dot(dsT, tl.trans(qT_rot), dk_rot)

    # -- epilogue: the logits' scale applies to dk once, not to every dS --
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkt + offs_dn[None, :],
             (dk * logit_scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & dn_ok[None, :])
    tl.store(DK_ROT + off_b * stride_dkrb + off_h * stride_dkrh + offs_n[:, None] * stride_dkrt + offs_dr[None, :],
             (dk_rot * logit_scale).to(DK_ROT.dtype.element_ty), mask=n_ok[:, None] & dr_ok[None, :])
    tl.store(DVALUE + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvt + offs_dv[None, :],
             dv.to(DVALUE.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])


_attn_fwd_tuned = autotune(FWD_CONFIGS, key=TUNING_KEY)(_attn_fwd)
_attn_bwd_dq_tuned = autotune(DQ_CONFIGS, key=TUNING_KEY)(_attn_bwd_dq)
_attn_bwd_dkdv_tuned = autotune(DKDV_CONFIGS, key=TUNING_KEY)(_attn_bwd_dkdv)
MIN_FWD_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in FWD_CONFIGS)  # sizes the block-max buffer for any config


def _dims(dn: int, dr: int, dv: int) -> dict[str, int]:
    """The constexpr head dims and their blocks: powers of two of at least 16, the padding masked."""
    return {"DN": dn, "DR": dr, "DV": dv, **{f"BLOCK_{name}": max(16, triton.next_power_of_2(d))
                                             for name, d in (("DN", dn), ("DR", dr), ("DV", dv))}}


def _bht(x: torch.Tensor) -> tuple[int, int, int]:
    """The batch, head and token strides of a [b, h, t, d] view."""
    return x.stride(0), x.stride(1), x.stride(2)


def _heads(x: torch.Tensor, heads: int, *widths: int) -> list[torch.Tensor]:
    """x [b, t, heads * sum(widths)] -> each head's consecutive slices of those widths, as [b, h, t, width] views."""
    return list(x.unflatten(-1, (heads, -1)).transpose(1, 2).split(widths, dim=-1))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_rot, kv, cos, sin, head_scale, heads: int, interleaved: bool, softmax_scale: float):
        b, t, dr = k_rot.shape
        dn = q.shape[-1] // heads - dr
        dv = kv.shape[-1] // heads - dn
        q_rot, k_rope = rope_kernel.rotate(q, k_rot, cos, sin, heads, interleaved)
        q_nope, _ = _heads(q, heads, dn, dr)
        k_nope, v = _heads(kv, heads, dn, dv)
        q_rope = q_rot.transpose(1, 2)
        k_rope = k_rope.unsqueeze(1).expand(b, heads, t, dr)  # one rotary key for every head: head stride 0
        # laid out [b, t, h, dv], as the output projection reads it: merging the heads then copies nothing
        out = torch.empty((b, t, heads * dv), dtype=q.dtype, device=q.device)
        (out_heads,) = _heads(out, heads, dv)
        lse = torch.empty((b * heads, t), dtype=torch.float32, device=q.device)
        block_max = torch.full((b * heads, triton.cdiv(t, MIN_FWD_BLOCK_M)), -math.inf, dtype=torch.float32,
                               device=q.device)
        _attn_fwd_tuned[lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * heads)](
            q_nope, q_rope, k_nope, k_rope, v, head_scale, out_heads, lse, block_max, softmax_scale,
            *_bht(q_nope), *_bht(q_rope), *_bht(k_nope), *_bht(k_rope), *_bht(v), *_bht(out_heads),
            block_max.stride(0), heads, t, **_dims(dn, dr, dv))
        ctx.save_for_backward(q, kv, q_rot, k_rope, out, lse, cos, sin, head_scale)
        ctx.heads, ctx.interleaved, ctx.softmax_scale = heads, interleaved, softmax_scale
        max_logit = block_max.view(b, heads, -1).amax(dim=(0, 2))
        ctx.mark_non_differentiable(max_logit)
        return out, max_logit

    @staticmethod
    def backward(ctx, dout, _dmax_logit):
        q, kv, q_rot, k_rope, out, lse, cos, sin, head_scale = ctx.saved_tensors
        heads = ctx.heads
        b, t, _, dr = q_rot.shape
        dn = q.shape[-1] // heads - dr
        dv = kv.shape[-1] // heads - dn
        q_nope, _ = _heads(q, heads, dn, dr)
        k_nope, v = _heads(kv, heads, dn, dv)
        q_rope = q_rot.transpose(1, 2)
        (out_heads,) = _heads(out, heads, dv)
        (dout_heads,) = _heads(_last_dim_contiguous(dout), heads, dv)
        # the dims without rope go straight into the projections' gradients; the rotary ones into [b, t, h, dr]
        # buffers that `rope.rotate_back` rotates back and, for the key, sums over the heads
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dkv = torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)
        dq_rot = torch.empty_like(q_rot)
        dk_rot = torch.empty_like(q_rot)
        dq_nope, _ = _heads(dq, heads, dn, dr)
        dk_nope, dv_heads = _heads(dkv, heads, dn, dv)
        dq_rope, dk_rope = dq_rot.transpose(1, 2), dk_rot.transpose(1, 2)
        delta = torch.empty_like(lse)
        dims = _dims(dn, dr, dv)
        inputs = (q_nope, q_rope, k_nope, k_rope, v, head_scale)
        strides = (*_bht(q_nope), *_bht(q_rope), *_bht(k_nope), *_bht(k_rope), *_bht(v), *_bht(dout_heads),
                   heads, t)
        _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * heads)](
            *inputs, dout_heads, out_heads, lse, delta, dq_nope, dq_rope, ctx.softmax_scale, *strides,
            *_bht(out_heads), *_bht(dq_nope), *_bht(dq_rope), **dims)
        _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(t, meta["BLOCK_N"]), b * heads)](
            *inputs, dout_heads, lse, delta, dk_nope, dk_rope, dv_heads, ctx.softmax_scale, *strides,
            *_bht(dk_nope), *_bht(dk_rope), *_bht(dv_heads), **dims)
        dk = rope_kernel.rotate_back(dq_rot, dk_rot, cos, sin, dq, ctx.interleaved)
        return dq, dk, dkv, None, None, None, None, None, None


def _check_inputs(q: torch.Tensor, k_rot: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  heads: int, head_scale: torch.Tensor | None) -> None:
    if q.ndim != 3 or k_rot.ndim != 3 or kv.ndim != 3:
        raise ValueError(f"attention: q, k_rot and kv must be [batch, seq, dims], found shapes {tuple(q.shape)}, "
                         f"{tuple(k_rot.shape)} and {tuple(kv.shape)}")
    b, t, dr = k_rot.shape
    if q.shape[:2] != (b, t) or kv.shape[:2] != (b, t) or t == 0:
        raise ValueError(f"attention: q {tuple(q.shape)}, k_rot {tuple(k_rot.shape)} and kv {tuple(kv.shape)} "
                         "must share a batch and a non-empty sequence")
    if heads < 1 or q.shape[-1] % heads or kv.shape[-1] % heads:
        raise ValueError(f"attention: q's dims {q.shape[-1]} and kv's {kv.shape[-1]} must split into {heads} heads")
    dn = q.shape[-1] // heads - dr
    dv = kv.shape[-1] // heads - dn
    if dr % 2 or dr == 0 or dn < 1 or dv < 1 or max(dn + dr, dv) > MAX_HEAD_DIM:
        raise ValueError(f"attention: a head of q ({q.shape[-1] // heads} dims) must be dn + dr and one of kv "
                         f"({kv.shape[-1] // heads}) dn + dv, with dn, dv >= 1, dr = k_rot's {dr} even and >= 2, "
                         f"and dn + dr and dv at most {MAX_HEAD_DIM}")
    for name, x in (("q", q), ("k_rot", k_rot), ("kv", kv), ("cos", cos), ("sin", sin)):
        if x.dtype not in DTYPES or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"attention: {name} must be fp32, bf16 or fp16, as q ({q.dtype} on {q.device}), "
                             f"found {x.dtype} on {x.device}")
    if not (q.is_cuda or INTERPRETED):
        raise ValueError(f"attention: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (t, dr // 2):
            raise ValueError(f"attention: {name} must have shape ({t}, {dr // 2}), found {tuple(x.shape)}")
        if x.requires_grad:
            raise ValueError(f"attention: {name} is taken as a constant and gets no gradient, but it requires one")
    if head_scale is not None and (head_scale.shape != (heads,) or not head_scale.is_floating_point()
                                   or head_scale.device != q.device):
        raise ValueError(f"attention: head_scale must be a float tensor [{heads}] on {q.device}, got "
                         f"{head_scale.dtype} {tuple(head_scale.shape)} on {head_scale.device}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(q: torch.Tensor, k_rot: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              heads: int, interleaved: bool, softmax_scale: float,
              head_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's causal attention from its projections: (out [b, t, h*dv] in q's dtype, max_logit [h] fp32).

    q [b, t, h*(dn+dr)] is the q projection, k_rot [b, t, dr] the rotary key (kv_a's last dims, a slice), kv
    [b, t, h*(dn+dv)] kv_b's output; cos and sin [t, dr/2] are RoPE's tables, constants. Each head attends with
    q = [q_nope, rope(q_rot)], k = [k_nope, rope(k_rot)] and v (`attention_inputs_reference`); query i sees keys
    0..i. Head h's logits are `softmax_scale * head_scale[h] * q . k`; `head_scale` [h] is QK-Clip's positive
    per-head scale for frozen weights, a constant. `max_logit` is the max over batch, queries and unmasked keys of
    those logits; it has no gradient. q, k_rot and kv get theirs through autograd. Needs CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1.
    """
    _check_inputs(q, k_rot, kv, cos, sin, heads, head_scale)
    if head_scale is not None:
        head_scale = head_scale.detach().to(torch.float32).contiguous()
    q, k_rot, kv = (_last_dim_contiguous(x) for x in (q, k_rot, kv))
    return _Attention.apply(q, k_rot, kv, cos.contiguous(), sin.contiguous(), head_scale, heads, interleaved,
                            float(softmax_scale))


def attention_inputs_reference(q: torch.Tensor, k_rot: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, heads: int,
                               interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [b, t, h*(dn+dr)], the rotary key k_rot [b, t, dr], kv [b, t, h*(dn+dv)] -> q, k [b, h, t, dn+dr] and
    v [b, h, t, dv]: q's rotary dims and the key rotated by cos/sin [t, dr/2] (`rope_reference`), the key shared by
    every head. k2c's torch path, step by step: slices, two rotations, two concatenations, and v a view of kv."""
    b, t, _ = q.shape
    q = q.view(b, t, heads, -1).transpose(1, 2)  # [b, h, t, dn+dr]
    dn = q.shape[-1] - k_rot.shape[-1]
    kv = kv.view(b, t, heads, -1).transpose(1, 2)  # [b, h, t, dn+dv]
    k_nope, v = kv.split([dn, kv.shape[-1] - dn], dim=-1)
    q_rot = rope_kernel.rope_reference(q[..., dn:], cos, sin, interleaved)
    k_rot = rope_kernel.rope_reference(k_rot.unsqueeze(1), cos, sin, interleaved)
    q = torch.cat([q[..., :dn], q_rot], dim=-1)
    k = torch.cat([k_nope, k_rot.expand(-1, heads, -1, -1)], dim=-1)  # one rotary key for all heads
    return q, k, v


def attention_reference(q: torch.Tensor, k_rot: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, heads: int, interleaved: bool, softmax_scale: float,
                        head_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k2c's torch numerics, which the kernels must match: `attention_inputs_reference`, then the scores
    materialised in q's dtype, softmax in fp32; the max logit, as the kernel's, carries no gradient."""
    b, t, _ = q.shape
    q, k, v = attention_inputs_reference(q, k_rot, kv, cos, sin, heads, interleaved)
    scores = (q @ k.transpose(-2, -1)) * softmax_scale  # [b, h, t, t]
    if head_scale is not None:
        scores = scores * head_scale.to(scores.dtype).view(-1, 1, 1)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    with torch.no_grad():
        max_logit = scores.amax(dim=(0, 2, 3)).float()  # masked entries are -inf and never win
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).transpose(1, 2).reshape(b, t, -1), max_logit
