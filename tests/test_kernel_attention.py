"""The causal flash-attention kernel with the per-head max logit against its torch reference, under the Triton CPU
interpreter.

The interpreter is switched on by TRITON_INTERPRET=1, read when triton and the kernel module are imported, and an
xdist worker may already have imported them for another test. So every check runs in a fresh Python, this file run
as a script (`python tests/test_kernel_attention.py check_attention float16`), and the pytest process never imports
the kernel module. Each check compares the kernel's out, max logit, dq, dk and dv with the reference's, and the
reference's with independent fp64 ones (SDPA with is_causal for out and gradients, a loop over queries for the max
logit), at small shapes: sequences that end inside a block, qk head dims split in two blocks (96 = 64 + 32) or
padded (24 = 16 + 8 masked), a value head dim other than the qk one, a per-head scale, and the model's strided v.
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import assert_close
from conftest import subprocess_env

NAMES = ("out", "max_logit", "dq", "dk", "dv")




def outputs_and_grads(attend, q, k, v, dout) -> list[torch.Tensor]:
    """[out, max_logit, dq, dk, dv] of attend(q, k, v) with upstream gradient dout."""
    out, max_logit = attend(q, k, v)
    assert not max_logit.requires_grad, "max_logit must carry no gradient"
    return [out, max_logit, *torch.autograd.grad(out, (q, k, v), dout)]


def truth(q, k, v, dout, softmax_scale: float, head_scale: torch.Tensor | None) -> list[torch.Tensor]:
    """fp64, computed without the reference: SDPA for out and gradients, a loop over queries for the max logit."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    h, t = q.shape[1:3]
    per_head = torch.ones(h, dtype=torch.float64) if head_scale is None else head_scale.double()
    out = F.scaled_dot_product_attention(q * per_head.view(1, h, 1, 1), k, v, is_causal=True, scale=softmax_scale)
    max_logit = torch.full((h,), -torch.inf, dtype=torch.float64)
    for head in range(h):
        for i in range(t):  # query i sees keys 0..i
            logits = softmax_scale * per_head[head] * (k[:, head, : i + 1] @ q[:, head, i, :, None])
            max_logit[head] = max(max_logit[head], logits.max().item())
    return [out, max_logit, *torch.autograd.grad(out, (q, k, v), dout.double())]


# --------------------------------------------------------------------------- checks, each run in a fresh Python
# The kernel module is imported inside the checks: importing it in the pytest process would fix it to compiled
# (GPU) mode there.


def check_attention(dtype: torch.dtype) -> None:
    from k2c.runtime.kernels.attention import attention, attention_reference

    torch.manual_seed(0)
    # (batch, heads, seq, qk head dim, v head dim, per-head scale, v a strided view as the model passes it)
    # The interpreter's blocks are 16 and 32 rows: 37 ends inside a block, 64 does not, 1 is a lone query.
    cases = [(2, 3, 37, 24, 16, True, False), (2, 3, 64, 96, 64, False, True), (2, 3, 64, 64, 64, True, False),
             (1, 2, 37, 48, 32, False, True), (1, 2, 1, 24, 16, True, False)]
    for b, h, t, dqk, dv, scaled, strided in cases:
        what = f"attention b={b} h={h} t={t} dqk={dqk} dv={dv} head_scale={scaled} strided v={strided} {dtype}"
        q = torch.randn(b, h, t, dqk, dtype=dtype, requires_grad=True)
        k = torch.randn(b, h, t, dqk, dtype=dtype, requires_grad=True)
        if strided:  # [b, t, h, dn + dv] split as the model splits its kv projection: rows far apart
            v = torch.randn(b, t, h, 40 + dv, dtype=dtype, requires_grad=True).transpose(1, 2)[..., 40:]
        else:
            v = torch.randn(b, h, t, dv, dtype=dtype, requires_grad=True)
        dout = torch.randn(b, h, t, dv, dtype=dtype)
        softmax_scale = 1.3 * dqk ** -0.5  # logits large enough that the softmax is far from uniform
        head_scale = torch.rand(h) + 0.5 if scaled else None

        constants = dict(softmax_scale=softmax_scale, head_scale=head_scale)
        got = outputs_and_grads(partial(attention, **constants), q, k, v, dout)
        want = outputs_and_grads(partial(attention_reference, **constants), q, k, v, dout)
        exact = truth(q, k, v, dout, softmax_scale, head_scale)
        for name, g, w, e in zip(NAMES, got, want, exact, strict=True):
            assert g.dtype == w.dtype, f"{what} {name}: dtype {g.dtype}, the reference's {w.dtype}"
            assert_close(f"{what} {name}", g, w, dtype)
            assert_close(f"{what} {name} (reference against fp64 SDPA and loop)", w, e, dtype)


def check_errors() -> None:
    from k2c.runtime.kernels.attention import attention

    q = torch.randn(1, 2, 8, 24)
    v = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"q must be \[batch, heads, seq, head_dim\], got shape \(2, 8, 24\)"):
        attention(q[0], q[0], v[0], 0.2)
    with pytest.raises(TypeError, match="k must be float16, bfloat16 or float32, got torch.float64"):
        attention(q, q.double(), v, 0.2)
    with pytest.raises(ValueError, match="v is torch.float16 on cpu, q is torch.float32 on cpu"):
        attention(q, q, v.half(), 0.2)
    with pytest.raises(ValueError, match="must share"):
        attention(q, q[..., :16], v, 0.2)
    with pytest.raises(ValueError, match=r"head_scale must be a float tensor \[2\]"):
        attention(q, q, v, 0.2, torch.ones(3))


# --------------------------------------------------------------------------- the tests: one fresh Python each


def run_check(check: str, *args: str) -> None:
    child = subprocess.run([sys.executable, __file__, check, *args], capture_output=True, text=True, timeout=300,
                           env=subprocess_env(TRITON_INTERPRET="1"))
    assert child.returncode == 0, f"{check} {' '.join(args)} failed:\n{child.stdout}{child.stderr[-5000:]}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_attention_matches_reference(dtype: str) -> None:
    run_check("check_attention", dtype)


def test_attention_rejects_bad_inputs() -> None:
    run_check("check_errors")


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per test process, as conftest sets for the workers
    check, *dtypes = sys.argv[1:]
    globals()[check](*(getattr(torch, name) for name in dtypes))
