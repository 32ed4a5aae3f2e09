"""A model as a Hugging Face model folder, the way the published DeepSeek-V3 / Kimi K2 weights are laid out.

The folder holds `config.json` (k2c.runtime.hf_config, the published names), the weights in the published layout
(k2c.runtime.checkpoint.hf_state_dict) as `model-0000i-of-0000n.safetensors` shards with
`model.safetensors.index.json`, and the tokenizer files of the base checkpoint when there are any (a byte-level
k2c run has none). transformers' `AutoModelForCausalLM.from_pretrained(folder)` loads it, and so do the servers that
read the published checkpoints.

- Adapters are merged into their base weights, or with `peft` the base is written as it is and the adapters go to
  an `adapter/` PEFT folder beside it (`PeftModel.from_pretrained(base, folder / "adapter")`).
- With `fp8`, every 2D linear weight but the embeddings, the router (`mlp.gate.weight`) and lm_head is stored as
  float8_e4m3fn with a `weight_scale_inv` per 128x128 block (the dequantisation multiplier, amax / 448), and
  config.json gets the published `quantization_config`. `load_hf_state_dict` reads such folders back.

Every file is written beside its target and renamed over it; an output folder that holds anything is refused
unless `force` (which then also removes the shards of an earlier export that this one does not replace).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from collections.abc import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from k2c.runtime.adapters import export_peft_adapter, merge_adapters
from k2c.runtime.checkpoint import FP8_BLOCK, published_tensors, scale_name
from k2c.runtime.files import write_atomic
from k2c.runtime.hf_config import hf_config
from k2c.runtime.model import CausalLM
from k2c.runtime.plan import Plan

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP8_SKIPPED = re.compile(r".*(embed_tokens|lm_head|mlp\.gate)\.weight")  # stay in the model's dtype, as published
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
ADAPTER = "adapter"
# what a Hugging Face tokenizer may consist of (Kimi K2 ships tiktoken.model and its tokenization_kimi.py)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "tiktoken.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 10**9
# fills tensors of a model, given by their state-dict names, in place (k2c.runtime.parallel.tensor_loader)
Loader = Callable[[dict[str, torch.Tensor]], None]


class ExportError(ValueError):
    """An export that cannot be done as asked: the message says why."""


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight as float8_e4m3fn, scale_inv [ceil(R/128), ceil(C/128)] fp32) with weight ~ fp8 x its block's scale;
    each block's scale is its amax / 448 (1 for an all-zero block), edge blocks partial."""
    rows, cols = weight.shape
    r, c = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
    padded = weight.new_zeros((r * FP8_BLOCK, c * FP8_BLOCK), dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(r, FP8_BLOCK, c, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(padded)[:rows, :cols]
    return scaled.contiguous().to(torch.float8_e4m3fn), scale.contiguous()


def fp8_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether the published FP8 checkpoints store this tensor in FP8: the 2D linear weights but the embeddings,
    the router and the head."""
    return tensor.ndim == 2 and name.endswith(".weight") and not FP8_SKIPPED.fullmatch(name)


def shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, cut into shards of at most `max_bytes` (a larger tensor gets a shard of its own); an
    FP8 weight and its scales stay together."""
    out: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv") and name.removesuffix("_scale_inv") in tensors:
            continue  # goes with its weight
        group = {name: tensor}
        if scale_name(name) in tensors:
            group[scale_name(name)] = tensors[scale_name(name)]
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if out[-1] and size + nbytes > max_bytes:
            out.append({})
            size = 0
        out[-1].update(group)
        size += nbytes
    return out


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


def _check_folder(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory} exists and is not a folder")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ExportError(f"{directory} is not empty; export into a new folder, or pass --force to write over it")


def tokenizer_files(source: Path | None) -> list[Path]:
    """The tokenizer files in `source` (a checkpoint folder, or the folder of a checkpoint file)."""
    if source is None:
        return []
    folder = source if source.is_dir() else source.parent
    found = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return found + sorted(folder.glob("tokenization_*.py"))


def pieces(model: CausalLM) -> list[tuple[str, nn.Module]]:
    """The parts of the model that an export converts one at a time, by name, in state-dict order: the embedding,
    each decoder layer, the final norm and the head (left out when tied: the published layout has none)."""
    decoder = model.model
    found: list[tuple[str, nn.Module]] = [("model.embed_tokens", decoder.embed_tokens)]
    found += [(f"model.layers.{i}", layer) for i, layer in enumerate(decoder.layers)]
    found.append(("model.norm", decoder.norm))
    return found if model.plan.tie_embeddings else [*found, ("lm_head", model.lm_head)]


def _published(state: dict, model: CausalLM, fp8: bool) -> dict[str, torch.Tensor]:
    """A state dict's tensors (the model's, or a piece's under their full names) in the published layout, FP8
    weights followed by their scales when `fp8`."""
    tensors = published_tensors(state, model.plan)
    if not fp8:
        return tensors
    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if fp8_quantized(name, tensor):
            quantized[name], quantized[scale_name(name)] = quantize_fp8(tensor)
        else:
            quantized[name] = tensor
    return quantized


def _filled(piece: nn.Module, prefix: str, load: Loader | None, merge: bool) -> nn.Module:
    """The piece with its values: for a model on the meta device, a copy allocated on the CPU and filled by `load`;
    with `merge`, (a copy of) it with its adapters merged."""
    if load is not None:
        piece = copy.deepcopy(piece).to_empty(device="cpu")  # a meta piece copies for free
        load({f"{prefix}.{name}": t for name, t in piece.state_dict().items() if isinstance(t, torch.Tensor)})
    elif merge:
        piece = copy.deepcopy(piece)
    return merge_adapters(piece) if merge else piece


def _with_adapters(model: CausalLM, load: Loader) -> CausalLM:
    """A copy of a model on the meta device with only its adapters allocated and filled, for the PEFT folder."""
    model = copy.deepcopy(model)
    adapters: dict[str, torch.Tensor] = {}
    for name, param in list(model.named_parameters()):
        if "lora_" in name:
            module_name, _, attr = name.rpartition(".")
            adapters[name] = nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=False)
            setattr(model.get_submodule(module_name), attr, adapters[name])
    load(adapters)
    return model


def export_hf(model: CausalLM, plan: Plan, directory, *, peft: bool = False, fp8: bool = False,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_from=None, force: bool = False,
              load: Loader | None = None) -> list[str]:
    """Write `model` (not changed) to `directory` as a Hugging Face model folder; see the module docstring.

    The model is converted and written a piece at a time (`pieces`), so that no more than a piece and a shard file
    are held at once beside it. `load`: for a model on the meta device (one larger than this process's memory, of
    a sharded run), fills tensors by their state-dict names (k2c.runtime.parallel.tensor_loader); each piece is
    then allocated, filled, written and freed in turn, and the whole model is never allocated.
    `tokenizer_from`: a checkpoint folder (or file) whose tokenizer files to copy, the fine-tuning base.
    Returns notes on what the folder leaves out (no tokenizer, say), for the caller to show.
    """
    directory = Path(directory)
    if max_shard_bytes < 1:
        raise ExportError(f"the shard size must be at least 1 byte, not {max_shard_bytes}")
    _check_folder(directory, force)
    adapted = any("lora_" in name for name, _ in model.named_parameters())
    if peft and not adapted:
        raise ExportError("the model has no adapters to export as a PEFT folder (leave out --peft)")
    if load is None and any(p.is_meta for p in model.parameters()):
        raise ExportError("the model is on the meta device: give the `load` that fills its tensors")
    notes: list[str] = []
    merge = adapted and not peft
    # every published tensor on the meta device, for the shard files' names and contents before any is written
    meta = {name: t.to("meta") for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    layout = _published(meta, model, fp8)
    dtype = next(iter(layout.values())).dtype  # the embedding's, never FP8
    ragged = [f"{name} {list(t.shape)}" for name, t in layout.items()
              if scale_name(name) in layout and any(size > FP8_BLOCK and size % FP8_BLOCK for size in t.shape)]
    if ragged:
        # k2c's loader reads partial edge blocks (DeepSeek's ceil-divided grid); other readers assume whole ones
        notes.append(f"{len(ragged)} FP8 weights have a size above {FP8_BLOCK} that is not a multiple of it "
                     f"(such as {ragged[0]}): k2c reads them back, but transformers and serving engines' "
                     f"block-FP8 kernels expect whole {FP8_BLOCK}x{FP8_BLOCK} blocks, as in the published models")
    config = hf_config(plan)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)

    directory.mkdir(parents=True, exist_ok=True)
    parts = shards(layout, max_shard_bytes)
    names = [f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    weight_map = {}
    pending: dict[str, torch.Tensor] = {}  # converted, not yet written
    files = list(zip(names, parts))  # written in order, each once all of its tensors are converted
    for prefix, piece in pieces(model):
        pending.update(_published(_filled(piece, prefix, load, merge).state_dict(prefix=f"{prefix}."), model, fp8))
        while files and files[0][1].keys() <= pending.keys():
            file, part = files.pop(0)
            contiguous = {name: pending.pop(name).detach().contiguous() for name in part}
            write_atomic(directory / file, functools.partial(_save_shard, contiguous))
            weight_map.update(dict.fromkeys(part, file))
    assert not files, f"no piece of the model holds {sorted(files[0][1].keys() - pending.keys())[:3]}"
    total = sum(t.numel() * t.element_size() for t in layout.values())
    write_atomic(directory / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2) + "\n")
    write_atomic(directory / "config.json", json.dumps(config, indent=2) + "\n")
    for stale in directory.glob("model*.safetensors"):  # an earlier export's, under --force
        if stale.name not in names and (SHARD.fullmatch(stale.name) or stale.name == "model.safetensors"):
            stale.unlink()

    adapter = directory / ADAPTER
    if peft:
        with tempfile.TemporaryDirectory(dir=directory, prefix=".adapter.") as tmp:
            export_peft_adapter(model if load is None else _with_adapters(model, load), tmp, plan.adapter,
                                base_model_name_or_path=os.fspath(directory.resolve()))
            adapter.mkdir(exist_ok=True)
            for written in Path(tmp).iterdir():
                os.replace(written, adapter / written.name)
    elif adapter.is_dir() and force:
        shutil.rmtree(adapter)  # an earlier export's adapter would not fit the merged weights

    found = tokenizer_files(Path(tokenizer_from) if tokenizer_from is not None else None)
    for source in found:
        write_atomic(directory / source.name, source.read_bytes())
    if not found:
        notes.append("no tokenizer files written: " + (
            f"{tokenizer_from} holds none" if tokenizer_from is not None else
            "the model reads UTF-8 bytes (token id = byte value) and has no tokenizer"))
    return notes


def remove_partial(directory: Path) -> None:
    """Remove an export folder that this process created and did not finish."""
    with contextlib.suppress(OSError):
        shutil.rmtree(directory)
