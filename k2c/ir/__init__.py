"""The k2c intermediate representation: typed op nodes over a graph, built from a spec."""

from k2c.ir.build import build_graph
from k2c.ir.graph import Graph, IRError
from k2c.ir.ops import MATRIX_KINDS, Op, OpKind, Param, TensorType

__all__ = ["MATRIX_KINDS", "Graph", "IRError", "Op", "OpKind", "Param", "TensorType", "build_graph"]
