"""Lower a decided IR graph to the `Plan` that the runtime runs.

Model facts come from op attributes (sizes, eps, RoPE/YaRN constants, clip rows, router settings, adapter sites,
kernel choices); optimizer, adapter and training settings from the facts the graph carries. Nothing here decides:
a value that needs a choice is taken by a pass and read here.
"""

from __future__ import annotations

import re
from typing import Any

from k2c.ir import MATRIX_KINDS, Graph, Op, OpKind
from k2c.runtime.plan import (
    GRAM,
    PLAN_SCHEMA,
    AdapterPlan,
    AdapterSite,
    AttentionPlan,
    ClipPlan,
    Config,
    LayerPlan,
    MLPPlan,
    ModelPlan,
    MoEPlan,
    NormPlan,
    OptimizerPlan,
    ParallelPlan,
    ParamRule,
    Plan,
    RopePlan,
    RouterPlan,
    TrainingPlan,
    YarnPlan,
)
from k2c.spec.schema import Adapter, Optimizer, Parallel, Training


def lower(graph: Graph) -> Plan:
    model = _model(graph)
    return Plan(
        schema=PLAN_SCHEMA,
        name=graph.name,
        config=_config(graph, model),
        model=model,
        optimizer=_optimizer(graph),
        adapter=_adapter(graph),
        training=_training(graph.facts["training"]),
        parallel=_parallel(graph),
    )


# --------------------------------------------------------------------------- model


class _Layer:
    """The ops of one decoder layer, by their name below `layers.N.`."""

    def __init__(self, ops: list[Op]):
        self.ops = {op.name.split(".", 2)[2]: op for op in ops}

    def __getitem__(self, role: str) -> Op:
        return self.ops[role]

    def get(self, role: str) -> Op | None:
        return self.ops.get(role)


def _layers(graph: Graph) -> list[_Layer]:
    by_layer: dict[int, list[Op]] = {}
    for op in graph.ops():
        if op.layer is not None:
            by_layer.setdefault(op.layer, []).append(op)
    return [_Layer(by_layer[i]) for i in sorted(by_layer)]


def _norm(op: Op) -> NormPlan:
    return NormPlan(dim=op["dim"], eps=op["eps"], kernel=op["kernel"], adds_residual="fuses" in op,
                    copies=len(op.get("readers", ())) or 1)


def _attention(layer: _Layer) -> AttentionPlan:
    core, rope, kv_a, kv_b = layer["attn.core"], layer["attn.rope"], layer["attn.kv_a"], layer["attn.kv_b"]
    q_a = layer.get("attn.q_a")
    yarn = dict(rope["yarn"]) if rope["yarn"] is not None else None
    clip = core["qk_clip"]
    return AttentionPlan(
        hidden_size=kv_a["in_features"],
        heads=core["heads"],
        q_lora_rank=q_a["out_features"] if q_a is not None else None,
        kv_lora_rank=kv_b["in_features"],
        qk_nope_head_dim=core["qk_nope_head_dim"],
        qk_rope_head_dim=core["qk_rope_head_dim"],
        v_head_dim=core["v_head_dim"],
        softmax_scale=core["softmax_scale"],
        q_norm=_norm(layer["attn.q_a_norm"]) if q_a is not None else None,
        kv_norm=_norm(layer["attn.kv_a_norm"]),
        rope=RopePlan(
            dim=rope["dim"], theta=rope["theta"], interleaved=rope["interleaved"],
            yarn=YarnPlan(**yarn) if yarn is not None else None,
        ),
        clip=ClipPlan(
            mode=clip.mode, tau=clip.tau, q_weight=clip.q_weight.removeprefix(f"{core['module']}."),
            kv_weight=clip.kv_weight.removeprefix(f"{core['module']}."), q_sqrt_gamma_rows=clip.q_sqrt_gamma_rows,
            q_gamma_rows=clip.q_gamma_rows, kv_sqrt_gamma_rows=clip.kv_sqrt_gamma_rows,
        ),
        kernel=core["kernel"],
    )


def _mlp(layer: _Layer, prefix: str) -> MLPPlan:
    up = layer[f"{prefix}.up"]
    return MLPPlan(hidden_size=up["in_features"], intermediate_size=up["out_features"],
                   kernel=layer[f"{prefix}.act"]["kernel"])


def _moe(layer: _Layer) -> MoEPlan:
    router, up = layer["router"], layer["experts.up"]
    return MoEPlan(
        router=RouterPlan(
            hidden_size=router["in_features"], experts=router["experts"], top_k=router["top_k"],
            groups=router["groups"], groups_per_token=router["groups_per_token"], normalize=router["normalize"],
            routed_scaling=router["routed_scaling"], bias_rate=router["bias_rate"],
        ),
        experts=up["experts"],
        hidden_size=up["in_features"],
        intermediate_size=up["out_features"],
        shared=_mlp(layer, "shared") if layer.get("shared.up") is not None else None,
        kernel=up["kernel"],
        expert_shards=router["expert_shards"],
    )


def _model(graph: Graph) -> ModelPlan:
    embed, norm, head, loss = graph.op("embed"), graph.op("norm"), graph.op("lm_head"), next(graph.ops(OpKind.LOSS))
    rope = next(graph.ops(OpKind.ROPE))
    layers = tuple(
        LayerPlan(
            attn_norm=_norm(layer["attn_norm"]),
            attention=_attention(layer),
            mlp_norm=_norm(layer["mlp_norm"]),
            mlp=_moe(layer) if layer.get("router") is not None else _mlp(layer, "mlp"),
        )
        for layer in _layers(graph)
    )
    return ModelPlan(
        vocab_size=embed["vocab"],
        hidden_size=embed["dim"],
        max_position_embeddings=rope["max_position_embeddings"],
        tie_embeddings=head["tied"],
        init_std=embed["init_std"],
        norm=_norm(norm),
        layers=layers,
        loss_kernel=loss["kernel"],
    )


def _config(graph: Graph, model: ModelPlan) -> Config:
    attention = model.layers[0].attention
    dense = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MLPPlan)]
    moe = next((layer.mlp for layer in model.layers if isinstance(layer.mlp, MoEPlan)), None)
    return Config(
        name=graph.name,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_layers=len(model.layers),
        dense_layers=len(dense),
        num_heads=attention.heads,
        q_lora_rank=attention.q_lora_rank,
        kv_lora_rank=attention.kv_lora_rank,
        qk_nope_head_dim=attention.qk_nope_head_dim,
        qk_rope_head_dim=attention.qk_rope_head_dim,
        v_head_dim=attention.v_head_dim,
        dense_intermediate_size=dense[0].intermediate_size if dense else None,
        routed_experts=moe.experts if moe else 0,
        shared_experts=moe.shared.intermediate_size // moe.intermediate_size if moe and moe.shared else 0,
        experts_per_token=moe.router.top_k if moe else 0,
        expert_intermediate_size=moe.intermediate_size if moe else 0,
        max_position_embeddings=model.max_position_embeddings,
        tie_embeddings=model.tie_embeddings,
    )


# --------------------------------------------------------------------------- optimizer, adapters, training

_LAYER = re.compile(r"\.layers\.\d+\.")


def _by_role(entries: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """(parameter name, decision) pairs as (fnmatch pattern, decision): one `layers.*` pattern per role when every
    layer agrees, else the names."""
    by_pattern: dict[str, list[tuple[str, Any]]] = {}
    for name, decision in entries:
        by_pattern.setdefault(_LAYER.sub(".layers.*.", name), []).append((name, decision))
    out: list[tuple[str, Any]] = []
    for pattern, members in by_pattern.items():
        decisions = {decision for _, decision in members}
        if len(decisions) == 1 and len(members) > 1:
            out.append((pattern, decisions.pop()))
        else:
            out.extend(members)
    return out


def _param_rules(graph: Graph) -> tuple[ParamRule, ...]:
    """Parameter groups as fnmatch rules."""
    groups = [g for op in graph.ops() for g in op.get("param_groups", ())]
    return tuple(ParamRule(pattern, *decision)
                 for pattern, decision in _by_role([(g.name, (g.optimizer, g.weight_decay)) for g in groups]))


def _gram_newton_schulz(graph: Graph) -> tuple[str, ...]:
    """The Muon parameters whose Newton-Schulz runs in the Gram form, as fnmatch patterns."""
    groups = [g for op in graph.ops() for g in op.get("param_groups", ()) if g.optimizer == "muon"]
    return tuple(pattern for pattern, form in _by_role([(g.name, g.newton_schulz) for g in groups]) if form == GRAM)


def _optimizer(graph: Graph) -> OptimizerPlan:
    o: Optimizer = graph.facts["optimizer"]
    training: Training = graph.facts["training"]
    return OptimizerPlan(
        kind=o.kind,
        lr=o.lr,
        weight_decay=o.weight_decay,
        grad_clip=o.grad_clip,
        warmup_steps=o.schedule.warmup_steps,
        decay=o.schedule.decay,
        final_lr_ratio=o.schedule.final_lr_ratio,
        decay_steps=training.steps,
        momentum=o.muon.momentum,
        nesterov=o.muon.nesterov,
        ns_steps=o.muon.ns_steps,
        ns_coefficients=o.muon.ns_coefficients,
        rms_scale=o.muon.rms_scale,
        adamw_betas=o.adamw.betas,
        adamw_eps=o.adamw.eps,
        param_rules=_param_rules(graph),
        gram_newton_schulz=_gram_newton_schulz(graph),
    )


def _adapter(graph: Graph) -> AdapterPlan:
    a: Adapter = graph.facts["adapter"]
    sites = []
    if a.kind != "none":
        for op in graph.ops():
            if op.kind not in MATRIX_KINDS:
                continue
            d = op["adapter"]
            sites.append(AdapterSite(
                module=op["module"], param=op["param"] if op.kind is OpKind.EXPERT_LINEAR else None, kind=d.kind,
                rank=d.rank, alpha=d.alpha, keep_ratio=d.keep_ratio, svd_rank=d.svd_rank, kernel=op["kernel"],
            ))
    return AdapterPlan(kind=a.kind, rank=a.rank, alpha=a.alpha, rslora=a.rslora, dropout=a.dropout,
                       refresh_every=a.refresh_every, sites=tuple(sites))


def _training(t: Training) -> TrainingPlan:
    return TrainingPlan(
        seq_len=t.seq_len, batch_size=t.batch_size, grad_accum=t.grad_accum, steps=t.steps, dtype=t.dtype,
        data=t.data, data_format=t.source_format, data_field=t.record_field, chat=t.chat, tokenizer=t.tokenizer,
        init_from=t.init_from, eval_fraction=t.eval_fraction, eval_every=t.eval_every,
        log_every=t.log_every, checkpoint_every=t.checkpoint_every, seed=t.seed,
    )


def _parallel(graph: Graph) -> ParallelPlan:
    p: Parallel = graph.facts["parallel"]
    return ParallelPlan(data_shard=None if p.data_shard == "auto" else p.data_shard, expert=p.expert,
                        reduce_dtype=p.reduce_dtype, recompute_layers=graph.facts["recompute_layers"])
