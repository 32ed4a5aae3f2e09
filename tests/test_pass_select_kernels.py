"""select_kernels, Before/Expected: every op with a runtime implementation gets its kernel choice written on it."""

from k2c.codegen import compile_spec
from k2c.ir import Graph, Op, OpKind
from k2c.passes import select_kernels
from k2c.passes.select_kernels import RULES
from specs_for_tests import tiny_spec


def test_each_op_records_its_kernel():
    g = Graph("t")
    ids = g.add(Op.make(OpKind.INPUT, "ids"))
    norm = g.add(Op.make(OpKind.RMSNORM, "norm", dim=8, eps=1e-6), ids)
    wide = g.add(Op.make(OpKind.RMSNORM, "wide", dim=65537, eps=1e-6), norm)
    g.add(Op.make(OpKind.LOSS, "loss"), wide, ids)
    assert select_kernels(g).text() == (
        "graph t {\n"
        "  ids = input()  <- ()\n"
        "  norm = rmsnorm(dim=8, eps=1e-06, kernel='triton')  <- (ids)\n"
        "  wide = rmsnorm(dim=65537, eps=1e-06, kernel='torch')  <- (norm)\n"  # a row no longer fits one tile
        "  loss = loss(kernel='triton')  <- (wide, ids)\n"
        "}\n"
    )


def test_every_op_kind_but_the_input_and_rope_has_a_rule():
    # RoPE runs inside the attention's kernels, which the attention's rule chooses
    undecided = {OpKind.INPUT, OpKind.ROPE}
    assert set(RULES) == set(OpKind) - undecided
    decided = compile_spec(tiny_spec())
    assert all(("kernel" in op) == (op.kind not in undecided) for op in decided.ops())
