"""Checkpoints in the published DeepSeek-V3 / Kimi K2 layout.

On disk each routed expert is a set of linears (`mlp.experts.{j}.gate_proj.weight`, ...); the model stacks them
into `mlp.experts.gate_proj [E, I, H]`. Loading also accepts transformers 5.x's fused layout
(`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`) and the model's own stacked one,
dequantises FP8 weights stored with 128x128 block scales, and skips the multi-token-prediction layers that
DeepSeek-V3 ships after its last decoder layer. Saving writes the per-expert layout, leaves adapters out and
folds QK-Clip's per-head logit scales into the query weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from k2c.runtime.model import CausalLM, Experts, held_rows, local
from k2c.runtime.plan import ModelPlan

FP8_BLOCK = 128
LAYER = re.compile(r"model\.layers\.(\d+)\.")
PER_EXPERT = re.compile(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
STACKED = re.compile(r"(.+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)")
FUSED_GATE_UP = re.compile(r"(.+\.mlp\.experts)\.gate_up_proj")
QUERY = re.compile(r"(.+\.self_attn)\.(q_proj|q_b_proj)\.weight")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mis-shaped tensors."""


def _open(file: Path):
    """A safetensors file opened for reading; a file that is not one (cut short, empty, garbage) is a
    CheckpointError that names it."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise CheckpointError(f"{file}: not a readable safetensors file ({reason})") from None
    except OSError as err:
        raise CheckpointError(f"{file}: cannot be read ({err.strerror or err})") from None


def _weight_map(index: Path) -> dict[str, str]:
    """{tensor name: shard file} of a sharded checkpoint's index."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except OSError as err:
        raise CheckpointError(f"{index}: cannot be read ({err.strerror or err})") from None
    except (ValueError, KeyError, TypeError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{index}: not a safetensors index (no weight_map: {err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a safetensors index (weight_map is not a table of file names)")
    return weight_map


class Checkpoint:
    """Tensors by name from a dict, a .safetensors file, or a folder (sharded with an index, or one file).

    Files are read one tensor at a time, or only some rows of one (`get`'s `rows`), so a checkpoint larger than
    memory can be checked and loaded, and a process that holds a shard of the model reads only that shard.
    """

    def __init__(self, sd_or_path: Mapping[str, torch.Tensor] | str | Path):
        if isinstance(sd_or_path, Mapping):
            self.shapes = {name: tuple(t.shape) for name, t in sd_or_path.items()}
            self.fp8 = {name for name, t in sd_or_path.items() if t.dtype == torch.float8_e4m3fn}
            self._read = lambda name, rows: sd_or_path[name] if rows is None else sd_or_path[name][rows]
            return
        path = Path(sd_or_path)
        index = path / "model.safetensors.index.json"
        if path.is_dir() and index.exists():
            files = {name: path / file for name, file in _weight_map(index).items()}
            handles = {file: _open(file) for file in sorted(set(files.values()))}
        else:
            file = path / "model.safetensors" if path.is_dir() else path
            if not file.is_file():
                if path.is_dir() or not path.exists():
                    raise CheckpointError(f"{path}: no model.safetensors.index.json or model.safetensors found")
                raise CheckpointError(f"{path}: not a regular file")
            handles = {file: _open(file)}
            files = dict.fromkeys(handles[file].keys(), file)
        slices = {name: handles[file].get_slice(name) for name, file in files.items()}
        self.shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
        self.fp8 = {name for name, s in slices.items() if s.get_dtype() == "F8_E4M3"}

        def read(name: str, rows: slice | None) -> torch.Tensor:
            try:
                handle = handles[files[name]]
                return handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
            except SafetensorError as err:
                raise CheckpointError(f"{files[name]}: tensor {name} cannot be read ({err})") from None

        self._read = read

    def get(self, name: str, rows: range | None = None) -> torch.Tensor:
        """The tensor, or its `rows` along dim 0 alone, dequantised to fp32 when it comes with block scales."""
        if rows is None or rows == range(self.shapes[name][0]):
            tensor = self._read(name, None)
            scale = self._read(scale_name(name), None) if scale_name(name) in self.shapes else None
            return tensor if scale is None else dequantize_fp8(tensor, scale)
        tensor = self._read(name, slice(rows.start, rows.stop))
        if scale_name(name) not in self.shapes:
            return tensor
        blocks = slice(rows.start // FP8_BLOCK, -(-rows.stop // FP8_BLOCK))  # the block rows that cover `rows`
        return dequantize_fp8(tensor, self._read(scale_name(name), blocks), rows.start)


def scale_name(name: str) -> str:
    """The block scales that come with an FP8 weight."""
    return f"{name}_scale_inv"


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """weight [R, C] times its block's scale; scale_inv [ceil(R/128), ceil(C/128)], edge blocks partial. A piece of
    a weight, rows first_row to first_row + R, comes with the block rows of scale_inv that cover it."""
    rows, cols = weight.shape
    skip = first_row % FP8_BLOCK
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[skip : skip + rows]
    return weight.float() * scale.repeat_interleave(FP8_BLOCK, 1)[:, :cols]


def checkpoint_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors that a checkpoint holds, by model name: no adapters, no clip scales, no tied head.

    Module extra state (CE-LoRA's refresh position) is training state, not a tensor of the published layout.
    """
    return _checkpoint_tensors(model.state_dict(keep_vars=True), model.plan)


def _checkpoint_tensors(state: Mapping[str, object], plan: ModelPlan) -> dict[str, torch.Tensor]:
    return {
        name: tensor
        for name, tensor in state.items()
        if isinstance(tensor, torch.Tensor)
        and "lora_" not in name
        and not name.endswith(".qk_scale")
        and not (plan.tie_embeddings and name == "lm_head.weight")
    }


@dataclass(frozen=True)
class Target:
    """A model tensor that a checkpoint fills: its shape in the whole model, and which of its indices along dim 0
    (the experts, for a stack of them) this process holds; all of them in a single process."""

    tensor: torch.Tensor  # plain, or this process's DTensor shard (of its experts, for a stack)
    shape: tuple[int, ...]
    rows: range


def load_targets(model: CausalLM) -> dict[str, Target]:
    """What a checkpoint fills: checkpoint_tensors, each with its whole shape and this process's rows."""
    owners = dict(model.named_modules())
    found = {}
    for name, tensor in checkpoint_tensors(model).items():
        module, rows, shape = owners[name.rpartition(".")[0]], held_rows(tensor), tuple(tensor.shape)
        if isinstance(module, Experts):  # a stack of this process's experts, from module.first_expert on
            rows = range(rows.start + module.first_expert, rows.stop + module.first_expert)
            shape = (module.plan.experts, *shape[1:])
        found[name] = Target(tensor, shape, rows)
    return found


def _skipped(name: str, plan: ModelPlan) -> bool:
    """Tensors that belong to no model tensor and are not an error: MTP layers, a tied head."""
    layer = LAYER.match(name)
    if layer and int(layer[1]) >= len(plan.layers):
        return True
    return plan.tie_embeddings and name == "lm_head.weight"


def _route(name: str, targets: dict[str, Target]) -> tuple[list[tuple], tuple[int, ...]] | None:
    """Where checkpoint tensor `name` goes: [(model name, expert index or None, slice of dim 1 or None)] and the
    shape it must have; None when the model has no place for it."""
    if m := PER_EXPERT.fullmatch(name):
        target, expert = f"{m[1]}.{m[3]}", int(m[2])
        if target in targets and expert < targets[target].shape[0]:
            return [(target, expert, None)], targets[target].shape[1:]
        return None
    if (m := FUSED_GATE_UP.fullmatch(name)) and f"{m[1]}.gate_proj" in targets:
        e, i, h = targets[f"{m[1]}.gate_proj"].shape
        return [(f"{m[1]}.gate_proj", None, slice(0, i)), (f"{m[1]}.up_proj", None, slice(i, 2 * i))], (e, 2 * i, h)
    if name in targets:
        return [(name, None, None)], targets[name].shape
    return None


def _pieces(target: str, expert: int | None, targets: dict[str, Target]) -> set[tuple[str, int | None]]:
    """What a copy into `target` (one expert, or all of it) loads; stacked tensors are tracked expert by expert."""
    if STACKED.fullmatch(target):
        experts = range(targets[target].shape[0]) if expert is None else (expert,)
        return {(target, j) for j in experts}
    return {(target, None)}


def _published_name(target: str, expert: int | None) -> str:
    if expert is None:
        return target
    m = STACKED.fullmatch(target)
    assert m is not None  # only stacked tensors are loaded expert by expert
    return f"{m[1]}.{expert}.{m[2]}.weight"


def _describe(problems: list[str], limit: int = 20) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "checkpoint does not fit the model:\n  " + "\n  ".join(problems[:limit]) + more


def load_hf_state_dict(model: CausalLM, sd_or_path: Mapping[str, torch.Tensor] | str | Path) -> None:
    """Copy a checkpoint into the model's tensors (any model dtype; values are converted on copy).

    Everything is checked before anything is copied: on a CheckpointError the model is unchanged. A file that is
    not a readable safetensors file (cut short, empty, garbage) is a CheckpointError that names it. A sharded model
    (k2c.runtime.parallel) reads only what this process holds: its rows of each tensor, its experts of each stack.
    """
    checkpoint = Checkpoint(sd_or_path)
    targets = load_targets(model)
    plan: list[tuple[str, list[tuple]]] = []
    problems: list[str] = []
    loaded: set[tuple[str, int | None]] = set()
    for name, shape in checkpoint.shapes.items():
        if _skipped(name, model.plan):
            continue
        if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in checkpoint.shapes:
            continue  # read together with its weight
        route = _route(name, targets)
        if route is None:
            problems.append(f"unexpected key {name} with shape {shape}")
            continue
        copies, expected = route
        for target, expert, _ in copies:
            pieces = _pieces(target, expert, targets)
            if pieces & loaded:
                problems.append(f"{name}: {_published_name(*min(pieces & loaded))} is given more than once")
            loaded |= pieces  # present, even if mis-shaped: reported once, not also as missing
        scale = checkpoint.shapes.get(scale_name(name))
        blocks = tuple(-(-n // FP8_BLOCK) for n in shape)
        if shape != expected:
            problems.append(f"{name}: expected shape {expected}, found {shape}")
        elif scale is not None and (len(shape) != 2 or scale != blocks):
            problems.append(f"{scale_name(name)}: expected shape {blocks}, found {scale}")
        elif scale is None and name in checkpoint.fp8:
            problems.append(f"{name}: FP8 tensor without {scale_name(name)}")
        else:
            plan.append((name, copies))
    for target in targets:
        missing = sorted(_pieces(target, None, targets) - loaded, key=lambda piece: piece[1] or 0)
        problems += [f"missing key {_published_name(*piece)}" for piece in missing]
    if problems:
        raise CheckpointError(_describe(problems))

    with torch.no_grad():
        for name, copies in plan:
            held = targets[copies[0][0]].rows  # the copies of one tensor are of the same rows
            expert = copies[0][1]
            if expert is not None:  # one expert of a stack, copied where this process holds it
                if expert in held:
                    local(targets[copies[0][0]].tensor)[expert - held.start].copy_(checkpoint.get(name))
            elif held:
                tensor = checkpoint.get(name, held)
                for target, _, part in copies:
                    local(targets[target].tensor).copy_(tensor if part is None else tensor[:, part])
        # the loaded weights define the logits: any clip scale from before no longer applies
        for name, buffer in model.state_dict(keep_vars=True).items():
            if name.endswith(".qk_scale"):
                buffer.fill_(1.0)
    model.reset_step_stats()  # statistics of other weights (or of uninitialised memory after `to_empty`)
    # where the base weights came from: an exported PEFT adapter names it as its base_model_name_or_path
    object.__setattr__(model, "loaded_from", None if isinstance(sd_or_path, Mapping) else os.fspath(sd_or_path))


def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The published layout: one entry per expert linear, no adapter tensors, QK-Clip scales folded into q rows."""
    return published_tensors(model.state_dict(keep_vars=True), model.plan)


def published_tensors(state: Mapping[str, object], plan: ModelPlan) -> dict[str, torch.Tensor]:
    """The published layout of a state dict, or of a part of one (a decoder layer's, under its full names): what
    hf_state_dict gives, a piece of the model at a time for an export that holds one piece at a time.

    Folding multiplies all dn+dr query rows of head h by qk_scale[h], so every logit of the head scales by it.
    """
    scales = {
        name.removesuffix(".qk_scale"): buffer.detach()
        for name, buffer in state.items()
        if name.endswith(".qk_scale") and isinstance(buffer, torch.Tensor)
    }
    out = {}
    for name, tensor in _checkpoint_tensors(state, plan).items():
        tensor = tensor.detach()
        if m := STACKED.fullmatch(name):
            for j, expert in enumerate(tensor.unbind(0)):
                out[f"{m[1]}.{j}.{m[2]}.weight"] = expert.clone()
        elif (m := QUERY.fullmatch(name)) and m[1] in scales:
            scale = scales[m[1]]
            rows = tensor.float().view(scale.shape[0], -1, tensor.shape[1]) * scale.view(-1, 1, 1)
            out[name] = rows.view_as(tensor).to(tensor.dtype)
        else:
            out[name] = tensor
    return out
