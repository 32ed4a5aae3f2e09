"""Checkpoint loading and saving of the generated package, against transformers' own files and loader."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from k2c.runtime.checkpoint import CheckpointError
from specs_for_tests import tiny_spec

SPEC = {"model.moe.router.routed_scaling": 2.5, "model.norm_eps": 1e-5}


def batch(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).abs().max() / reference.abs().max()).item()


def same_logits(model, hf, ids: torch.Tensor) -> bool:
    with torch.no_grad():
        return relative_error(model.eval()(ids).logits, hf(ids).logits) < 1e-4


@pytest.fixture
def setup(build_generated, hf_twin, tmp_path):
    """(package, transformers twin, the twin's tensors as transformers writes them to disk: one per expert)."""
    spec = tiny_spec(**SPEC)
    hf = hf_twin(spec)
    hf.save_pretrained(tmp_path / "hf")
    published = load_file(tmp_path / "hf" / "model.safetensors")
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in published
    assert not any(name.endswith("gate_up_proj") for name in published)
    return build_generated(spec), hf, published


def test_fused_transformers_layout(setup):
    package, hf, published = setup
    model = package.build_model()
    package.load_hf_state_dict(model, hf.state_dict())  # in memory transformers 5.x fuses gate and up
    assert any(name.endswith("gate_up_proj") for name in hf.state_dict())
    assert same_logits(model, hf, batch(256))
    saved = package.hf_state_dict(model)
    assert saved.keys() == published.keys()
    for name, tensor in published.items():
        assert torch.equal(saved[name], tensor), name


def test_sharded_folder_and_single_file(setup, tmp_path):
    package, hf, published = setup
    names = sorted(published)
    shards = {f"model-{i + 1:05d}-of-00003.safetensors": names[i::3] for i in range(3)}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file, members in shards.items():
        save_file({name: published[name] for name in members}, folder / file)
    weight_map = {name: file for file, members in shards.items() for name in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    from_shards = package.build_model()
    package.load_hf_state_dict(from_shards, folder)
    assert same_logits(from_shards, hf, batch(256))

    from_file = package.build_model()
    package.load_hf_state_dict(from_file, tmp_path / "hf" / "model.safetensors")
    assert same_logits(from_file, hf, batch(256))


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's storage: e4m3 values and one inverse scale per 128x128 block."""
    rows, cols = weight.shape
    scale_inv = torch.empty(math.ceil(rows / 128), math.ceil(cols / 128))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            scale_inv[i, j] = block.abs().max() / 448
            quantized[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale_inv[i, j]).to(torch.float8_e4m3fn)
    return quantized, scale_inv


def dequantize(quantized: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    out = quantized.float()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= scale_inv[i, j]
    return out


def test_fp8_weights_with_block_scales(build_generated, hf_twin, tmp_path):
    # sizes above and off multiples of 128, so that there are several blocks and partial edge blocks
    spec = tiny_spec(**SPEC, **{"model.hidden_size": 160, "model.dense_mlp.intermediate_size": 300,
                                "model.moe.expert_intermediate_size": 136})
    package = build_generated(spec)
    hf = hf_twin(spec)
    hf.save_pretrained(tmp_path / "hf")
    checkpoint, expected = {}, {}
    for name, tensor in load_file(tmp_path / "hf" / "model.safetensors").items():
        if tensor.ndim == 2 and "embed_tokens" not in name and "mlp.gate." not in name:
            quantized, scale_inv = quantize_fp8(tensor)
            checkpoint[name], checkpoint[f"{name}_scale_inv"] = quantized, scale_inv
            expected[name] = dequantize(quantized, scale_inv)
        else:
            checkpoint[name] = expected[name] = tensor
    assert checkpoint["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)
    save_file(checkpoint, tmp_path / "fp8.safetensors")

    model = package.build_model()
    package.load_hf_state_dict(model, tmp_path / "fp8.safetensors")
    loaded = package.hf_state_dict(model)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


def test_multi_token_prediction_layer_is_skipped(setup):
    package, hf, published = setup
    mtp = "model.layers.3."  # the spec has 3 layers; DeepSeek-V3 stores its MTP module after them
    checkpoint = dict(published)
    for name, tensor in published.items():
        if name.startswith("model.layers.2."):
            checkpoint[name.replace("model.layers.2.", mtp)] = tensor
    checkpoint[mtp + "eh_proj.weight"] = torch.randn(64, 128)
    checkpoint[mtp + "enorm.weight"] = torch.ones(64)
    checkpoint[mtp + "shared_head.head.weight"] = torch.randn(256, 64)
    checkpoint[mtp + "self_attn.q_b_proj.weight_scale_inv"] = torch.ones(1, 1)
    model = package.build_model()
    package.load_hf_state_dict(model, checkpoint)
    assert same_logits(model, hf, batch(256))


def _mis_shaped(sd):
    sd["model.layers.1.self_attn.q_b_proj.weight"] = sd["model.layers.1.self_attn.q_b_proj.weight"][:-1]
    return "model.layers.1.self_attn.q_b_proj.weight: expected shape (96, 32), found (95, 32)"


def _missing(sd):
    del sd["model.layers.2.self_attn.kv_a_layernorm.weight"]
    return "missing key model.layers.2.self_attn.kv_a_layernorm.weight"


def _missing_expert(sd):
    del sd["model.layers.2.mlp.experts.5.down_proj.weight"]
    return "missing key model.layers.2.mlp.experts.5.down_proj.weight"


def _unexpected(sd):
    sd["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(32, 64)  # layer 0 is dense
    return "unexpected key model.layers.0.mlp.experts.0.gate_proj.weight with shape (32, 64)"


def _expert_out_of_range(sd):
    sd["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.zeros(32, 64)
    return "unexpected key model.layers.1.mlp.experts.8.up_proj.weight"


def _fused_mis_shaped(sd):
    for j in range(8):
        for proj in ("gate_proj", "up_proj"):
            del sd[f"model.layers.1.mlp.experts.{j}.{proj}.weight"]
    sd["model.layers.1.mlp.experts.gate_up_proj"] = torch.zeros(8, 64, 63)
    return "model.layers.1.mlp.experts.gate_up_proj: expected shape (8, 64, 64), found (8, 64, 63)"


def _bad_block_scales(sd):
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = sd[name].to(torch.float8_e4m3fn)
    sd[f"{name}_scale_inv"] = torch.ones(2, 1)
    return f"{name}_scale_inv: expected shape (1, 1), found (2, 1)"


def _fp8_without_scales(sd):
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = sd[name].to(torch.float8_e4m3fn)
    return f"{name}: FP8 tensor without {name}_scale_inv"


@pytest.mark.parametrize("corrupt", [_mis_shaped, _missing, _missing_expert, _unexpected, _expert_out_of_range,
                                     _fused_mis_shaped, _bad_block_scales, _fp8_without_scales])
def test_checkpoint_errors_name_the_key(setup, corrupt):
    package, _, published = setup
    checkpoint = dict(published)
    message = corrupt(checkpoint)
    model = package.build_model()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        package.load_hf_state_dict(model, checkpoint)
    assert isinstance(err.value, ValueError)
    assert message in str(err.value)
    assert str(err.value).count("\n") == 1  # nothing else is reported
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed by a failed load"


def test_round_trip_through_transformers(setup, tmp_path):
    package, hf, published = setup
    torch.manual_seed(3)
    model = package.build_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.2, 0.2)
    exported = package.hf_state_dict(model)
    assert exported.keys() == published.keys()

    folder = tmp_path / "exported"
    hf.config.save_pretrained(folder)
    save_file(exported, folder / "model.safetensors")
    from transformers import DeepseekV3ForCausalLM

    reloaded = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager")
    assert same_logits(model, reloaded, batch(256, seed=1))

    again = package.build_model()
    package.load_hf_state_dict(again, folder)
    for (name, tensor), copy in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(tensor, copy), name


def test_adapter_tensors_are_left_out(setup):
    package, _, published = setup

    class LoraLinear(torch.nn.Module):
        """Stands for an adapter wrapper: the base weight stays `.weight`, the adapter's own tensors are `lora_*`."""

        def __init__(self, base: torch.nn.Linear, rank: int = 4):
            super().__init__()
            self.weight = base.weight
            self.lora_A = torch.nn.Parameter(torch.randn(rank, base.in_features))
            self.lora_B = torch.nn.Parameter(torch.randn(base.out_features, rank))

        def forward(self, x):
            return x @ (self.weight + self.lora_B @ self.lora_A).T

    model = package.build_model()
    attn = model.model.layers[1].self_attn
    attn.o_proj = LoraLinear(attn.o_proj)
    package.load_hf_state_dict(model, published)
    assert torch.equal(attn.o_proj.weight, published["model.layers.1.self_attn.o_proj.weight"])
    assert package.hf_state_dict(model).keys() == published.keys()


def test_qk_scale_is_folded_into_query_rows(build_generated, hf_twin, hf_max_logits, tmp_path):
    # adapters on o_proj only: the query and key weights are frozen, so QK-Clip works through a logit scale
    spec = tiny_spec(**SPEC, adapter={"kind": "lora", "targets": [{"match": "attn.o"}]})
    package = build_generated(spec)
    assert {site.mode for site in package.QK_CLIP_SITES} == {"scale"}
    hf = hf_twin(spec)
    hf.save_pretrained(tmp_path / "hf")
    model = package.K2Model()
    package.load_hf_state_dict(model, tmp_path / "hf")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qk_scale.uniform_(0.3, 1.0)
    ids = batch(256, seed=2)
    with torch.no_grad():
        scaled, unscaled = model(ids).logits, hf(ids).logits
    assert relative_error(scaled, unscaled) > 1e-2  # the scales matter

    folder = tmp_path / "folded"
    hf.config.save_pretrained(folder)
    save_file(package.hf_state_dict(model), folder / "model.safetensors")
    from transformers import DeepseekV3ForCausalLM

    folded = DeepseekV3ForCausalLM.from_pretrained(folder, attn_implementation="eager")
    assert same_logits(model, folded, ids)
    torch.testing.assert_close(model.max_logits(), hf_max_logits(folded, ids), rtol=1e-5, atol=1e-5)

    package.load_hf_state_dict(model, folder)  # the scales are in the weights now
    assert all(torch.equal(layer.self_attn.qk_scale, torch.ones(4)) for layer in model.model.layers)
    assert same_logits(model, folded, ids)


def test_loads_into_a_bfloat16_model(setup, tmp_path):
    package, _, published = setup
    model = package.K2Model(dtype=torch.bfloat16)
    package.load_hf_state_dict(model, tmp_path / "hf")
    router = model.model.layers[1].mlp.gate
    assert router.weight.dtype == router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.weight, published["model.layers.1.mlp.gate.weight"])
    for name, tensor in package.hf_state_dict(model).items():
        assert torch.equal(tensor, published[name].to(tensor.dtype)), name
    assert model.model.layers[1].mlp.experts.up_proj.dtype == torch.bfloat16


def test_a_shard_of_rows_reads_its_fp8_blocks(tmp_path):
    """What a process of a sharded model reads of a block-scaled FP8 weight: its rows, dequantised by the block
    rows that cover them, as the whole weight would be (rows that start or end inside a block too)."""
    from k2c.runtime.checkpoint import Checkpoint
    from k2c.runtime.export import quantize_fp8

    weight, scale = quantize_fp8(torch.randn(300, 200, generator=torch.Generator().manual_seed(0)))
    save_file({"a.weight": weight, "a.weight_scale_inv": scale}, tmp_path / "fp8.safetensors")
    for checkpoint in (Checkpoint(tmp_path / "fp8.safetensors"), Checkpoint({"a.weight": weight,
                                                                            "a.weight_scale_inv": scale})):
        whole = checkpoint.get("a.weight")
        for rows in (range(100, 260), range(128, 256), range(255, 300), range(5, 6)):
            assert torch.equal(checkpoint.get("a.weight", rows), whole[rows.start : rows.stop]), rows
