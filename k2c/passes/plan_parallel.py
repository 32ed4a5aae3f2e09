"""plan_parallel: which layers recompute their activations in the backward, and over how many processes each MoE
layer's routed experts are split.

Activation checkpointing trades a second forward of a layer for its activations; the spec names the layer kinds
(dense or MoE) that make that trade. The expert split is the spec's expert-parallel degree, written on every
router so that lowering gives each MoE layer its own count of local experts.
"""

from __future__ import annotations

from k2c.ir import Graph, OpKind
from k2c.spec.schema import Parallel


def plan_parallel(graph: Graph) -> Graph:
    parallel: Parallel = graph.facts["parallel"]
    moe_layers = {op.layer for op in graph.ops(OpKind.ROUTER)}
    layers = sorted({op.layer for op in graph.ops() if op.layer is not None})
    recompute = tuple(i for i in layers if ("moe" if i in moe_layers else "dense") in parallel.activation_checkpoint)
    routers = [op.with_attrs(expert_shards=parallel.expert) for op in graph.ops(OpKind.ROUTER)]
    return graph.replace_ops(routers).with_facts(recompute_layers=recompute)
