"""LoRA and CE-LoRA adapters on the model's linears and on its stacked routed experts.

A site computes `Y = X W^T + s (X' A^T) B^T` with W [m, n] frozen, A [r, n], B [m, r], s = alpha / r (alpha /
sqrt(r) under rsLoRA) and X' = dropout(X), as PEFT does. The forward, dA, dB and the adapter's share of dX are
exact. CE-LoRA (arXiv 2502.01378) approximates only the input gradient of the frozen product:

    dY W  ~=  (dY B0) A0 + dY[:, S] R[S, :],    R = W - B0 A0,

where B0 = U_k S_k^1/2 and A0 = S_k^1/2 V_k^T split W's rank-k truncated SVD (fp32), and S holds the
ceil(keep_ratio * m) output channels with the largest ||dY[:, i]|| * ||R[i, :]||. S is chosen again every
`refresh_every` backward passes and R[S, :] is cached in between. A keep ratio of 1 is plain LoRA: the
exact `dY W`, no SVD and no buffers.

Routed experts get the same per expert, over tokens grouped by expert; the SVD is batched over the stack and
S is chosen for all experts at once. Adapters leave the checkpoint names alone (`...q_b_proj.weight`,
`...mlp.experts.gate_proj`); their own tensors are `<linear>.lora_A [r, in]` / `.lora_B [out, r]` and
`<experts>.<proj>_lora_A [E, r, in]` / `<experts>.<proj>_lora_B [E, out, r]`, in the base weight's dtype.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from k2c.runtime import ops
from k2c.runtime.files import write_atomic
from k2c.runtime.kernels import lora as lora_kernel
from k2c.runtime.kernels import moe as moe_kernel
from k2c.runtime.model import CausalLM, Experts, Routing, SeededInit, local
from k2c.runtime.plan import AdapterPlan, AdapterSite

T = TypeVar("T")


def lora_scale(site: AdapterSite, plan: AdapterPlan) -> float:
    return site.alpha / math.sqrt(site.rank) if plan.rslora else site.alpha / site.rank


def adapter_dropout(plan: AdapterPlan) -> nn.Module:
    return nn.Dropout(plan.dropout) if plan.dropout > 0 else nn.Identity()


def init_lora_A(lora_A: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """PEFT's init of A [r, in] or [E, r, in]: kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(in))."""
    nn.init.kaiming_uniform_(lora_A.view(-1, lora_A.shape[-1]), a=math.sqrt(5), generator=generator)


@torch.no_grad()
def init_adapter_pair(init: SeededInit | None, name: str, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      first_expert: int | None = None) -> None:
    """PEFT's init: A (the model's tensor `name`) as init_lora_A draws it, B zeros. A comes from a generator of its
    own (k2c.runtime.model.SeededInit; a stack of experts expert by expert, from `first_expert` on), or from torch's
    global one for a module built on its own (`init` None)."""
    if init is None:
        init_lora_A(lora_A)
        lora_B.zero_()
    else:
        init.draw(name, lora_A, init_lora_A, first_expert)
        init.constant(lora_B, 0.0)


@torch.no_grad()
def fold(weight: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float) -> None:
    """W += s B A in fp32, in place; W [m, n] or a stack [E, m, n]."""
    weight.copy_(weight.float() + scale * (lora_B.float() @ lora_A.float()))


# --------------------------------------------------------------------------- CE-LoRA's stand-in for W


class DoubleLoRA(nn.Module):
    """What CE-LoRA's input gradient uses in place of a frozen W [..., m, n] (a leading dim stacks experts).

    The SVD pair is computed from W at the first backward, and again whenever W has changed in place since (its
    version counter moved, as a checkpoint load does), so adapters may be applied before the weights are loaded.
    Every buffer derives from W and stays out of state dicts; only the refresh position and the kept set travel
    (as extra state), so a resumed run keeps choosing channels exactly when an uninterrupted one would.
    """

    # None until the first backward
    svd_B: torch.Tensor
    svd_A: torch.Tensor
    residual_norm: torch.Tensor
    kept: torch.Tensor
    kept_rows: torch.Tensor

    def __init__(self, svd_rank: int, keep_ratio: float, refresh_every: int):
        super().__init__()
        self.svd_rank, self.keep_ratio, self.refresh_every = svd_rank, keep_ratio, refresh_every
        self.register_buffer("svd_B", None, persistent=False)  # B0 [..., m, k]
        self.register_buffer("svd_A", None, persistent=False)  # A0 [..., k, n]
        self.register_buffer("residual_norm", None, persistent=False)  # ||R[i, :]|| [..., m], fp32
        self.register_buffer("kept", None, persistent=False)  # S [..., |S|], ascending
        self.register_buffer("kept_rows", None, persistent=False)  # R[S, :] [..., |S|, n]
        self.weight_version = -1  # version of W that svd_B and svd_A were computed from
        self.backwards = 0  # backward passes since the SVD
        # (backwards, kept) from a checkpoint, applied once W is factorised again
        self.restored: tuple[int, torch.Tensor | None] | None = None
        # over several processes (k2c.runtime.parallel): those whose tokens W also sees, whose channel norms count
        self.group: dist.ProcessGroup | None = None

    def extra_repr(self) -> str:
        return f"svd_rank={self.svd_rank}, keep_ratio={self.keep_ratio}, refresh_every={self.refresh_every}"

    @torch.no_grad()
    def factorize(self, weight: torch.Tensor) -> None:
        w = weight.float()
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        root = sigma[..., : self.svd_rank].sqrt()
        svd_B = u[..., : self.svd_rank] * root.unsqueeze(-2)
        svd_A = root.unsqueeze(-1) * vh[..., : self.svd_rank, :]
        # row-major: LAPACK's factors are column-major, and every backward reads or concatenates these
        self.store("svd_B", svd_B.contiguous().to(weight.dtype))
        self.store("svd_A", svd_A.contiguous().to(weight.dtype))
        self.store("residual_norm", torch.linalg.vector_norm(w - svd_B @ svd_A, dim=-1))
        self.weight_version = weight._version
        self.backwards = 0

    def store(self, name: str, value: torch.Tensor) -> None:
        """Set buffer `name`, in place once it exists: a captured CUDA graph of a step reads it where it is."""
        held = getattr(self, name)
        if held is None:
            setattr(self, name, value)
        else:
            held.copy_(value)

    def get_extra_state(self) -> dict:
        # a copy: the buffer is rewritten in place at the next refresh
        return {"backwards": self.backwards, "kept": None if self.kept is None else self.kept.clone()}

    def set_extra_state(self, state: dict) -> None:
        self.restored = (state["backwards"], state["kept"])
        self.weight_version = -1

    def refresh_due(self, weight: torch.Tensor) -> bool:
        """Count a backward pass; True when it must choose S: the first one, then every `refresh_every`-th."""
        if self.weight_version != weight._version:
            self.factorize(weight)
            if self.restored is not None:
                self.backwards, kept = self.restored
                self.restored = None
                if kept is not None:
                    self.keep(weight, kept.to(weight.device))
        due = self.backwards % self.refresh_every == 0
        self.backwards += 1
        return due

    @torch.no_grad()
    def select(self, weight: torch.Tensor, channel_norm: torch.Tensor) -> None:
        """Keep the channels with the largest ||dY[:, i]|| * ||R[i, :]||; channel_norm [..., m] is ||dY[:, i]||
        over this process's tokens, and over all the processes' when W is shared with others."""
        if self.group is not None:
            squares = channel_norm.square()
            dist.all_reduce(squares, group=self.group)
            channel_norm = squares.sqrt()
        score = channel_norm * self.residual_norm
        kept = score.topk(math.ceil(self.keep_ratio * weight.shape[-2]), dim=-1, sorted=False).indices
        self.keep(weight, kept.sort(dim=-1).values)  # ascending, so the gathers read memory in order

    @torch.no_grad()
    def keep(self, weight: torch.Tensor, kept: torch.Tensor) -> None:
        """Make S the kept channels and cache their residual rows R[S, :] = W[S, :] - B0[S, :] A0."""
        self.store("kept", kept)
        rows = kept.unsqueeze(-1)
        self.store("kept_rows",
                   weight.take_along_dim(rows, dim=-2) - self.svd_B.take_along_dim(rows, dim=-2) @ self.svd_A)

    def residual(self) -> tuple[torch.Tensor, ...]:
        return self.svd_B, self.svd_A, self.kept, self.kept_rows


# --------------------------------------------------------------------------- one matrix, forward and backward
# The linear and the expert Functions apply these to a whole linear or to one expert's rows.


def lora_forward(x, x_adapter, weight, lora_A, lora_B, scale):
    """Y [N, m] = X W^T + s (X' A^T) B^T, and X' A^T [N, r], which dB needs."""
    xa = x_adapter @ lora_A.T
    return (x @ weight.T).addmm_(xa, lora_B.T, alpha=scale), xa


def base_input_grad(dy, weight, residual):
    """dY W exactly, or CE-LoRA's (dY B0) A0 + dY[:, S] R[S, :] given residual = (B0, A0, S, R[S, :])."""
    if residual is None:
        return dy @ weight
    svd_B, svd_A, kept, kept_rows = residual
    return ((dy @ svd_B) @ svd_A).addmm_(dy.index_select(1, kept), kept_rows)


def lora_backward(dy, x_adapter, xa, weight, lora_A, lora_B, scale, residual, shared, needs):
    """Gradients of `lora_forward` for (X, X', A, B); `needs` says which are wanted.

    `shared`: X' is X (no dropout), so the adapter's part of dX is folded into X's gradient and X' gets None.
    """
    need_dx, need_a, need_b = needs
    dyb = dy @ lora_B
    dx = dx_adapter = grad_a = grad_b = None
    if need_dx:
        dx = base_input_grad(dy, weight, residual)
        if shared:
            dx.addmm_(dyb, lora_A, alpha=scale)
        else:
            dx_adapter = lora_kernel.scaled_mm(dyb, lora_A, scale)
    if need_a:
        grad_a = lora_kernel.scaled_mm(dyb.T, x_adapter, scale)
    if need_b:
        grad_b = lora_kernel.scaled_mm(dy.T, xa, scale)
    return dx, dx_adapter, grad_a, grad_b


def check_frozen(ctx) -> None:
    if ctx.needs_input_grad[2]:
        raise RuntimeError("an adapted base weight must be frozen (requires_grad=False): it gets no gradient")


def save_inputs(ctx, x, x_adapter, xa, weight, lora_A, lora_B) -> None:
    """Keep X' only for dA and X' A^T only for dB; W, A and B are parameters and cost nothing to keep."""
    ctx.save_for_backward(
        x_adapter if ctx.needs_input_grad[3] else None,
        xa if ctx.needs_input_grad[4] else None,
        weight, lora_A, lora_B,
    )
    ctx.shared = x_adapter is x


class LoRALinearFunction(torch.autograd.Function):
    """x, x_adapter [N, n], W [m, n], A [r, n], B [m, r] -> [N, m]; CE-LoRA's input gradient given a DoubleLoRA."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, lora_A, lora_B, scale, double_lora):
        check_frozen(ctx)
        y, xa = lora_forward(x, x_adapter, weight, lora_A, lora_B, scale)
        save_inputs(ctx, x, x_adapter, xa, weight, lora_A, lora_B)
        ctx.scale, ctx.double_lora = scale, double_lora
        return y

    @staticmethod
    def backward(ctx, dy):
        x_adapter, xa, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_x_adapter, _, need_a, need_b = ctx.needs_input_grad[:5]
        need_dx = need_x or need_x_adapter
        residual = None
        if need_dx and ctx.double_lora is not None:
            if ctx.double_lora.refresh_due(weight):
                ctx.double_lora.select(weight, torch.linalg.vector_norm(dy, dim=0, dtype=torch.float32))
            residual = ctx.double_lora.residual()
        dx, dx_adapter, grad_a, grad_b = lora_backward(
            dy, x_adapter, xa, weight, lora_A, lora_B, ctx.scale, residual, ctx.shared, (need_dx, need_a, need_b)
        )
        return dx, dx_adapter, None, grad_a, grad_b, None, None


class ExpertLoRAFunction(torch.autograd.Function):
    """One projection of an expert stack: x, x_adapter [T, n] with rows grouped by expert (`counts[e]` rows for
    expert e), W [E, m, n], A [E, r, n], B [E, m, r] -> [T, m]."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, lora_A, lora_B, scale, counts, double_lora):
        check_frozen(ctx)
        outputs = [
            lora_forward(x_e, xa_e, weight[e], lora_A[e], lora_B[e], scale)
            for e, (x_e, xa_e) in enumerate(zip(x.split(counts), x_adapter.split(counts)))
        ]
        y = torch.cat([y_e for y_e, _ in outputs])
        save_inputs(ctx, x, x_adapter, torch.cat([xa_e for _, xa_e in outputs]), weight, lora_A, lora_B)
        ctx.scale, ctx.counts, ctx.double_lora = scale, counts, double_lora
        return y

    @staticmethod
    def backward(ctx, dy):
        x_adapter, xa, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_x_adapter, _, need_a, need_b = ctx.needs_input_grad[:5]
        need_dx = need_x or need_x_adapter
        experts = len(ctx.counts)
        dys = dy.split(ctx.counts)
        x_adapters = x_adapter.split(ctx.counts) if need_a else [None] * experts
        xas = xa.split(ctx.counts) if need_b else [None] * experts
        residuals = [None] * experts
        if need_dx and ctx.double_lora is not None:
            if ctx.double_lora.refresh_due(weight):
                norms = [torch.linalg.vector_norm(dy_e, dim=0, dtype=torch.float32) for dy_e in dys]
                ctx.double_lora.select(weight, torch.stack(norms))
            residuals = list(zip(*(t.unbind(0) for t in ctx.double_lora.residual())))
        grads = [
            lora_backward(dys[e], x_adapters[e], xas[e], weight[e], lora_A[e], lora_B[e], ctx.scale, residuals[e],
                          ctx.shared, (need_dx, need_a, need_b))
            for e in range(experts)
        ]
        dx, dx_adapter, grad_a, grad_b = zip(*grads)
        return (
            torch.cat(dx) if need_dx else None,
            torch.cat(dx_adapter) if need_dx and not ctx.shared else None,
            None,
            torch.stack(grad_a) if need_a else None,
            torch.stack(grad_b) if need_b else None,
            None, None, None,
        )


# --------------------------------------------------------------------------- modules


class LoRALinear(nn.Module):
    """A frozen bias-free linear with a LoRA adapter, and CE-LoRA's backward on a `ce_lora` site.

    The base weight stays `.weight`, so state dict keys are the checkpoint's.
    """

    def __init__(self, base: nn.Linear, site: AdapterSite, plan: AdapterPlan, init: SeededInit | None = None):
        super().__init__()
        self.site = site
        self.out_features, self.in_features = base.weight.shape
        self.weight = base.weight.requires_grad_(False)
        device, dtype = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(site.rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, site.rank, device=device, dtype=dtype))
        init_adapter_pair(init, f"{site.module}.lora_A", self.lora_A, self.lora_B)
        self.scale = lora_scale(site, plan)
        self.lora_dropout = adapter_dropout(plan)
        self.double_lora = (
            DoubleLoRA(site.svd_rank, site.keep_ratio, plan.refresh_every) if site.kind == "ce_lora" else None
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.site.rank}"

    def init_adapter(self, init: SeededInit, prefix: str) -> None:
        init_adapter_pair(init, f"{prefix}.lora_A", self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_adapter = self.lora_dropout(rows)
        if ops.use_triton(self.site.kernel, rows):
            y = self.fused(rows, x_adapter)
        else:
            y = LoRALinearFunction.apply(
                rows, x_adapter, self.weight, self.lora_A, self.lora_B, self.scale, self.double_lora
            )
        return y.view(*x.shape[:-1], self.out_features)

    def fused(self, rows: torch.Tensor, x_adapter: torch.Tensor) -> torch.Tensor:
        """The same product on the fused LoRA kernels (k2c.runtime.kernels.lora).

        CE-LoRA's refresh is counted here, when a forward will have an input gradient, rather than in the backward
        as the torch path counts it: the kernel chooses S inside the backward pass that reads dY.
        """
        d, weight = self.double_lora, self.weight
        celora = select = None
        if d is not None and torch.is_grad_enabled() and rows.requires_grad:
            if d.refresh_due(weight):
                def select(squared_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    d.select(weight, squared_norms.sqrt())
                    return d.kept, d.kept_rows

            celora = (d.kept, d.kept_rows, d.svd_B, d.svd_A)
        return lora_kernel.LoRALinearKernel.apply(rows, x_adapter, weight, self.lora_A, self.lora_B, self.scale,
                                                  celora, select)

    def merged(self) -> nn.Linear:
        """A plain linear holding this `.weight` (the same Parameter) with s B A folded in."""
        fold(self.weight, self.lora_B, self.lora_A, self.scale)
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = self.weight
        return linear


class LoRAExperts(Experts):
    """Routed experts with adapters on some of their projections (`sites`, by projection name).

    `LoRAExperts.adapt(experts)` turns an `Experts` into this class in place, the way torch.nn.utils.parametrize
    does, so that the stacked weights keep their names and identity; `merge` turns it back.
    """

    sites: dict[str, AdapterSite]
    scales: dict[str, float]
    lora_dropout: nn.ModuleDict
    double_lora: nn.ModuleDict

    @classmethod
    def adapt(cls, experts: Experts) -> LoRAExperts:
        if not isinstance(experts, cls):
            experts.__class__ = cls
            assert isinstance(experts, LoRAExperts)
            experts.sites = {}
            experts.scales = {}
            experts.lora_dropout = nn.ModuleDict()
            experts.double_lora = nn.ModuleDict()
        return experts

    def add_adapter(self, name: str, site: AdapterSite, plan: AdapterPlan, init: SeededInit | None = None) -> None:
        """An adapter on projection `name` (`gate_proj`, `up_proj` or `down_proj`) of every expert; `init` draws
        it as the model's (init_adapter_pair)."""
        weight = getattr(self, name).requires_grad_(False)
        experts, out_features, in_features = weight.shape
        device, dtype = weight.device, weight.dtype
        lora_A = nn.Parameter(torch.empty(experts, site.rank, in_features, device=device, dtype=dtype))
        lora_B = nn.Parameter(torch.empty(experts, out_features, site.rank, device=device, dtype=dtype))
        init_adapter_pair(init, f"{site.module}.{name}_lora_A", lora_A, lora_B, self.first_expert)
        self.register_parameter(f"{name}_lora_A", lora_A)
        self.register_parameter(f"{name}_lora_B", lora_B)
        self.sites[name] = site
        self.scales[name] = lora_scale(site, plan)
        self.lora_dropout[name] = adapter_dropout(plan)
        if site.kind == "ce_lora":
            self.double_lora[name] = DoubleLoRA(site.svd_rank, site.keep_ratio, plan.refresh_every)

    def adapter(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A [E, r, in] and B [E, out, r] of projection `name`."""
        return getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")

    def init_adapter(self, init: SeededInit, prefix: str) -> None:
        for name in self.sites:
            init_adapter_pair(init, f"{prefix}.{name}_lora_A", *self.adapter(name), self.first_expert)

    def project(self, name: str, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if name not in self.sites:
            return super().project(name, x, routing)
        if routing.fused:
            return moe_kernel.grouped_linear(x, getattr(self, name), routing.offsets, self.kernel_adapter(name),
                                             self.lora_dropout[name](x))
        double_lora = self.double_lora[name] if name in self.double_lora else None
        return ExpertLoRAFunction.apply(
            x, self.lora_dropout[name](x), getattr(self, name), *self.adapter(name), self.scales[name],
            routing.host_counts, double_lora,
        )

    def kernel_adapter(self, name: str) -> moe_kernel.ExpertAdapter:
        """Projection `name`'s adapter as the grouped kernels take it; CE-LoRA's residual chooses the kept channels
        from the per-expert channel norms, which the kernels compute only on a step that asks for them."""
        lora_A, lora_B = self.adapter(name)
        if name not in self.double_lora:
            return moe_kernel.ExpertAdapter(lora_A, lora_B, self.scales[name])
        double_lora, weight = self.double_lora[name], getattr(self, name)
        assert isinstance(double_lora, DoubleLoRA)

        def residual(channel_norm):
            if double_lora.refresh_due(weight):
                double_lora.select(weight, channel_norm())
            return double_lora.residual()

        return moe_kernel.ExpertAdapter(lora_A, lora_B, self.scales[name], residual)

    def fused_adapters(self) -> dict[str, moe_kernel.ExpertAdapter] | None:
        """LoRA and CE-LoRA without dropout run inside the fused experts; dropout's separate adapter input runs per
        projection (`project`), still on the grouped kernels."""
        if any(not isinstance(d, nn.Identity) for d in self.lora_dropout.values()):
            return None
        return {name: self.kernel_adapter(name) for name in self.sites}

    def merge(self) -> Experts:
        for name in self.sites:
            lora_A, lora_B = self.adapter(name)
            fold(getattr(self, name), lora_B, lora_A, self.scales[name])
            delattr(self, f"{name}_lora_A")
            delattr(self, f"{name}_lora_B")
        del self.sites, self.scales, self.lora_dropout, self.double_lora
        self.__class__ = Experts  # type: ignore[assignment]  # the reverse of `adapt`
        return self


def ce_lora_sites(model: nn.Module) -> list[tuple[DoubleLoRA, torch.Tensor]]:
    """Every CE-LoRA site of `model`: its DoubleLoRA and the frozen weight that it stands in for."""
    sites = []
    for module in model.modules():
        if isinstance(module, LoRALinear) and module.double_lora is not None:
            sites.append((module.double_lora, module.weight))
        elif isinstance(module, LoRAExperts):
            for name, double_lora in module.double_lora.items():
                assert isinstance(double_lora, DoubleLoRA)
                sites.append((double_lora, getattr(module, name)))
    return sites


class RefreshSteps:
    """The one place that says which training steps CE-LoRA chooses its kept channels in, seen from whole steps.

    Each site counts its own backward passes and chooses S (or factorises a W that changed) in the pass its count
    says (`DoubleLoRA.refresh_due`), in the step's Python. A step in which no site does either runs the same device
    work every time, so a CUDA graph of it may stand in for it (k2c.runtime.graph); the others must run eagerly
    (`eager_due`). A replayed step runs no Python, so `replayed` counts its passes for the sites. How many passes a
    step makes at a site (one per micro-batch, or none where the site's input needs no gradient) is measured on an
    eager step; until it is, every step runs eagerly.
    """

    def __init__(self, model: nn.Module):
        self.sites = ce_lora_sites(model)
        self.passes: list[int | None] = [None] * len(self.sites)  # per site, per step

    def eager_due(self) -> bool:
        """Whether the next step must run its Python: a site refreshes or factorises in it, or is not measured."""
        return any(n is None or (n > 0 and (d.weight_version != w._version or (-d.backwards) % d.refresh_every < n))
                   for (d, w), n in zip(self.sites, self.passes))

    def run_eager(self, step: Callable[[], T]) -> T:
        """Run one training step eagerly, measuring the passes of each site that does not factorise in it (which
        resets its count)."""
        before = [(d.weight_version, d.backwards) for d, _ in self.sites]
        out = step()
        for i, ((d, _), (version, backwards)) in enumerate(zip(self.sites, before)):
            if d.weight_version == version:
                self.passes[i] = d.backwards - backwards
        return out

    def replayed(self) -> None:
        """Count the passes of a step that a CUDA graph replayed (never one that `eager_due` sent to run eagerly)."""
        for (d, _), n in zip(self.sites, self.passes):
            assert n is not None, "a step was replayed before its passes were measured"
            d.backwards += n


def apply_adapters(model: nn.Module, plan: AdapterPlan) -> nn.Module:
    """Freeze the model and put an adapter on every `lora` / `ce_lora` site of the plan, in place.

    Sites that already have their adapter are left alone, so applying twice changes nothing. A new adapter of a
    CausalLM is drawn as `model.init_weights` draws it, from the model's seed.
    """
    if plan.kind == "none":
        return model
    model.requires_grad_(False)
    materialised = not any(local(p).is_meta for p in model.parameters())  # on meta, init_weights draws them later
    init = SeededInit(model.init_seed, model.plan.init_std) if isinstance(model, CausalLM) and materialised else None
    for site in plan.sites:
        if site.kind not in ("lora", "ce_lora"):
            continue
        if site.param is None:
            parent_name, _, child = site.module.rpartition(".")
            parent = model.get_submodule(parent_name)
            if not isinstance(getattr(parent, child), LoRALinear):
                setattr(parent, child, LoRALinear(getattr(parent, child), site, plan, init))
        else:
            stack = model.get_submodule(site.module)
            assert isinstance(stack, Experts)
            experts = LoRAExperts.adapt(stack)
            if site.param not in experts.sites:
                experts.add_adapter(site.param, site, plan, init)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold s B A into every adapted weight and put back plain `nn.Linear` / `Experts` modules, in place.

    The base weights keep their requires_grad (False after `apply_adapters`).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
        elif isinstance(module, LoRAExperts):
            module.merge()
    return model


# --------------------------------------------------------------------------- PEFT export

# transformers' DeepseekV3 experts register these in this order; PEFT wraps each targeted one around the previous
# wrapper, so the last one targeted is outermost and every earlier one sits one `base_layer.` deeper.
HF_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# PEFT on transformers 5.x rewrites `target_modules` entries with these names into targets of the fused experts
# (so that adapters trained on transformers 4's per-expert linears still load), which would also catch the dense
# MLP and the shared experts. Those linears are targeted through their weight, as parameters, instead.
HF_EXPERT_LINEAR_NAMES = ("gate_proj", "up_proj", "down_proj")


def peft_alpha(rank: int, scale: float, plan: AdapterPlan) -> float:
    """The lora_alpha that gives `scale` at `rank` under the plan's scaling rule."""
    return scale * math.sqrt(rank) if plan.rslora else scale * rank


def fused_expert_adapters(experts: LoRAExperts) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The adapters of transformers' fused expert tensors: {name: (A [E, r, in], B [E, out, r], scale)}.

    gate_up_proj [E, 2I, H] stacks gate over up, so (gate, up) adapters become one of rank r_gate + r_up:
    A = [A_gate; A_up] and B = [[B_gate, 0], [0, B_up]], whence B A = [B_gate A_gate; B_up A_up]. One scale s
    serves the pair, and each block of B carries its own s_proj / s (1 when the two sites agree, so it is exact).
    A projection without an adapter contributes zero rows of B and no rank.
    """
    fused = {}
    gate_up = [name for name in ("gate_proj", "up_proj") if name in experts.sites]
    if gate_up:
        scale = experts.scales[gate_up[0]]
        inter = experts.gate_proj.shape[1]
        As, Bs = [], []
        for name in gate_up:
            lora_A, lora_B = experts.adapter(name)
            block = lora_B.new_zeros(lora_B.shape[0], 2 * inter, lora_B.shape[2])
            rows = slice(0, inter) if name == "gate_proj" else slice(inter, 2 * inter)
            block[:, rows] = lora_B * (experts.scales[name] / scale)
            As.append(lora_A)
            Bs.append(block)
        fused["gate_up_proj"] = (torch.cat(As, dim=1), torch.cat(Bs, dim=2), scale)
    if "down_proj" in experts.sites:
        fused["down_proj"] = (*experts.adapter("down_proj"), experts.scales["down_proj"])
    return fused


@torch.no_grad()
def export_peft_adapter(model: nn.Module, directory: str | Path, plan: AdapterPlan,
                        base_model_name_or_path: str | None = None) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` for transformers' DeepseekV3ForCausalLM.

    `peft.PeftModel.from_pretrained(hf_model, directory)` then computes what this model computes. Linears are
    `target_modules`, except the MLP projections (see HF_EXPERT_LINEAR_NAMES); those and the routed experts,
    fused in transformers (see `fused_expert_adapters`), are `target_parameters`. PEFT's parameter adapters refuse
    dropout, so an adapter with any of them is written with lora_dropout 0 (dropout only matters in training).

    Per-module ranks and alphas go to rank_pattern / alpha_pattern (fully-qualified, escaped keys). PEFT also reads
    those patterns for parameter targets but checks them only against module names, so it would warn that a key
    for the fused experts "matched nothing" while applying it. Parameter targets therefore share the config's `r`
    and `lora_alpha`: each is zero-padded to the largest rank among them and its B carries the ratio of its scale
    to the shared one. Both are exact (padded rows of A meet zero columns of B).

    `base_model_name_or_path` defaults to the checkpoint that `load_hf_state_dict` last loaded into the model (the
    fine-tuning base, `training.init_from`), else stays null.
    """
    # (target, state-dict prefix, A, B, rank, alpha, scale, is a parameter target); experts: A [E, r, in], B [E, out, r]
    pieces: list[tuple[str, str, torch.Tensor, torch.Tensor, int, float, float, bool]] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            is_param = name.rpartition(".")[2] in HF_EXPERT_LINEAR_NAMES
            site = module.site
            pieces.append((f"{name}.weight" if is_param else name, name, module.lora_A, module.lora_B, site.rank,
                           site.alpha, lora_scale(site, plan), is_param))
        elif isinstance(module, LoRAExperts):
            fused = fused_expert_adapters(module)
            for depth, param in enumerate(p for p in reversed(HF_EXPERT_PARAMS) if p in fused):
                lora_A, lora_B, scale = fused[param]
                rank = lora_B.shape[-1]
                pieces.append((f"{name}.{param}", name + ".base_layer" * depth, lora_A, lora_B, rank,
                               peft_alpha(rank, scale, plan), scale, True))
    if not pieces:
        raise ValueError("the model has no adapters to export")

    # the config's r and lora_alpha: those every parameter target shares (the largest rank, its scale), else the plan's
    params = sorted(((rank, alpha, scale) for *_, rank, alpha, scale, is_param in pieces if is_param), reverse=True)
    r, lora_alpha, shared_scale = params[0] if params else (plan.rank, plan.alpha, 0.0)

    tensors, target_modules, target_parameters = {}, [], []
    rank_pattern, alpha_pattern = {}, {}
    for target, prefix, lora_A, lora_B, rank, alpha, scale, is_param in pieces:
        if is_param:
            target_parameters.append(target)
            if rank != r or scale != shared_scale:
                pad = r - rank
                lora_A = torch.cat([lora_A, lora_A.new_zeros(*lora_A.shape[:-2], pad, lora_A.shape[-1])], dim=-2)
                lora_B = torch.cat([lora_B * (scale / shared_scale), lora_B.new_zeros(*lora_B.shape[:-1], pad)], -1)
                rank = r
        else:
            target_modules.append(target)
            if rank != r:
                rank_pattern[re.escape(target)] = rank
            if alpha != lora_alpha:
                alpha_pattern[re.escape(target)] = alpha
        if lora_A.dim() == 3:
            # PEFT's expert adapter: A [E*r, in] with expert e's rows at e*r + j, B [out, r*E] with expert e's
            # column j at j*E + e
            experts, out_features, _ = lora_B.shape
            lora_A, lora_B = lora_A.reshape(experts * rank, -1), lora_B.permute(1, 2, 0).reshape(out_features, -1)
        tensors[f"base_model.model.{prefix}.lora_A.weight"] = lora_A.detach().cpu().contiguous()
        tensors[f"base_model.model.{prefix}.lora_B.weight"] = lora_B.detach().cpu().contiguous()

    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "loaded_from", None)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": plan.rslora,
        "lora_dropout": 0.0 if target_parameters else plan.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": target_modules,
        "target_parameters": target_parameters or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "adapter_model.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_atomic(directory / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
