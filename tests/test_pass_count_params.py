"""count_params: totals equal what transformers instantiates for the same config, on the meta device."""

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from conftest import REPO
from published_configs import DEEPSEEK_V3, KIMI_K2, MOONLIGHT

from k2c.codegen import compile_spec
from k2c.spec import load_spec
from specs_for_tests import tiny_spec

PUBLISHED = {"kimi-k2.yaml": KIMI_K2, "deepseek-v3.yaml": DEEPSEEK_V3, "moonlight-16b-a3b.yaml": MOONLIGHT}


def hf_param_count(config: dict) -> int:
    cfg = DeepseekV3Config(**{k: v for k, v in config.items() if k != "model_type"})  # kimi_k2 is DeepseekV3
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec_file", sorted(PUBLISHED))
def test_shipped_spec_total_equals_transformers(spec_file):
    spec = load_spec(REPO / "specs" / spec_file)
    assert compile_spec(spec).facts["params"]["total"] == hf_param_count(PUBLISHED[spec_file])


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
