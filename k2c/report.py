"""What `k2c inspect` shows: the compiler's decisions as readable tables or one JSON object."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from k2c.ir import MATRIX_KINDS, Graph, OpKind
from k2c.passes.group_params import adapter_param_names
from k2c.passes.place_adapters import site_role
from k2c.spec.schema import Spec


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  " + "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)).rstrip()]
    lines.append("  " + "  ".join("-" * w for w in widths))
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells[1:]]
    return "\n".join(lines) + "\n\n"


def layer_rows(spec: Spec) -> list[dict[str, Any]]:
    m = spec.model
    a = m.attention
    attn = (f"MLA {a.heads}h q_lora={a.q_lora_rank} kv_lora={a.kv_lora_rank} "
            f"qk={a.qk_nope_head_dim}+{a.qk_rope_head_dim} v={a.v_head_dim}")
    rows = []
    for i in range(m.layers):
        if i < m.dense_layers:
            assert m.dense_mlp is not None
            mlp = f"dense SwiGLU {m.dense_mlp.intermediate_size}"
        else:
            assert m.moe is not None
            e = m.moe
            mlp = (f"MoE {e.experts_per_token}/{e.routed_experts} experts x {e.expert_intermediate_size}"
                   f" + {e.shared_experts} shared, groups {e.router.groups_per_token}/{e.router.groups}")
        rows.append({"layer": i, "attention": attn, "mlp": mlp})
    return rows


def by_layer_spans(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows (layer, *columns) -> (layers, *columns): the layers that share the same columns, as spans like 1-3,5."""
    layers: dict[tuple, list[int]] = {}
    for layer, *columns in rows:
        layers.setdefault(tuple(columns), []).append(layer)
    return [(_spans(found), *columns) for columns, found in layers.items()]


def _spans(layers: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5"."""
    spans, start = [], layers[0]
    for prev, cur in zip(layers, [*layers[1:], None]):
        if cur is None or cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            if cur is not None:
                start = cur
    return ",".join(spans)


def adapter_rows(graph: Graph) -> list[dict[str, Any]]:
    rows = []
    for op in graph.ops():
        if op.kind in MATRIX_KINDS and op["adapter"].kind != "trainable":
            d = op["adapter"]
            rows.append({"site": op.name, "layer": op.layer, "role": site_role(op),
                         "shape": f"{op['out_features']}x{op['in_features']}", "kind": d.kind,
                         "rank": d.rank, "keep_ratio": d.keep_ratio, "svd_rank": d.svd_rank,
                         "kept_channels": d.kept_channels, "backward_flops_saved_per_token": d.backward_flops_saved})
    return rows


def clip_rows(graph: Graph) -> list[dict[str, Any]]:
    rows = []
    for op in graph.ops(OpKind.ATTENTION):
        d = op["qk_clip"]
        rows.append({"layer": op.layer, "mode": d.mode, "tau": d.tau, "q_weight": d.q_weight,
                     "q_rows_sqrt_gamma": d.q_sqrt_gamma_rows, "q_rows_gamma": d.q_gamma_rows,
                     "kv_weight": d.kv_weight, "kv_rows_sqrt_gamma": d.kv_sqrt_gamma_rows})
    return rows


def group_rows(graph: Graph) -> list[dict[str, Any]]:
    """Parameter groups summed per (optimizer, weight decay, kind of op, Newton-Schulz form)."""
    totals: dict[tuple[str, bool, str, str], list[int]] = {}
    for op in graph.ops():
        sizes = {p.name: p.numel for p in op.params}
        if op.kind in MATRIX_KINDS and op["adapter"].rank:
            stack = op.get("experts", 1)
            a_name, b_name = adapter_param_names(op)
            sizes[a_name] = stack * op["adapter"].rank * op["in_features"]
            sizes[b_name] = stack * op["out_features"] * op["adapter"].rank
        for g in op.get("param_groups", ()):
            what = "adapter" if "lora_" in g.name else op.kind.value
            entry = totals.setdefault((g.optimizer, g.weight_decay, what, g.newton_schulz or ""), [0, 0])
            entry[0] += 1
            entry[1] += sizes[g.name]
    return [{"optimizer": opt, "weight_decay": wd, "op_kind": what, "newton_schulz": form or None, "tensors": n,
             "numel": numel}
            for (opt, wd, what, form), (n, numel) in sorted(totals.items())]


def kernel_rows(graph: Graph) -> list[dict[str, Any]]:
    """What select_kernels chose: per op kind and kernel, how many ops, and for ops that a fusion pass folded into
    another op's call (fuse_experts, fuse_residual_norm), that op's kind and kernel, which is what runs them."""
    counts: dict[tuple[str, str, str], int] = {}
    for op in graph.ops():
        if "kernel" in op:
            host = graph.op(op["fused_into"]) if "fused_into" in op else None
            key = (op.kind.value, op["kernel"], "" if host is None else f"{host.kind.value} ({host['kernel']})")
            counts[key] = counts.get(key, 0) + 1
    return [{"op_kind": kind, "kernel": kernel, "fused_into": host or None, "ops": n}
            for (kind, kernel, host), n in sorted(counts.items())]


def adapter_params(graph: Graph) -> dict[str, int]:
    """The adapters' own parameters (LoRA A and B, not in the model's counts), total and activated per token (a
    token meets top_k experts of a stack), and the trainable parameters: all that the optimizer updates."""
    total = activated = 0
    for op in graph.ops():
        if op.kind in MATRIX_KINDS and op["adapter"].rank:
            per_matrix = op["adapter"].rank * (op["in_features"] + op["out_features"])
            total += op.get("experts", 1) * per_matrix
            activated += (op.get("top_k", 1) if "experts" in op else 1) * per_matrix
    trainable = sum(r["numel"] for r in group_rows(graph))
    return {"adapters": total, "adapters_activated": activated, "trainable": trainable}


# What k2c leaves out of a model that a Hugging Face config may describe (import-hf says so in the spec too).
MTP_NOTE = ("not built: k2c has no MTP layers (a config's num_nextn_predict_layers is left out), and "
            "load_hf_state_dict skips their weights")


def inspect_json(spec: Spec, graph: Graph) -> dict[str, Any]:
    return {
        "name": spec.name,
        "params": graph.facts["params"],
        "adapter_params": adapter_params(graph),
        "mtp_layers": 0,
        "flops_per_token": graph.facts["flops_per_token"],
        "layers": layer_rows(spec),
        "adapter_sites": adapter_rows(graph),
        "qk_clip_sites": clip_rows(graph),
        "param_groups": group_rows(graph),
        "kernels": kernel_rows(graph),
    }


def inspect_text(spec: Spec, graph: Graph) -> str:
    p, f = graph.facts["params"], graph.facts["flops_per_token"]
    out = f"{spec.name}: {spec.description}\n\n" if spec.description else f"{spec.name}\n\n"
    out += _table("Parameters", ("", "total", "activated"), [
        ("all", f"{p['total']:,} ({_human(p['total'])})", f"{p['activated']:,} ({_human(p['activated'])})"),
        ("without embedding and head", f"{p['total_without_embedding_and_head']:,}",
         f"{p['activated_without_embedding_and_head']:,}"),
        *_adapter_rows(adapter_params(graph)),
    ])
    out += f"Multi-token prediction: {MTP_NOTE}\n\n"
    out += (f"FLOPs per token at seq_len {f['seq_len']}: forward {_human(f['forward'])}, "
            f"training {_human(f['train'])}\n\n")
    out += _table("Layers", ("layers", "attention", "mlp"),
                  by_layer_spans([(r["layer"], r["attention"], r["mlp"]) for r in layer_rows(spec)]))
    sites = adapter_rows(graph)
    if sites:
        out += _table(f"Adapter sites ({spec.adapter.kind})",
                      ("layers", "site", "shape", "kind", "rank", "keep", "svd rank", "|S|", "bwd FLOPs saved/token"),
                      by_layer_spans([(r["layer"], r["role"], r["shape"], r["kind"], r["rank"] or "-",
                                       r["keep_ratio"], r["svd_rank"] or "-", r["kept_channels"] or "-",
                                       _human(r["backward_flops_saved_per_token"])) for r in sites]))
    else:
        out += "Adapter sites: none (every weight trains)\n\n"
    clips = clip_rows(graph)
    out += _table("QK-Clip", ("layers", "mode", "tau", "q rows x sqrt(g) / x g", "kv_b rows x sqrt(g)"),
                  by_layer_spans([(r["layer"], r["mode"], r["tau"],
                                   f"{_rows(r['q_rows_sqrt_gamma'])} / {_rows(r['q_rows_gamma'])}",
                                   _rows(r["kv_rows_sqrt_gamma"])) for r in clips]))
    out += _table("Optimizer groups", ("optimizer", "weight decay", "op kind", "newton-schulz", "tensors", "numel"),
                  [(r["optimizer"], "yes" if r["weight_decay"] else "no", r["op_kind"], r["newton_schulz"] or "-",
                    r["tensors"], _human(r["numel"])) for r in group_rows(graph)])
    out += _table("Kernels (select_kernels; fused ops run in the call of the op they join)",
                  ("op kind", "kernel", "fused into", "ops"),
                  [(r["op_kind"], r["kernel"], r["fused_into"] or "-", r["ops"]) for r in kernel_rows(graph)])
    return out


def _adapter_rows(a: dict[str, int]) -> list[tuple[str, str, str]]:
    if not a["adapters"]:
        return []
    return [("adapters (LoRA A, B; not in 'all')", f"{a['adapters']:,} ({_human(a['adapters'])})",
             f"{a['adapters_activated']:,} ({_human(a['adapters_activated'])})"),
            ("trainable (what the optimizer updates)", f"{a['trainable']:,} ({_human(a['trainable'])})", "")]


def _rows(rule: tuple[int, int, int]) -> str:
    offset, count, stride = rule
    return f"h*{stride}+[{offset},{offset + count})"
