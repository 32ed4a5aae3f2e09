"""Check every fused kernel against its torch reference at real shapes, then time it against its anchor: one GPU run.

    python benchmarks/bench_kernels.py [family[:case,...] ...]   # families: the modules of benchmarks/kernels/

A family's cases, where it takes them (`moe:lora,ce_lora`), narrow its run to those.

Writes benchmarks/results/<date>-<gpu>-kernels.{json,md} and prints the table.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from harness import Harness  # noqa: E402


def main(argv: list[str]) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    import kernels

    families = argv or sorted(m.name for m in pkgutil.iter_modules(kernels.__path__))
    h = Harness()
    failed = []
    for family in families:
        name, _, cases = family.partition(":")
        h.family = name
        try:
            importlib.import_module(f"kernels.{name}").run(h, *filter(None, cases.split(",")))
        except Exception as err:  # one family's failure must not hide the others' figures
            failed.append(f"{name}: {type(err).__name__}: {err}")
            print(f"FAILED {failed[-1]}", file=sys.stderr)
    h.write(REPO / "benchmarks" / "results", "kernels")
    if failed:
        raise SystemExit("failed families:\n" + "\n".join(failed))


if __name__ == "__main__":
    main(sys.argv[1:])
