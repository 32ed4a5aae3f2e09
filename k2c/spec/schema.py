"""The k2c spec: pydantic models for the four sections of a spec file.

Every model is frozen and forbids unknown keys, so a typo is an error rather than a silent default.
Cross-field rules live in `model_validator`s beside the fields they relate; their messages say what was
expected and what was found, and name the offending field through `loc` so that the loader can point at
the file, line and column.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# Numbers and flags are strict: a quoted "2e-4" or a `1` for true is an error, not a silent conversion.
# (A strict float still accepts an integer.)
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]
Float = Annotated[float, Field(strict=True)]
PositiveFloat = Annotated[float, Field(gt=0, strict=True)]
NonNegativeFloat = Annotated[float, Field(ge=0, strict=True)]
Ratio = Annotated[float, Field(gt=0, le=1, strict=True)]
Fraction = Annotated[float, Field(ge=0, lt=1, strict=True)]
Flag = Annotated[bool, Field(strict=True)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


def show_value(value: object) -> str:
    """A value as a spec author wrote it: YAML's null/true/false, quoted strings, 'a mapping' or 'a list'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}" if value else "an empty list"
    return repr(value)


def spec_error(field: str, expected: str, found: object) -> PydanticCustomError:
    """An error raised by a cross-field rule; `field` is the dotted path below the validated model."""
    return PydanticCustomError(
        "k2c_rule",
        "{field}: expected {expected}, found {found}",
        {"field": field, "expected": expected, "found": show_value(found)},
    )


# --------------------------------------------------------------------------- model


class Yarn(Section):
    """YaRN context extension, with the names of the Hugging Face `rope_scaling` block."""

    kind: Literal["yarn"] = "yarn"
    factor: Annotated[float, Field(gt=1, strict=True)]
    original_max_position_embeddings: PositiveInt
    beta_fast: PositiveFloat = 32.0
    beta_slow: PositiveFloat = 1.0
    mscale: PositiveFloat = 1.0
    mscale_all_dim: NonNegativeFloat = 0.0

    @model_validator(mode="after")
    def _betas_ordered(self) -> Yarn:
        if self.beta_fast < self.beta_slow:
            raise spec_error("beta_fast", f"beta_fast >= beta_slow ({self.beta_slow})", self.beta_fast)
        return self


class Rope(Section):
    theta: PositiveFloat = 10000.0
    interleaved: Flag = True  # the published checkpoints store rotary dims as interleaved pairs
    scaling: Yarn | None = None


class Attention(Section):
    kind: Literal["mla"] = "mla"
    heads: PositiveInt
    q_lora_rank: PositiveInt | None  # null: one q_proj, as in Moonlight
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt
    rope: Rope = Rope()

    @model_validator(mode="after")
    def _rope_dim_even(self) -> Attention:
        if self.qk_rope_head_dim % 2:
            raise spec_error("qk_rope_head_dim", "an even number (rotary dims come in pairs)", self.qk_rope_head_dim)
        return self


class DenseMlp(Section):
    intermediate_size: PositiveInt


class Balance(Section):
    """Aux-loss-free balancing: after each step the router bias moves by `rate` towards even expert load."""

    kind: Literal["aux_free_bias", "none"] = "aux_free_bias"
    rate: NonNegativeFloat = 1.0e-3


class Router(Section):
    scoring: Literal["sigmoid"] = "sigmoid"
    groups: PositiveInt = 1
    groups_per_token: PositiveInt = 1
    normalize: Flag = True
    routed_scaling: PositiveFloat = 1.0
    balance: Balance = Balance()


class Moe(Section):
    routed_experts: PositiveInt
    shared_experts: NonNegativeInt = 1
    experts_per_token: PositiveInt
    expert_intermediate_size: PositiveInt
    router: Router = Router()

    @model_validator(mode="after")
    def _routing_possible(self) -> Moe:
        r = self.router
        if r.groups_per_token > r.groups:
            raise spec_error("router.groups_per_token", f"at most router.groups ({r.groups})", r.groups_per_token)
        if self.routed_experts % r.groups:
            raise spec_error(
                "routed_experts", f"a multiple of router.groups ({r.groups})", self.routed_experts
            )
        per_group = self.routed_experts // r.groups
        if r.groups > 1 and per_group < 2:
            raise spec_error(
                "router.groups",
                f"groups of at least 2 experts (a group scores by its top two; "
                f"{self.routed_experts} experts allow at most {self.routed_experts // 2} groups)",
                r.groups,
            )
        reachable = per_group * r.groups_per_token
        if self.experts_per_token > reachable:
            raise spec_error(
                "experts_per_token",
                f"at most the {reachable} experts in the chosen groups "
                f"({r.groups_per_token} of {r.groups} groups x {per_group} experts)",
                self.experts_per_token,
            )
        return self


class Model(Section):
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    layers: PositiveInt
    dense_layers: NonNegativeInt = 1  # the first layers use a dense SwiGLU MLP
    norm_eps: PositiveFloat = 1.0e-6
    max_position_embeddings: PositiveInt = 4096
    tie_embeddings: Flag = False
    init_std: PositiveFloat = 0.02
    attention: Attention
    dense_mlp: DenseMlp | None = None
    moe: Moe | None = None

    @model_validator(mode="after")
    def _layers_consistent(self) -> Model:
        if self.dense_layers > self.layers:
            raise spec_error("dense_layers", f"at most layers ({self.layers})", self.dense_layers)
        if self.dense_layers > 0 and self.dense_mlp is None:
            raise spec_error("dense_mlp", f"a dense_mlp section (dense_layers is {self.dense_layers})", None)
        if self.dense_layers < self.layers and self.moe is None:
            raise spec_error(
                "moe", f"a moe section (layers is {self.layers}, dense_layers is {self.dense_layers})", None
            )
        scaling = self.attention.rope.scaling
        if scaling and scaling.original_max_position_embeddings > self.max_position_embeddings:
            raise spec_error(
                "attention.rope.scaling.original_max_position_embeddings",
                f"at most max_position_embeddings ({self.max_position_embeddings})",
                scaling.original_max_position_embeddings,
            )
        return self

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers


# --------------------------------------------------------------------------- optimizer


class Schedule(Section):
    warmup_steps: NonNegativeInt = 0
    decay: Literal["constant", "cosine", "linear"] = "cosine"
    final_lr_ratio: Annotated[float, Field(ge=0, le=1, strict=True)] = 0.1


class Muon(Section):
    momentum: Fraction = 0.95
    nesterov: Flag = True
    ns_steps: PositiveInt = 5
    ns_coefficients: tuple[Float, Float, Float] = (3.4445, -4.7750, 2.0315)
    rms_scale: PositiveFloat = 0.2  # update RMS matched to AdamW's, so Muon reuses its lr and weight decay
    router_weight: Literal["adamw", "muon"] = "adamw"


class AdamW(Section):
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: PositiveFloat = 1.0e-8


class QkClip(Section):
    enabled: Flag = True
    tau: PositiveFloat = 100.0


class Optimizer(Section):
    kind: Literal["muonclip", "muon", "adamw"] = "muonclip"
    lr: PositiveFloat = 2.0e-4
    weight_decay: NonNegativeFloat = 0.1
    grad_clip: NonNegativeFloat = 1.0  # max global grad norm; 0 turns clipping off
    schedule: Schedule = Schedule()
    muon: Muon = Muon()
    adamw: AdamW = AdamW()
    qk_clip: QkClip = QkClip()


# --------------------------------------------------------------------------- adapter

_LAYER_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_layers(text: str) -> frozenset[int] | None:
    """The layer indices of a target's `layers` ("1-3", "0,2,5-7"; ranges inclusive), None if malformed."""
    indices: set[int] = set()
    for part in text.split(","):
        m = _LAYER_RANGE.fullmatch(part)
        if m is None:
            return None
        first, last = int(m[1]), int(m[2] or m[1])
        if last < first:
            return None
        indices.update(range(first, last + 1))
    return frozenset(indices)


class AdapterTarget(Section):
    """One target pattern: a glob over the IR's linear names (`attn.kv_b`, `experts.{up,down}`, ...)."""

    match: Annotated[str, Field(min_length=1)]
    layers: str | None = None  # "1-3", "0,2,5-7"; all layers when absent
    keep_ratio: Ratio | None = None  # None: the compiler's default for the site
    svd_rank: PositiveInt | None = None
    rank: PositiveInt | None = None

    @model_validator(mode="after")
    def _layers_readable(self) -> AdapterTarget:
        if self.layers is not None and parse_layers(self.layers) is None:
            raise spec_error("layers", "layer indices and ascending ranges, like '1-3' or '0,2,5-7'", self.layers)
        return self


class Adapter(Section):
    kind: Literal["none", "lora", "ce_lora"] = "none"
    rank: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    rslora: Flag = False
    dropout: Fraction = 0.0
    svd_rank: PositiveInt | None = None  # default 7/8 of the rank, the CE-LoRA authors' choice
    refresh_every: PositiveInt = 200
    lora_optimizer: Literal["adamw", "muon"] = "adamw"
    targets: tuple[AdapterTarget, ...] = ()

    @model_validator(mode="after")
    def _targets_present(self) -> Adapter:
        if self.kind != "none" and not self.targets:
            raise spec_error("targets", f"at least one target for an adapter of kind {self.kind!r}", [])
        return self


# --------------------------------------------------------------------------- training


class Training(Section):
    seq_len: PositiveInt = 256
    batch_size: PositiveInt = 16  # sequences per step, over all data-parallel processes
    grad_accum: PositiveInt = 1
    steps: PositiveInt = 300
    dtype: Literal["float32", "bfloat16"] = "float32"
    data: str = "bundled"  # "bundled", or a path to a UTF-8 text file
    init_from: str | None = None  # a checkpoint in the published layout to start from (fine-tuning); None: random
    eval_fraction: Annotated[float, Field(gt=0, lt=1, strict=True)] = 0.05
    eval_every: PositiveInt = 50
    log_every: PositiveInt = 10
    checkpoint_every: NonNegativeInt = 0  # 0: only at the end
    seed: NonNegativeInt = 0


# --------------------------------------------------------------------------- the whole spec


class Spec(Section):
    name: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$")]
    description: str = ""
    model: Model
    optimizer: Optimizer = Optimizer()
    adapter: Adapter = Adapter()
    training: Training = Training()

    @model_validator(mode="after")
    def _fits(self) -> Spec:
        if self.training.seq_len > self.model.max_position_embeddings:
            raise spec_error(
                "training.seq_len",
                f"at most model.max_position_embeddings ({self.model.max_position_embeddings})",
                self.training.seq_len,
            )
        for i, target in enumerate(self.adapter.targets):
            if target.layers is not None and max(parse_layers(target.layers)) >= self.model.layers:
                expected = f"layer indices below model.layers ({self.model.layers})"
                raise spec_error(f"adapter.targets.{i}.layers", expected, target.layers)
        if self.training.data == "bundled" and self.model.vocab_size < 256:
            raise spec_error(
                "model.vocab_size", "at least 256 to train on the bundled byte-level corpus", self.model.vocab_size
            )
        return self


def softmax_scale(attention: Attention) -> float:
    """`(dn + dr)^-0.5`, times `mscale^2` under YaRN (DeepSeek-V3's rule)."""
    scale = (attention.qk_nope_head_dim + attention.qk_rope_head_dim) ** -0.5
    yarn = attention.rope.scaling
    if yarn is not None and yarn.mscale_all_dim:
        m = 0.1 * yarn.mscale_all_dim * math.log(yarn.factor) + 1.0
        scale *= m * m
    return scale
