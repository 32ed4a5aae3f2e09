"""Lowering and emission: the plan carries the IR's facts, the IR's parameters are the built model's, the emitted
package is small, readable and refuses a runtime of another plan schema."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from conftest import REPO, import_generated, subprocess_env
from k2c.codegen import build_package, compile_spec
from k2c.codegen.lower import lower
from k2c.ir import OpKind
from k2c.runtime.plan import PLAN_SCHEMA
from k2c.spec import load_spec
from specs_for_tests import tiny_spec

SHIPPED = sorted((REPO / "specs").glob("*.yaml"))
TINY_VARIANTS = {
    "default": {},
    "q_proj": {"model.attention.q_lora_rank": None},
    "tied": {"model.tie_embeddings": True},
    "no_shared": {"model.moe.shared_experts": 0},
    "adapters": {"adapter": {"kind": "ce_lora", "targets": [{"match": "attn.o"}, {"match": "experts.up"}]}},
}


def ir_params(graph) -> dict[str, tuple[int, ...]]:
    return {p.name: p.shape for op in graph.ops() for p in op.params if not p.buffer}


def model_params(package) -> dict[str, tuple[int, ...]]:
    model = package.K2Model(device="meta")  # the bare model: adapters add parameters the IR does not own
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("spec_file", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_ir_parameters_are_the_shipped_models(spec_file):
    spec = load_spec(spec_file)
    package = import_generated(REPO / "generated" / spec.name)
    assert ir_params(compile_spec(spec)) == model_params(package)


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_ir_parameters_are_the_tiny_models(build_generated, variant):
    spec = tiny_spec(**TINY_VARIANTS[variant])
    assert ir_params(compile_spec(spec)) == model_params(build_generated(spec))


def test_latent_norms_take_their_own_eps():
    """Moonlight's rms_norm_eps is 1e-5, but its q/kv latent norms use the reference's default 1e-6."""
    spec = load_spec(REPO / "specs" / "moonlight-16b-a3b.yaml")
    assert spec.model.norm_eps == 1e-5
    graph = compile_spec(spec)
    assert graph.op("layers.0.attn.kv_a_norm")["eps"] == 1e-6
    attention = lower(graph).model.layers[0].attention
    assert (attention.kv_norm.eps, lower(graph).model.layers[0].attn_norm.eps) == (1e-6, 1e-5)


def test_plan_values_come_from_the_ops():
    graph = compile_spec(tiny_spec(adapter={"kind": "lora", "targets": [{"match": "attn.o"}]}))
    plan = lower(graph)
    core = graph.op("layers.1.attn.core")
    attention = plan.model.layers[1].attention
    assert attention.softmax_scale == core["softmax_scale"]
    assert attention.clip.mode == core["qk_clip"].mode == "scale"  # frozen q/k under an adapter
    router = graph.op("layers.1.router")
    assert plan.model.layers[1].mlp.router.bias_rate == router["bias_rate"] == 0.0
    assert [s.module for s in plan.adapter.sites if s.kind == "lora"] == [
        f"model.layers.{i}.self_attn.o_proj" for i in range(3)]
    kernels = {op.kind: op["kernel"] for op in graph.ops() if "kernel" in op}
    assert kernels[OpKind.RMSNORM] == plan.model.layers[1].attn_norm.kernel == "triton"
    assert OpKind.ROPE not in kernels  # the attention's kernels rotate q and k themselves
    assert kernels[OpKind.ATTENTION] == attention.kernel


@pytest.mark.parametrize("spec_file", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_generated_packages_stay_small(spec_file):
    folder = REPO / "generated" / load_spec(spec_file).name
    lines = sum(len(p.read_text().splitlines()) for p in folder.glob("*.py"))
    # 450: DeepSeek-V3's first three layers are dense, and two wirings: layer 0 reads the embedding, layers 1 and 2
    # add the terms the layer before hands on in their input norm
    assert lines < 450, f"{folder}: {lines} lines"


def test_layers_that_share_a_plan_share_one_class():
    text = (REPO / "generated" / "kimi_k2" / "model.py").read_text()
    assert "class Layer0(rt.DecoderLayer)" in text and "class Layers1To60(rt.DecoderLayer)" in text
    assert "LAYER_TYPES = (Layer0,) * 1 + (Layers1To60,) * 60" in text


def test_a_package_refuses_a_runtime_of_another_schema(tmp_path):
    build_package(tiny_spec(), tmp_path / "t_tiny")
    init = tmp_path / "t_tiny" / "__init__.py"
    init.write_text(init.read_text().replace(f"require_schema({PLAN_SCHEMA}, __name__)", "require_schema(0, __name__)"))
    code = "from k2c.runtime.packages import import_package; import_package(__import__('sys').argv[1])"
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t_tiny")], capture_output=True, text=True,
                       env=subprocess_env())
    assert r.returncode != 0
    assert (f"t_tiny was generated for plan schema 0, but the installed k2c runtime reads schema {PLAN_SCHEMA}; "
            "rebuild it with `k2c build` on its spec") in r.stderr


def test_generated_model_runs_the_plan(build_generated):
    g = build_generated(tiny_spec())
    model = g.build_model()
    ids = torch.randint(0, g.CONFIG.vocab_size, (2, 8))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 8, g.CONFIG.vocab_size) and torch.isfinite(out.loss)
    assert type(model.model.layers[0]).__name__ == "Layer0"
    assert type(model.model.layers[2]).__name__ == "Layers1To2"


def test_a_recomputed_layer_is_handed_its_input_summed(build_generated):
    """With the MoE layers recomputed (1 and 2 of 3), the adds before them stay in the layers that end with them;
    the model computes what the one that hands on the two terms everywhere computes."""
    fused = build_generated(tiny_spec())
    recomputing = build_generated(tiny_spec(parallel={"activation_checkpoint": ["moe"]}))
    models = []
    for g in (fused, recomputing):
        torch.manual_seed(0)
        models.append(g.build_model())
    params = [list(inspect.signature(type(layer).forward).parameters) for layer in models[1].model.layers]
    assert params == [["self", "x", "rope"], ["self", "x", "rope"], ["self", "x", "rope"]]
    assert [list(inspect.signature(type(layer).forward).parameters) for layer in models[0].model.layers][1:] == [
        ["self", "residual", "delta", "rope"]] * 2
    ids = torch.randint(0, fused.CONFIG.vocab_size, (2, 8))
    losses = [model(ids, labels=ids).loss for model in models]
    assert torch.equal(losses[0], losses[1])  # the torch path runs the same add and norm either way
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
