"""fuse_residual_norm: a residual add and the RMSNorm that reads its sum become one call where the norm runs fused.

Each sum of the residual stream, h = residual + delta, is read by a norm and by the next residual add, so its
gradient is the sum of two. Where select_kernels chose the Triton norm, one pass computes h and its norm, and one
pass back computes h's whole gradient, the norm's plus the next add's, as the gradient of both residual and delta
(k2c.runtime.kernels.rmsnorm.add_rmsnorm): no pass for the add, none for autograd's sum of the two gradients.

The sites are every layer's post-attention norm, and the next layer's input norm or the final norm, which read the
sum at the end of a layer: that layer then hands on the two terms unsummed. Not into a layer that recomputes its
activations (plan_parallel's `recompute_layers`), which keeps its input: it would keep both terms instead of one.
The pass writes `fused_into=<norm>` on the add and `fuses=(<add>,)` on the norm; the emitter prints the norm as
`add_norm(residual, delta)`, which returns the sum too, and the add not at all.
"""

from __future__ import annotations

from k2c.ir import Graph, Op, OpKind
from k2c.runtime.plan import TRITON


def fuse_residual_norm(graph: Graph) -> Graph:
    recomputed = set(graph.facts["recompute_layers"])
    decided: list[Op] = []
    for norm in graph.ops(OpKind.RMSNORM):
        (add,) = graph.inputs(norm)
        if add.kind is not OpKind.ADD or norm["kernel"] != TRITON:
            continue
        if add.layer != norm.layer and norm.layer in recomputed:
            continue
        decided += [add.with_attrs(fused_into=norm.name), norm.with_attrs(fuses=(add.name,))]
    return graph.replace_ops(decided)
