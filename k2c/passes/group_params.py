"""group_params: which optimizer updates each trainable tensor, and whether weight decay applies.

Decided from the op kind, never from a tensor's shape: hidden matrices (attention projections, dense MLP,
routed and shared experts) go to Muon, and the router weight as the spec says; embeddings, the output head and
norm gains go to AdamW. Weight decay applies everywhere (Moonlight found it matters on norm gains too).
Under an adapter only the adapter matrices train, with the spec's `lora_optimizer`. A plain AdamW spec puts
everything on AdamW.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2c.ir import MATRIX_KINDS, Graph, Op, OpKind
from k2c.spec.schema import Adapter, Optimizer


@dataclass(frozen=True)
class ParamGroup:
    name: str
    optimizer: str  # "muon" or "adamw"
    weight_decay: bool


def adapter_param_names(op: Op) -> tuple[str, str]:
    """The LoRA A and B tensors the generated adapters register for a site."""
    if op.kind is OpKind.EXPERT_LINEAR:
        return f"{op['module']}.{op['param']}_lora_A", f"{op['module']}.{op['param']}_lora_B"
    return f"{op['module']}.lora_A", f"{op['module']}.lora_B"


def group_params(graph: Graph) -> Graph:
    optimizer: Optimizer = graph.facts["optimizer"]
    adapter: Adapter = graph.facts["adapter"]
    uses_muon = optimizer.kind != "adamw"
    decided = []
    for op in graph.ops():
        groups: list[ParamGroup] = []
        if adapter.kind != "none":
            if op.kind in MATRIX_KINDS and op["adapter"].kind in ("lora", "ce_lora"):
                kind = adapter.lora_optimizer if uses_muon else "adamw"
                groups = [ParamGroup(n, kind, True) for n in adapter_param_names(op)]
        else:
            for p in op.params:
                if p.buffer:
                    continue
                hidden = op.kind in MATRIX_KINDS or (
                    op.kind is OpKind.ROUTER and optimizer.muon.router_weight == "muon")
                groups.append(ParamGroup(p.name, "muon" if hidden and uses_muon else "adamw", True))
        if groups:
            decided.append(op.with_attrs(param_groups=tuple(groups)))
    return graph.replace_ops(decided)
