"""Emit the generated package's Python: the plan as readable data, and the model's wiring from the graph.

`plan.py` prints the `Plan` record tree; layers that share one `LayerPlan` are printed once, under a name, and the
layer tuple is a run-length sum of those names. `model.py` is printed the way torch.fx prints a graph as code:
one line per IR op, each value named after its op, one rule per op kind (`RULES`; a kind without a rule is an
error naming the op). Consecutive layers whose lines and plans agree share one class. A layer returns a tuple that the
next one takes as its arguments: its output, or the two terms of it where the next norm adds them
(fuse_residual_norm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from k2c.ir import Graph, Op, OpKind
from k2c.runtime.plan import LayerPlan, Plan

WIDTH = 120


class EmitError(RuntimeError):
    """An op the emitter has no rule for: a compiler bug, named by the op."""


# --------------------------------------------------------------------------- plan.py


def _source(value: Any, names: dict[Any, str], indent: int, used: int = 0) -> str:
    """Python source for a plan value: a record, a tuple, or a literal; named records by their name.

    `indent` is the indentation of the line the value starts on, `used` the characters before it on that line.
    """
    if _is_record(value) and value in names:
        return names[value]
    if _is_record(value):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        parts = [f"{k}={_source(v, names, indent + 4, len(k) + 1)}" for k, v in items]
        return _call(type(value).__name__, parts, indent, used)
    if isinstance(value, tuple):
        if value and all(isinstance(v, LayerPlan) and v in names for v in value):
            return " + ".join(f"({names[v]},) * {n}" for v, n in _runs(value))
        parts = [_source(v, names, indent + 4) for v in value]
        if len(parts) == 1:
            return f"({parts[0]},)"
        return _call("", parts, indent, used)
    return repr(value)


def _call(head: str, parts: list[str], indent: int, used: int = 0) -> str:
    """`head(a, b)` on one line when it fits (with a trailing comma), else one argument per line."""
    one_line = f"{head}({', '.join(parts)})"
    if indent + used + len(one_line) + 1 <= WIDTH and "\n" not in one_line:
        return one_line
    pad = " " * (indent + 4)
    return f"{head}(\n" + "".join(f"{pad}{p},\n" for p in parts) + " " * indent + ")"


def _runs(values: tuple[Any, ...]) -> Iterator[tuple[Any, int]]:
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            yield values[start], i - start
            start = i


def layer_groups(plan: Plan) -> list[tuple[int, int]]:
    """[(first, last)] spans of consecutive layers with one LayerPlan."""
    spans, start = [], 0
    for _, count in _runs(plan.model.layers):
        spans.append((start, start + count - 1))
        start += count
    return spans


def _span_name(first: int, last: int) -> str:
    return f"{first}" if first == last else f"{first}_to_{last}"


def _is_record(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _shared_parts(layers: list[LayerPlan]) -> list[Any]:
    """Multi-line parts that several distinct layer plans hold (MLA attention, most often): printed once."""
    seen: dict[Any, int] = {}
    for layer in layers:
        for f in dataclasses.fields(layer):
            part = getattr(layer, f.name)
            seen[part] = seen.get(part, 0) + 1
    return [part for part, count in seen.items() if count > 1 and "\n" in _source(part, {}, 0)]


def emit_plan(plan: Plan, header: str) -> str:
    names: dict[Any, str] = {}
    blocks = []
    distinct = list(dict.fromkeys(plan.model.layers))
    for part in _shared_parts(distinct):
        base = type(part).__name__.removesuffix("Plan").upper()
        taken = sum(name.split("_")[0] == base for name in names.values())
        name = base if not taken else f"{base}_{taken + 1}"
        blocks.append(f"{name} = {_source(part, names, 0, len(name) + 3)}\n")
        names[part] = name
    for first, last in layer_groups(plan):
        layer = plan.model.layers[first]
        if layer not in names:
            name = f"LAYERS_{_span_name(first, last)}".upper()
            blocks.append(f"{name} = {_source(layer, names, 0, len(name) + 3)}\n")
            names[layer] = name
    record_types = sorted({type(v).__name__ for v in _records(plan)})
    imports = _call("from k2c.runtime.plan import ", record_types, 0)
    return (
        f"{header}\n"
        '"""What the compiler decided for this spec, as data: sizes, kernels, adapter sites, QK-Clip sites, optimizer\n'
        'groups and training settings. `k2c.runtime` reads these records and nothing else."""\n\n'
        f"{imports}\n\n"
        + "\n".join(blocks)
        + f"\nPLAN = {_source(plan, names, 0, 7)}\n"
    )


def _records(value: Any) -> Iterator[Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield value
        for f in dataclasses.fields(value):
            yield from _records(getattr(value, f.name))
    elif isinstance(value, tuple):
        for v in set(value) if all(isinstance(v, LayerPlan) for v in value) else value:
            yield from _records(v)


# --------------------------------------------------------------------------- model.py


def _var(op: Op) -> str:
    """The value an op produces, named after the op below its layer: `attn.q_a` -> `attn_q_a`."""
    return op.name.split(".", 2)[2].replace(".", "_") if op.layer is not None else op.name


def _module(op: Op) -> str:
    """The op's module as an attribute path from its layer (`self.self_attn.q_a_proj`) or from the model."""
    path = op["module"]
    if op.layer is not None:
        path = path.removeprefix(f"model.layers.{op.layer}.")
    return f"self.{path}"


def _kernel_arg(op: Op) -> str:
    return "" if op["kernel"] == "torch" else f", kernel={op['kernel']!r}"


Rule = Callable[[Op, list[str], Graph], str]


def _rmsnorm(op: Op, ins: list[str], graph: Graph) -> str:
    if "fuses" in op:  # ins: the two terms of the residual add it fuses (fuse_residual_norm)
        return f"{_module(op)}.add_norm({', '.join(ins)})"
    src = f"{ins[0]}[..., : {op['dim']}]" if op.get("leading_part") else ins[0]
    return f"{_module(op)}({src})"


def _expert_linear(op: Op, ins: list[str], graph: Graph) -> str:
    feed, router = graph.inputs(op)
    if "fuses" in op:  # the layer's gate, up, SwiGLU and this down projection as one call (fuse_experts)
        return f"{_module(op)}({_var(router)})"
    feed_type = graph.out_type(feed)
    assert feed_type is not None, "emit runs on a graph that infer_shapes typed"
    tokens_in = feed_type.shape[:2] == ("B", "S")  # the layer's tokens, not rows grouped by expert
    rows = f"{ins[1]}.tokens" if tokens_in else ins[0]
    return f"{_module(op)}.project({op['param']!r}, {rows}, {ins[1]})"


RULES: dict[OpKind, Rule] = {
    OpKind.EMBEDDING: lambda op, ins, g: f"{_module(op)}({ins[0]})",
    OpKind.RMSNORM: _rmsnorm,
    OpKind.LINEAR: lambda op, ins, g: f"{_module(op)}({ins[0]})",
    OpKind.ROPE: lambda op, ins, g: f"{_module(op)}.rope({ins[0]}, {ins[1]}, rope)",
    OpKind.ATTENTION: lambda op, ins, g: f"{_module(op)}.core({', '.join(ins)})",
    OpKind.ADD: lambda op, ins, g: f"{ins[0]} + {ins[1]}",
    OpKind.SWIGLU: lambda op, ins, g: f"ops.swiglu({ins[0]}, {ins[1]}{_kernel_arg(op)})",
    OpKind.ROUTER: lambda op, ins, g: f"{_module(op).removesuffix('.gate')}.route({ins[0]})",
    OpKind.EXPERT_LINEAR: _expert_linear,
    OpKind.MOE_COMBINE: lambda op, ins, g: f"{_module(op)}.combine({', '.join(ins)})",
    OpKind.LM_HEAD: lambda op, ins, g: f"{_module(op)}({ins[0]})",
    OpKind.LOSS: lambda op, ins, g: f"ops.causal_lm_loss({ins[0]}, labels{_kernel_arg(op)})",
}


def _copy(source: Op, reader: Op, var: Callable[[Op], str]) -> str:
    """The name under which `reader` reads `source`: the value's own, or its copy for that reader where
    fan_out_norms handed `source` out in copies (the first reader's is the value's name, the others numbered)."""
    readers = source.get("readers", ())
    index = readers.index(reader.name) if reader.name in readers else 0
    return var(source) if index == 0 else f"{var(source)}_{index + 1}"


def _line(op: Op, graph: Graph, var: Callable[[Op], str]) -> str:
    rule = RULES.get(op.kind)
    if rule is None:
        raise EmitError(f"no emit rule for op kind {op.kind.value!r} ({op.name})")
    ins = graph.inputs(op)
    target = ", ".join(_copy(op, graph.op(reader), var) for reader in op["readers"]) if "readers" in op else var(op)
    if op.kind is OpKind.RMSNORM and "fuses" in op:
        # the norm runs the residual add it fuses: it takes the add's two terms and returns their sum beside the norm
        (add,) = ins
        ins, target = graph.inputs(add), f"{var(add)}, {target}"
    return f"{target} = {rule(op, [_copy(i, op, var) for i in ins], graph)}"


def _handed_on(graph: Graph, output: Op) -> tuple[Op, ...]:
    """What a layer whose last op is `output` hands on: that output, or the two terms of it where it is a residual
    add that the next norm fuses."""
    return graph.inputs(output) if "fused_into" in output else (output,)


def _names_after(graph: Graph, output: Op) -> dict[str, str]:
    """The names, after the layer whose last op is `output`, of what it hands on (`x`, or `residual` and `delta`)
    and of `output` itself (`x`: the sum, where the next norm returns it)."""
    names = {output.name: "x"}
    if "fused_into" in output:
        names.update(zip((op.name for op in graph.inputs(output)), ("residual", "delta")))
    return names


def _layer_lines(graph: Graph, layer: int) -> tuple[list[str], list[str]]:
    """(the forward's parameters before `rope`, its lines)."""
    ops = [op for op in graph.ops() if op.layer == layer]
    (incoming,) = {i for op in ops for i in graph.inputs(op) if i.layer != layer}  # the previous layer's last op
    outside = _names_after(graph, incoming)

    def var(op: Op) -> str:
        return _var(op) if op.layer == layer else outside[op.name]

    *body, output = ops
    lines = [_line(op, graph, var) for op in body if "fused_into" not in op]
    if "fused_into" in output:  # the next norm adds the two terms of the layer's output
        lines.append(f"return {', '.join(var(op) for op in graph.inputs(output))}")
    else:
        lines.append(f"return ({_line(output, graph, var).split(' = ', 1)[1]},)")
    return [outside[op.name] for op in _handed_on(graph, incoming)], lines


def _class_name(first: int, last: int) -> str:
    return f"Layer{first}" if first == last else f"Layers{first}To{last}"


def emit_model(graph: Graph, plan: Plan, header: str) -> str:
    groups: list[tuple[int, int, tuple[list[str], list[str]]]] = []
    for first, last in layer_groups(plan):
        for i in range(first, last + 1):
            wiring = _layer_lines(graph, i)
            shared = groups and groups[-1][1] == i - 1 and groups[-1][2] == wiring \
                and plan.model.layers[groups[-1][0]] == plan.model.layers[i]
            if shared:
                groups[-1] = (groups[-1][0], i, wiring)
            else:
                groups.append((i, i, wiring))
    classes = []
    for first, last, (params, lines) in groups:
        # the lines name layer `first`; every layer of the group has the same ones
        what = f"layer {first}" if first == last else f"layers {first} to {last}"
        body = "".join(f"        {line}\n" for line in lines)
        inputs = "".join(f"{name}: torch.Tensor, " for name in params)
        classes.append(
            f"class {_class_name(first, last)}(rt.DecoderLayer):\n"
            f'    """The wiring of {what}."""\n\n'
            f"    def forward(self, {inputs}rope: rt.RopeTables) -> tuple[torch.Tensor, ...]:\n"
            f"{body}"
        )
    layer_types = " + ".join(f"({_class_name(a, b)},) * {b - a + 1}" for a, b, _ in groups)

    *_, last_layer_op = (op for op in graph.ops() if op.layer is not None)
    outside = _names_after(graph, last_layer_op)
    handed = [outside[op.name] for op in _handed_on(graph, last_layer_op)]
    unpack = ", ".join(handed) if len(handed) > 1 else f"({handed[0]},)"
    forward = ["rope = self.rope(input_ids)"]
    for op in graph.ops():
        if op.layer is not None or op.kind is OpKind.INPUT:
            continue
        forward.append(_line(op, graph, lambda o: outside[o.name] if o.layer is not None else o.name))
        if op.kind is OpKind.EMBEDDING:
            forward += [
                f"hidden = ({op.name},)  # what a layer hands the next: its output, or the two terms that the next "
                "norm adds",
                "for layer in self.model.layers:",
                "    hidden = layer(*hidden, rope)",
                f"{unpack} = hidden",
            ]
    loss = next(graph.ops(OpKind.LOSS))
    logits = graph.inputs(loss)[0]
    forward.append(f"return rt.Output({logits.name}, {loss.name})")
    body = "".join(f"        {line}\n" for line in forward)
    return (
        f"{header}\n"
        f'"""The wiring of {plan.name}: one line per op of the compiler\'s graph, calling k2c.runtime\'s parts."""\n\n'
        "from __future__ import annotations\n\n"
        "import torch\n\n"
        "from k2c.runtime import model as rt\n"
        "from k2c.runtime import ops\n"
        "from k2c.runtime.plan import ModelPlan\n\n"
        "from .plan import PLAN\n\n\n"
        + "\n\n".join(classes)
        + f"\n\nLAYER_TYPES = {layer_types}\n\n\n"
        "class K2Model(rt.CausalLM):\n"
        f'    """{plan.name}: {len(plan.model.layers)} decoder layers."""\n\n'
        "    def __init__(self, plan: ModelPlan = PLAN.model, device=None, dtype=None):\n"
        "        super().__init__(plan, LAYER_TYPES, device, dtype)\n\n"
        "    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> rt.Output:\n"
        f"{body}"
    )
