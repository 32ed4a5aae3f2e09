"""MLA's fused causal attention with the per-head max logit, read from the projections, against its torch reference,
under the Triton CPU interpreter.

The interpreter is switched on by TRITON_INTERPRET=1, read when triton and the kernel module are imported, and an
xdist worker may already have imported them for another test. So every check runs in a fresh Python, this file run
as a script (`python tests/test_kernel_attention.py check_attention float16`), and the pytest process never imports
the kernel module. Each check compares the kernel's out, max logit and the gradients of q, kv_a and kv with the
reference's, and the reference's with independent fp64 ones (q and k rotated as complex numbers, SDPA with
is_causal for out and gradients, a loop over queries for the max logit), at small shapes: sequences that end inside
a block, a lone query, the published head dims (128 + 64, 128) and dims that are not powers of two (masked), both
RoPE pair layouts, a per-head scale, and the rotary key as the model passes it, a slice of kv_a.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from conftest import subprocess_env
from kernel_checks import assert_close
from test_kernel_norm_rope_swiglu import rope_truth

NAMES = ("out", "max_logit", "dq", "dkv_a", "dkv")


def outputs_and_grads(attend, q, kv_a, kv, latent: int, dout) -> list[torch.Tensor]:
    """[out, max_logit, dq, dkv_a, dkv] of attend(q, kv_a's rotary dims, kv) with upstream gradient dout."""
    out, max_logit = attend(q, kv_a[..., latent:], kv)
    assert not max_logit.requires_grad, "max_logit must carry no gradient"
    return [out, max_logit, *torch.autograd.grad(out, (q, kv_a, kv), dout)]


def truth(q, k_rot, kv, cos, sin, heads: int, interleaved: bool, softmax_scale: float,
          head_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64, from the definitions: each head's rotary pairs times (cos + i sin), the one key broadcast; SDPA for out,
    a loop over queries for the max logit."""
    b, t, _ = q.shape
    dr = k_rot.shape[-1]
    q = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # [b, h, t, dn+dr]
    kv = kv.unflatten(-1, (heads, -1)).transpose(1, 2)  # [b, h, t, dn+dv]
    dn = q.shape[-1] - dr
    key = rope_truth(k_rot, cos, sin, interleaved).unsqueeze(1).expand(-1, heads, -1, -1)
    q = torch.cat([q[..., :dn], rope_truth(q[..., dn:], cos, sin, interleaved)], dim=-1)
    k, v = torch.cat([kv[..., :dn], key], dim=-1), kv[..., dn:]
    per_head = torch.ones(heads, dtype=q.dtype) if head_scale is None else head_scale.to(q.dtype)
    out = F.scaled_dot_product_attention(q * per_head.view(1, heads, 1, 1), k, v, is_causal=True, scale=softmax_scale)
    max_logit = torch.full((heads,), -torch.inf, dtype=q.dtype)
    with torch.no_grad():
        for head in range(heads):
            for i in range(t):  # query i sees keys 0..i
                logits = softmax_scale * per_head[head] * (k[:, head, : i + 1] @ q[:, head, i, :, None])
                max_logit[head] = max(max_logit[head], logits.max().item())
    return out.transpose(1, 2).reshape(b, t, -1), max_logit


# --------------------------------------------------------------------------- checks, each run in a fresh Python
# The kernel module is imported inside the checks: importing it in the pytest process would fix it to compiled
# (GPU) mode there.


def check_attention(dtype: torch.dtype) -> None:
    from k2c.runtime.kernels.attention import attention, attention_reference

    torch.manual_seed(0)
    # (batch, seq, heads, dn, dr, dv, kv_a's latent dims, per-head scale). The interpreter's blocks are 16 and 32
    # rows: 37 ends inside a block, 64 does not, 1 is a lone query. dn 24, dr 8 (4 pairs) and dv 40 are padded.
    cases = [(2, 37, 3, 32, 16, 32, 16, True), (1, 64, 2, 128, 64, 128, 8, False),
             (2, 37, 2, 24, 8, 40, 5, True), (1, 1, 2, 16, 16, 16, 4, True)]
    for (b, t, h, dn, dr, dv, latent, scaled), interleaved in itertools.product(cases, (True, False)):
        what = f"attention b={b} t={t} h={h} dn={dn} dr={dr} dv={dv} head_scale={scaled} interleaved={interleaved}"
        q = torch.randn(b, t, h * (dn + dr), dtype=dtype, requires_grad=True)
        kv_a = torch.randn(b, t, latent + dr, dtype=dtype, requires_grad=True)
        kv = torch.randn(b, t, h * (dn + dv), dtype=dtype, requires_grad=True)
        angles = torch.rand(t, dr // 2) * 2 * torch.pi
        cos, sin = (1.1 * angles.cos()).to(dtype), (1.1 * angles.sin()).to(dtype)  # scaled, as YaRN's factor does
        dout = torch.randn(b, t, h * dv, dtype=dtype)
        softmax_scale = 1.3 * (dn + dr) ** -0.5  # logits large enough that the softmax is far from uniform
        head_scale = torch.rand(h) + 0.5 if scaled else None

        constants = dict(cos=cos, sin=sin, heads=h, interleaved=interleaved, softmax_scale=softmax_scale,
                         head_scale=head_scale)
        got = outputs_and_grads(partial(attention, **constants), q, kv_a, kv, latent, dout)
        want = outputs_and_grads(partial(attention_reference, **constants), q, kv_a, kv, latent, dout)
        exact = outputs_and_grads(partial(truth, **{**constants, "cos": cos.double(), "sin": sin.double()}),
                                  *(x.detach().double().requires_grad_() for x in (q, kv_a, kv)), latent,
                                  dout.double())
        for name, g, w, e in zip(NAMES, got, want, exact, strict=True):
            assert g.dtype == w.dtype, f"{what} {name}: dtype {g.dtype}, the reference's {w.dtype}"
            assert_close(f"{what} {name}", g, w, dtype)
            assert_close(f"{what} {name} (reference against the fp64 definition)", w, e, dtype)


def check_pair_layouts() -> None:
    """RoPE reads interleaved 16-bit pairs as words where every pair is word-aligned, else as runs of elements:
    both give the same bits, forward and backward."""
    from k2c.runtime.kernels import rope

    torch.manual_seed(2)
    b, t, h, dn, dr = 2, 5, 3, 6, 8
    dtype = torch.float16
    q = torch.randn(b, t, h * (dn + dr), dtype=dtype)
    k = torch.randn(b, t, dr, dtype=dtype)
    k_odd = torch.empty(b, t, dr + 1, dtype=dtype)[..., 1:]  # the same key one element off a word's boundary
    k_odd.copy_(k)
    assert rope._pairs(True, (q, dn), (k, 0)) == rope.WORDS.value
    assert rope._pairs(True, (q, dn), (k_odd, 0)) == rope.RUNS.value
    assert rope._pairs(True, (q, dn + 1)) == rope.RUNS.value  # heads whose rotary dims start at an odd dim
    assert rope._pairs(True, (q.float(), dn), (k.float(), 0)) == rope.RUNS.value  # words are 2 x 16 bits
    assert rope._pairs(False, (q, dn), (k, 0)) == rope.HALVES.value
    angles = torch.rand(t, dr // 2) * 2 * torch.pi
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    for got, want in zip(rope.rotate(q, k, cos, sin, h, True), rope.rotate(q, k_odd, cos, sin, h, True),
                         strict=True):
        assert torch.equal(got, want), "rotate: words and runs differ"

    dq_rot, dk_rot = torch.randn(b, t, h, dr, dtype=dtype), torch.randn(b, t, h, dr, dtype=dtype)
    dq = torch.zeros(b, t, h * (dn + dr), dtype=dtype)
    dq_odd = torch.zeros(dq.numel() + 1, dtype=dtype)[1:].view(dq.shape)  # one element off a word's boundary
    assert rope._pairs(True, (dq_odd, dn)) == rope.RUNS.value
    dk = rope.rotate_back(dq_rot, dk_rot, cos, sin, dq, True)
    dk_runs = rope.rotate_back(dq_rot, dk_rot, cos, sin, dq_odd, True)
    assert torch.equal(dq, dq_odd) and torch.equal(dk, dk_runs), "rotate_back: words and runs differ"


def check_errors() -> None:
    from k2c.runtime.kernels.attention import attention

    b, t, h, dn, dr, dv = 1, 4, 2, 8, 4, 6
    q, k_rot, kv = torch.randn(b, t, h * (dn + dr)), torch.randn(b, t, dr), torch.randn(b, t, h * (dn + dv))
    cos, sin = torch.ones(t, dr // 2), torch.zeros(t, dr // 2)
    attend = partial(attention, interleaved=False, softmax_scale=0.2)
    with pytest.raises(ValueError, match=r"must be \[batch, seq, dims\]"):
        attend(q[0], k_rot, kv, cos, sin, h)
    with pytest.raises(ValueError, match="must share a batch and a non-empty sequence"):
        attend(q, k_rot[:, :3], kv, cos, sin, h)
    with pytest.raises(ValueError, match="must split into 5 heads"):
        attend(q, k_rot, kv, cos, sin, 5)
    with pytest.raises(ValueError, match="dr = k_rot's 3 even"):
        attend(q, k_rot[..., :3], kv, cos, sin, h)
    with pytest.raises(ValueError, match=r"kv must be fp32, bf16 or fp16, as q \(torch.float32 on cpu\), found "
                                         "torch.float16"):
        attend(q, k_rot, kv.half(), cos, sin, h)
    with pytest.raises(ValueError, match=r"sin must have shape \(4, 2\), found \(4, 4\)"):
        attend(q, k_rot, kv, cos, torch.zeros(t, dr), h)
    with pytest.raises(ValueError, match="cos is taken as a constant"):
        attend(q, k_rot, kv, cos.clone().requires_grad_(), sin, h)
    with pytest.raises(ValueError, match=r"head_scale must be a float tensor \[2\]"):
        attend(q, k_rot, kv, cos, sin, h, head_scale=torch.ones(3))


# --------------------------------------------------------------------------- the tests: one fresh Python each


def run_check(check: str, *args: str) -> None:
    child = subprocess.run([sys.executable, __file__, check, *args], capture_output=True, text=True, timeout=300,
                           env=subprocess_env(TRITON_INTERPRET="1"))
    assert child.returncode == 0, f"{check} {' '.join(args)} failed:\n{child.stdout}{child.stderr[-5000:]}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_attention_matches_reference(dtype: str) -> None:
    run_check("check_attention", dtype)


def test_rope_reads_word_aligned_pairs_as_words_with_the_same_bits() -> None:
    run_check("check_pair_layouts")


def test_attention_rejects_bad_inputs() -> None:
    run_check("check_errors")


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per test process, as conftest sets for the workers
    check, *dtypes = sys.argv[1:]
    globals()[check](*(getattr(torch, name) for name in dtypes))
