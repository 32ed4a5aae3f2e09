"""count_params: total and activated parameters, and FLOPs per token.

Counts follow a reference implementation's `sum(p.numel() for p in model.parameters())`: buffers such as the
router's correction bias are not parameters. Activated counts what one token touches: every dense weight plus
`top_k / E` of each expert stack; they are reported with and without the embedding and the output head.
FLOPs per token are 2 per activated matrix weight (head included) plus attention's scores and weighted sum
over the mean causal context of a training sequence, `(S + 1) / 2` keys.
"""

from __future__ import annotations

from fractions import Fraction

from k2c.ir import MATRIX_KINDS, Graph, OpKind


def count_params(graph: Graph) -> Graph:
    total = 0
    activated = Fraction(0)
    embed_and_head = 0
    matmul_weights = Fraction(0)
    attention_flops = Fraction(0)
    seq_len = next(graph.ops(OpKind.INPUT))["seq_len"]
    for op in graph.ops():
        n = sum(p.numel for p in op.params if not p.buffer)
        total += n
        share = Fraction(op["top_k"], op["experts"]) if op.kind is OpKind.EXPERT_LINEAR else Fraction(1)
        activated += n * share
        if op.kind in (OpKind.EMBEDDING, OpKind.LM_HEAD):
            embed_and_head += n
        if op.kind in MATRIX_KINDS or op.kind in (OpKind.ROUTER, OpKind.LM_HEAD):
            matmul_weights += n * share
        if op.kind is OpKind.LM_HEAD and op["tied"]:
            matmul_weights += op["in_features"] * op["out_features"]
        if op.kind is OpKind.ATTENTION:
            per_key = op["heads"] * (op["qk_nope_head_dim"] + op["qk_rope_head_dim"] + op["v_head_dim"])
            attention_flops += 2 * per_key * Fraction(seq_len + 1, 2)
    forward = 2 * matmul_weights + attention_flops
    return graph.with_facts(
        params={
            "total": total,
            "activated": round(activated),
            "total_without_embedding_and_head": total - embed_and_head,
            "activated_without_embedding_and_head": round(activated) - embed_and_head,
        },
        flops_per_token={"seq_len": seq_len, "forward": round(forward), "train": 3 * round(forward)},
    )
