"""fuse_residual_norm, Before/Expected: a residual add joins the Triton norm that reads its sum, within a layer and
across layers, except into a norm on the torch reference or at the input of a layer that recomputes."""

from k2c.codegen import compile_spec
from k2c.codegen.lower import lower
from k2c.ir import Graph, Op, OpKind
from k2c.passes import fuse_residual_norm
from specs_for_tests import tiny_spec


def before(final_kernel: str = "triton", recompute: tuple[int, ...] = ()) -> Graph:
    """Two layers of norm -> linear -> residual add, twice, after an embedding; then the final norm."""
    g = Graph("t")
    ids = g.add(Op.make(OpKind.INPUT, "ids"))
    x = g.add(Op.make(OpKind.EMBEDDING, "embed"), ids)
    for i in range(2):
        for part in ("attn", "mlp"):
            norm = g.add(Op.make(OpKind.RMSNORM, f"layers.{i}.{part}_norm", layer=i, kernel="triton"), x)
            out = g.add(Op.make(OpKind.LINEAR, f"layers.{i}.{part}", layer=i, kernel="torch"), norm)
            x = g.add(Op.make(OpKind.ADD, f"layers.{i}.{part}_residual", layer=i, kernel="torch"), x, out)
    norm = g.add(Op.make(OpKind.RMSNORM, "norm", kernel=final_kernel), x)
    g.add(Op.make(OpKind.LOSS, "loss"), norm, ids)
    return g.with_facts(recompute_layers=recompute)


def lines(graph: Graph) -> list[str]:
    return [line.split("  <-")[0].strip() for line in graph.text().splitlines()[1:-2]]  # without the fact


def add(name: str, layer: int, norm: str) -> str:
    return f"{name} = add(fused_into={norm!r}, kernel='torch', layer={layer})"


def norm(name: str, layer: int, add: str) -> str:
    return f"{name} = rmsnorm(fuses=({add!r},), kernel='triton', layer={layer})"


def test_every_add_joins_the_norm_after_it():
    assert lines(fuse_residual_norm(before())) == [
        "ids = input()",
        "embed = embedding()",
        "layers.0.attn_norm = rmsnorm(kernel='triton', layer=0)",  # reads the embedding: no add to fuse
        "layers.0.attn = linear(kernel='torch', layer=0)",
        add("layers.0.attn_residual", 0, "layers.0.mlp_norm"),
        norm("layers.0.mlp_norm", 0, "layers.0.attn_residual"),
        "layers.0.mlp = linear(kernel='torch', layer=0)",
        add("layers.0.mlp_residual", 0, "layers.1.attn_norm"),  # across layers
        norm("layers.1.attn_norm", 1, "layers.0.mlp_residual"),
        "layers.1.attn = linear(kernel='torch', layer=1)",
        add("layers.1.attn_residual", 1, "layers.1.mlp_norm"),
        norm("layers.1.mlp_norm", 1, "layers.1.attn_residual"),
        "layers.1.mlp = linear(kernel='torch', layer=1)",
        add("layers.1.mlp_residual", 1, "norm"),
        "norm = rmsnorm(fuses=('layers.1.mlp_residual',), kernel='triton')",
        "loss = loss()",
    ]


def test_a_reference_norm_keeps_its_add():
    fused = lines(fuse_residual_norm(before(final_kernel="torch")))
    assert "layers.1.mlp_residual = add(kernel='torch', layer=1)" in fused
    assert "norm = rmsnorm(kernel='torch')" in fused


def test_a_recomputed_layer_takes_its_input_summed():
    """Its input is what it keeps for the backward: one sum, not two terms; within it the add still fuses."""
    fused = lines(fuse_residual_norm(before(recompute=(1,))))
    assert "layers.0.mlp_residual = add(kernel='torch', layer=0)" in fused
    assert "layers.1.attn_norm = rmsnorm(kernel='triton', layer=1)" in fused
    assert norm("layers.1.mlp_norm", 1, "layers.1.attn_residual") in fused
    assert add("layers.1.mlp_residual", 1, "norm") in fused


def test_the_plan_says_which_norms_add():
    plan = lower(compile_spec(tiny_spec(parallel={"activation_checkpoint": ["moe"]})))
    assert plan.parallel.recompute_layers == (1, 2)
    assert [(layer.attn_norm.adds_residual, layer.mlp_norm.adds_residual) for layer in plan.model.layers] == [
        (False, True), (False, True), (False, True)]
    assert plan.model.norm.adds_residual
