"""The LoRA / CE-LoRA linear kernels (k2c/runtime/kernels/lora.py): references against autograd of the plain
formulas, kernels against references.

The references are checked in this process. The Triton kernels run on the CPU under TRITON_INTERPRET=1, which
Triton reads when it decorates a kernel, at import; a pytest worker may already have imported the kernel module
without it (through another test file), so the kernel checks run this file as a script in a fresh process with the
variable set (`TRITON_INTERPRET=1 python tests/test_kernel_lora.py float16` runs them by hand).

Shapes are small and ragged (T=67, n=48, m=40, r=4, k=3, |S|=11) so that every tile edge of the interpreter's
32-wide config is crossed. fp32 and fp16 only: the interpreter's tl.dot on bf16 operands is wrong.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from kernel_checks import tolerance
from conftest import subprocess_env

from k2c.runtime.kernels import lora as K

T, N_IN, N_OUT, RANK, SVD_RANK, KEPT = 67, 48, 40, 4, 3, 11
SCALE = 1.5


def inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA site with a non-zero B, a distinct X' (a dropout mask), dY, and CE-LoRA's S, R_S, B0, A0 from W's SVD."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    weight = randn(N_OUT, N_IN) / N_IN**0.5
    u, sigma, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = sigma[:SVD_RANK].sqrt()
    svd_B, svd_A = u[:, :SVD_RANK] * root, root[:, None] * vh[:SVD_RANK]
    kept = torch.randperm(N_OUT, generator=g)[:KEPT].sort().values
    x = randn(T, N_IN)
    t = {
        "x": x, "x_adapter": x * (torch.rand(T, N_IN, generator=g) > 0.25) / 0.75, "weight": weight,
        "lora_A": randn(RANK, N_IN) / N_IN**0.5, "lora_B": randn(N_OUT, RANK) / RANK**0.5, "dy": randn(T, N_OUT),
        "svd_B": svd_B, "svd_A": svd_A, "kept_rows": (weight.double() - svd_B @ svd_A)[kept],
    }
    return {name: v.to(dtype) for name, v in t.items()} | {"kept": kept}


# --------------------------------------------------------------------------- references, in this process


def test_lora_references_match_autograd_of_the_formula():
    t = inputs()
    x = t["x"].clone().requires_grad_()
    lora_A, lora_B = t["lora_A"].clone().requires_grad_(), t["lora_B"].clone().requires_grad_()
    y = x @ t["weight"].T + SCALE * (x @ lora_A.T) @ lora_B.T
    y.backward(t["dy"])

    y_ref, xa = K.lora_forward_reference(t["x"], t["x"], t["weight"], t["lora_A"], t["lora_B"], SCALE)
    torch.testing.assert_close(y_ref, y.detach())
    torch.testing.assert_close(xa, t["x"] @ t["lora_A"].T)
    torch.testing.assert_close(K.lora_input_grad_reference(t["dy"], t["weight"], t["lora_A"], t["lora_B"], SCALE),
                               x.grad)
    grad_a, grad_b = K.lora_weight_grads_reference(t["dy"], t["x"], xa, t["lora_B"], SCALE)
    torch.testing.assert_close(grad_a, lora_A.grad)
    torch.testing.assert_close(grad_b, lora_B.grad)


def test_celora_reference_is_the_formula_built_from_the_svd():
    t = inputs()
    d = {name: v.double() for name, v in t.items() if name != "kept"}
    kept, weight = t["kept"], d["weight"]
    # CE-LoRA (shared/reference/celora.md): dY W ~= (dY B0) A0 + dY[:, S] R[S, :], R = W - B0 A0; LoRA's term exact
    residual = weight - d["svd_B"] @ d["svd_A"]
    want = ((d["dy"] @ d["svd_B"]) @ d["svd_A"] + d["dy"][:, kept] @ residual[kept]
            + SCALE * (d["dy"] @ d["lora_B"]) @ d["lora_A"])
    dx, sq = K.celora_input_grad_reference(t["dy"], kept, t["kept_rows"], t["svd_B"], t["svd_A"], t["lora_A"],
                                           t["lora_B"], SCALE, channel_norms=True)
    torch.testing.assert_close(dx, want.float())
    torch.testing.assert_close(sq, torch.linalg.vector_norm(t["dy"], dim=0) ** 2)
    assert K.celora_input_grad_reference(t["dy"], kept, t["kept_rows"], t["svd_B"], t["svd_A"], t["lora_A"],
                                         t["lora_B"], SCALE)[1] is None

    # keeping every channel is exact LoRA: dY R + (dY B0) A0 = dY W
    every = torch.arange(N_OUT)
    dx_all, _ = K.celora_input_grad_reference(t["dy"], every, residual.float(), t["svd_B"], t["svd_A"], t["lora_A"],
                                              t["lora_B"], SCALE)
    torch.testing.assert_close(dx_all, K.lora_input_grad_reference(t["dy"], t["weight"], t["lora_A"], t["lora_B"],
                                                                   SCALE))


def test_wrappers_reject_what_the_kernels_cannot_take():
    t = inputs()
    with pytest.raises(ValueError, match="lora_B must have shape"):
        K.lora_forward(t["x"], t["x"], t["weight"], t["lora_A"], t["lora_B"].T, SCALE)
    with pytest.raises(ValueError, match="weight must be torch.float32"):
        K.lora_input_grad(t["dy"], t["weight"].half(), t["lora_A"], t["lora_B"], SCALE)
    with pytest.raises(ValueError, match="kept must be a 1D int64"):
        K.celora_input_grad(t["dy"], t["kept"].int(), t["kept_rows"], t["svd_B"], t["svd_A"], t["lora_A"],
                            t["lora_B"], SCALE)
    with pytest.raises(ValueError, match="expected fp32, bf16 or fp16"):
        K.thin_matmul(t["x"].double(), t["lora_A"].double().T)
    with pytest.raises(RuntimeError, match="must be frozen"):
        K.LoRALinearKernel.apply(t["x"], t["x"], t["weight"].requires_grad_(), t["lora_A"], t["lora_B"], SCALE)


# --------------------------------------------------------------------------- kernels, in a child under the interpreter


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kernels_match_references_under_the_interpreter(dtype):
    proc = subprocess.run([sys.executable, __file__, dtype], check=False, capture_output=True, text=True,
                          timeout=300, env=subprocess_env(TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def kernel_checks(dtype: torch.dtype) -> list[str]:
    """Every kernel entry point against its reference; returns one line per check, failures marked."""
    assert K.INTERPRETED, "run under TRITON_INTERPRET=1"
    atol, rtol = tolerance(dtype)
    t = inputs(dtype)
    x, x_adapter, weight, lora_A, lora_B, dy = (t[n] for n in ("x", "x_adapter", "weight", "lora_A", "lora_B", "dy"))
    celora = (t["kept"], t["kept_rows"], t["svd_B"], t["svd_A"])
    lines = []

    def check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
        err = (got.float() - want.float()).abs().max().item()
        tol = atol + rtol * want.float().abs().max().item()
        lines.append(f"{'ok  ' if err <= tol else 'FAIL'} {what}: max error {err:.3g}, tolerance {tol:.3g}")

    y, xa = K.lora_forward(x, x_adapter, weight, lora_A, lora_B, SCALE)
    y_ref, xa_ref = K.lora_forward_reference(x, x_adapter, weight, lora_A, lora_B, SCALE)
    check("lora_forward Y", y, y_ref)
    check("lora_forward XA", xa, xa_ref)

    dx_ref = K.lora_input_grad_reference(dy, weight, lora_A, lora_B, SCALE)
    check("lora_input_grad", K.lora_input_grad(dy, weight, lora_A, lora_B, SCALE), dx_ref)
    check("lora_input_grad given dY B", K.lora_input_grad(dy, weight, lora_A, lora_B, SCALE, dy_B=dy @ lora_B), dx_ref)

    dx, sq = K.celora_input_grad(dy, *celora, lora_A, lora_B, SCALE, channel_norms=True)
    dx_ref, sq_ref = K.celora_input_grad_reference(dy, *celora, lora_A, lora_B, SCALE, channel_norms=True)
    check("celora_input_grad dX", dx, dx_ref)
    check("celora_input_grad ||dY[:, i]||^2", sq, sq_ref)
    check("celora_input_grad without norms", K.celora_input_grad(dy, *celora, lora_A, lora_B, SCALE)[0], dx_ref)

    for got, want, name in zip(K.lora_weight_grads(dy, x_adapter, xa_ref, lora_B, SCALE),
                               K.lora_weight_grads_reference(dy, x_adapter, xa_ref, lora_B, SCALE), ("dA", "dB")):
        check(f"lora_weight_grads {name}", got, want)
    check("matmul_plus_low_rank without a low-rank term", K.matmul_plus_low_rank(dy, weight),
          (dy.float() @ weight.float()).to(dtype))
    low_a, svd_A = torch.randn(dy.shape[0], lora_A.shape[0] + 3, dtype=dtype), t["svd_A"][:3]
    check("matmul_plus_low_rank with two scaled factors",
          K.matmul_plus_low_rank(dy, weight, low_a, lora_A, 0.7, low_b2=svd_A, scale2=-1.3),
          (dy.float() @ weight.float() + 0.7 * low_a[:, :-3].float() @ lora_A.float()
           - 1.3 * low_a[:, -3:].float() @ svd_A.float()).to(dtype))
    dy_v, sq = K.thin_matmul(dy, lora_B, channel_norms=True)
    check("thin_matmul dY B", dy_v, (dy.float() @ lora_B.float()).to(dtype))
    dy_v = K.thin_matmul(dy, lora_B, v2=t["svd_B"])[0]
    check("thin_matmul dY [B | B0]", dy_v, (dy.float() @ torch.cat((lora_B, t["svd_B"]), 1).float()).to(dtype))
    assert dy_v.stride(0) % 8 == 0, f"thin_matmul's rows must start 16-byte aligned, stride {dy_v.stride(0)}"
    check("thin_matmul ||dY[:, i]||^2", sq, dy.float().square().sum(0))

    # the autograd.Function: Y and every gradient, with X' = X and with a dropout's X', exact and CE-LoRA
    for shared in (True, False):
        for ce in (False, True):
            what = f"LoRALinearKernel {'CE-LoRA' if ce else 'LoRA'}, {'X' if shared else 'dropout(X)'} as X'"
            x_leaf, a_leaf, b_leaf = (v.clone().requires_grad_() for v in (x, lora_A, lora_B))
            mask = x_adapter != 0
            x_drop = x_leaf if shared else x_leaf * mask / 0.75
            chosen = []

            def select(sq_norms, chosen=chosen):  # a refresh step: choose the top |S| of ||dY[:, i]||^2 alone
                chosen.append(sq_norms)
                kept = sq_norms.topk(KEPT).indices.sort().values
                return kept, (weight.double() - t["svd_B"].double() @ t["svd_A"].double())[kept].to(dtype)

            y = K.LoRALinearKernel.apply(x_leaf, x_drop, weight, a_leaf, b_leaf, SCALE, celora if ce else None,
                                         select if ce else None)
            y.backward(dy)
            xd = x_drop.detach()
            y_ref, xa_ref = K.lora_forward_reference(x, xd, weight, lora_A, lora_B, SCALE)
            check(f"{what}: Y", y, y_ref)
            # dX = base part + dropout's backward of the adapter's part s (dY B) A
            adapter = SCALE * (dy.float() @ lora_B.float()) @ lora_A.float()
            base = (dy.float() @ weight.float()).to(dtype)
            if ce:
                check(f"{what}: ||dY[:, i]||^2 handed to select", chosen[0], dy.float().square().sum(0))
                kept, kept_rows = select(chosen[0])
                base = K.celora_input_grad_reference(dy, kept, kept_rows, t["svd_B"], t["svd_A"], lora_A,
                                                     lora_B, 0.0)[0]
            dx_ref = base.float() + adapter * (1 if shared else mask / 0.75)
            check(f"{what}: dX", x_leaf.grad, dx_ref.to(dtype))
            grad_a, grad_b = K.lora_weight_grads_reference(dy, xd, xa_ref, lora_B, SCALE)
            check(f"{what}: dA", a_leaf.grad, grad_a)
            check(f"{what}: dB", b_leaf.grad, grad_b)
    return lines


if __name__ == "__main__":
    torch.manual_seed(0)
    results = kernel_checks(getattr(torch, sys.argv[1]))
    print("\n".join(results))
    sys.exit(any(line.startswith("FAIL") for line in results))
