"""Compile a spec, lower and emit its package, and write it without losing a user's work.

spec -> IR graph -> passes -> `lower` -> Plan -> `emit`: `plan.py` (the plan as data), `model.py` (the wiring,
emitted from the graph) and `__init__.py` (the package's contract, from `templates/__init__.py.jinja`). Every
Python file is checked with `ast.parse` and written atomically (a temporary file, then `os.replace`).
`manifest.json` records the sha256 of every file written; a rebuild refuses to overwrite a file whose content no
longer matches (a user edited it) unless forced, and removes the files of an older build that this one no longer
writes.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import jinja2

from k2c.codegen import context
from k2c.codegen.emit import emit_model, emit_plan
from k2c.codegen.lower import lower
from k2c.ir import Graph, build_graph
from k2c.passes import run_pipeline
from k2c.runtime.files import write_atomic
from k2c.runtime.plan import PLAN_SCHEMA
from k2c.spec.schema import Spec

TEMPLATES = Path(__file__).parent / "templates"


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


def _docstring_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def render_package(spec: Spec, graph: Graph) -> dict[str, str]:
    header = context.header(spec, graph)
    plan = lower(graph)
    init = _environment().get_template("__init__.py.jinja").render(
        header=header, name=spec.name, schema=PLAN_SCHEMA,
        description=_docstring_text(spec.description or f"The {spec.name} model."),
    )
    files = {"__init__.py": init, "plan.py": emit_plan(plan, header), "model.py": emit_model(graph, plan, header)}
    for name, text in files.items():
        try:
            ast.parse(text, filename=name)
        except SyntaxError as err:
            raise CodegenError(f"generated {name} is not valid Python: line {err.lineno}: {err.msg}") from err
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
    stale = sorted(_recorded_files(out_dir).keys() - files.keys())  # written by an older k2c, unedited (checked above)
    written = []
    # manifest.json last: until it is replaced, the old one still describes what is on disk.
    for name in sorted(files, key=lambda n: n == "manifest.json"):
        path = out_dir / name
        if path.exists() and path.read_text(encoding="utf-8") == files[name]:
            continue
        write_atomic(path, files[name])
        written.append(name)
    for name in stale:
        (out_dir / name).unlink(missing_ok=True)
        written.append(f"removed {name}")
    return BuildResult(out_dir, graph, tuple(written))


def _recorded_files(out_dir: Path) -> dict[str, str]:
    try:
        return json.loads((out_dir / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
