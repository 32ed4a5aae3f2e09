"""MLA's attention inputs, fwd+bwd, bf16, at k2-1b's shape: b=8, t=2048, h=16, dn=128, dr=64, dv=128, kv latent 256.

From the q projection [b, t, h*(dn+dr)], kv_a's rotary dims (a slice of [b, t, 256+dr]) and the kv projection [b, t,
h*(dn+dv)] to q, k [b, h, t, dn+dr] and v [b, h, t, dv] with RoPE applied (interleaved pairs, as every shipped
spec), and the gradients of the three inputs back from random upstream ones laid out as the attention kernel's
backward returns them. The anchor is eager torch (the reference: RoPE's elementwise ops, two concatenations, v a
view; in the backward the slices' zero-filled gradients, added up); against it the fused kernel (one pass each way,
v copied into the layout the attention reads). Every variant's outputs and gradients are checked against the
reference before it is timed.
"""

from __future__ import annotations

import torch
from harness import Harness, MismatchError

from k2c.runtime.kernels.attention_inputs import attention_inputs, attention_inputs_reference

DEV = torch.device("cuda")
DTYPE = torch.bfloat16
BATCH, SEQ, HEADS, DN, DR, DV, LATENT = 8, 2048, 16, 128, 64, 128, 256
NAMES = ("q", "k", "v", "dq", "dkv_a", "dkv")


def run(h: Harness) -> None:
    torch.manual_seed(0)
    work = (f"MLA attention inputs fwd+bwd (RoPE, q/k/v layout), b={BATCH} t={SEQ} h={HEADS} dn={DN} dr={DR} "
            f"dv={DV}, interleaved, {str(DTYPE).removeprefix('torch.')}")
    positions = torch.arange(SEQ, device=DEV, dtype=torch.float32)
    angles = positions[:, None] * 50000.0 ** (-torch.arange(0, DR, 2, device=DEV) / DR)  # [seq, dr/2]
    cos, sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)
    q = torch.randn(BATCH, SEQ, HEADS * (DN + DR), device=DEV, dtype=DTYPE, requires_grad=True)
    kv_a = torch.randn(BATCH, SEQ, LATENT + DR, device=DEV, dtype=DTYPE, requires_grad=True)
    kv = torch.randn(BATCH, SEQ, HEADS * (DN + DV), device=DEV, dtype=DTYPE, requires_grad=True)
    upstream = [torch.randn(BATCH, HEADS, SEQ, d, device=DEV, dtype=DTYPE) for d in (DN + DR, DN + DR, DV)]

    def fwd_bwd(inputs_of):
        def step() -> list[torch.Tensor]:
            outputs = inputs_of(q, kv_a[..., LATENT:], kv, cos, sin)
            return [*outputs, *torch.autograd.grad(outputs, (q, kv_a, kv), upstream)]

        return step

    reference = fwd_bwd(lambda *x: attention_inputs_reference(*x, HEADS, True))
    variants = [("k2c fused Triton", fwd_bwd(lambda *x: attention_inputs(*x, HEADS, True)))]
    want = reference()
    checks = []
    for variant, step in variants:
        try:
            checks.append("; ".join(h.check(name, g, w) for name, g, w in zip(NAMES, step(), want, strict=True)))
        except MismatchError as err:
            raise MismatchError(f"{work}: {variant}: {err}") from None
    del want
    anchor_ms = h.time(reference)
    h.row(work, "eager torch (anchor)", anchor_ms, anchor_ms)
    for (variant, step), check in zip(variants, checks, strict=True):
        h.row(work, variant, h.time(step), anchor_ms, check)
