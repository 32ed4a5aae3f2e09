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
from k2c.runtime.kernels import attention_inputs as attention_inputs_kernel
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


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: str = TORCH) -> torch.Tensor:
    """RMSNorm in fp32, cast back, then the gain: the reference implementation's rounding."""
    if use_triton(kernel, x):
        return rmsnorm_kernel.rmsnorm(x, weight, eps)
    return rmsnorm_kernel.rmsnorm_reference(x, weight, eps)


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                kernel: str = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta, `rmsnorm` of it): the residual stream's add and the norm that reads it, one pass each way
    on the kernels, which also add the sum's gradient from its other consumer to the norm's."""
    if use_triton(kernel, residual):
        return rmsnorm_kernel.add_rmsnorm(residual, delta, weight, eps)
    return rmsnorm_kernel.add_rmsnorm_reference(residual, delta, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, kernel: str = TORCH) -> torch.Tensor:
    if use_triton(kernel, gate):
        return swiglu_kernel.swiglu(gate, up)
    return swiglu_kernel.swiglu_reference(gate, up)


def attention_inputs(q: torch.Tensor, k_rot: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     heads: int, interleaved: bool,
                     kernel: str = TORCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLA's q [b, t, h*(dn+dr)], rotary key k_rot [b, t, dr] and kv [b, t, h*(dn+dv)] -> q, k [b, h, t, dn+dr] and
    v [b, h, t, dv] for `causal_attention`: q's rotary dims and the key, which all heads share, rotated by cos/sin
    [t, dr/2] and returned as [firsts of the pairs, seconds] (q and k get the same permutation, so their dot
    products do not change). The Triton kernel does it in one pass each way."""
    if use_triton(kernel, q):
        return attention_inputs_kernel.attention_inputs(q, k_rot, kv, cos, sin, heads, interleaved)
    return attention_inputs_kernel.attention_inputs_reference(q, k_rot, kv, cos, sin, heads, interleaved)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                     head_scale: torch.Tensor | None, kernel: str = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [b, h, t, dqk], v [b, h, t, dv] -> (out [b, h, t, dv], max pre-softmax logit per head [h], fp32).

    `head_scale` [h] multiplies head h's logits (QK-Clip's scale for frozen weights). The max is over batch,
    queries and unmasked keys, after every scale.
    """
    if use_triton(kernel, q):
        return attention_kernel.attention(q, k, v, softmax_scale, head_scale)
    return attention_kernel.attention_reference(q, k, v, softmax_scale, head_scale)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor | None, kernel: str = TORCH) -> torch.Tensor | None:
    """Mean next-token cross-entropy over labels != -100: position t predicts token t+1."""
    if labels is None:
        return None
    targets = F.pad(labels, (0, 1), value=cross_entropy_kernel.IGNORE)[:, 1:].flatten()
    if use_triton(kernel, logits):
        return cross_entropy_kernel.cross_entropy(logits.flatten(0, 1), targets)
    return cross_entropy_kernel.cross_entropy_reference(logits.flatten(0, 1), targets)
