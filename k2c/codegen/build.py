"""Render the generated package from a decided graph and write it without losing a user's work.

Each file is rendered from `templates/<file>.jinja` with `StrictUndefined`, parsed with `ast.parse` when it is
Python, and written atomically (a temporary file, then `os.replace`). `manifest.json` records the sha256 of every
file written; a rebuild refuses to overwrite a file whose content no longer matches (a user edited it) unless
forced.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2

from k2c.codegen import context
from k2c.ir import Graph, build_graph
from k2c.passes import run_pipeline
from k2c.spec.schema import Spec

TEMPLATES = Path(__file__).parent / "templates"
PACKAGE_FILES = ("__init__.py", "config.py", "model.py", "checkpoint.py", "adapters.py", "optim.py", "train.py")


class CodegenError(RuntimeError):
    """A template that did not render to valid code, or a package that may not be overwritten."""


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    graph: Graph
    written: tuple[str, ...]  # files whose content changed


def compile_spec(spec: Spec, dump_ir: Path | None = None) -> Graph:
    return run_pipeline(build_graph(spec), dump_ir)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def render_package(spec: Spec, graph: Graph) -> dict[str, str]:
    env = _environment()
    values = {
        "header": context.header(spec, graph),
        "config_fields": context.config_fields(spec),
        "adapter_sites": context.adapter_sites(graph),
        "param_rules": context.param_rules(graph),
        "clip_sites": context.clip_sites(graph),
        "spec_name": spec.name,
        "description": spec.description,
    }
    files: dict[str, str] = {}
    for name in PACKAGE_FILES:
        try:
            text = env.get_template(f"{name}.jinja").render(values)
        except jinja2.TemplateError as err:
            raise CodegenError(f"template {name}.jinja: {err}") from err
        try:
            ast.parse(text, filename=name)
        except SyntaxError as err:
            raise CodegenError(f"generated {name} is not valid Python: line {err.lineno}: {err.msg}") from err
        files[name] = text
    files["manifest.json"] = context.manifest(spec, graph, files)
    return files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edited_files(out_dir: Path, new_files: dict[str, str]) -> list[str]:
    """Files that hold neither what the last build wrote nor what this one would (or all, if not a k2c package).

    Matching the new content too keeps a build that was interrupted before its manifest was written rebuildable.
    """
    if not out_dir.exists():
        return []
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        return sorted(p.name for p in out_dir.iterdir() if p.name != "__pycache__")
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return ["manifest.json"]
    new_digests = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in new_files.items()}
    return sorted(name for name, digest in recorded.items()
                  if (out_dir / name).exists() and _sha256(out_dir / name) not in (digest, new_digests.get(name)))


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_package(spec: Spec, out_dir: Path, *, force: bool = False, dump_ir: Path | None = None) -> BuildResult:
    graph = compile_spec(spec, dump_ir)
    files = render_package(spec, graph)
    edited = edited_files(out_dir, files)
    if edited and not force:
        raise CodegenError(
            f"{out_dir} holds files changed since k2c wrote them ({', '.join(edited)}); "
            "refusing to overwrite them. Move your changes elsewhere, or pass --force to replace them."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    # manifest.json last: until it is replaced, the old one still describes what is on disk.
    for name in sorted(files, key=lambda n: n == "manifest.json"):
        path = out_dir / name
        if path.exists() and path.read_text(encoding="utf-8") == files[name]:
            continue
        write_atomic(path, files[name])
        written.append(name)
    return BuildResult(out_dir, graph, tuple(written))
