"""The compiler's passes: pure `Graph -> Graph` functions, run in `PIPELINE` order with `verify()` after each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from k2c.ir import Graph, IRError
from k2c.passes.balance_routers import balance_routers
from k2c.passes.count_params import count_params
from k2c.passes.errors import PlacementError
from k2c.passes.fan_out_norms import fan_out_norms
from k2c.passes.fuse_experts import fuse_experts
from k2c.passes.fuse_residual_norm import fuse_residual_norm
from k2c.passes.group_params import group_params
from k2c.passes.infer_shapes import infer_shapes
from k2c.passes.place_adapters import place_adapters
from k2c.passes.place_qk_clip import place_qk_clip
from k2c.passes.plan_parallel import plan_parallel
from k2c.passes.select_kernels import select_kernels

Pass = Callable[[Graph], Graph]

PIPELINE: tuple[Pass, ...] = (
    infer_shapes,
    count_params,
    place_adapters,
    place_qk_clip,
    balance_routers,
    group_params,
    select_kernels,
    fuse_experts,
    plan_parallel,
    fuse_residual_norm,  # after plan_parallel: it reads which layers recompute
    fan_out_norms,  # last: it counts the ops that read a norm once the others have fused theirs
)


class PassError(ValueError):
    """A pass produced a graph that fails verification: a bug in the pass, not in the spec."""


def run_pipeline(graph: Graph, dump_dir: Path | None = None) -> Graph:
    """Run every pass; with `dump_dir`, write the IR after each as `NN-<pass>.ir`."""
    graph.verify()
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00-build.ir").write_text(graph.text())
    for index, run in enumerate(PIPELINE, start=1):
        graph = run(graph)
        try:
            graph.verify()
        except IRError as err:
            raise PassError(f"pass {run.__name__} broke the graph: {err}") from err
        if dump_dir is not None:
            (dump_dir / f"{index:02d}-{run.__name__}.ir").write_text(graph.text())
    return graph


__all__ = ["PIPELINE", "PassError", "PlacementError", "run_pipeline", "balance_routers", "count_params",
           "fan_out_norms", "fuse_experts", "fuse_residual_norm", "group_params", "infer_shapes", "place_adapters",
           "place_qk_clip", "plan_parallel", "select_kernels"]
