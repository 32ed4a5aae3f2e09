"""RMSNorm and SwiGLU: k2c's fused Triton kernels against eager torch (their references), fwd+bwd in bf16.

Shapes are a K2-style layer's over 8 sequences of 2048 tokens: RMSNorm over the 1536-wide q latent and the 7168-wide
hidden state; SwiGLU at a Moonlight expert's 1408 and Kimi K2's dense 18432 intermediate sizes (RoPE runs inside
MLA's attention: benchmarks/kernels/attention.py). Each kernel's output and gradients are checked
against its reference before both are timed. The target is twice eager torch's speed.
"""

from __future__ import annotations

import torch
from harness import Harness, MismatchError

from k2c.runtime.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from k2c.runtime.kernels.swiglu import swiglu, swiglu_reference

DEV = torch.device("cuda")
DTYPE = torch.bfloat16
BATCH, SEQ = 8, 2048
TOKENS = BATCH * SEQ
EPS = 1e-6


def compare(h: Harness, work: str, kernel, reference, inputs: tuple[torch.Tensor, ...],
            grad_names: tuple[str, ...]) -> None:
    """Check the kernel's output and input gradients against the reference's, then time both fwd+bwd: two rows."""
    dy = torch.randn_like(reference(*inputs))

    def fwd_bwd(fn):
        def step() -> list[torch.Tensor]:
            y = fn(*inputs)
            return [y, *torch.autograd.grad(y, inputs, dy)]

        return step

    got, want = fwd_bwd(kernel)(), fwd_bwd(reference)()
    try:
        check = "; ".join(h.check(name, g, w) for name, g, w in zip(("y", *grad_names), got, want, strict=True))
    except MismatchError as err:
        raise MismatchError(f"{work}: {err}") from None
    del got, want
    anchor_ms = h.time(fwd_bwd(reference))
    h.row(work, "eager torch (anchor)", anchor_ms, anchor_ms)
    h.row(work, "k2c Triton", h.time(fwd_bwd(kernel)), anchor_ms, check)


def leaf(*shape: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return (mean + std * torch.randn(shape, device=DEV)).to(DTYPE).requires_grad_()


def run(h: Harness) -> None:
    torch.manual_seed(0)

    for dim in (1536, 7168):
        compare(h, f"RMSNorm fwd+bwd, x [{TOKENS}, {dim}], bf16", lambda x, w: rmsnorm(x, w, EPS),
                lambda x, w: rmsnorm_reference(x, w, EPS), (leaf(TOKENS, dim), leaf(dim, mean=1.0, std=0.2)),
                ("dx", "dweight"))

    for inter in (1408, 18432):
        compare(h, f"SwiGLU fwd+bwd, gate and up [{TOKENS}, {inter}], bf16", swiglu, swiglu_reference,
                (leaf(TOKENS, inter), leaf(TOKENS, inter)), ("dgate", "dup"))
