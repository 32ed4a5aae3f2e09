"""infer_shapes: parameter shapes in the checkpoint layout, and inconsistent graphs rejected."""

import pytest

from k2c.ir import Graph, Op, OpKind, build_graph
from k2c.passes import PlacementError, infer_shapes
from specs_for_tests import tiny_spec


def test_parameter_shapes_match_the_published_layout():
    g = infer_shapes(build_graph(tiny_spec()))
    shapes = {p.name: p.shape for op in g.ops() for p in op.params}
    # heads 4, dn 16, dr 8, dv 16, kv_lora 16, q_lora 32, hidden 64, experts 8 x 32
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (4 * 24, 32)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (16 + 8, 64)
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (4 * 32, 16)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 4 * 16)
    assert shapes["model.layers.1.mlp.experts.gate_proj"] == (8, 32, 64)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (8, 64, 32)
    assert shapes["model.layers.1.mlp.shared_experts.up_proj.weight"] == (32, 64)
    assert shapes["model.layers.1.mlp.gate.e_score_correction_bias"] == (8,)
    assert str(g.out_type("layers.0.attn.core")) == "[B, S, 64]"
    assert str(g.out_type("lm_head")) == "[B, S, 256]"


def test_tied_head_owns_no_weight():
    g = infer_shapes(build_graph(tiny_spec(**{"model.tie_embeddings": True})))
    assert g.op("lm_head").params == ()


def test_mismatched_linear_is_rejected():
    g = Graph("bad")
    x = g.add(Op.make(OpKind.INPUT, "ids"))
    e = g.add(Op.make(OpKind.EMBEDDING, "embed", module="e", vocab=10, dim=8), x)
    lin = g.add(Op.make(OpKind.LINEAR, "lin", module="l", in_features=9, out_features=4), e)
    g.add(Op.make(OpKind.LOSS, "loss"), lin)
    with pytest.raises(PlacementError, match=r"model: lin: expected an input with last dim in_features = 9, "
                                             r"found \[B, S, 8\]"):
        infer_shapes(g)
