"""group_params: Muon for hidden matrices, AdamW for the rest, decided from op kinds, not shapes."""

from k2c.codegen import compile_spec
from specs_for_tests import tiny_spec


def groups(**overrides):
    g = compile_spec(tiny_spec(**overrides))
    return {pg.name: (pg.optimizer, pg.weight_decay) for op in g.ops() for pg in op.get("param_groups", ())}


def test_pretraining_groups():
    gr = groups()
    assert gr["model.layers.0.self_attn.q_b_proj.weight"] == ("muon", True)
    assert gr["model.layers.0.mlp.down_proj.weight"] == ("muon", True)
    assert gr["model.layers.1.mlp.experts.gate_proj"] == ("muon", True)
    assert gr["model.layers.1.mlp.shared_experts.up_proj.weight"] == ("muon", True)
    assert gr["model.layers.1.mlp.gate.weight"] == ("adamw", True)  # router weight: spec default
    assert gr["model.embed_tokens.weight"] == ("adamw", True)  # a matrix, but an embedding
    assert gr["lm_head.weight"] == ("adamw", True)
    assert gr["model.norm.weight"] == ("adamw", True)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in gr  # moved by balancing, not gradients


def test_router_weight_on_muon_when_asked():
    assert groups(**{"optimizer.muon.router_weight": "muon"})["model.layers.1.mlp.gate.weight"][0] == "muon"


def test_adamw_everywhere_for_an_adamw_spec():
    assert {opt for opt, _ in groups(**{"optimizer.kind": "adamw"}).values()} == {"adamw"}


def test_adapters_train_only_lora_matrices():
    gr = groups(adapter={"kind": "ce_lora", "lora_optimizer": "muon",
                         "targets": [{"match": "attn.o"}, {"match": "experts.up"}]})
    assert gr == {
        **{f"model.layers.{i}.self_attn.o_proj.lora_{m}": ("muon", True) for i in range(3) for m in "AB"},
        **{f"model.layers.{i}.mlp.experts.up_proj_lora_{m}": ("muon", True) for i in (1, 2) for m in "AB"},
    }
