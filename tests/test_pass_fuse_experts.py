"""fuse_experts, Before/Expected: gate, up, SwiGLU and down of a MoE layer become one call when all run fused."""

from k2c.ir import Graph, Op, OpKind
from k2c.passes import fuse_experts


def before(down_kernel: str) -> Graph:
    g = Graph("t")
    x = g.add(Op.make(OpKind.INPUT, "x"))
    router = g.add(Op.make(OpKind.ROUTER, "layers.1.router", layer=1, kernel="triton"), x)

    def expert(proj: str, feed: Op, kernel: str = "triton") -> Op:
        return g.add(Op.make(OpKind.EXPERT_LINEAR, f"layers.1.experts.{proj}", layer=1, param=f"{proj}_proj",
                             kernel=kernel), feed, router)

    gate, up = expert("gate", x), expert("up", x)
    act = g.add(Op.make(OpKind.SWIGLU, "layers.1.experts.act", layer=1, kernel="triton"), gate, up)
    down = expert("down", act, down_kernel)
    g.add(Op.make(OpKind.LOSS, "loss"), down, x)
    return g


def lines(graph: Graph) -> list[str]:
    return [line.split("  <-")[0].strip() for line in graph.text().splitlines()[1:-1]]


def test_all_fused_become_one_call():
    assert lines(fuse_experts(before("triton"))) == [
        "x = input()",
        "layers.1.router = router(kernel='triton', layer=1)",
        "layers.1.experts.gate = expert_linear(fused_into='layers.1.experts.down', kernel='triton', layer=1, "
        "param='gate_proj')",
        "layers.1.experts.up = expert_linear(fused_into='layers.1.experts.down', kernel='triton', layer=1, "
        "param='up_proj')",
        "layers.1.experts.act = swiglu(fused_into='layers.1.experts.down', kernel='triton', layer=1)",
        "layers.1.experts.down = expert_linear(fuses=('layers.1.experts.gate', 'layers.1.experts.up', "
        "'layers.1.experts.act'), kernel='triton', layer=1, param='down_proj')",
        "loss = loss()",
    ]


def test_a_reference_op_keeps_the_layer_unfused():
    graph = before("torch")
    assert fuse_experts(graph).text() == graph.text()
