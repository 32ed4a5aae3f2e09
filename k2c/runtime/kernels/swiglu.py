"""SwiGLU's gating, silu(gate) * up, forward and backward, as fused Triton kernels beside the torch reference.

Eager torch writes silu(gate) to memory and reads it back for the product, and its backward saves it as well;
here the forward is one pass over gate and up, and the backward one pass over gate, up and the incoming gradient
that recomputes the sigmoid instead of saving anything beyond gate and up. Arithmetic is fp32 inside, with the
reference's one rounding of silu(gate) to the input dtype before the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024  # elements per program: 8 bf16 (one 16-byte access) per thread of 4 warps


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _swiglu_forward_kernel(
    gate_ptr,  # [n], contiguous
    up_ptr,  # [n], contiguous
    out_ptr,  # [n], contiguous
    n,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # n can pass 2**31
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded, as the reference's is
    tl.store(out_ptr + offs, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    dout_ptr,  # [n], contiguous
    gate_ptr,  # [n], contiguous
    up_ptr,  # [n], contiguous
    dgate_ptr,  # [n], contiguous
    dup_ptr,  # [n], contiguous
    n,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = (g * s).to(dup_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dup_ptr + offs, (dout * silu).to(dup_ptr.dtype.element_ty), mask=mask)
    # silu'(g) = s + g * s * (1 - s)
    tl.store(dgate_ptr + offs, (dout * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_forward_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK_SIZE=BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_backward_kernel[(triton.cdiv(n, BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK_SIZE=BLOCK,
                                                          num_warps=4)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`swiglu_reference(gate, up)` as fused kernels; differentiable in gate and up.

    gate and up have one shape and one dtype (fp32, bf16 or fp16); no broadcasting. Non-contiguous inputs (the
    halves of a fused gate-up projection, say) are copied to contiguous first. The result is contiguous.
    """
    if gate.dtype not in DTYPES:
        raise ValueError(f"swiglu: gate must be fp32, bf16 or fp16, found {gate.dtype}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"swiglu: up must match gate's shape, dtype and device {tuple(gate.shape)} {gate.dtype} "
                         f"{gate.device}, found {tuple(up.shape)} {up.dtype} {up.device}")
    if gate.numel() == 0:
        raise ValueError(f"swiglu: gate and up are empty, shape {tuple(gate.shape)}")
    return _SwiGLU.apply(gate, up)
