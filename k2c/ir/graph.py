"""The IR graph: frozen `Op` payloads over a networkx DiGraph that no one outside this module touches.

A `Graph` is immutable in use: passes build a new one with `replace_ops` / `with_facts`. Iteration order is
the lexicographic topological order keyed by the order in which ops were added (the spec's order), so two
builds of the same spec print, hash and generate the same way whatever the hash seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import networkx as nx

from k2c.ir.ops import Op, OpKind, TensorType


class IRError(ValueError):
    """A graph that is not well formed."""


class Graph:
    def __init__(self, name: str) -> None:
        self.name = name
        self._g = nx.DiGraph()
        self._facts: tuple[tuple[str, Any], ...] = ()
        self._order: tuple[str, ...] | None = None  # cached: passes change payloads, never the structure
        self._text: str | None = None

    # ---------------------------------------------------------------- building

    def add(self, op: Op, *inputs: Op | str, out: TensorType | None = None) -> Op:
        """Append `op`, fed by `inputs` in argument order; `out` is the type of what it produces."""
        if op.name in self._g:
            raise IRError(f"duplicate op name {op.name!r}")
        self._order = self._text = None
        self._g.add_node(op.name, op=op, order=self._g.number_of_nodes(), out=out)
        for slot, src in enumerate(inputs):
            src_name = src if isinstance(src, str) else src.name
            if src_name not in self._g:
                raise IRError(f"op {op.name!r} reads {src_name!r}, which is not defined before it")
            self._g.add_edge(src_name, op.name, slot=slot)
        return op

    def _copy(self) -> Graph:
        new = Graph(self.name)
        new._g = self._g.copy()
        new._facts = self._facts
        new._order = self._order
        return new

    def replace_ops(self, ops: Iterable[Op]) -> Graph:
        """A new graph where each given op replaces the op of the same name (same kind required)."""
        new = self._copy()
        for op in ops:
            node = new._g.nodes.get(op.name)
            if node is None:
                raise IRError(f"replace_ops: no op named {op.name!r}")
            if node["op"].kind is not op.kind:
                raise IRError(f"replace_ops: {op.name!r} is {node['op'].kind.value}, not {op.kind.value}")
            node["op"] = op
        return new

    def with_types(self, types: Mapping[str, TensorType]) -> Graph:
        new = self._copy()
        for name, t in types.items():
            new._g.nodes[name]["out"] = t
        return new

    def with_facts(self, **facts: Any) -> Graph:
        """Whole-graph results of a pass (parameter counts, ...), kept beside the ops."""
        new = self._copy()
        merged = dict(self._facts)
        merged.update(facts)
        new._facts = tuple(sorted(merged.items()))
        return new

    # ---------------------------------------------------------------- reading

    def ops(self, kind: OpKind | None = None) -> Iterator[Op]:
        if self._order is None:
            rank = nx.get_node_attributes(self._g, "order")
            self._order = tuple(nx.lexicographical_topological_sort(self._g, key=rank.__getitem__))
        for name in self._order:
            op = self._g.nodes[name]["op"]
            if kind is None or op.kind is kind:
                yield op

    def op(self, name: str) -> Op:
        try:
            return self._g.nodes[name]["op"]
        except KeyError:
            raise IRError(f"no op named {name!r}") from None

    def inputs(self, op: Op | str) -> tuple[Op, ...]:
        name = op if isinstance(op, str) else op.name
        edges = sorted(self._g.in_edges(name, data="slot"), key=lambda e: e[2])
        return tuple(self._g.nodes[src]["op"] for src, _, _ in edges)

    def out_type(self, op: Op | str) -> TensorType | None:
        return self._g.nodes[op if isinstance(op, str) else op.name]["out"]

    @property
    def facts(self) -> dict[str, Any]:
        return dict(self._facts)

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    # ---------------------------------------------------------------- checking and printing

    def verify(self) -> None:
        """Well-formedness: acyclic, names consistent, one loss, input slots contiguous, params unique."""
        if not nx.is_directed_acyclic_graph(self._g):
            raise IRError("the graph has a cycle")
        seen_params: dict[str, str] = {}
        losses = 0
        for name, data in self._g.nodes(data=True):
            op = data["op"]
            if op.name != name:
                raise IRError(f"node {name!r} holds op named {op.name!r}")
            slots = sorted(s for _, _, s in self._g.in_edges(name, data="slot"))
            if slots != list(range(len(slots))):
                raise IRError(f"op {name!r} has input slots {slots}, expected 0..{len(slots) - 1}")
            if op.kind is OpKind.INPUT and slots:
                raise IRError(f"input op {name!r} has inputs")
            if op.kind is not OpKind.INPUT and not slots:
                raise IRError(f"op {name!r} ({op.kind.value}) has no inputs")
            losses += op.kind is OpKind.LOSS
            for p in op.params:
                if p.name in seen_params:
                    raise IRError(f"parameter {p.name!r} owned by both {seen_params[p.name]!r} and {name!r}")
                if any(d <= 0 for d in p.shape):
                    raise IRError(f"parameter {p.name!r} of op {name!r} has shape {p.shape}")
                seen_params[p.name] = name
        if losses != 1:
            raise IRError(f"expected exactly one loss op, found {losses}")

    def text(self) -> str:
        """The canonical printed form: one line per op, inputs by name, then the facts."""
        if self._text is None:
            self._text = self._render_text()
        return self._text

    def _render_text(self) -> str:
        lines = [f"graph {self.name} {{"]
        for op in self.ops():
            ins = ", ".join(i.name for i in self.inputs(op))
            out = self.out_type(op)
            type_text = f" : {out}" if out is not None else ""
            lines.append(f"  {op}  <- ({ins}){type_text}")
        for key, value in self._facts:
            lines.append(f"  fact {key} = {value!r}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def digest(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()
