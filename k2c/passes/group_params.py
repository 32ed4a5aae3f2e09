"""group_params: which optimizer updates each trainable tensor, and whether weight decay applies.

Decided from the op kind, never from a tensor's shape: hidden matrices (attention projections, dense MLP,
routed and shared experts) go to Muon, and the router weight as the spec says; embeddings, the output head and
norm gains go to AdamW. Weight decay applies everywhere (Moonlight found it matters on norm gains too).
Under an adapter only the adapter matrices train, with the spec's `lora_optimizer`. A plain AdamW spec puts
everything on AdamW.

Each Muon matrix also gets the form of its Newton-Schulz iteration. Under `newton_schulz: gram` that is the Gram
form where it takes at least 10% fewer multiply-adds than the standard one, counted as the kernels compute them
(`ns_cost`): for Muon's 5 steps, a matrix at least 1.27x as long as it is wide (Moonlight's experts, 2048 x 1408:
15% fewer; K2-1b's, 1536 x 512: 36% fewer). Square matrices stay standard: there the Gram form only adds work.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2c.ir import MATRIX_KINDS, Graph, Op, OpKind
from k2c.runtime.plan import GRAM, STANDARD, restart_segments
from k2c.spec.schema import Adapter, Optimizer

GRAM_SAVING = 0.9  # the Gram form is chosen where it costs at most this share of the standard form's work


@dataclass(frozen=True)
class ParamGroup:
    name: str
    optimizer: str  # "muon" or "adamw"
    weight_decay: bool
    newton_schulz: str | None = None  # Muon's only: the form of its iteration (STANDARD or GRAM)


def ns_cost(form: str, rows: int, cols: int, steps: int) -> float:
    """Multiply-adds of `steps` Newton-Schulz steps on a rows x cols matrix (per matrix), with each symmetric
    product (a Gram matrix, or a product of commuting symmetric matrices) counted at half, as the kernels compute
    about half of one. Standard: per step, G = X X^T, G G and P X. Gram: per segment between restarts of L steps,
    G once, 4 L - 3 products of n x n matrices (Z from R R; Q Z; R <- Z R Z) and Q X once."""
    n, m = sorted((rows, cols))
    if form == STANDARD:
        return steps * (n * n * m / 2 + n ** 3 / 2 + n * n * m)
    return sum(n * n * m / 2 + (4 * length - 3) * n ** 3 / 2 + n * n * m for length in restart_segments(steps))


def ns_form(requested: str, shape: tuple[int, ...], steps: int) -> str:
    """The Newton-Schulz form of a Muon matrix of `shape` (a stack's leading dims aside) when the spec asks for
    `requested`: the Gram form only where it saves the work."""
    rows, cols = shape[-2:]
    if requested == GRAM and ns_cost(GRAM, rows, cols, steps) <= GRAM_SAVING * ns_cost(STANDARD, rows, cols, steps):
        return GRAM
    return STANDARD


def adapter_param_names(op: Op) -> tuple[str, str]:
    """The LoRA A and B tensors the generated adapters register for a site."""
    if op.kind is OpKind.EXPERT_LINEAR:
        return f"{op['module']}.{op['param']}_lora_A", f"{op['module']}.{op['param']}_lora_B"
    return f"{op['module']}.lora_A", f"{op['module']}.lora_B"


def group(name: str, kind: str, shape: tuple[int, ...], optimizer: Optimizer) -> ParamGroup:
    muon = optimizer.muon
    return ParamGroup(name, kind, True, ns_form(muon.newton_schulz, shape, muon.ns_steps) if kind == "muon" else None)


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
                rank = op["adapter"].rank
                shapes = ((rank, op["in_features"]), (op["out_features"], rank))  # A, B
                groups = [group(name, kind, shape, optimizer)
                          for name, shape in zip(adapter_param_names(op), shapes)]
        else:
            for p in op.params:
                if p.buffer:
                    continue
                hidden = op.kind in MATRIX_KINDS or (
                    op.kind is OpKind.ROUTER and optimizer.muon.router_weight == "muon")
                groups.append(group(p.name, "muon" if hidden and uses_muon else "adamw", p.shape, optimizer))
        if groups:
            decided.append(op.with_attrs(param_groups=tuple(groups)))
    return graph.replace_ops(decided)
