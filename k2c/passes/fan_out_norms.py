"""fan_out_norms: a Triton norm read by several ops hands each of them a copy of its own.

Autograd sums the gradients of a tensor that several ops read, a pass over memory per extra reader: the attention's
norm (read by q_a and kv_a), a dense MLP's (gate and up), an MoE layer's (router, shared gate and shared up). Given
copies (views of one output), the norm's backward gets each reader's gradient apart and its kernel sums them as it
reads them (k2c.runtime.kernels.rmsnorm): no pass for the sums. In k2-1b's step on an H200 that took 35 bf16 adds
(1.31 ms) out, for 0.85 ms more in the norms' backward, which reads the extra gradients
(benchmarks/results/2026-12-01-nvidia-h200-profile-k2_1b-graph-9.md).

The readers are the ops that take the norm's value in the wiring: not ops fused into another, nor routed-expert
linears, which read the layer's tokens through the router. Up to RMSNORM_MAX_COPIES of them; a norm with more
keeps one output. The pass writes `readers=(<op>, ...)` on the norm, in graph order; the emitter gives the first reader
the norm's name and the others that name numbered, and lowering writes the count on the norm's plan record.
"""

from __future__ import annotations

from k2c.ir import Graph, Op, OpKind
from k2c.runtime.kernels import RMSNORM_MAX_COPIES
from k2c.runtime.plan import TRITON


def _reads_value(op: Op) -> bool:
    return "fused_into" not in op and op.kind is not OpKind.EXPERT_LINEAR


def fan_out_norms(graph: Graph) -> Graph:
    readers: dict[str, list[str]] = {}
    for op in graph.ops():
        if _reads_value(op):
            for source in dict.fromkeys(i.name for i in graph.inputs(op)):
                readers.setdefault(source, []).append(op.name)
    decided = [norm.with_attrs(readers=tuple(readers[norm.name])) for norm in graph.ops(OpKind.RMSNORM)
               if norm["kernel"] == TRITON and 1 < len(readers.get(norm.name, ())) <= RMSNORM_MAX_COPIES]
    return graph.replace_ops(decided)
