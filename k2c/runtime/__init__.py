"""k2c's runtime: one implementation of the model parts, adapters, MuonClip, checkpoint I/O and the training loop,
parameterised by the plan that a generated package carries (`k2c.runtime.plan`).

This module imports nothing heavy: a generated package checks its plan schema here before it imports the rest.
"""

from __future__ import annotations

from k2c.runtime.plan import PLAN_SCHEMA


class SchemaMismatch(ImportError):
    """A generated package written for another version of the plan records than this runtime reads."""


def require_schema(schema: int, package: str) -> None:
    if schema != PLAN_SCHEMA:
        raise SchemaMismatch(
            f"{package} was generated for plan schema {schema}, but the installed k2c runtime reads schema "
            f"{PLAN_SCHEMA}; rebuild it with `k2c build` on its spec (or install the k2c that built it)"
        )
