"""place_adapters: which linears get CE-LoRA, exact LoRA, stay frozen or train."""

import math

import pytest

from k2c.codegen import compile_spec
from k2c.passes import PlacementError
from specs_for_tests import tiny_spec


def decisions(**adapter):
    g = compile_spec(tiny_spec(adapter=adapter))
    return {op.name: op["adapter"] for op in g.ops() if "adapter" in op}


def test_no_adapter_means_every_matrix_trains():
    g = compile_spec(tiny_spec())
    kinds = {op["adapter"].kind for op in g.ops() if "adapter" in op}
    assert kinds == {"trainable"}


def test_targets_patterns_layers_and_defaults():
    d = decisions(kind="ce_lora", rank=8, targets=[
        {"match": "attn.kv_b", "keep_ratio": 0.5},
        {"match": "attn.o"},
        {"match": "experts.{up,down}", "layers": "2"},
        {"match": "attn.q_b"},
    ])
    assert d["layers.0.attn.kv_b"].kind == "ce_lora" and d["layers.0.attn.kv_b"].keep_ratio == 0.5
    assert d["layers.1.attn.o"].keep_ratio == 0.55  # the CE-LoRA authors' default for the attention output
    assert d["layers.2.experts.up"].keep_ratio == 0.65 and d["layers.2.experts.down"].kind == "ce_lora"
    assert d["layers.1.experts.up"].kind == "frozen"  # outside the layer range
    assert d["layers.2.experts.gate"].kind == "frozen"
    assert d["layers.0.attn.q_b"].kind == "lora"  # feeds the softmax: exact backward by default
    assert d["layers.0.mlp.up"].kind == "frozen"
    o = d["layers.0.attn.o"]
    assert o.svd_rank == 7 * 8 // 8 and o.rank == 8
    assert o.kept_channels == math.ceil(0.55 * 64)
    m, n = 64, 64
    assert o.backward_flops_saved == 2 * m * n - 2 * o.svd_rank * (m + n) - 2 * o.kept_channels * n


def test_first_matching_target_wins_and_rank_override():
    d = decisions(kind="ce_lora", targets=[{"match": "attn.o", "rank": 4, "keep_ratio": 1.0}, {"match": "attn.*"}])
    assert (d["layers.0.attn.o"].kind, d["layers.0.attn.o"].rank) == ("lora", 4)
    assert d["layers.0.attn.kv_a"].kind == "lora" and d["layers.0.attn.kv_a"].rank == 16


def test_expert_site_saving_counts_each_visit():
    d = decisions(kind="ce_lora", rank=4, targets=[{"match": "experts.down", "keep_ratio": 0.25}])
    e = d["layers.1.experts.down"]
    m, n, k = 64, 32, 2  # out, in, top_k
    assert e.backward_flops_saved == k * (2 * m * n - 2 * e.svd_rank * (m + n) - 2 * math.ceil(0.25 * m) * n)


@pytest.mark.parametrize("adapter, message", [
    ({"kind": "lora", "targets": [{"match": "attn.qq"}]},
     "adapter.targets[0].match: 'attn.qq' matches no linear; expected one of attn.kv_a"),
    ({"kind": "lora", "targets": [{"match": "experts.up", "layers": "0"}]},
     "adapter.targets[0].match: 'experts.up' in layers '0' matches no linear"),
    ({"kind": "lora", "targets": [{"match": "attn.o", "keep_ratio": 0.5}]},
     "adapter.targets[0].keep_ratio: expected 1.0 or nothing for adapter kind 'lora'"),
    ({"kind": "ce_lora", "targets": [{"match": "attn.kv_b", "keep_ratio": 0.5, "svd_rank": 16}]},
     "adapter.targets[0].svd_rank: expected less than min(out, in) = 16 of layers.0.attn.kv_b, found 16"),
])
def test_bad_targets_are_errors_naming_the_field(adapter, message):
    with pytest.raises(PlacementError) as err:
        compile_spec(tiny_spec(adapter=adapter))
    assert message in str(err.value)
