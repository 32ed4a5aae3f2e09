"""Hostile and malformed specs: `k2c check` refuses each one quickly, in little memory, with one clear message.

Every case is a file made at test time in the test's own folder (or copied there from tests/hostile_specs/): YAML
bombs, deep nesting, huge numbers, huge and binary files, other encodings, names that shadow modules, sizes no
machine can build. Each is checked by `k2c check FILE` in a process of its own (forked from a driver that has
imported k2c.cli, see DRIVER; a few also in a fresh `python -m k2c.cli`), with that folder as the current
directory, and must give exit code 2, only `FILE:LINE:COL: error: ...` lines (or `FILE: error: ...` where there is
no position) on stderr, nothing on stdout, no traceback, no file written, in under 2 s and 500 MB. A subset is
checked against its exact message (GOLDEN).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = Path(__file__).resolve().parent / "hostile_specs"
TINY = (ROOT / "specs" / "k2-tiny.yaml").read_text(encoding="utf-8")

SPEC = "spec.yaml"  # the name each case is written under, and so the name in its messages
MAX_SECONDS = 2.0
MAX_RSS_BYTES = 500 * 2**20
ADDRESS_SPACE = 4 * 2**30  # a runaway allocation fails in the child instead of exhausting the machine

# --------------------------------------------------------------------------- building the cases


def tiny(*changes: tuple[str, str], extra: str = "") -> str:
    """k2-tiny.yaml with `key: value` lines replaced: ("hidden_size", "64") sets the first `hidden_size:` line."""
    text = TINY
    for key, value in changes:
        text, n = re.subn(rf"(?m)^(\s*{re.escape(key)}: )[^#\n]*", lambda m, v=value: m[1] + v + " ", text, count=1)
        assert n == 1, key
    return text + extra


def write(text: str | bytes) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        data = text.encode("utf-8") if isinstance(text, str) else text
        (folder / SPEC).write_bytes(data)
        return SPEC

    return make


USED_CHECKED_IN: set[str] = set()


def checked_in(name: str) -> Callable[[Path], str]:
    USED_CHECKED_IN.add(name)

    def make(folder: Path) -> str:
        shutil.copy(CHECKED_IN / name, folder / name)
        return name

    return make


def _big_file_of_unknown_keys(folder: Path) -> str:
    # The 57 MB spec of unknown keys, which once took 227 s and 5.3 GB to reject.
    line = b"unknown_key_%08d: [1, 2, 3, {a: b}]\n"
    with open(folder / SPEC, "wb") as out:
        out.write(b"".join(line % i for i in range(1_500_000))[:57_000_000])
    return SPEC


def _sparse_file(folder: Path) -> str:
    with open(folder / SPEC, "wb") as out:
        out.truncate(10 * 2**30)  # 10 GiB that occupy no disk
    return SPEC


def _directory(folder: Path) -> str:
    (folder / SPEC).mkdir()
    return SPEC


def _missing(folder: Path) -> str:
    return SPEC


def _symlink_loop(folder: Path) -> str:
    (folder / SPEC).symlink_to(SPEC)
    return SPEC


def _dangling_symlink(folder: Path) -> str:
    (folder / SPEC).symlink_to("nowhere.yaml")
    return SPEC


def _gzip(folder: Path) -> str:
    (folder / SPEC).write_bytes(gzip.compress(TINY.encode(), mtime=0))
    return SPEC


def _bomb(levels: int, width: int, *, mapping: bool = False) -> str:
    lines = ["name: &l0 lol"]
    for i in range(1, levels):
        refs = [f"k{j}: *l{i - 1}" if mapping else f"*l{i - 1}" for j in range(width)]
        open_, close = ("{", "}") if mapping else ("[", "]")
        lines.append(f"l{i}: &l{i} {open_}{', '.join(refs)}{close}")
    lines.append(f"model: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def _deep_block(keys: int) -> str:
    """`model:` then `keys` nested `a:` mappings, then a scalar: keys + 2 levels deep."""
    return "name: x\nmodel:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(keys)) + "  " * (keys + 1) + "1\n"


HUGE_DIGITS = "9" * 100_000

CASES: dict[str, Callable[[Path], str]] = {
    # -- files that are not spec text
    "empty": write(""),
    "whitespace_with_a_tab": write("   \n\n\t\n"),
    "only_comments": write("# nothing\n# here\n"),
    "only_bom": write(b"\xef\xbb\xbf"),
    "only_document_marker": write("---\n...\n"),
    "directory": _directory,
    "missing": _missing,
    "symlink_loop": _symlink_loop,
    "dangling_symlink": _dangling_symlink,
    "file_57mb_unknown_keys": _big_file_of_unknown_keys,
    "file_just_over_the_cap": write("#" * (256 * 1024) + "\n"),
    "file_sparse_10gib": _sparse_file,
    "dev_zero": lambda folder: "/dev/zero",
    "gzip_of_a_spec": _gzip,
    "png_header": write(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))),
    "elf_header": write(b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56),
    "random_bytes": write(bytes((i * 7919 + 13) % 256 for i in range(4096))),
    "nul_in_text": write(TINY.replace("layers: 4", "layers: 4\x00")),
    "nul_at_start": write("\x00" + TINY),
    # -- encodings
    "utf16_le_bom": write(TINY.encode("utf-16")),
    "utf16_be_bom": write(b"\xfe\xff" + TINY.encode("utf-16-be")),
    "utf32_le_bom": write(TINY.encode("utf-32")),
    "utf16_le_without_bom": write(TINY.encode("utf-16-le")),
    "latin1": write(tiny(("description", "'Modèle réduit'")).encode("latin-1")),
    "cp1252_quotes": write(tiny(("description", "\u201ctiny\u201d")).encode("cp1252")),
    "shift_jis": write(tiny(("description", "'小さいモデル'")).encode("shift_jis")),
    "overlong_utf8": write(b"name: \xc0\xaf\n"),
    "utf8_encoded_surrogate": write(b"name: \xed\xa0\x80\n"),
    "truncated_utf8_at_end": write(b"name: x\ndescription: caf\xc3"),
    "byte_ff": write(b"name: x\xff\n"),
    "bell_character": write(tiny(("description", "'ding\x07'"))),
    "escape_character": write(tiny(("description", "\x1b[31mred"))),
    "noncharacter_fffe": write(tiny(("description", "x\ufffey"))),
    "bom_in_the_middle": write("name: x\n\ufeffmodel: {}\n"),
    # -- YAML bombs and aliases
    "billion_laughs_checked_in": checked_in("billion_laughs.yaml"),
    "merge_key_bomb_checked_in": checked_in("merge_key_bomb.yaml"),
    "alias_depth_bomb_checked_in": checked_in("alias_depth_bomb.yaml"),
    "recursive_merge_checked_in": checked_in("recursive_merge.yaml"),
    "python_object_tag_checked_in": checked_in("python_object_tag.yaml"),
    "billion_laughs_lists": write(_bomb(10, 10)),
    "billion_laughs_mappings": write(_bomb(10, 10, mapping=True)),
    "bomb_two_wide_forty_deep": write(_bomb(40, 2)),
    "bomb_in_adapter_targets": write(tiny(extra="adapter:\n  kind: lora\n  targets: &t [" + ", ".join(
        ["{match: attn.o}"] * 100) + "]\nx: &x [" + ", ".join(["*t"] * 100) + "]\n")),
    "many_aliases_to_a_scalar": write("name: &n x\nmodel: [" + ", ".join(["*n"] * 12_000) + "]\n"),
    "alias_to_itself_in_a_list": write("name: x\nmodel: &m [*m]\n"),
    "alias_undefined": write("name: *nothing\n"),
    "alias_in_a_key_to_a_mapping": write("name: &n {a: 1}\n*n : 1\n"),
    "anchor_redefined_many_times": write("".join(f"k{i}: &a [*a, *a]\n" if i else "k0: &a [1]\n"
                                                 for i in range(20))),
    # -- nesting
    "deep_flow_lists": write("name: " + "[" * 100_000 + "]" * 100_000 + "\n"),
    "deep_flow_mappings": write("name: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n"),
    "deep_block_mappings": write(_deep_block(300)),
    "deep_block_sequences": write("name:\n" + "- " * 5_000 + "x\n"),
    "deep_by_21_levels": write(_deep_block(19)),
    "deep_in_model_section": write(tiny(("scaling", "" + "[" * 30 + "]" * 30))),
    # -- too many nodes
    "twenty_thousand_top_level_keys": write("".join(f"k{i}: {i}\n" for i in range(20_000))),
    "long_flow_list": write("name: x\nmodel: [" + "0," * 60_000 + "0]\n"),
    "long_block_list": write("name: x\nmodel:\n" + "  - 0\n" * 20_000),
    "three_thousand_unknown_keys": write(tiny(extra="".join(f"unknown_{i}: {i}\n" for i in range(3_000)))),
    "unknown_keys_in_every_section": write(tiny(extra="".join(f"zz{i}: 0\n" for i in range(200))).replace(
        "  vocab_size:", "".join(f"  yy{i}: 0\n" for i in range(200)) + "  vocab_size:")),
    # -- YAML syntax and tags
    "two_documents": write(TINY + "---\n" + TINY),
    "unclosed_flow_mapping": write("name: x\nmodel: {vocab_size: 1\n"),
    "unclosed_quote": write("name: 'x\n"),
    "tab_indentation": write("name: x\nmodel:\n\tvocab_size: 1\n"),
    "yaml_2_directive": write("%YAML 2.0\n---\nname: x\n"),
    "unknown_local_tag": write(tiny(("hidden_size", "!big 64"))),
    "python_name_tag": write("name: !!python/name:os.system x\n"),
    "int_tag_on_text": write(tiny(("layers", "!!int four"))),
    "int_tag_on_hex": write(tiny(("layers", "!!int 0x10"))),
    "float_tag_on_text": write(tiny(("lr", "!!float fast"))),
    "bool_tag_on_text": write(tiny(("tie_embeddings", "!!bool maybe"))),
    "timestamp_tag_on_text": write(tiny(("data", "!!timestamp soon"))),
    "binary_tag_on_garbage": write(tiny(("data", "!!binary '!!!'"))),
    "tagged_mapping": write(tiny(("scaling", "!!python/object:dict {factor: 2.0}"))),
    "duplicate_top_level_key": write(TINY + "name: again\n"),
    "list_as_a_key": write("? [a, b]\n: 1\nname: x\n"),
    "null_as_a_key": write("~: 1\nname: x\n"),
    "key_longer_than_yaml_allows": write("k" * 2_000 + ": 1\n"),
    "explicit_key_of_100k_characters": write(TINY + "? " + "k" * 100_000 + "\n: 1\n"),
    "duplicate_explicit_key_of_100k_characters": write("name: x\n" + ("? " + "k" * 100_000 + "\n: 1\n") * 2),
    "key_with_invisible_characters": write(TINY + "\u200bname\u2060: x\n"),
    "only_spaces_and_newlines": write("   \n\n   \n"),
    # -- numbers as written
    "int_of_100000_digits": write(tiny(("hidden_size", HUGE_DIGITS))),
    "int_of_31_digits": write(tiny(("hidden_size", str(10**30)))),
    "negative_int_of_50_digits": write(tiny(("seed", "-" + "7" * 50))),
    "int_key_of_1000_digits": write("9" * 1_000 + ": 1\nname: x\n"),
    "float_of_200_characters": write(tiny(("lr", "0." + "1" * 200))),
    "float_overflowing_to_inf": write(tiny(("lr", "1e400"))),
    "float_negative_inf": write(tiny(("norm_eps", "-.inf"))),
    "float_nan": write(tiny(("tau", ".nan"))),
    "float_underflowing_to_zero": write(tiny(("lr", "1e-400"))),
    "int_digits_in_a_string": write(tiny(("layers", "'" + HUGE_DIGITS[:50_000] + "'"))),
    # -- sizes no machine can build
    "hidden_size_1e12": write(tiny(("hidden_size", str(10**12)))),
    "hidden_size_1e29": write(tiny(("hidden_size", str(10**29)))),
    "routed_experts_1e9": write(tiny(("routed_experts", str(10**9)))),
    "vocab_size_1e12": write(tiny(("vocab_size", str(10**12)))),
    "layers_1e7": write(tiny(("layers", str(10**7)))),
    "heads_1e6": write(tiny(("heads", str(10**6)))),
    "head_dim_1e9": write(tiny(("v_head_dim", str(10**9)))),
    "q_lora_rank_1e15": write(tiny(("q_lora_rank", str(10**15)))),
    "dense_intermediate_1e12": write(tiny(("intermediate_size", str(10**12)))),
    "expert_intermediate_1e12": write(tiny(("expert_intermediate_size", str(10**12)))),
    "shared_experts_1e6": write(tiny(("shared_experts", str(10**6)))),
    "max_positions_1e12": write(tiny(("max_position_embeddings", str(10**12)))),
    "batch_size_1e12": write(tiny(("batch_size", str(10**12)))),
    "steps_1e15": write(tiny(("steps", str(10**15)))),
    "seed_2_64": write(tiny(("seed", str(2**64)))),
    "ns_steps_1e9": write(tiny(("ns_steps", str(10**9)))),
    "lr_1e308": write(tiny(("lr", "1e308"))),
    "lr_10": write(tiny(("lr", "10.0"))),
    "eps_1e300": write(tiny(("eps", "1e300"))),
    "norm_eps_1e300": write(tiny(("norm_eps", "1e300"))),
    "init_std_1e300": write(tiny(("init_std", "1e300"))),
    "routed_scaling_1e300": write(tiny(("routed_scaling", "1e300"))),
    "rms_scale_1e300": write(tiny(("rms_scale", "1e300"))),
    "ns_coefficients_1e300": write(tiny(("ns_coefficients", "[1e300, -1e300, 1e300]"))),
    "weight_decay_1e300": write(tiny(("weight_decay", "1e300"))),
    "decay_wipes_weights": write(tiny(("lr", "0.5"), ("weight_decay", "4.0"))),
    "yarn_factor_1e300": write(tiny(("scaling", "{factor: 1e300, original_max_position_embeddings: 256}"))),
    "yarn_mscale_1e300": write(tiny(("scaling", ("{factor: 2.0, original_max_position_embeddings: 256, "
                                                 "mscale: 1e300, mscale_all_dim: 1e300}")))),
    "adapter_rank_1e12": write(tiny(extra=f"adapter:\n  kind: lora\n  rank: {10**12}\n  targets: [{{match: o}}]\n")),
    "adapter_layers_range_1e9": write(tiny(extra="adapter:\n  kind: lora\n  targets: [{match: attn.o, "
                                                 "layers: '0-999999999'}]\n")),
    "adapter_layers_range_of_5000_digits": write(tiny(extra="adapter:\n  kind: lora\n  targets: [{match: attn.o, "
                                                            "layers: '0-" + "9" * 5_000 + "'}]\n")),
    "adapter_match_of_a_million_names": write(tiny(extra="adapter:\n  kind: lora\n  targets: [{match: '"
                                                         + "{a,b}" * 20 + "'}]\n")),
    "adapter_match_of_1000_characters": write(tiny(extra="adapter:\n  kind: lora\n  targets: [{match: "
                                                         + "a" * 1000 + "}]\n")),
    "adapter_of_3000_targets": write(tiny(extra="adapter:\n  kind: lora\n  targets:\n"
                                                 + "    - {match: attn.o}\n" * 3000)),
    "parameters_in_the_routed_experts": write(tiny(("hidden_size", "131072"), ("layers", "512"),
                                                   ("routed_experts", "65536"), ("expert_intermediate_size", "1048576"),
                                                   ("dtype", "bfloat16"))),
    "parameters_in_the_attention": write(tiny(("hidden_size", "131072"), ("layers", "512"), ("heads", "1024"),
                                              ("qk_nope_head_dim", "4096"), ("v_head_dim", "4096"))),
    "parameters_in_the_dense_mlp": write(tiny(("hidden_size", "131072"), ("layers", "512"), ("dense_layers", "512"),
                                              ("intermediate_size", "1048576"))),
    "parameters_in_the_embedding_and_experts": write(tiny(("vocab_size", "2097152"), ("hidden_size", "131072"),
                                                          ("routed_experts", "65536"), ("layers", "512"))),
    "tokens_per_step": write(tiny(("max_position_embeddings", "16777216"), ("seq_len", "16777216"),
                                  ("batch_size", "1024"))),
    # -- names that cannot be a generated package
    **{f"name_{name}": write(tiny(("name", name))) for name in (
        "torch", "json", "k2c", "os", "sys", "typing", "builtins", "this", "site", "_thread", "numpy", "yaml",
        "triton", "safetensors", "transformers", "peft", "matplotlib", "pydantic", "jinja2", "networkx", "generated",
        "class", "def", "import", "lambda", "__init__", "__main__", "sympy",
    )},
    "name_200_characters": write(tiny(("name", "a" * 200))),
    "name_uppercase": write(tiny(("name", "Kimi"))),
    "name_with_dash": write(tiny(("name", "kimi-k2"))),
    "name_starting_with_digit": write(tiny(("name", "2kimi"))),
    "name_empty": write(tiny(("name", "''"))),
    "name_unicode": write(tiny(("name", "módel"))),
    "name_null": write(tiny(("name", "null"))),
    "name_list": write(tiny(("name", "[a, b]"))),
    "name_with_dot": write(tiny(("name", "a.b"))),
    "name_path": write(tiny(("name", "../../etc/passwd"))),
}

# The exact messages of a representative subset, as `k2c check` prints them for a file named spec.yaml.
CAP = "k2c's cap"
GOLDEN: dict[str, list[str]] = {
    "empty": ["spec.yaml: error: the file is empty; a spec is a mapping with at least 'name' and 'model'"],
    "directory": ["spec.yaml: error: is a directory, not a file"],
    "missing": ["spec.yaml: error: no such file"],
    "file_57mb_unknown_keys": ["spec.yaml: error: expected a spec of at most 256 KiB, found 54.4 MiB"],
    "file_sparse_10gib": ["spec.yaml: error: expected a spec of at most 256 KiB, found 10.0 GiB"],
    "dev_zero": ["/dev/zero: error: expected a spec of at most 256 KiB, found more"],
    "gzip_of_a_spec": ["spec.yaml:1:2: error: the file is not UTF-8 text (byte 0x8b)"],
    "elf_header": ["spec.yaml:1:8: error: expected text, found a NUL byte (is this a binary file?)"],
    "utf16_le_bom": ["spec.yaml: error: the file is UTF-16 text; expected UTF-8 (save it as UTF-8)"],
    "utf32_le_bom": ["spec.yaml: error: the file is UTF-32 text; expected UTF-8 (save it as UTF-8)"],
    "latin1": ["spec.yaml:7:18: error: the file is not UTF-8 text (byte 0xe8)"],
    "bell_character": ["spec.yaml:7:19: error: invalid YAML: unprintable character U+0007"],
    "billion_laughs_checked_in": [(
        "billion_laughs.yaml:7:8: error: expected at most 10000 YAML nodes with aliases expanded (a whole spec has "
        "about 150), found alias *e, which adds 7381 and takes the count to 15692")],
    "merge_key_bomb_checked_in": [(
        "merge_key_bomb.yaml:6:21: error: expected at most 10000 YAML nodes with aliases expanded (a whole spec has "
        "about 150), found alias *c, which adds 3102 and takes the count to 12697")],
    "alias_depth_bomb_checked_in": [(
        "alias_depth_bomb.yaml:9:10: error: expected at most 20 levels of nesting (a spec needs 6), found alias *f, "
        "which reaches level 23")],
    "recursive_merge_checked_in": [
        "recursive_merge.yaml:3:8: error: model: expected a value, found an alias that contains itself"],
    "python_object_tag_checked_in": [(
        "python_object_tag.yaml:2:7: error: name: expected a list without a tag, found a list tagged "
        "!!python/object/apply:os.system")],
    "deep_flow_lists": [
        "spec.yaml:1:26: error: expected at most 20 levels of nesting (a spec needs 6), found level 21 here"],
    "twenty_thousand_top_level_keys": [
        "spec.yaml:5000:8: error: expected at most 10000 YAML nodes (a whole spec has about 150), found more"],
    "int_tag_on_text": ["spec.yaml:11:11: error: model.layers: expected an integer, found 'four' tagged !!int"],
    "bool_tag_on_text": [(
        "spec.yaml:15:19: error: model.tie_embeddings: expected a value that !!bool can read, found 'maybe' tagged "
        "!!bool")],
    "int_of_100000_digits": [(
        "spec.yaml:10:16: error: model.hidden_size: expected an integer of at most 30 digits, found an integer of "
        "100000 digits")],
    "float_overflowing_to_inf": ["spec.yaml:47:7: error: optimizer.lr: expected a finite number, found inf"],
    "hidden_size_1e12": [(
        f"spec.yaml:10:16: error: model.hidden_size: expected a number <= 131072 ({CAP}: 6x the widest published "
        "model's 20480), found 1000000000000")],
    "routed_experts_1e9": [(
        f"spec.yaml:32:21: error: model.moe.routed_experts: expected a number <= 65536 ({CAP}: 170x Kimi K2's 384), "
        "found 1000000000")],
    "vocab_size_1e12": [(
        f"spec.yaml:9:15: error: model.vocab_size: expected a number <= 2097152 ({CAP}: 8x the largest published "
        "vocabulary, 262144), found 1000000000000")],
    "layers_1e7": [(
        f"spec.yaml:11:11: error: model.layers: expected a number <= 512 ({CAP}: 4x the deepest published model's "
        "126), found 10000000")],
    "lr_1e308": [(
        f"spec.yaml:47:7: error: optimizer.lr: expected a number <= 1 ({CAP}: AdamW and Muon move a weight by about "
        "lr a step; above 1, one step wipes out the model), found 1e+308")],
    "parameters_in_the_routed_experts": [(
        "spec.yaml:35:31: error: model.moe.expert_intermediate_size: expected a model of at most 1e+13 parameters "
        "(10x Kimi K2's 1.03e+12), found 1048576, which makes 1.38e+19 parameters (2.76e+19 bytes of weights in "
        "bfloat16; 100% of them in the routed experts)")],
    "name_torch": [(
        "spec.yaml:6:7: error: name: expected a package name that does not shadow 'torch', a package that k2c or a "
        "generated package imports (try 'torch_model'), found 'torch'")],
    "name_json": [(
        "spec.yaml:6:7: error: name: expected a package name that does not shadow the standard library module "
        "'json' (try 'json_model'), found 'json'")],
    "name_k2c": [(
        "spec.yaml:6:7: error: name: expected a package name that does not shadow 'k2c', k2c itself (try "
        "'k2c_model'), found 'k2c'")],
    "name_class": [(
        "spec.yaml:6:7: error: name: expected a package name that is not a Python keyword (try 'class_model'), "
        "found 'class'")],
    "file_just_over_the_cap": ["spec.yaml: error: expected a spec of at most 256 KiB, found 262145 bytes"],
    "int_key_of_1000_digits": ["spec.yaml:1:1: error: expected a string key, found an integer of 1000 digits"],
    "key_with_invisible_characters": [(
        "spec.yaml:76:1: error: \\u200bname\\u2060: expected no key '\\u200bname\\u2060' here (did you mean 'name'? "
        "allowed: name, description, model, optimizer, adapter, training, parallel), found key '\\u200bname\\u2060'")],
    "tagged_mapping": [(
        "spec.yaml:28:16: error: model.attention.rope.scaling: expected a mapping without a tag, found a mapping "
        "tagged !!python/object:dict")],
    "adapter_match_of_a_million_names": [(
        "spec.yaml:78:21: error: adapter.targets[0].match: expected a pattern whose braces expand to at most 256 "
        "names, found '{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}{a,b}'... (100 characters), which "
        "expands to more than a million")],
    "decay_wipes_weights": [(
        "spec.yaml:48:17: error: optimizer.weight_decay: expected lr x weight_decay below 1 (decoupled decay "
        "multiplies each weight by 1 - lr x weight_decay a step; lr is 0.5), found 4.0")],
    "tokens_per_step": [(
        "spec.yaml:69:15: error: training.batch_size: expected at most 1073741824 tokens a step (batch_size x "
        "seq_len; 16x Kimi K2's 67M), found 1024 sequences of 16777216 = 1.72e+10 tokens")],
    "name___init__": [(
        "spec.yaml:6:7: error: name: expected a package name that is not a dunder like __init__ (try "
        "'init_model'), found '__init__'")],
}

# --------------------------------------------------------------------------- running them

# One driver process imports k2c.cli once, then forks a child per case: the child enters the case's folder, points
# stdout and stderr at files of its own, caps its address space, and runs `k2c.cli.main(["check", SPEC])` as
# `python -m k2c.cli check SPEC` would, printing a traceback if anything escapes. The driver times each child and
# takes its peak memory and CPU time from `os.wait4`. A fork costs a millisecond where a fresh interpreter costs
# 0.3 s, so the whole corpus runs in seconds; the import time is added to each case's time, and a few cases also
# run in fresh `python -m k2c.cli` processes (test_fresh_process).
DRIVER = """\
import json, os, resource, sys, time, traceback
start = time.perf_counter()
import k2c.cli
import_seconds = time.perf_counter() - start
results = {}
for name, folder, spec, out, err in json.load(sys.stdin):
    begin = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(folder)
            for fd, path in ((1, out), (2, err)):
                target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(target, fd)
                os.close(target)
            resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
            code = k2c.cli.main(["check", spec])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() - begin > 30:
            os.kill(pid, 9)
            done, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.001)
    results[name] = {
        "returncode": os.waitstatus_to_exitcode(status),
        "seconds": import_seconds + time.perf_counter() - begin,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "max_rss": usage.ru_maxrss * 1024,
    }
json.dump(results, sys.stdout)
""".replace("ADDRESS_SPACE", str(ADDRESS_SPACE))


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # wall time, including the interpreter's import of k2c.cli
    cpu_seconds: float
    max_rss: int  # bytes


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and modification time (links not followed)."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def run_cases(cases: dict[str, Callable[[Path], str]], base: Path) -> dict[str, tuple[str, Run, bool]]:
    """Each case checked in its own folder: the spec as named to `k2c check`, the run, and whether the folder is as
    it was before the check."""
    jobs, before = [], {}
    for name, make in cases.items():
        folder = base / "cases" / name
        folder.mkdir(parents=True)
        spec = make(folder)
        before[name] = snapshot(folder)
        out, err = base / f"{name}.stdout", base / f"{name}.stderr"
        jobs.append((name, str(folder), spec, str(out), str(err)))
    driver = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(jobs), capture_output=True, text=True,
                            cwd=base, env=subprocess_env(), timeout=300, check=False)
    assert driver.returncode == 0 and not driver.stderr, driver.stderr[-3000:]
    results = json.loads(driver.stdout)
    runs = {}
    for name, _, spec, out, err in jobs:
        text = {path: Path(path).read_bytes().decode(errors="replace") for path in (out, err)}
        runs[name] = (spec, Run(stdout=text[out], stderr=text[err], **results[name]),
                      snapshot(base / "cases" / name) == before[name])
    return runs


def problems(case: str, spec: str, run: Run, unchanged: bool) -> list[str]:
    """What is wrong with how `k2c check` answered a hostile spec; empty when it refused it cleanly."""
    found = []
    if "Traceback" in run.stderr:
        return [f"a traceback:\n{run.stderr[-3000:]}"]
    if run.returncode != 2:
        found.append(f"exit code {run.returncode}, not 2")
    if run.stdout:
        found.append(f"stdout {run.stdout[:300]!r}")
    lines = run.stderr.splitlines()
    if not lines:
        found.append("no message")
    pattern = re.compile(rf"{re.escape(spec)}:(\d+:\d+:)? error: \S")
    found += [f"not a file:line:col error: {line[:300]!r}" for line in lines if not pattern.match(line)]
    found += [f"a line of {len(line)} characters" for line in lines if len(line) > 1000]
    if len(lines) > 51:
        found.append(f"{len(lines)} lines (at most 50 issues and a count of the rest)")
    if case in GOLDEN and lines != GOLDEN[case]:
        found.append(f"message {lines}, expected {GOLDEN[case]}")
    if not unchanged:
        found.append("a file was written or changed")
    if run.seconds >= MAX_SECONDS or run.cpu_seconds >= MAX_SECONDS:
        found.append(f"took {run.seconds:.2f} s ({run.cpu_seconds:.2f} s of CPU)")
    if run.max_rss >= MAX_RSS_BYTES:
        found.append(f"peak memory {run.max_rss / 2**20:.0f} MiB")
    return found


def test_corpus_is_large_and_goldens_name_cases():
    assert len(CASES) >= 100
    assert set(GOLDEN) <= set(CASES)
    assert {p.name for p in CHECKED_IN.glob("*.yaml")} == USED_CHECKED_IN


CHUNKS = 6  # the corpus in a few batches, so that `pytest -n` spreads it over the cores


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_hostile_specs_are_refused_cleanly(chunk, tmp_path):
    names = sorted(CASES)[chunk::CHUNKS]
    runs = run_cases({name: CASES[name] for name in names}, tmp_path)
    failures = []
    for name in names:
        spec, run, unchanged = runs[name]
        failures += [f"{name}: {problem}" for problem in problems(name, spec, run, unchanged)]
    assert not failures, "\n".join(failures)


# A few cases in a fresh `python -m k2c.cli check` process each, as a user runs it: interpreter start included.
FRESH = ["billion_laughs_checked_in", "file_57mb_unknown_keys", "int_of_100000_digits", "name_torch",
         "parameters_in_the_routed_experts", "twenty_thousand_top_level_keys"]

# The child reports its own peak resident memory (VmHWM: this process's, unlike ru_maxrss, which on Linux keeps the
# forking parent's across exec) to a file named by the environment.
FRESH_CHILD = """\
import atexit, os, resource, runpy, sys
def report():
    with open("/proc/self/status") as status, open(os.environ["K2C_TEST_PEAK"], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(report)
resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
sys.argv = ["k2c"] + sys.argv[1:]
runpy.run_module("k2c.cli", run_name="__main__", alter_sys=True)
""".replace("ADDRESS_SPACE", str(ADDRESS_SPACE))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("case", FRESH)
def test_fresh_process(case, tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    spec = CASES[case](folder)
    before = snapshot(folder)
    peak = tmp_path / "peak"
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", FRESH_CHILD, "check", spec], cwd=folder, capture_output=True,
                           text=True, env=subprocess_env(K2C_TEST_PEAK=str(peak)), timeout=60, check=False)
    seconds = time.perf_counter() - start
    run = Run(child.returncode, child.stdout, child.stderr, seconds, seconds, int(peak.read_text()) * 1024)
    assert problems(case, spec, run, snapshot(folder) == before) == []


def test_the_tiny_spec_passes_the_same_harness(tmp_path):
    # The harness itself: a good spec checks out through the same driver, so the failures above are the spec's.
    _, run, unchanged = run_cases({"the_tiny_spec": write(TINY)}, tmp_path)["the_tiny_spec"]
    assert (run.returncode, run.stderr, run.stdout) == (0, "", f"{SPEC}: ok (k2_tiny)\n")
    assert unchanged and run.seconds < MAX_SECONDS
