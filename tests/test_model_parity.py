"""The generated model against transformers' DeepseekV3ForCausalLM: same weights in, same logits, loss and
gradients out; max-logit and expert-load recording against brute force; full-size construction on meta."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import subprocess_env
from specs_for_tests import tiny_spec

from k2c.spec import load_spec
from k2c.spec.schema import Spec

# every case differs from the transformers defaults, so that a field read from the wrong place shows up
BASE = {
    "model.norm_eps": 1e-2,  # large enough to tell apart from the 1e-6 that the latent norms keep
    "model.max_position_embeddings": 128,
    "model.moe.router.routed_scaling": 2.5,
}
CASES = {
    "q_lora": {},
    "no_q_lora": {"model.attention.q_lora_rank": None},
    "grouped_router": {
        "model.moe.routed_experts": 16,
        "model.moe.experts_per_token": 4,
        "model.moe.router.groups": 4,
        "model.moe.router.groups_per_token": 2,
    },
    "unnormalized_router": {"model.moe.router.normalize": False},
    "yarn": {  # sizes chosen so that the ramp between original and interpolated frequencies has partial steps
        "model.max_position_embeddings": 512,
        "model.attention.qk_rope_head_dim": 16,
        "model.attention.rope": {
            "theta": 5000.0,
            "scaling": {"factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 4.0,
                        "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.7},
        },
    },
    "two_shared_two_dense": {"model.layers": 4, "model.dense_layers": 2, "model.moe.shared_experts": 2},
    "half_split_rope": {"model.attention.rope.interleaved": False},
    "tied_embeddings": {"model.tie_embeddings": True},
}


def case_spec(case: str) -> Spec:
    return tiny_spec(**{**BASE, **CASES[case]})


def batch(spec: Spec, seed: int, size: int = 2, seq: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.model.vocab_size, (size, seq), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100
    labels[1, 20:25] = -100
    return ids, labels


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).abs().max() / reference.abs().max()).item()


def loaded_pair(case: str, build_generated, hf_twin, tmp_path):
    """The generated model and its transformers twin, loaded through a `save_pretrained` folder."""
    spec = case_spec(case)
    package = build_generated(spec)
    hf = hf_twin(spec)
    hf.save_pretrained(tmp_path / "hf")
    model = package.build_model()
    package.load_hf_state_dict(model, tmp_path / "hf")
    return spec, model.eval(), hf


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_match_transformers(case, build_generated, hf_twin, tmp_path):
    spec, model, hf = loaded_pair(case, build_generated, hf_twin, tmp_path)
    ids, labels = batch(spec, seed=1)
    with torch.no_grad():
        ours, reference = model(ids, labels=labels), hf(ids, labels=labels)
    assert relative_error(ours.logits, reference.logits) < 1e-4
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["q_lora", "grouped_router"])
def test_gradients_match_transformers(case, build_generated, hf_twin, tmp_path):
    spec, model, hf = loaded_pair(case, build_generated, hf_twin, tmp_path)
    ids, labels = batch(spec, seed=2)
    model(ids, labels=labels).loss.backward()
    hf(ids, labels=labels).loss.backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_proj") or name.endswith("experts.up_proj"):
            fused = hf_grads[name.rsplit(".", 1)[0] + ".gate_up_proj"]
            half = p.shape[1]
            reference = fused[:, :half] if name.endswith("gate_proj") else fused[:, half:]
        else:
            reference = hf_grads[name]
        assert relative_error(p.grad, reference) < 1e-4, name


def test_max_logits_match_brute_force(build_generated, hf_twin, hf_max_logits, tmp_path):
    spec, model, hf = loaded_pair("yarn", build_generated, hf_twin, tmp_path)
    first, _ = batch(spec, seed=3)
    second, _ = batch(spec, seed=4)
    expected_first, expected_second = hf_max_logits(hf, first), hf_max_logits(hf, second)
    assert expected_first.shape == (spec.model.layers, spec.model.attention.heads)

    model.reset_step_stats()
    with torch.no_grad():
        model(first)
        torch.testing.assert_close(model.max_logits(), expected_first, rtol=1e-5, atol=1e-5)
        model(second)
    torch.testing.assert_close(model.max_logits(), expected_second, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.step_max_logits(), torch.maximum(expected_first, expected_second),
                               rtol=1e-5, atol=1e-5)

    model.reset_step_stats()
    with torch.no_grad():
        model(first)
    torch.testing.assert_close(model.step_max_logits(), expected_first, rtol=1e-5, atol=1e-5)


def test_expert_loads_count_routed_tokens_in_training(build_generated, hf_twin, tmp_path):
    spec, model, hf = loaded_pair("grouped_router", build_generated, hf_twin, tmp_path)
    chosen = {}
    for i, layer in enumerate(hf.model.layers):
        if i >= spec.model.dense_layers:
            layer.mlp.gate.register_forward_hook(lambda mod, args, out, i=i: chosen.__setitem__(i, out[2]))
    ids, _ = batch(spec, seed=5)
    with torch.no_grad():
        hf(ids)
        model.reset_step_stats()
        model.eval()
        model(ids)
        assert all(load.sum() == 0 for load in model.expert_loads().values())
        model.train()
        model(ids)
        model(ids)

    loads = model.expert_loads()
    assert sorted(loads) == sorted(chosen)
    experts = spec.model.moe.routed_experts
    for i, indices in chosen.items():
        expected = 2 * torch.bincount(indices.flatten(), minlength=experts).float()
        torch.testing.assert_close(loads[i], expected, rtol=0, atol=0)
    model.reset_step_stats()
    assert all(load.sum() == 0 for load in model.expert_loads().values())


def test_init_is_seeded_and_scaled(build_generated):
    spec = case_spec("q_lora")
    package = build_generated(spec)
    torch.manual_seed(7)
    a = package.build_model()
    torch.manual_seed(7)
    b = package.build_model()
    std = spec.model.init_std
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
        if name.endswith("e_score_correction_bias"):
            assert torch.count_nonzero(p) == 0
        elif p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name  # norm gains
        else:
            assert abs(p.mean().item()) < 0.1 * std and abs(p.std().item() - std) < 0.1 * std, name


KIMI_K2 = {
    "name": "kimi_k2",
    "model": {
        "vocab_size": 163840, "hidden_size": 7168, "layers": 61, "dense_layers": 1,
        "max_position_embeddings": 131072,
        "attention": {"heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                      "qk_rope_head_dim": 64, "v_head_dim": 128,
                      "rope": {"theta": 50000.0, "scaling": {"factor": 32.0, "original_max_position_embeddings": 4096,
                                                             "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                                                             "mscale_all_dim": 1.0}}},
        "dense_mlp": {"intermediate_size": 18432},
        "moe": {"routed_experts": 384, "shared_experts": 1, "experts_per_token": 8, "expert_intermediate_size": 2048,
                "router": {"routed_scaling": 2.827}},
    },
}


def test_full_kimi_k2_builds_on_meta(build_generated, hf_twin):
    spec = Spec.model_validate(KIMI_K2)
    package = build_generated(spec)
    model = package.build_model(device="meta", dtype=torch.bfloat16)
    assert all(t.is_meta for t in model.state_dict().values())
    hf = hf_twin(spec, device="meta")

    # transformers fuses gate and up in memory; spell its experts out one by one, as they are stored on disk
    expected = {}
    for name, p in hf.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if name.endswith("experts.gate_up_proj"):
            e, two_i, h = p.shape
            for j in range(e):
                expected[f"{prefix}.{j}.gate_proj.weight"] = (two_i // 2, h)
                expected[f"{prefix}.{j}.up_proj.weight"] = (two_i // 2, h)
        elif name.endswith("experts.down_proj"):
            for j in range(p.shape[0]):
                expected[f"{prefix}.{j}.down_proj.weight"] = tuple(p.shape[1:])
        else:
            expected[name] = tuple(p.shape)
    assert {name: tuple(t.shape) for name, t in package.hf_state_dict(model).items()} == expected
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("case", ["no_q_lora", "grouped_router", "unnormalized_router", "yarn"])
def test_import_hf_build_and_load_give_the_same_model(case, build_generated, hf_twin, tmp_path):
    """The user's path: a saved transformers model -> `k2c import-hf` -> build -> load its checkpoint."""
    spec = case_spec(case)
    hf = hf_twin(spec)
    hf.save_pretrained(tmp_path / "hf")
    imported = tmp_path / "imported.yaml"
    r = subprocess.run([sys.executable, "-m", "k2c.cli", "import-hf", str(tmp_path / "hf" / "config.json"),
                        "-o", str(imported)], capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    package = build_generated(load_spec(imported))
    model = package.build_model()
    package.load_hf_state_dict(model, tmp_path / "hf")
    ids, labels = batch(spec, seed=2)
    with torch.no_grad():
        ours, reference = model.eval()(ids, labels=labels), hf(ids, labels=labels)
    assert relative_error(ours.logits, reference.logits) < 1e-4
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-5, atol=0)
