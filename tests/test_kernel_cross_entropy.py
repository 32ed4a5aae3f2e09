"""The fused cross-entropy (k2c/runtime/kernels/cross_entropy.py) against torch's and an fp64 formula.

Under the Triton CPU interpreter, each check in a fresh Python (TRITON_INTERPRET=1 is read when the kernel module is
imported; `python tests/test_kernel_cross_entropy.py check_loss` runs one by hand). Vocabularies of 200 and 64 cross
the interpreter's 64-wide blocks or fill one exactly; rows mix ignored targets (-100) with targets at both ends of
the vocabulary; logits come contiguous and as a row-strided slice, as the model's head might give them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kernel_checks import DTYPES, assert_close
from conftest import subprocess_env


def exact(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over kept rows of log sum exp(row) - row[target], in fp64, written out."""
    x = logits.double()
    kept = targets != -100
    picked = x.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return ((x.logsumexp(1) - picked) * kept).sum() / kept.sum()


def check_loss() -> None:
    from k2c.runtime.kernels.cross_entropy import cross_entropy, cross_entropy_reference

    torch.manual_seed(0)
    for dtype, vocab, layout in [(d, v, lay) for d in DTYPES for v in (200, 64) for lay in ("contiguous", "slice")]:
        rows = 9
        if layout == "contiguous":
            logits = (3 * torch.randn(rows, vocab)).to(dtype).requires_grad_()
            view = logits
        else:
            logits = (3 * torch.randn(rows, vocab + 24)).to(dtype).requires_grad_()
            view = logits[:, 8:8 + vocab]
        targets = torch.randint(0, vocab, (rows,))
        targets[[1, 5]] = -100
        targets[2], targets[3] = 0, vocab - 1
        what = f"{dtype} vocab {vocab} {layout}"
        got = cross_entropy(view, targets)
        want = cross_entropy_reference(view, targets)
        assert got.dtype == want.dtype == torch.float32
        assert_close(f"{what} loss", got, want, torch.float32)
        assert_close(f"{what} loss (reference against fp64)", want, exact(view, targets), torch.float32)
        dloss = torch.tensor(0.7)
        (g_got,) = torch.autograd.grad(got, logits, dloss)
        (g_want,) = torch.autograd.grad(want, logits, dloss)
        assert g_got.dtype == g_want.dtype == dtype
        assert_close(f"{what} grad", g_got, g_want)
        x = view.detach().double().requires_grad_()
        (g_exact,) = torch.autograd.grad(exact(x, targets), x, dloss.double())
        assert_close(f"{what} grad (reference against fp64)", g_want[:, 8:8 + vocab] if layout == "slice" else g_want,
                     g_exact, dtype)
        assert not g_got[[1, 5]].any(), f"{what}: an ignored row has a gradient"

    # no target at all: 0 / 0, as the reference
    none = torch.full((3,), -100)
    assert cross_entropy(torch.randn(3, 10), none).isnan() and cross_entropy_reference(torch.randn(3, 10), none).isnan()


def check_errors() -> None:
    from k2c.runtime.kernels.cross_entropy import cross_entropy

    with pytest.raises(ValueError, match="logits must be \\[rows, vocab\\] with unit stride"):
        cross_entropy(torch.randn(10, 4).T, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits must be fp32, bf16 or fp16"):
        cross_entropy(torch.randn(4, 10, dtype=torch.float64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"targets must be int64 of shape \(4,\)"):
        cross_entropy(torch.randn(4, 10), torch.zeros(4, dtype=torch.int32))


@pytest.mark.parametrize("check", ["loss", "errors"])
def test_kernel_under_the_interpreter(check: str) -> None:
    child = subprocess.run([sys.executable, __file__, f"check_{check}"], capture_output=True, text=True, timeout=300,
                           env=subprocess_env(TRITON_INTERPRET="1"))
    assert child.returncode == 0, f"check_{check} failed:\n{child.stdout}{child.stderr[-5000:]}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    globals()[sys.argv[1]]()
