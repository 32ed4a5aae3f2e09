"""The one error a pass raises: a spec the compiler cannot decide for, named by the spec field at fault."""

from __future__ import annotations

from k2c.spec.loader import dotted


class PlacementError(ValueError):
    """A spec whose decisions cannot be taken on this model, with the spec field at fault (the CLI shows it at its
    file, line and column)."""

    def __init__(self, field: tuple[str | int, ...], message: str):
        self.field = field
        self.message = message
        super().__init__(f"{dotted(field)}: {message}")
