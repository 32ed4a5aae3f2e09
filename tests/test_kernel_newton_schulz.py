"""The batched Newton-Schulz kernels and Muon's fused passes (k2c/runtime/kernels/newton_schulz.py) against torch.

The Gram kernels compute only the tiles from the diagonal rightwards and mirror them: the checks fill the outputs
with NaN first, so an entry left unwritten shows, and require the result to equal its own transpose bit for bit.
The iteration is checked one step at a time against the reference's arithmetic, whole against
`optim.newton_schulz`, and from unnormalised matrices with the norms applied by its first step (the optimizer's
way in); the passes around it against plain torch formulas; and the optimizer's fused path against its torch path
on a small model.

The kernels run on the CPU under TRITON_INTERPRET=1, which Triton reads when a kernel is decorated, at import; a
pytest worker may already have imported the kernel module without it, so every check runs this file as a script in
a fresh process (`TRITON_INTERPRET=1 python tests/test_kernel_newton_schulz.py check_gram` runs one by hand).
Shapes are small and ragged (24 x 40, 40 x 24, 40 x 40) so that they cross the edges of the interpreter's 16 x 32
tiles in every dim, with Gram tiles on the diagonal and wholly above it; their rows are whole multiples of 16 bytes,
as the kernels' tensor descriptors need (other shapes take the torch path: check_errors, check_optimizer). fp32 and
fp16 only: the interpreter's tl.dot on bf16 operands is wrong.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kernel_checks import DTYPES, assert_close
from conftest import subprocess_env

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic
SHAPES = [(3, 24, 40), (3, 40, 24), (2, 40, 40)]  # wide, tall, square




def normalised(batch: int, n: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    """Wide random matrices of Frobenius norm 1, as Newton-Schulz starts from them."""
    x = torch.randn(batch, n, m)
    return (x / torch.linalg.matrix_norm(x, keepdim=True)).to(dtype)


# --------------------------------------------------------------------------- checks, each run in a fresh Python
# The kernel module is imported inside the checks: imported in the pytest process, it would stay compiled for the
# GPU for every later test there.


def check_gram() -> None:
    from k2c.runtime.kernels.newton_schulz import commuting_product, gram, gram_polynomial

    torch.manual_seed(0)
    b, c = COEFFICIENTS[1:]
    for dtype, (batch, n, k) in itertools.product(DTYPES, SHAPES):
        x = normalised(batch, n, k, dtype)
        g = gram(x, out=torch.full((batch, n, n), torch.nan, dtype=dtype))
        assert torch.equal(g, g.mT), f"gram {dtype} {(n, k)}: not exactly symmetric (or a tile left unwritten)"
        assert_close(f"gram {dtype} {(n, k)}", g, x.double() @ x.double().mT, dtype)

        p = gram_polynomial(g, b, c, out=torch.full_like(g, torch.nan))
        assert torch.equal(p, p.mT), f"gram_polynomial {dtype} {(n, k)}: not exactly symmetric"
        exact = b * g.double() + c * g.double() @ g.double()
        assert_close(f"gram_polynomial {dtype} {(n, k)}", p, exact, dtype)

        # the Gram form's pieces: a I added on the diagonal tiles only, a Gram matrix rounded to another dtype,
        # and a product of two commuting symmetric matrices (polynomials in g), mirrored from its upper triangle
        a = COEFFICIENTS[0]
        z = gram_polynomial(g, b, c, a=a, out=torch.full_like(g, torch.nan))
        assert torch.equal(z, z.mT), f"gram_polynomial with a I {dtype} {(n, k)}: not exactly symmetric"
        assert_close(f"gram_polynomial with a I {dtype} {(n, k)}", z, exact + a * torch.eye(n, dtype=torch.float64),
                     dtype)
        g16 = gram(x, out=torch.full((batch, n, n), torch.nan, dtype=torch.float16))
        assert_close(f"gram into fp16 {dtype} {(n, k)}", g16, x.double() @ x.double().mT, torch.float16)
        pz = commuting_product(p, z, out=torch.full_like(g, torch.nan))
        assert torch.equal(pz, pz.mT), f"commuting_product {dtype} {(n, k)}: not exactly symmetric"
        assert_close(f"commuting_product {dtype} {(n, k)}", pz, p.double() @ z.double(), dtype)


def check_newton_schulz() -> None:
    from k2c.runtime import optim
    from k2c.runtime.kernels.newton_schulz import newton_schulz, newton_schulz_

    torch.manual_seed(1)
    a, b, c = COEFFICIENTS
    for dtype, (batch, n, m) in itertools.product(DTYPES, SHAPES):
        # one step on wide matrices against the reference's arithmetic (torch's baddbmm) in the same dtype
        x = normalised(batch, min(n, m), max(n, m), dtype)
        gram = x @ x.mT
        want = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        assert_close(f"one step {dtype} {tuple(x.shape)}", newton_schulz_(x.clone(), 1, COEFFICIENTS), want, dtype)

        # five steps from an unnormalised stack, matrices far apart in scale, any orientation: the reference's
        # contract (per-matrix normalisation in fp32, shape kept, result in `dtype`)
        u = torch.randn(batch, n, m) * torch.logspace(-3, 3, batch).view(-1, 1, 1)
        got = newton_schulz(u, 5, COEFFICIENTS, dtype)
        want = optim.newton_schulz(u, 5, COEFFICIENTS, dtype)
        assert got.dtype == dtype and got.shape == u.shape
        assert_close(f"five steps {dtype} {tuple(u.shape)}", got, want, dtype)

        # the optimizer's way in: unnormalised wide matrices, the norms applied by the first step (of two)
        wide = u.mT if n > m else u
        scale = 1 / (torch.linalg.matrix_norm(wide) + 1e-7)
        want = optim.newton_schulz(wide, 2, COEFFICIENTS, dtype)
        got = newton_schulz_(wide.to(dtype).clone().contiguous(), 2, COEFFICIENTS, scale)  # it overwrites x
        assert_close(f"two steps scaled {dtype} {tuple(wide.shape)}", got, want, dtype)
        # the Gram form, from unnormalised wide matrices, the norms applied by its first segment: against the
        # reference's Gram form (the same rounding points), and against the standard form in fp64, which it equals
        # in exact arithmetic; 5 steps restart once, 7 twice. In fp16 only 5 steps of a matrix that is not square:
        # a square one has singular values near 0, where the Gram matrix's rounding grows most (group_params never
        # gives it the Gram form), and over 7 steps the rounding differences grow past fp16's tolerance
        for steps in (5, 7) if dtype == torch.float32 else (5,) if n != m else ():
            want = optim.newton_schulz(wide, steps, COEFFICIENTS, dtype, "gram")
            got = newton_schulz_(wide.to(dtype).clone().contiguous(), steps, COEFFICIENTS, scale, "gram")
            assert_close(f"{steps} steps, gram form, scaled {dtype} {tuple(wide.shape)}", got, want, dtype)
            exact = optim.newton_schulz(wide.double(), steps, COEFFICIENTS, torch.float64)
            assert_close(f"{steps} steps, gram form, against fp64 {dtype} {tuple(wide.shape)}", got, exact, dtype)
    # a single matrix, 2D, as the optimizer's attention matrices are
    u = torch.randn(40, 24)
    assert_close("2D", newton_schulz(u, 5, COEFFICIENTS, torch.float32),
                 optim.newton_schulz(u, 5, COEFFICIENTS, torch.float32), torch.float32)


def check_muon_passes() -> None:
    from k2c.runtime.kernels.newton_schulz import inverse_norms, muon_input, muon_update, norm_tiles

    torch.manual_seed(2)
    mu, decay, step = 0.95, 0.998, -0.3
    cases = itertools.product([(3, 24, 40), (2, 40, 24)], (True, False), (torch.float32, torch.bfloat16), DTYPES,
                              (None, 0.37))
    for (e, r, c), nesterov, grad_dtype, dtype, clip in cases:
        what = f"{(e, r, c)} nesterov={nesterov} grad {grad_dtype} out {dtype} grad scale {clip}"
        momentum = torch.randn(e, r, c)
        grad = torch.randn(e, r, c).to(grad_dtype)
        g = grad.float() * (1.0 if clip is None else clip)
        want_momentum = momentum * mu + g
        u = g + mu * want_momentum if nesterov else want_momentum
        want_scale = 1 / (torch.linalg.matrix_norm(u) + 1e-7)
        out = torch.full((e, min(r, c), max(r, c)), torch.nan, dtype=dtype)
        sumsq = torch.full((e, norm_tiles(r, c)), torch.nan)
        muon_input(momentum, grad, mu, nesterov, out, sumsq, None if clip is None else torch.tensor(clip))
        scale = inverse_norms(sumsq)
        assert_close(f"muon_input momentum {what}", momentum, want_momentum, torch.float32)
        assert_close(f"muon_input {what}", out, u.mT if r > c else u, dtype)
        assert_close(f"muon_input scale {what}", scale, want_scale, torch.float32)

        # a weight in fp16 as well (the interpreter truncates bf16 stores, where a GPU rounds them)
        weight = torch.randn(e, r, c).to(dtype)
        update = out.mT if r > c else out
        want = weight.double() * decay + step * update.double()
        # the fp32 arithmetic's own error, which outgrows want where the two terms nearly cancel
        fp32_error = 2.0**-22 * (weight.double().abs() * decay + abs(step) * update.double().abs())
        muon_update(weight, out, torch.tensor(decay), torch.tensor(step))
        if dtype == torch.float32:
            assert_close(f"muon_update {what}", weight, want, torch.float32)
        else:  # computed in fp32 and rounded once: within half a unit in the last place, 2^-11 relative
            assert ((weight.double() - want).abs() <= want.abs() * 2.0**-11 + fp32_error).all(), f"muon_update {what}"


def check_optimizer() -> None:
    """MuonClip's Muon step on the kernels (K2C_KERNELS=triton) against its torch path, two steps of a small model:
    every kind of matrix of a K2 layer (wide, tall, square, stacked experts), fp32 Newton-Schulz on the CPU. Two
    Newton-Schulz steps instead of five, which check_newton_schulz covers, keep the interpreter's time down. In the
    standard form, then in the Gram form with 4 steps (a restart; the square matrices stay standard)."""
    for form, steps in (("standard", 2), ("gram", 4)):
        optimizer_step_matches_the_torch_path(form, steps)


def optimizer_step_matches_the_torch_path(form: str, steps: int) -> None:
    from k2c.codegen import build_package
    from k2c.runtime.packages import import_package
    from specs_for_tests import tiny_spec

    from k2c.runtime.kernels.newton_schulz import fits

    # experts of 18 (72 bytes a row in fp32): they take the torch path, the other matrices the kernels
    spec = tiny_spec(**{"model.hidden_size": 32, "model.layers": 2, "model.moe.routed_experts": 4,
                        "model.moe.expert_intermediate_size": 18, "optimizer.muon.ns_steps": steps,
                        "optimizer.muon.newton_schulz": form})
    with tempfile.TemporaryDirectory() as tmp:
        build_package(spec, Path(tmp) / "pkg")
        g = import_package(Path(tmp) / "pkg", f"ns_tiny_{form}")
    results = {}
    for kernels in ("torch", "triton"):
        os.environ["K2C_KERNELS"] = kernels
        torch.manual_seed(0)
        model = g.build_model(dtype=torch.float32)
        opt = g.build_optimizer(model)
        muon = {name: p for name, p in model.named_parameters()
                if any(p is q for group in opt.param_groups if group["kind"] == "muon" for q in group["params"])}
        before = {name: p.detach().clone() for name, p in muon.items()}
        grads = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        # the updates, not the weights: early in the warm-up they are small beside the weights
        results[kernels] = {name: p.detach() - before[name] for name, p in muon.items()}
        results[kernels] |= {f"{name} momentum": opt.state[p]["momentum"] for name, p in muon.items()}
    assert any(w.ndim == 3 for w in results["torch"].values())  # stacked experts among them
    takes = {fits(*sorted(w.shape[-2:]), torch.float32) for name, w in muon.items()}
    assert takes == {True, False}, "both paths must be exercised"
    forms = {group["newton_schulz"] for group in opt.param_groups if group["kind"] == "muon"}
    assert forms == ({"standard", "gram"} if form == "gram" else {"standard"})
    for name, want in results["torch"].items():  # in units of the largest entry, so that atol is relative too
        scale = want.abs().max()
        assert_close(name, results["triton"][name] / scale, want / scale, torch.float32)


def check_orthogonalise() -> None:
    """`orthogonalise`, the sharded Muon step's Newton-Schulz on a whole gathered matrix: on the kernels
    (K2C_KERNELS=triton) against the torch reference, fp32, for a wide, a tall and a stacked matrix in both forms; a
    shape the kernels do not take (rows of 72 bytes) takes the reference itself."""
    from k2c.runtime.optim import newton_schulz, orthogonalise

    torch.manual_seed(4)
    os.environ["K2C_KERNELS"] = "triton"
    for form, steps in (("standard", 2), ("gram", 4)):
        for shape in ((24, 40), (40, 24), (3, 24, 40)):
            u = torch.randn(shape) * 3.0
            kept = u.clone()
            want = newton_schulz(u, steps, COEFFICIENTS, torch.float32, form)
            got = orthogonalise(u, steps, COEFFICIENTS, form)
            assert torch.equal(u, kept), "orthogonalise wrote into its input"
            assert got.shape == u.shape and got.dtype == torch.float32
            assert_close(f"orthogonalise {form} {shape}", got, want, torch.float32)
    u = torch.randn(2, 24, 18)
    assert torch.equal(orthogonalise(u, 2, COEFFICIENTS), newton_schulz(u, 2, COEFFICIENTS, torch.float32))
    print("ok orthogonalise")


def check_errors() -> None:
    from k2c.runtime.kernels.newton_schulz import (apply_polynomial, commuting_product, gram, gram_polynomial,
                                                   muon_input, newton_schulz_)

    x = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match=r"x must be a contiguous \[batch, rows, cols\], found shape \(2, 16, 8\)"):
        gram(x.mT)
    with pytest.raises(ValueError, match="x must be fp32, bf16 or fp16, found torch.float64"):
        gram(x.double())
    with pytest.raises(ValueError, match="g must be square matrices"):
        gram_polynomial(x, -4.775, 2.0315)
    with pytest.raises(ValueError, match=r"p must be torch.float32 of shape \(2, 8, 8\)"):
        apply_polynomial(torch.randn(2, 16, 16), x, 3.4445)
    with pytest.raises(ValueError, match=r"out must be torch.float32 or torch.bfloat16 or torch.float16 of shape "
                                         r"\(2, 8, 8\), found torch.float32 \(2, 8, 16\)"):
        gram(x, out=torch.empty(2, 8, 16))
    with pytest.raises(ValueError, match=r"q must be torch.float32 of shape \(2, 8, 8\), found torch.float16"):
        commuting_product(torch.randn(2, 8, 8), torch.randn(2, 8, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"form must be one of \('standard', 'gram'\), found 'gramm'"):
        newton_schulz_(x, 5, COEFFICIENTS, form="gramm")
    with pytest.raises(ValueError, match=r"x must be wide \(n <= m\)"):
        newton_schulz_(torch.randn(2, 16, 8), 5, COEFFICIENTS)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8, 16\)"):
        muon_input(torch.randn(2, 16, 8), torch.randn(2, 16, 8), 0.95, True, torch.empty(2, 16, 8), torch.empty(2, 1))
    with pytest.raises(ValueError, match=r"sumsq must be a contiguous fp32 \[2, 1\]"):
        muon_input(torch.randn(2, 16, 8), torch.randn(2, 16, 8), 0.95, True, torch.empty(2, 8, 16), torch.empty(2, 2))
    with pytest.raises(ValueError, match=r"scale must be fp32 of shape \(2,\)"):
        newton_schulz_(x, 5, COEFFICIENTS, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x's rows must .* a multiple of 16 bytes .* rows of 18 x torch.float16"):
        newton_schulz_(torch.randn(2, 8, 18, dtype=torch.float16), 5, COEFFICIENTS)
    with pytest.raises(ValueError, match=r"out's rows must .* rows of 6 x torch.float32"):  # the 6 x 6 Gram matrix
        gram(torch.randn(2, 6, 16))


# --------------------------------------------------------------------------- the tests: one fresh Python each


@pytest.mark.parametrize("check", ["gram", "newton_schulz", "muon_passes", "optimizer", "orthogonalise", "errors"])
def test_kernels_under_the_interpreter(check: str) -> None:
    child = subprocess.run([sys.executable, __file__, f"check_{check}"], capture_output=True, text=True, timeout=300,
                           env=subprocess_env(TRITON_INTERPRET="1"))
    assert child.returncode == 0, f"check_{check} failed:\n{child.stdout}{child.stderr[-5000:]}"


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per test process, as conftest sets for the workers
    globals()[sys.argv[1]]()
