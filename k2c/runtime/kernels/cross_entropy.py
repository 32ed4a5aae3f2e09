"""The language model's loss, mean cross-entropy over the vocabulary, as Triton kernels beside the torch reference.

The reference casts the logits [rows, vocab] to fp32, takes log_softmax and picks each target's entry; its backward
writes the fp32 softmax and casts it back. At k2-1b's 16384 x 32768 that is 2 GiB of fp32 logits kept for the
backward and, counting each pass's reads and writes, some 16 GiB moved. Here the forward reads the logits once in
their own dtype, keeping only each row's log-sum-exp (fp32); the backward reads them once more and writes their
gradient in their dtype. The arithmetic is the reference's: fp32 throughout, the gradient softmax - one-hot scaled
by the mean's 1 / count and rounded once.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORE = -100  # a target that takes no part in the loss, as torch's ignore_index
IGNORED: tl.constexpr = tl.constexpr(IGNORE)  # the same, for the kernels
# Under TRITON_INTERPRET=1 (the CPU tests) a short block, so that the tests' vocabularies cross its edges. Read at
# import, as Triton reads it.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
BLOCK_V = 64 if INTERPRETED else 4096  # vocabulary entries a program holds at a time: 16 a thread of 8 warps


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows with targets != IGNORE of -log softmax(logits)[target], in fp32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)


@triton.jit
def _forward_kernel(
    logits_ptr,  # [rows, V], rows stride_row apart
    targets_ptr,  # [rows] int64
    lse_ptr,  # [rows] fp32 out: log sum exp of the row
    loss_ptr,  # [rows] fp32 out: lse - logit[target], 0 where the target is IGNORE
    V, stride_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK)
    # running max and sum of exp(x - max), per lane; lanes are merged at the end
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for v0 in range(0, V, BLOCK):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        new = tl.maximum(m, x)
        # a lane still at -inf (past the end of the row) stays at a sum of 0, with no inf - inf on the way
        safe = tl.where(new == float("-inf"), 0.0, new)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = new
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    tl.store(lse_ptr + row, lse)
    target = tl.load(targets_ptr + row)
    picked = tl.load(base + tl.maximum(target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(target == IGNORED, 0.0, lse - picked))


@triton.jit
def _backward_kernel(
    logits_ptr,  # [rows, V], rows stride_row apart
    targets_ptr,  # [rows] int64
    lse_ptr,  # [rows] fp32, from the forward
    scale_ptr,  # [] fp32: d loss / d (sum of the rows' losses), the incoming gradient over the count
    grad_ptr,  # [rows, V] out, contiguous: (softmax - one-hot) * scale, 0 for an IGNORE row
    V, stride_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    scale = tl.where(target == IGNORED, 0.0, tl.load(scale_ptr))
    lse = tl.load(lse_ptr + row)
    cols = tl.arange(0, BLOCK)
    for v0 in range(0, V, BLOCK):
        inside = v0 + cols < V
        x = tl.load(logits_ptr + row * stride_row + v0 + cols, mask=inside, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(v0 + cols == target, 1.0, 0.0)
        tl.store(grad_ptr + row * V + v0 + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=inside)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
        losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
        _forward_kernel[(rows,)](logits, targets, lse, losses, vocab, logits.stride(0), BLOCK=BLOCK_V, num_warps=8)
        count = (targets != IGNORE).sum()
        ctx.save_for_backward(logits, targets, lse, count)
        return losses.sum() / count  # 0 / 0 = nan with no target, as the reference

    @staticmethod
    def backward(ctx, dloss: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse, count = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = torch.empty((rows, vocab), device=logits.device, dtype=logits.dtype)
        scale = (dloss.float() / count).reshape(())  # on the device: no wait for the host
        _backward_kernel[(rows,)](logits, targets, lse, scale, grad, vocab, logits.stride(0), BLOCK=BLOCK_V,
                                  num_warps=8)
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`cross_entropy_reference(logits, targets)` as fused kernels, differentiable in logits.

    logits [rows, vocab] (fp32, bf16 or fp16) with unit stride along the vocabulary; targets [rows] int64, each in
    [0, vocab) or IGNORE (not checked against the vocabulary: the kernels would read another entry of the row).
    """
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"cross_entropy: logits must be [rows, vocab] with unit stride along the vocabulary, found "
                         f"shape {tuple(logits.shape)} with strides {logits.stride()}")
    if logits.dtype not in DTYPES:
        raise ValueError(f"cross_entropy: logits must be fp32, bf16 or fp16, found {logits.dtype}")
    if targets.shape != logits.shape[:1] or targets.dtype != torch.int64 or targets.device != logits.device:
        raise ValueError(f"cross_entropy: targets must be int64 of shape ({logits.shape[0]},) on {logits.device}, "
                         f"found {targets.dtype} {tuple(targets.shape)} on {targets.device}")
    return _CrossEntropy.apply(logits, targets.contiguous())
