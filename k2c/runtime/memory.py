"""How much memory a training step takes on each device, from the plan alone: what `k2c inspect --world N` shows.

The layout is k2c.runtime.parallel's: N processes form a (data_shard x expert) mesh; each forward reads
`training.batch_size / N` sequences on each process. At N = 1 the model is a plain module; above, every parameter
is sharded with FSDP2 over all N processes (dim 0, padded to a multiple of N), except the routed experts, which are
split over the `expert` processes and sharded over the `data_shard` ones. Counted, for a CUDA device:

- weights, gradients (trainable parameters only, in the parameter dtype) and the optimizer state (Muon: an fp32
  momentum per matrix; AdamW: two fp32 moments and a step count): this process's shards;
- buffers: the model's own (router biases, QK-Clip's statistics) and CE-LoRA's SVD pairs and kept rows, computed
  from the gathered weight, so held whole (for a process's own experts);
- activations: what autograd keeps for the backward of one forward, op by op as the plan's kernels keep it (the
  Triton kernels keep less than the torch reference: no attention scores, no fp32 copies in RMSNorm); a layer in
  `recompute_layers` keeps only its input; under expert parallelism, the rows that travel to and from the experts
  (with even expert loads);
- working memory, in the two phases that can set the peak. At the start of the backward: the cross-entropy's
  gradient [tokens, vocab] (in the logits' dtype from the fused kernel, two fp32 ones from the reference), or later
  the recomputed layer's activations;
  CE-LoRA's first factorisation; FSDP2's gathered units (the root, that is the embedding, final norm and head, is
  not resharded after the forward; a layer with its experts, and the next layer prefetched) and unsharded
  gradients (the root's, held to the backward's end, and one unit's with their reduce_dtype copy). In the
  optimizer step: one batch of whole matrices under Newton-Schulz (bf16, at most NS_BATCH_ELEMENTS elements, on
  the process that orthogonalises them; two n x n buffers in the standard form, four in the Gram form), or
  AdamW's fp32 copies of bf16 parameters and gradients. Both phases hold cuBLAS's workspaces.

The peak is the larger phase. Left out: the CUDA context and allocator fragmentation (outside
torch.cuda.max_memory_allocated too), Triton's autotuning, gradient clipping's per-tensor norms, the collectives'
own buffers, and the temporaries inside one layer's backward, which stay below the activations that the layers
after it have already freed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

from k2c.runtime.kernels import NS_BATCH_ELEMENTS
from k2c.runtime.mesh import LayoutError, mesh_shape
from k2c.runtime.plan import (
    STANDARD,
    TRITON,
    AdapterSite,
    AttentionPlan,
    LayerPlan,
    MLPPlan,
    MoEPlan,
    NormPlan,
    Plan,
)

GIB = 2**30
H200_USABLE = 139 * GIB  # of an H200's 141 GB, what a training process can allocate
# cuBLAS keeps a 32 MiB workspace (on Hopper) through the caching allocator for each thread that runs GEMMs: the
# forward's, and autograd's backward thread
CUBLAS_WORKSPACES = 2 * 32 * 2**20
BYTES = {"float32": 4, "bfloat16": 2}
FP32, INT64 = 4, 8


@dataclass(frozen=True)
class Param:
    """One parameter of the built model, as named by `named_parameters()`."""

    name: str
    shape: tuple[int, ...]
    size: int  # bytes per element
    unit: str  # its FSDP2 unit: "root" (embedding, final norm, head), "layer.i", or "experts.i" (routed experts)
    optimizer: str | None  # "muon" or "adamw"; None: frozen

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parameters(plan: Plan) -> list[Param]:
    """Every parameter the generated model registers, with the optimizer the plan's rules give it."""
    model, adapter = plan.model, plan.adapter
    trains_base = adapter.kind == "none"  # an adapter spec freezes the whole base model
    size = BYTES[plan.training.dtype]
    found: list[Param] = []

    def rule(name: str) -> str:
        for r in plan.optimizer.param_rules:
            if fnmatchcase(name, r.pattern):
                return r.optimizer
        raise ValueError(f"trainable parameter {name!r} matches no parameter rule of the plan")

    def add(name: str, shape: tuple[int, ...], unit: str, trains: bool = trains_base, elem: int = size) -> None:
        found.append(Param(name, shape, elem, unit, rule(name) if trains else None))

    sites = {(s.module, s.param): s for s in adapter.sites if s.kind in ("lora", "ce_lora")}

    def linear(module: str, n_in: int, n_out: int, unit: str) -> None:
        add(f"{module}.weight", (n_out, n_in), unit)
        site = sites.get((module, None))
        if site is not None:
            add(f"{module}.lora_A", (site.rank, n_in), unit, True)
            add(f"{module}.lora_B", (n_out, site.rank), unit, True)

    def norm(module: str, dim: int, unit: str) -> None:
        add(f"{module}.weight", (dim,), unit)

    def swiglu(module: str, mlp: MLPPlan, unit: str) -> None:
        linear(f"{module}.gate_proj", mlp.hidden_size, mlp.intermediate_size, unit)
        linear(f"{module}.up_proj", mlp.hidden_size, mlp.intermediate_size, unit)
        linear(f"{module}.down_proj", mlp.intermediate_size, mlp.hidden_size, unit)

    h = model.hidden_size
    add("model.embed_tokens.weight", (model.vocab_size, h), "root")
    for i, layer in enumerate(model.layers):
        at, unit = f"model.layers.{i}", f"layer.{i}"
        a = layer.attention
        norm(f"{at}.input_layernorm", h, unit)
        q_out = a.heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        if a.q_lora_rank is not None:
            linear(f"{at}.self_attn.q_a_proj", h, a.q_lora_rank, unit)
            norm(f"{at}.self_attn.q_a_layernorm", a.q_lora_rank, unit)
            linear(f"{at}.self_attn.q_b_proj", a.q_lora_rank, q_out, unit)
        else:
            linear(f"{at}.self_attn.q_proj", h, q_out, unit)
        linear(f"{at}.self_attn.kv_a_proj_with_mqa", h, a.kv_lora_rank + a.qk_rope_head_dim, unit)
        norm(f"{at}.self_attn.kv_a_layernorm", a.kv_lora_rank, unit)
        linear(f"{at}.self_attn.kv_b_proj", a.kv_lora_rank, a.heads * (a.qk_nope_head_dim + a.v_head_dim), unit)
        linear(f"{at}.self_attn.o_proj", a.heads * a.v_head_dim, h, unit)
        norm(f"{at}.post_attention_layernorm", h, unit)
        mlp = layer.mlp
        if isinstance(mlp, MLPPlan):
            swiglu(f"{at}.mlp", mlp, unit)
            continue
        add(f"{at}.mlp.gate.weight", (mlp.experts, h), unit, elem=FP32)  # the router stays fp32
        stack, experts = f"{at}.mlp.experts", f"experts.{i}"
        e, inter = mlp.experts, mlp.intermediate_size
        shapes = {"gate_proj": (e, inter, h), "up_proj": (e, inter, h), "down_proj": (e, h, inter)}
        for name, shape in shapes.items():
            add(f"{stack}.{name}", shape, experts)
        for name, shape in shapes.items():
            site = sites.get((stack, name))
            if site is not None:
                add(f"{stack}.{name}_lora_A", (e, site.rank, shape[2]), experts, True)
                add(f"{stack}.{name}_lora_B", (e, shape[1], site.rank), experts, True)
        if mlp.shared is not None:
            swiglu(f"{at}.mlp.shared_experts", mlp.shared, unit)
    norm("model.norm", h, "root")
    if not model.tie_embeddings:
        linear("lm_head", h, model.vocab_size, "root")
    return found


# --------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Mesh:
    world: int
    data_shard: int
    expert: int
    sequences: int  # per process and forward

    def local_numel(self, p: Param) -> int:
        """Elements of p this process holds: FSDP2's dim-0 shard, padded (a process's own experts, sharded over
        its column, for a routed-expert stack)."""
        shape, shards = p.shape, self.world
        if p.unit.startswith("experts."):
            shape, shards = (shape[0] // self.expert, *shape[1:]), self.data_shard
        return -(-shape[0] // shards) * math.prod(shape[1:])

    def gathered_numel(self, p: Param) -> int:
        """Elements of p while its unit is all-gathered: whole, or a process's own experts."""
        return p.numel // self.expert if p.unit.startswith("experts.") else p.numel


def smallest_world(plan: Plan) -> int:
    """The fewest processes the plan's mesh takes: 1 unless the spec sets parallel.expert or data_shard."""
    return plan.parallel.expert * (plan.parallel.data_shard or 1)


def mesh(plan: Plan, world: int) -> Mesh:
    """The mesh of `world` processes, or a LayoutError saying which setting does not fit (as `k2c train` would)."""
    if world < 1:
        raise LayoutError("--world", f"expected at least 1 process, found {world}")
    data_shard, expert = mesh_shape(plan, world)
    return Mesh(world, data_shard, expert, plan.training.batch_size // world)


# --------------------------------------------------------------------------- activations


class Tensor:
    """A tensor of the forward: its storage's bytes and whether it requires grad. Identity is the storage's."""

    __slots__ = ("nbytes", "grad")

    def __init__(self, nbytes: int, grad: bool):
        self.nbytes, self.grad = nbytes, grad


class Forward:
    """One forward on one process, op by op as the runtime runs it: each op's outputs, and the tensors autograd
    keeps for its backward (`save`), counted once however many ops keep them. Sizes follow the reference
    implementation (k2c.runtime.model, ops, adapters) and the Triton kernels' autograd Functions."""

    def __init__(self, plan: Plan, mesh: Mesh, reference: bool):
        self.plan, self.mesh, self.reference = plan, mesh, reference
        self.size = BYTES[plan.training.dtype]
        self.seq = plan.training.seq_len
        self.tokens = mesh.sequences * self.seq
        self.trains_base = plan.adapter.kind == "none"
        self.sites = {(s.module, s.param): s for s in plan.adapter.sites if s.kind in ("lora", "ce_lora")}
        self.saved: dict[int, Tensor] = {}
        rope = plan.model.layers[0].attention.rope.dim
        self.rope_tables = Tensor(2 * self.seq * rope // 2 * self.size, False)  # cos and sin, shared by all layers

    def triton(self, kernel: str) -> bool:
        return kernel == TRITON and not self.reference

    def new(self, per_token: int, grad: bool, size: int | None = None) -> Tensor:
        return Tensor(self.tokens * per_token * (self.size if size is None else size), grad)

    def save(self, *tensors: Tensor) -> None:
        for t in tensors:
            self.saved[id(t)] = t

    def total(self) -> int:
        return sum(t.nbytes for t in self.saved.values())

    # ops ------------------------------------------------------------------------------------------------------

    def norm(self, x: Tensor, dim: int, plan: NormPlan) -> Tensor:
        """RMSNorm over the first `dim` columns of x (all of them, or kv_a's latent part: a view of its storage)."""
        trains = self.trains_base
        if self.triton(plan.kernel):
            if x.grad or trains:
                self.save(x, self.new(1, False, FP32))  # x's rows and 1/rms
        else:
            # normalised in fp32: x itself when it is fp32 (all of its storage), else an fp32 copy of the columns
            x32 = x if self.size == FP32 else self.new(dim, x.grad, FP32)
            if x.grad:
                self.save(x32, self.new(1, True, FP32))  # and 1/rms
            if trains:
                self.save(self.new(dim, x.grad))  # the normalised x, for the gain's gradient
        return self.new(dim, x.grad or trains)

    def linear(self, x: Tensor, n_in: int, n_out: int, module: str) -> Tensor:
        site = self.sites.get((module, None))
        if site is None:
            if self.trains_base:
                self.save(x)
            return self.new(n_out, x.grad or self.trains_base)
        self.lora_inputs(x, n_in, site)
        return self.new(n_out, True)

    def lora_inputs(self, x: Tensor, n_in: int, site: AdapterSite, rows: int = 1) -> None:
        """A LoRA product keeps X' (dropout(X), or X) for dA and X' A^T for dB, with `rows` rows per token."""
        dropout = self.plan.adapter.dropout > 0
        x_adapter = self.new(rows * n_in, x.grad) if dropout else x
        if dropout and x.grad:
            self.save(self.new(rows * n_in, False, 1))  # dropout's mask
        self.save(x_adapter, self.new(rows * site.rank, True))

    def swiglu(self, gate: Tensor, up: Tensor, inter: int, kernel: str, rows: int = 1) -> Tensor:
        grad = gate.grad or up.grad
        if self.triton(kernel):
            if grad:
                self.save(gate, up)
        else:  # silu(gate) * up: silu keeps gate, the product keeps both of its factors
            silu = self.new(rows * inter, gate.grad)
            if gate.grad:
                self.save(gate)
            if up.grad:
                self.save(silu)
            if silu.grad:
                self.save(up)
        return self.new(rows * inter, grad)

    def mlp(self, x: Tensor, plan: MLPPlan, module: str) -> Tensor:
        h, inter = plan.hidden_size, plan.intermediate_size
        gate = self.linear(x, h, inter, f"{module}.gate_proj")
        up = self.linear(x, h, inter, f"{module}.up_proj")
        return self.linear(self.swiglu(gate, up, inter, plan.kernel), inter, h, f"{module}.down_proj")

    def attention(self, x: Tensor, a: AttentionPlan, at: str) -> Tensor:
        heads = a.heads
        dn, dr, dv = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        if a.q_lora_rank is not None:
            assert a.q_norm is not None
            q_a = self.linear(x, a.hidden_size, a.q_lora_rank, f"{at}.q_a_proj")
            q = self.linear(self.norm(q_a, a.q_lora_rank, a.q_norm), a.q_lora_rank, heads * (dn + dr),
                            f"{at}.q_b_proj")
        else:
            q = self.linear(x, a.hidden_size, heads * (dn + dr), f"{at}.q_proj")
        kv_a = self.linear(x, a.hidden_size, a.kv_lora_rank + dr, f"{at}.kv_a_proj_with_mqa")
        kv_norm = self.norm(kv_a, a.kv_lora_rank, a.kv_norm)
        kv = self.linear(kv_norm, a.kv_lora_rank, heads * (dn + dv), f"{at}.kv_b_proj")
        if q.grad or kv_a.grad:  # RoPE keeps only its cos/sin tables
            self.save(self.rope_tables)
        grad = q.grad or kv.grad or kv_a.grad
        b, t = self.mesh.sequences, self.seq
        if self.triton(a.kernel):
            out = self.new(heads * dv, grad)
            if grad:  # q and kv read in place, the rotated dims of q and of the key, the output, the log-sum-exp
                self.save(q, kv, self.new(heads * dr, False), self.new(dr, False), out,
                          self.new(heads, False, FP32))
        else:
            # q and k new [b, h, t, dn+dr] tensors; the scores materialised: the causal mask, fp32 softmax (and its
            # cast to the dtype); v, a view of kv, copied to batch it
            q_cat = self.new(heads * (dn + dr), q.grad)
            k_cat = self.new(heads * (dn + dr), kv.grad or kv_a.grad)
            if grad:
                self.save(q_cat, k_cat, Tensor(t * t, False), Tensor(b * heads * t * t * FP32, True),
                          self.new(heads * dv, True))
                if self.size != FP32:
                    self.save(Tensor(b * heads * t * t * self.size, True))
            out = self.new(heads * dv, grad)  # [b, t, h*dv]: the attention's output transposed into a new tensor
        return self.linear(out, heads * dv, a.hidden_size, f"{at}.o_proj")

    def moe(self, x: Tensor, plan: MoEPlan, at: str) -> Tensor:
        h, e, k = plan.hidden_size, plan.experts, plan.router.top_k
        fused = self.triton(plan.kernel)
        # the router's product in fp32 (x itself when fp32); only the indices leave the choice of experts, so the
        # graph of that choice (group scores, masks, top-k) is dropped at once
        x32 = x if self.size == FP32 else self.new(h, x.grad, FP32)
        if self.trains_base:
            self.save(x32)
        logits = self.new(e, x.grad or self.trains_base, FP32)
        if logits.grad:
            indices = self.new(k, False, INT64)
            if fused:
                self.save(logits, indices)
            else:
                self.save(self.new(e, True, FP32), indices)  # sigmoid's output, gathered from at the indices
                if plan.router.normalize:
                    self.save(self.new(k, True, FP32), self.new(1, True, FP32))  # the division's two operands
        order = self.new(k, False, INT64)  # the (token, slot) rows grouped by expert
        if logits.grad:
            self.save(order)  # gathering the rows' weights
        row_weights = self.new(k, logits.grad, FP32)
        adapters = {name: self.sites.get((f"{at}.experts", name)) for name in ("gate_proj", "up_proj", "down_proj")}
        adapted = [s for s in adapters.values() if s is not None]
        # Experts.fused_adapters: dropout's own adapter input runs per projection
        per_projection = not fused or (self.plan.adapter.dropout > 0 and bool(adapted))
        if self.mesh.expert > 1:
            rows = self.exchange(x, row_weights, plan, adapters, per_projection)
        elif per_projection:
            rows = self.projections(self.new(k * h, x.grad), row_weights, plan, adapters)
        else:
            rows = self.fused_experts(x, row_weights, order, plan, adapters)
        if plan.shared is not None:
            self.mlp(x, plan.shared, f"{at}.shared_experts")
        return self.new(h, rows.grad)

    def fused_experts(self, x: Tensor, row_weights: Tensor, order: Tensor, plan: MoEPlan,
                      adapters: dict[str, AdapterSite | None]) -> Tensor:
        """kernels/moe.py's fused Function: it keeps its input rows, their weights, order and experts' offsets, gate,
        up and act [T*k, I], each adapted projection's X A^T (gate's and up's in one tensor), and under CE-LoRA on
        down its output rows before their weight [T*k, H]."""
        k, inter = plan.router.top_k, plan.intermediate_size
        grad = x.grad or row_weights.grad or self.trains_base or any(adapters.values())
        if grad:
            self.save(x, row_weights, order, self.offsets(plan), *(self.new(k * inter, True) for _ in range(3)))
            gate_up = sum(s.rank for name, s in adapters.items() if s is not None and name != "down_proj")
            if gate_up:
                self.save(self.new(k * gate_up, True))
            down = adapters["down_proj"]
            if down is not None:
                self.save(self.new(k * down.rank, True))
            if down is not None and down.kind == "ce_lora":
                self.save(self.new(k * plan.hidden_size, True))
        return self.new(k * plan.hidden_size, grad)

    def offsets(self, plan: MoEPlan) -> Tensor:
        """Where each of this process's experts starts in its grouped rows (int64 [E + 1])."""
        return Tensor((plan.experts // self.mesh.expert + 1) * INT64, False)

    def projections(self, tokens: Tensor, row_weights: Tensor, plan: MoEPlan,
                    adapters: dict[str, AdapterSite | None]) -> Tensor:
        """The experts one projection at a time over the rows `tokens` [T*k, H], then weighted into their (token,
        slot) places by `Routing.to_slots`."""
        k, h, inter = plan.router.top_k, plan.hidden_size, plan.intermediate_size

        def project(x: Tensor, name: str, n_in: int, n_out: int) -> Tensor:
            site = adapters[name]
            if site is None:
                if self.trains_base:
                    self.save(x)
                return self.new(k * n_out, x.grad or self.trains_base)
            self.lora_inputs(x, n_in, site, rows=k)
            return self.new(k * n_out, True)

        if self.triton(plan.kernel) and (self.trains_base or any(adapters.values())):
            self.save(self.offsets(plan))  # the grouped kernels' expert boundaries
        gate = project(tokens, "gate_proj", h, inter)
        up = project(tokens, "up_proj", h, inter)
        down = project(self.swiglu(gate, up, inter, plan.kernel, rows=k), "down_proj", inter, h)
        return self.to_slots(down, row_weights, k * h)

    def to_slots(self, y: Tensor, row_weights: Tensor, per_token: int) -> Tensor:
        """y * weight, an fp32 product, copied into place: the product keeps both factors, the copy its source."""
        if row_weights.grad:
            self.save(y)
        if y.grad:
            self.save(row_weights)
        product = self.new(per_token, y.grad or row_weights.grad, FP32)
        if product.grad:
            self.save(product)
        return product

    def exchange(self, x: Tensor, row_weights: Tensor, plan: MoEPlan, adapters: dict[str, AdapterSite | None],
                 per_projection: bool) -> Tensor:
        """Expert parallelism (parallel.ExpertExchange): the routed rows travel to their experts' processes (T*k
        arrive, for even loads), run there as experts of one slot each, travel back and are weighted here."""
        k, h = plan.router.top_k, plan.hidden_size
        arrived = self.new(k * h, x.grad)  # sorted by expert
        ones = self.new(k, False, FP32)  # their weights there
        self.save(self.new(k, False, INT64))  # the arrival order, to sort them by expert and back
        if per_projection:  # over the routed copy of the arrived rows
            self.projections(self.new(k * h, x.grad), ones, plan, adapters)
        else:  # over the arrived rows themselves, in their order (an arange)
            self.fused_experts(arrived, ones, self.new(k, False, INT64), plan, adapters)
        self.save(self.new(k * h, True))  # the outputs in the model's dtype, kept by index_copy
        return self.to_slots(self.new(k * h, True), row_weights, k * h)

    def layer(self, i: int, layer: LayerPlan, x: Tensor) -> Tensor:
        at = f"model.layers.{i}"
        h = layer.attention.hidden_size
        attn = self.attention(self.norm(x, h, layer.attn_norm), layer.attention, f"{at}.self_attn")
        residual = self.new(h, x.grad or attn.grad)
        y = self.norm(residual, h, layer.mlp_norm)
        if isinstance(layer.mlp, MoEPlan):
            mlp = self.moe(y, layer.mlp, f"{at}.mlp")
        else:
            mlp = self.mlp(y, layer.mlp, f"{at}.mlp")
        return self.new(h, residual.grad or mlp.grad)

    def head(self, x: Tensor) -> None:
        """The final norm, the head and the cross-entropy, which keeps the targets and their count, and the
        logits [T, V] with their log-sum-exp (the fused kernel) or log_softmax's fp32 output (the reference)."""
        model = self.plan.model
        logits = self.linear(self.norm(x, model.hidden_size, model.norm), model.hidden_size, model.vocab_size,
                             "lm_head")
        if not logits.grad:
            return
        kept = (logits, self.new(1, False, FP32)) if self.fused_loss else (self.new(model.vocab_size, True, FP32),)
        self.save(*kept, self.new(1, False, INT64), Tensor(FP32, False))

    @property
    def fused_loss(self) -> bool:
        return self.triton(self.plan.model.loss_kernel)

    def loss_gradient(self) -> int:
        """The loss's working memory at the backward's start: its gradient [T, V] in the logits' dtype (the fused
        kernel), or two fp32 ones (the reference's log_softmax and the cast back)."""
        if self.fused_loss:
            return self.tokens * self.plan.model.vocab_size * self.size
        return 2 * self.tokens * self.plan.model.vocab_size * FP32


@dataclass(frozen=True)
class Activations:
    total: int  # bytes kept for the backward of one forward
    recompute: int  # the largest recomputed layer's activations, rebuilt in the backward
    loss_gradient: int  # the loss's working memory at the backward's start (Forward.loss_gradient)


def activations(plan: Plan, mesh: Mesh, reference: bool = False) -> Activations:
    """What autograd keeps during one forward of `mesh.sequences` sequences (`reference`: on the torch reference
    path everywhere, as on a CPU or under K2C_KERNELS=torch)."""
    fw = Forward(plan, mesh, reference)
    h = plan.model.hidden_size
    if fw.trains_base:
        fw.save(fw.new(1, False, INT64))  # the embedding keeps the token ids
    x = fw.new(h, fw.trains_base)
    recompute = 0
    for i, layer in enumerate(plan.model.layers):
        if i not in plan.parallel.recompute_layers:
            x = fw.layer(i, layer, x)
            continue
        # checkpointed: the layer keeps its input (and the RoPE tables) and runs its forward again in the backward
        fw.save(x, fw.rope_tables)
        again = Forward(plan, mesh, reference)
        held = {id(x): x, id(again.rope_tables): again.rope_tables}
        again.saved.update(held)
        again.layer(i, layer, x)
        recompute = max(recompute, again.total() - sum(t.nbytes for t in held.values()))
        x = fw.new(h, True)
    fw.head(x)
    return Activations(fw.total(), recompute, fw.loss_gradient())


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training step, in the layout of `world` processes."""

    world: int
    data_shard: int
    expert: int
    sequences: int  # per process and forward
    seq_len: int
    dtype: str
    weights: int  # parameters: this process's shards
    gradients: int  # of the trainable parameters, sharded like them, in their dtype
    optimizer: int  # Muon's fp32 momenta, AdamW's fp32 moments and step counts
    buffers: int  # router biases, QK-Clip's statistics, CE-LoRA's SVD pairs and kept rows
    activations: int  # kept for the backward of one forward
    backward_working: int  # at the backward's start: the loss's gradients, gathered units, unsharded gradients
    step_working: int  # in the optimizer step: Newton-Schulz's batch or AdamW's fp32 copies
    backward_peak: int  # weights + optimizer + buffers + activations + backward_working (+ gradients kept
    #                     between micro-batches under grad_accum)
    step_peak: int  # weights + optimizer + buffers + gradients + step_working

    @property
    def total(self) -> int:
        return max(self.backward_peak, self.step_peak)

    @property
    def peak_phase(self) -> str:
        return "backward" if self.backward_peak >= self.step_peak else "optimizer step"

    @property
    def fits_h200(self) -> bool:
        return self.total <= H200_USABLE

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "peak_phase": self.peak_phase, "fits_h200": self.fits_h200}

    def text(self) -> str:
        mesh = (f"{self.world} processes (data_shard {self.data_shard} x expert {self.expert})" if self.world > 1
                else "1 process")
        rows = [
            ("weights", self.weights, "parameters" + (f", sharded over {self.world}" if self.world > 1 else "")),
            ("gradients", self.gradients, "of the trainable parameters, in their dtype"),
            ("optimizer state", self.optimizer, "fp32: Muon's momenta, AdamW's moments"),
            ("buffers", self.buffers, "router biases, QK-Clip statistics, CE-LoRA's SVD pairs"),
            ("activations", self.activations, "kept for the backward of one forward"),
            ("backward working", self.backward_working, "cross-entropy gradients, FSDP2's gathered units, cuBLAS"),
            ("step working", self.step_working, "a Newton-Schulz batch or AdamW's fp32 copies, cuBLAS"),
        ]
        if self.backward_peak >= self.step_peak:
            peak = f"in the backward (the optimizer step: {size(self.step_peak)})"
        else:
            peak = f"in the optimizer step (the backward: {size(self.backward_peak)})"
        fits = "fits" if self.fits_h200 else "does not fit"
        lines = [f"Memory per device: {mesh}, {self.sequences} x {self.seq_len} tokens per forward, {self.dtype}"]
        lines += [f"  {name:<17}{size(n):>11}  {what}" for name, n, what in rows]
        lines.append(f"  {'peak':<17}{size(self.total):>11}  {peak}; {fits} an H200 ({H200_USABLE // GIB} GiB)")
        return "\n".join(lines) + "\n"


def size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def estimate(plan: Plan, world: int = 1, *, reference: bool = False) -> MemoryEstimate:
    """Bytes per device of a training step of `plan` over `world` processes, on CUDA devices.

    `reference`: every op on the torch reference path (K2C_KERNELS=torch) instead of the plan's kernels. Raises
    k2c.runtime.mesh.LayoutError when `world` does not fit the plan's mesh or batch.
    """
    m = mesh(plan, world)
    params = parameters(plan)
    trainable = [p for p in params if p.optimizer is not None]
    weights = sum(m.local_numel(p) * p.size for p in params)
    gradients = sum(m.local_numel(p) * p.size for p in trainable)
    optimizer = sum(m.local_numel(p) * FP32 if p.optimizer == "muon" else 2 * m.local_numel(p) * FP32 + FP32
                    for p in trainable)  # AdamW's step count is an fp32 scalar per parameter
    buffers = _buffers(plan, m, params)
    acts = activations(plan, m, reference)
    # the backward's start: the cross-entropy's gradient beside what it saved; or later, a recomputed layer's
    # activations, rebuilt
    backward = max(acts.loss_gradient, acts.recompute) + _svd_working(plan, m, params) + CUBLAS_WORKSPACES
    if world > 1:
        backward += _fsdp_working(plan, m, params)
    step = _step_working(plan, m, trainable, reference) + CUBLAS_WORKSPACES
    # with grad_accum > 1 the gradients of the step's earlier micro-batches are there in the backward
    kept = gradients if plan.training.grad_accum > 1 else 0
    return MemoryEstimate(
        world=world, data_shard=m.data_shard, expert=m.expert, sequences=m.sequences, seq_len=plan.training.seq_len,
        dtype=plan.training.dtype, weights=weights, gradients=gradients, optimizer=optimizer, buffers=buffers,
        activations=acts.total, backward_working=backward, step_working=step,
        backward_peak=weights + optimizer + buffers + acts.total + backward + kept,
        step_peak=weights + optimizer + buffers + gradients + step,
    )


def _site_weight(site: AdapterSite, params: dict[str, Param]) -> Param:
    return params[f"{site.module}.weight" if site.param is None else f"{site.module}.{site.param}"]


def _ce_lora_sites(plan: Plan, m: Mesh, params: list[Param]) -> Iterator[tuple[AdapterSite, int, int, int]]:
    """Each CE-LoRA site with (matrices held, out, in): a process's own experts for a stack, else one matrix."""
    by_name = {p.name: p for p in params}
    for site in plan.adapter.sites:
        if site.kind == "ce_lora":
            w = _site_weight(site, by_name)
            count = w.shape[0] // m.expert if len(w.shape) == 3 else 1
            yield site, count, w.shape[-2], w.shape[-1]


def _buffers(plan: Plan, m: Mesh, params: list[Param]) -> int:
    total = 0
    for layer in plan.model.layers:
        total += 2 * layer.attention.heads * FP32  # the last and the step's max logit per head
        if layer.attention.clip.mode == "scale":
            total += layer.attention.heads * FP32
        if isinstance(layer.mlp, MoEPlan):
            total += 2 * layer.mlp.experts * FP32  # correction bias, tokens routed since the last step
    size = BYTES[plan.training.dtype]
    for site, count, rows, cols in _ce_lora_sites(plan, m, params):
        kept = math.ceil(site.keep_ratio * rows)
        # B0 [m, k], A0 [k, n], ||R[i, :]|| [m] fp32, S [|S|] int64, R[S, :] [|S|, n]
        total += count * ((rows + cols) * site.svd_rank * size + rows * FP32 + kept * INT64 + kept * cols * size)
    return total


def _svd_working(plan: Plan, m: Mesh, params: list[Param]) -> int:
    """CE-LoRA's first backward factorises each adapted weight in fp32: W, U, V^T, B0 A0 and W - B0 A0 at once."""
    return max((count * (3 * rows * cols + min(rows, cols) * (rows + cols)) * FP32
                for _, count, rows, cols in _ce_lora_sites(plan, m, params)), default=0)


def _fsdp_working(plan: Plan, m: Mesh, params: list[Param]) -> int:
    """FSDP2's unsharded parameters and gradients in the backward (parallel.shard's units).

    The root unit (embedding, final norm, head) is not resharded after the forward, and its gradients stay whole
    until the backward's end (the embedding's come last); a decoder layer is gathered with its experts, the next
    layer is prefetched; a unit's gradients are whole, plus their copy in reduce_dtype, until their reduce-scatter.
    """
    gathered: dict[str, int] = {}  # parameter bytes per unit
    grads: dict[str, int] = {}  # trainable elements per unit
    last = None if plan.model.tie_embeddings else "model.embed_tokens.weight"
    for p in params:
        gathered[p.unit] = gathered.get(p.unit, 0) + m.gathered_numel(p) * p.size
        if p.optimizer is not None and p.name != last:
            grads[p.unit] = grads.get(p.unit, 0) + m.gathered_numel(p)
    size, reduce = BYTES[plan.training.dtype], BYTES[plan.parallel.reduce_dtype]
    root, root_grads = gathered.pop("root"), grads.pop("root", 0) * size
    layers = range(len(plan.model.layers))
    with_experts = max((gathered[f"layer.{i}"] + gathered.get(f"experts.{i}", 0) for i in layers), default=0)
    prefetched = max((gathered[f"layer.{i}"] for i in layers), default=0)
    unit_grads = max(grads.values(), default=0) * (size + (reduce if reduce != size else 0))
    return root + with_experts + prefetched + root_grads + unit_grads


def _step_working(plan: Plan, m: Mesh, trainable: list[Param], reference: bool) -> int:
    """The optimizer step's largest transient: a Newton-Schulz batch, or AdamW's fp32 copies of lower-precision
    parameters and gradients (this process's shards)."""
    adamw = sum(m.local_numel(p) for p in trainable if p.optimizer == "adamw" and p.size != FP32) * 2 * FP32
    batch = 0
    for n, cols, form, count in _muon_shapes(plan, trainable, m):
        per_batch = max(1, NS_BATCH_ELEMENTS // (n * cols))
        matrices = math.ceil(count / math.ceil(count / per_batch))
        if reference:
            # in torch, at the end of the batch: fp32 copies of bf16 gradients and weights (masters), the Nesterov
            # input, the concatenated batch, the fp32 updates and the last bf16 iterate
            lower = 2 * FP32 if plan.training.dtype != "float32" else 0
            per = n * cols * (lower + FP32 * plan.optimizer.nesterov + 2 * FP32 + 2)
            # the Gram matrix and its polynomial; the Gram form's R, Z, Q, the identity, R + a/b I and Z R, fp16
            square = (2 if form == STANDARD else 6) * 2
        else:
            per = n * cols * 2 * 2  # the bf16 iterate and its scratch
            square = (2 if form == STANDARD else 4) * 2  # G and P; or R, Z, Q and a spare, all 16-bit
        batch = max(batch, matrices * (per + square * n * n))
    return max(adamw, batch)


def _muon_shapes(plan: Plan, trainable: list[Param], m: Mesh) -> Iterator[tuple[int, int, str, int]]:
    """(n, m, form, count) per shape and Newton-Schulz form of Muon's matrices (n <= m, tall ones transposed):
    matrices of one shape and form share a batched Newton-Schulz; a stack of experts counts its matrices (a
    process's own experts when split)."""
    counts: dict[tuple[int, int, str], int] = {}
    for p in trainable:
        if p.optimizer == "muon":
            n, cols = sorted(p.shape[-2:])
            stacked = p.shape[0] // (m.expert if p.unit.startswith("experts.") else 1) if len(p.shape) == 3 else 1
            key = (n, cols, plan.optimizer.newton_schulz_form(p.name))
            counts[key] = counts.get(key, 0) + stacked
    for (n, cols, form), count in counts.items():
        yield n, cols, form, count
