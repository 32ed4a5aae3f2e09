"""Adapters leave the generated model as PEFT would have it: the exported adapter, loaded by PEFT onto
transformers' DeepseekV3ForCausalLM with the same base weights, gives the same logits; so does the merged model."""

from __future__ import annotations

import json

import pytest
import torch
from specs_for_tests import tiny_spec

from k2c.runtime.model import Experts

# Every kind of site: CE-LoRA and LoRA linears in attention, dense MLP and shared experts; expert stacks where
# gate and up differ in rank (their fused PEFT adapter mixes two ranks and two scales) or only some are adapted.
TARGETS = [
    {"match": "attn.q_b", "keep_ratio": 0.5},
    {"match": "attn.kv_b"},
    {"match": "attn.o", "rank": 6},
    {"match": "mlp.{gate,up,down}", "keep_ratio": 0.6},
    {"match": "shared.*"},
    {"match": "experts.gate", "layers": "1", "keep_ratio": 0.5, "rank": 2},
    {"match": "experts.{up,down}", "layers": "1", "keep_ratio": 0.5},
    {"match": "experts.down", "layers": "2"},
]
CASES = {
    "lora_scale": {"kind": "ce_lora", "rank": 4, "alpha": 8.0, "svd_rank": 3, "targets": TARGETS},
    "rslora_dropout": {"kind": "ce_lora", "rank": 4, "alpha": 5.0, "svd_rank": 3, "rslora": True, "dropout": 0.1,
                       "targets": TARGETS},
    "no_experts": {"kind": "lora", "rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": TARGETS[1:3]},
}


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).abs().max() / reference.abs().max()).item()


def adapted_pair(case, build_generated, hf_twin):
    """A generated model with trained-looking adapters, its transformers twin with the same base weights, ids."""
    spec = tiny_spec(adapter=CASES[case])
    package = build_generated(spec)
    hf = hf_twin(spec)
    model = package.build_model()
    package.load_hf_state_dict(model, hf.state_dict())
    ids = torch.randint(0, spec.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    return package, with_trained_adapters(model, ids), hf, ids


def with_trained_adapters(model, ids):
    """The model in eval mode with random adapter weights, after one backward (CE-LoRA's buffers exist)."""
    g = torch.Generator().manual_seed(2)
    model.train()
    model(ids, labels=ids).loss.backward()  # CE-LoRA's buffers now exist, as after training
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_exported_adapter_loads_into_peft_with_the_same_logits(case, build_generated, hf_twin, tmp_path):
    from peft import PeftModel

    package, model, hf, ids = adapted_pair(case, build_generated, hf_twin)
    package.export_peft_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    with torch.no_grad():
        base = hf(ids).logits
        ours = model(ids).logits
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs = peft_model(input_ids=ids).logits
    assert relative_error(ours, base) > 1e-2  # the adapters matter, so a lost one would show
    assert relative_error(ours, theirs) < 1e-4

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # MLP projections and experts are PEFT parameter targets, which take no dropout
    parameter_targets = case != "no_experts"
    assert config["lora_dropout"] == (0.0 if parameter_targets else CASES[case]["dropout"])
    assert bool(config["target_parameters"]) == parameter_targets


def test_merge_folds_the_adapters_into_plain_modules(build_generated, hf_twin):
    package, model, _, ids = adapted_pair("rslora_dropout", build_generated, hf_twin)
    linear = model.model.layers[0].self_attn.q_b_proj
    experts = model.model.layers[1].mlp.experts
    scale = 5.0 / 2.0  # alpha / sqrt(rank) under rsLoRA, rank 4
    gate_scale = 5.0 / 2.0**0.5  # the gate projections of layer 1 have rank 2
    with torch.no_grad():
        expected_linear = linear.weight + scale * linear.lora_B @ linear.lora_A
        expected_gate = experts.gate_proj + gate_scale * experts.gate_proj_lora_B @ experts.gate_proj_lora_A
        expected_down = experts.down_proj + scale * experts.down_proj_lora_B @ experts.down_proj_lora_A
        before = model(ids).logits
        package.merge_adapters(model)
        after = model(ids).logits

    assert relative_error(after, before) < 1e-5
    torch.testing.assert_close(model.model.layers[0].self_attn.q_b_proj.weight, expected_linear)
    torch.testing.assert_close(model.model.layers[1].mlp.experts.gate_proj, expected_gate)
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj, expected_down)
    assert not [name for name, _ in model.named_parameters() if "lora_" in name]
    assert not [name for name, _ in model.named_buffers() if "svd_" in name or "kept" in name]
    for layer in model.model.layers:
        assert type(layer.self_attn.q_b_proj) is torch.nn.Linear
    assert type(model.model.layers[1].mlp.experts) is Experts
    assert type(model.model.layers[1].mlp.shared_experts.up_proj) is torch.nn.Linear
