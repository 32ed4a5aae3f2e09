"""fuse_gate_up, Before/Expected: a SwiGLU MLP's gate and up linears become one GEMM where neither has an adapter."""

import pytest

from k2c.ir import Graph, Op, OpKind
from k2c.passes import fuse_gate_up
from k2c.passes.place_adapters import AdapterDecision


def before(gate_adapter: str = "trainable", up_input: str = "norm") -> Graph:
    g = Graph("t")
    x = g.add(Op.make(OpKind.INPUT, "x"))
    norm = g.add(Op.make(OpKind.RMSNORM, "layers.0.mlp_norm", layer=0), x)
    feeds = {"norm": norm, "x": x}

    def linear(proj: str, adapter: str, feed: Op) -> Op:
        return g.add(Op.make(OpKind.LINEAR, f"layers.0.mlp.{proj}", layer=0, adapter=AdapterDecision(adapter)), feed)

    gate, up = linear("gate", gate_adapter, norm), linear("up", "frozen", feeds[up_input])
    act = g.add(Op.make(OpKind.SWIGLU, "layers.0.mlp.act", layer=0, kernel="triton"), gate, up)
    g.add(Op.make(OpKind.LOSS, "loss"), linear("down", "trainable", act), x)
    return g


def lines(graph: Graph) -> list[str]:
    return [line.split("  <-")[0].strip() for line in graph.text().splitlines()[1:-1]]


def test_plain_siblings_become_one_gemm():
    got = [line for line in lines(fuse_gate_up(before())) if ".gate =" in line or ".up =" in line or ".act =" in line]
    assert [line.split(" = ")[0] for line in got] == ["layers.0.mlp.gate", "layers.0.mlp.up", "layers.0.mlp.act"]
    assert "fused_into='layers.0.mlp.act'" in got[0] and "fused_into='layers.0.mlp.act'" in got[1]
    assert got[2] == "layers.0.mlp.act = swiglu(fuses=('layers.0.mlp.gate', 'layers.0.mlp.up'), kernel='triton', " \
                     "layer=0)"


@pytest.mark.parametrize("case", [{"gate_adapter": "lora"}, {"gate_adapter": "ce_lora"}, {"up_input": "x"}],
                         ids=["lora gate", "ce_lora gate", "different inputs"])
def test_an_adapter_or_another_input_keeps_them_apart(case):
    graph = before(**case)
    assert fuse_gate_up(graph).text() == graph.text()
