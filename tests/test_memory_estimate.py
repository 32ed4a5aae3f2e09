"""k2c.runtime.memory against what a built model really holds: its parameters, gradients, optimizer state and
buffers after a step, and the tensors autograd keeps during a forward, on the torch path here and on the Triton
kernels (under the interpreter, in a child process); the sharded terms over 2 and 4 processes; and the layouts that
do not fit."""

from __future__ import annotations

import json
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftest import REPO, subprocess_env
from k2c.cli import main
from k2c.codegen import build_package, compile_spec
from k2c.codegen.lower import lower
from k2c.runtime import memory
from k2c.runtime.mesh import LayoutError
from specs_for_tests import tiny_spec

TINY = REPO / "specs" / "k2-tiny.yaml"
# CE-LoRA on some linears and on the experts, exact LoRA on another, so that the base is frozen and the clip acts
# through per-head scales; no dropout (on the CPU its mask is kept in the input's dtype, on CUDA as bools)
CE_LORA = {"adapter": {"kind": "ce_lora", "rank": 4, "alpha": 8.0, "svd_rank": 2,
                       "targets": [{"match": "attn.o", "keep_ratio": 0.5}, {"match": "experts.*", "keep_ratio": 0.5},
                                   {"match": "attn.q_b"}]}}


def plan_of(spec):
    return lower(compile_spec(spec))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of `model(ids, labels=ids)`, each storage once, the
    model's own parameters and buffers left out. Every tensor an op saves is wrapped on the way in; the wrappers
    still alive after the forward are those of the graph that the loss reaches."""

    class Saved:
        __slots__ = ("tensor", "__weakref__")

    wrappers = []

    def pack(tensor: torch.Tensor) -> Saved:
        saved = Saved()
        saved.tensor = tensor
        wrappers.append(weakref.ref(saved))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        loss = model(ids, labels=ids).loss
    own = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    storages = {}
    for ref in wrappers:
        saved = ref()
        if saved is not None and saved.tensor.untyped_storage()._cdata not in own:
            storage = saved.tensor.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
    del loss
    return sum(storages.values())


def token_ids(plan, sequences: int) -> torch.Tensor:
    return torch.randint(0, plan.model.vocab_size, (sequences, plan.training.seq_len),
                         generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", [{}, {"training.dtype": "bfloat16"}, CE_LORA], ids=["fp32", "bf16", "ce_lora"])
def test_parameters_gradients_optimizer_state_and_buffers_are_the_built_model_s(build_generated, case):
    spec = tiny_spec(**{"training.batch_size": 2, **case})
    plan = plan_of(spec)
    g = build_generated(spec)
    torch.manual_seed(0)
    model = g.build_model(dtype=getattr(torch, plan.training.dtype))
    opt = g.build_optimizer(model)
    model(token_ids(plan, 2), labels=token_ids(plan, 2)).loss.backward()
    opt.step()

    params = memory.parameters(plan)
    assert {p.name: p.shape for p in params} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    kinds = {id(p): group["kind"] for group in opt.param_groups for p in group["params"]}
    assert {p.name: p.optimizer for p in params} == {n: kinds.get(id(p)) for n, p in model.named_parameters()}

    est = memory.estimate(plan, 1)
    assert est.weights == nbytes(model.parameters())
    assert est.gradients == nbytes(p.grad for p in model.parameters() if p.grad is not None)
    assert est.optimizer == nbytes(v for state in opt.state.values() if isinstance(state, dict)
                                   for v in state.values() if torch.is_tensor(v))
    # router biases and loads, max logits, QK-Clip's scales; CE-LoRA's SVD pairs and kept rows, made by the backward
    assert est.buffers == nbytes(model.buffers())


def with_recompute(model, layers) -> None:
    """Checkpoint `layers` of the model as parallel.shard does, in the reentrant form whose saved input the hooks
    see: the layer keeps its input and runs its forward again in the backward."""
    for i in layers:
        layer = model.model.layers[i]
        model.model.layers[i] = Recomputed(layer)


class Recomputed(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *inputs):
        return checkpoint(self.layer, *inputs, use_reentrant=True)


@pytest.mark.parametrize("case", [{}, {"training.dtype": "bfloat16"}, CE_LORA], ids=["fp32", "bf16", "ce_lora"])
def test_activations_on_the_torch_path_are_what_autograd_keeps(build_generated, case):
    spec = tiny_spec(**{"training.batch_size": 2, **case})
    plan = plan_of(spec)
    g = build_generated(spec)
    torch.manual_seed(0)
    model = g.build_model(dtype=getattr(torch, plan.training.dtype))
    measured = saved_bytes(model, token_ids(plan, 2))
    assert memory.activations(plan, memory.mesh(plan, 1), reference=True).total == pytest.approx(measured, rel=0.15)


def test_recomputed_layers_keep_only_their_input(build_generated):
    spec = tiny_spec(**{"training.batch_size": 2})
    recomputing = tiny_spec(**{"training.batch_size": 2, "parallel": {"activation_checkpoint": ["moe"]}})
    plan, plan_recomputing = plan_of(spec), plan_of(recomputing)
    assert plan_recomputing.parallel.recompute_layers == (1, 2)
    ids = token_ids(plan, 2)
    torch.manual_seed(0)
    full = saved_bytes(build_generated(spec).build_model(), ids)
    # the recomputing spec's own package: a recomputed layer takes its input summed (fuse_residual_norm)
    torch.manual_seed(0)
    model = build_generated(recomputing).build_model()
    with_recompute(model, plan_recomputing.parallel.recompute_layers)
    recomputed = saved_bytes(model, ids)

    est_full = memory.activations(plan, memory.mesh(plan, 1), reference=True).total
    est = memory.activations(plan_recomputing, memory.mesh(plan_recomputing, 1), reference=True)
    assert est.total == pytest.approx(recomputed, rel=0.15)
    assert est_full - est.total == pytest.approx(full - recomputed, rel=0.15)
    # what the backward rebuilds at a time: one MoE layer's activations, half of what the two layers dropped
    assert est.recompute == pytest.approx((full - recomputed) / 2, rel=0.15)


TRITON_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from test_memory_estimate import saved_bytes
from k2c.runtime.packages import import_package
g = import_package(sys.argv[1], "memory_triton")
torch.manual_seed(0)
model = g.build_model(dtype=getattr(torch, g.PLAN.training.dtype))
ids = torch.randint(0, g.CONFIG.vocab_size, (g.PLAN.training.batch_size, g.PLAN.training.seq_len))
print(saved_bytes(model, ids))
"""


def test_activations_on_the_triton_kernels_are_what_autograd_keeps(tmp_path):
    """The kernels' autograd Functions keep less than the torch path: what the estimate of a GPU run counts."""
    spec = tiny_spec(**{"model.layers": 2, "training.seq_len": 16, "training.batch_size": 2,
                        "training.dtype": "bfloat16"})
    build_package(spec, tmp_path / "pkg")
    r = subprocess.run([sys.executable, "-c", TRITON_RUN, str(tmp_path / "pkg"), str(REPO / "tests")],
                       capture_output=True, text=True, cwd=REPO,
                       env=subprocess_env(K2C_KERNELS="triton", TRITON_INTERPRET="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    plan = plan_of(spec)
    kernels = memory.activations(plan, memory.mesh(plan, 1)).total
    assert kernels == pytest.approx(int(r.stdout), rel=0.15)
    assert kernels < 0.8 * memory.activations(plan, memory.mesh(plan, 1), reference=True).total


@pytest.mark.parametrize(("world", "expert"), [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_sharded_terms_divide_over_the_processes(build_generated, world, expert):
    """Every dim-0 of the tiny spec divides by 4, so each process holds exactly 1/world of every parameter, its
    gradient and its optimizer state, except AdamW's step counts (scalars, on every process); a forward reads
    batch / world sequences."""
    spec = tiny_spec(**{"training.batch_size": 8})
    plan = plan_of(spec)
    g = build_generated(spec)
    torch.manual_seed(0)
    model = g.build_model()
    opt = g.build_optimizer(model)
    ids = token_ids(plan, 8)
    model(ids, labels=ids).loss.backward()
    opt.step()
    state = [v for s in opt.state.values() if isinstance(s, dict) for v in s.values() if torch.is_tensor(v)]
    scalars = nbytes(v for v in state if v.ndim == 0)

    sharded = plan_of(tiny_spec(**{"training.batch_size": 8, "parallel": {"expert": expert}}))
    est = memory.estimate(sharded, world, reference=True)
    assert (est.world, est.data_shard, est.expert, est.sequences) == (world, world // expert, expert, 8 // world)
    assert est.weights * world == nbytes(model.parameters())
    assert est.gradients * world == nbytes(p.grad for p in model.parameters())
    assert (est.optimizer - scalars) * world == nbytes(state) - scalars
    if expert == 1:  # each process's forward is the single process's on its share of the batch
        assert est.activations == pytest.approx(saved_bytes(model, ids[: 8 // world]), rel=0.15)


@pytest.mark.parametrize(("world", "parallel", "field"), [
    (3, {}, "training.batch_size"),  # 8 sequences over 3 processes
    (2, {"expert": 4}, "parallel.expert"),  # 4 does not divide 2
    (8, {"expert": 2, "data_shard": 2}, "parallel.data_shard"),  # a mesh of 4, not 8
    (0, {}, "--world"),
])
def test_a_world_that_does_not_fit_the_mesh_is_an_error_at_its_field(world, parallel, field):
    plan = plan_of(tiny_spec(**{"training.batch_size": 8, "parallel": parallel}))
    with pytest.raises(LayoutError) as err:
        memory.estimate(plan, world)
    assert err.value.field == field and str(world) in err.value.reason


def test_inspect_shows_the_estimate(capsys, tmp_path):
    assert main(["inspect", str(TINY), "--world", "4"]) == 0
    text = capsys.readouterr().out
    assert "Memory per device: 4 processes (data_shard 4 x expert 1), 4 x 128 tokens per forward" in text
    assert "fits an H200" in text
    assert main(["inspect", str(TINY), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["memory"]["world"] == 1 and report["memory"]["total"] == max(
        report["memory"]["backward_peak"], report["memory"]["step_peak"])
    assert main(["inspect", str(TINY), "--world", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: --world 3: training.batch_size: ")
    # without --world: the fewest processes the spec's mesh takes
    split = tmp_path / "split.yaml"
    split.write_text(TINY.read_text() + "parallel:\n  expert: 2\n")
    assert main(["inspect", str(split)]) == 0
    assert "Memory per device: 2 processes (data_shard 1 x expert 2), 8 x 128 tokens" in capsys.readouterr().out
