"""The plan: every fact the runtime needs about one spec, as a tree of frozen records.

`k2c.codegen.lower` builds it from the decided IR graph (each value from an op attribute or a graph fact) and the
emitter writes it into the generated package's `plan.py` as readable Python data. The runtime reads nothing else:
no spec, no graph. `PLAN_SCHEMA` changes whenever a record changes shape; a generated package records the schema
it was written for and refuses to run against another.

Names follow the spec's fields, except where transformers' names must be kept (module and parameter paths such as
`self_attn.kv_a_proj_with_mqa`, which are the published checkpoint's keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

PLAN_SCHEMA = 7

# What an op's `kernel` attribute may name: the torch reference, or a fused Triton kernel of k2c.runtime.kernels.
TORCH = "torch"
TRITON = "triton"

# The forms of Muon's Newton-Schulz iteration (`k2c.runtime.optim.newton_schulz`); OptimizerPlan.gram_newton_schulz
# lists the parameters in the Gram form.
STANDARD = "standard"
GRAM = "gram"
NS_FORMS = (STANDARD, GRAM)


def restart_segments(steps: int) -> list[int]:
    """The Gram form's steps between restarts: as even as possible, at most 3 each (5 -> [2, 3]), the shorter
    first. A rounding error in the Gram matrix grows about 12x a step (a^2 = 3.4445^2, the slope at 0 of a step's
    map of its eigenvalues, l -> l (a + b l + c l^2)^2), so a restart, which forms X and its Gram matrix afresh,
    bounds it."""
    if steps <= 0:
        return []
    parts = -(-steps // 3)
    base, extra = divmod(steps, parts)
    return [base] * (parts - extra) + [base + 1] * extra


@dataclass(frozen=True)
class NormPlan:
    dim: int
    eps: float
    kernel: str = TORCH
    # the residual add whose sum it reads runs in its pass (fuse_residual_norm): the wiring calls add_norm(residual,
    # delta), which returns the sum and its norm
    adds_residual: bool = False
    # the ops that read it (fan_out_norms): each gets a copy of its own, and the backward sums their gradients
    copies: int = 1


@dataclass(frozen=True)
class YarnPlan:
    """YaRN context extension, with the names of the Hugging Face `rope_scaling` block."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    mscale: float
    mscale_all_dim: float


@dataclass(frozen=True)
class RopePlan:
    dim: int  # rotary dims per head (qk_rope_head_dim)
    theta: float
    interleaved: bool  # pairs (0, 1), (2, 3), ... as published checkpoints store them; else (i, i + dim/2)
    yarn: YarnPlan | None = None


@dataclass(frozen=True)
class ClipPlan:
    """QK-Clip of one attention layer (Kimi K2, MLA rule).

    mode "weights": after each step, head h's non-rotary q and k rows scale by sqrt(gamma_h), its rotary q rows by
    gamma_h. mode "scale": the q/k weights are frozen (adapter training), so the layer multiplies head h's logits
    by a `qk_scale[h]` buffer instead. Weights are named from the attention module; rows are (offset, count,
    stride): head h owns rows `[h*stride + offset, h*stride + offset + count)` of the named weight.
    """

    mode: str  # "weights", "scale" or "off"
    tau: float
    q_weight: str
    kv_weight: str
    q_sqrt_gamma_rows: tuple[int, int, int]
    q_gamma_rows: tuple[int, int, int]
    kv_sqrt_gamma_rows: tuple[int, int, int]


@dataclass(frozen=True)
class AttentionPlan:
    """Multi-head latent attention (MLA)."""

    hidden_size: int
    heads: int
    q_lora_rank: int | None  # None: one q_proj (Moonlight)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float  # (nope + rope)^-1/2, times YaRN's mscale^2
    q_norm: NormPlan | None
    kv_norm: NormPlan
    rope: RopePlan
    clip: ClipPlan
    kernel: str = TORCH


@dataclass(frozen=True)
class MLPPlan:
    """A SwiGLU MLP: the dense layers and the shared experts."""

    hidden_size: int
    intermediate_size: int
    kernel: str = TORCH  # of the SwiGLU activation


@dataclass(frozen=True)
class RouterPlan:
    hidden_size: int
    experts: int
    top_k: int
    groups: int
    groups_per_token: int
    normalize: bool
    routed_scaling: float
    bias_rate: float  # aux-loss-free balancing step; 0: the correction bias never moves


@dataclass(frozen=True)
class MoEPlan:
    router: RouterPlan
    experts: int
    hidden_size: int
    intermediate_size: int
    shared: MLPPlan | None
    kernel: str = TORCH  # of the routing, the routed experts and their combine (select_kernels' choice)
    expert_shards: int = 1  # processes the routed experts are split over (expert parallelism)


@dataclass(frozen=True)
class LayerPlan:
    attn_norm: NormPlan
    attention: AttentionPlan
    mlp_norm: NormPlan
    mlp: MLPPlan | MoEPlan


@dataclass(frozen=True)
class ModelPlan:
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    tie_embeddings: bool
    init_std: float
    norm: NormPlan
    layers: tuple[LayerPlan, ...]
    loss_kernel: str  # the cross-entropy's implementation (select_kernels)


@dataclass(frozen=True)
class Config:
    """The model's sizes in one flat record, under the names of the generated package's `CONFIG`."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    dense_layers: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    dense_intermediate_size: int | None
    routed_experts: int
    shared_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    max_position_embeddings: int
    tie_embeddings: bool


@dataclass(frozen=True)
class ParamRule:
    """Parameters matching `pattern` (fnmatch) are updated by `optimizer`; the first matching rule wins."""

    pattern: str
    optimizer: str  # "muon" or "adamw"
    weight_decay: bool


@dataclass(frozen=True)
class ClipSite:
    """Where QK-Clip acts in layer `layer`: the model-level names of its query and kv_b weights."""

    layer: int
    mode: str  # "weights" or "scale"
    q_weight: str
    kv_weight: str


def clip_sites(model: ModelPlan) -> tuple[ClipSite, ...]:
    """Every layer's QK-Clip, with its weights named from the model (`model.layers.3.self_attn.q_b_proj.weight`)."""
    return tuple(
        ClipSite(i, c.mode, f"model.layers.{i}.self_attn.{c.q_weight}", f"model.layers.{i}.self_attn.{c.kv_weight}")
        for i, c in enumerate(layer.attention.clip for layer in model.layers)
        if c.mode != "off"
    )


@dataclass(frozen=True)
class OptimizerPlan:
    kind: str  # "muonclip", "muon" or "adamw"
    lr: float
    weight_decay: float
    grad_clip: float  # 0: off
    warmup_steps: int
    decay: str  # "constant", "cosine" or "linear"
    final_lr_ratio: float
    decay_steps: int  # the schedule reaches lr * final_lr_ratio after this many steps
    momentum: float
    nesterov: bool
    ns_steps: int
    ns_coefficients: tuple[float, float, float]
    rms_scale: float
    adamw_betas: tuple[float, float]
    adamw_eps: float
    param_rules: tuple[ParamRule, ...]
    # the Muon parameters (fnmatch patterns) whose Newton-Schulz iteration runs in the Gram form, the rest in the
    # standard one (group_params decides: `k2c.runtime.optim.newton_schulz` says what each form is)
    gram_newton_schulz: tuple[str, ...] = ()

    def newton_schulz_form(self, name: str) -> str:
        """The form of Newton-Schulz that Muon parameter `name` takes: GRAM if `gram_newton_schulz` lists it."""
        return GRAM if any(fnmatchcase(name, pattern) for pattern in self.gram_newton_schulz) else STANDARD


@dataclass(frozen=True)
class AdapterSite:
    """A matrix under an adapter: `module` is its path; `param` names the projection of a routed-expert stack."""

    module: str
    param: str | None
    kind: str  # "ce_lora", "lora" or "frozen"
    rank: int
    alpha: float
    keep_ratio: float  # share of output channels kept in the approximate input gradient (1: exact)
    svd_rank: int  # rank of the frozen SVD pair that carries the rest (0: none)
    kernel: str = TORCH  # of the adapted linear (routed experts follow their layer's MoEPlan.kernel)


@dataclass(frozen=True)
class AdapterPlan:
    kind: str  # "none", "lora" or "ce_lora"
    rank: int
    alpha: float
    rslora: bool  # scale alpha/sqrt(r) instead of alpha/r
    dropout: float
    refresh_every: int  # CE-LoRA's critical-channel refresh period, in backward passes
    sites: tuple[AdapterSite, ...]


@dataclass(frozen=True)
class TrainingPlan:
    seq_len: int
    batch_size: int  # sequences per forward, over all processes; a step takes grad_accum of them
    grad_accum: int
    steps: int
    dtype: str
    data: str  # "bundled", or a path (relative ones start at the spec's folder)
    data_format: str  # "text" (one token stream), or records: "jsonl", "parquet", "datasets"
    data_field: str | None  # the records' field that holds a document; None for a text
    chat: bool  # the documents are conversations: rendered with the chat template, loss on the assistant's tokens
    tokenizer: str  # "bytes" (token = UTF-8 byte), or a Hugging Face tokenizer folder
    init_from: str | None
    eval_fraction: float
    eval_every: int
    log_every: int
    checkpoint_every: int  # 0: at the end only
    seed: int


@dataclass(frozen=True)
class ParallelPlan:
    data_shard: int | None  # processes each row of experts is sharded over; None: the launch's count / expert
    expert: int  # processes the routed experts are split over
    reduce_dtype: str  # gradients are averaged in this dtype
    recompute_layers: tuple[int, ...]  # layers whose activations are recomputed in the backward


@dataclass(frozen=True)
class Plan:
    schema: int
    name: str
    config: Config
    model: ModelPlan
    optimizer: OptimizerPlan
    adapter: AdapterPlan
    training: TrainingPlan
    parallel: ParallelPlan
