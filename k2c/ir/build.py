"""Lower a validated `Spec` to the IR graph.

Op names are the user-facing ids that adapter targets match (`layers.3.attn.kv_b`, `layers.3.experts.up`);
each op also carries `module`, its path in the generated model, which mirrors the published checkpoint layout.
Only structure and sizes are recorded here; shapes, parameters and every decision come from the passes.
"""

from __future__ import annotations

from k2c.ir.graph import Graph
from k2c.ir.ops import Op, OpKind
from k2c.spec.schema import Model, Spec, softmax_scale

# transformers and DeepSeek's reference code build q_a_layernorm and kv_a_layernorm with the default epsilon, not
# `rms_norm_eps`; the published checkpoints were trained that way.
LATENT_NORM_EPS = 1e-6


def build_graph(spec: Spec) -> Graph:
    m = spec.model
    g = Graph(spec.name)
    tokens = g.add(Op.make(OpKind.INPUT, "input_ids", seq_len=spec.training.seq_len))
    x = g.add(
        Op.make(OpKind.EMBEDDING, "embed", module="model.embed_tokens", vocab=m.vocab_size, dim=m.hidden_size,
                init_std=m.init_std),
        tokens,
    )
    for i in range(m.layers):
        x = _decoder_layer(g, m, i, x)
    x = g.add(Op.make(OpKind.RMSNORM, "norm", module="model.norm", dim=m.hidden_size, eps=m.norm_eps), x)
    head = g.add(
        Op.make(
            OpKind.LM_HEAD, "lm_head", module="lm_head", in_features=m.hidden_size, out_features=m.vocab_size,
            tied=m.tie_embeddings,
        ),
        x,
    )
    g.add(Op.make(OpKind.LOSS, "loss", objective="causal_lm_cross_entropy"), head, tokens)
    # The settings that the passes decide from travel with the graph, so each pass is Graph -> Graph.
    return g.with_facts(adapter=spec.adapter, optimizer=spec.optimizer, training=spec.training,
                        parallel=spec.parallel)


def _linear(g: Graph, name: str, module: str, layer: int, n_in: int, n_out: int, src: Op) -> Op:
    return g.add(Op.make(OpKind.LINEAR, name, module=module, layer=layer, in_features=n_in, out_features=n_out), src)


def _decoder_layer(g: Graph, m: Model, i: int, x: Op) -> Op:
    a = m.attention
    p, mp = f"layers.{i}", f"model.layers.{i}"
    h = m.hidden_size
    qk_head = a.qk_nope_head_dim + a.qk_rope_head_dim
    normed = g.add(Op.make(OpKind.RMSNORM, f"{p}.attn_norm", module=f"{mp}.input_layernorm", layer=i, dim=h,
                           eps=m.norm_eps), x)
    if a.q_lora_rank is None:
        q = _linear(g, f"{p}.attn.q", f"{mp}.self_attn.q_proj", i, h, a.heads * qk_head, normed)
    else:
        q_a = _linear(g, f"{p}.attn.q_a", f"{mp}.self_attn.q_a_proj", i, h, a.q_lora_rank, normed)
        q_a = g.add(Op.make(OpKind.RMSNORM, f"{p}.attn.q_a_norm", module=f"{mp}.self_attn.q_a_layernorm", layer=i,
                            dim=a.q_lora_rank, eps=LATENT_NORM_EPS), q_a)
        q = _linear(g, f"{p}.attn.q_b", f"{mp}.self_attn.q_b_proj", i, a.q_lora_rank, a.heads * qk_head, q_a)
    kv_a = _linear(g, f"{p}.attn.kv_a", f"{mp}.self_attn.kv_a_proj_with_mqa", i, h,
                   a.kv_lora_rank + a.qk_rope_head_dim, normed)
    kv_latent = g.add(Op.make(OpKind.RMSNORM, f"{p}.attn.kv_a_norm", module=f"{mp}.self_attn.kv_a_layernorm",
                              layer=i, dim=a.kv_lora_rank, eps=LATENT_NORM_EPS, leading_part=True), kv_a)
    kv_b = _linear(g, f"{p}.attn.kv_b", f"{mp}.self_attn.kv_b_proj", i, a.kv_lora_rank,
                   a.heads * (a.qk_nope_head_dim + a.v_head_dim), kv_latent)
    yarn = a.rope.scaling
    rope = g.add(
        Op.make(OpKind.ROPE, f"{p}.attn.rope", module=f"{mp}.self_attn", layer=i, dim=a.qk_rope_head_dim,
                theta=a.rope.theta,
                interleaved=a.rope.interleaved, max_position_embeddings=m.max_position_embeddings,
                yarn=yarn.model_dump(exclude={"kind"}) if yarn else None),
        q, kv_a,
    )
    attn = g.add(
        Op.make(OpKind.ATTENTION, f"{p}.attn.core", module=f"{mp}.self_attn", layer=i, heads=a.heads,
                qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                v_head_dim=a.v_head_dim, softmax_scale=softmax_scale(a), causal=True),
        q, kv_b, rope,
    )
    o = _linear(g, f"{p}.attn.o", f"{mp}.self_attn.o_proj", i, a.heads * a.v_head_dim, h, attn)
    x = g.add(Op.make(OpKind.ADD, f"{p}.attn_residual", layer=i), x, o)

    normed = g.add(Op.make(OpKind.RMSNORM, f"{p}.mlp_norm", module=f"{mp}.post_attention_layernorm", layer=i,
                           dim=h, eps=m.norm_eps), x)
    if i < m.dense_layers:
        assert m.dense_mlp is not None  # guaranteed by the spec's validation
        out = _swiglu(g, f"{p}.mlp", f"{mp}.mlp", i, h, m.dense_mlp.intermediate_size, normed)
    else:
        out = _moe(g, m, i, normed)
    return g.add(Op.make(OpKind.ADD, f"{p}.mlp_residual", layer=i), x, out)


def _swiglu(g: Graph, p: str, mp: str, i: int, h: int, inter: int, src: Op) -> Op:
    gate = _linear(g, f"{p}.gate", f"{mp}.gate_proj", i, h, inter, src)
    up = _linear(g, f"{p}.up", f"{mp}.up_proj", i, h, inter, src)
    act = g.add(Op.make(OpKind.SWIGLU, f"{p}.act", layer=i), gate, up)
    return _linear(g, f"{p}.down", f"{mp}.down_proj", i, inter, h, act)


def _moe(g: Graph, m: Model, i: int, src: Op) -> Op:
    moe = m.moe
    assert moe is not None  # guaranteed by the spec's validation
    p, mp = f"layers.{i}", f"model.layers.{i}"
    h, e, inter = m.hidden_size, moe.routed_experts, moe.expert_intermediate_size
    r = moe.router
    router = g.add(
        Op.make(OpKind.ROUTER, f"{p}.router", module=f"{mp}.mlp.gate", layer=i, in_features=h, experts=e,
                top_k=moe.experts_per_token, groups=r.groups, groups_per_token=r.groups_per_token,
                normalize=r.normalize, routed_scaling=r.routed_scaling, balance=r.balance.kind,
                balance_rate=r.balance.rate),
        src,
    )

    def expert(proj: str, n_in: int, n_out: int, feed: Op) -> Op:
        return g.add(
            Op.make(OpKind.EXPERT_LINEAR, f"{p}.experts.{proj}", module=f"{mp}.mlp.experts", param=f"{proj}_proj",
                    layer=i, experts=e, top_k=moe.experts_per_token, in_features=n_in, out_features=n_out),
            feed, router,
        )

    gate, up = expert("gate", h, inter, src), expert("up", h, inter, src)
    act = g.add(Op.make(OpKind.SWIGLU, f"{p}.experts.act", layer=i), gate, up)
    routed = expert("down", inter, h, act)
    feeds: list[Op] = [routed, router]
    if moe.shared_experts:
        feeds.append(_swiglu(g, f"{p}.shared", f"{mp}.mlp.shared_experts", i, h, inter * moe.shared_experts, src))
    return g.add(Op.make(OpKind.MOE_COMBINE, f"{p}.moe", module=f"{mp}.mlp", layer=i), *feeds)
