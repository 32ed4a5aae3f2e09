"""MuonClip: Muon for the hidden matrices, AdamW for the rest, then the router-bias update and QK-Clip.

One torch.optim.Optimizer, after Kimi K2 (arXiv 2507.20534, Algorithm 1) and Moonlight (arXiv 2502.16982).
Which parameter goes where comes from the plan's parameter rules, and how each attention layer is clipped from
its clip sites and the attention's own `ClipPlan`; the compiler decided both.
"""

from __future__ import annotations

import functools
import math
import types
from collections import defaultdict
from fnmatch import fnmatchcase

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw as fused_adamw

from k2c.runtime.kernels import NS_BATCH_ELEMENTS
from k2c.runtime.kernels import newton_schulz as ns_kernels
from k2c.runtime.model import Attention, CausalLM
from k2c.runtime.ops import use_triton
from k2c.runtime.parallel import gather, local, owner_rounds, rows_of, scatter
from k2c.runtime.plan import GRAM, STANDARD, TRITON, OptimizerPlan, restart_segments



def distributed():
    return dist.is_available() and dist.is_initialized()


def lr_at(step: int, plan: OptimizerPlan) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then decay to lr * final_lr_ratio at decay_steps."""
    peak = plan.lr
    if step < plan.warmup_steps:
        return peak * (step + 1) / plan.warmup_steps
    if plan.decay == "constant":
        return peak
    floor = peak * plan.final_lr_ratio
    progress = min(1.0, (step - plan.warmup_steps) / max(1, plan.decay_steps - plan.warmup_steps))
    if plan.decay == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak + (floor - peak) * progress


def ns_dtype(device):
    """bf16 where matrix units make it fast (Muon's choice); fp32 on a CPU, where bf16 matmuls are emulated, slower."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def newton_schulz(u, steps, coefficients, dtype=torch.bfloat16, form=STANDARD):
    """Orthogonalise every matrix of `u` [..., n, m] with Muon's quintic Newton-Schulz iteration, in `dtype`.

    Leading dims are a batch: each matrix is normalised by its own Frobenius norm, so stacked experts never mix.
    The torch reference of the kernels in k2c/runtime/kernels/newton_schulz.py, and the path off CUDA.

    `form` says how (the group_params pass chooses it per parameter); in exact arithmetic both give the same X:
    - standard: X <- a X + (b G + c G^2) X with G = X X^T, a product with X [n, m] every step (Muon's, K2's);
    - gram: the steps run on the n x n matrices: with Z = a I + b R + c R^2, X <- Z X and R = X X^T <- Z R Z, as
      all of them are polynomials in R and commute; Q, the product of the Zs, meets X only at the end. For a wide X
      that is fewer multiply-adds. The iterates are rounded to `ns_kernels.gram_dtype` (fp16 for bf16), and every
      few steps (`restart_segments`) X is formed and its Gram matrix taken afresh, as Gram Newton-Schulz does
      (Dao AI Lab, 2026). Against an fp64 iteration, in bf16 on an H200, its error came to 0.22-1.06x the standard
      form's at 512 x 1536 and 0.8-1.17x at 1408 x 2048, over spectra from flat to decaying
      (benchmarks/newton_schulz_forms.py).
    """
    a, b, c = coefficients
    n, m = u.shape[-2:]
    x = u.float().reshape(-1, n, m)
    x = (x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)).to(dtype)
    if n > m:
        x = x.mT  # iterate on the wide orientation, so that the Gram matrix x x^T is the small one
    if form == GRAM:
        x = _gram_newton_schulz(x, steps, coefficients)
    else:
        for _ in range(steps):
            gram = x @ x.mT
            # x <- a x + (b gram + c gram^2) x, each fused product rounded to `dtype` once
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if n > m:
        x = x.mT
    return x.reshape(u.shape)


def orthogonalise(u, steps, coefficients, form=STANDARD):
    """`newton_schulz` of u [..., n, m] in `ns_dtype`, as fp32: on the Triton kernels where they run (`use_triton`)
    and take the shape (`ns_kernels.newton_schulz`, the reference's contract), else the torch reference. For a whole
    matrix gathered from its shards (`MuonClip._muon_sharded`)."""
    dtype = ns_dtype(u.device)
    r, c = u.shape[-2:]
    on_kernels = use_triton(TRITON, u) and ns_kernels.fits(min(r, c), max(r, c), dtype)
    return (ns_kernels.newton_schulz if on_kernels else newton_schulz)(u, steps, coefficients, dtype, form).float()


def _gram_newton_schulz(x, steps, coefficients):
    """The gram form of `newton_schulz` on wide matrices x [B, n, m] (n <= m)."""
    a, b, c = coefficients
    inner = ns_kernels.gram_dtype(x.dtype)
    eye = torch.eye(x.shape[-2], dtype=inner, device=x.device)
    for length in restart_segments(steps):
        # R from X in the iterates' dtype (for bf16 X, its fp16 copy): rounded to bf16 first, R would lose fp16's
        # extra bits; a normalised X's entries are far inside fp16's range
        x_inner = x.to(inner)
        r = x_inner @ x_inner.mT
        q = None
        for k in range(length):
            last = k == length - 1
            # Z = a I + b R + c R^2 as b (R + a/b I) + c R^2, the products in one fused rounding (adding a I to
            # the rounded Z instead doubled the error of an fp16 Z's diagonal, and the result's against fp64)
            base, beta = (torch.add(r, eye, alpha=a / b), b) if b else (eye * a, 1.0)
            z = torch.baddbmm(base, r, r, beta=beta, alpha=c)
            q = z if q is None else q @ z
            if not last:
                r = (z @ r) @ z
        x = q.to(x.dtype) @ x
    return x


def ns_batches(params, matrix_elements: int):
    """The matrices of `params` (all of one shape up to transposition) in batches of at most NS_BATCH_ELEMENTS
    elements, sized evenly: each batch a list of pieces (param, first, end), the range [first, end) of the param's
    stacked matrices."""
    counts = [p.numel() // matrix_elements for p in params]
    total = sum(counts)
    per_batch = max(1, NS_BATCH_ELEMENTS // matrix_elements)
    size = math.ceil(total / math.ceil(total / per_batch))
    batch, room = [], size
    for p, count in zip(params, counts):
        first = 0
        while first < count:
            end = first + min(count - first, room)
            batch.append((p, first, end))
            room -= end - first
            first = end
            if room == 0:
                yield batch
                batch, room = [], size
    if batch:
        yield batch


def param_groups(model, plan: OptimizerPlan):
    """Resolve the plan's rules over the trainable parameters: one group per (optimizer, weight decay, Newton-Schulz
    form) in use."""
    groups: dict[tuple[str, bool, str | None], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = next((r for r in plan.param_rules if fnmatchcase(name, r.pattern)), None)
        if rule is None:
            raise ValueError(f"trainable parameter {name!r} matches no parameter rule of the plan")
        form = plan.newton_schulz_form(name) if rule.optimizer == "muon" else None
        group = groups.setdefault(
            (rule.optimizer, rule.weight_decay, form),
            {
                "params": [],
                "kind": rule.optimizer,
                "weight_decay": plan.weight_decay if rule.weight_decay else 0.0,
                **({"newton_schulz": form} if form else {}),
            },
        )
        group["params"].append((name, param))
    return list(groups.values())


def write_back(params, masters) -> None:
    """Copy the fp32 masters onto those of `params` that are in a lower precision (fp32 ones are their masters)."""
    lower = [i for i, (p, master) in enumerate(zip(params, masters)) if master is not p]
    if lower:
        torch._foreach_copy_([params[i] for i in lower], [masters[i] for i in lower])


def fp32_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in fp32: fp32 ones themselves, the others copied in one foreach copy (a launch per tensor, for
    the dozens of small norm weights a model has, would cost more than the copying)."""
    out = [t if t.dtype == torch.float32 else torch.empty_like(t, dtype=torch.float32) for t in tensors]
    lower = [i for i, (t, copy) in enumerate(zip(tensors, out)) if copy is not t]
    if lower:
        torch._foreach_copy_([out[i] for i in lower], [tensors[i] for i in lower])
    return out


def fp32_grads(grads: list[torch.Tensor], grad_scale: torch.Tensor | None) -> list[torch.Tensor]:
    """The gradients in fp32 (fp32 ones themselves), times grad_scale if given: scaled in place as a clip would."""
    grads = fp32_copies(grads)
    if grad_scale is not None:
        torch._foreach_mul_(grads, grad_scale)
    return grads


Rows = tuple[int, int, int]  # (offset, count, stride): head h's rows [h*stride + offset, +count) of a weight
ROOT, GAMMA = 0, 1  # where a row range's factor lies in a head table [root | gamma | 1]: sqrt(gamma_h) or gamma_h


@functools.cache
def _row_sources(heads: int, ranges: tuple[tuple[Rows, int], ...], device: torch.device) -> torch.Tensor:
    """[heads * stride] int64: for each row of a weight, the index of its factor in a head table [root | gamma | 1]
    of 2 heads + 1 entries (ranges: (rows, ROOT or GAMMA); rows in no range take the 1). Made once per geometry, in
    the eager steps before a CUDA graph is captured."""
    stride = ranges[0][0][2]
    if any(rows[2] != stride for rows, _ in ranges):
        raise ValueError(f"scale_rows: row ranges of one weight must share its head stride, found {ranges}")
    index = torch.full((heads, stride), 2 * heads, dtype=torch.int64)
    for (offset, count, _), source in ranges:
        index[:, offset : offset + count] = torch.arange(heads)[:, None] + source * heads
    return index.view(-1).to(device)


def scale_rows(weight: torch.Tensor, table: torch.Tensor, ranges: tuple[tuple[Rows, int], ...]) -> None:
    """Multiply each row range of weight [heads*stride, in] by its factor per head, from the head table [root | gamma
    | 1] (ranges: (rows, ROOT or GAMMA)), on the rows this process holds when the weight is sharded: one gather of the
    rows' factors and one pass over the weight."""
    per_row = table[_row_sources((table.shape[0] - 1) // 2, ranges, table.device)]
    held = local(weight)
    held.mul_(rows_of(weight, per_row).to(held.device)[:, None])


def clip_heads(attention: Attention, gamma: torch.Tensor, table: torch.Tensor) -> None:
    """Scale every pre-softmax logit of head h of `attention` by gamma[h] (K2's per-head QK-Clip for MLA).

    The non-rotary query and key rows take sqrt(gamma) each and the rotary query rows take gamma; the rotary key
    (shared by all heads), the values and o_proj stay as they are, and so does the optimizer state. table: the head
    table [sqrt(gamma) | gamma | 1], which the caller makes for all layers at once.
    """
    clip = attention.plan.clip
    if clip.mode == "scale":
        # frozen q/k weights: the attention multiplies head h's logits by qk_scale[h]
        assert attention.qk_scale is not None
        scale = attention.qk_scale
        local(scale).mul_(rows_of(scale, gamma).to(local(scale).device))
        return
    scale_rows(attention.get_parameter(clip.q_weight), table,
               ((clip.q_sqrt_gamma_rows, ROOT), (clip.q_gamma_rows, GAMMA)))
    scale_rows(attention.get_parameter(clip.kv_weight), table, ((clip.kv_sqrt_gamma_rows, ROOT),))


class MuonClip(torch.optim.Optimizer):
    """Muon and AdamW groups in one optimizer; each step also moves the router biases and applies QK-Clip.

    Group "kind" is "muon" or "adamw"; a Muon group's "newton_schulz" names the form of its iteration
    (`newton_schulz`). PyTorch's conventions hold: each step uses its group's `lr`, which starts at
    the plan's peak lr and changes only when something sets it, a `torch.optim.lr_scheduler` (the spec's schedule is
    `build_scheduler`) or a user's own code. The step counter is kept in `state["step"]`, so that a state_dict round
    trip resumes exactly. Moments are fp32 whatever the parameter dtype.

    A step never waits for the device, so that a CUDA graph can capture it (k2c.runtime.graph). Each group's lr is
    a 0-dim fp64 tensor on its parameters' device, the same one for the whole life of the optimizer (`lrs`), which
    torch's schedulers fill in place. The step's report stays on the device too: `stats` holds the learning rate
    the last step used (the first group's), the number of heads it clipped and each layer's max logit, and
    `last_report` reads them back to the host for whoever logs them.
    """

    def __init__(self, model: CausalLM, groups, plan: OptimizerPlan):
        self._lrs: list[torch.Tensor] = []  # each group's lr tensor, in group order (`add_param_group` appends)
        super().__init__(groups, {"lr": plan.lr})
        self.model = model
        self.plan = plan
        self.state["step"] = 0  # type: ignore[index]  # the optimizer-wide counter beside per-tensor state
        # written in place by every step, eager or replayed: lr (fp64), clipped_heads (int64), max_logits [layers]
        self.stats: dict[str, torch.Tensor] | None = None
        self._taus: torch.Tensor | None = None  # [layers, 1] fp32: each attention's tau, inf where QK-Clip is off
        self._bias_rates: torch.Tensor | None = None  # [balanced MoE layers, 1]: each one's router bias rate
        self._step_factors: dict[tuple[int, ...], torch.Tensor] = {}  # `_step_sizes`' constants, fp64

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # fp64, so that the tensor holds the number a scheduler computed to the bit; filled on the device (a fill,
        # not a copy from the host)
        self._lrs.append(torch.full((), float(group["lr"]), dtype=torch.float64, device=group["params"][0].device))
        group["lr"] = self._lrs[-1]

    def lrs(self) -> list[torch.Tensor]:
        """Each group's lr tensor, the one the step reads (and a captured CUDA graph of it). A number, or another
        tensor, that a user's code put in a group in its place is copied into it, and the group holds it again."""
        for group, lr in zip(self.param_groups, self._lrs):
            if group["lr"] is not lr:
                lr.fill_(group["lr"])
                group["lr"] = lr
        return self._lrs

    @property
    def last_report(self) -> dict:
        """The last step's `stats` on the host (empty before the first step): reading them waits for the device,
        so read them where they are logged, not in the step."""
        if self.stats is None:
            return {}
        return {"step": self.state["step"], "lr": self.stats["lr"].item(),  # type: ignore[index]
                "clipped_heads": int(self.stats["clipped_heads"].item()),
                "max_logits": self.stats["max_logits"].tolist()}

    def count_replayed_step(self) -> None:
        """Count a step that a CUDA graph replayed: its device work ran, its Python (which counts steps) did not."""
        self.state["step"] += 1  # type: ignore[index]

    def state_of(self, p: torch.Tensor, kind: str) -> dict:
        """p's state, zeros on first use: Muon's fp32 momentum, or AdamW's step count and fp32 moments."""
        state = self.state[p]
        if not state:
            if kind == "muon":
                state["momentum"] = torch.zeros_like(p, dtype=torch.float32)
            else:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    def init_state(self) -> None:
        """Every parameter's state, so that a checkpoint can be read into it in place."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state_of(p, group["kind"])

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None):
        """One step. grad_scale (a 0-dim tensor on the parameters' device: the gradient clip's factor) is applied
        as the step reads each gradient, in fp32, where clipping first would take a pass over every gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is not None:
            grad_scale = grad_scale.float()
        for group, lr in zip(self.param_groups, self.lrs()):
            if group["kind"] == "muon":
                self._muon(group, lr, grad_scale)
            else:
                self._adamw(group, lr, grad_scale)
        self.state["step"] += 1  # type: ignore[index]
        self._update_router_bias()
        self._qk_clip()
        self.model.reset_step_stats()
        return loss

    def _muon(self, group, lr: torch.Tensor, grad_scale: torch.Tensor | None):
        """Muon over the group, batch by batch: on the Triton kernels where `use_triton` says (CUDA tensors, or
        K2C_KERNELS=triton) and they take the shape (`fits`), else in torch (the CPU, or K2C_KERNELS=torch)."""
        decay = group["weight_decay"]
        form = group.get("newton_schulz", STANDARD)  # a group a user added without one: the spec's default
        params = [p for p in group["params"] if p.grad is not None]
        sharded = [p for p in params if isinstance(p, DTensor)]
        if sharded:
            self._muon_sharded(sharded, lr, decay, grad_scale, form)
        by_shape = defaultdict(list)  # matrices of one shape share a batched Newton-Schulz, tall ones transposed
        for p in params:
            if not isinstance(p, DTensor):
                by_shape[tuple(sorted(p.shape[-2:]))].append(p)
        # the factors on the device, in fp64 from the lr and rounded once to fp32, as a number argument would be
        shrink = (1 - lr * decay).float()
        steps = self._step_sizes(lr, tuple(m for _, m in by_shape)).float()  # all shapes' at once
        for ((n, m), params), step in zip(by_shape.items(), steps):
            for batch in ns_batches(params, n * m):
                matrices = [self._matrices(p, first, end) for p, first, end in batch]
                weight = batch[0][0]
                if use_triton(TRITON, weight) and ns_kernels.fits(n, m, ns_dtype(weight.device)):
                    self._muon_fused(matrices, n, m, shrink, step, grad_scale, form)
                else:
                    self._muon_reference(matrices, shrink, step, grad_scale, form)

    def _muon_sharded(self, params, lr, decay, grad_scale: torch.Tensor | None, form: str):
        """Muon over FSDP2-sharded matrices: momentum on the local shards; each whole matrix (or stack of experts) is
        gathered, orthogonalised on one process of its mesh, and its update scattered back in shards."""
        mu, nesterov = self.plan.momentum, self.plan.nesterov
        for batch in owner_rounds(params):
            mine, full = batch[0].device_mesh.get_local_rank(), None
            for owner, p in enumerate(batch):
                momentum, grad = self.state_of(p, "muon")["momentum"], p.grad.float()
                if grad_scale is not None:
                    local(grad).mul_(grad_scale)  # p.grad itself when fp32, scaled as a clip would scale it
                momentum.mul_(mu).add_(grad)
                whole = gather(grad.add(momentum, alpha=mu) if nesterov else momentum, owner)
                full = whole if whole is not None else full
            # each process orthogonalises its own matrix of the round, all at the same time
            update = None if full is None else orthogonalise(full, self.plan.ns_steps, self.plan.ns_coefficients,
                                                             form)
            for owner, p in enumerate(batch):
                if owner == mine:
                    assert update is not None  # this process gathered and orthogonalised its own matrix
                    sent = update
                else:
                    sent = local(p).new_empty(p.shape, dtype=torch.float32)
                held = local(p)
                master = held.float()  # the shard itself when fp32
                (step,) = self._step_sizes(lr, (max(p.shape[-2:]),)).float()
                master.mul_((1 - lr * decay).float()).addcmul_(scatter(sent, p, owner), step)
                write_back([held], [master])

    def _step_sizes(self, lr: torch.Tensor, larger_dims: tuple[int, ...]) -> torch.Tensor:
        """The step for each of larger_dims, fp64, in one pass: an orthogonal n x m update has RMS 1/sqrt(max(n, m)),
        and the step brings it to AdamW's rms_scale. The factors are made once per set of dims, in the eager steps
        before a CUDA graph is captured."""
        factors = self._step_factors.get(larger_dims)
        if factors is None:
            factors = torch.tensor([self.plan.rms_scale * math.sqrt(m) for m in larger_dims], dtype=torch.float64,
                                   device=lr.device)
            self._step_factors[larger_dims] = factors
        return -lr * factors

    def _matrices(self, p, first, end):
        """Matrices [first, end) of p [..., r, c] as [end - first, r, c]: views of the weight and the momentum (written
        in place), the gradient."""
        state = self.state_of(p, "muon")
        r, c = p.shape[-2:]
        return (p.view(-1, r, c)[first:end], state["momentum"].view(-1, r, c)[first:end],
                p.grad.reshape(-1, r, c)[first:end])

    def _muon_fused(self, matrices, n, m, decay: torch.Tensor, step: torch.Tensor, grad_scale: torch.Tensor | None,
                    form: str):
        """The batch on the Triton kernels: a fused pass in, Newton-Schulz on the whole batch, a fused pass out.

        The passes launch once per piece (all or part of one stacked parameter), Newton-Schulz once for the batch.
        """
        counts = [w.shape[0] for w, _, _ in matrices]
        device = matrices[0][0].device
        x = torch.empty((sum(counts), n, m), device=device, dtype=ns_dtype(device))
        sumsq = torch.empty((sum(counts), ns_kernels.norm_tiles(n, m)), device=device, dtype=torch.float32)
        for (_, momentum, grad), rows, sums in zip(matrices, x.split(counts), sumsq.split(counts)):
            ns_kernels.muon_input(momentum, grad.contiguous(), self.plan.momentum, self.plan.nesterov, rows, sums,
                                  grad_scale)
        x = ns_kernels.newton_schulz_(x, self.plan.ns_steps, self.plan.ns_coefficients,
                                      ns_kernels.inverse_norms(sumsq), form)
        for (weight, _, _), update in zip(matrices, x.split(counts)):
            ns_kernels.muon_update(weight, update, decay, step)

    def _muon_reference(self, matrices, decay: torch.Tensor, step: torch.Tensor, grad_scale: torch.Tensor | None,
                        form: str):
        """The batch in torch: the momentum M = mu M + G (a plain sum) and W - lr (O + wd W) as foreach ops."""
        weights, momenta = [w for w, _, _ in matrices], [mom for _, mom, _ in matrices]
        grads = fp32_grads([g for _, _, g in matrices], grad_scale)
        mu = self.plan.momentum
        torch._foreach_mul_(momenta, mu)
        torch._foreach_add_(momenta, grads)
        inputs = torch._foreach_add(grads, momenta, alpha=mu) if self.plan.nesterov else momenta
        wide = torch.cat([u.mT if u.shape[-2] > u.shape[-1] else u for u in inputs])
        updates = newton_schulz(wide, self.plan.ns_steps, self.plan.ns_coefficients, ns_dtype(wide.device),
                                form).float()
        updates = [o.mT if w.shape[-2] > w.shape[-1] else o for w, o in
                   zip(weights, updates.split([w.shape[0] for w in weights]))]
        # W - lr * (O + wd * W): decoupled weight decay with the unscaled learning rate, in fp32
        masters = [w.float() for w in weights]  # the weights themselves when fp32
        torch._foreach_mul_(masters, decay)
        torch._foreach_mul_(updates, step)  # a tensor factor: foreach's alpha takes only numbers
        torch._foreach_add_(masters, updates)
        write_back(weights, masters)

    def _adamw(self, group, lr: torch.Tensor, grad_scale: torch.Tensor | None):
        """torch's fused AdamW: one kernel for all of the group's tensors, with fp32 moments (and fp32 arithmetic on
        an fp32 copy of any lower-precision parameter, written back rounded once)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self.state_of(p, "adamw") for p in params]
        held = [local(p) for p in params]  # the element-wise update runs on each process's shards
        masters = fp32_copies(held)  # the parameters themselves when fp32
        grads = fp32_grads([local(p.grad) for p in params], grad_scale)
        beta1, beta2 = self.plan.adamw_betas
        # the fused kernel reads a tensor lr on the GPU as fp32, where the CPU's reads the double it holds
        lr = lr if lr.device.type == "cpu" else lr.float()
        fused_adamw(
            masters, grads, [local(s["exp_avg"]) for s in states],
            [local(s["exp_avg_sq"]) for s in states], [], [s["step"] for s in states], fused=True, amsgrad=False,
            beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["weight_decay"], eps=self.plan.adamw_eps,
            maximize=False,
        )
        write_back(held, masters)

    def _update_router_bias(self):
        """Aux-loss-free balancing (DeepSeek-V3), every MoE layer at once: raise the bias of each layer's under-loaded
        experts by its plan's rate, lower the over-loaded ones'."""
        layers = [moe for moe in self.model.moe_layers().values() if moe.plan.router.bias_rate]
        if not layers:
            return
        loads = torch.stack([moe.expert_load for moe in layers])  # [layers, experts], a copy
        if distributed():
            dist.all_reduce(loads)  # every rank must move its biases alike
        if self._bias_rates is None:  # made in the eager steps before a CUDA graph is captured, then read in place
            rates = [[moe.plan.router.bias_rate] for moe in layers]
            self._bias_rates = torch.tensor(rates, dtype=loads.dtype, device=loads.device)
        moves = torch.sign(loads.mean(dim=1, keepdim=True) - loads) * self._bias_rates
        torch._foreach_add_([moe.gate.e_score_correction_bias for moe in layers], list(moves.unbind(0)))

    def _qk_clip(self) -> None:
        """Clip every head over tau, and write this step's `stats`."""
        # [layers, heads]: max over the micro-batches since the last step, and over ranks
        max_logits = self.model.step_max_logits().to(torch.float32, copy=True)
        if distributed():
            dist.all_reduce(max_logits, op=dist.ReduceOp.MAX)
        if self.stats is None:
            self.stats = {"lr": torch.zeros_like(self._lrs[0]),
                          "clipped_heads": torch.zeros((), dtype=torch.int64, device=max_logits.device),
                          "max_logits": max_logits.new_empty(max_logits.shape[0])}
        # every layer's heads at once, then a gather and a pass per weight: a step runs no kernel per head or range
        attentions = list(self.model.attentions())
        if self._taus is None:  # made in the eager steps before a CUDA graph is captured, then read in place
            taus = [[a.plan.clip.tau if a.plan.clip.mode != "off" else math.inf] for a in attentions]
            self._taus = torch.tensor(taus, dtype=torch.float32, device=max_logits.device)
        over = max_logits > self._taus
        gamma = torch.where(over, max_logits.reciprocal() * self._taus, 1.0)  # tau / logit, as a number would divide
        tables = torch.cat((gamma.sqrt(), gamma, gamma.new_ones(gamma.shape[0], 1)), dim=1)
        torch.sum(over, dim=(0, 1), out=self.stats["clipped_heads"])
        for attention, layer_gamma, table in zip(attentions, gamma, tables):
            if attention.plan.clip.mode != "off":
                clip_heads(attention, layer_gamma, table)
        self.stats["lr"].copy_(self._lrs[0])
        torch.amax(max_logits, dim=1, out=self.stats["max_logits"])

    def state_dict(self):
        state = super().state_dict()
        # numbers, as before the lr was a tensor: a checkpoint is the same whatever device wrote it
        state["param_groups"] = [{k: v.item() if torch.is_tensor(v) else v for k, v in group.items()}
                                 for group in state["param_groups"]]
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.lrs()  # the loaded numbers into the optimizer's own lr tensors
        # torch casts floating state to its parameter's dtype; put back the fp32 moments of bf16 parameters
        saved = state_dict["state"]
        indices = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for index, p in zip(indices, params):
            if index in saved:
                state = {k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in saved[index].items()}
                if "step" in state:  # AdamW's count, an fp32 tensor for the fused kernel (an int in older checkpoints)
                    state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=p.device)
                self.state[p] = state


def build_optimizer(model: CausalLM, plan: OptimizerPlan) -> MuonClip:
    """MuonClip over `model`'s trainable parameters, grouped as the compiler decided, every group at lr = plan.lr
    (the peak): the schedule is `build_scheduler`'s, or any torch.optim.lr_scheduler's."""
    return MuonClip(model, param_groups(model, plan), plan)


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """The spec's learning-rate schedule as a LambdaLR: group lr = its initial lr x lr_at(step) / plan.lr.

    For a group whose initial lr is plan.lr (every group of `build_optimizer`), the lr is lr_at(step) to the bit
    (not plan.lr x (lr_at / plan.lr), which may differ in the last place). Its state_dict (LambdaLR's: the step
    count, the initial lrs) rides in the optimizer's, under "scheduler", and loads with it: a training checkpoint,
    which saves the optimizer, resumes the schedule where it was.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: OptimizerPlan):
        self.plan = plan
        step = optimizer.step
        if not hasattr(step, "__func__") and not hasattr(step, "_wrapped_by_lr_sched"):
            # a step replaced by a plain function (a wrapper around the method): torch's schedulers wrap a method
            optimizer.step = types.MethodType(  # type: ignore[method-assign]
                lambda _, *args, **kwargs: step(*args, **kwargs), optimizer)
        for group in optimizer.param_groups:
            # the base lrs as numbers (torch would keep a copy of a tensor lr): the schedule is computed on the host
            # and each value filled into the group's lr tensor, which waits for nothing
            group.setdefault("initial_lr", float(group["lr"]))
        super().__init__(optimizer, lambda step: self.factor(step))
        optimizer.register_state_dict_post_hook(self._save_with)
        optimizer.register_load_state_dict_pre_hook(self._load_with)

    def _save_with(self, optimizer, state_dict: dict) -> dict:
        return {**state_dict, "scheduler": self.state_dict()}

    def _load_with(self, optimizer, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        if "scheduler" in state_dict:
            self.load_state_dict(state_dict.pop("scheduler"))
        return state_dict

    def factor(self, step: int) -> float:
        return lr_at(step, self.plan) / self.plan.lr if self.plan.lr else 0.0

    def lr(self, step: int, base_lr) -> float:
        return lr_at(step, self.plan) if base_lr == self.plan.lr else base_lr * self.factor(step)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [self.lr(self.last_epoch, base) for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("plan", None)  # the schedule itself comes from the plan it is built with, not from the file
        state["_last_lr"] = [float(lr) for lr in state["_last_lr"]]  # copies of the lr tensors: numbers on file
        return state

    def jump_to(self, step: int) -> None:
        """Set the schedule to `step` updates done (for a checkpoint that carries no scheduler state)."""
        self.last_epoch = step
        lrs: list = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)


def build_scheduler(optimizer: torch.optim.Optimizer, plan: OptimizerPlan) -> Schedule:
    """The plan's schedule (warm-up, decay; `lr_at`) on `optimizer`: a torch LambdaLR, stepped after each
    optimizer step. It sets every group's lr to the step-0 value at once."""
    return Schedule(optimizer, plan)
