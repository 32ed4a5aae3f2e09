"""A plan's model as a Hugging Face `config.json` in the published DeepSeek-V3 / Kimi K2 format.

The names are the published files' (`first_k_dense_replace`, `n_routed_experts`, `rope_scaling`, ...), so that
transformers' `DeepseekV3ForCausalLM`, vLLM and SGLang read it as they read the released models.
"""

from __future__ import annotations

from typing import Any

from k2c.runtime.plan import MLPPlan, MoEPlan, Plan


def hf_config(plan: Plan) -> dict[str, Any]:
    model = plan.model
    attention = model.layers[0].attention
    dense = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MLPPlan)]
    moe = next((layer.mlp for layer in model.layers if isinstance(layer.mlp, MoEPlan)), None)
    rope, yarn = attention.rope, attention.rope.yarn
    config: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": len(model.layers),
        "first_k_dense_replace": len(dense),
        "intermediate_size": dense[0].intermediate_size if dense else (moe.intermediate_size if moe else 1),
        "rms_norm_eps": model.norm.eps,
        "max_position_embeddings": model.max_position_embeddings,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std,
        "num_attention_heads": attention.heads,
        "num_key_value_heads": attention.heads,
        "q_lora_rank": attention.q_lora_rank,
        "kv_lora_rank": attention.kv_lora_rank,
        "qk_nope_head_dim": attention.qk_nope_head_dim,
        "qk_rope_head_dim": attention.qk_rope_head_dim,
        "v_head_dim": attention.v_head_dim,
        "rope_theta": rope.theta,
        "rope_interleave": rope.interleaved,
        "rope_scaling": None if yarn is None else {
            "type": "yarn",
            "factor": yarn.factor,
            "original_max_position_embeddings": yarn.original_max_position_embeddings,
            "beta_fast": yarn.beta_fast,
            "beta_slow": yarn.beta_slow,
            "mscale": yarn.mscale,
            "mscale_all_dim": yarn.mscale_all_dim,
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "num_nextn_predict_layers": 0,
        "torch_dtype": plan.training.dtype,
    }
    if moe is not None:
        router = moe.router
        config.update({
            "n_routed_experts": moe.experts,
            "n_shared_experts": moe.shared.intermediate_size // moe.intermediate_size if moe.shared else 0,
            "num_experts_per_tok": router.top_k,
            "moe_intermediate_size": moe.intermediate_size,
            "n_group": router.groups,
            "topk_group": router.groups_per_token,
            "norm_topk_prob": router.normalize,
            "routed_scaling_factor": router.routed_scaling,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
        })
    return config
