"""The MoE kernels (k2c/runtime/kernels/moe.py) against the torch path of the model's MoE parts, under the interpreter.

Each check builds an MoE layer from its plan records and runs it twice in one process: with K2C_KERNELS=torch (the
reference: `Router.forward`'s torch ops, the per-expert split of `Experts.project` and `ExpertLoRAFunction`) and
with K2C_KERNELS=triton (the router kernel and the grouped kernels, on the CPU under TRITON_INTERPRET=1). It compares
the routing, the layer's output and every gradient: the input, the router weight, the combine weights, each expert
weight or, under adapters, each LoRA A and B; and that the Triton path never converts a tensor to a Python value
(on a GPU, a wait for the device). Both wirings run on the kernels: the generated per-op one (project,
swiglu, project, combine) and the fused `Experts.forward`, whose torch path must equal the per-op one bit for bit.

Shapes: N=37 tokens, H=32, E=6 experts, k=2, I=24, LoRA rank 4: the interpreter's 16-wide tiles are crossed in every
dim, experts own partial tiles. Loads: balanced, one expert that receives no token, and one expert that receives
every token. The interpreter is chosen when triton is imported, so the checks run in a fresh Python (this file as a
script); fp32 and fp16 only, since the interpreter's tl.dot on bf16 operands is wrong.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch

from kernel_checks import assert_close
from conftest import subprocess_env

N, H, E, K, INTER, RANK = 37, 32, 6, 2, 24, 4
LOADS = ("balanced", "empty", "skewed")




# --------------------------------------------------------------------------- building a layer


def moe_layer(groups: int, load: str, dtype: torch.dtype, normalize: bool = True, seed: int = 0):
    """An MoE layer (no shared experts) with random weights and a router bias that sets the load."""
    from k2c.runtime.model import MoE
    from k2c.runtime.plan import TRITON, MoEPlan, RouterPlan

    router = RouterPlan(hidden_size=H, experts=E, top_k=K, groups=groups, groups_per_token=1, normalize=normalize,
                        routed_scaling=2.5, bias_rate=1e-3)
    plan = MoEPlan(router=router, experts=E, hidden_size=H, intermediate_size=INTER, shared=None, kernel=TRITON)
    torch.manual_seed(seed)
    moe = MoE(plan, dtype=dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32) * p.shape[-1] ** -0.5)
        bias = moe.gate.e_score_correction_bias
        bias.uniform_(-0.2, 0.2)
        if load == "empty":
            bias[E - 1] = -100.0  # never chosen
        elif load == "skewed":
            bias[0] = 100.0  # chosen by every token: half of all rows
    return moe


def add_adapters(moe, kind: str, dropout: float = 0.0, names=("gate_proj", "up_proj", "down_proj"),
                 ce_names=("up_proj", "down_proj"), refresh_every: int = 1,
                 ranks: dict[str, int] | None = None) -> None:
    """LoRA on the named projections (random B, so that the adapters matter), CE-LoRA at keep 0.5 on ce_names; rank
    RANK, or ranks[name] (another rank gives the projection another scale, alpha / rank)."""
    from k2c.runtime.adapters import LoRAExperts
    from k2c.runtime.plan import AdapterPlan, AdapterSite

    moe.requires_grad_(False)
    moe.gate.weight.requires_grad_()  # still on the input's gradient path; checked too
    plan = AdapterPlan(kind=kind, rank=RANK, alpha=8.0, rslora=False, dropout=dropout, refresh_every=refresh_every,
                       sites=())
    experts = LoRAExperts.adapt(moe.experts)
    for name in names:
        ce = kind == "ce_lora" and name in ce_names
        rank = (ranks or {}).get(name, RANK)
        site = AdapterSite(module="mlp.experts", param=name, kind="ce_lora" if ce else "lora", rank=rank, alpha=8.0,
                           keep_ratio=0.5 if ce else 1.0, svd_rank=3 if ce else 0)
        experts.add_adapter(name, site, plan)
        with torch.no_grad():
            experts.adapter(name)[1].normal_(0, 0.3)


@contextlib.contextmanager
def no_host_reads(active: bool):
    """Tensor-to-Python conversions (a synchronisation on a GPU) raise inside, when active."""
    names = ("tolist", "item", "__bool__", "__int__", "__float__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(self, *args, **kwargs):
        raise AssertionError("the Triton path read a tensor back to the host")

    try:
        if active:
            for name in names:
                setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def run(moe, x: torch.Tensor, dy: torch.Tensor, kernels: str, wiring: str) -> dict[str, torch.Tensor]:
    """The layer's output and gradients with K2C_KERNELS=kernels, through the per-op or the fused wiring."""
    from k2c.runtime import ops

    os.environ["K2C_KERNELS"] = kernels
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout masks on both paths
    with no_host_reads(kernels == "triton"):
        router = moe.route(x)
        router.weights.retain_grad()
        if wiring == "fused":
            y = moe.experts(router)
        else:
            gate = moe.experts.project("gate_proj", router.tokens, router)
            up = moe.experts.project("up_proj", router.tokens, router)
            y = moe.experts.project("down_proj", ops.swiglu(gate, up, moe.plan.kernel), router)
        out = moe.combine(y, router)
        out.backward(dy)
    assert router.fused == (kernels == "triton")
    got = {"out": out, "order": router.order, "x.grad": x.grad, "weights.grad": router.weights.grad}
    return got | {f"{n}.grad": p.grad for n, p in moe.named_parameters() if p.grad is not None}


def compare(what: str, moe, dtype: torch.dtype, wirings=("per-op", "fused"), twice: bool = False) -> None:
    """Reference against the kernels in the given wirings (twice: the fused one again, for the same bits); the fused
    wiring's torch path against the per-op one, bit for bit."""
    torch.manual_seed(3)
    x, dy = torch.randn(1, N, H, dtype=dtype), torch.randn(1, N, H, dtype=dtype)
    reference = run(copy.deepcopy(moe), x, dy, "torch", "per-op")
    assert {"x.grad", "weights.grad", "gate.weight.grad"} <= reference.keys()
    for wiring in wirings:
        got = run(copy.deepcopy(moe), x, dy, "triton", wiring)
        assert got.keys() == reference.keys(), f"{what} {wiring}: gradients {sorted(got)}, expected {sorted(reference)}"
        assert torch.equal(got["order"], reference["order"]), f"{what} {wiring}: different routing"
        for name, want in reference.items():
            assert_close(f"{what} {wiring} {name}", got[name], want, dtype)
        if wiring == "fused" and twice:
            again = run(copy.deepcopy(moe), x, dy, "triton", wiring)
            assert all(torch.equal(again[n], got[n]) for n in got), f"{what}: two runs differ"
        if wiring == "fused":
            torch_fused = run(copy.deepcopy(moe), x, dy, "torch", wiring)
            assert all(torch.equal(torch_fused[n], reference[n]) for n in reference), \
                f"{what}: Experts.forward's torch path differs from the per-op wiring"
    print(f"ok {what}")


# --------------------------------------------------------------------------- checks, each run in a fresh Python


def check_router() -> None:
    """Indices, weights, counts and the logits' gradient (router weight, input) for each grouping and load."""
    for groups in (1, 2):
        for normalize in (True, False):
            for load in LOADS:
                moe = moe_layer(groups, load, torch.float32, normalize)
                torch.manual_seed(4)
                x = torch.randn(N, H)
                g = torch.randn(N, K)
                results = []
                for fused in (False, True):
                    router = copy.deepcopy(moe.gate)
                    xf = x.clone().requires_grad_()
                    experts, weights, counts = router(xf, fused)
                    # the reference returns the k experts in no set order: compare them sorted, weights alike
                    experts, at = experts.sort(dim=1)
                    weights = weights.gather(1, at)
                    (weights * g).sum().backward()
                    results.append((experts, weights, counts, xf.grad, router.weight.grad))
                what = f"router groups={groups} normalize={normalize} {load}"
                (e_ref, w_ref, c_ref, dx_ref, dw_ref), (e, w, c, dx, dw) = results
                assert torch.equal(e, e_ref), f"{what}: experts differ"
                assert torch.equal(c.long(), c_ref), f"{what}: counts {c.tolist()}, expected {c_ref.tolist()}"
                if load == "empty":
                    assert c[E - 1] == 0
                if load == "skewed":
                    assert c[0] == N
                for name, got, want in (("weights", w, w_ref), ("dx", dx, dx_ref), ("dW_router", dw, dw_ref)):
                    assert_close(f"{what} {name}", got, want, torch.float32)
                print(f"ok {what}")


def check_experts() -> None:
    """No adapters: the layer's output, the input's, the router's, the combine weights' and each expert weight's
    gradients; every load, grouped routing, fp32 and fp16. (Cases are few: the interpreter is slow.)"""
    compare("experts fp32 balanced groups=2", moe_layer(2, "balanced", torch.float32), torch.float32, twice=True)
    compare("experts fp32 empty", moe_layer(1, "empty", torch.float32), torch.float32)
    compare("experts fp16 skewed", moe_layer(1, "skewed", torch.float16), torch.float16)

    # a gradient that differs per (token, slot), not the slot sum's expanded one
    moe = moe_layer(1, "balanced", torch.float32)
    torch.manual_seed(5)
    x, c = torch.randn(N, H), torch.randn(N, K, 1)
    results = []
    for kernels in ("torch", "triton"):
        os.environ["K2C_KERNELS"] = kernels
        layer, xs = copy.deepcopy(moe), x.clone().requires_grad_()
        slots = layer.experts(layer.route(xs))
        (slots * c).sum().backward()
        results.append((slots, xs.grad, layer.experts.down_proj.grad, layer.experts.gate_proj.grad))
    for name, got, want in zip(("slots", "dx", "down_proj.grad", "gate_proj.grad"), results[1], results[0],
                               strict=True):
        assert_close(f"experts per-slot gradient {name}", got, want, torch.float32)
    print("ok experts per-slot gradient")


def check_lora() -> None:
    """Exact LoRA inside the grouped kernels (both wirings; all projections, then up and down only, the gate frozen
    without one, then gate and up at different ranks, whose A gradients cannot share a pass), then with dropout,
    which `Experts.forward` runs per projection."""
    cases = ((torch.float32, "balanced", ("gate_proj", "up_proj", "down_proj"), ("per-op", "fused"), None),
             (torch.float16, "skewed", ("up_proj", "down_proj"), ("fused",), None),
             (torch.float32, "balanced", ("gate_proj", "up_proj"), ("fused",), {"up_proj": 2}))
    for dtype, load, names, wirings, ranks in cases:
        moe = moe_layer(1, load, dtype)
        add_adapters(moe, "lora", names=names, ranks=ranks)
        compare(f"lora {dtype} {load} on {names}, ranks {ranks or RANK}", moe, dtype, wirings)
    moe = moe_layer(2, "empty", torch.float32)
    add_adapters(moe, "lora", dropout=0.25)
    compare("lora dropout 0.25 fp32 empty", moe, torch.float32, ("fused",))


def check_celora() -> None:
    """CE-LoRA at keep 0.5: the kept channels packed per expert (and, in the fused down backward, gathered by token
    and weighted), the SVD pair in the epilogue, both wirings; on up and down with an exact-LoRA gate, on all three,
    and on down alone beside an unadapted gate and up. The combine weights' gradient stays exact (dOut . y)."""
    cases = ((torch.float32, "balanced", ("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj")),
             (torch.float16, "empty", ("gate_proj", "up_proj", "down_proj"), ("gate_proj", "up_proj", "down_proj")),
             (torch.float32, "skewed", ("down_proj",), ("down_proj",)),
             (torch.float32, "balanced", ("gate_proj", "up_proj"), ("gate_proj",)))
    for dtype, load, names, ce_names in cases:
        moe = moe_layer(1, load, dtype)
        add_adapters(moe, "ce_lora", names=names, ce_names=ce_names)
        compare(f"ce_lora {dtype} {load} on {ce_names} of {names}", moe, dtype, twice=True)


def check_weight_paths() -> None:
    """The two ways the grouped GEMM loads W: by tensor descriptor (W addressable: rows of 16-byte multiples; by rows
    of N or, for a transposed W, of K) and by pointer loads (W's rows one entry longer, a view), the same bits from
    both, and against a per-expert formula in fp64 (the layer checks compare the descriptor path with the torch
    path); the gate/up GEMM, which loads W by pointers, against the same kind of formula. One expert without rows;
    N = 24 ends inside a 16-wide tile (the descriptor's zeros past N, the pointers' wrap)."""
    from k2c.runtime.kernels import moe as kernels
    from k2c.runtime.kernels.tiles import addressable

    torch.manual_seed(9)
    counts = torch.tensor([9, 0, 17, 5, 30, 13])
    offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
    m, owner = int(offsets[-1]), torch.repeat_interleave(torch.arange(E), counts)
    rows = torch.randint(0, N, (m,))

    def unaddressable(w: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*w.shape[:-1], w.shape[-1] + 1, dtype=w.dtype)[..., :w.shape[-1]].copy_(w)

    for dtype in (torch.float32, torch.float16):
        x = torch.randn(N, H, dtype=dtype)
        gate_w, up_w = (torch.randn(E, INTER, H, dtype=dtype) / H**0.5 for _ in range(2))
        assert addressable(gate_w) and not addressable(unaddressable(gate_w))
        for got, w in zip(kernels.gate_up_swiglu(x, rows, offsets, gate_w, up_w)[:2], (gate_w, up_w)):
            want = torch.einsum("mh,mih->mi", x[rows].double(), w[owner].double())
            assert_close(f"gate/up {dtype}", got, want, dtype)
        down_w = torch.randn(E, H, INTER, dtype=dtype) / INTER**0.5

        # the grouped GEMM: W [E, K, N] by rows of N (the input gradient's W), by rows of K (W_d^T, the down
        # forward's), and by pointers; with a second product as the gate/up input gradient has
        a, a2 = torch.randn(m, INTER, dtype=dtype), torch.randn(m, INTER, dtype=dtype)
        w, w2 = gate_w, up_w  # [E, I, H]: K = I, N = H
        assert kernels.descriptor_order(w) == 1 and kernels.descriptor_order(down_w.transpose(1, 2)) == 2
        assert kernels.descriptor_order(unaddressable(w)) == 0
        want = kernels.grouped_mm(a, w, offsets, a2=a2, w2=w2)
        assert torch.equal(kernels.grouped_mm(a, unaddressable(w), offsets, a2=a2, w2=unaddressable(w2)), want)
        formula = torch.einsum("mi,mih->mh", a.double(), w[owner].double()) + \
            torch.einsum("mi,mih->mh", a2.double(), w2[owner].double())
        assert_close(f"grouped GEMM, two products {dtype}", want, formula, dtype)
        by_rows_of_k = kernels.grouped_mm(a, down_w.transpose(1, 2), offsets)
        by_pointers = kernels.grouped_mm(a, unaddressable(down_w).transpose(1, 2), offsets)
        assert torch.equal(by_rows_of_k, by_pointers), f"{dtype}: grouped GEMM paths differ (W by rows of K)"
        assert_close(f"grouped GEMM, W^T {dtype}", by_rows_of_k,
                     torch.einsum("mi,mhi->mh", a.double(), down_w[owner].double()), dtype)
    print("ok weight paths")


def check_slot_sum() -> None:
    """The MoE output's sum over the slots plus the shared experts' output, and its gradients, against torch's sum and
    add on strided slots, in fp32 accumulation (the kernel rounds once, so fp16 is compared at its tolerance)."""
    from k2c.runtime.kernels.moe import combine_slots, slot_sum

    torch.manual_seed(7)
    for dtype in (torch.float32, torch.float16):
        slots = torch.randn(N, H, 3, dtype=dtype).transpose(1, 2).requires_grad_()  # [N, 3, H], strided
        shared, dout = torch.randn(N, H, dtype=dtype, requires_grad=True), torch.randn(N, H, dtype=dtype)
        want = slots.double().sum(dim=1) + shared.double()
        got = combine_slots(slots, shared)
        assert_close(f"slot sum {dtype}", got, want, dtype)
        dslots, dshared = torch.autograd.grad(got, (slots, shared), dout)
        assert torch.equal(dslots, dout.unsqueeze(1).expand(N, 3, H)) and torch.equal(dshared, dout)
        assert_close(f"slot sum without addend {dtype}", slot_sum(slots.detach()), slots.double().sum(dim=1), dtype)
    with pytest.raises(ValueError, match="add must be"):
        slot_sum(torch.randn(N, 2, H), torch.randn(N, H + 1))
    print("ok slot sum")


def check_weight_grad() -> None:
    """Expert weight gradients P_e^T Q_e against a per-expert formula in fp64, one expert without rows: the Triton
    kernel on gathered and weighted rows (fp32), and the cuBLAS grouped GEMM a bf16 full weight takes on rows in
    expert order; and `gather_rows`, which puts them in that order, against the gather and weighting in fp32,
    rounded once."""
    from k2c.runtime.kernels import moe as kernels

    torch.manual_seed(8)
    rows_per_expert = torch.tensor([9, 0, 17, 5, 30, 3])
    offsets = torch.nn.functional.pad(rows_per_expert.cumsum(0), (1, 0))
    m, tokens, wide = int(offsets[-1]), 29, (80, 72)  # wider than a LoRA rank, rows of 16-byte multiples in bf16
    rows = torch.randint(0, tokens, (m,))
    weights = torch.rand(m)

    def formula(p, q):
        return torch.stack([p[a:b].double().t() @ q[a:b].double() for a, b in zip(offsets[:-1], offsets[1:])])

    # fp16 for the weighted rows: the interpreter rounds fp32 to bf16 toward zero, a GPU to nearest
    x = torch.randn(tokens, wide[0], dtype=torch.float16)
    assert torch.equal(kernels.gather_rows(x, rows, weights), (x[rows].float() * weights[:, None]).half())
    assert torch.equal(kernels.gather_rows(x.bfloat16(), rows), x.bfloat16()[rows])

    p, q = torch.randn(tokens, wide[0]), torch.randn(m, wide[1])
    want = formula((p[rows] * weights[:, None]), q)
    got = kernels.grouped_weight_grad(p, q, offsets, p_rows=rows, p_scale=weights)
    assert_close("weight grad fp32, gathered and weighted rows", got, want, torch.float32)
    assert torch.equal(got[1], torch.zeros_like(got[1]))

    p, q = (p[rows] * weights[:, None]).bfloat16(), q.bfloat16()
    assert kernels._by_cublas(p, q)
    got = kernels.grouped_weight_grad(p, q, offsets)
    assert got.dtype == torch.bfloat16 and got.shape == (E, *wide)
    assert_close("weight grad bf16 by cuBLAS's grouped GEMM", got, formula(p, q), torch.bfloat16)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert not kernels._by_cublas(p[:, :RANK * 4], q), "a LoRA rank's side goes to the Triton kernel"
    print("ok weight grad")


def check_errors() -> None:
    from k2c.runtime.kernels import moe as kernels

    logits, bias = torch.randn(5, E), torch.zeros(E)
    with pytest.raises(ValueError, match="logits must be 2D fp32"):
        kernels.route(logits.half(), bias, K, 1, 1, True, 1.0)
    with pytest.raises(ValueError, match="cannot choose 2 of 6 experts in 1 of 4 groups"):
        kernels.route(logits, bias, K, 4, 1, True, 1.0)
    x, w = torch.randn(8, H), torch.randn(E, H, INTER)
    with pytest.raises(ValueError, match=r"offsets must be int64 of shape \(7,\)"):
        kernels.grouped_mm(x, w, torch.zeros(E + 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="w must be torch.float32"):
        kernels.grouped_mm(x, w.half(), torch.zeros(E + 1, dtype=torch.int64))
    adapter = kernels.ExpertAdapter(torch.randn(E, RANK, H), torch.randn(E, INTER, RANK), 1.0)
    with pytest.raises(RuntimeError, match="must be frozen"):
        kernels.grouped_linear(x, torch.randn(E, INTER, H, requires_grad=True), torch.zeros(E + 1, dtype=torch.int64),
                               adapter)
    print("ok errors")


# --------------------------------------------------------------------------- the tests: one fresh Python each


@pytest.mark.parametrize("check", ["router", "experts", "lora", "celora", "weight_paths", "slot_sum", "weight_grad",
                                   "errors"])
def test_moe_kernels_match_the_torch_path(check: str) -> None:
    child = subprocess.run([sys.executable, __file__, f"check_{check}"], capture_output=True, text=True, timeout=300,
                           env=subprocess_env(TRITON_INTERPRET="1", K2C_KERNELS="triton"))
    assert child.returncode == 0, f"check_{check} failed:\n{child.stdout}{child.stderr[-5000:]}"


def test_bf16_parts_sum_back_to_their_fp32_tensor() -> None:
    """The parts a bf16 x multiplies the router weight by on a GPU (its products are then exact in fp32): three bf16
    parts hold all 24 significant bits of an fp32, two of them 16."""
    from k2c.runtime.kernels.moe import _bf16_parts

    t = torch.randn(512, 64) * torch.logspace(-6, 3, 64)
    three, two = _bf16_parts(t, 3), _bf16_parts(t, 2)
    assert all(p.dtype == torch.bfloat16 for p in three + two)
    assert torch.equal(sum(p.double() for p in three), t.double())
    assert ((sum(p.double() for p in two) - t.double()).abs() / t.double().abs()).max() <= 2**-16


if __name__ == "__main__":
    torch.set_num_threads(1)  # one core per test process, as conftest sets for the workers
    globals()[sys.argv[1]]()
