"""fuse_experts: a MoE layer's routed-expert ops (gate, up, SwiGLU, down) become one call where their kernels fuse.

When select_kernels chose the grouped Triton kernels for all of them, the gate/up GEMM with SwiGLU in its epilogue
and the down GEMM that weights and scatters its rows run as one Function (`Experts.forward`), reading each token
from the layer's input in place. The pass writes `fused_into=<down op>` on the gate, up and SwiGLU ops and
`fuses=(gate, up, act)` on the down op; the emitter prints the down op as that one call and the others not at all.
"""

from __future__ import annotations

from k2c.ir import Graph, Op, OpKind
from k2c.runtime.plan import TRITON


def fuse_experts(graph: Graph) -> Graph:
    decided: list[Op] = []
    for down in graph.ops(OpKind.EXPERT_LINEAR):
        if down["param"] != "down_proj":
            continue
        act = graph.inputs(down)[0]
        gate, up = graph.inputs(act)
        group = (gate, up, act, down)
        if all(op["kernel"] == TRITON for op in group):
            decided += [op.with_attrs(fused_into=down.name) for op in (gate, up, act)]
            decided.append(down.with_attrs(fuses=tuple(op.name for op in (gate, up, act))))
    return graph.replace_ops(decided)
