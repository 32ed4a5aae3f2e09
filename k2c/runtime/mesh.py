"""The mesh a launch's processes form for a plan, and what makes a launch not fit it. Imports no torch, so that
`k2c check`, `inspect` and `train` can refuse a launch before anything heavy loads."""

from __future__ import annotations

from k2c.runtime.plan import Plan


class LayoutError(ValueError):
    """The processes of a launch do not fit the spec: `field` is the spec field to change, `reason` says why in a
    spec error's words (expected ..., found ...)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def mesh_shape(plan: Plan, world: int) -> tuple[int, int]:
    """(data_shard, expert) for `world` processes, or a LayoutError naming the spec field that does not fit."""
    p, batch_size = plan.parallel, plan.training.batch_size
    if world % p.expert:
        raise LayoutError("parallel.expert", f"expected a divisor of the launch's {world} processes, found {p.expert}")
    data_shard = world // p.expert
    if p.data_shard is not None and p.data_shard != data_shard:
        raise LayoutError("parallel.data_shard", f"expected {data_shard} (the launch's {world} processes / "
                          f"parallel.expert {p.expert}), found {p.data_shard}")
    if batch_size % world:
        raise LayoutError("training.batch_size",
                          f"expected a multiple of the launch's {world} processes, found {batch_size}")
    return data_shard, p.expert
