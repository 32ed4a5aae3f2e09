"""place_qk_clip: for each attention layer, how QK-Clip rescales its heads after an optimizer step.

MLA rule (Kimi K2): per head h, the non-rotary query and key rows scale by sqrt(gamma_h) and the rotary query
rows by gamma_h; the rotary key shared by all heads, the values and o_proj are left alone. Rows are given as
(offset, count, stride): head h owns rows `[h*stride + offset, h*stride + offset + count)`.
When the query or key weights are frozen (adapter training), the weights may not move, so the layer gets a
per-head logit scale in the forward pass instead (mode "scale"), folded into the weights on export.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2c.ir import Graph, Op, OpKind
from k2c.passes.errors import PlacementError
from k2c.spec.schema import Optimizer


@dataclass(frozen=True)
class ClipDecision:
    mode: str  # "weights", "scale" or "off"
    tau: float
    q_weight: str
    kv_weight: str
    q_sqrt_gamma_rows: tuple[int, int, int]
    q_gamma_rows: tuple[int, int, int]
    kv_sqrt_gamma_rows: tuple[int, int, int]


def place_qk_clip(graph: Graph) -> Graph:
    optimizer: Optimizer = graph.facts["optimizer"]
    enabled = optimizer.kind == "muonclip" and optimizer.qk_clip.enabled
    decided = []
    for attn in graph.ops(OpKind.ATTENTION):
        q, kv_b, _ = graph.inputs(attn)
        if q.kind is OpKind.RMSNORM or kv_b.kind is not OpKind.LINEAR:
            raise PlacementError(("model", "attention"), f"expected {attn.name} to be fed by query and kv_b "
                                 f"projections, found {q.kind.value} and {kv_b.kind.value}")
        dn, dr, dv = attn["qk_nope_head_dim"], attn["qk_rope_head_dim"], attn["v_head_dim"]
        if not enabled:
            mode = "off"
        elif _trainable(q) and _trainable(kv_b):
            mode = "weights"
        else:
            mode = "scale"
        decided.append(attn.with_attrs(qk_clip=ClipDecision(
            mode=mode,
            tau=optimizer.qk_clip.tau,
            q_weight=f"{q['module']}.weight",
            kv_weight=f"{kv_b['module']}.weight",
            q_sqrt_gamma_rows=(0, dn, dn + dr),
            q_gamma_rows=(dn, dr, dn + dr),
            kv_sqrt_gamma_rows=(0, dn, dn + dv),
        )))
    return graph.replace_ops(decided)


def _trainable(op: Op) -> bool:
    return op["adapter"].kind == "trainable"
