"""The model parts of a DeepSeek-V3 / Kimi K2 architecture, each built from its plan record.

Parameter names mirror transformers' `DeepseekV3ForCausalLM` so that checkpoints map one to one, except that the
routed experts of a layer are stacked into `[E, out, in]` tensors. The numerics follow the same reference: RMSNorm
in fp32, MLA with interleaved (or half-split) RoPE and YaRN, a sigmoid router in fp32 with group-limited top-k,
SwiGLU experts, and an fp32 softmax, which is also where the per-head max logits that QK-Clip needs are read.

The wiring (which part feeds which) is not here: the generated package's `model.py` emits it from the IR, one line
per op, and calls these parts. `CausalLM` holds what every spec shares: embedding, the stack of layers, final norm,
head, the RoPE tables and the statistics MuonClip reads.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from k2c.runtime import ops
from k2c.runtime.kernels import moe as moe_kernel
from k2c.runtime.plan import AttentionPlan, LayerPlan, MLPPlan, ModelPlan, MoEPlan, NormPlan, RopePlan, RouterPlan


@dataclass
class Output:
    logits: torch.Tensor  # [batch, seq, vocab]
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100


@dataclass
class RopeTables:
    """cos and sin [seq, dr/2] for the positions of one forward."""

    cos: torch.Tensor
    sin: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, plan: NormPlan, device=None, dtype=None):
        super().__init__()
        self.eps, self.kernel, self.copies = plan.eps, plan.kernel, plan.copies
        self.weight = nn.Parameter(torch.ones(plan.dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The norm of x; a copy for each of its readers where fan_out_norms gave it several."""
        return ops.rmsnorm(x, self.weight, self.eps, self.kernel, self.copies)

    def add_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(residual + delta, this norm of it, a copy per reader): the wiring of a norm that fuse_residual_norm
        joined to its add."""
        return ops.add_rmsnorm(residual, delta, self.weight, self.eps, self.kernel, self.copies)


def linear(n_in: int, n_out: int, device=None, dtype=None) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)


# --------------------------------------------------------------------------- rotary embedding


def rope_frequencies(plan: RopePlan) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dr/2] (fp32, on the CPU whatever the default device) and YaRN's cos/sin factor.

    Without scaling these are the plain RoPE frequencies. With YaRN, each frequency is a blend of the original
    one (extrapolation, kept for fast-rotating dims) and the one divided by `factor` (interpolation, for dims
    that rotate less than `beta_slow` times over the original context), with a linear ramp in between.
    """
    dim = plan.dim
    theta_powers = plan.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    yarn = plan.yarn
    if yarn is None:
        return 1.0 / theta_powers, 1.0

    factor = yarn.factor

    def dim_with_rotations(rotations: float) -> float:
        # the rotary dim whose frequency turns `rotations` times over the original context
        wavelength = yarn.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(wavelength) / (2 * math.log(plan.theta))

    low = float(max(math.floor(dim_with_rotations(yarn.beta_fast)), 0))
    high = float(min(math.ceil(dim_with_rotations(yarn.beta_slow)), dim - 1))
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp
    inv_freq = (1.0 / (factor * theta_powers)) * (1 - keep_original) + (1.0 / theta_powers) * keep_original

    def mscale(scale: float) -> float:
        return 0.1 * scale * math.log(factor) + 1.0

    # transformers' rule: the mscale ratio when both are set, otherwise the plain YaRN attention factor
    if yarn.mscale and yarn.mscale_all_dim:
        attention_factor = mscale(yarn.mscale) / mscale(yarn.mscale_all_dim)
    else:
        attention_factor = mscale(1.0)
    return inv_freq, attention_factor


# --------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class Rotary:
    """What `Attention.rope` hands to `core`: the one rotary key all heads share, not rotated yet, and the tables.

    `core` rotates it and q's rotary dims (`ops.attention`: on the Triton path a pass over just those dims each way,
    beside kernels that read the rest of q, k and v in place).
    """

    k: torch.Tensor  # [b, t, dr]: a view of kv_a, its last dr dims
    tables: RopeTables


class Attention(nn.Module):
    """Multi-head latent attention (MLA): its projections, and the two steps between them (`rope`, `core`)."""

    qk_scale: torch.Tensor | None
    last_max_logit: torch.Tensor
    step_max_logit: torch.Tensor

    def __init__(self, plan: AttentionPlan, device=None, dtype=None):
        super().__init__()
        self.plan = plan
        dims = dict(device=device, dtype=dtype)
        self.heads = plan.heads
        self.dn, self.dr, self.dv = plan.qk_nope_head_dim, plan.qk_rope_head_dim, plan.v_head_dim
        q_dim = self.heads * (self.dn + self.dr)
        if plan.q_lora_rank is not None:
            assert plan.q_norm is not None
            self.q_a_proj = linear(plan.hidden_size, plan.q_lora_rank, **dims)
            self.q_a_layernorm = RMSNorm(plan.q_norm, **dims)
            self.q_b_proj = linear(plan.q_lora_rank, q_dim, **dims)
        else:
            self.q_proj = linear(plan.hidden_size, q_dim, **dims)
        self.kv_a_proj_with_mqa = linear(plan.hidden_size, plan.kv_lora_rank + self.dr, **dims)
        self.kv_a_layernorm = RMSNorm(plan.kv_norm, **dims)
        self.kv_b_proj = linear(plan.kv_lora_rank, self.heads * (self.dn + self.dv), **dims)
        self.o_proj = linear(self.heads * self.dv, plan.hidden_size, **dims)
        # QK-Clip's per-head logit factor when the q/k weights are frozen; folded into the q rows on export
        ones = torch.ones(self.heads, device=device, dtype=torch.float32)
        self.register_buffer("qk_scale", ones if plan.clip.mode == "scale" else None)
        no_logit = torch.full((self.heads,), -math.inf, device=device, dtype=torch.float32)
        self.register_buffer("last_max_logit", no_logit, persistent=False)
        self.register_buffer("step_max_logit", no_logit.clone(), persistent=False)

    def rope(self, q: torch.Tensor, kv_a: torch.Tensor, rope: RopeTables) -> Rotary:
        """The rotary key, kv_a's last dr dims, with the tables; `core` rotates it, and q's rotary dims where they lie
        in q [b, t, h*(dn+dr)]."""
        return Rotary(kv_a[..., self.plan.kv_lora_rank :], rope)

    def core(self, q: torch.Tensor, kv: torch.Tensor, rotary: Rotary) -> torch.Tensor:
        """Causal attention of q [b, t, h*(dn+dr)] over kv [b, t, h*(dn+dv)] -> [b, t, h*dv]; records max logits."""
        tables, rope = rotary.tables, self.plan.rope
        out, max_logit = ops.attention(q, rotary.k, kv, tables.cos, tables.sin, self.heads, rope.interleaved,
                                       self.plan.softmax_scale, self.qk_scale, self.plan.kernel)
        self.record_max_logit(max_logit)
        return out

    @torch.no_grad()
    def record_max_logit(self, max_logit: torch.Tensor) -> None:
        self.last_max_logit.copy_(max_logit)
        torch.maximum(self.step_max_logit, self.last_max_logit, out=self.step_max_logit)


# --------------------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """SwiGLU's three projections: down(silu(gate(x)) * up(x)); the dense layers and the shared experts."""

    def __init__(self, plan: MLPPlan, device=None, dtype=None):
        super().__init__()
        self.gate_proj = linear(plan.hidden_size, plan.intermediate_size, device, dtype)
        self.up_proj = linear(plan.hidden_size, plan.intermediate_size, device, dtype)
        self.down_proj = linear(plan.intermediate_size, plan.hidden_size, device, dtype)


class Router(nn.Module):
    """Sigmoid scores; the bias steers which experts are chosen but not how their outputs are weighted."""

    e_score_correction_bias: torch.Tensor

    def __init__(self, plan: RouterPlan, device=None):
        super().__init__()
        self.plan = plan
        # kept in fp32 whatever the model dtype, like the reference: routing decisions are sensitive to rounding
        fp32 = dict(device=device, dtype=torch.float32)
        self.weight = nn.Parameter(torch.empty(plan.experts, plan.hidden_size, **fp32))
        self.register_buffer("e_score_correction_bias", torch.zeros(plan.experts, **fp32))

    def forward(self, x: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> expert indices [N, k], combine weights [N, k] (fp32), tokens per expert [E].

        The GEMM is in fp32 either way; `fused` runs it on x as it is (moe.router_logits: no fp32 copy of x) and
        everything after it (sigmoid, bias, group-limited top-k, weights, counts) as one Triton kernel,
        k2c.runtime.kernels.moe.route.
        """
        plan = self.plan
        if fused:
            return moe_kernel.route(moe_kernel.router_logits(x, self.weight), self.e_score_correction_bias,
                                    plan.top_k, plan.groups, plan.groups_per_token, plan.normalize,
                                    plan.routed_scaling)
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        if plan.groups > 1:
            n, e = choice.shape
            by_group = choice.view(n, plan.groups, e // plan.groups)
            group_scores = by_group.topk(2, dim=-1).values.sum(dim=-1)
            best = group_scores.topk(plan.groups_per_token, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = by_group.masked_fill(~keep.unsqueeze(-1), -math.inf).view(n, e)
        experts = choice.topk(plan.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        if plan.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights * plan.routed_scaling, torch.bincount(experts.flatten(), minlength=plan.experts)


def sort_key_dtype(experts: int) -> torch.dtype:
    """The narrowest integer dtype that holds every expert index below `experts`."""
    return torch.uint8 if experts <= 256 else torch.int16 if experts <= 2**15 else torch.int32


@dataclass
class Routing:
    """Where the tokens of one MoE layer go: their (token, slot) pairs, k per token, grouped by expert.

    All of it stays on the device. Only the torch path's per-expert split reads the counts back (`host_counts`, one
    synchronisation per layer); the Triton path (`fused`) sizes its grids from N*k and E and never waits.
    """

    input: torch.Tensor  # [N, H]: the layer's input, a row per token
    order: torch.Tensor  # [N*k] int64: the (token, slot) position t*k + s of each row, rows in expert order
    offsets: torch.Tensor  # [E+1] int64: expert e owns rows offsets[e] to offsets[e+1]
    weights: torch.Tensor  # [N*k, 1] fp32: each row's combine weight
    shape: torch.Size  # of the layer's input
    top_k: int
    fused: bool  # the experts run on the Triton kernels of k2c.runtime.kernels.moe

    @cached_property
    def tokens(self) -> torch.Tensor:
        """[N*k, H]: the input rows in expert order (the fused experts read `input` in place instead)."""
        n, h = self.input.shape
        return self.input.unsqueeze(1).expand(n, self.top_k, h).reshape(n * self.top_k, h).index_select(0, self.order)

    @cached_property
    def host_counts(self) -> list[int]:
        """Rows per expert, on the host: what the torch path splits by."""
        return self.offsets.diff().tolist()

    def to_slots(self, y: torch.Tensor) -> torch.Tensor:
        """Expert rows y [N*k, H] -> [N, k, H] (fp32): each row times its weight, at its (token, slot) position."""
        # Only permutations move rows, never a scatter-add: gradients and outputs come out the same, bit for bit,
        # on every run and device (an index_add_ of k rows per token sums in whatever order its atomics land).
        y = y * self.weights
        # the result is its own tensor, not a view of one: FSDP2 cannot hook a module output that is a view
        slots = y.new_empty((y.shape[0] // self.top_k, self.top_k, y.shape[1]))
        slots.view(-1, y.shape[1]).index_copy_(0, self.order, y)
        return slots


class Experts(nn.Module):
    """The routed experts of one layer, stacked: expert e is a SwiGLU with weights [e] of each tensor."""

    # Under expert parallelism (k2c.runtime.parallel), the exchange that sends rows to the process holding their
    # expert and brings the outputs back; this module then holds only that process's experts.
    exchange: Callable[[Experts, Routing], torch.Tensor] | None = None
    first_expert: int = 0  # the index among all the layer's experts of the first one this module holds

    def __init__(self, plan: MoEPlan, device=None, dtype=None):
        super().__init__()
        self.plan = plan
        e, i, h = plan.experts, plan.intermediate_size, plan.hidden_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h, device=device, dtype=dtype))
        self.up_proj = nn.Parameter(torch.empty(e, i, h, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(e, h, i, device=device, dtype=dtype))

    def project(self, name: str, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [N*k, in], rows grouped by expert -> [N*k, out] through each row's expert's projection `name`."""
        if routing.fused:
            return moe_kernel.grouped_linear(x, getattr(self, name), routing.offsets)
        # unbind once: its backward writes the whole stack's gradient in one piece
        weights = getattr(self, name).unbind(0)
        return torch.cat([F.linear(rows, weights[e]) for e, rows in enumerate(x.split(routing.host_counts))])

    def forward(self, routing: Routing) -> torch.Tensor:
        """All the routed experts at once: [N, k, H], slot (t, s) the output of token t's s-th expert times its
        combine weight, for `MoE.combine` to sum."""
        if self.exchange is not None:
            return self.exchange(self, routing)
        return self.compute(routing)

    def compute(self, routing: Routing) -> torch.Tensor:
        """`forward` over the experts this module holds.

        On the Triton path this is one fused Function (gate/up GEMM with SwiGLU in its epilogue, reading each row's
        token from the input in place; down GEMM weighting and scattering its rows; see kernels/moe.py). Otherwise,
        and when an adapter needs the per-projection path (`fused_adapters`), it is the per-op wiring's project,
        swiglu, project, with the same numerics.
        """
        adapters = self.fused_adapters()
        if routing.fused and adapters is not None:
            return moe_kernel.swiglu_experts(routing.input, routing.weights.view(-1), routing.order, routing.offsets,
                                             routing.top_k, self.gate_proj, self.up_proj, self.down_proj, adapters)
        gate = self.project("gate_proj", routing.tokens, routing)
        up = self.project("up_proj", routing.tokens, routing)
        down = self.project("down_proj", ops.swiglu(gate, up, self.plan.kernel), routing)
        return routing.to_slots(down)

    def fused_adapters(self) -> dict[str, moe_kernel.ExpertAdapter] | None:
        """The adapters in the fused experts' terms, by projection; None if one must run per projection."""
        return {}


class MoE(nn.Module):
    gate: Router
    experts: Experts
    shared_experts: MLP | None
    expert_load: torch.Tensor

    def __init__(self, plan: MoEPlan, device=None, dtype=None):
        super().__init__()
        self.plan = plan
        self.gate = Router(plan.router, device)
        self.experts = Experts(plan, device, dtype)
        self.shared_experts = MLP(plan.shared, device, dtype) if plan.shared is not None else None
        # tokens routed to each expert since the last reset, for the aux-loss-free bias update
        load = torch.zeros(plan.experts, device=device, dtype=torch.float32)
        self.register_buffer("expert_load", load, persistent=False)

    def route(self, x: torch.Tensor) -> Routing:
        """Choose each token's experts and group the (token, slot) rows by expert, without leaving the device.

        The layer runs on the Triton kernels when the plan chose them and the input is on a GPU (or K2C_KERNELS
        forces them), as every op of k2c.runtime.ops decides.
        """
        flat = x.view(-1, x.shape[-1])
        fused = ops.use_triton(self.plan.kernel, flat)
        experts, weights, counts = self.gate(flat, fused)
        if self.training:
            with torch.no_grad():
                self.expert_load += counts
        # a stable radix sort makes a pass per byte of its keys: 1 for expert indices as bytes, 8 as int64
        order = experts.flatten().to(sort_key_dtype(self.plan.experts)).argsort(stable=True)
        offsets = F.pad(counts.cumsum(0), (1, 0))
        return Routing(flat, order, offsets, weights.flatten()[order].unsqueeze(1), x.shape, experts.shape[1], fused)

    def combine(self, y: torch.Tensor, routing: Routing, shared: torch.Tensor | None = None) -> torch.Tensor:
        """Sum each token's k weighted expert rows, add the shared experts' output.

        y is either the expert rows [N*k, H] in expert order (the per-op wiring: weighted and put in (token, slot)
        order here, in fp32) or `Experts.forward`'s [N, k, H], weighted and in place already, in the input's dtype.
        On the kernels, slots in the input's dtype are summed with the shared output in one pass (`combine_slots`);
        the per-op wiring's fp32 slots keep torch's sum, which rounds to the input's dtype once, after it.
        """
        slots = y if y.ndim == 3 else routing.to_slots(y)
        if routing.fused and slots.dtype == routing.input.dtype:
            flat = None if shared is None else shared.reshape(slots.shape[0], -1)
            return moe_kernel.combine_slots(slots, flat).view(routing.shape)
        out = slots.sum(dim=1).view(routing.shape).to(routing.input.dtype)
        return out if shared is None else out + shared


# --------------------------------------------------------------------------- initialisation


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: writes land in the DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def held_rows(t: torch.Tensor) -> range:
    """The indices along dim 0 of the whole of `t` that this process holds: all of them for a plain tensor, those
    of the local shard for a DTensor (sharded along dim 0 only, as FSDP2 shards)."""
    if not isinstance(t, DTensor):
        return range(t.shape[0])
    if any(isinstance(p, Shard) and p.dim != 0 for p in t.placements):
        raise ValueError(f"a tensor sharded as {t.placements}: only sharding along dim 0 is supported here")
    index = distribute_tensor(torch.arange(t.shape[0]), t.device_mesh, t.placements, src_data_rank=None).to_local()
    return range(int(index[0]), int(index[-1]) + 1) if len(index) else range(0)


class SeededInit:
    """Draws each parameter from generators of its own, seeded from the model's seed, the parameter's name and an
    index: each expert of a stack from one seeded with its index among all of its layer's experts, any other
    parameter block by block along dim 0, each block (BLOCK_ELEMENTS elements' worth of rows, at least a row) from
    one seeded with the block's index.

    The blocks depend on the parameter's shape alone, so a process that holds a shard of a parameter, or some
    experts of a stack, draws only the blocks its rows overlap, or its experts, and holds the values a single
    process's model holds there whatever the mesh; beyond its shards it holds one block at a time, never a whole
    parameter (the embedding is a few GB at Kimi K2's size).
    """

    BLOCK_ELEMENTS = 2**20  # 4 MB in fp32: what a draw holds beyond the shards

    def __init__(self, seed: int, std: float):
        self.seed, self.std = seed, std
        self.done: set[int] = set()  # ids of the tensors given their values

    def generator(self, name: str, device: torch.device, index: int) -> torch.Generator:
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{name}:{index}".encode()).digest()[:8], "little")
        return torch.Generator(device).manual_seed(seed)

    def draw(self, name: str, tensor: torch.Tensor, fill: Callable[[torch.Tensor, torch.Generator], object],
             first_expert: int | None = None) -> None:
        """Fill `tensor` (the model's `name`) in place, fill(values, generator) drawing a block of its rows at a
        time (so a block's values must not depend on the rows around it); with `first_expert`, a stack of experts
        from that one on, each expert's matrix filled apart."""
        piece = local(tensor)
        held = held_rows(tensor)
        if first_expert is not None:
            for i, row in enumerate(held):
                fill(piece[i], self.generator(name, piece.device, first_expert + row))
        else:
            rows = max(1, self.BLOCK_ELEMENTS // max(1, math.prod(tensor.shape[1:])))
            for block in range(held.start // rows, math.ceil(held.stop / rows)):
                start, stop = block * rows, min((block + 1) * rows, tensor.shape[0])
                # drawn whole even where a shard's edge cuts it: the values of a draw depend on its size
                values = piece.new_empty((stop - start, *tensor.shape[1:]))
                fill(values, self.generator(name, piece.device, block))
                begin, end = max(start, held.start), min(stop, held.stop)
                piece[begin - held.start : end - held.start].copy_(values[begin - start : end - start])
                del values  # freed before the next block is made, not after
        self.done.add(id(tensor))

    def normal(self, name: str, tensor: torch.Tensor, first_expert: int | None = None) -> None:
        self.draw(name, tensor, lambda t, g: t.normal_(0.0, self.std, generator=g), first_expert)

    def constant(self, tensor: torch.Tensor, value: float) -> None:
        local(tensor).fill_(value)
        self.done.add(id(tensor))


def draw_seed() -> int:
    """A model's seed from torch's global generator, which torch.manual_seed sets."""
    return int(torch.randint(2**62, (), device="cpu"))


@runtime_checkable
class Adapted(Protocol):
    """A module with adapter tensors beside its base weights (k2c.runtime.adapters): it draws those itself."""

    def init_adapter(self, init: SeededInit, prefix: str) -> None: ...


# --------------------------------------------------------------------------- the model


class DecoderLayer(nn.Module):
    """A decoder layer's parts under their checkpoint names; its forward is emitted per spec."""

    input_layernorm: RMSNorm
    self_attn: Attention
    post_attention_layernorm: RMSNorm
    mlp: MLP | MoE

    def __init__(self, plan: LayerPlan, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(plan.attn_norm, device, dtype)
        self.self_attn = Attention(plan.attention, device, dtype)
        self.post_attention_layernorm = RMSNorm(plan.mlp_norm, device, dtype)
        self.mlp = MoE(plan.mlp, device, dtype) if isinstance(plan.mlp, MoEPlan) else MLP(plan.mlp, device, dtype)


class Decoder(nn.Module):
    layers: nn.ModuleList

    def __init__(self, plan: ModelPlan, layer_types: Sequence[type[DecoderLayer]], device=None, dtype=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(plan.vocab_size, plan.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            layer_type(layer, device, dtype) for layer_type, layer in zip(layer_types, plan.layers, strict=True)
        )
        self.norm = RMSNorm(plan.norm, device, dtype)


class CausalLM(nn.Module):
    """The causal LM. `device="meta"` builds any size without allocating; the router stays fp32 in any dtype.

    `layer_types[i]` is the class (emitted per spec) whose forward wires layer i.
    """

    init_seed: int  # what init_weights drew from

    def __init__(self, plan: ModelPlan, layer_types: Sequence[type[DecoderLayer]], device=None, dtype=None):
        super().__init__()
        # drawn first: torch's own modules draw their default init from the global generator when not on meta
        seed = draw_seed()
        self.plan = plan
        self.model = Decoder(plan, layer_types, device, dtype)
        self.lm_head = linear(plan.hidden_size, plan.vocab_size, device, dtype)
        if plan.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # a constant of the plan, kept off the module's buffers so that meta construction and `to_empty`
        # cannot leave it uninitialised
        self.inv_freq, self.attention_factor = rope_frequencies(plan.layers[0].attention.rope)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initial values for every tensor: normal(0, init_std) for the matrices (each routed expert's apart), ones
        for norm gains and QK-Clip scales, a zero router bias, PEFT's init for adapters; see SeededInit.

        `seed` None draws one from torch's global generator, so that torch.manual_seed decides the model. It is
        kept as `init_seed`: `init_weights(model.init_seed)` gives the same values again, which is how a model built
        on the meta device, sharded and materialised with `to_empty` gets the values of one built whole.
        """
        self.init_seed = draw_seed() if seed is None else seed
        if any(local(p).is_meta for p in self.parameters()):
            return
        init = SeededInit(self.init_seed, self.plan.init_std)
        for prefix, module in self.named_modules():
            if isinstance(module, Adapted):
                module.init_adapter(init, prefix)
            for name, param in module.named_parameters(prefix, recurse=False):
                if id(param) in init.done:  # an adapter's, or the tied head (the embedding)
                    continue
                if isinstance(module, RMSNorm):
                    init.constant(param, 1.0)
                elif isinstance(module, Experts):
                    init.normal(name, param, module.first_expert)
                else:
                    init.normal(name, param)
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
            elif isinstance(module, Attention):
                if module.qk_scale is not None:
                    module.qk_scale.fill_(1.0)
                module.last_max_logit.fill_(-math.inf)
        self.reset_step_stats()

    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty, the head kept tied to the embedding: leaving the meta device makes new parameters."""
        super().to_empty(device=device, recurse=recurse)
        if self.plan.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        return self

    def rope(self, input_ids: torch.Tensor) -> RopeTables:
        """cos and sin for positions 0..seq-1, computed in fp32 then cast to the model's dtype, as the reference."""
        device, dtype = input_ids.device, self.lm_head.weight.dtype
        positions = torch.arange(input_ids.shape[1], device=device, dtype=torch.float32)
        if self.inv_freq.device != device:
            # moved once: a copy from the host in every forward would wait for the device (and cannot be captured)
            self.inv_freq = self.inv_freq.to(device)
        angles = positions[:, None] * self.inv_freq[None, :]
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return RopeTables(cos.to(dtype), sin.to(dtype))

    def decoder_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.model.layers if isinstance(layer, DecoderLayer)]

    def attentions(self) -> list[Attention]:
        return [layer.self_attn for layer in self.decoder_layers()]

    def moe_layers(self) -> dict[int, MoE]:
        return {i: layer.mlp for i, layer in enumerate(self.decoder_layers()) if isinstance(layer.mlp, MoE)}

    def max_logits(self) -> torch.Tensor:
        """[layers, heads]: the largest pre-softmax logit of each head in the last forward."""
        return torch.stack([attn.last_max_logit for attn in self.attentions()])

    def step_max_logits(self) -> torch.Tensor:
        """[layers, heads]: the running maximum since the last `reset_step_stats()`."""
        return torch.stack([attn.step_max_logit for attn in self.attentions()])

    def expert_loads(self) -> dict[int, torch.Tensor]:
        """{layer index: tokens routed to each expert [E]} counted in training mode since the last reset."""
        return {i: moe.expert_load.clone() for i, moe in self.moe_layers().items()}

    @torch.no_grad()
    def reset_step_stats(self) -> None:
        # foreach: a kernel for all layers, not one per layer (zero first, so that a NaN max is reset too); torch's
        # foreach ops refuse empty lists (a model without MoE layers)
        maxima = [attn.step_max_logit for attn in self.attentions()]
        loads = [moe.expert_load for moe in self.moe_layers().values()]
        if maxima:
            torch._foreach_zero_(maxima)
            torch._foreach_sub_(maxima, math.inf)
        if loads:
            torch._foreach_zero_(loads)
