"""IR node payloads: a closed set of op kinds, each node one frozen `Op`.

Attributes are stored as a sorted tuple of pairs so an `Op` is hashable, compares by value and prints the same
way every time. Decisions made by passes are attributes too; a pass returns new ops via `Op.with_attrs`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any


class OpKind(enum.Enum):
    INPUT = "input"
    EMBEDDING = "embedding"
    RMSNORM = "rmsnorm"
    LINEAR = "linear"
    ROPE = "rope"
    ATTENTION = "attention"
    ROUTER = "router"
    EXPERT_LINEAR = "expert_linear"  # one projection of a stack of routed experts, [E, out, in]
    SWIGLU = "swiglu"
    MOE_COMBINE = "moe_combine"
    ADD = "add"
    LM_HEAD = "lm_head"
    LOSS = "loss"


# Ops whose weight is a hidden matrix `x @ W^T` (the adapter and Muon candidates).
MATRIX_KINDS = frozenset({OpKind.LINEAR, OpKind.EXPERT_LINEAR})


@dataclass(frozen=True)
class TensorType:
    """A tensor's shape, with symbolic dims ("B", "S", "T") for batch, sequence and routed tokens."""

    shape: tuple[int | str, ...]

    def __str__(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class Param:
    """A tensor the op owns, under its name in the generated model's state dict."""

    name: str
    shape: tuple[int, ...]
    buffer: bool = False  # state that no gradient trains (the router's correction bias); not counted as a parameter

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class Op:
    kind: OpKind
    name: str  # stable id from the spec, e.g. "layers.3.attn.kv_b"
    attrs: tuple[tuple[str, Any], ...] = field(default=())

    @staticmethod
    def make(kind: OpKind, name: str, **attrs: Any) -> Op:
        return Op(kind, name, tuple(sorted((k, _freeze(v)) for k, v in attrs.items())))

    def __getitem__(self, key: str) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        raise KeyError(f"op {self.name} ({self.kind.value}) has no attribute {key!r}")

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return any(k == key for k, _ in self.attrs)

    def with_attrs(self, **attrs: Any) -> Op:
        merged = dict(self.attrs)
        merged.update({k: _freeze(v) for k, v in attrs.items()})
        return Op(self.kind, self.name, tuple(sorted(merged.items())))

    @property
    def layer(self) -> int | None:
        return self.get("layer")

    @property
    def params(self) -> tuple[Param, ...]:
        return self.get("params", ())

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={_show(v)}" for k, v in self.attrs)
        return f"{self.name} = {self.kind.value}({shown})"


def _show(value: Any) -> str:
    """Compact, deterministic text: decisions print only the fields that differ from their defaults."""
    if isinstance(value, Param):
        return f"{value.name}{list(value.shape)}" + (" buffer" if value.buffer else "")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [
            f"{f.name}={_show(getattr(value, f.name))}"
            for f in dataclasses.fields(value)
            if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default
        ]
        return f"{type(value).__name__}({', '.join(fields)})"
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, enum.Enum):
        return value.value
    return repr(value)
