"""balance_routers: how fast each router's correction bias moves under aux-loss-free balancing.

DeepSeek-V3's rule moves the bias of every expert by `rate` per step towards even load. Under an adapter the base
model is frozen, and moving its router biases would change it outside the adapter, so the rate is 0 there, as it
is when the spec turns balancing off.
"""

from __future__ import annotations

from k2c.ir import Graph, OpKind
from k2c.spec.schema import Adapter


def balance_routers(graph: Graph) -> Graph:
    adapter: Adapter = graph.facts["adapter"]
    decided = []
    for router in graph.ops(OpKind.ROUTER):
        moves = router["balance"] == "aux_free_bias" and adapter.kind == "none"
        decided.append(router.with_attrs(bias_rate=router["balance_rate"] if moves else 0.0))
    return graph.replace_ops(decided)
