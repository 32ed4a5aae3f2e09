"""`k2c import-hf`: Hugging Face DeepseekV3-architecture configs become specs of the same network.

The reference is transformers itself: a spec's numbers, written back into a `DeepseekV3Config` by conftest's
`hf_config`, must build a `DeepseekV3ForCausalLM` that computes the same logits as the original config.
"""

import json
import math
import operator
from pathlib import Path

import pytest
import torch
import yaml
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from conftest import hf_config
from published_configs import DEEPSEEK_V3, KIMI_K2, MOONLIGHT
from k2c.spec import SpecError, import_hf_config, load_spec, spec_from_hf_config
from k2c.spec.import_hf import HF_DEFAULTS
from k2c.spec.schema import Attention, Model, Moe, Rope, Router, Spec, Yarn

ROOT = Path(__file__).resolve().parent.parent

# spec model field <- config key, written out independently of the importer.
COPIED = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "layers": "num_hidden_layers",
    "dense_layers": "first_k_dense_replace", "norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range", "attention.heads": "num_attention_heads",
    "attention.q_lora_rank": "q_lora_rank", "attention.kv_lora_rank": "kv_lora_rank",
    "attention.qk_nope_head_dim": "qk_nope_head_dim", "attention.qk_rope_head_dim": "qk_rope_head_dim",
    "attention.v_head_dim": "v_head_dim", "attention.rope.interleaved": "rope_interleave",
    "dense_mlp.intermediate_size": "intermediate_size", "moe.routed_experts": "n_routed_experts",
    "moe.shared_experts": "n_shared_experts", "moe.experts_per_token": "num_experts_per_tok",
    "moe.expert_intermediate_size": "moe_intermediate_size", "moe.router.groups": "n_group",
    "moe.router.groups_per_token": "topk_group", "moe.router.normalize": "norm_topk_prob",
    "moe.router.routed_scaling": "routed_scaling_factor",
}

TINY = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=20, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=2,
    num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.7,
    max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.03,
)


def tiny_config(**changes) -> dict:
    """A tiny config as transformers 5.x writes config.json (rope_theta inside rope_parameters)."""
    return DeepseekV3Config(**{**TINY, **changes}).to_dict()


def old_style(config: dict, rope_scaling: dict | None) -> dict:
    """The same config as older config.json files write it: rope_theta at the top, YaRN in rope_scaling."""
    config = dict(config)
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = rope_scaling
    return config


def imported(config: dict, tmp_path: Path, folder: str = "model") -> Spec:
    """config.json -> import-hf YAML -> load_spec, as a user would run it."""
    path = tmp_path / folder / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(import_hf_config(path))
    return load_spec(spec_path)


def test_defaults_are_transformers_defaults():
    reference = DeepseekV3Config()
    for key, value in HF_DEFAULTS.items():
        actual = reference.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(reference, key)
        assert actual == value, key


@pytest.mark.parametrize(
    "config, folder, shipped, name",
    [(KIMI_K2, "Kimi-K2-Instruct", "kimi-k2", "kimi_k2_instruct"),
     (DEEPSEEK_V3, "DeepSeek-V3", "deepseek-v3", "deepseek_v3"),
     (MOONLIGHT, "Moonlight-16B-A3B", "moonlight-16b-a3b", "moonlight_16b_a3b")],
    ids=["kimi-k2", "deepseek-v3", "moonlight"],
)
def test_published_config_gives_the_shipped_model(config, folder, shipped, name, tmp_path):
    spec = imported(config, tmp_path, folder)
    assert spec.name == name
    assert spec.model == load_spec(ROOT / "specs" / f"{shipped}.yaml").model


VARIANTS = {
    "grouped_routing": tiny_config(),
    "plain_q_proj_no_groups_tied": tiny_config(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                               rope_interleave=False, tie_word_embeddings=True),
    "yarn_in_rope_parameters": tiny_config(rope_parameters={
        "rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.6}),
    "yarn_old_style_defaults": old_style(tiny_config(), {"type": "yarn", "factor": 8.0, "mscale": 0.7}),
    "yarn_old_style_rope_type": old_style(tiny_config(), {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "no_rope_scaling": old_style(tiny_config(), None),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_field_maps(variant, tmp_path):
    config = VARIANTS[variant]
    spec = imported(config, tmp_path)
    for field, key in COPIED.items():
        assert operator.attrgetter(field)(spec.model) == config[key], field
    reference = DeepseekV3Config.from_dict(config)
    rope = reference.rope_parameters
    assert spec.model.attention.rope.theta == rope["rope_theta"]
    assert (spec.model.attention.rope.scaling is None) == (rope["rope_type"] == "default")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_network_as_transformers(variant, tmp_path):
    config = VARIANTS[variant]
    spec = imported(config, tmp_path)
    torch.manual_seed(0)
    original = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(config, attn_implementation="eager")).eval()
    rebuilt = DeepseekV3ForCausalLM(hf_config(spec)).eval()
    rebuilt.load_state_dict(original.state_dict())
    ids = torch.randint(0, config["vocab_size"], (2, 24))
    with torch.no_grad():
        expected, actual = original(ids).logits, rebuilt(ids).logits
    assert torch.equal(actual, expected)
    assert rebuilt.model.layers[0].self_attn.scaling == original.model.layers[0].self_attn.scaling
    assert rebuilt.model.rotary_emb.attention_scaling == original.model.rotary_emb.attention_scaling
    assert torch.equal(rebuilt.model.rotary_emb.inv_freq, original.model.rotary_emb.inv_freq)
    if (yarn := spec.model.attention.rope.scaling) is not None:
        # DeepSeek's own code scales cos/sin by m(mscale) / m(mscale_all_dim), where m(0) = 1 even without
        # mscale_all_dim: the spec's values give transformers' factor under that rule as well.
        def m(x):
            return 0.1 * x * math.log(yarn.factor) + 1.0

        assert m(yarn.mscale) / m(yarn.mscale_all_dim) == pytest.approx(original.model.rotary_emb.attention_scaling)


def test_k2_tiny_size_by_transformers():
    spec = load_spec(ROOT / "specs" / "k2-tiny.yaml")
    with torch.device("meta"):
        total = sum(p.numel() for p in DeepseekV3ForCausalLM(hf_config(spec)).parameters())
    assert 2_000_000 <= total <= 6_000_000


def test_a_yarn_config_changes_the_network():
    # The parity test above can fail: dropping YaRN from the spec changes the logits.
    config = VARIANTS["yarn_in_rope_parameters"]
    no_yarn = spec_from_hf_config(config)
    no_yarn["model"]["attention"]["rope"]["scaling"] = None
    no_yarn = Spec.model_validate(no_yarn)
    torch.manual_seed(0)
    original = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(config, attn_implementation="eager")).eval()
    rebuilt = DeepseekV3ForCausalLM(hf_config(no_yarn)).eval()
    rebuilt.load_state_dict(original.state_dict())
    ids = torch.randint(0, config["vocab_size"], (1, 16))
    with torch.no_grad():
        assert not torch.allclose(original(ids).logits, rebuilt(ids).logits)


# --------------------------------------------------------------------------- sections, names, text


def test_unused_sections_are_left_out():
    no_dense = spec_from_hf_config(tiny_config(first_k_dense_replace=0))
    assert "dense_mlp" not in no_dense["model"] and Spec.model_validate(no_dense).model.dense_layers == 0
    all_dense = spec_from_hf_config(tiny_config(first_k_dense_replace=3))
    assert "moe" not in all_dense["model"] and Spec.model_validate(all_dense).model.moe is None


def test_short_context_shortens_the_training_sequence():
    spec = Spec.model_validate(spec_from_hf_config(tiny_config(max_position_embeddings=64)))
    assert spec.training.seq_len == 64


def test_name_from_folder_cache_argument_or_model_type(tmp_path, monkeypatch):
    assert imported(KIMI_K2, tmp_path, "models--moonshotai--Kimi-K2-Base/snapshots/0123abc").name == "kimi_k2_base"
    assert imported(KIMI_K2, tmp_path, "16B-Model").name == "m_16b_model"
    path = tmp_path / "16B-Model" / "config.json"
    assert yaml.safe_load(import_hf_config(path, name="mine"))["name"] == "mine"
    monkeypatch.chdir(path.parent)
    assert yaml.safe_load(import_hf_config("config.json"))["name"] == "kimi_k2"
    assert spec_from_hf_config(DEEPSEEK_V3)["name"] == "deepseek_v3"


def test_bad_explicit_name():
    with pytest.raises(SpecError) as info:
        spec_from_hf_config(KIMI_K2, name="Kimi K2")
    assert str(info.value) == "config.json: error: name: expected a string matching ^[a-z_][a-z0-9_]*$, found 'Kimi K2'"


def test_yaml_is_deterministic_readable_and_ordered(tmp_path):
    path = tmp_path / "Kimi-K2-Instruct" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(KIMI_K2))
    text = import_hf_config(path)
    assert text == import_hf_config(path)
    assert text.startswith("# Generated by `k2c import-hf` from Kimi-K2-Instruct/config.json.\n")
    assert str(tmp_path) not in text
    assert "    heads: 64" in text and "# num_attention_heads" in text.split("    heads: 64", 1)[1].split("\n")[0]
    data = yaml.safe_load(text)
    assert list(data) == ["name", "description", "model"]
    for section, schema in [(data["model"], Model), (data["model"]["attention"], Attention),
                            (data["model"]["attention"]["rope"], Rope),
                            (data["model"]["attention"]["rope"]["scaling"], Yarn), (data["model"]["moe"], Moe),
                            (data["model"]["moe"]["router"], Router)]:
        assert list(section) == [f for f in schema.model_fields if f in section]


# --------------------------------------------------------------------------- what k2c cannot build


@pytest.mark.parametrize("changes, message", [
    ({"scoring_func": "softmax"}, "scoring_func: expected 'sigmoid', the only value k2c builds, found 'softmax'"),
    ({"hidden_act": "gelu"}, "hidden_act: expected 'silu', the only value k2c builds, found 'gelu'"),
    ({"attention_bias": True}, "attention_bias: expected false, the only value k2c builds, found true"),
    ({"topk_method": "group_limited_greedy"},
     "topk_method: expected 'noaux_tc', the only value k2c builds, found 'group_limited_greedy'"),
    ({"moe_layer_freq": 2}, "moe_layer_freq: expected 1, the only value k2c builds, found 2"),
    ({"attention_dropout": 0.1}, "attention_dropout: expected 0.0, the only value k2c builds, found 0.1"),
    ({"num_key_value_heads": 8},
     "num_key_value_heads: expected num_attention_heads (64): MLA gives every head its own key and value, found 8"),
    ({"model_type": "llama"},
     "model_type: expected one of 'deepseek_v3', 'kimi_k2' (the DeepseekV3 architecture), found 'llama'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.type: expected 'yarn' or 'default', found 'linear'"),
    ({"rope_scaling": {**KIMI_K2["rope_scaling"], "attention_factor": 1.2}},
     "rope_scaling.attention_factor: expected null (k2c builds the YaRN transformers derives by default), found 1.2"),
    ({"rope_scaling": {"type": "yarn", "factor": 32.0, "mscale_all_dim": 1.0}},
     "rope_scaling.mscale (model.attention.rope.scaling.mscale): expected a number, found null"),
    ({"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 4096}},
     "rope_scaling.factor (model.attention.rope.scaling.factor): expected a number, found null"),
    ({"n_group": 5},
     "n_routed_experts (model.moe.routed_experts): expected a multiple of router.groups (5), found 384"),
    ({"n_group": 4, "topk_group": 8},
     "topk_group (model.moe.router.groups_per_token): expected at most router.groups (4), found 8"),
    ({"hidden_size": "7168"}, "hidden_size (model.hidden_size): expected an integer, found '7168'"),
    ({"num_experts_per_tok": None},
     "num_experts_per_tok (model.moe.experts_per_token): expected an integer, found null"),
    ({"first_k_dense_replace": 62},
     "first_k_dense_replace (model.dense_layers): expected at most layers (61), found 62"),
])
def test_unsupported_or_invalid_values_name_their_key(changes, message):
    with pytest.raises(SpecError) as info:
        spec_from_hf_config({**KIMI_K2, **changes})
    assert str(info.value) == f"config.json: error: {message}"


def test_missing_model_type_and_several_problems_at_once():
    config = {k: v for k, v in KIMI_K2.items() if k != "model_type"} | {"hidden_act": "relu"}
    with pytest.raises(SpecError) as info:
        spec_from_hf_config(config, file="K2/config.json")
    assert str(info.value).splitlines() == [
        "K2/config.json: error: model_type: expected one of 'deepseek_v3', 'kimi_k2' (the DeepseekV3 architecture), "
        "found null",
        "K2/config.json: error: hidden_act: expected 'silu', the only value k2c builds, found 'relu'",
    ]


def test_unreadable_configs(tmp_path):
    bad_json = tmp_path / "config.json"
    bad_json.write_text('{\n  "hidden_size": 64,\n  "vocab_size": \n}\n')
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    cases = {
        bad_json: f"{bad_json}:4:1: error: invalid JSON: Expecting value",
        not_object: f"{not_object}: error: expected a JSON object of config keys, found a list of 2 items",
        tmp_path / "missing.json": f"{tmp_path / 'missing.json'}: error: no such file",
        tmp_path: f"{tmp_path}: error: is a directory, not a file",
    }
    for path, message in cases.items():
        with pytest.raises(SpecError) as info:
            import_hf_config(path)
        assert str(info.value) == message
