"""The k2c spec: pydantic models for the four sections of a spec file.

Every model is frozen and forbids unknown keys, so a typo is an error rather than a silent default.
Cross-field rules live in `model_validator`s beside the fields they relate; their messages say what was
expected and what was found, and name the offending field through `loc` so that the loader can point at
the file, line and column.
"""

from __future__ import annotations

import importlib.machinery
import keyword
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Cap:
    """Why a field has the upper bound it has; the loader adds it to the message of a value above the bound."""

    why: str


# Upper bounds. Each size is far above the largest published model's, so no real spec meets it, and far below
# what overflows an int64 or a tensor's element count. With the parameter ceiling (`Spec._buildable`) they make
# `k2c check` refuse a spec that no machine can build, before any pass or tensor sees it. The `Cap` beside each
# bound says why it is where it is; a value above it gets that reason in its message.
MAX_VOCAB = 2**21
MAX_HIDDEN = 2**17
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_FFN = 2**20
MAX_EXPERTS = 2**16
MAX_SHARED_EXPERTS = 256
MAX_POSITIONS = 2**24
MAX_BATCH = 2**20  # sequences a step
MAX_STEPS = 10**9
MAX_SEED = 2**32 - 1
MAX_TOKENS_PER_STEP = 2**30  # batch_size x seq_len
MAX_PARAMS = 10**13
KIMI_K2_PARAMS = 1_026_408_209_408  # k2c's count for specs/kimi-k2.yaml, the largest shipped spec

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
Text = Annotated[str, Field(strict=True)]  # not bytes (YAML's !!binary)

Vocab = Annotated[int, Field(gt=0, le=MAX_VOCAB, strict=True), Cap("8x the largest published vocabulary, 262144")]
Width = Annotated[int, Field(gt=0, le=MAX_HIDDEN, strict=True), Cap("6x the widest published model's 20480")]
Layers = Annotated[int, Field(gt=0, le=MAX_LAYERS, strict=True), Cap("4x the deepest published model's 126")]
DenseLayers = Annotated[int, Field(ge=0, le=MAX_LAYERS, strict=True), Cap("the cap on layers")]
Heads = Annotated[int, Field(gt=0, le=MAX_HEADS, strict=True), Cap("8x DeepSeek-V3's 128 heads")]
HeadDim = Annotated[int, Field(gt=0, le=MAX_HEAD_DIM, strict=True), Cap("16x the largest published head size, 256")]
Rank = Annotated[int, Field(gt=0, le=MAX_HIDDEN, strict=True), Cap("the cap on hidden_size")]
Ffn = Annotated[int, Field(gt=0, le=MAX_FFN, strict=True), Cap("12x the widest published feed-forward layer, 81920")]
Experts = Annotated[int, Field(gt=0, le=MAX_EXPERTS, strict=True), Cap("170x Kimi K2's 384")]
ExpertCount = Annotated[int, Field(gt=0, le=MAX_EXPERTS, strict=True), Cap("the cap on routed_experts")]
SharedExperts = Annotated[int, Field(ge=0, le=MAX_SHARED_EXPERTS, strict=True), Cap("the published models have 1 or 2")]
Positions = Annotated[int, Field(gt=0, le=MAX_POSITIONS, strict=True), Cap("1.6x the longest published context, 10M")]
Sequences = Annotated[int, Field(gt=0, le=MAX_BATCH, strict=True), Cap("64x Kimi K2's 16384 sequences a step")]
Steps = Annotated[int, Field(gt=0, le=MAX_STEPS, strict=True), Cap("Kimi K2 trained for about 230k steps")]
NonNegativeSteps = Annotated[int, Field(ge=0, le=MAX_STEPS, strict=True), Cap("Kimi K2 trained for about 230k steps")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, strict=True), Cap("random generators take 32-bit seeds")]
Epsilon = Annotated[float, Field(gt=0, le=1, strict=True), Cap("an epsilon above 1 swamps what it guards")]
Multiplier = Annotated[float, Field(gt=0, le=1000, strict=True), Cap("350x any published setting")]
Coefficient = Annotated[float, Field(ge=-100, le=100, strict=True), Cap("Muon's coefficients are below 5 in size")]
LearningRate = Annotated[float, Field(gt=0, le=1, strict=True),
                         Cap("AdamW and Muon move a weight by about lr a step; above 1, one step wipes out the model")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


MAX_SHOWN = 60  # characters of a value quoted in a message


def show_value(value: object) -> str:
    """A value as a spec author wrote it: YAML's null/true/false, quoted strings, 'a mapping' or 'a list'.

    A long string is cut to its first characters and its length, so that a message stays one readable line.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}" if value else "an empty list"
    if isinstance(value, (str, bytes)) and len(value) > MAX_SHOWN:
        return f"{value[:MAX_SHOWN]!r}... ({len(value)} characters)"
    return repr(value)


def spec_error(field: str, expected: str, found: object, *, found_text: str | None = None) -> PydanticCustomError:
    """An error raised by a cross-field rule; `field` is the dotted path below the validated model.

    `found_text` replaces the shown value when the finding needs words (a parameter count, say).
    """
    return PydanticCustomError(
        "k2c_rule",
        "{field}: expected {expected}, found {found}",
        {"field": field, "expected": expected, "found": show_value(found) if found_text is None else found_text},
    )


# --------------------------------------------------------------------------- model


class Yarn(Section):
    """YaRN context extension, with the names of the Hugging Face `rope_scaling` block."""

    kind: Literal["yarn"] = "yarn"
    factor: Annotated[float, Field(gt=1, le=1024, strict=True), Cap("25x DeepSeek-V3's 40")]
    original_max_position_embeddings: Positions
    beta_fast: PositiveFloat = 32.0
    beta_slow: PositiveFloat = 1.0
    mscale: Annotated[float, Field(gt=0, le=100, strict=True), Cap("the published models use 1")] = 1.0
    mscale_all_dim: Annotated[float, Field(ge=0, le=100, strict=True), Cap("the published models use 0 or 1")] = 0.0

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
    heads: Heads
    q_lora_rank: Rank | None  # null: one q_proj, as in Moonlight
    kv_lora_rank: Rank
    qk_nope_head_dim: HeadDim
    qk_rope_head_dim: HeadDim
    v_head_dim: HeadDim
    rope: Rope = Rope()

    @model_validator(mode="after")
    def _rope_dim_even(self) -> Attention:
        if self.qk_rope_head_dim % 2:
            raise spec_error("qk_rope_head_dim", "an even number (rotary dims come in pairs)", self.qk_rope_head_dim)
        return self


class DenseMlp(Section):
    intermediate_size: Ffn


class Balance(Section):
    """Aux-loss-free balancing: after each step the router bias moves by `rate` towards even expert load."""

    kind: Literal["aux_free_bias", "none"] = "aux_free_bias"
    rate: Annotated[float, Field(ge=0, le=1, strict=True), Cap("router scores lie in (0, 1)")] = 1.0e-3


class Router(Section):
    scoring: Literal["sigmoid"] = "sigmoid"
    groups: ExpertCount = 1
    groups_per_token: ExpertCount = 1
    normalize: Flag = True
    routed_scaling: Multiplier = 1.0
    balance: Balance = Balance()


class Moe(Section):
    routed_experts: Experts
    shared_experts: SharedExperts = 1
    experts_per_token: ExpertCount
    expert_intermediate_size: Ffn
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
    vocab_size: Vocab
    hidden_size: Width
    layers: Layers
    dense_layers: DenseLayers = 1  # the first layers use a dense SwiGLU MLP
    norm_eps: Epsilon = 1.0e-6
    max_position_embeddings: Positions = 4096
    tie_embeddings: Flag = False
    init_std: Annotated[float, Field(gt=0, le=1, strict=True), Cap("50x the usual 0.02")] = 0.02
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
    warmup_steps: NonNegativeSteps = 0
    decay: Literal["constant", "cosine", "linear"] = "cosine"
    final_lr_ratio: Annotated[float, Field(ge=0, le=1, strict=True)] = 0.1


class Muon(Section):
    momentum: Fraction = 0.95
    nesterov: Flag = True
    ns_steps: Annotated[int, Field(gt=0, le=100, strict=True), Cap("Muon uses 5 Newton-Schulz steps")] = 5
    ns_coefficients: tuple[Coefficient, Coefficient, Coefficient] = (3.4445, -4.7750, 2.0315)
    rms_scale: Multiplier = 0.2  # update RMS matched to AdamW's, so Muon reuses its lr and weight decay
    router_weight: Literal["adamw", "muon"] = "adamw"
    # "standard": Muon's and K2's iteration. "gram": the same steps run on the n x n Gram matrix, in fp16 where the
    # iteration is in bf16, for the matrices where that takes at least 10% fewer multiply-adds (group_params)
    newton_schulz: Literal["standard", "gram"] = "standard"


class AdamW(Section):
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: Epsilon = 1.0e-8


class QkClip(Section):
    enabled: Flag = True
    tau: PositiveFloat = 100.0


class Optimizer(Section):
    kind: Literal["muonclip", "muon", "adamw"] = "muonclip"
    lr: LearningRate = 2.0e-4
    weight_decay: Annotated[float, Field(ge=0, le=100, strict=True), Cap("1000x the usual 0.1")] = 0.1
    grad_clip: NonNegativeFloat = 1.0  # max global grad norm; 0 turns clipping off
    schedule: Schedule = Schedule()
    muon: Muon = Muon()
    adamw: AdamW = AdamW()
    qk_clip: QkClip = QkClip()

    @model_validator(mode="after")
    def _decay_shrinks(self) -> Optimizer:
        if self.lr * self.weight_decay >= 1:
            raise spec_error(
                "weight_decay",
                f"lr x weight_decay below 1 (decoupled decay multiplies each weight by 1 - lr x weight_decay a step; "
                f"lr is {self.lr:g})",
                self.weight_decay,
            )
        return self


# --------------------------------------------------------------------------- adapter

_LAYER_RANGE = re.compile(r"\s*(\d{1,9})\s*(?:-\s*(\d{1,9})\s*)?")


def layer_ranges(text: str) -> list[tuple[int, int]] | None:
    """The inclusive (first, last) ranges of a target's `layers` ("1-3", "0,2,5-7"), None if malformed."""
    ranges = []
    for part in text.split(","):
        m = _LAYER_RANGE.fullmatch(part)
        if m is None:
            return None
        first, last = int(m[1]), int(m[2] or m[1])
        if last < first:
            return None
        ranges.append((first, last))
    return ranges


def parse_layers(text: str) -> frozenset[int] | None:
    """The layer indices of a target's `layers` ("1-3", "0,2,5-7"; ranges inclusive), None if malformed.

    Call it on validated specs only: a spec's ranges are checked to lie below `model.layers` (so the set is small);
    a raw text such as "0-999999999" would make a set of a billion integers.
    """
    ranges = layer_ranges(text)
    if ranges is None:
        return None
    return frozenset(i for first, last in ranges for i in range(first, last + 1))


MAX_TARGETS = 256  # target patterns in an adapter; each is tried against every linear of every layer
MAX_PATTERN_LENGTH = 200
MAX_PATTERN_NAMES = 256  # names a pattern's braces expand to: `{a,b}{c,d}` is 4


def brace_names(pattern: str) -> int:
    """How many patterns `experts.{up,down}`-style braces expand to (2 here), stopping early past a million."""
    count = 1
    while count <= 10**6 and (m := re.search(r"\{([^{}]*)\}", pattern)):
        count *= m[1].count(",") + 1
        pattern = pattern[:m.start()] + "_" + pattern[m.end():]  # the innermost group, as one of its names
    return count


class AdapterTarget(Section):
    """One target pattern: a glob over the IR's linear names (`attn.kv_b`, `experts.{up,down}`, ...)."""

    match: Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_LENGTH, strict=True)]
    layers: Text | None = None  # "1-3", "0,2,5-7"; all layers when absent
    keep_ratio: Ratio | None = None  # None: the compiler's default for the site
    svd_rank: Rank | None = None
    rank: Rank | None = None

    @model_validator(mode="after")
    def _layers_readable(self) -> AdapterTarget:
        names = brace_names(self.match)
        if names > MAX_PATTERN_NAMES:
            raise spec_error("match", f"a pattern whose braces expand to at most {MAX_PATTERN_NAMES} names",
                             self.match, found_text=f"{show_value(self.match)}, which expands to "
                                                    f"{'more than a million' if names > 10**6 else names}")
        if self.layers is not None and layer_ranges(self.layers) is None:
            raise spec_error("layers", "layer indices and ascending ranges, like '1-3' or '0,2,5-7'", self.layers)
        return self


class Adapter(Section):
    kind: Literal["none", "lora", "ce_lora"] = "none"
    rank: Rank = 16
    alpha: Annotated[float, Field(gt=0, le=1e6, strict=True), Cap("alpha / rank scales the adapter's output")] = 32.0
    rslora: Flag = False
    dropout: Fraction = 0.0
    svd_rank: Rank | None = None  # default 7/8 of the rank, the CE-LoRA authors' choice
    refresh_every: Steps = 200
    lora_optimizer: Literal["adamw", "muon"] = "adamw"
    targets: Annotated[tuple[AdapterTarget, ...], Field(max_length=MAX_TARGETS)] = ()

    @model_validator(mode="after")
    def _targets_present(self) -> Adapter:
        if self.kind != "none" and not self.targets:
            raise spec_error("targets", f"at least one target for an adapter of kind {self.kind!r}", [])
        return self


# --------------------------------------------------------------------------- training


class Training(Section):
    seq_len: Positions = 256
    batch_size: Sequences = 16  # sequences per forward, over all processes; a step takes grad_accum of them
    grad_accum: Sequences = 1
    steps: Steps = 300
    dtype: Literal["float32", "bfloat16"] = "float32"
    # "bundled", or a path: a UTF-8 text file, JSON Lines or Parquet records, or a folder of `datasets`' save_to_disk
    data: Annotated[str, Field(min_length=1, strict=True)] = "bundled"
    data_format: Literal["auto", "text", "jsonl", "parquet", "datasets"] = "auto"  # auto: by data's file name
    # The records' field that holds a document: "messages" for chat data, else "text" when not given
    data_field: Annotated[str, Field(min_length=1, strict=True)] | None = None
    chat: Flag = False  # records are conversations: rendered with the chat template, loss on the assistant's tokens
    # "bytes" (token = UTF-8 byte, a vocabulary of 256), or a tokenizer folder in the Hugging Face layout
    tokenizer: Annotated[str, Field(min_length=1, strict=True)] = "bytes"
    # A checkpoint in the published layout to start from (fine-tuning); None: random.
    init_from: Annotated[str, Field(min_length=1, strict=True)] | None = None
    eval_fraction: Annotated[float, Field(gt=0, lt=1, strict=True)] = 0.05
    eval_every: Steps = 50
    log_every: Steps = 10
    checkpoint_every: NonNegativeSteps = 0  # 0: only at the end
    seed: Seed = 0

    @property
    def source_format(self) -> str:
        """data_format, with auto resolved by the file name: .jsonl / .json are JSON Lines, .parquet Parquet, any
        other name (and the bundled corpus) a text."""
        if self.data_format != "auto":
            return self.data_format
        return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(
            os.path.splitext(self.data)[1].lower(), "text")

    @property
    def record_field(self) -> str | None:
        """The field of each record that training reads; None for a text, which has no records."""
        if self.source_format == "text":
            return None
        return self.data_field or ("messages" if self.chat else "text")

    @model_validator(mode="after")
    def _data_readable(self) -> Training:
        text = self.source_format == "text"
        if self.data == "bundled" and not text:
            raise spec_error("data_format", "auto or text for the bundled corpus (a text)", self.data_format)
        if text and self.chat:
            raise spec_error("chat", "false for a text (conversations are records: set data_format to jsonl, "
                             f"parquet or datasets; data is {show_value(self.data)})", self.chat)
        if text and self.data_field is not None:
            raise spec_error("data_field", "no data_field for a text (it names a field of JSONL, Parquet or "
                             f"datasets records; data is {show_value(self.data)})", self.data_field)
        if self.chat and self.tokenizer == "bytes":
            raise spec_error("tokenizer", "a tokenizer folder with a chat template (training.chat is true)",
                             self.tokenizer)
        return self


# --------------------------------------------------------------------------- parallel

MAX_PROCESSES = 2**17
Processes = Annotated[int, Field(gt=0, le=MAX_PROCESSES, strict=True), Cap("8x the largest published GPU cluster")]


class Parallel(Section):
    """How the processes of a run share the model. The processes form a (data_shard x expert) mesh; every
    process reads its own share of each batch. Parameters are sharded (FSDP2) over all processes, except each MoE
    layer's routed experts: those are split over the `expert` processes of a mesh row (tokens travel to their
    experts by all-to-all) and sharded over the `data_shard` processes of a mesh column."""

    # processes a row of experts is sharded over; "auto": the launch's process count / expert
    data_shard: Processes | Literal["auto"] = "auto"
    expert: Processes = 1  # processes the routed experts of a MoE layer are split over
    activation_checkpoint: tuple[Literal["dense", "moe"], ...] = ()  # layer kinds recomputed in the backward
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"  # the dtype gradients are averaged in

    @field_validator("activation_checkpoint")
    @classmethod
    def _once_each(cls, kinds: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(kinds)) != len(kinds):
            raise PydanticCustomError("k2c_value", "expected {expected}", {"expected": "each layer kind once"})
        return kinds


# --------------------------------------------------------------------------- the whole spec


# Top-level names a generated package must not shadow besides the standard library's and whatever is installed:
# k2c, its output folder, and what k2c, its generated packages and its tests import (installed or not).
RESERVED_NAMES = {
    "k2c": "k2c itself",
    "generated": "the folder k2c builds packages into",
    **dict.fromkeys(
        ("torch", "triton", "numpy", "yaml", "safetensors", "transformers", "peft", "matplotlib", "pydantic",
         "pydantic_core", "jinja2", "networkx", "tqdm", "huggingface_hub", "tokenizers", "accelerate", "hypothesis",
         "pytest", "xdist", "setuptools", "pip"),
        "a package that k2c or a generated package imports",
    ),
}
MAX_NAME_LENGTH = 100


def _installed_module(name: str) -> bool:
    """Whether `name` is a top-level module or package on sys.path, not counting the current directory.

    Only the top level is looked up, and nothing is imported. A folder without `__init__.py` counts only in an
    installation's site-packages (as `nvidia/` or `google/`): elsewhere any folder is one, and whether a spec name
    is good should not depend on the folders beside the user's project.
    """
    try:
        here = {"", ".", os.getcwd()}
    except OSError:  # the current directory was removed
        here = {"", "."}
    paths = [p for p in sys.path if isinstance(p, str) and p not in here]
    try:
        found = importlib.machinery.PathFinder.find_spec(name, paths)
    except (ImportError, ValueError, OSError):
        return False
    if found is None:
        return False
    if found.origin not in (None, "namespace"):
        return True
    locations = found.submodule_search_locations or []
    return any(os.path.basename(os.path.dirname(loc)) in ("site-packages", "dist-packages") for loc in locations)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a generated package's name (it must import as itself and hide no module), or None."""
    fix = f"{name.strip('_') or 'spec'}_model"
    if keyword.iskeyword(name):
        return f"a package name that is not a Python keyword (try '{fix}')"
    if name.startswith("__") and name.endswith("__"):
        return f"a package name that is not a dunder like __init__ (try '{fix}')"
    if name in sys.stdlib_module_names or name in sys.builtin_module_names:
        return f"a package name that does not shadow the standard library module '{name}' (try '{fix}')"
    if name in RESERVED_NAMES:
        return f"a package name that does not shadow '{name}', {RESERVED_NAMES[name]} (try '{fix}')"
    if _installed_module(name):
        return f"a package name that does not shadow the installed module '{name}' (try '{fix}')"
    return None


def _package_name(name: str) -> str:
    """The spec's name becomes the generated package's: an importable name that shadows no module."""
    problem = name_problem(name)
    if problem is not None:
        raise PydanticCustomError("k2c_value", "expected {expected}", {"expected": problem})
    return name


def parameter_count(model: Model) -> dict[str, int]:
    """The model's parameters by part, as `sum(p.numel() for p in model.parameters())` counts them.

    The same count as the `count_params` pass (buffers such as the router bias are not parameters), computed from
    the sizes alone so that validation can refuse a model too large to build before anything is built.
    """
    h, a = model.hidden_size, model.attention
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank is None:
        q = h * a.heads * qk
    else:
        q = h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.heads * qk
    attention = (q + h * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
                 + a.kv_lora_rank * a.heads * (a.qk_nope_head_dim + a.v_head_dim) + a.heads * a.v_head_dim * h)
    counts = {
        "embedding": model.vocab_size * h * (1 if model.tie_embeddings else 2) + h,
        "attention": model.layers * (attention + 2 * h),
        "dense_mlp": 0,
        "routed_experts": 0,
        "shared_experts": 0,
    }
    if model.dense_mlp is not None:
        counts["dense_mlp"] = model.dense_layers * 3 * h * model.dense_mlp.intermediate_size
    if model.moe is not None and model.moe_layers:
        moe = model.moe
        counts["routed_experts"] = model.moe_layers * moe.routed_experts * (3 * h * moe.expert_intermediate_size + h)
        counts["shared_experts"] = model.moe_layers * 3 * h * moe.expert_intermediate_size * moe.shared_experts
    return counts


# For a model too large to build, the sizes that make each part large, and Kimi K2's values to judge them by: the
# field blamed is the one furthest above Kimi K2's.
_PART_SIZES = {
    "embedding": ("vocab_size", "hidden_size"),
    "attention": ("layers", "hidden_size", "attention.heads", "attention.q_lora_rank", "attention.kv_lora_rank",
                  "attention.qk_nope_head_dim", "attention.qk_rope_head_dim", "attention.v_head_dim"),
    "dense_mlp": ("dense_layers", "hidden_size", "dense_mlp.intermediate_size"),
    "routed_experts": ("layers", "moe.routed_experts", "hidden_size", "moe.expert_intermediate_size"),
    "shared_experts": ("layers", "moe.shared_experts", "hidden_size", "moe.expert_intermediate_size"),
}
_KIMI_K2_SIZES = {
    "vocab_size": 163840, "hidden_size": 7168, "layers": 61, "dense_layers": 1, "attention.heads": 64,
    "attention.q_lora_rank": 1536, "attention.kv_lora_rank": 512, "attention.qk_nope_head_dim": 128,
    "attention.qk_rope_head_dim": 64, "attention.v_head_dim": 128, "dense_mlp.intermediate_size": 18432,
    "moe.routed_experts": 384, "moe.shared_experts": 1, "moe.expert_intermediate_size": 2048,
}
BYTES_PER_PARAMETER = {"float32": 4, "bfloat16": 2}


def _field_value(model: Model, dotted: str) -> int:
    value: object = model
    for part in dotted.split("."):
        value = getattr(value, part)
    return value if isinstance(value, int) else 0


class Spec(Section):
    name: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$", max_length=MAX_NAME_LENGTH, strict=True)]
    description: Text = ""
    model: Model
    optimizer: Optimizer = Optimizer()
    adapter: Adapter = Adapter()
    training: Training = Training()
    parallel: Parallel = Parallel()

    @field_validator("name")
    @classmethod
    def _importable(cls, name: str) -> str:
        return _package_name(name)

    @model_validator(mode="after")
    def _fits(self) -> Spec:
        self._buildable()
        self._parallel_fits()
        if self.training.seq_len > self.model.max_position_embeddings:
            raise spec_error(
                "training.seq_len",
                f"at most model.max_position_embeddings ({self.model.max_position_embeddings})",
                self.training.seq_len,
            )
        tokens = self.training.batch_size * self.training.seq_len
        if tokens > MAX_TOKENS_PER_STEP:
            raise spec_error(
                "training.batch_size",
                f"at most {MAX_TOKENS_PER_STEP} tokens a step (batch_size x seq_len; 16x Kimi K2's 67M)",
                self.training.batch_size,
                found_text=f"{self.training.batch_size} sequences of {self.training.seq_len} = {tokens:.3g} tokens",
            )
        for i, target in enumerate(self.adapter.targets):
            ranges = layer_ranges(target.layers) if target.layers is not None else None  # readable: AdapterTarget
            if ranges and max(last for _, last in ranges) >= self.model.layers:
                expected = f"layer indices below model.layers ({self.model.layers})"
                raise spec_error(f"adapter.targets.{i}.layers", expected, target.layers)
        if self.training.tokenizer == "bytes" and self.model.vocab_size < 256:
            on = ("the bundled byte-level corpus" if self.training.data == "bundled"
                  else "UTF-8 bytes (training.tokenizer)")
            raise spec_error("model.vocab_size", f"at least 256 to train on {on}", self.model.vocab_size)
        return self

    def _parallel_fits(self) -> None:
        """The mesh must split the experts and the batch evenly; the launch checks the process count against it."""
        p, moe = self.parallel, self.model.moe
        if p.expert > 1:
            experts = moe.routed_experts if moe is not None and self.model.moe_layers else 0
            if not experts or experts % p.expert:
                raise spec_error("parallel.expert", f"a divisor of model.moe.routed_experts ({experts})"
                                 if experts else "1 for a model without MoE layers", p.expert)
        processes = p.expert * (p.data_shard if p.data_shard != "auto" else 1)
        if self.training.batch_size % processes:
            field = "parallel.data_shard" if p.data_shard != "auto" else "parallel.expert"
            raise spec_error(field, f"a mesh of processes that splits training.batch_size "
                             f"({self.training.batch_size}) evenly", getattr(p, field.split(".")[1]),
                             found_text=f"{getattr(p, field.split('.')[1])}, a mesh of {processes} processes")

    def _buildable(self) -> None:
        """A model above MAX_PARAMS is an error naming the size that makes it so, with its weight memory."""
        counts = parameter_count(self.model)
        total = sum(counts.values())
        if total <= MAX_PARAMS:
            return
        part = max(counts, key=counts.__getitem__)
        field = max(_PART_SIZES[part], key=lambda f: _field_value(self.model, f) / _KIMI_K2_SIZES[f])
        value = _field_value(self.model, field)
        dtype = self.training.dtype
        memory = total * BYTES_PER_PARAMETER[dtype]
        raise spec_error(
            f"model.{field}",
            f"a model of at most {MAX_PARAMS:.0e} parameters (10x Kimi K2's {KIMI_K2_PARAMS:.3g})",
            value,
            found_text=(f"{value}, which makes {total:.3g} parameters ({memory:.3g} bytes of weights in {dtype}; "
                        f"{counts[part] / total:.0%} of them in the {part.replace('_', ' ')})"),
        )


def softmax_scale(attention: Attention) -> float:
    """`(dn + dr)^-0.5`, times `mscale^2` under YaRN (DeepSeek-V3's rule)."""
    scale = (attention.qk_nope_head_dim + attention.qk_rope_head_dim) ** -0.5
    yarn = attention.rope.scaling
    if yarn is not None and yarn.mscale_all_dim:
        m = 0.1 * yarn.mscale_all_dim * math.log(yarn.factor) + 1.0
        scale *= m * m
    return scale
