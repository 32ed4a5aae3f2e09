"""count_params: totals equal what transformers instantiates for the same config, on the meta device."""

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from conftest import REPO

from k2c.codegen import compile_spec
from k2c.spec import load_spec
from specs_for_tests import tiny_spec

FULL_SIZE = {  # HF config.json values from the reference table (models.md)
    "kimi_k2": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                    first_k_dense_replace=1, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
                    num_attention_heads=64, q_lora_rank=1536, vocab_size=163840, n_group=1, topk_group=1),
    "deepseek_v3": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                        first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                        num_attention_heads=128, q_lora_rank=1536, vocab_size=129280, n_group=8, topk_group=4),
    "moonlight": dict(hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=27,
                      first_k_dense_replace=1, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
                      num_attention_heads=16, q_lora_rank=None, vocab_size=163840, n_group=1, topk_group=1),
}


def hf_param_count(**kw) -> int:
    cfg = DeepseekV3Config(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                           num_key_value_heads=kw["num_attention_heads"], **kw)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


SHIPPED = {"kimi_k2": "kimi-k2.yaml", "deepseek_v3": "deepseek-v3.yaml", "moonlight": "moonlight-16b-a3b.yaml"}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_shipped_spec_total_equals_transformers(name):
    spec = load_spec(REPO / "specs" / SHIPPED[name])
    assert compile_spec(spec).facts["params"]["total"] == hf_param_count(**FULL_SIZE[name])


def test_activated_counts_top_k_of_each_expert_stack():
    p = compile_spec(tiny_spec()).facts["params"]
    h, v, e, k, inter = 64, 256, 8, 2, 32
    expert_stacks = 2 * (e * 3 * inter * h)  # two MoE layers
    assert p["total"] - p["activated"] == expert_stacks * (e - k) // e
    assert p["total"] - p["total_without_embedding_and_head"] == 2 * v * h


def test_flops_per_token_formula():
    spec = tiny_spec()
    g = compile_spec(spec)
    p, f = g.facts["params"], g.facts["flops_per_token"]
    norms = 3 * (2 * 64 + 32 + 16) + 64  # two per layer plus the q_a / kv_a norms, and the final norm
    matmul = p["activated"] - 256 * 64 - norms  # embedding rows are looked up, not multiplied
    attention = 3 * 2 * 4 * (16 + 8 + 16) * (32 + 1) / 2
    assert f["forward"] == 2 * matmul + attention
    assert f["train"] == 3 * f["forward"]
