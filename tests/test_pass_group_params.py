"""group_params: Muon for hidden matrices, AdamW for the rest, decided from op kinds, not shapes; and each Muon
matrix's form of Newton-Schulz, decided from its shape."""

import pytest

from k2c.codegen import compile_spec
from k2c.passes.group_params import ns_form
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


def forms(**overrides):
    g = compile_spec(tiny_spec(**overrides))
    return {pg.name: pg.newton_schulz for op in g.ops() for pg in op.get("param_groups", ())}


def test_newton_schulz_is_standard_unless_the_spec_asks():
    fs = forms()
    assert {f for name, f in fs.items() if "layernorm" not in name and "embed" not in name
            and "lm_head" not in name and "norm." not in name and ".gate.weight" not in name} == {"standard"}
    assert fs["model.embed_tokens.weight"] is None  # AdamW's: no Newton-Schulz


def test_gram_form_goes_where_it_saves_work():
    fs = forms(**{"optimizer.muon.newton_schulz": "gram"})
    assert fs["model.layers.0.self_attn.o_proj.weight"] == "standard"  # [64, 64]: square
    assert fs["model.layers.0.self_attn.q_a_proj.weight"] == "gram"  # [32, 64]
    assert fs["model.layers.0.self_attn.kv_b_proj.weight"] == "gram"  # [128, 16]: tall, iterated on transposed
    assert fs["model.layers.1.mlp.experts.up_proj"] == "gram"  # [8, 32, 64]: a stack, by its matrices' shape
    assert fs["model.layers.1.mlp.gate.weight"] is None


@pytest.mark.parametrize("rows, cols, form", [(1408, 2048, "gram"), (2048, 1408, "gram"), (1700, 2048, "standard"),
                                              (512, 1536, "gram"), (2048, 2048, "standard")])
def test_gram_form_needs_a_tenth_less_work(rows, cols, form):
    """For 5 steps, in units of n^3 with alpha = m / n: the standard form 5 (alpha / 2 + 1 / 2 + alpha); the Gram
    form per segment (2 + 3 steps) alpha / 2 + (4 L - 3) / 2 + alpha, 3 alpha + 7 in all. At 2048 x 1408
    (alpha 1.45) that is 0.85 of the standard form's; at 2048 x 1700 (alpha 1.20), 0.92."""
    alpha = max(rows, cols) / min(rows, cols)
    ratio = (3 * alpha + 7) / (7.5 * alpha + 2.5)
    assert (ratio <= 0.9) == (form == "gram")
    assert ns_form("gram", (rows, cols), 5) == form
    assert ns_form("standard", (rows, cols), 5) == "standard"
