"""place_adapters: per matrix op, a frozen base with CE-LoRA, with exact LoRA, frozen alone, or trainable.

Targets match the op's name without its `layers.N.` prefix (`attn.kv_b`, `experts.{up,down}`, `shared.*`),
optionally limited to a layer range. The first target that matches a site decides it. Without a keep ratio
from the spec, CE-LoRA sites take the CE-LoRA authors' choice: the paths that feed the softmax (q, kv) and the
gate nonlinearity keep the exact backward; the attention output takes 0.55 and the MLP up/down projections 0.65.
A keep ratio of 1 is exact LoRA: no SVD, no extra cost.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

from k2c.ir import MATRIX_KINDS, Graph, Op
from k2c.passes.errors import PlacementError
from k2c.spec.schema import Adapter, AdapterTarget, parse_layers

DEFAULT_KEEP_RATIO = {"attn.o": 0.55, "up": 0.65, "down": 0.65}


@dataclass(frozen=True)
class AdapterDecision:
    kind: str  # "trainable", "frozen", "lora" or "ce_lora"
    rank: int = 0
    alpha: float = 0.0
    keep_ratio: float = 1.0
    svd_rank: int = 0
    kept_channels: int = 0  # |S| = ceil(keep_ratio * out_features) per matrix
    backward_flops_saved: int = 0  # per token, on the input-gradient product


def site_role(op: Op) -> str:
    """The op's name below its layer: `attn.kv_b`, `experts.up`, `mlp.gate`."""
    return op.name.split(".", 2)[2]


def expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [p for alt in m.group(1).split(",") for p in expand_braces(head + alt.strip() + tail)]


def _matches(target: AdapterTarget, op: Op, layers: frozenset[int] | None) -> bool:
    if layers is not None and op.layer not in layers:
        return False
    return any(fnmatch.fnmatchcase(site_role(op), p) for p in expand_braces(target.match))


def _default_keep_ratio(role: str) -> float:
    if role in DEFAULT_KEEP_RATIO:
        return DEFAULT_KEEP_RATIO[role]
    return DEFAULT_KEEP_RATIO.get(role.rsplit(".", 1)[-1], 1.0)


def _decide(adapter: Adapter, target: AdapterTarget, index: int, op: Op) -> AdapterDecision:
    where = ("adapter", "targets", index)
    rank = target.rank or adapter.rank
    m, n = op["out_features"], op["in_features"]
    if rank > min(m, n):  # B A would have more parameters than W and no more rank: surely a mistake
        field = (*where, "rank") if target.rank else ("adapter", "rank")
        raise PlacementError(field, f"expected at most min(out, in) = {min(m, n)} for {op.name} ({m}x{n}), "
                             f"found {rank}")
    if adapter.kind == "lora":
        if target.keep_ratio not in (None, 1.0):
            raise PlacementError((*where, "keep_ratio"), "expected 1.0 or nothing for adapter kind 'lora' "
                                 f"(keep ratios below 1 need kind 'ce_lora'), found {target.keep_ratio}")
        return AdapterDecision("lora", rank, adapter.alpha)
    keep = target.keep_ratio if target.keep_ratio is not None else _default_keep_ratio(site_role(op))
    if keep >= 1.0:
        return AdapterDecision("lora", rank, adapter.alpha)
    svd_rank = target.svd_rank or adapter.svd_rank or max(1, 7 * rank // 8)
    if svd_rank >= min(m, n):
        raise PlacementError((*where, "svd_rank"), f"expected less than min(out, in) = {min(m, n)} of {op.name}, "
                             f"found {svd_rank}")
    kept = math.ceil(keep * m)
    # dY W costs 2mn per row; CE-LoRA pays 2k(m+n) for the SVD pair and 2|S|n for the kept residual rows.
    saved = 2 * m * n - 2 * svd_rank * (m + n) - 2 * kept * n
    visits = op.get("top_k", 1)  # a token visits top_k experts of a stack
    return AdapterDecision("ce_lora", rank, adapter.alpha, keep, svd_rank, kept, saved * visits)


def place_adapters(graph: Graph) -> Graph:
    adapter: Adapter = graph.facts["adapter"]
    sites = [op for op in graph.ops() if op.kind in MATRIX_KINDS]
    if adapter.kind == "none":
        return graph.replace_ops(op.with_attrs(adapter=AdapterDecision("trainable")) for op in sites)

    # Layer ranges were checked when the spec was loaded.
    layer_sets = [parse_layers(t.layers) if t.layers is not None else None for t in adapter.targets]
    roles = sorted({site_role(op) for op in sites})
    for i, (target, layers) in enumerate(zip(adapter.targets, layer_sets)):
        if not any(_matches(target, op, layers) for op in sites):
            in_layers = f" in layers {target.layers!r}" if target.layers is not None else ""
            raise PlacementError(("adapter", "targets", i, "match"),
                                 f"{target.match!r}{in_layers} matches no linear; expected one of {', '.join(roles)}")
    decided = []
    for op in sites:
        decision = AdapterDecision("frozen")
        for i, (target, layers) in enumerate(zip(adapter.targets, layer_sets)):
            if _matches(target, op, layers):
                decision = _decide(adapter, target, i, op)
                break
        decided.append(op.with_attrs(adapter=decision))
    return graph.replace_ops(decided)
