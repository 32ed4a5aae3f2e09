"""infer_shapes: the output type of every op and the parameters it owns, checked against its inputs."""

from __future__ import annotations

from k2c.ir import Graph, Op, OpKind, Param, TensorType
from k2c.passes.errors import PlacementError

TOKENS = ("B", "S")


def infer_shapes(graph: Graph) -> Graph:
    types: dict[str, TensorType] = {}
    new_ops: list[Op] = []
    for op in graph.ops():
        ins = [types[i.name] for i in graph.inputs(op)]
        out, params = _infer(op, ins)
        types[op.name] = out
        new_ops.append(op.with_attrs(params=params))
    return graph.replace_ops(new_ops).with_types(types)


def spec_field(op: Op) -> tuple[str, ...]:
    """The spec section whose sizes an op takes, for errors."""
    role = op.name.split(".", 2)[-1]
    if role.startswith("attn"):
        return ("model", "attention")
    if role.startswith(("experts", "router", "shared", "moe")):
        return ("model", "moe")
    if role.startswith("mlp."):
        return ("model", "dense_mlp")
    return ("model",)


def _mismatch(op: Op, message: str) -> PlacementError:
    return PlacementError(spec_field(op), f"{op.name}: {message}")


def _expect_last(op: Op, t: TensorType, dim: int, what: str) -> None:
    if t.shape[-1] != dim:
        raise _mismatch(op, f"expected an input with last dim {what} = {dim}, found {t}")


def _infer(op: Op, ins: list[TensorType]) -> tuple[TensorType, tuple[Param, ...]]:
    k = op.kind
    if k is OpKind.INPUT:
        return TensorType(TOKENS), ()
    if k is OpKind.EMBEDDING:
        return TensorType((*TOKENS, op["dim"])), (Param(f"{op['module']}.weight", (op["vocab"], op["dim"])),)
    if k is OpKind.RMSNORM:
        if op.get("leading_part"):
            if ins[0].shape[-1] < op["dim"]:
                raise _mismatch(op, f"expected an input of at least {op['dim']} dims, found {ins[0]}")
        else:
            _expect_last(op, ins[0], op["dim"], "dim")
        return TensorType((*ins[0].shape[:-1], op["dim"])), (Param(f"{op['module']}.weight", (op["dim"],)),)
    if k is OpKind.LINEAR:
        _expect_last(op, ins[0], op["in_features"], "in_features")
        weight = Param(f"{op['module']}.weight", (op["out_features"], op["in_features"]))
        return TensorType((*ins[0].shape[:-1], op["out_features"])), (weight,)
    if k is OpKind.EXPERT_LINEAR:
        _expect_last(op, ins[0], op["in_features"], "in_features")
        weight = Param(f"{op['module']}.{op['param']}", (op["experts"], op["out_features"], op["in_features"]))
        return TensorType(("B*S", op["top_k"], op["out_features"])), (weight,)
    if k is OpKind.ROUTER:
        _expect_last(op, ins[0], op["in_features"], "in_features")
        params = (
            Param(f"{op['module']}.weight", (op["experts"], op["in_features"])),
            Param(f"{op['module']}.e_score_correction_bias", (op["experts"],), buffer=True),
        )
        return TensorType(("B*S", op["top_k"])), params
    if k is OpKind.ROPE:
        return TensorType((*TOKENS, "heads+1", op["dim"])), ()
    if k is OpKind.ATTENTION:
        q, kv, _ = ins
        h, dn, dr, dv = op["heads"], op["qk_nope_head_dim"], op["qk_rope_head_dim"], op["v_head_dim"]
        _expect_last(op, q, h * (dn + dr), "heads * (qk_nope_head_dim + qk_rope_head_dim)")
        _expect_last(op, kv, h * (dn + dv), "heads * (qk_nope_head_dim + v_head_dim)")
        return TensorType((*TOKENS, h * dv)), ()
    if k in (OpKind.ADD, OpKind.SWIGLU):
        if ins[0] != ins[1]:
            raise _mismatch(op, f"expected inputs of one shape, found {ins[0]} and {ins[1]}")
        return ins[0], ()
    if k is OpKind.MOE_COMBINE:
        return TensorType((*TOKENS, ins[0].shape[-1])), ()
    if k is OpKind.LM_HEAD:
        _expect_last(op, ins[0], op["in_features"], "in_features")
        head = Param(f"{op['module']}.weight", (op["out_features"], op["in_features"]))
        return TensorType((*TOKENS, op["out_features"])), () if op["tied"] else (head,)
    if k is OpKind.LOSS:
        return TensorType(()), ()
    raise NotImplementedError(f"infer_shapes: no rule for op kind {k.value!r} ({op.name})")
