"""The two forms of Newton-Schulz against fp64 on a GPU: how far each lands from exact arithmetic, in bf16.

    python benchmarks/newton_schulz_forms.py [--out DIR]

Muon's 5 steps on batches of wide matrices whose singular values decay as exp(-decay i / n) (a momentum's spectrum
is far from flat), normalised: the torch path (`k2c.runtime.optim.newton_schulz`) and the Triton kernels, each in
the standard and the Gram form, against the standard iteration in fp64. Error: max over the batch of
||X - X_fp64||_F / ||X_fp64||_F. Also the torch path's time in each form (cuBLAS, median of do_bench); the kernels'
times are `bench_kernels.py muon`'s. Run under K2C_AUTOTUNE=first to skip the kernels' tuning: their error does not
depend on the config. Writes <out>/<date>-<gpu>-newton-schulz-forms.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from k2c.runtime import optim  # noqa: E402
from k2c.runtime.kernels import newton_schulz as ns_kernels  # noqa: E402

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SHAPES = ((64, 1408, 2048, "a third of a Moonlight layer's experts, one optimizer batch"),
          (276, 512, 1536, "a batch of k2-1b's"))
DECAYS = (0.0, 5.0, 15.0)


def matrices(batch: int, n: int, m: int, decay: float) -> torch.Tensor:
    u = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64, device="cuda"))[0]
    v = torch.linalg.qr(torch.randn(batch, m, n, dtype=torch.float64, device="cuda"))[0]
    x = (u * torch.exp(-decay * torch.arange(n, dtype=torch.float64, device="cuda") / n)) @ v.mT
    return x / torch.linalg.matrix_norm(x, keepdim=True)


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder (default: %(default)s)")
    args = ap.parse_args()
    torch.manual_seed(0)
    paths = {"torch": optim.newton_schulz, "Triton": ns_kernels.newton_schulz}
    lines = ["| matrices | decay | " + " | ".join(f"{p} {f}" for p in paths for f in ("standard", "gram")) + " |",
             "|---|---|" + "---|" * 4]
    times = []
    for batch, n, m, what in SHAPES:
        for decay in DECAYS:
            x = matrices(batch, n, m, decay)
            exact = optim.newton_schulz(x, 5, COEFFICIENTS, torch.float64)
            norm = torch.linalg.matrix_norm(exact)
            x32 = x.float()
            del x
            errors = []
            for run in paths.values():
                for form in ("standard", "gram"):
                    got = run(x32, 5, COEFFICIENTS, torch.bfloat16, form).double()
                    errors.append((torch.linalg.matrix_norm(got - exact) / norm).max().item())
            lines.append(f"| {batch} x {n} x {m} | {decay:g} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")
            print(lines[-1], flush=True)
        ms = {form: do_bench(lambda form=form, x32=x32: optim.newton_schulz(x32, 5, COEFFICIENTS, torch.bfloat16, form),
                             warmup=25, rep=200, return_mode="median") for form in ("standard", "gram")}
        times.append(f"- {batch} matrices {n} x {m} ({what}): standard {ms['standard']:.2f} ms, gram "
                     f"{ms['gram']:.2f} ms")
        print(times[-1], flush=True)
    gpu = torch.cuda.get_device_name()
    import triton

    text = "\n".join([
        f"# The two forms of Newton-Schulz against fp64, {gpu}, {datetime.date.today()}", "",
        f"torch {torch.__version__}, triton {triton.__version__}; `benchmarks/newton_schulz_forms.py`. Muon's 5 steps "
        "in bf16; error: max over the batch of ||X - X_fp64||_F / ||X_fp64||_F, the singular values decaying as "
        "exp(-decay i / n).", "", *lines, "", "The torch path's time (cuBLAS; median of do_bench):", "", *times, ""])
    out = Path(args.out) / f"{datetime.date.today()}-{gpu.lower().replace(' ', '-')}-newton-schulz-forms.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
