"""MuonClip's step over one Moonlight MoE layer's Muon matrices: k2c's batched Triton Newton-Schulz against
torch.optim.Muon, fp32 master weights, bf16 Newton-Schulz in both.

The layer: 64 routed experts' gate and up [1408, 2048] and down [2048, 1408] (192 matrices, one batch shape once
the tall ones are transposed) and its attention: q_proj [16 * 192, 2048] (no q LoRA), kv_a [512 + 64, 2048],
kv_b [16 * (128 + 128), 512] and o_proj [2048, 2048]. The anchor is torch.optim.Muon over the same 196 matrices as 2D
parameters, one at a time, with the settings of Moonlight's plan (lr 2e-4 held constant, weight decay 0.1,
Nesterov momentum 0.95, RMS matched to AdamW). One step of each from the same weights and gradients must agree per
matrix before anything is timed; then the anchor, k2c's step on the Triton kernels, and k2c's step with the torch
Newton-Schulz (K2C_KERNELS=torch); each in the standard form and in the Gram form (`newton_schulz: gram`, on the
matrices where group_params gives it: all but the square o_proj). Newton-Schulz alone is timed too, on the 192
expert matrices and on 276 matrices 512 x 1536 (a batch of k2-1b's, whose short products the training step spends
most of its Newton-Schulz time on): torch bmm (the reference, and anchors.md's second figure) against the Triton
kernels, in both forms. The step is timed by wall time, and again by GPU kernel time alone, since the anchor's
wall time is its host's.

TFLOP/s counts Newton-Schulz with the full Gram products, 5 (4 n^2 m + 2 n^3) per n x m matrix (n <= m), as
anchors.md does. The Triton kernels compute only the tiles of X X^T and of G G from the diagonal rightwards: at
1408 x 2048 that is 0.715 of the count with 128 x 128 tiles (the exact half would be (3 n^2 m + n^3) /
(4 n^2 m + 2 n^3) = 0.686), so their rate is effective and may pass the ~700 TFLOP/s the tensor cores can do.
The target: the step in at most 0.4x torch.optim.Muon's time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from harness import Harness, MismatchError

from k2c.passes.group_params import ns_form
from k2c.runtime import optim
from k2c.runtime.kernels.newton_schulz import newton_schulz
from k2c.runtime.ops import FORCE
from k2c.runtime.packages import import_package
from k2c.runtime.plan import GRAM, NS_FORMS, STANDARD

DEV = torch.device("cuda")
REPO = Path(__file__).resolve().parents[2]
EXPERTS, HIDDEN, EXPERT_INTER = 64, 2048, 1408
HEADS, NOPE, ROPE, V_DIM, KV_LORA = 16, 128, 64, 128, 512
ATTENTION = {
    "q_proj": (HEADS * (NOPE + ROPE), HIDDEN),
    "kv_a_proj_with_mqa": (KV_LORA + ROPE, HIDDEN),
    "kv_b_proj": (HEADS * (NOPE + V_DIM), KV_LORA),
    "o_proj": (HIDDEN, HEADS * V_DIM),
}
WORST_UPDATE_DIFFERENCE = 0.1  # per matrix, |ours - anchor| / |anchor's update|: bf16 rounding, not a bug


class Layer(torch.nn.Module):
    """The layer's Muon matrices, stacked experts as k2c stores them; fp32 master weights, as mixed-precision
    training keeps them (in bf16 most of a 2e-4 update rounds away, and the optimizers could not be compared)."""

    def __init__(self):
        super().__init__()
        e, i, h = EXPERTS, EXPERT_INTER, HIDDEN
        self.gate_proj = torch.nn.Parameter(torch.randn(e, i, h, device=DEV) * 0.02)
        self.up_proj = torch.nn.Parameter(torch.randn(e, i, h, device=DEV) * 0.02)
        self.down_proj = torch.nn.Parameter(torch.randn(e, h, i, device=DEV) * 0.02)
        for name, shape in ATTENTION.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape, device=DEV) * 0.02))

    # what MuonClip asks of its model after the update: no router to move, no attention module to clip
    def moe_layers(self):
        return {}

    def attentions(self):
        return []

    def step_max_logits(self):
        return torch.full((1, 1), -torch.inf, device=DEV)

    def reset_step_stats(self):
        pass


VARIANTS = tuple((choice, form) for choice in ("triton", "torch") for form in NS_FORMS)


def matrices(tensors) -> list[torch.Tensor]:
    """The layer's matrices among `tensors` (its parameters, or their gradients) as 2D views, experts one by one."""
    return [m for t in tensors for m in (t.unbind(0) if t.ndim == 3 else (t,))]


def ns_flops(shapes) -> float:
    """Newton-Schulz with full Gram products: 5 (4 n^2 m + 2 n^3) per matrix, n <= m."""
    return sum(5 * (4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3) for s in shapes)


@contextlib.contextmanager
def kernels(choice: str):
    """K2C_KERNELS set to `choice` for the duration: the optimizer reads it on every step."""
    previous = os.environ.get(FORCE)
    os.environ[FORCE] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FORCE]
        else:
            os.environ[FORCE] = previous


def step_rows(h: Harness, plan) -> None:
    torch.manual_seed(0)
    model = Layer()
    grads = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}

    def ours(form: str) -> optim.MuonClip:
        """k2c's optimizer over the layer, from the shared starting weights and gradients; in the Gram form, each
        matrix in the form group_params would give it."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
                p.grad = grads[name]
        by_form: dict[str, list] = {}
        for name, p in model.named_parameters():
            by_form.setdefault(ns_form(form, p.shape, plan.ns_steps), []).append((name, p))
        return optim.MuonClip(model, [{"params": params, "kind": "muon", "weight_decay": plan.weight_decay,
                                       "newton_schulz": f} for f, params in by_form.items()], plan)

    flat = [torch.nn.Parameter(m.detach().clone()) for m in matrices(model.parameters())]
    for p, grad in zip(flat, matrices(grads.values())):
        p.grad = grad.clone()
    anchor = torch.optim.Muon(flat, lr=plan.lr, weight_decay=plan.weight_decay, momentum=plan.momentum,
                              nesterov=plan.nesterov, ns_coefficients=plan.ns_coefficients, eps=1e-7,
                              ns_steps=plan.ns_steps, adjust_lr_fn="match_rms_adamw")

    # check before timing: one step of each from the same weights and gradients agrees, matrix by matrix
    before = [p.detach().clone() for p in flat]
    anchor.step()
    checks = {}
    for choice, form in VARIANTS:
        with kernels(choice):
            ours(form).step()
        worst = max(((a - b).norm() / (b - w).norm()).item()
                    for a, b, w in zip(matrices(model.parameters()), flat, before))
        if not worst < WORST_UPDATE_DIFFERENCE:
            raise MismatchError(f"muon: MuonClip ({choice} Newton-Schulz, {form} form) and torch.optim.Muon "
                                f"disagree: relative update difference {worst:.3f}")
        checks[choice, form] = (f"update within {worst:.3f} relative of the anchor's, per matrix (bf16 Newton-Schulz "
                                "in both); TFLOP/s counts the standard form's full products"
                                + (", of which the kernels compute about 0.72" if (choice, form) == ("triton", STANDARD)
                                   else ""))
    del before

    shapes = [tuple(m.shape) for m in matrices(model.parameters())]
    a = ATTENTION
    work = (f"Muon step, one Moonlight MoE layer: {3 * EXPERTS} expert matrices {EXPERT_INTER}x{HIDDEN} and "
            f"attention q {a['q_proj']}, kv_a {a['kv_a_proj_with_mqa']}, kv_b {a['kv_b_proj']}, o {a['o_proj']}; "
            "fp32 weights, bf16 Newton-Schulz")
    anchor_ms = h.time(anchor.step)
    h.row(work, "torch.optim.Muon (anchor)", anchor_ms, anchor_ms, flops=ns_flops(shapes))
    for choice, form in VARIANTS:
        step = ours(form).step
        variant = {"triton": "k2c MuonClip, Triton Newton-Schulz",
                   "torch": "k2c MuonClip, torch Newton-Schulz (K2C_KERNELS=torch)"}[choice]
        with kernels(choice):
            h.row(work, f"{variant}, {form} form", h.time(step), anchor_ms, checks[choice, form],
                  flops=ns_flops(shapes))
            if choice == "triton":
                h.row(work, f"{variant}, {form} form, replayed from a CUDA graph (as `k2c train` runs its steps)",
                      h.time(graphed(ours(form).step)), anchor_ms, checks[choice, form], flops=ns_flops(shapes))

    # the anchor's wall time is its host's, launching each matrix's products one by one, and has ranged 68-136 ms
    # over runs: GPU kernel time alone compares the two without the host
    work += "; GPU kernel time only (torch.profiler), the host's time left out"
    anchor_kernels = h.kernel_time(anchor.step)
    h.row(work, "torch.optim.Muon (anchor)", anchor_kernels, anchor_kernels, flops=ns_flops(shapes))
    for form in NS_FORMS:
        step = ours(form).step
        with kernels("triton"):
            h.row(work, f"k2c MuonClip, Triton Newton-Schulz, {form} form", h.kernel_time(step), anchor_kernels,
                  checks["triton", form], flops=ns_flops(shapes))


def graphed(step):
    """`step` captured in a CUDA graph after warm-up steps (which tune the kernels), as its replay: the host's
    launches of the step's ~130 kernels, part of its wall time eagerly, are gone."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def newton_schulz_rows(h: Harness, plan, batch: int, n: int, m: int, what: str) -> None:
    """Newton-Schulz alone on one batch [batch, n, m], normalisation included."""
    u = torch.randn(batch, n, m, device=DEV)
    check = h.check("Newton-Schulz", newton_schulz(u, plan.ns_steps, plan.ns_coefficients),
                    optim.newton_schulz(u, plan.ns_steps, plan.ns_coefficients))
    work = f"Newton-Schulz alone, {batch} matrices {n}x{m} in one batch ({what}), bf16"
    flops = ns_flops([(n, m)] * batch)
    anchor_ms = h.time(lambda: optim.newton_schulz(u, plan.ns_steps, plan.ns_coefficients))
    h.row(work, "torch bmm (anchor)", anchor_ms, anchor_ms, flops=flops)
    h.row(work, "k2c Triton (symmetric Gram)", h.time(lambda: newton_schulz(u, plan.ns_steps, plan.ns_coefficients)),
          anchor_ms, check + "; TFLOP/s counts full Gram products", flops=flops)
    check = h.check("Newton-Schulz, Gram form", newton_schulz(u, plan.ns_steps, plan.ns_coefficients, form=GRAM),
                    optim.newton_schulz(u, plan.ns_steps, plan.ns_coefficients, form=GRAM))
    h.row(work, "k2c Triton, Gram form", h.time(lambda: newton_schulz(u, plan.ns_steps, plan.ns_coefficients,
                                                                      form=GRAM)),
          anchor_ms, check + "; TFLOP/s counts the standard form's full products", flops=flops)


def run(h: Harness) -> None:
    moonlight = import_package(REPO / "generated" / "moonlight_16b_a3b", "bench_moonlight")
    plan = dataclasses.replace(moonlight.PLAN.optimizer, lr=2e-4, warmup_steps=0, decay="constant", weight_decay=0.1)
    step_rows(h, plan)
    newton_schulz_rows(h, plan, 3 * EXPERTS, EXPERT_INTER, HIDDEN, "one Moonlight MoE layer's experts")
    # k2-1b's expert, shared-expert and q_a matrices, transposed where tall: the optimizer's largest batch there
    newton_schulz_rows(h, plan, 276, 512, 1536, "a batch of k2-1b's")
