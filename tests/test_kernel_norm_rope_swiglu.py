"""The fused RMSNorm (alone and with the residual add before it) and SwiGLU kernels against their torch references,
under the Triton CPU interpreter; RoPE's reference (part of the attention's, which the fused attention is tested
against) against an fp64 formula.

The interpreter is switched on by TRITON_INTERPRET=1, read when a kernel module is imported, and an xdist worker
may already have imported triton or the kernels for another test. So every check runs in a fresh Python, this file
run as a script (`python tests/test_kernel_norm_rope_swiglu.py check_rope`), and the pytest process never
imports the kernel modules. Each check compares the kernel's forward and every gradient with the reference's, and
the reference's with an independent fp64 formula, at small shapes: odd row counts, dims that are not powers of
two, and the strided views the model passes.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from functools import partial

import pytest
import torch

from kernel_checks import DTYPES, assert_close
from conftest import subprocess_env

EPS = 1e-6




def outputs_of(fn, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    y = fn(*inputs)
    return y if isinstance(y, tuple) else (y,)


def value_and_grads(fn, inputs: tuple[torch.Tensor, ...], dys: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """[each output of fn(*inputs), d(sum of output . dy)/d input for each input]."""
    ys = outputs_of(fn, inputs)
    return [*ys, *torch.autograd.grad(ys, inputs, dys)]


def compare(what: str, kernel, reference, truth, inputs: tuple[torch.Tensor, ...], names: tuple[str, ...],
            outputs: tuple[str, ...] = ("y",)) -> None:
    """Kernel against reference in the inputs' dtype; reference and kernel against the fp64 formula; outputs and
    gradients."""
    dys = tuple(torch.randn_like(y) for y in outputs_of(reference, inputs))
    got = value_and_grads(kernel, inputs, dys)
    want = value_and_grads(reference, inputs, dys)
    exact = value_and_grads(truth, tuple(t.detach().double().requires_grad_() for t in inputs),
                            tuple(dy.double() for dy in dys))
    for name, g, w, e in zip((*outputs, *names), got, want, exact, strict=True):
        assert g.dtype == w.dtype, f"{what} {name}: dtype {g.dtype}, the reference's {w.dtype}"
        assert_close(f"{what} {name}", g, w)
        assert_close(f"{what} {name} (reference against the fp64 formula)", w, e, dtype=w.dtype)
        assert_close(f"{what} {name} (kernel against the fp64 formula)", g, e, dtype=g.dtype)


def strided(shape: tuple[int, ...], layout: str, dtype: torch.dtype) -> torch.Tensor:
    """A random tensor of `shape` that requires grad, laid out as `layout` says."""
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, requires_grad=True)
    if layout == "slice":  # a slice of the last dim: rows evenly spaced, further apart than they are long
        base = torch.randn(*shape[:-1], shape[-1] + 40, dtype=dtype, requires_grad=True)
        return base[..., 24:24 + shape[-1]]
    assert layout == "transposed"  # unit stride along the first dim, not along the last
    return torch.randn(tuple(reversed(shape)), dtype=dtype, requires_grad=True).permute(*reversed(range(len(shape))))


# --------------------------------------------------------------------------- checks, each run in a fresh Python
# The kernel modules are imported inside the checks: imported in the pytest process, they would stay compiled for
# the GPU for every later test there.


def check_rmsnorm() -> None:
    from k2c.runtime.kernels.rmsnorm import rmsnorm, rmsnorm_reference

    def truth(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)

    torch.manual_seed(0)
    # 130 rows of 160 are 9 tiles of 16 rows, more than the interpreter's 4 backward programs: some take two
    shapes = [((7, 96), "contiguous"), ((2, 5, 13, 160), "contiguous"), ((37, 160), "slice"),
              ((3, 11, 24), "transposed"), ((1, 1000), "contiguous")]
    for dtype, (shape, layout) in itertools.product(DTYPES, shapes):
        x = strided(shape, layout, dtype)
        weight = (1 + 0.2 * torch.randn(shape[-1])).to(dtype).requires_grad_()
        compare(f"rmsnorm {shape} {layout} {dtype}", partial(rmsnorm, eps=EPS), partial(rmsnorm_reference, eps=EPS),
                truth, (x, weight), ("dx", "dweight"))


def check_add_rmsnorm() -> None:
    from k2c.runtime.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference

    def truth(residual, delta, weight):
        h = residual + delta
        return h, weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)

    torch.manual_seed(3)
    kernel, reference = partial(add_rmsnorm, eps=EPS), partial(add_rmsnorm_reference, eps=EPS)
    # delta in the layouts the kernel reads in place or copies; odd row counts, dims not powers of two
    shapes = [((7, 96), "contiguous"), ((2, 5, 13, 160), "contiguous"), ((37, 160), "slice"),
              ((3, 11, 24), "transposed"), ((1, 1000), "contiguous")]
    for dtype, (shape, layout) in itertools.product(DTYPES, shapes):
        residual, delta = strided(shape, "contiguous", dtype), strided(shape, layout, dtype)
        weight = (1 + 0.2 * torch.randn(shape[-1])).to(dtype).requires_grad_()
        compare(f"add_rmsnorm {shape} delta {layout} {dtype}", kernel, reference, truth, (residual, delta, weight),
                ("dresidual", "ddelta", "dweight"), outputs=("h", "y"))


def shared_gradient_grads(fn, inputs: tuple[torch.Tensor, ...], coeffs: list[torch.Tensor], leaves: bool,
                          others: bool) -> list[torch.Tensor]:
    """The .grad of residual, delta and weight (copies of `inputs`) after two backwards of a loss that reads h and y,
    and with `others` residual and delta too; `leaves` False: residual and delta come out of other ops."""
    residual, delta, weight = (t.clone().requires_grad_() for t in inputs)
    for _ in range(2):  # the second backward adds into the gradients of the first
        r, d = (residual, delta) if leaves else (residual * 1.5, delta * 0.5)
        h, y = fn(r, d, weight, EPS)
        loss = (y * coeffs[0]).sum() + (h * coeffs[1]).sum()
        if others:
            loss = loss + (r * coeffs[2]).sum() + (d * coeffs[3]).sum()
        loss.backward()
    return [residual.grad, delta.grad, weight.grad]


def check_add_rmsnorm_gradient_is_shared_safely() -> None:
    """The fused backward hands one tensor to residual and to delta as their gradient. Where each also has other
    consumers autograd sums into it, and a second backward adds into leaves' .grad: neither sum may reach the other
    input's gradient. Leaves (AccumulateGrad may keep the tensor as .grad) and outputs of other ops, against the
    reference, whose add gives each input a gradient of its own."""
    from k2c.runtime.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference

    torch.manual_seed(4)
    for dtype, leaves, others in itertools.product(DTYPES, (True, False), (True, False)):
        inputs = (torch.randn(9, 40, dtype=dtype), torch.randn(9, 40, dtype=dtype),
                  (1 + 0.2 * torch.randn(40)).to(dtype))
        coeffs = [torch.randn(9, 40, dtype=dtype) for _ in range(4)]
        what = f"add_rmsnorm shared gradient, leaves={leaves} other consumers={others} {dtype}"
        got = shared_gradient_grads(add_rmsnorm, inputs, coeffs, leaves, others)
        want = shared_gradient_grads(add_rmsnorm_reference, inputs, coeffs, leaves, others)
        for name, g, w in zip(("dresidual", "ddelta", "dweight"), got, want, strict=True):
            assert_close(f"{what} {name}", g, w)
        assert got[0].data_ptr() != got[1].data_ptr(), f"{what}: residual and delta share one .grad"


def check_norm_copies() -> None:
    """Norms handed out in copies (fan_out_norms), each copy read by a linear of its own and, past two copies, the
    last read by nothing: every copy equals the norm, and the gradients, which the kernel sums as it reads them,
    equal the reference's, whose one output all the readers read (autograd summing)."""
    from k2c.runtime.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference, rmsnorm, rmsnorm_reference

    torch.manual_seed(5)
    for dtype, copies, layout in itertools.product(DTYPES, (2, 3, 4), ("contiguous", "slice")):
        what = f"{copies} copies, {layout} {dtype}"
        readers = [torch.randn(40, 8, dtype=dtype) for _ in range(copies if copies == 2 else copies - 1)]
        h_coeff = torch.randn(3, 7, 40, dtype=dtype)

        def loss(ys, readers=readers):
            return sum(((y @ w) ** 2).sum() for y, w in zip(ys, readers))

        x = strided((3, 7, 40), layout, dtype)
        residual, delta = strided((3, 7, 40), "contiguous", dtype), strided((3, 7, 40), layout, dtype)
        weight = (1 + 0.2 * torch.randn(40)).to(dtype).requires_grad_()

        ys = rmsnorm(x, weight, EPS, copies)
        assert len(ys) == copies, f"rmsnorm {what}: {len(ys)} outputs"
        for y in ys:
            assert_close(f"rmsnorm {what} y", y, rmsnorm_reference(x, weight, EPS))
        got = torch.autograd.grad(loss(ys), (x, weight))
        want = torch.autograd.grad(loss([rmsnorm_reference(x, weight, EPS)] * copies), (x, weight))
        for name, g, w in zip(("dx", "dweight"), got, want, strict=True):
            assert_close(f"rmsnorm {what} {name}", g, w)

        h, *ys = add_rmsnorm(residual, delta, weight, EPS, copies)
        assert len(ys) == copies, f"add_rmsnorm {what}: {len(ys)} norm outputs"
        got = torch.autograd.grad(loss(ys) + (h * h_coeff).sum(), (residual, delta, weight))
        h, y = add_rmsnorm_reference(residual, delta, weight, EPS)
        want = torch.autograd.grad(loss([y] * copies) + (h * h_coeff).sum(), (residual, delta, weight))
        for name, g, w in zip(("dresidual", "ddelta", "dweight"), got, want, strict=True):
            assert_close(f"add_rmsnorm {what} {name}", g, w)


def rope_truth(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Each pair as a complex number, times (cos + i sin); the real parts, then the imaginary ones."""
    pairs = x.unflatten(-1, (-1, 2)) if interleaved else torch.stack(x.chunk(2, dim=-1), dim=-1)
    z = torch.view_as_complex(pairs.contiguous()) * torch.complex(cos, sin)
    return torch.cat([z.real, z.imag], dim=-1)


def check_rope() -> None:
    """RoPE's reference, the rotation the fused attention is tested against, against the fp64 complex-number
    formula (the kernels themselves: tests/test_kernel_attention.py)."""
    from k2c.runtime.kernels.rope import rope_reference

    torch.manual_seed(1)
    for dtype, interleaved in itertools.product(DTYPES, (False, True)):
        for x in (torch.randn(2, 3, 9, 64, dtype=dtype), torch.randn(9, 24, dtype=dtype)):
            seq, dr = x.shape[-2:]
            angles = torch.rand(seq, dr // 2) * 2 * torch.pi
            cos, sin = (1.3 * angles.cos()).to(dtype), (1.3 * angles.sin()).to(dtype)  # scaled, as YaRN's are
            assert_close(f"rope reference {tuple(x.shape)} interleaved={interleaved} {dtype}",
                         rope_reference(x, cos, sin, interleaved),
                         rope_truth(x.double(), cos.double(), sin.double(), interleaved), dtype)


def check_swiglu() -> None:
    from k2c.runtime.kernels.swiglu import swiglu, swiglu_reference

    def truth(gate, up):
        return gate * torch.sigmoid(gate) * up

    def leaf(dtype: torch.dtype, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(shape)).to(dtype).requires_grad_()

    torch.manual_seed(2)
    for dtype in DTYPES:
        cases = [
            ("contiguous", leaf(dtype, 7, 96, scale=4.0), leaf(dtype, 7, 96)),  # out to where the sigmoid saturates
            ("contiguous", leaf(dtype, 3, 5, 333, scale=4.0), leaf(dtype, 3, 5, 333)),
            ("halves of a fused gate-up output", *leaf(dtype, 11, 2 * 160, scale=2.0).chunk(2, dim=-1)),
        ]
        for what, gate, up in cases:
            compare(f"swiglu {tuple(gate.shape)} {what} {dtype}", swiglu, swiglu_reference, truth, (gate, up),
                    ("dgate", "dup"))


def check_errors() -> None:
    from k2c.runtime.kernels.rmsnorm import add_rmsnorm, rmsnorm
    from k2c.runtime.kernels.swiglu import swiglu

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"add_rmsnorm: delta must match residual's shape, dtype and device \(4, 8\) "
                                         r"torch.float32 cpu, found \(4, 7\)"):
        add_rmsnorm(x, x[:, 1:], torch.ones(8), EPS)
    with pytest.raises(ValueError, match="add_rmsnorm: residual must be fp32, bf16 or fp16, found torch.float64"):
        add_rmsnorm(x.double(), x.double(), torch.ones(8, dtype=torch.float64), EPS)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) for x of shape \(4, 8\), found \(4,\)"):
        rmsnorm(x, torch.ones(4), EPS)
    with pytest.raises(ValueError, match="weight must have x's dtype torch.float32, found torch.float16"):
        rmsnorm(x, torch.ones(8, dtype=torch.float16), EPS)
    with pytest.raises(ValueError, match="x must be fp32, bf16 or fp16, found torch.float64"):
        rmsnorm(x.double(), torch.ones(8, dtype=torch.float64), EPS)
    with pytest.raises(ValueError, match="rmsnorm: copies must be 1 to 4, found 5"):
        rmsnorm(x, torch.ones(8), EPS, copies=5)
    with pytest.raises(ValueError, match="add_rmsnorm: copies must be 1 to 4, found 0"):
        add_rmsnorm(x, x, torch.ones(8), EPS, copies=0)
    with pytest.raises(ValueError, match=r"up must match gate's shape, dtype and device \(4, 8\)"):
        swiglu(x, torch.randn(8))


# --------------------------------------------------------------------------- the tests: one fresh Python each


def run_check(check: str) -> None:
    child = subprocess.run([sys.executable, __file__, check], capture_output=True, text=True, timeout=300,
                           env=subprocess_env(TRITON_INTERPRET="1"))
    assert child.returncode == 0, f"{check} failed:\n{child.stdout}{child.stderr[-5000:]}"


@pytest.mark.parametrize("kernel", ["rmsnorm", "add_rmsnorm", "add_rmsnorm_gradient_is_shared_safely", "norm_copies",
                                    "rope", "swiglu"])
def test_kernel_matches_reference(kernel: str) -> None:
    run_check(f"check_{kernel}")


def test_wrappers_reject_bad_inputs() -> None:
    run_check("check_errors")


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per test process, as conftest sets for the workers
    globals()[sys.argv[1]]()
