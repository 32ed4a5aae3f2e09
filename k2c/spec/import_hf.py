"""`k2c import-hf`: a spec from a Hugging Face config of the DeepseekV3 architecture (DeepSeek-V3, Kimi K2, Moonlight).

The model section describes the network transformers' `DeepseekV3ForCausalLM` builds from the config: each field
comes from one config key (`_FIELDS`, plus the RoPE block), keys the config leaves out take transformers'
`DeepseekV3Config` defaults, and a value k2c cannot build is an error that names its key. The optimizer, adapter
and training sections are left to k2c's defaults.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .loader import MAX_INT_DIGITS, Issue, SpecError, dotted, explain, file_error, read_text
from .schema import MAX_NAME_LENGTH, Spec, Training, name_problem, show_value

MODEL_TYPES = ("deepseek_v3", "kimi_k2")

# transformers' DeepseekV3Config defaults, for the keys a config leaves out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "max_position_embeddings": 4096,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "rope_theta": 10000.0,  # RotaryEmbeddingConfigMixin.default_theta
}

# Keys whose other values change the network into one k2c does not build; absent means this value.
REQUIRED_VALUES: dict[str, Any] = {
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "scoring_func": "sigmoid",  # DeepSeek's own config class; transformers always scores with a sigmoid
    "topk_method": "noaux_tc",
    "moe_layer_freq": 1,  # every layer after the dense ones is MoE
}

# spec field <- config key, for the fields copied as they are, in the spec's order (RoPE: see _rope).
_FIELDS = (
    ("model.vocab_size", "vocab_size"),
    ("model.hidden_size", "hidden_size"),
    ("model.layers", "num_hidden_layers"),
    ("model.dense_layers", "first_k_dense_replace"),
    ("model.norm_eps", "rms_norm_eps"),
    ("model.max_position_embeddings", "max_position_embeddings"),
    ("model.tie_embeddings", "tie_word_embeddings"),
    ("model.init_std", "initializer_range"),
    ("model.attention.heads", "num_attention_heads"),
    ("model.attention.q_lora_rank", "q_lora_rank"),
    ("model.attention.kv_lora_rank", "kv_lora_rank"),
    ("model.attention.qk_nope_head_dim", "qk_nope_head_dim"),
    ("model.attention.qk_rope_head_dim", "qk_rope_head_dim"),
    ("model.attention.v_head_dim", "v_head_dim"),
    ("model.dense_mlp.intermediate_size", "intermediate_size"),
    ("model.moe.routed_experts", "n_routed_experts"),
    ("model.moe.shared_experts", "n_shared_experts"),
    ("model.moe.experts_per_token", "num_experts_per_tok"),
    ("model.moe.expert_intermediate_size", "moe_intermediate_size"),
    ("model.moe.router.groups", "n_group"),
    ("model.moe.router.groups_per_token", "topk_group"),
    ("model.moe.router.normalize", "norm_topk_prob"),
    ("model.moe.router.routed_scaling", "routed_scaling_factor"),
)


class _Conversion:
    """Spec fields by dotted path, each with the config key it came from and a note for its YAML comment."""

    def __init__(self, config: dict[str, Any], file: str):
        self.config = config
        self.file = file
        self.values: dict[str, Any] = {}
        self.keys: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.issues: list[Issue] = []

    def set(self, path: str, value: Any, key: str, note: str | None = None) -> None:
        self.values[path] = value
        self.keys[path] = key
        self.notes[path] = note or key

    def copy(self, path: str, key: str) -> None:
        if key in self.config:
            self.set(path, self.config[key], key)
        else:
            self.set(path, HF_DEFAULTS[key], key, f"{key} absent: transformers' default")

    def reject(self, key: str, expected: str, found: object) -> None:
        self.issues.append(Issue(self.file, None, None, key, f"expected {expected}, found {show_value(found)}"))


def _check_supported(c: _Conversion) -> None:
    config = c.config
    if config.get("model_type") not in MODEL_TYPES:
        c.reject("model_type", "one of 'deepseek_v3', 'kimi_k2' (the DeepseekV3 architecture)",
                 config.get("model_type"))
    for key, required in REQUIRED_VALUES.items():
        if key in config and config[key] != required:
            c.reject(key, f"{show_value(required)}, the only value k2c builds", config[key])
    heads = config.get("num_attention_heads", HF_DEFAULTS["num_attention_heads"])
    kv_heads = config.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        c.reject("num_key_value_heads", f"num_attention_heads ({heads}): MLA gives every head its own key and value",
                 kv_heads)


def _rope(c: _Conversion) -> None:
    """RoPE as transformers reads it: `rope_scaling` (older configs) wins over `rope_parameters` (5.x)."""
    config = c.config
    block = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = config.get(block) or {}
    if not isinstance(params, dict):
        c.reject(block, "a mapping or null", params)
        return
    if "rope_theta" in params:
        c.set("model.attention.rope.theta", params["rope_theta"], f"{block}.rope_theta")
    else:
        c.copy("model.attention.rope.theta", "rope_theta")
    c.copy("model.attention.rope.interleaved", "rope_interleave")

    scaling = "model.attention.rope.scaling"
    type_key = "rope_type" if "rope_type" in params else "type"
    kind = params.get(type_key, "default")
    if kind == "default":
        c.set(scaling, None, block, "no YaRN in the config")
        return
    if kind != "yarn":
        c.reject(f"{block}.{type_key}", "'yarn' or 'default'", kind)
        return
    for key, usual in (("attention_factor", None), ("truncate", True), ("partial_rotary_factor", 1.0)):
        if params.get(key, usual) != usual:
            c.reject(f"{block}.{key}", f"{show_value(usual)} (k2c builds the YaRN transformers derives by default)",
                     params[key])
    c.set(f"{scaling}.kind", "yarn", f"{block}.{type_key}")
    c.set(f"{scaling}.factor", params.get("factor"), f"{block}.factor")
    key = f"{block}.original_max_position_embeddings"
    if "original_max_position_embeddings" in params:
        c.set(f"{scaling}.original_max_position_embeddings", params["original_max_position_embeddings"], key)
    else:
        c.set(f"{scaling}.original_max_position_embeddings", c.values["model.max_position_embeddings"], key,
              f"{key} absent: max_position_embeddings, as in transformers")
    # transformers reads a missing or zero beta as its default (`get("beta_fast") or 32`).
    for field, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        key = f"{block}.{field}"
        if params.get(field):
            c.set(f"{scaling}.{field}", params[field], key)
        else:
            c.set(f"{scaling}.{field}", default, key, f"{key} absent: transformers' default")
    # transformers scales cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else
    # by mscale(factor, 1), and the softmax by mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set. So
    # without mscale_all_dim, mscale is unused and 1 builds the same; with it, mscale must be given.
    key = f"{block}.mscale_all_dim"
    if params.get("mscale_all_dim"):
        c.set(f"{scaling}.mscale", params.get("mscale"), f"{block}.mscale")
        c.set(f"{scaling}.mscale_all_dim", params["mscale_all_dim"], key)
    else:
        c.set(f"{scaling}.mscale", 1.0, f"{block}.mscale", f"{block}.mscale unused without mscale_all_dim")
        c.set(f"{scaling}.mscale_all_dim", 0.0, key, key if "mscale_all_dim" in params else f"{key} absent")


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    """`{"model.moe.routed_experts": 8}` -> `{"model": {"moe": {"routed_experts": 8}}}`, keeping the order."""
    tree: dict[str, Any] = {}
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _convert(config: Any, name: str | None, file: str, source: str) -> _Conversion:
    """The validated conversion; `name` defaults to the model_type, `source` says where the config came from."""
    if not isinstance(config, dict):
        raise file_error(file, f"expected a JSON object of config keys, found {show_value(config)}")
    c = _Conversion(config, file)
    _check_supported(c)
    model_type = config.get("model_type")
    spec_name = name if name is not None else default_name(sanitize_name(str(model_type)))
    description = f"Imported from {source} (model_type {model_type})."
    c.values.update(name=spec_name, description=description)
    dense_layers = config.get("first_k_dense_replace", HF_DEFAULTS["first_k_dense_replace"])
    layers = config.get("num_hidden_layers", HF_DEFAULTS["num_hidden_layers"])
    for path, key in _FIELDS:
        # A section no layer uses is left out: dense_mlp with no dense layers, moe with no MoE layers.
        unused = (path.startswith("model.dense_mlp.") and dense_layers == 0
                  or path.startswith("model.moe.") and dense_layers == layers)
        if not unused:
            c.copy(path, key)
    _rope(c)
    max_positions = c.values["model.max_position_embeddings"]
    default_seq_len = Training.model_fields["seq_len"].default
    if isinstance(max_positions, int) and 0 < max_positions < default_seq_len:
        c.set("training.seq_len", max_positions, "max_position_embeddings",
              "max_position_embeddings (below k2c's default sequence length)")
    if c.issues:
        raise SpecError(c.issues)
    try:
        Spec.model_validate(_nest(c.values))
    except ValidationError as exc:
        issues = []
        for problem in map(explain, exc.errors()):
            field = dotted(problem.path)
            hf_key = c.keys.get(field)
            issues.append(Issue(file, None, None, f"{hf_key} ({field})" if hf_key else field, problem.message))
        raise SpecError(issues) from None
    return c


def sanitize_name(text: str) -> str:
    """`Kimi-K2-Instruct` -> `kimi_k2_instruct`: lowercase letters, digits and `_`, not starting with a digit."""
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return f"m_{name}" if name[:1].isdigit() else name


def default_name(name: str) -> str:
    """A name derived from a config or its folder, made a good package name: `json` -> `json_model`."""
    name = name[:MAX_NAME_LENGTH - len("_model")].rstrip("_") or "imported"
    return f"{name}_model" if name_problem(name) else name


def spec_from_hf_config(config: dict[str, Any], name: str | None = None, *, file: str = "config.json") -> dict:
    """The spec, as a validated dict, for a Hugging Face DeepseekV3-architecture config given as a dict.

    `name` defaults to the config's model_type; `file` names the config in error messages.
    """
    return _nest(_convert(config, name, file, "a Hugging Face config").values)


def _name_from_path(path: Path) -> str:
    """The checkpoint's folder name; in the Hugging Face cache (models--org--Name/snapshots/<rev>/), Name."""
    folder = path.parent
    if folder.parent.name == "snapshots":
        return sanitize_name(folder.parent.parent.name.rpartition("--")[2])
    return sanitize_name(folder.name)


MAX_CONFIG_BYTES = 4 * 2**20  # published config.json files are a few KiB


class _LongInteger(ValueError):
    def __init__(self, digits: str):
        super().__init__(digits[:40])
        self.digits = digits


def _bounded_int(text: str) -> int:
    """A JSON integer, refused past MAX_INT_DIGITS digits (Python would refuse past 4300, with a traceback)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _LongInteger(text)
    return int(text)


def import_hf_config(path: str | os.PathLike[str], name: str | None = None) -> str:
    """The YAML text of a spec for a Hugging Face `config.json`, each model field commented with its key.

    `name` defaults to the config's folder name, else its model_type.
    """
    file = os.fspath(path)
    text = read_text(path, limit=MAX_CONFIG_BYTES, what="a config")
    try:
        config = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise SpecError([Issue(file, exc.lineno, exc.colno, "", f"invalid JSON: {exc.msg}")]) from None
    except _LongInteger as exc:
        offset = text.find(exc.digits)
        line, column = text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)
        found = f"an integer of {len(exc.digits)} digits"
        message = f"expected an integer of at most {MAX_INT_DIGITS} digits, found {found}"
        raise SpecError([Issue(file, line, column, "", message)]) from None
    except RecursionError:
        raise file_error(file, "invalid JSON: nested too deeply") from None
    path = Path(path)
    shown = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    if name is None and _name_from_path(path):
        name = default_name(_name_from_path(path))
    c = _convert(config, name, file, shown)
    header = [
        f"# Generated by `k2c import-hf` from {shown}.",
        "# The model is the network transformers' DeepseekV3ForCausalLM builds from that config; each field's",
        "# comment names the config key it came from. Sections and fields left out (optimizer, adapter, training)",
        "# take k2c's defaults, from k2c/spec/schema.py.",
    ]
    mtp = config.get("num_nextn_predict_layers") if isinstance(config, dict) else None
    if isinstance(mtp, int) and not isinstance(mtp, bool) and mtp > 0:
        header += [f"# Left out: num_nextn_predict_layers {mtp} (multi-token prediction). k2c builds no MTP layers;",
                   "# loading a checkpoint skips their weights."]
    return "\n".join(header + _yaml_lines(_nest(c.values), c.notes)) + "\n"


def _yaml_lines(tree: dict[str, Any], notes: dict[str, str]) -> list[str]:
    """Block YAML of `tree`, sections in order, each model and training leaf followed by its note."""
    lines: list[tuple[str, str | None]] = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            indent = "  " * len(path)
            if isinstance(value, dict):
                lines.append((f"{indent}{key}:", None))
                walk(value, path + (key,))
            else:
                text = yaml.safe_dump({key: value}, sort_keys=False, width=1000, allow_unicode=True).rstrip("\n")
                note = notes[".".join(path + (key,))] if path else None
                lines.append((indent + text, note))

    walk(tree, ())
    column = max(len(text) for text, note in lines if note) + 2
    return [f"{text.ljust(column)}# {note}" if note else text for text, note in lines]
