"""The fused layout of MLA's attention inputs (q, k and v with RoPE applied) against its torch reference, under the
Triton CPU interpreter.

The interpreter is switched on by TRITON_INTERPRET=1, read when triton and the kernel module are imported, and an
xdist worker may already have imported them for another test. So every check runs in a fresh Python, this file run
as a script (`python tests/test_kernel_attention_inputs.py check_attention_inputs float16`), and the pytest process
never imports the kernel module. Each check compares the kernel's q, k and v and the gradients of q, kv_a and kv
(from a random upstream gradient) with the reference's, and the reference's with an fp64 formula that rotates pairs
as complex numbers, at small shapes: the model's head dims over sequences that end inside a block, one head, dims
that are not powers of two, both pair layouts, and upstream gradients laid out as the attention's backward gives
them or transposed.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from functools import partial

import pytest
import torch

from conftest import subprocess_env
from kernel_checks import assert_close
from test_kernel_norm_rope_swiglu import rope_truth

NAMES = ("q", "k", "v", "dq", "dkv_a", "dkv")


def outputs_and_grads(inputs_of, q, kv_a, kv, latent: int, upstream) -> list[torch.Tensor]:
    """[q, k, v, dq, dkv_a, dkv] of inputs_of(q, kv_a's rotary dims, kv) with upstream gradients for q, k and v."""
    outputs = inputs_of(q, kv_a[..., latent:], kv)
    return [*outputs, *torch.autograd.grad(outputs, (q, kv_a, kv), upstream)]


def truth(q, k_rot, kv, cos, sin, heads: int, interleaved: bool) -> tuple[torch.Tensor, ...]:
    """q, k and v from the definition: each head's rotary pairs times (cos + i sin), the one key broadcast."""
    dr = k_rot.shape[-1]
    q = q.unflatten(-1, (heads, -1)).permute(0, 2, 1, 3)  # [b, h, t, dn+dr]
    kv = kv.unflatten(-1, (heads, -1)).permute(0, 2, 1, 3)  # [b, h, t, dn+dv]
    dn = q.shape[-1] - dr
    key = rope_truth(k_rot, cos, sin, interleaved).unsqueeze(1).expand(-1, heads, -1, -1)
    return (torch.cat([q[..., :dn], rope_truth(q[..., dn:], cos, sin, interleaved)], dim=-1),
            torch.cat([kv[..., :dn], key], dim=-1), kv[..., dn:])


def upstream_gradient(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> torch.Tensor:
    """A random gradient for an output of `shape` [b, h, t, d]: contiguous, or with t and d swapped in memory, as
    torch's matmul backward gives dk."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype)
    return torch.randn(*shape[:2], shape[3], shape[2], dtype=dtype).transpose(2, 3)


# --------------------------------------------------------------------------- checks, each run in a fresh Python
# The kernel module is imported inside the checks: importing it in the pytest process would fix it to compiled
# (GPU) mode there.


def check_attention_inputs(dtype: torch.dtype) -> None:
    from k2c.runtime.kernels.attention_inputs import attention_inputs, attention_inputs_reference

    torch.manual_seed(0)
    # (batch, seq, heads, dn, dr, dv, kv_a's latent dims, upstream layout). At the model's head dims a forward
    # program takes 32 positions and a backward one 16: 37 ends inside a block of both. dr 24 has 12 pairs, a block
    # of 16 with 4 masked.
    cases = [(2, 37, 3, 128, 64, 128, 16, "contiguous"), (2, 9, 1, 24, 24, 40, 5, "contiguous"),
             (1, 20, 4, 8, 16, 12, 3, "transposed"), (3, 1, 2, 16, 8, 16, 4, "contiguous")]
    for (b, t, h, dn, dr, dv, latent, layout), interleaved in itertools.product(cases, (False, True)):
        what = f"b={b} t={t} h={h} dn={dn} dr={dr} dv={dv} upstream {layout} interleaved={interleaved} {dtype}"
        q = torch.randn(b, t, h * (dn + dr), dtype=dtype, requires_grad=True)
        kv_a = torch.randn(b, t, latent + dr, dtype=dtype, requires_grad=True)
        kv = torch.randn(b, t, h * (dn + dv), dtype=dtype, requires_grad=True)
        angles = torch.rand(t, dr // 2) * 2 * torch.pi
        cos, sin = (1.3 * angles.cos()).to(dtype), (1.3 * angles.sin()).to(dtype)  # scaled, as YaRN's factor does
        upstream = [upstream_gradient(shape, layout, dtype)
                    for shape in ((b, h, t, dn + dr), (b, h, t, dn + dr), (b, h, t, dv))]

        constants = dict(cos=cos, sin=sin, heads=h, interleaved=interleaved)
        got = outputs_and_grads(partial(attention_inputs, **constants), q, kv_a, kv, latent, upstream)
        want = outputs_and_grads(partial(attention_inputs_reference, **constants), q, kv_a, kv, latent, upstream)
        exact = outputs_and_grads(partial(truth, cos=cos.double(), sin=sin.double(), heads=h, interleaved=interleaved),
                                  *(x.detach().double().requires_grad_() for x in (q, kv_a, kv)), latent,
                                  [g.double() for g in upstream])
        for name, out in zip(NAMES[:3], got[:3]):
            assert out.is_contiguous(), f"{what} {name}: not contiguous, strides {out.stride()}"
        for name, g, w, e in zip(NAMES, got, want, exact, strict=True):
            assert g.dtype == w.dtype, f"{what} {name}: dtype {g.dtype}, the reference's {w.dtype}"
            assert_close(f"{what} {name}", g, w)
            assert_close(f"{what} {name} (reference against the fp64 formula)", w, e, dtype=w.dtype)


def check_errors() -> None:
    from k2c.runtime.kernels.attention_inputs import attention_inputs

    b, t, h, dn, dr, dv = 1, 4, 2, 8, 4, 6
    q, k_rot, kv = torch.randn(b, t, h * (dn + dr)), torch.randn(b, t, dr), torch.randn(b, t, h * (dn + dv))
    cos, sin = torch.ones(t, dr // 2), torch.zeros(t, dr // 2)
    with pytest.raises(ValueError, match=r"must be \[batch, seq, dims\]"):
        attention_inputs(q[0], k_rot, kv, cos, sin, h, False)
    with pytest.raises(ValueError, match="must share a batch and a non-empty sequence"):
        attention_inputs(q, k_rot[:, :3], kv, cos, sin, h, False)
    with pytest.raises(ValueError, match="must split into 5 heads"):
        attention_inputs(q, k_rot, kv, cos, sin, 5, False)
    with pytest.raises(ValueError, match="dr = k_rot's 3 even"):
        attention_inputs(q, k_rot[..., :3], kv, cos, sin, h, False)
    with pytest.raises(ValueError, match=r"kv must be fp32, bf16 or fp16, as q \(torch.float32 on cpu\), found "
                                         "torch.float16"):
        attention_inputs(q, k_rot, kv.half(), cos, sin, h, False)
    with pytest.raises(ValueError, match=r"sin must have shape \(4, 2\), found \(4, 4\)"):
        attention_inputs(q, k_rot, kv, cos, torch.zeros(t, dr), h, False)
    with pytest.raises(ValueError, match="cos is taken as a constant"):
        attention_inputs(q, k_rot, kv, cos.requires_grad_(), sin, h, False)


# --------------------------------------------------------------------------- the tests: one fresh Python each


def run_check(check: str, *args: str) -> None:
    child = subprocess.run([sys.executable, __file__, check, *args], capture_output=True, text=True, timeout=300,
                           env=subprocess_env(TRITON_INTERPRET="1"))
    assert child.returncode == 0, f"{check} {' '.join(args)} failed:\n{child.stdout}{child.stderr[-5000:]}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_attention_inputs_match_reference(dtype: str) -> None:
    run_check("check_attention_inputs", dtype)


def test_attention_inputs_reject_bad_inputs() -> None:
    run_check("check_errors")


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per test process, as conftest sets for the workers
    check, *dtypes = sys.argv[1:]
    globals()[check](*(getattr(torch, name) for name in dtypes))
