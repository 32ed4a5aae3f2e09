"""place_qk_clip: per attention layer, weight rows or a forward scale, or nothing."""

from k2c.codegen import compile_spec
from k2c.ir import OpKind
from specs_for_tests import tiny_spec


def clips(**overrides):
    return [op["qk_clip"] for op in compile_spec(tiny_spec(**overrides)).ops(OpKind.ATTENTION)]


def test_pretraining_scales_weight_rows():
    c = clips()
    assert len(c) == 3 and {d.mode for d in c} == {"weights"}
    d = c[1]
    assert d.q_weight == "model.layers.1.self_attn.q_b_proj.weight"
    assert d.kv_weight == "model.layers.1.self_attn.kv_b_proj.weight"
    dn, dr, dv = 16, 8, 16
    assert d.q_sqrt_gamma_rows == (0, dn, dn + dr)
    assert d.q_gamma_rows == (dn, dr, dn + dr)
    assert d.kv_sqrt_gamma_rows == (0, dn, dn + dv)
    assert d.tau == 100.0


def test_plain_q_proj():
    assert clips(**{"model.attention.q_lora_rank": None})[0].q_weight == "model.layers.0.self_attn.q_proj.weight"


def test_frozen_weights_get_a_forward_scale():
    c = clips(adapter={"kind": "lora", "targets": [{"match": "attn.o"}]})
    assert {d.mode for d in c} == {"scale"}
    # An adapter on q_b alone still leaves the base weight frozen.
    c = clips(adapter={"kind": "lora", "targets": [{"match": "attn.{q_b,kv_b}"}]})
    assert {d.mode for d in c} == {"scale"}


def test_off_without_muonclip_or_when_disabled():
    assert {d.mode for d in clips(**{"optimizer.kind": "muon"})} == {"off"}
    assert {d.mode for d in clips(**{"optimizer.qk_clip": {"enabled": False}})} == {"off"}
