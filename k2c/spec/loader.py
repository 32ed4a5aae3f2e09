"""Load a spec file: YAML read with the position of every key and value, then validated by the schema.

Everything a user can get wrong (a missing or unreadable file, bad YAML, a duplicate key, a wrong type, an unknown
key, a broken cross-field rule) ends in one `SpecError` listing every issue as
`file:line:column: error: field.path: expected ..., found ...`.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .schema import Spec, show_value

FieldPath = tuple[str | int, ...]  # mapping keys and list indices, from the top of the spec


@dataclass(frozen=True)
class Issue:
    file: str
    line: int | None  # 1-based; None when the issue is about the whole file
    column: int | None
    field: str  # dotted field path; "" when the issue is not about one field
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}:{self.column}"
        what = f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}: error: {what}"


class SpecError(Exception):
    """Everything wrong with one spec (or imported config); the message is complete, one line per issue."""

    def __init__(self, issues: Iterable[Issue]):
        self.issues = tuple(dict.fromkeys(issues))
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(map(str, self.issues))


def file_error(file: str, message: str) -> SpecError:
    return SpecError([Issue(file, None, None, "", message)])


def dotted(path: FieldPath) -> str:
    """`('adapter', 'targets', 0, 'match')` -> `adapter.targets[0].match`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


# --------------------------------------------------------------------------- reading


def read_text(path: str | os.PathLike[str]) -> str:
    """The file's text; a missing, unreadable or non-UTF-8 file is a SpecError."""
    file = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise file_error(file, "no such file") from None
    except IsADirectoryError:
        raise file_error(file, "is a directory, not a file") from None
    except OSError as exc:
        raise file_error(file, f"cannot read the file ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        issue = Issue(file, line, column, "", f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})")
        raise SpecError([issue]) from None


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's core schema: `1e-4` is a number; `no`, `on` and dates stay strings."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}


_MERGE = "tag:yaml.org,2002:merge"
_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))
for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("int", r"[-+]?[0-9]+", "-+0123456789"),
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     "-+.0123456789"),
    ("merge", r"<<", "<"),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))


class _Tree:
    """Python data built from YAML nodes, remembering where each key and value starts, by field path."""

    def __init__(self, loader: _Loader, file: str):
        self.loader = loader
        self.file = file
        self.values: dict[FieldPath, yaml.Mark] = {}
        self.keys: dict[FieldPath, yaml.Mark] = {}
        self.issues: list[Issue] = []
        self._open: set[int] = set()  # nodes being built, to catch an alias that contains itself

    def issue(self, mark: yaml.Mark, path: FieldPath, message: str) -> None:
        self.issues.append(Issue(self.file, mark.line + 1, mark.column + 1, dotted(path), message))

    def build(self, node: yaml.Node, path: FieldPath) -> Any:
        if id(node) in self._open:
            self.issue(node.start_mark, path, "expected a value, found an alias that contains itself")
            return None
        self.values[path] = node.start_mark
        self._open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            value = self._mapping(node, path)
        elif isinstance(node, yaml.SequenceNode):
            value = [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        else:
            value = self.loader.construct_object(node)
        self._open.discard(id(node))
        return value

    def _mapping(self, node: yaml.MappingNode, path: FieldPath) -> dict[str, Any]:
        # `<<: *anchor` (or a list of anchors, earlier ones winning) copies keys the mapping itself may override.
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in reversed(sources):
                    value = self.build(source, path)
                    if isinstance(value, dict):
                        merged.update(value)
                    elif not isinstance(source, yaml.MappingNode):  # else build reported an alias in itself
                        self.issue(source.start_mark, path, f"expected a mapping to merge, found {show_value(value)}")
        self.values[path] = node.start_mark
        data: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = None if key_node.tag == _MERGE else self._key(key_node, path)
            if key is None:
                continue
            if key in data:
                first = self.keys[path + (key,)]
                self.issue(key_node.start_mark, path + (key,), f"expected each key once in a mapping, found '{key}' "
                           f"again (first at line {first.line + 1}, column {first.column + 1})")
                continue
            self.keys[path + (key,)] = key_node.start_mark
            data[key] = self.build(value_node, path + (key,))
        return merged | data

    def _key(self, node: yaml.Node, path: FieldPath) -> str | None:
        if isinstance(node, yaml.ScalarNode):
            key = self.loader.construct_object(node)
            if isinstance(key, str):
                return key
            found = show_value(key)
        else:
            found = "a mapping" if isinstance(node, yaml.MappingNode) else "a list"
        self.issue(node.start_mark, path, f"expected a string key, found {found}")
        return None


def _yaml_issue(file: str, exc: yaml.YAMLError, text: str) -> Issue:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        message = f"invalid YAML: {exc.problem}"
        if exc.context:
            where = exc.context_mark
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            message += f" ({exc.context}{at})"
        return Issue(file, mark.line + 1, mark.column + 1, "", message)
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - text.rfind("\n", 0, exc.position)
        return Issue(file, line, column, "", f"invalid YAML: unprintable character U+{exc.character:04X}")
    return Issue(file, None, None, "", f"invalid YAML: {exc}")


def _parse(file: str, text: str) -> tuple[dict[str, Any], _Tree]:
    """The YAML document as data, and its positions; bad YAML, an empty file or a duplicate key is a SpecError."""
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                raise file_error(file, "the file is empty; a spec is a mapping with at least 'name' and 'model'")
            tree = _Tree(loader, file)
            data = tree.build(root, ())
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_issue(file, exc, text)]) from None
    except RecursionError:
        raise file_error(file, "invalid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        sections = ", ".join(Spec.model_fields)
        tree.issues.insert(0, Issue(file, root.start_mark.line + 1, root.start_mark.column + 1, "",
                                    f"expected a mapping of spec sections ({sections}), found {show_value(data)}"))
    if tree.issues:
        raise SpecError(tree.issues)
    return data, tree


# --------------------------------------------------------------------------- validation errors


@dataclass(frozen=True)
class Problem:
    """One validation error in the spec's own terms.

    `path` is the field it concerns; `at` the field whose position it points at (the mapping that lacks a
    required key, say); `on_key` points at the key rather than its value (an unknown key).
    """

    path: FieldPath
    expected: str
    found: str
    at: FieldPath
    on_key: bool = False

    @property
    def message(self) -> str:
        return f"expected {self.expected}, found {self.found}"


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a mapping",
    "dict_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _unwrap(annotation: Any) -> Any:
    """The type under `Annotated[...]` and `... | None`."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


def _schema_at(loc: FieldPath) -> Any:
    """The type the schema declares at `loc`: a model class, `tuple[...]`, or a scalar type."""
    node: Any = Spec
    for part in loc:
        if isinstance(part, int):
            items = typing.get_args(node)
            node = items[0] if items[-1] is Ellipsis else items[part]
        else:
            node = node.model_fields[part].annotation
        node = _unwrap(node)
    return node


def _number(x: object) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def explain(error: ErrorDetails) -> Problem:
    """A pydantic error of `Spec` validation, as the field it concerns, what was expected and what was found."""
    loc: FieldPath = tuple(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx", {})
    found = show_value(error["input"])
    if kind == "k2c_rule":
        # The rule names its field relative to the model that raised it, which sits at `loc`.
        path = loc + tuple(int(p) if p.isdigit() else p for p in ctx["field"].split("."))
        return Problem(path, ctx["expected"], ctx["found"], at=path)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = list(_schema_at(loc[:-1]).model_fields)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return Problem(loc, f"no key '{key}' here ({hint}allowed: {', '.join(allowed)})", f"key '{key}'",
                       at=loc, on_key=True)
    if kind == "missing" and isinstance(loc[-1], int):  # a fixed-length list with too few items
        size = len(typing.get_args(_schema_at(loc[:-1])))
        return Problem(loc[:-1], f"a list of {size} items", found, at=loc[:-1])
    if kind == "missing":
        return Problem(loc, f"a value for '{loc[-1]}' (required)", "nothing", at=loc[:-1])
    if kind in _BOUNDS:
        bound, sign = _BOUNDS[kind]
        expected = f"a number {sign} {_number(ctx[bound])}"
    elif kind == "literal_error":
        choices = [repr(choice) for choice in typing.get_args(_schema_at(loc))]
        expected = choices[0] if len(choices) == 1 else f"one of {', '.join(choices)}"
    elif kind == "too_long":
        expected = f"a list of at most {ctx['max_length']} items"
    elif kind == "string_too_short":
        expected = "a non-empty string" if ctx["min_length"] == 1 else f"at least {ctx['min_length']} characters"
    elif kind == "string_pattern_mismatch":
        expected = f"a string matching {ctx['pattern']}"
    else:
        expected = _EXPECTED.get(kind, error["msg"].removeprefix("Input should be "))
    return Problem(loc, expected, found, at=loc)


def _locate(tree: _Tree, problem: Problem) -> tuple[int, int]:
    """1-based line and column of the problem: its key, its value, or the nearest enclosing value written."""
    if problem.on_key and problem.at in tree.keys:
        mark = tree.keys[problem.at]
    else:
        at = problem.at
        while at not in tree.values:
            at = at[:-1]
        mark = tree.values[at]
    return mark.line + 1, mark.column + 1


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a spec file; any problem with it raises a SpecError that names file:line:column."""
    file = os.fspath(path)
    data, tree = _parse(file, read_text(path))
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        issues = []
        for problem in map(explain, exc.errors()):
            line, column = _locate(tree, problem)
            issues.append(Issue(file, line, column, dotted(problem.path), problem.message))
        raise SpecError(sorted(issues, key=lambda i: (i.line, i.column))) from None


def field_error(path: str | os.PathLike[str], field: FieldPath, message: str) -> SpecError:
    """A problem that the compiler finds after validation (a target matching nothing), placed at its field."""
    file = os.fspath(path)
    _, tree = _parse(file, read_text(path))
    at = field
    while at and at not in tree.values:
        at = at[:-1]
    mark = tree.values.get(at)
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    return SpecError([Issue(file, line, column, dotted(field), message)])
