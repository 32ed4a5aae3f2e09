"""What every GPU benchmark family shares: one tolerance table, one timer, one results file.

A family is a module under `benchmarks/kernels/` with `run(h: Harness) -> None`: it checks each variant against
its reference with `h.check` before timing it with `h.time` (or `h.kernel_time` where the host sets the pace), and
records rows with `h.row`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
from pathlib import Path

import torch

from k2c.runtime.kernels import TOLERANCES as TOLERANCE_TABLE

# (atol, rtol) per dtype, for max |got - want| <= atol + rtol * max |want|: the kernels' one table
TOLERANCES = {getattr(torch, name): tolerance for name, tolerance in TOLERANCE_TABLE.items()}


@dataclasses.dataclass
class Row:
    family: str
    work: str  # the task and its shapes
    variant: str
    ms: float
    anchor_ms: float  # the anchor's time on the same shapes in this run
    check: str = ""
    tflops: float | None = None

    @property
    def speedup(self) -> float:
        return self.anchor_ms / self.ms


class MismatchError(AssertionError):
    pass


def device_kernels(prof) -> list:
    """The kernels and copies the device ran under a torch.profiler profile, one row per name. An operator's row
    repeats the time of the kernels it launched, and a range's device-side row (a user annotation) spans them: both
    are left out, so the rows' times add up to the device's busy time."""
    from torch.autograd import DeviceType

    return [e for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


class Harness:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.family = ""

    def check(self, what: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None) -> str:
        """Raise unless got matches want within the tolerance of `dtype` (got's by default); return a summary."""
        atol, rtol = TOLERANCES[dtype or got.dtype]
        err = (got.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item()
        if not err <= atol + rtol * scale:
            raise MismatchError(f"{self.family}: {what}: max abs error {err:.3g} over a max of {scale:.3g}")
        return f"{what} err {err:.2g}/{scale:.2g}"

    MIN_RUNS = 20

    @classmethod
    def time(cls, fn) -> float:
        """Median ms per call over 200 ms of calls, or over MIN_RUNS calls where fewer fit: a slow anchor whose time
        is the host's (the loop over experts, 25-90 ms a call) otherwise gets a median of three."""
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        if ms * cls.MIN_RUNS > 200:
            ms = do_bench(fn, warmup=25, rep=ms * cls.MIN_RUNS, return_mode="median")
        return ms

    @staticmethod
    def kernel_times(fn, calls: int = 20) -> dict[str, float]:
        """ms of GPU time per call of fn for each kernel it runs, by name, largest first: the kernels' own times
        under torch.profiler."""
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        kernels = sorted(device_kernels(prof), key=lambda e: e.self_device_time_total, reverse=True)
        return {e.key: e.self_device_time_total / 1e3 / calls for e in kernels}

    @classmethod
    def kernel_time(cls, fn, calls: int = 20) -> float:
        """ms of GPU kernel time per call of fn: the sum of its kernels' own times. For work whose wall time is the
        host's, issuing many small kernels, where `time` would measure the host."""
        return sum(cls.kernel_times(fn, calls).values())

    def row(self, work: str, variant: str, ms: float, anchor_ms: float, check: str = "",
            flops: float | None = None) -> None:
        tflops = flops / ms / 1e9 if flops else None
        self.rows.append(Row(self.family, work, variant, ms, anchor_ms, check, tflops))

    def write(self, out: Path, name: str) -> Path:
        import triton

        gpu = torch.cuda.get_device_name()
        meta = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
                "triton": triton.__version__, "python": platform.python_version(),
                "timing": "median of triton.testing.do_bench (warmup 25 ms, rep 200 ms or 20 runs, the longer)"}
        stem = f"{meta['date']}-{gpu.replace(' ', '-').lower()}-{name}"
        out.mkdir(parents=True, exist_ok=True)
        rows = [dict(dataclasses.asdict(r), speedup=r.speedup) for r in self.rows]
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        lines = [f"# k2c kernels on {gpu}, {meta['date']}", "",
                 f"torch {meta['torch']}, triton {meta['triton']}; {meta['timing']}. Each speed is the anchor's time "
                 "on the same shapes in the same run over the variant's.", "",
                 "| family | work | variant | ms | TFLOP/s | speed vs anchor | check |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.family} | {r.work} | {r.variant} | {r.ms:.3f} | "
                  f"{'' if r.tflops is None else f'{r.tflops:.0f}'} | {r.speedup:.2f}x | {r.check} |"
                  for r in self.rows]
        path = out / f"{stem}.md"
        path.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return path
