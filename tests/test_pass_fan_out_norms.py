"""fan_out_norms, Before/Expected: a Triton norm that several ops read gets a copy for each of them (`readers`), not
a norm on the torch reference, one read once, nor read by more than the kernel sums; routed-expert linears, which
read the tokens through the router, and ops fused into another are not readers. Through the pipeline, the plan
records the count and the wiring hands each reader its copy."""

from k2c.codegen import compile_spec
from k2c.codegen.emit import emit_model
from k2c.codegen.lower import lower
from k2c.ir import Graph, Op, OpKind
from k2c.passes import fan_out_norms
from specs_for_tests import tiny_spec


def before(kernel: str = "triton", readers: int = 2) -> Graph:
    """A norm read by `readers` linears and by a routed-expert linear, then a norm read once."""
    g = Graph("t")
    ids = g.add(Op.make(OpKind.INPUT, "ids"))
    x = g.add(Op.make(OpKind.EMBEDDING, "embed"), ids)
    norm = g.add(Op.make(OpKind.RMSNORM, "norm", kernel=kernel), x)
    router = g.add(Op.make(OpKind.ROUTER, "router"), norm)
    g.add(Op.make(OpKind.EXPERT_LINEAR, "experts"), norm, router)
    outs = [g.add(Op.make(OpKind.LINEAR, f"linear{i}"), norm) for i in range(readers - 1)]
    last = g.add(Op.make(OpKind.RMSNORM, "last", kernel=kernel), outs[0])
    g.add(Op.make(OpKind.LOSS, "loss"), last, ids)
    return g


def attrs(graph: Graph, name: str) -> dict:
    return dict(graph.op(name).attrs)


def test_a_norm_read_by_several_ops_gets_a_copy_for_each():
    after = fan_out_norms(before(readers=3))
    assert attrs(after, "norm") == {"kernel": "triton", "readers": ("router", "linear0", "linear1")}
    assert attrs(after, "last") == {"kernel": "triton"}  # read once


def test_a_reference_norm_and_one_read_by_more_than_the_kernel_sums_keep_one_output():
    assert "readers" not in fan_out_norms(before(kernel="torch", readers=3)).op("norm")
    assert "readers" not in fan_out_norms(before(readers=5)).op("norm")
    assert fan_out_norms(before(readers=4)).op("norm")["readers"] == ("router", "linear0", "linear1", "linear2")


def test_the_plan_counts_the_copies_and_the_wiring_hands_them_out():
    graph = compile_spec(tiny_spec())
    plan = lower(graph)
    dense, moe, _ = plan.model.layers
    assert (dense.attn_norm.copies, dense.mlp_norm.copies, moe.attn_norm.copies, moe.mlp_norm.copies) == (2, 2, 2, 3)
    assert (moe.attention.q_norm.copies, moe.attention.kv_norm.copies, plan.model.norm.copies) == (1, 1, 1)
    wiring = emit_model(graph, plan, "#")
    for line in ("attn_residual, mlp_norm, mlp_norm_2, mlp_norm_3 = self.post_attention_layernorm.add_norm(x, attn_o)",
                 "router = self.mlp.route(mlp_norm)", "shared_gate = self.mlp.shared_experts.gate_proj(mlp_norm_2)",
                 "shared_up = self.mlp.shared_experts.up_proj(mlp_norm_3)",
                 "attn_kv_a = self.self_attn.kv_a_proj_with_mqa(attn_norm_2)"):
        assert line in wiring, line
