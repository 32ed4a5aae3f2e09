"""Exported model folders load in transformers (and PEFT) and compute what the k2c model computes: a full model, a
merged CE-LoRA model, a base with its PEFT adapter, and FP8 weights; and `k2c export RUN_DIR -o DIR` on a run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from specs_for_tests import TINY, tiny_spec
from test_adapters_peft import with_trained_adapters

from conftest import subprocess_env
from k2c.runtime.checkpoint import FP8_BLOCK, dequantize_fp8, load_hf_state_dict
from k2c.runtime.export import ExportError

CE_LORA = {"kind": "ce_lora", "rank": 4, "alpha": 8.0, "svd_rank": 3,
           "targets": [{"match": "attn.q_b", "keep_ratio": 0.5}, {"match": "attn.o"},
                       {"match": "mlp.{gate,up,down}", "keep_ratio": 0.6},
                       {"match": "experts.{up,down}", "layers": "2", "keep_ratio": 0.5}]}


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).abs().max() / reference.abs().max()).item()


def model_and_ids(spec, build_generated, hf_twin):
    """A generated fp32 model with the twin's random weights (every part matters), and token ids."""
    package = build_generated(spec)
    model = package.build_model(dtype=torch.float32)
    package.load_hf_state_dict(model, hf_twin(spec).state_dict())
    ids = torch.randint(0, spec.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    return package, model, ids


def hf_logits(folder, ids, adapter=None):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits


def test_full_model_loads_in_transformers_with_the_same_logits(build_generated, hf_twin, tmp_path):
    package, model, ids = model_and_ids(tiny_spec(name="export_full"), build_generated, hf_twin)
    with torch.no_grad():
        ours = model.eval()(ids).logits
    notes = package.export_hf(model, tmp_path / "hf", max_shard_bytes=200_000)
    assert any("no tokenizer" in note for note in notes)
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert {"config.json", "model.safetensors.index.json"} <= set(files)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "quantization_config" not in config
    assert relative_error(hf_logits(tmp_path / "hf", ids), ours) < 1e-4

    with pytest.raises(ExportError, match="not empty"):
        package.export_hf(model, tmp_path / "hf")
    package.export_hf(model, tmp_path / "hf", force=True)  # one shard now: the earlier ones go
    assert sorted(p.name for p in (tmp_path / "hf").glob("model-*")) == ["model-00001-of-00001.safetensors"]


def test_ce_lora_merged_and_as_base_plus_peft_adapter(build_generated, hf_twin, tmp_path):
    package, model, ids = model_and_ids(tiny_spec(name="export_lora", adapter=CE_LORA), build_generated, hf_twin)
    model = with_trained_adapters(model, ids)
    with torch.no_grad():
        ours = model(ids).logits
    package.export_hf(model, tmp_path / "merged")
    assert any("lora_" in name for name, _ in model.named_parameters())  # the model itself keeps its adapters
    assert relative_error(hf_logits(tmp_path / "merged", ids), ours) < 1e-4

    package.export_hf(model, tmp_path / "peft", peft=True)
    base = hf_logits(tmp_path / "peft", ids)
    assert relative_error(base, ours) > 1e-2  # the adapters matter, so the folder holds the base alone
    assert relative_error(hf_logits(tmp_path / "peft", ids, tmp_path / "peft" / "adapter"), ours) < 1e-4


@pytest.mark.parametrize("hidden", [160, 256])
def test_fp8_blocks_dequantise_to_the_weights_and_load_back(build_generated, hf_twin, tmp_path, hidden):
    spec = tiny_spec(name="export_fp8", **{"model.hidden_size": hidden})  # 160 = 128 + 32: partial edge blocks
    package, model, ids = model_and_ids(spec, build_generated, hf_twin)
    notes = package.export_hf(model, tmp_path / "fp8", fp8=True)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    exact = package.hf_state_dict(model)
    index = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for file in set(index.values()):
        with safe_open(tmp_path / "fp8" / file, "pt") as f:
            stored.update({name: f.get_tensor(name) for name in f.keys()})
    quantized = [name for name, t in stored.items() if t.dtype == torch.float8_e4m3fn]
    assert "model.layers.0.self_attn.q_a_proj.weight" in quantized
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in quantized
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.mlp.gate.weight"):
        assert stored[name].dtype == torch.float32 and f"{name}_scale_inv" not in stored
    for name in quantized:
        w, scale = exact[name].float(), stored[f"{name}_scale_inv"]
        assert scale.shape == tuple(-(-n // FP8_BLOCK) for n in w.shape)
        block_scale = dequantize_fp8(torch.ones_like(w), scale)
        # e4m3: 3 mantissa bits (half a unit: 2^-4 relative), subnormals in steps of 2^-9 of the block's scale
        error = (dequantize_fp8(stored[name], scale) - w).abs()
        assert (error <= w.abs() * 2.0**-4 + block_scale * 2.0**-10).all(), name

    ragged = [name for name in quantized if any(n > FP8_BLOCK and n % FP8_BLOCK for n in stored[name].shape)]
    warned = [note for note in notes if "not a multiple of it" in note]
    assert bool(ragged) == (hidden % FP8_BLOCK != 0)
    assert len(warned) == (1 if ragged else 0)
    assert all(note.startswith(f"{len(ragged)} FP8 weights") for note in warned)

    back = package.build_model(dtype=torch.float32)
    load_hf_state_dict(back, tmp_path / "fp8")
    for name, tensor in package.hf_state_dict(back).items():
        expected = dequantize_fp8(stored[name], stored[f"{name}_scale_inv"]) if name in quantized else stored[name]
        assert torch.equal(tensor, expected), name
    if hidden % FP8_BLOCK == 0:
        # transformers (dequantising off a GPU) takes its block size as rows / scale rows, so it reads only
        # weights whose dimensions are multiples of 128 or at most 128, as in every published checkpoint;
        # k2c's partial edge blocks are DeepSeek's (ceil-divided grid), which its own loader reads
        with torch.no_grad():
            ours = back.eval()(ids).logits
        assert relative_error(hf_logits(tmp_path / "fp8", ids), ours) < 1e-4


def k2c(*args, cwd):
    return subprocess.run([sys.executable, "-m", "k2c.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=subprocess_env())


def test_k2c_export_a_trained_run(tmp_path):
    doc = {**TINY, "name": "export_cli", "training": {**TINY["training"], "batch_size": 2, "steps": 2}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(doc))
    trained = k2c("train", "spec.yaml", "--steps", "2", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    run_dir = tmp_path / "runs" / "export_cli" / "1"

    done = k2c("export", run_dir, "-o", "hf", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no tokenizer" in done.stderr and "exported" in done.stdout
    from conftest import import_generated
    from k2c.runtime.train import read_checkpoint

    package = import_generated(tmp_path / "generated" / "export_cli")
    model = package.build_model()
    model.load_state_dict(read_checkpoint(run_dir / "checkpoint.pt")["model"])
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids).logits
    assert relative_error(hf_logits(tmp_path / "hf", ids), ours) < 1e-4

    for args, message in [
        (("runs/export_cli/9", "-o", "other"), "no run folder runs/export_cli/9"),
        ((run_dir, "-o", "hf"), "is not empty"),
        ((run_dir, "-o", "other", "--peft"), "no adapters"),
        ((run_dir, "-o", "other", "--shard-size", "lots"), "--shard-size"),
    ]:
        failed = k2c("export", *args, cwd=tmp_path)
        assert failed.returncode == 2
        assert failed.stderr.count("\n") == 1 and message in failed.stderr, failed.stderr
    assert not (tmp_path / "other").exists()
