"""Routed MoE experts on k2c's Triton kernels against a torch._grouped_mm composition and k2c's loop over experts.

One Moonlight-sized MoE layer: T = 16384 tokens, H = 2048, E = 64 experts, k = 6, I = 1408, bf16, routed by a real
router (random weights, so the load is uneven as it is early in training). A step is the experts' forward and
backward from the layer input x and the routing to the summed expert output, and back, from a fixed dOut, to dx, the
combine weights' gradient and every expert weight's gradient (or, with LoRA r=16 on gate/up/down and the base
frozen, every A's and B's; with CE-LoRA at keep 0.25 on all three, the same, its input gradients over each expert's
kept channels). Variants, all on the same routing:

- k2c fused: `Experts.forward` on the Triton path (`kernels.moe.swiglu_experts`) and `MoE.combine`'s slot sum.
- k2c per-op: the wiring generated today (project, swiglu, project, combine) on the Triton path: grouped GEMMs
  (`grouped_linear`), the SwiGLU kernel and torch's weighting and unpermute.
- anchor: torch._grouped_mm (bf16, int32 offsets; PyTorch 2.8+ on Hopper) for the GEMMs, gate and up as one
  [E, H, 2I] product, silu * up, the gather and unpermute by index_select, autograd for the backward.
- loop: k2c's torch path, one F.linear per expert over a host copy of the counts (a synchronisation per layer).

Every variant's output and gradients are checked against the loop path run in fp32 on the same routing, with the
bf16 tolerance (CE-LoRA's on the same kept channels: a random set per expert, restored as a checkpoint restores it,
so that bf16 and fp32 channel norms cannot choose different sets). CE-LoRA is timed against the fused exact LoRA on
the same sites and against the LoRA anchor. Targets: the fused experts at most 0.8x the anchor's time (speed
>= 1.25x) and at least 8x faster than the loop. Then the forward alone, and the router's epilogue (fused kernel
against the torch ops).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F

from k2c.runtime import ops
from k2c.runtime.adapters import LoRAExperts
from k2c.runtime.kernels import moe as moe_kernels
from k2c.runtime.model import MoE, Routing
from k2c.runtime.plan import TRITON, AdapterPlan, AdapterSite, MoEPlan, RouterPlan

TOKENS, HIDDEN, EXPERTS, TOP_K, INTER = 16384, 2048, 64, 6, 1408
RANK, ALPHA = 16, 32
KEEP, SVD_RANK = 0.25, 14  # CE-LoRA: the step benchmark's keep ratio, the released code's SVD rank (7r/8)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


KINDS = ("none", "lora", "ce_lora")


def run(h, *kinds: str) -> None:
    """Every case and the router; or, given kinds (`moe:lora,ce_lora`), those experts cases only."""
    if unknown := set(kinds) - set(KINDS):
        raise ValueError(f"moe: unknown cases {sorted(unknown)}; expected some of {', '.join(KINDS)}")
    lora = {}
    for kind in kinds or KINDS:
        times = compare(h, TOKENS, HIDDEN, EXPERTS, TOP_K, INTER, kind, torch.device("cuda"), torch.bfloat16, lora)
        if kind == "lora":
            lora = times
    if not kinds:
        router(h, TOKENS, HIDDEN, EXPERTS, TOP_K, torch.device("cuda"))


def moe_layer(hidden: int, experts: int, top_k: int, inter: int, kind: str, device, dtype) -> MoE:
    """Moonlight's router settings, weights ~ N(0, 1/fan_in); LoRA or CE-LoRA of rank RANK (B random, so that it
    matters) unless kind is "none"."""
    plan = MoEPlan(RouterPlan(hidden, experts, top_k, 1, 1, True, 2.446, 0.0), experts, hidden, inter, None, TRITON)
    torch.manual_seed(0)
    moe = MoE(plan, device, dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
        moe.gate.e_score_correction_bias.uniform_(-0.02, 0.02)
    if kind != "none":
        moe.requires_grad_(False)
        adapter = AdapterPlan(kind, RANK, ALPHA, False, 0.0, 10**9, ())
        keep, svd_rank = (KEEP, SVD_RANK) if kind == "ce_lora" else (1.0, 0)
        stack = LoRAExperts.adapt(moe.experts)
        for name in PROJECTIONS:
            stack.add_adapter(name, AdapterSite("mlp.experts", name, kind, RANK, ALPHA, keep, svd_rank), adapter)
            with torch.no_grad():
                stack.adapter(name)[1].normal_(0, 0.02)
            if kind == "ce_lora":
                # a fixed kept set, restored as from a checkpoint; refresh_every is past the benchmark's steps
                rows = getattr(stack, name).shape[1]
                kept = torch.rand(experts, rows, device=device).topk(math.ceil(keep * rows), dim=1).indices
                stack.double_lora[name].set_extra_state({"backwards": 1, "kept": kept.sort(dim=1).values})
    return moe


def grouped_mm_composition(moe: MoE, base: Routing, scale: float):
    """(forward(x, weights [N, k] in (token, slot) order) -> [N, H], its trainable leaves) on torch._grouped_mm."""
    ex = moe.experts
    n, k = base.input.shape[0], base.top_k
    token = base.order // k
    inverse = base.order.argsort()  # (token, slot) position -> expert row
    offs = base.offsets[1:].to(torch.int32)
    lora = isinstance(ex, LoRAExperts)
    # gate and up as one [E, 2I, H] weight, as a grouped-GEMM implementation would store them
    gate_up = torch.cat((ex.gate_proj, ex.up_proj), dim=1).detach().requires_grad_(not lora)
    down = ex.down_proj.detach().clone().requires_grad_(not lora)
    adapters = {name: tuple(t.detach().clone().requires_grad_() for t in ex.adapter(name)) for name in PROJECTIONS
                } if lora else {}

    def gmm(a, w_t):
        return torch._grouped_mm(a, w_t, offs=offs)

    def adapted(rows, name):
        lora_A, lora_B = adapters[name]
        return scale * gmm(gmm(rows, lora_A.transpose(1, 2)), lora_B.transpose(1, 2))

    def forward(x, weights):
        rows = x.index_select(0, token)
        gu = gmm(rows, gate_up.transpose(1, 2))
        gate, up = gu.chunk(2, dim=-1)
        if lora:
            gate, up = gate + adapted(rows, "gate_proj"), up + adapted(rows, "up_proj")
        act = F.silu(gate) * up
        y = gmm(act, down.transpose(1, 2))
        if lora:
            y = y + adapted(act, "down_proj")
        slots = y.index_select(0, inverse).view(n, k, -1)
        return (slots * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)

    leaves = [gate_up, down] if not lora else [t for pair in adapters.values() for t in pair]
    return forward, leaves


def compare(h, tokens: int, hidden: int, experts: int, top_k: int, inter: int, kind: str, device, dtype,
            lora: dict[str, float]) -> dict[str, float]:
    """Check every variant against the fp32 loop, then time it; one shape, without an adapter, with LoRA or with
    CE-LoRA (timed against `lora`, the LoRA case's times). Returns the times."""
    rank = 0 if kind == "none" else RANK
    moe = moe_layer(hidden, experts, top_k, inter, kind, device, dtype)
    torch.manual_seed(1)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    dout = torch.randn(tokens, hidden, device=device, dtype=dtype)
    with torch.no_grad():
        routed = moe.route(x)  # the Triton router on a GPU
    x = x.requires_grad_()
    weights = routed.weights.detach().requires_grad_()  # [M, 1] fp32, expert order
    base = Routing(x, routed.order, routed.offsets, weights, x.shape, top_k, fused=True)
    params = [p for p in moe.parameters() if p.requires_grad and p is not moe.gate.weight]
    names = [n for n, p in moe.named_parameters() if p.requires_grad and p is not moe.gate.weight]
    scale = ALPHA / rank if rank else 1.0

    def k2c_step(fused_kernels: bool, wiring: str, model: MoE = moe, xs=x, ws=weights):
        routing = dataclasses.replace(base, input=xs, weights=ws, fused=fused_kernels)  # a fresh one: no cache
        if wiring == "fused":
            y = model.experts(routing)
        else:
            gate = model.experts.project("gate_proj", routing.tokens, routing)
            up = model.experts.project("up_proj", routing.tokens, routing)
            y = model.experts.project("down_proj", ops.swiglu(gate, up, model.plan.kernel), routing)
        return model.combine(y, routing)

    def step(forward, leaves):
        def fwd_bwd():
            for t in leaves:
                t.grad = None
            forward().backward(dout)
        return fwd_bwd

    def grads(leaves) -> list[torch.Tensor]:
        return [t.grad for t in leaves]

    # the reference: the loop path in fp32 on the same routing
    moe32 = copy.deepcopy(moe).float()
    x32, w32 = x.detach().float().requires_grad_(), weights.detach().clone().requires_grad_()
    params32 = [p for p in moe32.parameters() if p.requires_grad and p is not moe32.gate.weight]
    out32 = k2c_step(False, "per-op", moe32, x32, w32)
    out32.backward(dout.float())
    want = {"out": out32.detach(), "dx": x32.grad, "dw": w32.grad, **dict(zip(names, grads(params32), strict=True))}
    del moe32, out32, params32

    k2c_leaves = [x, weights, *params]
    variants = {
        "fused": step(lambda: k2c_step(True, "fused"), k2c_leaves),
        "per-op": step(lambda: k2c_step(True, "per-op"), k2c_leaves),
        "loop": step(lambda: k2c_step(False, "per-op"), k2c_leaves),
    }
    notes = {}
    for name, fn in variants.items():
        with torch.no_grad():
            out = k2c_step(name != "loop", "per-op" if name == "loop" else name)
        fn()
        got = {"out": out, "dx": x.grad, "dw": weights.grad, **dict(zip(names, grads(params), strict=True))}
        notes[name] = "; ".join(h.check(k, got[k], want[k], dtype=torch.bfloat16) for k in want)

    anchor = None
    if kind == "ce_lora":
        pass  # its anchor is exact LoRA's, timed in the LoRA case on the same layer and routing
    elif hasattr(torch, "_grouped_mm"):
        try:
            forward, anchor_leaves = grouped_mm_composition(moe, base, scale)
            inverse = base.order.argsort()
            w_slots = weights.detach().view(-1)[inverse].view(tokens, top_k).requires_grad_()
            anchor = step(lambda: forward(x, w_slots), [x, w_slots, *anchor_leaves])
            with torch.no_grad():
                out = forward(x, w_slots)
            anchor()
            checks = [h.check("out", out, want["out"], dtype=torch.bfloat16),
                      h.check("dx", x.grad, want["dx"], dtype=torch.bfloat16),
                      h.check("dw", w_slots.grad.view(-1), want["dw"].view(-1)[inverse], dtype=torch.bfloat16)]
            if not rank:
                checks.append(h.check("d gate_up", anchor_leaves[0].grad, torch.cat(
                    (want["experts.gate_proj"], want["experts.up_proj"]), dim=1), dtype=torch.bfloat16))
            notes["anchor"] = "; ".join(checks)
        except (RuntimeError, NotImplementedError) as err:
            notes["anchor"] = f"torch._grouped_mm failed here: {type(err).__name__}: {str(err)[:120]}"
            anchor = None
    else:
        notes["anchor"] = f"torch {torch.__version__} has no torch._grouped_mm"

    what = (f"MoE experts fwd+bwd, T={tokens}, H={hidden}, E={experts}, k={top_k}, I={inter}, "
            f"{str(dtype).removeprefix('torch.')}")
    if kind == "lora":
        what += f", LoRA r={rank} on gate/up/down (base frozen)"
    if kind == "ce_lora":
        what += f", CE-LoRA r={rank} keep {KEEP} SVD rank {SVD_RANK} on gate/up/down (base frozen)"
    # fwd: three GEMMs of 2 M H I FLOPs; bwd: their input gradients (CE-LoRA's over the kept share), and the weight
    # gradients without adapters
    m = tokens * top_k
    flops = round(2 * m * hidden * inter * 3 * {"none": 3, "lora": 2, "ce_lora": 1 + KEEP}[kind])
    t = {name: h.time(fn) for name, fn in variants.items()}
    if kind == "ce_lora" and lora:
        record(h, what, "k2c fused Triton experts, CE-LoRA (vs k2c fused LoRA, same sites)", t["fused"],
               lora["fused"], notes["fused"], flops)
        if "anchor" in lora:
            record(h, what, "k2c fused Triton experts, CE-LoRA (vs the grouped_mm LoRA anchor)", t["fused"],
                   lora["anchor"], "", flops)
    elif anchor is not None:
        t["anchor"] = h.time(anchor)
        record(h, what, "torch._grouped_mm composition (anchor)", t["anchor"], t["anchor"], notes["anchor"], flops)
        record(h, what, "k2c fused Triton experts (vs grouped_mm; target >= 1.25x)", t["fused"], t["anchor"],
               notes["fused"], flops)
    else:
        record(h, what, "torch._grouped_mm composition (anchor): not run", float("nan"), float("nan"),
               notes["anchor"], None)
    record(h, what, "k2c fused Triton experts (vs the loop; target >= 8x)", t["fused"], t["loop"],
           notes["fused"] if kind == "ce_lora" and not lora else "", flops)
    record(h, what, "k2c per-op wiring on the Triton kernels (vs the loop)", t["per-op"], t["loop"],
           notes["per-op"], flops)
    record(h, what, "k2c loop over experts, torch path (anchor for the loop rows)", t["loop"], t["loop"],
           notes["loop"], flops)
    # GPU time alone, against the anchor's (or the loop's), with the kernels that take it; and how the grouped
    # kernels' autotuner loads W
    reference = "anchor" if anchor is not None else "loop"
    gpu = {"fused": h.kernel_times(variants["fused"]),
           reference: h.kernel_times(anchor if anchor is not None else variants["loop"])}
    record(h, what, f"k2c fused Triton experts, GPU kernel time (vs the {reference}'s)", sum(gpu["fused"].values()),
           sum(gpu[reference].values()), f"{largest(gpu['fused'])}; {descriptor_picks()}", flops)

    # the forward alone, where the gather and the SwiGLU / weighting epilogues show
    fwd = {"fused": lambda: k2c_step(True, "fused"), "loop": lambda: k2c_step(False, "per-op")}
    if anchor is not None:
        fwd["anchor"] = lambda: forward(x, w_slots)
    with torch.no_grad():
        tf = {name: h.time(fn) for name, fn in fwd.items()}
    record(h, what.replace("fwd+bwd", "forward only"), f"k2c fused Triton experts (vs {reference})", tf["fused"],
           tf[reference], gate_up_choice(), 2 * m * hidden * inter * 3)
    return t


def largest(kernels: dict[str, float], count: int = 8) -> str:
    """The `count` kernels that take the most time, as "name ms"."""
    return ", ".join(f"{name[:40]} {ms:.3f}" for name, ms in list(kernels.items())[:count])


def descriptor_picks() -> str:
    """How many of the grouped GEMM's tuned keys the autotuner gave W by tensor descriptor."""
    chosen = list(moe_kernels._grouped_matmul_kernel.cache.values())
    return f"grouped GEMM W by descriptor in {sum(c.kwargs['DESC'] for c in chosen)} of {len(chosen)} keys"


def gate_up_choice() -> str:
    """The gate/up GEMM's tile as the autotuner last chose it."""
    meta = moe_kernels._gate_up_kernel.best_config.kwargs
    return f"gate/up tile {meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}"


def router(h, tokens: int, hidden: int, experts: int, top_k: int, device) -> None:
    """Routing of one layer, fwd+bwd from the router weight's GEMM to the combine weights: epilogue kernel vs torch."""
    moe = moe_layer(hidden, experts, top_k, INTER, "none", device, torch.bfloat16)
    torch.manual_seed(2)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, top_k, device=device)

    def step(fused: bool):
        def fwd_bwd():
            x.grad = moe.gate.weight.grad = None
            experts_, weights, _ = moe.gate(x, fused)
            # the reference returns the k experts in no set order: sort both, so g meets the same expert
            experts_, at = experts_.sort(dim=1)
            (weights.gather(1, at) * g).sum().backward()
            return experts_, weights.gather(1, at)
        return fwd_bwd

    e_ref, w_ref = step(False)()
    dx_ref, dw_ref = x.grad, moe.gate.weight.grad
    e, w = step(True)()
    if not torch.equal(e, e_ref):
        raise AssertionError("router: the fused kernel chose other experts than the torch ops")
    check = "; ".join((h.check("weights", w, w_ref), h.check("dx", x.grad, dx_ref),
                       h.check("d router weight", moe.gate.weight.grad, dw_ref)))
    what = (f"router fwd+bwd (fp32 GEMM, sigmoid, bias, top-{top_k} of {experts}, weights), T={tokens}, H={hidden}; "
            "GPU kernel time (the wall time is the host's, issuing small kernels)")
    t_torch, t_fused = h.kernel_time(step(False)), h.kernel_time(step(True))
    record(h, what, "torch ops (anchor)", t_torch, t_torch, "", None)
    record(h, what, "k2c fused epilogue kernel", t_fused, t_torch, check, None)


def record(h, work: str, variant: str, ms: float, anchor_ms: float, check: str, flops: float | None) -> None:
    """h.row, and the row printed at once: a run cut short still shows what it measured."""
    h.row(work, variant, ms, anchor_ms, check, flops)
    print(f"{work} | {variant} | {ms:.3f} ms | {anchor_ms / ms:.2f}x | {check}", flush=True)
