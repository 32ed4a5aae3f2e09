"""RMSNorm and SwiGLU: k2c's fused Triton kernels against eager torch (their references), fwd+bwd in bf16.

Shapes are a K2-style layer's over 8 sequences of 2048 tokens: RMSNorm over the 1536-wide q latent and the 7168-wide
hidden state, and with the residual add before it (add_rmsnorm, whose sum h also gets the next add's gradient) at
k2-1b's 1536 and Kimi K2's 7168, also against the wiring it replaced (torch's add, then the fused norm); SwiGLU at
a Moonlight expert's 1408 and Kimi K2's dense 18432 intermediate sizes (RoPE runs inside MLA's attention:
benchmarks/kernels/attention.py). Each kernel's outputs and gradients are checked against its reference before both
are timed. The target is twice eager torch's speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from harness import Harness, MismatchError

from k2c.runtime.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference, rmsnorm, rmsnorm_reference
from k2c.runtime.kernels.swiglu import swiglu, swiglu_reference

DEV = torch.device("cuda")
DTYPE = torch.bfloat16
BATCH, SEQ = 8, 2048
TOKENS = BATCH * SEQ
EPS = 1e-6


def outputs(y: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def compare(h: Harness, work: str, kernel, reference, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...],
            others: tuple[tuple[str, Callable], ...] = (), gpu_time: bool = False) -> None:
    """Check the kernel's outputs and input gradients against the reference's, then time both fwd+bwd, and each of
    `others` (name, function): a row each. `names`: the outputs', then the gradients'. gpu_time: the kernel and
    the reference again by the GPU time of their kernels, for work small enough that the wall time is the host's."""
    dys = [torch.randn_like(y) for y in outputs(reference(*inputs))]

    def fwd_bwd(fn):
        def step() -> list[torch.Tensor]:
            ys = outputs(fn(*inputs))
            return [*ys, *torch.autograd.grad(ys, inputs, dys)]

        return step

    got, want = fwd_bwd(kernel)(), fwd_bwd(reference)()
    try:
        check = "; ".join(h.check(name, g, w) for name, g, w in zip(names, got, want, strict=True))
    except MismatchError as err:
        raise MismatchError(f"{work}: {err}") from None
    del got, want
    anchor_ms = h.time(fwd_bwd(reference))
    h.row(work, "eager torch (anchor)", anchor_ms, anchor_ms)
    for variant, fn in others:
        h.row(work, variant, h.time(fwd_bwd(fn)), anchor_ms)
    h.row(work, "k2c Triton", h.time(fwd_bwd(kernel)), anchor_ms, check)
    if gpu_time:
        work += "; GPU kernel time"
        anchor_ms = h.kernel_time(fwd_bwd(reference))
        h.row(work, "eager torch (anchor)", anchor_ms, anchor_ms)
        h.row(work, "k2c Triton", h.kernel_time(fwd_bwd(kernel)), anchor_ms, check)


def add_then_rmsnorm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor):
    """The wiring before fuse_residual_norm: torch's add, then the fused norm; autograd sums h's two gradients."""
    x = residual + delta
    return x, rmsnorm(x, weight, EPS)


def leaf(*shape: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return (mean + std * torch.randn(shape, device=DEV)).to(DTYPE).requires_grad_()


def run(h: Harness) -> None:
    torch.manual_seed(0)

    for dim in (1536, 7168):
        compare(h, f"RMSNorm fwd+bwd, x [{TOKENS}, {dim}], bf16", lambda x, w: rmsnorm(x, w, EPS),
                lambda x, w: rmsnorm_reference(x, w, EPS), (leaf(TOKENS, dim), leaf(dim, mean=1.0, std=0.2)),
                ("y", "dx", "dweight"))

    for dim in (1536, 7168):
        compare(h, f"add + RMSNorm fwd+bwd, residual and delta [{TOKENS}, {dim}], bf16",
                lambda r, d, w: add_rmsnorm(r, d, w, EPS), lambda r, d, w: add_rmsnorm_reference(r, d, w, EPS),
                (leaf(TOKENS, dim), leaf(TOKENS, dim), leaf(dim, mean=1.0, std=0.2)),
                ("h", "y", "dresidual", "ddelta", "dweight"), others=(("torch add, k2c RMSNorm", add_then_rmsnorm),))

    for inter in (1408, 18432):
        compare(h, f"SwiGLU fwd+bwd, gate and up [{TOKENS}, {inter}], bf16", swiglu, swiglu_reference,
                (leaf(TOKENS, inter), leaf(TOKENS, inter)), ("y", "dgate", "dup"), gpu_time=True)
