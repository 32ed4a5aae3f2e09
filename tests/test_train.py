"""The generated training loop: exact resume, crash-safe checkpoints, metrics and plot, and a loss that falls."""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import become_rank, free_port, import_generated, subprocess_env
from matplotlib.image import imread

from k2c.runtime import train as runtime_train
from specs_for_tests import tiny_spec

CORPUS = Path(__file__).resolve().parents[1] / "k2c" / "data" / "corpus.txt"

# a model small enough that a training step takes a fraction of a second on a laptop CPU
SMALL_MODEL = {
    "vocab_size": 256,
    "hidden_size": 32,
    "layers": 2,
    "dense_layers": 1,
    "attention": {"heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                  "qk_rope_head_dim": 8, "v_head_dim": 8},
    "dense_mlp": {"intermediate_size": 64},
    "moe": {"routed_experts": 4, "shared_experts": 1, "experts_per_token": 2, "expert_intermediate_size": 16},
}


def bound(package):
    """The training loop bound to one generated package: `.run(run_dir, ...)` and `.TrainError`."""
    return SimpleNamespace(run=functools.partial(runtime_train.run, package), TrainError=runtime_train.TrainError)


def trainer(build_generated, **overrides):
    """Build SMALL_MODEL with a high constant lr and these spec overrides; returns (package, its bound loop)."""
    package = build_generated(tiny_spec(**{
        "model": SMALL_MODEL, "training.seq_len": 32, "training.batch_size": 4, "training.log_every": 1,
        "optimizer.lr": 1e-2, "optimizer.schedule": {"decay": "constant"}, **overrides,
    }))
    return package, bound(package)


def interrupted_in_step(package, step):
    """package.build_optimizer, but its optimizer raises KeyboardInterrupt in step `step`, after that step's
    backward and before its update."""
    build_optimizer = package.build_optimizer

    def build(model):
        opt = build_optimizer(model)
        update, calls = opt.step, []

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == step:
                raise KeyboardInterrupt
            update(*args, **kwargs)

        opt.step = counted
        return opt

    return build


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def identical(a, b):
    """Equal to the bit, through nested dicts and lists of tensors."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(identical, a, b))
    return a == b


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def adapter(kind, keep_ratio=None):
    """Adapters on attention and expert matrices, with dropout so that resuming must restore torch's RNG."""
    return {"kind": kind, "rank": 4, "alpha": 8.0, "svd_rank": 2, "dropout": 0.1, "refresh_every": 3,
            "targets": [{"match": "attn.kv_b", "keep_ratio": keep_ratio}, {"match": "attn.o", "keep_ratio": keep_ratio},
                        {"match": "experts.{up,down}", "keep_ratio": keep_ratio}]}


RESUME_CASES = {
    "float32": {},
    "bfloat16": {"training.dtype": "bfloat16"},
    "lora": {"adapter": adapter("lora")},
    # the checkpoint falls between two choices of CE-LoRA's kept channels (4 backward passes, refresh every 3)
    "ce_lora": {"adapter": adapter("ce_lora", keep_ratio=0.5)},
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_is_bit_exact(build_generated, tmp_path, monkeypatch, case):
    package, train = trainer(build_generated, **{
        "training.steps": 6, "training.grad_accum": 2, "training.eval_every": 3, "training.checkpoint_every": 2,
        "optimizer.schedule": {"warmup_steps": 2, "decay": "cosine"},
        "optimizer.qk_clip": {"tau": 0.02},  # below the logits of a fresh model: QK-Clip keeps acting
        **RESUME_CASES[case],
    })
    train.run(tmp_path / "straight")
    # the clip must act after the checkpoint (step 2), so that what it did has to survive the resume
    assert any(r["clipped_heads"] > 0 for r in read_metrics(tmp_path / "straight") if r["step"] > 2)

    with monkeypatch.context() as m:
        m.setattr(package, "build_optimizer", interrupted_in_step(package, 4))
        with pytest.raises(KeyboardInterrupt):
            train.run(tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3]
    train.run(tmp_path / "resumed", resume=True)

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert without_timing(resumed) == without_timing(straight)  # losses, eval losses, lr, grad norms, max logits
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    assert identical(a["model"], b["model"])  # every parameter and buffer
    assert identical(a["optimizer"], b["optimizer"])


# One phase of a resume, in a child process of its own: "straight" trains the whole run, "interrupted" stops in step
# 4 (after the checkpoint of step 2), "resumed" continues that run.
RESUME_PHASE = """
import json, sys
from pathlib import Path
import test_train as T
from k2c.codegen import build_package
from k2c.runtime.packages import import_package
phase, work, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
build_package(T.tiny_spec(**overrides), work / f"pkg_{phase}")
package = import_package(work / f"pkg_{phase}", f"resume_{phase}")
if phase == "interrupted":
    package.build_optimizer = T.interrupted_in_step(package, 4)
    try:
        T.bound(package).run(work / "resumed")
    except KeyboardInterrupt:
        sys.exit(0)
    sys.exit("the run was not interrupted")
T.bound(package).run(work / phase, resume=phase == "resumed")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_resume_in_a_new_process_is_bit_exact_on_the_gpu(tmp_path):
    """On a GPU the kernels' configs are autotuned, and a config fixes the order of a sum: the resumed process must
    take the picks the first one cached (k2c.runtime.kernels.tuning), or its steps differ in the last bits. CE-LoRA
    in bf16, whose kept channels a last-bit difference can change."""
    overrides = {"training.steps": 6, "training.grad_accum": 2, "training.eval_every": 3, "training.log_every": 1,
                 "training.checkpoint_every": 2, "optimizer.qk_clip": {"tau": 0.02}, "training.dtype": "bfloat16",
                 **RESUME_CASES["ce_lora"]}
    env = subprocess_env(K2C_DEVICE="cuda", TRITON_CACHE_DIR=str(tmp_path / "triton"))
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).parent)
    for phase in ("straight", "interrupted", "resumed"):
        child = subprocess.run([sys.executable, "-c", RESUME_PHASE, phase, str(tmp_path), json.dumps(overrides)],
                               capture_output=True, text=True, env=env, timeout=900)
        assert child.returncode == 0, f"{phase}:\n{child.stdout}{child.stderr[-5000:]}"
    assert list((tmp_path / "triton").rglob("*.autotune.json")), "no autotune picks were cached"
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert without_timing(resumed) == without_timing(straight)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert identical(a["model"], b["model"]) and identical(a["optimizer"], b["optimizer"])


def test_a_checkpoint_write_cut_short_keeps_the_previous_one(build_generated, tmp_path, monkeypatch):
    _, train = trainer(build_generated, **{"training.steps": 4, "training.checkpoint_every": 2})
    real_save, saves = torch.save, []

    def disk_full_on_second_save(obj, f):
        saves.append(1)
        if len(saves) == 1:
            return real_save(obj, f)
        real_save(obj, tmp_path / "whole.pt")
        data = (tmp_path / "whole.pt").read_bytes()
        f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full_on_second_save)
        with pytest.raises(train.TrainError) as failure:
            train.run(run_dir)
    assert str(failure.value) == (f"cannot write {run_dir / 'checkpoint.pt'}: No space left on device; "
                                  "the checkpoint of step 2 is intact")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no temporary left
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 2
    with pytest.raises(train.TrainError, match="resume"):
        train.run(run_dir)  # a fresh run never overwrites a checkpoint

    summary = train.run(run_dir, resume=True)
    assert summary["steps"] == 4
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_training_step_clips_as_clip_grad_norm_does(build_generated):
    """The step applies the clip's factor as the optimizer reads each gradient: the weights after it must be those of
    torch's clip_grad_norm_ followed by a plain step, with a max_norm low enough that the clip acts."""
    package, _ = trainer(build_generated)
    ids = torch.randint(0, SMALL_MODEL["vocab_size"], (1, 4, 32))
    results = []
    for folded in (True, False):
        torch.manual_seed(3)
        model = package.build_model("cpu", torch.float32)
        opt = package.build_optimizer(model)
        params = [p for p in model.parameters() if p.requires_grad]
        for _ in range(2):  # the second step reads momenta and moments that the first one's clip shaped
            if folded:
                norm = runtime_train.training_step(model, opt, params, ids, ids, 0.05)["grad_norm"]
            else:
                model(ids[0], labels=ids[0]).loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
                opt.step()
                opt.zero_grad(set_to_none=True)
            assert norm > 0.5  # so the clip scales every gradient by 1/10 or less
        results.append({name: p.detach() for name, p in model.named_parameters()})
    for name, want in results[1].items():
        torch.testing.assert_close(results[0][name], want, rtol=1e-6, atol=1e-7, msg=name)


def test_metrics_follow_a_hand_computation(build_generated, tmp_path):
    package, train = trainer(build_generated, **{"training.steps": 10, "training.eval_every": 1, "training.seed": 7})
    config = package.PLAN.training
    summary = train.run(tmp_path / "run", steps=2)  # stops early: the spec asks for 10

    # step 1 redone by hand: the same init, the first batch of windows from a generator seeded with the seed
    data = torch.tensor(list(CORPUS.read_bytes()))
    train_bytes = data[: len(data) - int(len(data) * config.eval_fraction)]
    starts = torch.randint(len(train_bytes) - config.seq_len + 1, (1, config.batch_size),
                           generator=torch.Generator().manual_seed(7))[0]
    ids = torch.stack([train_bytes[s: s + config.seq_len] for s in starts.tolist()])
    torch.manual_seed(7)
    model = package.build_model("cpu", torch.float32)
    out = model(ids, labels=ids)
    targets = ids[:, 1:].flatten()
    plain_loss = -torch.log_softmax(out.logits[:, :-1].float(), -1).flatten(0, 1)[torch.arange(len(targets)), targets]
    out.loss.backward()
    grad_norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))

    records = read_metrics(tmp_path / "run")
    first = records[0]
    assert first["loss"] == pytest.approx(plain_loss.mean().item(), rel=1e-6)
    assert first["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    assert first["lr"] == package.PLAN.optimizer.lr
    assert first["max_logits"] == pytest.approx(model.max_logits().amax(dim=1).tolist(), rel=1e-6)
    assert first["clipped_heads"] == 0
    assert [r["step"] for r in records] == [1, 2]
    assert [sorted(r) for r in records] == [sorted(first)] * 2
    assert {"eval_loss", "tokens_per_s"} <= set(first)

    assert summary["loss"] == records[-1]["loss"] and summary["eval_loss"] == records[-1]["eval_loss"]
    image = imread(summary["plot"])
    assert summary["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 400 and image.shape[1] > 400


def test_loss_falls(build_generated, tmp_path):
    _, train = trainer(build_generated, **{"training.steps": 16, "training.batch_size": 8, "training.eval_every": 8})
    summary = train.run(tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    uniform = math.log(256)  # what a model that learned nothing scores on bytes
    assert records[0]["loss"] == pytest.approx(uniform, abs=0.1)
    assert summary["eval_loss"] < uniform - 1.5
    assert records[-1]["eval_loss"] < records[7]["eval_loss"] - 0.2


def test_fine_tuning_starts_from_init_from(build_generated, tmp_path):
    from safetensors.torch import save_file

    base, _ = trainer(build_generated)
    torch.manual_seed(7)
    published = {k: v.contiguous() for k, v in base.hf_state_dict(base.build_model()).items()}
    save_file(published, tmp_path / "base.safetensors")
    package, train = trainer(build_generated, **{
        "training.steps": 2, "training.init_from": str(tmp_path / "base.safetensors"),
        "adapter": adapter("ce_lora", 0.5),
    })
    train.run(tmp_path / "run")
    tuned = package.build_model()
    tuned.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"])
    after = package.hf_state_dict(tuned)
    # the frozen base is exactly the checkpoint it started from; only the adapters moved
    assert all(torch.equal(after[k], published[k]) for k in published)
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if n.endswith("lora_B"))


def test_unloadable_init_from_is_a_train_error(build_generated, tmp_path):
    _, train = trainer(build_generated, **{"training.steps": 1, "training.init_from": str(tmp_path / "none")})
    with pytest.raises(train.TrainError, match="training.init_from .* cannot be loaded"):
        train.run(tmp_path / "run")


def data_parallel_rank(rank, package_dir, run_dir, port):
    """One of two processes training the package together, started with torchrun's environment: the runtime
    starts the (gloo) process group itself and must leave it before it returns."""
    become_rank(rank, 2, port)
    package = import_generated(Path(package_dir))
    rows, windows = [], runtime_train.windows
    runtime_train.windows = lambda tokens, starts, seq_len: rows.append(len(starts)) or windows(tokens, starts,
                                                                                                seq_len)
    runtime_train.run(package, Path(run_dir))
    assert not dist.is_initialized()
    (Path(run_dir) / f"rows.{rank}").write_text(json.dumps(rows))


def test_two_data_parallel_processes_take_the_single_process_steps(build_generated, tmp_path):
    """Each rank takes half of every batch; averaged gradients make the same steps as one process on all of it."""
    package, train = trainer(build_generated, **{"training.steps": 3, "training.grad_accum": 2})
    train.run(tmp_path / "single")
    mp.spawn(data_parallel_rank, args=(str(Path(package.__file__).parent), str(tmp_path / "parallel"), free_port()),
             nprocs=2, join=True)
    for rank in range(2):  # 3 steps of 2 micro-batches of half the batch (one process takes 8 rows a step), then
        rows = json.loads((tmp_path / "parallel" / f"rows.{rank}").read_text())  # the held-out batches
        assert rows[:3] == [2 * 2] * 3 and set(rows[3:]) == {4}
    single, parallel = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "parallel")
    assert [r["step"] for r in parallel] == [1, 2, 3]
    for a, b in zip(single, parallel):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # the sharded checkpoint's tensors: tests/test_parallel.py
