"""A training step never makes the host wait for the device, so that a CUDA graph can capture it whole.

`HostReads` is a TorchDispatchMode that records every operation that reads a tensor's value back to the host or
whose output's size depends on its values (which the host must learn): `.item()` and what calls it (`float(t)`,
`bool(t)`, `if t:`), `.tolist()` and `.numpy()` (which dispatch nothing, so they are patched while it records),
`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `bincount`, copies between the CPU and a device.

- The fused (Triton) path: one step of a small MoE model, forward, backward, gradient clipping, the MuonClip step
  (Muon's fused passes and Newton-Schulz, AdamW, QK-Clip, the router biases) and the scheduler, runs with nothing
  recorded; pre-training, and CE-LoRA on a step that is not a refresh step (the steps a graph replays). It runs
  under TRITON_INTERPRET=1 in a fresh process (Triton reads it at import; `python tests/test_step_sync_free.py
  check_fused_step ce_lora` runs one by hand). The steps before it, which make the optimizer's state and CE-LoRA's
  factors, run on the torch path: the interpreter takes seconds a step, and first steps are never captured.
  The recorder's own check: the same mode records a deliberate `.item()` and `.tolist()`.
- The learning rate reaches the step through its tensor, which a scheduler fills in place: a replayed graph reads
  the new value. `RefreshSteps` says exactly which steps CE-LoRA refreshes in, and counts a skipped (replayed)
  step as the step itself would. The host checks the losses it reads back, naming the first step that diverged.
- On a GPU only: the CUDA graph step against the eager step, and the eager step under CUDA's sync debug mode.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import subprocess_env
from specs_for_tests import tiny_spec

aten = torch.ops.aten
# operations that make the host wait for values on the device
READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select,
         aten.unique_consecutive, aten._unique2, aten.unique_dim, aten.bincount}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

SMALL = {"model.hidden_size": 32, "model.layers": 2, "training.seq_len": 16, "training.batch_size": 2,
         "optimizer.muon.ns_steps": 1}  # one Newton-Schulz step: the interpreter takes seconds for each
# CE-LoRA on the fused LoRA kernel and in the grouped expert kernels, exact LoRA beside it; layer 0's q_a reads
# the frozen embedding, so no gradient flows into its input: its site never counts a backward pass
CE_LORA = {"kind": "ce_lora", "rank": 4, "alpha": 8.0, "svd_rank": 2, "dropout": 0.1, "refresh_every": 3,
           "targets": [{"match": "attn.o", "keep_ratio": 0.5}, {"match": "experts.*", "keep_ratio": 0.5},
                       {"match": "attn.q_a", "keep_ratio": 0.5, "layers": "0"}, {"match": "attn.q_b"}]}
CASES = {"pretraining": {}, "ce_lora": {"adapter": CE_LORA}}


def waits_for_device(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in READS:
        return True
    if func is aten.repeat_interleave.Tensor:  # sized by the sum of the repeats unless told the size
        return kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
    if packet in INDEXING:  # a boolean mask selects a number of elements only its values say
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if packet in (aten._to_copy, aten.copy_):  # between the host and a device, either way
        source = args[1] if packet is aten.copy_ else args[0]
        target = args[0].device if packet is aten.copy_ else kwargs.get("device") or source.device
        return (source.device.type == "cpu") != (torch.device(target).type == "cpu")
    return False


def where() -> str:
    """The innermost frame of k2c's (or of this file's) code on the stack."""
    frames = [f for f in traceback.extract_stack()[:-2] if "/k2c/" in f.filename or f.filename == __file__]
    return f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"


class HostReads(TorchDispatchMode):
    """Records (operation, where) for each operation that waits for the device, while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if waits_for_device(func, args, kwargs):
            self.found.append((str(func), where()))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):  # they read the values without dispatching an operation
            self._saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._recording(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _recording(self, name, original):
        def read(tensor, *args, **kwargs):
            self.found.append((f"Tensor.{name}", where()))
            return original(tensor, *args, **kwargs)

        return read


def build(case: str, out: Path, **overrides):
    from k2c.codegen import build_package
    from k2c.runtime.packages import import_package

    spec = tiny_spec(name=f"sync_{case}", **{**SMALL, **CASES[case], **overrides})
    build_package(spec, out / spec.name)
    return import_package(out / spec.name, f"sync_free_{case}_{os.getpid()}_{len(overrides)}")


def trainer(package, device="cpu"):
    """A package's model, optimizer, schedule and trainable parameters, from seed 0."""
    torch.manual_seed(0)
    model = package.build_model(device, torch.float32)
    model.train()
    opt = package.build_optimizer(model)
    return model, opt, package.build_scheduler(opt), [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- the fused path, in a fresh process


def check_fused_step(case: str) -> None:
    from k2c.runtime import ops
    from k2c.runtime.adapters import RefreshSteps
    from k2c.runtime.kernels.newton_schulz import INTERPRETED
    from k2c.runtime.train import training_step

    assert INTERPRETED, "run under TRITON_INTERPRET=1"
    with tempfile.TemporaryDirectory() as tmp:  # CE-LoRA: no refresh in the step recorded
        package = build(case, Path(tmp), **{"adapter": {**CE_LORA, "refresh_every": 100}} if case == "ce_lora" else {})
    model, opt, scheduler, params = trainer(package)
    ids = torch.randint(0, package.CONFIG.vocab_size, (1, 2, 16))  # [micro-batches, batch, seq]
    refresh = RefreshSteps(model)

    def step():
        values = training_step(model, opt, params, ids, ids, 1.0)
        scheduler.step()
        return values

    os.environ[ops.FORCE] = "torch"  # the first steps on the torch path: state, factors, passes measured, quickly
    for _ in range(2):
        refresh.run_eager(step)
    os.environ[ops.FORCE] = "triton"
    assert all(ops.use_triton(moe.plan.kernel, ids) for moe in model.moe_layers().values())
    assert not refresh.eager_due()  # a step that a CUDA graph would replay
    before = [p.detach().clone() for p in params]
    with HostReads() as reads:
        values = step()
    assert reads.found == [], "\n".join(f"{op} at {at}" for op, at in reads.found)
    assert math.isfinite(values["loss"].item()) and any(not torch.equal(b, p) for b, p in zip(before, params))

    with HostReads() as reads:  # the recorder sees what it must catch
        values["loss"].item()
        report = opt.last_report
    assert [op for op, _ in reads.found] == ["aten._local_scalar_dense.default"] * 3 + ["Tensor.tolist"], reads.found
    assert report["step"] == 3


@pytest.mark.parametrize("case", CASES)
def test_the_fused_step_never_waits_for_the_device(case):
    child = subprocess.run([sys.executable, __file__, "check_fused_step", case], capture_output=True, text=True,
                           timeout=300, env=subprocess_env(TRITON_INTERPRET="1"))
    assert child.returncode == 0, f"check_fused_step {case} failed:\n{child.stdout}{child.stderr[-5000:]}"


# --------------------------------------------------------------------------- in this process, on the torch path


def test_the_recorder_records_each_kind_of_read():
    x = torch.randn(6)
    tolist = torch.Tensor.tolist
    with HostReads() as reads:
        x.sum().item()
        bool(x[0] > 0)
        x.tolist()
        x[x > 0]
        x.nonzero()
        x.to("meta")  # from the host to a device
        x.mul(2).clamp(max=1.0)  # not a read
    assert [op for op, _ in reads.found] == [
        "aten._local_scalar_dense.default", "aten._local_scalar_dense.default", "Tensor.tolist",
        "aten.index.Tensor", "aten.nonzero.default", "aten._to_copy.default"]
    assert reads.found[0][1].startswith(f"{__file__}:")
    assert torch.Tensor.tolist is tolist  # put back


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    out = tmp_path_factory.mktemp("packages")
    return {case: build(case, out) for case in CASES}


def update(opt, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    before = weight.detach().clone()
    weight.grad = grad.clone()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return weight.detach() - before


@pytest.mark.parametrize("kind", ["muon", "adamw"])
def test_a_new_lr_reaches_the_next_update_through_the_same_tensor(packages, kind):
    """What a replayed graph sees: the step reads each group's lr tensor, which a torch scheduler (here a user's
    LambdaLR) fills in place, and into which a number put in the group by a user's code is copied."""
    package = packages["pretraining"]
    torch.manual_seed(0)
    opt = package.build_optimizer(package.build_model(dtype=torch.float32))
    group = next(g for g in opt.param_groups if g["kind"] == kind)
    lr = group["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float64 and lr.shape == ()
    factors = [1.0, 0.5, 0.25]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[min(step, len(factors) - 1)])
    weight = group["params"][0]
    grad = torch.randn_like(weight)
    sizes = []
    for factor in factors:
        assert group["lr"] is lr and lr.item() == package.PLAN.optimizer.lr * factor
        sizes.append(update(opt, weight, grad).norm().item())
        scheduler.step()
    # one gradient throughout: Muon's orthogonalised update, and AdamW's normalised one, have one size per unit of
    # lr (and the weight decay's share follows the lr too)
    assert sizes[1] == pytest.approx(sizes[0] * 0.5, rel=0.05)
    assert sizes[2] == pytest.approx(sizes[0] * 0.25, rel=0.05)
    group["lr"] = 0.0  # a user's own code
    assert update(opt, weight, grad).norm().item() == 0.0 and group["lr"] is lr and lr.item() == 0.0


def counting_selects(monkeypatch) -> list[int]:
    """How many kept-channel choices (over all sites) each step made: append 0 before each step."""
    from k2c.runtime.adapters import DoubleLoRA

    per_step: list[int] = []
    select = DoubleLoRA.select

    def counted(self, weight, channel_norm):
        per_step[-1] += 1
        return select(self, weight, channel_norm)

    monkeypatch.setattr(DoubleLoRA, "select", counted)
    return per_step


def test_refresh_steps_says_which_steps_refresh_and_counts_the_replayed_ones(packages, monkeypatch):
    """One model runs every step, as the loop would run a refresh step; a twin runs only the steps RefreshSteps
    sends to run eagerly and only counts the others, as after a replay. The steps it lets replay choose nothing,
    those it does not all choose channels, and both models' sites count alike throughout. Two micro-batches: two
    backward passes a step at every site but layer 0's q_a, whose input needs no gradient (none)."""
    from k2c.runtime.adapters import RefreshSteps
    from k2c.runtime.graph import capturable
    from k2c.runtime.train import training_step

    package = packages["ce_lora"]
    runs = [trainer(package) for _ in range(2)]
    ids = torch.randint(0, package.CONFIG.vocab_size, (2, 2, 16), generator=torch.Generator().manual_seed(0))
    stepping, counting = (RefreshSteps(model) for model, *_ in runs)
    selects = counting_selects(monkeypatch)
    eager = []
    for _ in range(9):
        due = stepping.eager_due()
        assert counting.eager_due() == due
        eager.append(due)
        selects.append(0)
        for refresh, (model, opt, scheduler, params) in zip((stepping, counting), runs):
            if refresh is stepping or due:
                refresh.run_eager(lambda: training_step(model, opt, params, ids, ids, 1.0))  # noqa: B023
                scheduler.step()
            else:
                refresh.replayed()
        assert (selects[-1] > 0) == due
        assert [d.backwards for d, _ in stepping.sites] == [d.backwards for d, _ in counting.sites]
    # S is chosen every 3 backward passes, 2 a step: in passes 0, 3, 6, 9, ... of steps 1, 2, 4, 5, 7, 8
    assert eager == [True, True, False, True, True, False, True, True, False]
    assert stepping.passes == [0, 2, 2, 2, 2, 2]  # q_a of layer 0, o of layers 0 and 1, gate, up, down of layer 1
    assert not capturable(runs[0][0], torch.device("cpu"), 1)


def test_a_diverged_loss_is_named_by_its_step():
    from k2c.runtime.train import TrainError, checked_losses

    assert checked_losses([(4, torch.tensor(2.5)), (5, torch.tensor(2.25))]) == [2.5, 2.25]
    with pytest.raises(TrainError, match=r"the loss is nan at step 6; try a lower optimizer.lr"):
        checked_losses([(5, torch.tensor(2.0)), (6, torch.tensor(math.nan)), (7, torch.tensor(math.inf))])


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_the_cuda_graph_step_is_the_eager_step(case):
    """`check_cuda_graph` in a fresh process whose kernels take their first config that runs, untimed
    (K2C_AUTOTUNE=first): graph and eager steps must agree under any config, and autotuning every kernel at the tiny
    spec's shapes kept one of the two cases running past five minutes on a fresh H200."""
    child = subprocess.run([sys.executable, __file__, "check_cuda_graph", case], capture_output=True, text=True,
                           timeout=600, env=subprocess_env(K2C_AUTOTUNE="first"))
    assert child.returncode == 0, f"check_cuda_graph {case} failed:\n{child.stdout}{child.stderr[-5000:]}"


def check_cuda_graph(case: str) -> None:
    """Fourteen steps through CudaGraphStep (warm-up, capture, replays; CE-LoRA's steps 1, 2, 7 and 13 eagerly) give
    the eager steps' losses, weights and report; and a warm eager step does not synchronise (CUDA's own sync debug
    mode). No dropout: that replays draw the eager steps' random numbers is not asked here."""
    from k2c.runtime.graph import CudaGraphStep, capturable
    from k2c.runtime.train import training_step

    ce_lora = {"adapter": {**CE_LORA, "refresh_every": 6, "dropout": 0.0}}
    with tempfile.TemporaryDirectory() as out:
        package = build(case, Path(out), **ce_lora if case == "ce_lora" else {})
    batches = torch.randint(0, package.CONFIG.vocab_size, (14, 1, 2, 16), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for graphed in (False, True):
        model, opt, scheduler, params = trainer(package, "cuda")
        assert capturable(model, torch.device("cuda"), 1)

        def eager(ids, labels, model=model, opt=opt, params=params):
            return training_step(model, opt, params, ids, labels, 1.0)

        step = CudaGraphStep(eager, model, opt) if graphed else eager
        losses = []
        for ids in batches:
            losses.append(step(ids, ids)["loss"])
            scheduler.step()
        results.append((torch.stack(losses), [p.detach().clone() for p in params], opt.last_report))
        if graphed:
            assert step.graph is not None  # it did capture, and replay
        else:
            torch.cuda.set_sync_debug_mode("error")
            try:
                eager(batches[0], batches[0])
            finally:
                torch.cuda.set_sync_debug_mode("default")
    (eager_losses, eager_weights, eager_report), (losses, weights, report) = results
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for got, want in zip(weights, eager_weights):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert report["step"] == eager_report["step"] == 14 and report["lr"] == eager_report["lr"]
    assert report["clipped_heads"] == eager_report["clipped_heads"]
    assert report["max_logits"] == pytest.approx(eager_report["max_logits"], rel=1e-5)


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per test process, as conftest sets for the workers
    sys.path.insert(0, str(Path(__file__).parent))
    globals()[sys.argv[1]](*sys.argv[2:])
