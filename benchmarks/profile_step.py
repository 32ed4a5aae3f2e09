"""Where one training step's time goes: GPU kernel time against wall time, and the biggest kernels.

    python benchmarks/profile_step.py [--spec specs/k2-1b.yaml] [--adapter lora|ce_lora] [--graph | --ops] [--out DIR]

Profiles `--steps` of `k2c train`'s steps (forward, backward, gradient clipping, MuonClip) after `--warmup`, bf16,
8 x 2048 random tokens, with torch.profiler; eagerly, or with `--graph` replayed from a CUDA graph
(k2c.runtime.graph). Writes <out>/profile-<spec>[-<adapter>][-graph].{md,json}: wall ms per step; the GPU's busy ms
per step (the sum of the kernels' own times: they run on one stream, so they do not overlap); the host's time
issuing the step (the calls' own time, with the waits on the GPU taken out); and the 25 largest kernels, then the
rest in one row (the JSON lists every kernel). With `--ops` (eager only), also the operators that launched them,
with their input shapes and call sites.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_step import with_adapter  # noqa: E402
from harness import device_kernels  # noqa: E402

from k2c.codegen import build_package  # noqa: E402
from k2c.runtime.graph import CudaGraphStep  # noqa: E402
from k2c.runtime.packages import import_package  # noqa: E402
from k2c.runtime.train import training_step  # noqa: E402
from k2c.spec import load_spec  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default=str(REPO / "specs" / "k2-1b.yaml"))
    ap.add_argument("--adapter", choices=("lora", "ce_lora"))
    ap.add_argument("--graph", action="store_true", help="profile steps replayed from a CUDA graph")
    ap.add_argument("--ops", action="store_true", help="eager steps only: also the operators that launched the most "
                    "GPU time, by input shapes and call site (slower to record)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.ops and args.graph:
        ap.error("--ops names the operators of eager steps; a replayed graph runs none: leave out --graph")
    spec = load_spec(Path(args.spec))
    name = spec.name  # with_adapter renames the spec for its package
    if args.adapter:
        spec = with_adapter(spec, args.adapter, 0.25 if args.adapter == "ce_lora" else None, f"profile_{args.adapter}")
    dev = torch.device("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        build_package(spec, Path(tmp) / spec.name)
        g = import_package(Path(tmp) / spec.name, f"profile_{spec.name}")
        torch.manual_seed(0)
        model = g.build_model(dev, torch.bfloat16)
        model.train()
        opt = g.build_optimizer(model)
        params = [p for p in model.parameters() if p.requires_grad]
        max_norm = g.PLAN.optimizer.grad_clip or math.inf

        def eager(ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return training_step(model, opt, params, ids, labels, max_norm)

        step = CudaGraphStep(eager, model, opt) if args.graph else eager
        ids = torch.randint(0, spec.model.vocab_size, (1, args.batch, args.seq), device=dev)
        for _ in range(args.warmup):
            step(ids, ids)
        torch.cuda.synchronize()
        # torch fills the events' Python stacks only under the profiler's verbose experimental config
        stacks = {"experimental_config": torch._C._profiler._ExperimentalConfig(verbose=True)} if args.ops else {}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=args.ops,
                     with_stack=args.ops, **stacks) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(ids, ids)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / args.steps * 1e3
    events = prof.key_averages()
    kernels = device_kernels(prof)
    gpu = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
    # the host blocks in these calls while the GPU catches up; the rest of the wall time it issues work
    sync = sum(e.self_cpu_time_total for e in events
               if "synchronize" in e.key.lower() or e.key.startswith("cudaMemcpy")) / 1e3 / args.steps
    rows = [{"kernel": e.key[:90], "calls_per_step": e.count / args.steps,
             "ms_per_step": e.self_device_time_total / 1e3 / args.steps}
            for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)]
    top, rest = rows[:25], rows[25:]
    ops = operators(prof, args.steps) if args.ops else []
    summary = {"spec": name, "adapter": args.adapter, "graph": args.graph, "wall_ms_per_step": wall,
               "gpu_busy_ms_per_step": gpu, "host_sync_ms_per_step": sync,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile-{name}" + (f"-{args.adapter}" if args.adapter else "") + ("-graph" if args.graph else "")
    (out / f"{stem}.json").write_text(json.dumps({**summary, "kernels": rows, "ops": ops}, indent=1) + "\n")
    how = "replayed from a CUDA graph" if args.graph else "eager"
    lines = [f"# Profile of one training step, {name}, {args.batch} x {args.seq} tokens, {how}, {summary['gpu']}",
             "", f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.", "",
             f"wall {wall:.1f} ms per step; GPU kernels {gpu:.1f} ms ({gpu / wall:.0%} of the wall time); "
             f"host waiting on the GPU {sync:.1f} ms per step, so issuing work {wall - sync:.1f} ms.", ""]
    lines += ["| kernel | calls/step | ms/step |", "|---|---|---|"]
    lines += [f"| `{r['kernel']}` | {r['calls_per_step']:.0f} | {r['ms_per_step']:.2f} |" for r in top]
    if rest:
        lines.append(f"| the other {len(rest)} kernels (all of them in the JSON) | "
                     f"{sum(r['calls_per_step'] for r in rest):.0f} | {sum(r['ms_per_step'] for r in rest):.2f} |")
    if ops:
        lines += ["", "The operators that launched them (GPU time of the kernels each launched itself):", "",
                  "| operator | input shapes | called from | calls/step | ms/step |", "|---|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['shapes']} | {o['where']} | {o['calls_per_step']:.0f} | {o['ms_per_step']:.2f} |"
                  for o in ops]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def operators(prof, steps: int) -> list[dict]:
    """The 40 operators (by name, input shapes and the innermost Python frames that called them) whose own kernels
    took the most GPU time. Backward operators run on autograd's thread, without Python frames."""
    events = prof.key_averages(group_by_input_shape=True, group_by_stack_n=3)
    ops = [e for e in events if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
    top = sorted(ops, key=lambda e: e.self_device_time_total, reverse=True)[:40]
    return [{"op": e.key, "shapes": str(e.input_shapes)[:80], "where": " < ".join(Path(f).name for f in e.stack[:3]),
             "calls_per_step": e.count / steps, "ms_per_step": e.self_device_time_total / 1e3 / steps} for e in top]


if __name__ == "__main__":
    main()
