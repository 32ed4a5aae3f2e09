"""MLA's attention inputs, q, k and v, laid out for the attention kernel with RoPE applied: one pass each way.

Each head's slice of the q projection is [dn dims without rope | dr rotary dims], its slice of kv_b's output
[dn key dims without rope | dv value dims], and one rotary key [dr] per token, kv_a's last dims, serves every head.
Attention takes, per head, q = [q_nope, rope(q_rot)], k = [k_nope, rope(k_rot)] and v. Eager torch builds them with
two RoPE passes, two concatenations and strided views; in the backward, the gradient of every slice is a
zero-filled tensor the size of the whole projection, and autograd adds those up.

Here the forward reads q, kv and the rotary key once and writes q, k and v once, as contiguous [b, h, t, d] tensors:
the attention kernel reads each head's rows as one block, and its gradients come back in that layout, so the
backward reads them in order too. v is copied rather than viewed, so that the attention keeps [b, h, t, dv] for
its backward instead of the whole kv projection. The backward reads dq, dk and dv once and writes dq into q's
layout (the rotary dims rotated back), k_nope's and v's gradients side by side into one tensor of kv's layout, and
the rotary key's gradient: the sum over heads of their dk rotary dims, accumulated in fp32 and rotated back once.
A backward program walks all the heads of its tokens to make that sum, so it needs no atomics and is deterministic.

The rotary dims come out as [first of each pair, second of each pair], whether the input pairs are interleaved
(dims 2i, 2i + 1) or not (i, i + dr/2), as in `rope.py`: q and k get the same permutation, so their dot products
do not change.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from k2c.runtime.kernels.rope import rope_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FWD_TILE = 4096  # elements of the widest [tokens, dims] block a forward program moves at once
BWD_TILE = 2048  # the same for the backward, whose programs carry the rotary sum and walk every head


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
    q_rot = rope_reference(q[..., dn:], cos, sin, interleaved)
    k_rot = rope_reference(k_rot.unsqueeze(1), cos, sin, interleaved)
    q = torch.cat([q[..., :dn], q_rot], dim=-1)
    k = torch.cat([k_nope, k_rot.expand(-1, heads, -1, -1)], dim=-1)  # one rotary key for all heads
    return q, k, v


@triton.jit
def _pair_dims(i, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """The dims of the pairs i of a rotary input: (2i, 2i + 1) when interleaved, else (i, i + HALF)."""
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    return first, second


@triton.jit
def _rotate(x1, x2, cos, sin):
    """The pairs (x1, x2) rotated by the angles whose cosines and sines are given (pass -sin to rotate back)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _inputs_fwd(
    Q,  # [B, T, H * (DN + 2 * HALF)], last dim contiguous
    K_ROT,  # [B, T, 2 * HALF], last dim contiguous: the rotary key of every head
    KV,  # [B, T, H * (DN + DV)], last dim contiguous
    COS,  # [T, HALF] contiguous
    SIN,  # [T, HALF] contiguous
    Q_OUT,  # [B, H, T, DN + 2 * HALF] contiguous
    K_OUT,  # [B, H, T, DN + 2 * HALF] contiguous
    V_OUT,  # [B, H, T, DV] contiguous
    stride_qb, stride_qt,
    stride_rb, stride_rt,
    stride_kvb, stride_kvt,
    H, T,
    DN: tl.constexpr, HALF: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,  # the dims rounded up to powers of 2
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # a program per (token block, b * h): the key's rotation is redone per head, from a [tokens, dr] tile
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # offsets can pass 2**31
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = (t < T)[:, None]
    t = t[:, None]
    dn = tl.arange(0, BLOCK_DN)[None, :]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    dv = tl.arange(0, BLOCK_DV)[None, :]
    nope_ok, pair_ok, v_ok = t_ok & (dn < DN), t_ok & (i < HALF), t_ok & (dv < DV)
    first, second = _pair_dims(i, HALF, INTERLEAVED)
    cos = tl.load(COS + t * HALF + i, mask=pair_ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * HALF + i, mask=pair_ok, other=0.0).to(tl.float32)
    qk = DN + 2 * HALF
    row = (b * H + h) * T + t  # of q, k and v out

    # -- q: its dims without rope copied, its rotary pairs rotated into [firsts, seconds] --
    q_in = Q + b * stride_qb + t * stride_qt + h * qk
    q_out = Q_OUT + row * qk
    tl.store(q_out + dn, tl.load(q_in + dn, mask=nope_ok), mask=nope_ok)
    x1 = tl.load(q_in + DN + first, mask=pair_ok, other=0.0).to(tl.float32)
    x2 = tl.load(q_in + DN + second, mask=pair_ok, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, cos, sin)
    tl.store(q_out + DN + i, y1.to(Q_OUT.dtype.element_ty), mask=pair_ok)
    tl.store(q_out + DN + HALF + i, y2.to(Q_OUT.dtype.element_ty), mask=pair_ok)

    # -- k: head h's key dims without rope, then the shared rotary key, rotated --
    kv_in = KV + b * stride_kvb + t * stride_kvt + h * (DN + DV)
    k_out = K_OUT + row * qk
    tl.store(k_out + dn, tl.load(kv_in + dn, mask=nope_ok), mask=nope_ok)
    r_in = K_ROT + b * stride_rb + t * stride_rt
    x1 = tl.load(r_in + first, mask=pair_ok, other=0.0).to(tl.float32)
    x2 = tl.load(r_in + second, mask=pair_ok, other=0.0).to(tl.float32)
    y1, y2 = _rotate(x1, x2, cos, sin)
    tl.store(k_out + DN + i, y1.to(K_OUT.dtype.element_ty), mask=pair_ok)
    tl.store(k_out + DN + HALF + i, y2.to(K_OUT.dtype.element_ty), mask=pair_ok)

    # -- v: head h's value dims --
    tl.store(V_OUT + row * DV + dv, tl.load(kv_in + DN + dv, mask=v_ok), mask=v_ok)


@triton.jit
def _inputs_bwd(
    DQ_OUT,  # [B, H, T, DN + 2 * HALF], strided: the gradient of q out
    DK_OUT,  # [B, H, T, DN + 2 * HALF], strided: of k out
    DV_OUT,  # [B, H, T, DV], strided: of v out
    COS,  # [T, HALF] contiguous
    SIN,  # [T, HALF] contiguous
    DQ,  # [B, T, H * (DN + 2 * HALF)] contiguous: q's gradient
    DK_ROT,  # [B, T, 2 * HALF] contiguous: the rotary key's
    DKV,  # [B, T, H * (DN + DV)] contiguous: kv's
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T,
    DN: tl.constexpr, HALF: tl.constexpr, DV: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DV: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # a program per (token block, b), walking the heads: the rotary key's gradient sums over them
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = (t < T)[:, None]
    t = t[:, None]
    dn = tl.arange(0, BLOCK_DN)[None, :]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    dv = tl.arange(0, BLOCK_DV)[None, :]
    nope_ok, pair_ok, v_ok = t_ok & (dn < DN), t_ok & (i < HALF), t_ok & (dv < DV)
    first, second = _pair_dims(i, HALF, INTERLEAVED)
    cos = tl.load(COS + t * HALF + i, mask=pair_ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + t * HALF + i, mask=pair_ok, other=0.0).to(tl.float32)
    qk = DN + 2 * HALF

    # head 0's rows; each step of the walk moves them to the next head
    dq_out = DQ_OUT + b * stride_dqb + t * stride_dqt
    dk_out = DK_OUT + b * stride_dkb + t * stride_dkt
    dv_out = DV_OUT + b * stride_dvb + t * stride_dvt
    dq = DQ + (b * T + t) * (H * qk)
    dkv = DKV + (b * T + t) * (H * (DN + DV))
    dk_rot1 = tl.zeros([BLOCK_T, BLOCK_HALF], tl.float32)  # sum over heads of the firsts of the pairs
    dk_rot2 = tl.zeros([BLOCK_T, BLOCK_HALF], tl.float32)  # and of the seconds
    for _ in range(H):
        # -- dq: the dims without rope as they are, the rotary pairs rotated back into q's layout --
        tl.store(dq + dn, tl.load(dq_out + dn * stride_dqd, mask=nope_ok), mask=nope_ok)
        y1 = tl.load(dq_out + (DN + i) * stride_dqd, mask=pair_ok, other=0.0).to(tl.float32)
        y2 = tl.load(dq_out + (DN + HALF + i) * stride_dqd, mask=pair_ok, other=0.0).to(tl.float32)
        x1, x2 = _rotate(y1, y2, cos, -sin)
        tl.store(dq + DN + first, x1.to(DQ.dtype.element_ty), mask=pair_ok)
        tl.store(dq + DN + second, x2.to(DQ.dtype.element_ty), mask=pair_ok)
        # -- dkv: the key dims without rope, then the value dims; the rotary dims of dk join the sum --
        tl.store(dkv + dn, tl.load(dk_out + dn * stride_dkd, mask=nope_ok), mask=nope_ok)
        dk_rot1 += tl.load(dk_out + (DN + i) * stride_dkd, mask=pair_ok, other=0.0).to(tl.float32)
        dk_rot2 += tl.load(dk_out + (DN + HALF + i) * stride_dkd, mask=pair_ok, other=0.0).to(tl.float32)
        tl.store(dkv + DN + dv, tl.load(dv_out + dv * stride_dvd, mask=v_ok), mask=v_ok)
        dq_out += stride_dqh
        dk_out += stride_dkh
        dv_out += stride_dvh
        dq += qk
        dkv += DN + DV

    # -- the rotary key: the sum rotated back, once --
    x1, x2 = _rotate(dk_rot1, dk_rot2, cos, -sin)
    dk_rot = DK_ROT + (b * T + t) * (2 * HALF)
    tl.store(dk_rot + first, x1.to(DK_ROT.dtype.element_ty), mask=pair_ok)
    tl.store(dk_rot + second, x2.to(DK_ROT.dtype.element_ty), mask=pair_ok)


def _blocks(dn: int, half: int, dv: int, tile: int, t: int) -> tuple[dict[str, int], int]:
    """The constexpr dims and their power-of-two blocks, and the tokens per program for a tile of `tile` elements."""
    blocks = {"BLOCK_DN": triton.next_power_of_2(dn), "BLOCK_HALF": triton.next_power_of_2(half),
              "BLOCK_DV": triton.next_power_of_2(dv)}
    block_t = min(max(1, tile // max(blocks.values())), triton.next_power_of_2(t))
    return {"DN": dn, "HALF": half, "DV": dv, **blocks, "BLOCK_T": block_t}, block_t


class _AttentionInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k_rot: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                heads: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = q.shape
        dr = k_rot.shape[-1]
        dn = q.shape[-1] // heads - dr
        dv = kv.shape[-1] // heads - dn
        q_out = torch.empty((b, heads, t, dn + dr), dtype=q.dtype, device=q.device)
        k_out = torch.empty((b, heads, t, dn + dr), dtype=q.dtype, device=q.device)
        v_out = torch.empty((b, heads, t, dv), dtype=q.dtype, device=q.device)
        dims, block_t = _blocks(dn, dr // 2, dv, FWD_TILE, t)
        _inputs_fwd[(triton.cdiv(t, block_t), b * heads)](
            q, k_rot, kv, cos, sin, q_out, k_out, v_out, q.stride(0), q.stride(1), k_rot.stride(0), k_rot.stride(1),
            kv.stride(0), kv.stride(1), heads, t, INTERLEAVED=interleaved, **dims, num_warps=4)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return q_out, k_out, v_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor, dv_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        b, heads, t, qk = dq_out.shape
        dr = 2 * cos.shape[-1]
        dn, dv = qk - dr, dv_out.shape[-1]
        dq = torch.empty((b, t, heads * qk), dtype=dq_out.dtype, device=dq_out.device)
        dk_rot = torch.empty((b, t, dr), dtype=dq_out.dtype, device=dq_out.device)
        dkv = torch.empty((b, t, heads * (dn + dv)), dtype=dq_out.dtype, device=dq_out.device)
        dims, block_t = _blocks(dn, dr // 2, dv, BWD_TILE, t)
        _inputs_bwd[(triton.cdiv(t, block_t), b)](
            dq_out, dk_out, dv_out, cos, sin, dq, dk_rot, dkv, *dq_out.stride(), *dk_out.stride(), *dv_out.stride(),
            heads, t, INTERLEAVED=ctx.interleaved, **dims, num_warps=4)
        return dq, dk_rot, dkv, None, None, None, None


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_inputs(q: torch.Tensor, k_rot: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     heads: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention_inputs_reference(q, k_rot, kv, cos, sin, heads, interleaved)` as one fused kernel each way.

    q [b, t, h*(dn+dr)], k_rot [b, t, dr] (kv_a's last dims, a slice) and kv [b, t, h*(dn+dv)] are read through
    their row strides; q, k [b, h, t, dn+dr] and v [b, h, t, dv] come back contiguous. Differentiable in q, k_rot
    and kv; cos and sin [t, dr/2] are constants. All five share one dtype (fp32, bf16 or fp16) and device.
    """
    if q.ndim != 3 or k_rot.ndim != 3 or kv.ndim != 3:
        raise ValueError(f"attention_inputs: q, k_rot and kv must be [batch, seq, dims], found shapes "
                         f"{tuple(q.shape)}, {tuple(k_rot.shape)} and {tuple(kv.shape)}")
    b, t, dr = k_rot.shape
    if q.shape[:2] != (b, t) or kv.shape[:2] != (b, t) or t == 0:
        raise ValueError(f"attention_inputs: q {tuple(q.shape)}, k_rot {tuple(k_rot.shape)} and kv "
                         f"{tuple(kv.shape)} must share a batch and a non-empty sequence")
    if heads < 1 or q.shape[-1] % heads or kv.shape[-1] % heads:
        raise ValueError(f"attention_inputs: q's dims {q.shape[-1]} and kv's {kv.shape[-1]} must split into "
                         f"{heads} heads")
    dn = q.shape[-1] // heads - dr
    if dr % 2 or dr == 0 or dn < 1 or kv.shape[-1] // heads <= dn:
        raise ValueError(f"attention_inputs: a head of q ({q.shape[-1] // heads} dims) must be dn + dr and one of "
                         f"kv ({kv.shape[-1] // heads}) dn + dv, with dn, dv >= 1 and dr = k_rot's {dr} even and "
                         ">= 2")
    for name, x in (("q", q), ("k_rot", k_rot), ("kv", kv), ("cos", cos), ("sin", sin)):
        if x.dtype not in DTYPES or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"attention_inputs: {name} must be fp32, bf16 or fp16, as q ({q.dtype} on {q.device}),"
                             f" found {x.dtype} on {x.device}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (t, dr // 2):
            raise ValueError(f"attention_inputs: {name} must have shape ({t}, {dr // 2}), found {tuple(x.shape)}")
        if x.requires_grad:
            raise ValueError(f"attention_inputs: {name} is taken as a constant and gets no gradient, but it "
                             "requires one")
    q, k_rot, kv = (_last_dim_contiguous(x) for x in (q, k_rot, kv))
    return _AttentionInputs.apply(q, k_rot, kv, cos.contiguous(), sin.contiguous(), heads, interleaved)
