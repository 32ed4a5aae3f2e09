"""fuse_gate_up: a SwiGLU MLP's gate and up linears become one GEMM over [W_gate; W_up] where neither has an adapter.

Both read the same input, so one GEMM reads it once, and its backward takes the input's gradient in one GEMM where
two would be summed (autograd's add over the whole activation). The packed SwiGLU (`ops.swiglu_packed`) reads the
GEMM's [gate | up] output in place and returns their gradients the same way. The dense layers' MLPs and the shared
experts qualify; a LoRA or CE-LoRA site keeps its own linear (its adapter rides on that GEMM), and so does its
sibling. The pass writes `fused_into=<act>` on the gate and up ops and `fuses=(gate, up)` on the SwiGLU op; the
emitter prints the SwiGLU op as the MLP's `gate_up_swiglu` call and the linears not at all.
"""

from __future__ import annotations

from k2c.ir import Graph, Op, OpKind

PLAIN = ("trainable", "frozen")  # adapter decisions that leave the linear an nn.Linear


def fuse_gate_up(graph: Graph) -> Graph:
    decided: list[Op] = []
    for act in graph.ops(OpKind.SWIGLU):
        gate, up = graph.inputs(act)
        if gate.kind is not OpKind.LINEAR or up.kind is not OpKind.LINEAR:
            continue  # routed experts: fuse_experts' business
        if graph.inputs(gate) == graph.inputs(up) and all(op["adapter"].kind in PLAIN for op in (gate, up)):
            decided += [gate.with_attrs(fused_into=act.name), up.with_attrs(fused_into=act.name)]
            decided.append(act.with_attrs(fuses=(gate.name, up.name)))
    return graph.replace_ops(decided)
