"""The spec front end: shipped specs load with the published values; every malformed spec gives its exact message."""

import json
import operator
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specs_for_tests import tiny_spec

from k2c.spec import Spec, SpecError, import_hf_config, load_spec
from k2c.spec.schema import KIMI_K2_PARAMS, MAX_PARAMS, name_problem, parameter_count

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))
BAD = Path(__file__).resolve().parent / "bad_specs"
GOLDEN = json.loads((BAD / "expected_errors.json").read_text(encoding="utf-8"))

# The published config.json values of shared/reference/models.md, by spec file and spec field.
PUBLISHED = {
    "kimi-k2": {
        "vocab_size": 163840, "hidden_size": 7168, "layers": 61, "dense_layers": 1, "norm_eps": 1e-6,
        "max_position_embeddings": 131072, "tie_embeddings": False, "dense_mlp.intermediate_size": 18432,
        "attention.heads": 64, "attention.q_lora_rank": 1536, "attention.kv_lora_rank": 512,
        "attention.qk_nope_head_dim": 128, "attention.qk_rope_head_dim": 64, "attention.v_head_dim": 128,
        "attention.rope.theta": 50000, "attention.rope.scaling.factor": 32,
        "attention.rope.scaling.original_max_position_embeddings": 4096, "attention.rope.scaling.beta_fast": 1,
        "attention.rope.scaling.beta_slow": 1, "attention.rope.scaling.mscale": 1,
        "attention.rope.scaling.mscale_all_dim": 1,
        "moe.routed_experts": 384, "moe.shared_experts": 1, "moe.experts_per_token": 8,
        "moe.expert_intermediate_size": 2048, "moe.router.routed_scaling": 2.827, "moe.router.groups": 1,
        "moe.router.groups_per_token": 1, "moe.router.scoring": "sigmoid", "moe.router.normalize": True,
    },
    "deepseek-v3": {
        "vocab_size": 129280, "hidden_size": 7168, "layers": 61, "dense_layers": 3, "norm_eps": 1e-6,
        "max_position_embeddings": 163840, "tie_embeddings": False, "dense_mlp.intermediate_size": 18432,
        "attention.heads": 128, "attention.q_lora_rank": 1536, "attention.kv_lora_rank": 512,
        "attention.qk_nope_head_dim": 128, "attention.qk_rope_head_dim": 64, "attention.v_head_dim": 128,
        "attention.rope.theta": 10000, "attention.rope.scaling.factor": 40,
        "attention.rope.scaling.original_max_position_embeddings": 4096, "attention.rope.scaling.beta_fast": 32,
        "attention.rope.scaling.beta_slow": 1, "attention.rope.scaling.mscale": 1,
        "attention.rope.scaling.mscale_all_dim": 1,
        "moe.routed_experts": 256, "moe.shared_experts": 1, "moe.experts_per_token": 8,
        "moe.expert_intermediate_size": 2048, "moe.router.routed_scaling": 2.5, "moe.router.groups": 8,
        "moe.router.groups_per_token": 4, "moe.router.scoring": "sigmoid", "moe.router.normalize": True,
    },
    "moonlight-16b-a3b": {
        "vocab_size": 163840, "hidden_size": 2048, "layers": 27, "dense_layers": 1, "norm_eps": 1e-5,
        "max_position_embeddings": 8192, "tie_embeddings": False, "dense_mlp.intermediate_size": 11264,
        "attention.heads": 16, "attention.q_lora_rank": None, "attention.kv_lora_rank": 512,
        "attention.qk_nope_head_dim": 128, "attention.qk_rope_head_dim": 64, "attention.v_head_dim": 128,
        "attention.rope.theta": 50000, "attention.rope.scaling": None,
        "moe.routed_experts": 64, "moe.shared_experts": 2, "moe.experts_per_token": 6,
        "moe.expert_intermediate_size": 1408, "moe.router.routed_scaling": 2.446, "moe.router.groups": 1,
        "moe.router.groups_per_token": 1, "moe.router.scoring": "sigmoid", "moe.router.normalize": True,
    },
}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_spec_loads(path):
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.name == path.stem.replace("-", "_")
    assert spec.description


def test_every_published_model_is_shipped():
    assert {p.stem for p in SPECS} == set(PUBLISHED) | {"k2-tiny", "k2-1b"}


@pytest.mark.parametrize("stem", sorted(PUBLISHED))
def test_published_values(stem):
    spec = load_spec(ROOT / "specs" / f"{stem}.yaml")
    for field, value in PUBLISHED[stem].items():
        assert operator.attrgetter(field)(spec.model) == value, field


@pytest.mark.parametrize("stem", sorted(PUBLISHED))
def test_published_models_use_the_k2_recipe(stem):
    spec = load_spec(ROOT / "specs" / f"{stem}.yaml")
    opt = spec.optimizer
    assert (opt.kind, opt.lr, opt.weight_decay) == ("muonclip", 2e-4, 0.1)
    assert (opt.qk_clip.enabled, opt.qk_clip.tau) == (True, 100)
    assert (opt.schedule.warmup_steps, opt.schedule.decay) == (500, "cosine")
    assert opt.lr * opt.schedule.final_lr_ratio == pytest.approx(2e-5)
    assert spec.adapter.kind == "none"


def test_k2_tiny_is_k2_shaped():
    spec = load_spec(ROOT / "specs" / "k2-tiny.yaml")
    m = spec.model
    assert (m.vocab_size, m.layers, m.dense_layers, m.attention.heads) == (256, 4, 1, 4)
    assert m.attention.q_lora_rank is not None
    assert (m.moe.routed_experts, m.moe.experts_per_token, m.moe.shared_experts) == (8, 2, 1)
    assert spec.optimizer.kind == "muonclip" and spec.training.data == "bundled"
    assert spec.training.seq_len <= m.max_position_embeddings


# --------------------------------------------------------------------------- malformed specs


def test_corpus_and_golden_file_agree():
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(GOLDEN)
    assert len(GOLDEN) >= 30


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_bad_spec_message(name, monkeypatch):
    monkeypatch.chdir(BAD)  # messages name the file as the user wrote it
    with pytest.raises(SpecError) as info:
        load_spec(name)
    assert str(info.value).splitlines() == GOLDEN[name]
    assert info.value.render() == str(info.value)
    assert len(info.value.issues) == len(GOLDEN[name])


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: error: no such file"


def test_directory(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert str(info.value) == f"{tmp_path}: error: is a directory, not a file"


# --------------------------------------------------------------------------- YAML details

TINY = (ROOT / "specs" / "k2-tiny.yaml").read_text(encoding="utf-8")


def test_yaml_1_2_scalars(tmp_path):
    # YAML 1.1 would read 2e-4 as a string and `no` as false; specs follow YAML 1.2's core schema.
    path = tmp_path / "s.yaml"
    path.write_text(TINY.replace("lr: 2.0e-3", "lr: 2e-3").replace("data: bundled", "data: 2024-01-01")
                    .replace("description: A K2-shaped MoE small enough to train on a laptop CPU.", "description: no"))
    spec = load_spec(path)
    assert spec.optimizer.lr == 2e-3
    assert spec.description == "no"
    assert spec.training.data == "2024-01-01"


def test_merge_keys_share_target_settings(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(TINY + "adapter:\n  kind: ce_lora\n  targets:\n"
                    "    - &common {match: attn.o, keep_ratio: 0.5, layers: '1-3'}\n"
                    "    - &kv {<<: *common, match: attn.kv_b}\n"
                    "    - {<<: [*kv, *common], keep_ratio: 0.7}\n"
                    "    - *kv\n")
    targets = load_spec(path).adapter.targets
    assert [(t.match, t.keep_ratio, t.layers) for t in targets] == [
        ("attn.o", 0.5, "1-3"), ("attn.kv_b", 0.5, "1-3"), ("attn.kv_b", 0.7, "1-3"), ("attn.kv_b", 0.5, "1-3")]


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + TINY.encode())
    assert load_spec(path).name == "k2_tiny"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_specs_never_escape_as_other_exceptions(tmp_path, data):
    # Cut, repeat or replace a piece of a good spec: the result loads or raises a SpecError, nothing else.
    text = TINY
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 40)))
    piece = data.draw(st.sampled_from(["", text[start:end] * 2, ":", "- ", "{", "]", "\t", "&a ", "*a", "'",
                                       "<<: ", "0", "-1", "null", "\n  "]))
    path = tmp_path / "s.yaml"
    path.write_text(text[:start] + piece + text[end:], encoding="utf-8")
    try:
        load_spec(path)
    except SpecError as exc:
        assert exc.issues and all(str(issue).startswith(f"{path}") for issue in exc.issues)


# --------------------------------------------------------------------------- bounds (tests/test_hostile_specs.py runs
# the hostile corpus through `k2c check`; these are the pieces in process)

# k2c's parameter counts for the shipped specs (README), which the spec's own estimate must reproduce exactly.
SHIPPED_PARAMETERS = {"k2-tiny": 2_462_208, "kimi-k2": 1_026_408_209_408, "deepseek-v3": 671_026_404_352,
                      "moonlight-16b-a3b": 15_960_108_544}


@pytest.mark.parametrize("stem", sorted(SHIPPED_PARAMETERS))
def test_parameter_count_of_shipped_specs(stem):
    spec = load_spec(ROOT / "specs" / f"{stem}.yaml")
    assert sum(parameter_count(spec.model).values()) == SHIPPED_PARAMETERS[stem]
    assert sum(parameter_count(spec.model).values()) <= MAX_PARAMS / 9  # the ceiling leaves room above Kimi K2


def test_kimi_k2_constant_is_its_count():
    assert KIMI_K2_PARAMS == SHIPPED_PARAMETERS["kimi-k2"]


@pytest.mark.parametrize("overrides", [
    {},
    {"model.tie_embeddings": True},
    {"model.attention.q_lora_rank": None},
    {"model.dense_layers": 3},  # dense only: the moe section is unused
    {"model.dense_layers": 0},
    {"model.moe.shared_experts": 0},
    {"model.moe.shared_experts": 3, "model.moe.routed_experts": 16},
], ids=str)
def test_parameter_count_matches_the_compiler(overrides):
    from k2c.codegen import compile_spec

    spec = tiny_spec(**overrides)
    assert sum(parameter_count(spec.model).values()) == compile_spec(spec).facts["params"]["total"]


@pytest.mark.parametrize("name", ["k2_tiny", "kimi_k2", "deepseek_v3", "moonlight_16b_a3b", "t_tiny", "mine",
                                  "model", "match", "type", "_private", "json_model", "torch_model"])
def test_good_package_names(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["torch", "json", "k2c", "class", "__init__", "os", "generated", "sympy"])
def test_shadowing_package_names(name):
    assert name_problem(name) is not None
    assert f"(try '{name.strip('_')}_model')" in name_problem(name)


def test_a_model_too_large_to_build(tmp_path):
    path = tmp_path / "s.yaml"
    big = {"hidden_size": "131072", "layers": "512", "routed_experts": "65536", "expert_intermediate_size": "1048576"}
    text = TINY
    for key, value in big.items():
        text = re.sub(rf"(?m)^(\s*{key}: )\S+", lambda m, v=value: m[1] + v, text, count=1)
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"{path}:35:31: error: model.moe.expert_intermediate_size: expected a model of at most 1e+13 parameters "
        "(10x Kimi K2's 1.03e+12), found 1048576, which makes 1.38e+19 parameters (5.52e+19 bytes of weights in "
        "float32; 100% of them in the routed experts)")


def test_twenty_levels_of_nesting_are_read(tmp_path):
    # The depth limit is YAML's, not the schema's: 20 levels parse (and fail as a spec), 21 do not parse.
    for keys, deepest, message in ((18, 20, "found key 'a'"), (19, 21, "expected at most 20 levels")):
        path = tmp_path / "s.yaml"
        path.write_text("name: x\nmodel:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(keys))
                        + "  " * (keys + 1) + "1\n")  # the root, then `keys` mappings, then the scalar 1
        assert deepest == 1 + keys + 1
        with pytest.raises(SpecError) as info:
            load_spec(path)
        assert message in str(info.value), keys


def test_aliases_within_the_budget_are_expanded(tmp_path):
    # 9 x 9 x 9 = 729 strings from a few lines: aliases are fine while their expansion stays small.
    path = tmp_path / "s.yaml"
    path.write_text(TINY.replace("description:", "x: &a [s, s, s, s, s, s, s, s, s]\n"
                                                  "y: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                                                  "z: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
                                                  "description:"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [issue.field for issue in info.value.issues] == ["x", "y", "z"]  # unknown keys, not a bomb


def test_many_issues_are_counted_not_all_shown(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(TINY + "".join(f"unknown_{i}: {i}\n" for i in range(120)))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    assert len(info.value.issues) == 120 and len(lines) == 51
    assert lines[-1] == f"{path}: error: 70 more errors not shown"


def test_import_hf_refuses_hostile_json(tmp_path):
    path = tmp_path / "config.json"
    cases = {
        '{"hidden_size": ' + "9" * 5000 + "}":
            f"{path}:1:17: error: expected an integer of at most 30 digits, found an integer of 5000 digits",
        "[" * 100_000 + "]" * 100_000: f"{path}: error: invalid JSON: nested too deeply",
        " " * (5 * 2**20): f"{path}: error: expected a config of at most 4.0 MiB, found 5.0 MiB",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(SpecError) as info:
            import_hf_config(path)
        assert str(info.value) == message


def test_import_hf_default_name_is_a_good_package_name(tmp_path):
    from published_configs import KIMI_K2

    path = tmp_path / "json" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(KIMI_K2))
    assert "\nname: json_model\n" in "\n" + import_hf_config(path)
