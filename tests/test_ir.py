"""The IR: construction from a spec, verification, canonical text and determinism."""

import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

from k2c.ir import Graph, IRError, Op, OpKind, Param, build_graph
from specs_for_tests import tiny_spec


def test_build_names_follow_the_checkpoint_layout():
    g = build_graph(tiny_spec())
    kv_b = g.op("layers.1.attn.kv_b")
    assert kv_b.kind is OpKind.LINEAR
    assert kv_b["module"] == "model.layers.1.self_attn.kv_b_proj"
    assert (kv_b["in_features"], kv_b["out_features"]) == (16, 4 * (16 + 16))
    up = g.op("layers.2.experts.up")
    assert (up.kind, up["module"], up["param"]) == (OpKind.EXPERT_LINEAR, "model.layers.2.mlp.experts", "up_proj")
    assert [i.name for i in g.inputs("layers.2.moe")] == ["layers.2.experts.down", "layers.2.router",
                                                           "layers.2.shared.down"]
    assert "layers.0.experts.up" not in {op.name for op in g.ops()}  # layer 0 is dense


def test_q_proj_without_q_lora_rank():
    names = {op.name for op in build_graph(tiny_spec(**{"model.attention.q_lora_rank": None})).ops()}
    assert "layers.0.attn.q" in names and "layers.0.attn.q_a" not in names


def test_order_is_topological_and_stable():
    g = build_graph(tiny_spec())
    seen = set()
    for op in g.ops():
        assert all(i.name in seen for i in g.inputs(op)), op.name
        seen.add(op.name)
    assert [op.name for op in g.ops()] == [op.name for op in build_graph(tiny_spec()).ops()]


def test_text_is_identical_across_hash_seeds():
    code = ("import sys; sys.path[:0] = ['tests', '.']; from specs_for_tests import tiny_spec; "
            "from k2c.codegen import compile_spec; print(compile_spec(tiny_spec()).text())")
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=REPO, env=subprocess_env(PYTHONHASHSEED=seed)).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and "layers.2.experts.up = expert_linear(" in outs.pop()


def _small_graph() -> Graph:
    g = Graph("small")
    a = g.add(Op.make(OpKind.INPUT, "a"))
    g.add(Op.make(OpKind.LOSS, "loss"), a)
    return g


def test_verify_accepts_a_well_formed_graph():
    _small_graph().verify()


def test_verify_rejects_two_owners_of_one_parameter():
    g = Graph("bad")
    a = g.add(Op.make(OpKind.INPUT, "a"))
    p = (Param("w", (2, 2)),)
    b = g.add(Op.make(OpKind.LINEAR, "b", params=p), a)
    c = g.add(Op.make(OpKind.LINEAR, "c", params=p), b)
    g.add(Op.make(OpKind.LOSS, "loss"), c)
    with pytest.raises(IRError, match="owned by both 'b' and 'c'"):
        g.verify()


def test_verify_requires_one_loss():
    g = Graph("no_loss")
    g.add(Op.make(OpKind.INPUT, "a"))
    with pytest.raises(IRError, match="exactly one loss"):
        g.verify()


def test_add_rejects_unknown_inputs_and_duplicates():
    g = _small_graph()
    with pytest.raises(IRError, match="not defined before"):
        g.add(Op.make(OpKind.ADD, "x"), "nope")
    with pytest.raises(IRError, match="duplicate"):
        g.add(Op.make(OpKind.INPUT, "a"))


def test_replace_ops_returns_a_new_graph():
    g = _small_graph()
    h = g.replace_ops([g.op("a").with_attrs(note=1)])
    assert h.op("a")["note"] == 1 and "note" not in g.op("a")
    with pytest.raises(IRError, match="'loss' is loss, not input"):
        g.replace_ops([Op.make(OpKind.INPUT, "loss")])
