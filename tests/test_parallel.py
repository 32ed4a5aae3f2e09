"""Training over several CPU processes (gloo): FSDP2, expert parallelism and both, against one process on the
whole batch. The processes are started with torchrun's environment, as `k2c train --nproc-per-node` starts them,
and the runtime builds the mesh from the spec's parallel section."""

import contextlib
import json
import os
import re
import weakref
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import become_rank, free_port, import_generated
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pydantic import ValidationError

from k2c.runtime import parallel
from k2c.runtime import train as runtime_train
from k2c.runtime.export import export_hf, pieces
from k2c.runtime.mesh import LayoutError, mesh_shape
from k2c.runtime.plan import ParallelPlan
from specs_for_tests import tiny_spec

MODEL = {
    "vocab_size": 256,
    "hidden_size": 32,
    "layers": 3,
    "dense_layers": 1,
    "attention": {"heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                  "qk_rope_head_dim": 8, "v_head_dim": 8},
    "dense_mlp": {"intermediate_size": 64},
    "moe": {"routed_experts": 4, "shared_experts": 1, "experts_per_token": 2, "expert_intermediate_size": 16},
}
STEPS = 20


def build(build_generated, **overrides):
    """The tiny MoE with MuonClip at a high lr and a tau low enough that QK-Clip acts on most steps whatever the
    initial values: the max logits start near it (at 0.05 it acted on none with some draws)."""
    return build_generated(tiny_spec(**{
        "model": MODEL, "training.seq_len": 16, "training.batch_size": 8, "training.steps": STEPS,
        "training.log_every": 1, "training.eval_every": 10, "optimizer.lr": 1e-2,
        "optimizer.schedule": {"decay": "constant"}, "optimizer.qk_clip": {"enabled": True, "tau": 0.03},
        **overrides,
    }))


def test_the_plan_records_the_mesh_and_the_recomputed_layers(build_generated):
    plan = build(build_generated, parallel={"expert": 2, "data_shard": 2, "activation_checkpoint": ["dense"],
                                            "reduce_dtype": "bfloat16"}).PLAN
    assert plan.parallel == ParallelPlan(data_shard=2, expert=2, reduce_dtype="bfloat16", recompute_layers=(0,))
    assert [layer.mlp.expert_shards for layer in plan.model.layers[1:]] == [2, 2]


def test_ce_lora_resumes_its_kept_channels_on_another_mesh(build_generated, tmp_path):
    """The kept channels and the refresh position travel in the sharded checkpoint (an expert column's as a piece
    of all experts): 2 processes to step 8, then 4 to the end, are the uninterrupted single process's run."""
    ce_lora = {"kind": "ce_lora", "rank": 4, "alpha": 8.0, "svd_rank": 2, "refresh_every": 3,
               "targets": [{"match": "attn.{kv_b,o}", "keep_ratio": 0.5},
                           {"match": "experts.{up,down}", "keep_ratio": 0.5}]}
    package = build(build_generated, parallel={"expert": 2}, adapter=ce_lora, **{"optimizer.lr": 1e-3})
    launch(package, tmp_path / "single", 1)
    run = tmp_path / "run"
    launch(package, run, 2, steps=8)
    launch(package, run, 4, steps=STEPS, resume=True)
    assert_same_run(metrics(tmp_path / "single"), metrics(run))


@pytest.mark.parametrize("layout,field,expected", [
    ({"expert": 3}, "parallel.expert", "a divisor of model.moe.routed_experts (4)"),
    ({"expert": 2, "data_shard": 3}, "parallel.data_shard", "a mesh of processes that splits training.batch_size"),
    ({"activation_checkpoint": ["moe", "moe"]}, "parallel.activation_checkpoint", "each layer kind once"),
])
def test_a_mesh_the_model_or_batch_cannot_take_is_a_spec_error(layout, field, expected):
    with pytest.raises(ValidationError) as err:
        tiny_spec(**{"model": MODEL, "training.batch_size": 8, "parallel": layout})
    assert field.split(".")[-1] in str(err.value) and expected in str(err.value)


def process(rank, world, package_dir, run_dir, port, steps, resume):
    become_rank(rank, world, port)
    runtime_train.run(import_generated(Path(package_dir)), Path(run_dir), steps=steps, resume=resume)


def launch(package, run_dir, world, steps=None, resume=False):
    if world == 1:
        with one_thread():
            runtime_train.run(package, run_dir, steps=steps, resume=resume)
        return
    mp.spawn(process, args=(world, str(Path(package.__file__).parent), str(run_dir), free_port(), steps, resume),
             nprocs=world, join=True)


@contextlib.contextmanager
def one_thread():
    """One thread, as each spawned process has: the single-process reference then sums in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(single, sharded, first_step=1):
    assert [r["step"] for r in sharded] == list(range(first_step, STEPS + 1))
    reference = {r["step"]: r for r in single}
    for r in sharded:
        a = reference[r["step"]]
        assert r["loss"] == pytest.approx(a["loss"], rel=1e-4), r["step"]
        # the norm of small gradients summed in another order: its last digits move first
        assert r["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), r["step"]
        assert r["clipped_heads"] == a["clipped_heads"], r["step"]
        assert r["max_logits"] == pytest.approx(a["max_logits"], rel=1e-4), r["step"]


def load_sharded(package, run_dir):
    """The model of a sharded checkpoint, read in one process as `k2c export` and `k2c generate` read it."""
    path = Path(run_dir) / "checkpoint.pt"
    model = package.build_model()
    runtime_train.load_model(path, runtime_train.read_checkpoint(path), model)
    return model


@pytest.mark.parametrize("world,overrides", [
    (2, {"parallel": {"activation_checkpoint": ["moe"]}}),  # FSDP2 over both processes, the MoE layers recomputed
    (2, {"parallel": {"expert": 2}}),  # each process holds half of every layer's experts
    (4, {"parallel": {"expert": 2, "data_shard": 2}}),  # FSDP2 x expert parallelism
    # FSDP2, the head the embedding's weight: one parameter sharded once, its gradient from both uses
    (2, {"parallel": {}, "model": {**MODEL, "tie_embeddings": True}}),
], ids=["fsdp", "expert", "fsdp_x_expert", "fsdp_tied"])
def test_sharded_runs_take_the_single_process_steps(build_generated, tmp_path, world, overrides):
    package = build(build_generated, **overrides)
    launch(package, tmp_path / "single", 1)
    single = metrics(tmp_path / "single")
    assert sum(r["clipped_heads"] for r in single) > 0  # QK-Clip took part
    launch(package, tmp_path / "sharded", world)
    assert_same_run(single, metrics(tmp_path / "sharded"))
    a = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["model"]
    model = load_sharded(package, tmp_path / "sharded")
    b = model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert_streamed_export(package, tmp_path / "sharded", model, tmp_path)


def assert_streamed_export(package, run_dir, model, tmp_path):
    """`k2c export` of a sharded run reads and writes the model a piece at a time (and a shard file, here a tenth of
    the model): its folder is that of the whole model loaded in one process."""
    state = runtime_train.read_checkpoint(Path(run_dir) / "checkpoint.pt")
    meta = package.build_model("meta")
    load = parallel.tensor_loader(Path(run_dir) / runtime_train.shards_of(state), meta)
    sizes = [sum(t.numel() * t.element_size() for t in piece.state_dict().values()) for _, piece in pieces(model)]
    size = sum(sizes)
    with PeakBytes() as memory:
        export_hf(meta, package.PLAN, tmp_path / "streamed", max_shard_bytes=size // 10, load=load)
    # a piece, its read buffers and its converted copy, and a shard file's worth: less than the model
    assert memory.peak < 3 * max(sizes) + size // 10 < size
    export_hf(model, package.PLAN, tmp_path / "whole", max_shard_bytes=size // 10)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == files and len(files) > 5
    for file in files:
        if file.endswith(".safetensors"):
            whole, streamed = load_file(tmp_path / "whole" / file), load_file(tmp_path / "streamed" / file)
            assert whole.keys() == streamed.keys() and all(torch.equal(whole[k], streamed[k]) for k in whole)
        else:
            assert (tmp_path / "whole" / file).read_text() == (tmp_path / "streamed" / file).read_text()


class PeakBytes(TorchDispatchMode):
    """The most bytes that tensors made under it held at once: a storage counts from the op that made it until it is
    freed (a DTensor's, its local shard's), but for a file mapped into memory (safetensors' tensors), which pages in
    only what is read."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted: set[int] = set()

    def free(self, key, nbytes):
        self.counted.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            t = t._local_tensor if isinstance(t, DTensor) else t
            if isinstance(t, torch.Tensor) and not t.is_meta and id(t.untyped_storage()) not in self.counted:
                storage = t.untyped_storage()
                nbytes = 0 if func is torch.ops.aten.set_.source_Storage else storage.nbytes()
                self.counted.add(id(storage))
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self.free, id(storage), nbytes)
        return out


def build_process(rank, world, package_dirs, out_dir, port):
    """Build each package's model as `k2c train` does; write its tensors (gathered, on rank 0) and this process's
    peak memory while building."""
    become_rank(rank, world, port)
    runtime_train.process_group(torch.device("cpu"))
    try:
        for i, package_dir in enumerate(package_dirs):
            package = import_generated(Path(package_dir))
            layout = parallel.layout(package.PLAN, "cpu")
            with PeakBytes() as memory:
                model = runtime_train.build_model(package, torch.device("cpu"), layout)
            tensors = parallel.checkpoint_tensors(model, None, layout)["model"]
            tensors = {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in tensors.items()}
            if rank == 0:
                torch.save(tensors, Path(out_dir) / f"{i}.pt")
            (Path(out_dir) / f"{i}-{rank}.peak").write_text(str(memory.peak))
    finally:
        runtime_train.leave_process_group()


def fused_experts(published: dict) -> dict:
    """Published tensors with each layer's experts in transformers 5.x's fused layout: gate_up_proj [E, 2I, H]."""
    out, stacks = {}, {}
    for name, t in published.items():
        if m := re.fullmatch(r"(.+\.mlp\.experts)\.\d+\.(\w+)\.weight", name):
            stacks.setdefault(m[1], {}).setdefault(m[2], []).append(t)  # in expert order
        else:
            out[name] = t
    for prefix, p in stacks.items():
        out[f"{prefix}.gate_up_proj"] = torch.cat([torch.stack(p["gate_proj"]), torch.stack(p["up_proj"])], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack(p["down_proj"])
    return out


@pytest.mark.parametrize("world,layout,published", [
    (2, {"expert": 2}, "fp8"),  # published per expert, FP8 with block scales
    (4, {"expert": 2, "data_shard": 2}, "fused"),
], ids=["expert_fp8", "fsdp_x_expert_fused"])
def test_a_sharded_build_draws_and_reads_only_its_shards(build_generated, tmp_path, world, layout, published):
    """Each process allocates, draws and reads only its shards (and one whole tensor at a time), not the model, and
    the values are the single process's: drawn from the seed, LoRA adapters too, or read from training.init_from."""
    lora = {"kind": "lora", "rank": 4, "alpha": 8.0, "targets": [{"match": "attn.o"}, {"match": "experts.up"}]}
    source = build(build_generated)
    torch.manual_seed(1)
    base = source.build_model()
    if published == "fp8":
        source.export_hf(base, tmp_path / "base", fp8=True)
    else:
        (tmp_path / "base").mkdir()
        save_file({k: v.contiguous() for k, v in fused_experts(source.hf_state_dict(base)).items()},
                  tmp_path / "base" / "model.safetensors")
    packages = [build(build_generated, parallel=layout, adapter=lora),
                build(build_generated, parallel=layout, adapter=lora, **{"training.init_from": str(tmp_path / "base")})]
    mp.spawn(build_process, args=(world, [str(Path(p.__file__).parent) for p in packages], str(tmp_path),
                                  free_port()), nprocs=world, join=True)
    for i, package in enumerate(packages):
        sizes, peaks = built_alike(package, tmp_path, i, world)
        # the old whole-model build peaked above sum(sizes)
        assert all(peak < sum(sizes.values()) / world + 2 * max(sizes.values()) for peak in peaks), peaks


def built_alike(package, out_dir, i, world) -> tuple[dict[str, int], list[int]]:
    """Check that the tensors build_process gathered of package i are those of a single process's build; their
    sizes in bytes by name, and each process's peak memory while building."""
    single = runtime_train.build_model(package, torch.device("cpu")).state_dict()
    sharded = torch.load(out_dir / f"{i}.pt", weights_only=True)
    assert sharded.keys() == single.keys()
    for name, tensor in single.items():
        assert torch.equal(sharded[name], tensor), name
    sizes = {name: t.numel() * t.element_size() for name, t in single.items()}
    return sizes, [int((out_dir / f"{i}-{rank}.peak").read_text()) for rank in range(world)]


def test_a_sharded_build_draws_only_the_rows_of_its_shards(build_generated, tmp_path):
    """A dense parameter is drawn in blocks of rows (k2c.runtime.model.SeededInit), and each process draws those
    that its shard overlaps alone, the values still the single process's (blocks of 32768 rows here: the shards'
    edge, row 100000, falls inside one).
    The embedding and the head are most of this model: a process that drew one whole before cutting its shard
    held all of it at once, past its share of the model plus half the embedding."""
    package = build(build_generated, model={**MODEL, "vocab_size": 200_000}, parallel={})
    mp.spawn(build_process, args=(2, [str(Path(package.__file__).parent)], str(tmp_path), free_port()), nprocs=2,
             join=True)
    sizes, peaks = built_alike(package, tmp_path, 0, 2)
    embedding = sizes["model.embed_tokens.weight"]
    assert 2 * embedding > 0.9 * sum(sizes.values())
    assert all(peak < sum(sizes.values()) / 2 + embedding / 2 for peak in peaks), (peaks, sum(sizes.values()))


def test_lora_trains_alike_when_sharded(build_generated, tmp_path):
    lora = {"kind": "lora", "rank": 4, "alpha": 8.0, "targets": [{"match": "attn.kv_b"}, {"match": "attn.o"},
                                                                  {"match": "experts.{up,down}"}]}
    # a tenth of the lr: the adapters' small gradients amplify rounding faster, and this test is about sharding
    package = build(build_generated, parallel={"expert": 2, "data_shard": 2}, adapter=lora, **{"optimizer.lr": 1e-3})
    launch(package, tmp_path / "single", 1)
    launch(package, tmp_path / "sharded", 4)
    assert_same_run(metrics(tmp_path / "single"), metrics(tmp_path / "sharded"))


def test_resume_on_other_meshes_continues_the_run(build_generated, tmp_path):
    """2 processes to step 8, then 4 processes (FSDP2 x experts) to 14, then one process to the end: the losses
    are those of the uninterrupted single-process run."""
    package = build(build_generated, parallel={"expert": 2})
    launch(package, tmp_path / "single", 1)
    run = tmp_path / "run"
    launch(package, run, 2, steps=8)
    launch(package, run, 4, steps=14, resume=True)
    launch(package, run, 1, steps=STEPS, resume=True)
    assert_same_run(metrics(tmp_path / "single"), metrics(run))
    assert len(list(run.glob("*.shards"))) == 0  # the single process's checkpoint replaced the sharded one


@pytest.mark.parametrize("layout,world,message", [
    ({"expert": 4}, 2, "parallel.expert: expected a divisor of the launch's 2 processes, found 4"),
    ({"data_shard": 4}, 2, r"parallel.data_shard: expected 2 \(the launch's 2 processes / parallel.expert 1\), "
                           "found 4"),
    ({"expert": 2}, 16, "training.batch_size: expected a multiple of the launch's 16 processes, found 8"),
], ids=["expert", "data_shard", "batch"])
def test_a_launch_that_does_not_fit_the_mesh_is_an_error(build_generated, layout, world, message):
    package = build(build_generated, parallel=layout)
    with pytest.raises(LayoutError, match=message):
        mesh_shape(package.PLAN, world)


@pytest.mark.parametrize("world,layout", [(2, {}), (4, {"expert": 2, "data_shard": 2})],
                         ids=["fsdp", "fsdp_x_expert"])
def test_ce_lora_chooses_the_channels_of_the_whole_batch_when_sharded(build_generated, tmp_path, world, layout):
    """The kept channels come from the gradients of all processes' tokens and refresh on the same steps, so the
    run is the single process's."""
    ce_lora = {"kind": "ce_lora", "rank": 4, "alpha": 8.0, "svd_rank": 2, "refresh_every": 3,
               "targets": [{"match": "attn.{kv_b,o}", "keep_ratio": 0.5},
                           {"match": "experts.{up,down}", "keep_ratio": 0.5}]}
    package = build(build_generated, parallel=layout, adapter=ce_lora, **{"optimizer.lr": 1e-3})
    launch(package, tmp_path / "single", 1)
    launch(package, tmp_path / "sharded", world)
    assert_same_run(metrics(tmp_path / "single"), metrics(tmp_path / "sharded"))


def doomed_process(rank, world, package_dir, run_dir, port, report):
    """A rank of a 2-process run; rank 1 dies as it reads its 4th batch (all of a step's micro-batches at once: step
    4, after the checkpoint of step 3)."""
    become_rank(rank, world, port, K2C_DIST_TIMEOUT_MINUTES="1")
    draws, windows = [], runtime_train.windows

    def window(*args):
        draws.append(1)
        if rank == 1 and len(draws) == 4:
            os._exit(3)
        return windows(*args)

    runtime_train.windows = window
    try:
        runtime_train.run(import_generated(Path(package_dir)), Path(run_dir))
    except runtime_train.TrainError as err:
        Path(report).write_text(str(err))


def test_a_lost_process_stops_the_others_with_a_message_and_the_checkpoint_resumes(build_generated, tmp_path):
    package = build(build_generated, **{"training.steps": 6, "training.checkpoint_every": 3,
                                        "training.grad_accum": 2, "training.eval_every": 100})
    args = (2, str(Path(package.__file__).parent), str(tmp_path / "run"), free_port(), str(tmp_path / "report"))
    context = mp.get_context("spawn")
    ranks = [context.Process(target=doomed_process, args=(rank, *args)) for rank in range(2)]
    for r in ranks:
        r.start()
    for r in ranks:
        r.join(timeout=120)
    assert [r.exitcode for r in ranks] == [0, 3]
    message = (tmp_path / "report").read_text()
    assert message.startswith("a process of the run stopped at step 4") and "checkpoint of step 3" in message, message
    launch(package, tmp_path / "single", 1)
    launch(package, tmp_path / "run", 2, resume=True)
    single = metrics(tmp_path / "single")
    resumed = metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(single, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
