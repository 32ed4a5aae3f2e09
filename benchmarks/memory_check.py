"""The peak memory of a few training steps, measured, against k2c.runtime.memory's estimate (`k2c inspect --world`).

    python benchmarks/memory_check.py specs/k2-tiny.yaml specs/k2-1b.yaml --out DIR [--steps 3] [--torch-path]
    torchrun --nproc-per-node 2 benchmarks/memory_check.py specs/k2-1b.yaml --out DIR

Each spec is built and stepped as bench_step.py steps it: random token ids, labels = inputs, the spec's dtype, seq_len
and batch_size / processes sequences per process, the full MuonClip step with zero_grad(set_to_none=True). Under
torchrun the processes are laid out and sharded as `k2c train` does it (k2c.runtime.parallel). The measured peak is
torch.cuda.max_memory_allocated over `--steps` steps after `--warmup` (on several processes, the largest); the
estimate is for the same plan, processes and kernels (`--torch-path`: also every spec with K2C_KERNELS=torch
against the reference path's estimate). On a CPU the steps run (a smoke test) and the measured column stays empty.

Writes DIR/<date>-<device>-memory-w<processes>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_step  # noqa: E402  (puts the repository on sys.path)

from k2c.runtime import memory, parallel  # noqa: E402
from k2c.spec import load_spec  # noqa: E402


def start() -> torch.device:
    """This process's device; under torchrun, after joining the process group."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=parallel.timeout())
    return dev


def peak(package, dev: torch.device, world: int, args) -> int | None:
    """Bytes at the peak of `args.steps` steps after `args.warmup`, the largest over the processes (None on a CPU)."""
    plan = package.PLAN
    torch.manual_seed(0)
    model = package.build_model(dev, getattr(torch, plan.training.dtype))
    model.train()
    if world > 1:
        parallel.shard(model, plan.parallel, parallel.layout(plan, dev.type))
    rank = dist.get_rank() if world > 1 else 0
    ids = torch.randint(0, plan.model.vocab_size, (plan.training.batch_size // world, plan.training.seq_len),
                        generator=torch.Generator().manual_seed(rank)).to(dev)
    step = bench_step.k2c_step(model, package.build_optimizer(model), ids)

    if dev.type != "cuda":  # the smoke test: the steps run, there is no allocator to read
        for _ in range(args.warmup + args.steps):
            step()
        return None
    _, gib = bench_step.timed(step, args.steps, args.warmup)
    mine = round(gib * 2**30)
    if world == 1:
        return mine
    peaks: list = [None] * world
    dist.all_gather_object(peaks, mine)
    return max(peaks)


def check(spec_path: str, work: Path, dev: torch.device, world: int, torch_path: bool, args) -> dict:
    spec = load_spec(Path(spec_path))
    package = bench_step.package_of(spec, work)
    kernels = "torch" if torch_path else "plan"
    row = {"spec": Path(spec_path).name, "kernels": kernels, "processes": world}
    try:
        row["estimate"] = memory.estimate(package.PLAN, world, reference=torch_path).as_dict()
        if torch_path:
            os.environ["K2C_KERNELS"] = "torch"
        row["measured"] = peak(package, dev, world, args)
    except Exception as err:  # one spec's failure (out of memory, say) must not hide the others' figures
        row["failed"] = f"{type(err).__name__}: {err}"
    finally:
        os.environ.pop("K2C_KERNELS", None)
        bench_step.release()
    measured, estimate = row.get("measured"), row.get("estimate")
    row["ratio"] = measured / estimate["total"] if measured is not None and estimate is not None else None
    return row


def gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def write(rows: list[dict], dev: torch.device, world: int, out: Path) -> None:
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    meta = {"date": datetime.date.today().isoformat(), "device": device, "processes": world,
            "torch": torch.__version__, "python": platform.python_version(),
            "measured": "torch.cuda.max_memory_allocated over the steps after the warm-up, the largest process's"}
    stem = f"{meta['date']}-{device.replace(' ', '-').lower()}-memory-w{world}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Peak memory per device against k2c's estimate, {device}, {world} process(es), {meta['date']}", "",
             f"torch {meta['torch']}; measured: {meta['measured']}. The estimate is `k2c inspect --world {world}`'s "
             "(k2c.runtime.memory), for the same kernels.", "",
             "| spec | kernels | tokens per process | dtype | estimate GiB | measured GiB | measured / estimate | "
             "estimated peak in | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.get("estimate") or {}
        tokens = f"{e['sequences']} x {e['seq_len']}" if e else ""
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['spec']} | {r['kernels']} | {tokens} | {e.get('dtype', '')} | {gib(e.get('total'))} | "
                     f"{gib(r.get('measured'))} | {ratio} | {e.get('peak_phase', '')} | {r.get('failed', '')} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--out", required=True, help="folder for the results")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="steps before the peak is read (the first one creates "
                    "the optimizer state and tunes the kernels)")
    ap.add_argument("--torch-path", action="store_true", help="also run each spec with K2C_KERNELS=torch")
    args = ap.parse_args()
    dev = start()
    world = dist.get_world_size() if dist.is_initialized() else 1
    lead = world == 1 or dist.get_rank() == 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.specs:
            for torch_path in (False, True) if args.torch_path else (False,):
                rows.append(check(spec, Path(tmp), dev, world, torch_path, args))
                if lead:
                    print(rows[-1], flush=True)
    if lead:
        write(rows, dev, world, Path(args.out))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
