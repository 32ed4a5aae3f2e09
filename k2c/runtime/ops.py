"""The op-level functions the generated wiring calls, each with the implementation its op's `kernel` names.

`select_kernels` writes a kernel choice on every op; lowering carries it into the plan records. A Triton choice
runs only on CUDA tensors; on the CPU the torch reference runs instead. `K2C_KERNELS=torch` forces the reference
everywhere; `K2C_KERNELS=triton` forces the Triton kernels on any device (the tests run them on the CPU under
`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from k2c.runtime.kernels import attention as attention_kernel
from k2c.runtime.kernels import cross_entropy as cross_entropy_kernel
from k2c.runtime.kernels import rmsnorm as rmsnorm_kernel
from k2c.runtime.kernels import swiglu as swiglu_kernel
from k2c.runtime.plan import TORCH, TRITON

FORCE = "K2C_KERNELS"


def use_triton(kernel: str, x: torch.Tensor) -> bool:
    if kernel != TRITON:
        return False
    forced = os.environ.get(FORCE, "")
    if forced == TORCH:
        return False
    return x.is_cuda or forced == TRITON


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: str = TORCH,
            copies: int = 1) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """RMSNorm in fp32, cast back, then the gain: the reference implementation's rounding. With copies > 1 the
    output that many times, one for each op that reads it: on the kernels, views whose gradients the backward sums
    as it reads them (fan_out_norms); in torch the tensor itself, whose gradients autograd sums."""
    if use_triton(kernel, x):
        return rmsnorm_kernel.rmsnorm(x, weight, eps, copies)
    y = rmsnorm_kernel.rmsnorm_reference(x, weight, eps)
    return (y,) * copies if copies > 1 else y


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                kernel: str = TORCH, copies: int = 1) -> tuple[torch.Tensor, ...]:
    """(residual + delta, `rmsnorm` of it, copies times): the residual stream's add and the norm that reads it, one
    pass each way on the kernels, which also add the sum's gradient from its other consumer to the norm's."""
    if use_triton(kernel, residual):
        return rmsnorm_kernel.add_rmsnorm(residual, delta, weight, eps, copies)
    h, y = rmsnorm_kernel.add_rmsnorm_reference(residual, delta, weight, eps)
    return (h,) + (y,) * copies


def swiglu(gate: torch.Tensor, up: torch.Tensor, kernel: str = TORCH) -> torch.Tensor:
    if use_triton(kernel, gate):
        return swiglu_kernel.swiglu(gate, up)
    return swiglu_kernel.swiglu_reference(gate, up)


def attention(q: torch.Tensor, k_rot: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              heads: int, interleaved: bool, softmax_scale: float, head_scale: torch.Tensor | None,
              kernel: str = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA's causal attention from the q projection [b, t, h*(dn+dr)], the rotary key k_rot [b, t, dr] (which all heads
    share) and kv_b's output [b, t, h*(dn+dv)] -> (out [b, t, h*dv], max pre-softmax logit per head [h], fp32).

    q's rotary dims and the key are rotated by cos/sin [t, dr/2]. `head_scale` [h] multiplies head h's logits
    (QK-Clip's scale for frozen weights). The max is over batch, queries and unmasked keys, after every scale. The
    Triton kernels read q, k and v in place from the projections.
    """
    args = (q, k_rot, kv, cos, sin, heads, interleaved, softmax_scale, head_scale)
    if use_triton(kernel, q):
        return attention_kernel.attention(*args)
    return attention_kernel.attention_reference(*args)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, kernel: str = TORCH) -> torch.Tensor | None:
    """Mean next-token cross-entropy over labels != -100: position t predicts token t+1."""
    if labels is None:
        return None
    targets = F.pad(labels, (0, 1), value=cross_entropy_kernel.IGNORE)[:, 1:].flatten()
    if use_triton(kernel, logits):
        return cross_entropy_kernel.cross_entropy(logits.flatten(0, 1), targets)
    return cross_entropy_kernel.cross_entropy_reference(logits.flatten(0, 1), targets)
