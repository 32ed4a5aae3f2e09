"""Load a spec file: YAML read with the position of every key and value, then validated by the schema.

Everything a user can get wrong (a missing or unreadable file, bad YAML, a duplicate key, a wrong type, an unknown
key, a broken cross-field rule) ends in one `SpecError` listing every issue as
`file:line:column: error: field.path: expected ..., found ...`.

The input is bounded before it becomes Python data: the file's size (read no further than the cap), the number of
YAML nodes with every alias expanded (an alias bomb stops at the alias that crosses the budget, before it is
expanded), the depth of nesting, and the length of a number as written. Each limit is far above what a spec
needs and low enough that `k2c check` answers any input in well under a second and a few tens of megabytes.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Union

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .schema import MAX_SHOWN, Cap, Spec, show_value

FieldPath = tuple[str | int, ...]  # mapping keys and list indices, from the top of the spec

MAX_FILE_BYTES = 256 * 1024  # the shipped specs are 2-4 KiB; parsing 256 KiB of YAML takes about 0.2 s
MAX_NODES = 10_000  # YAML nodes, aliases expanded; a spec that sets every field has about 150
MAX_DEPTH = 20  # levels of nesting; a spec nests 6 deep (model.attention.rope.scaling.factor)
MAX_INT_DIGITS = 30  # every integer field's cap has at most 10 digits; int64 has 19
MAX_FLOAT_CHARACTERS = 100  # a float written longer than this is not a value anyone means
MAX_ISSUES_SHOWN = 50  # a spec with more problems than this is not a spec; the rest are counted


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
        lines = [str(issue) for issue in self.issues[:MAX_ISSUES_SHOWN]]
        if len(self.issues) > MAX_ISSUES_SHOWN:
            more = len(self.issues) - MAX_ISSUES_SHOWN
            lines.append(f"{self.issues[0].file}: error: {more} more error{'s' if more > 1 else ''} not shown")
        return "\n".join(lines)


def file_error(file: str, message: str) -> SpecError:
    return SpecError([Issue(file, None, None, "", message)])


def _key_text(key: str) -> str:
    """A key as it appears in a field path: escaped if it has invisible characters, cut if it is long."""
    if not key.isprintable():
        key = repr(key)[1:-1]
    return key if len(key) <= MAX_SHOWN else f"{key[:MAX_SHOWN]}... ({len(key)} characters)"


def dotted(path: FieldPath) -> str:
    """`('adapter', 'targets', 0, 'match')` -> `adapter.targets[0].match`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{_key_text(part)}" if text else _key_text(part)
    return text


# --------------------------------------------------------------------------- reading


def _size(n: int) -> str:
    """`262144` -> `256 KiB`, `57000000` -> `54.4 MiB`; exact below 1 MiB."""
    if n < 2**20:
        return f"{n // 2**10} KiB" if n % 2**10 == 0 and n else f"{n} bytes"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


_WIDE_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"),
              (b"\xfe\xff", "UTF-16"), (b"\xff\xfe", "UTF-16"))


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of byte `offset`, before which `data` is good UTF-8."""
    start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, len(data[start:offset].decode("utf-8", errors="replace")) + 1


def read_text(path: str | os.PathLike[str], limit: int = MAX_FILE_BYTES, what: str = "a spec") -> str:
    """The file's text; a missing, unreadable, oversized, binary or non-UTF-8 file is a SpecError.

    No more than `limit` + 1 bytes are read, whatever the file claims to be (a device, a pipe, a growing file).
    """
    file = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            try:
                size = os.fstat(stream.fileno()).st_size
            except OSError:
                size = 0
            if size > limit:
                raise file_error(file, f"expected {what} of at most {_size(limit)}, found {_size(size)}")
            data = stream.read(limit + 1)
    except FileNotFoundError:
        raise file_error(file, "no such file") from None
    except IsADirectoryError:
        raise file_error(file, "is a directory, not a file") from None
    except OSError as exc:
        raise file_error(file, f"cannot read the file ({exc.strerror or exc})") from None
    except ValueError as exc:  # a NUL in the path
        raise file_error(file, f"cannot read the file ({exc})") from None
    if len(data) > limit:
        raise file_error(file, f"expected {what} of at most {_size(limit)}, found more")
    for bom, encoding in _WIDE_BOMS:
        if data.startswith(bom):
            raise file_error(file, f"the file is {encoding} text; expected UTF-8 (save it as UTF-8)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = _position(data, exc.start)
        issue = Issue(file, line, column, "", f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})")
        raise SpecError([issue]) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        line, column = _position(data, nul)
        raise SpecError([Issue(file, line, column, "", "expected text, found a NUL byte (is this a binary file?)")])
    return text


class _BadScalar(Exception):
    """A scalar that cannot become a value: a number too long to be meant, or text its explicit tag cannot read."""

    def __init__(self, expected: str, found: str):
        super().__init__(expected, found)
        self.expected = expected
        self.found = found


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    digits = text.lstrip("+-")
    if not digits.isascii() or not digits.isdigit() or len(text) - len(digits) > 1:
        raise _BadScalar("an integer", f"{show_value(text)} tagged !!int")
    if len(digits) > MAX_INT_DIGITS:
        raise _BadScalar(f"an integer of at most {MAX_INT_DIGITS} digits", f"an integer of {len(digits)} digits")
    return int(text)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node)
    if len(text) > MAX_FLOAT_CHARACTERS:
        expected = f"a number of at most {MAX_FLOAT_CHARACTERS} characters"
        raise _BadScalar(expected, f"a number of {len(text)} characters")
    return yaml.SafeLoader.construct_yaml_float(loader, node)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's core schema (`1e-4` is a number; `no`, `on` and dates stay strings) and a bounded
    composer: it counts nodes as if every alias were expanded and stops at MAX_NODES or MAX_DEPTH with a SpecError
    at the node or alias that crosses the bound, before any Python data is built."""

    yaml_implicit_resolvers: dict[str, list[tuple[str, re.Pattern[str]]]] = {}

    def __init__(self, stream: str, file: str):
        super().__init__(stream)
        self.file = file
        self.expanded = 0  # nodes so far, aliases expanded
        self.open_heights: list[int] = []  # for each node being composed, the height of its tallest child so far
        self.sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, height) once composed, aliases expanded

    def _stop(self, mark: yaml.Mark, message: str) -> SpecError:
        return SpecError([Issue(self.file, mark.line + 1, mark.column + 1, "", message)])

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        event = self.peek_event()
        depth = len(self.open_heights)
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            # An alias of a node still being composed contains itself; _Tree reports it with its field.
            nodes, height = self.sizes.get(id(node), (1, 1))
            if depth + height > MAX_DEPTH:
                raise self._stop(event.start_mark, f"expected at most {MAX_DEPTH} levels of nesting (a spec needs 6), "
                                                   f"found alias *{event.anchor}, which reaches level {depth + height}")
            self.expanded += nodes
            if self.expanded > MAX_NODES:
                raise self._stop(event.start_mark, f"expected at most {MAX_NODES} YAML nodes with aliases expanded "
                                                   f"(a whole spec has about 150), found alias *{event.anchor}, which "
                                                   f"adds {nodes} and takes the count to {self.expanded}")
        else:
            if depth >= MAX_DEPTH:
                raise self._stop(event.start_mark, f"expected at most {MAX_DEPTH} levels of nesting (a spec needs 6), "
                                                   f"found level {depth + 1} here")
            self.expanded += 1
            if self.expanded > MAX_NODES:
                raise self._stop(event.start_mark, f"expected at most {MAX_NODES} YAML nodes (a whole spec has about "
                                                   f"150), found more")
            before = self.expanded - 1
            self.open_heights.append(0)
            node = super().compose_node(parent, index)
            height = 1 + self.open_heights.pop()
            self.sizes[id(node)] = (self.expanded - before, height)
        if self.open_heights:
            self.open_heights[-1] = max(self.open_heights[-1], self.sizes.get(id(node), (1, 1))[1])
        return node


_MERGE = "tag:yaml.org,2002:merge"
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("int", r"[-+]?[0-9]+", "-+0123456789"),
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     "-+.0123456789"),
    ("merge", r"<<", "<"),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


def _short_tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


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
        if isinstance(node, yaml.CollectionNode) and node.tag not in _PLAIN_TAGS:
            kind = "a mapping" if isinstance(node, yaml.MappingNode) else "a list"
            tag = _short_tag(node.tag)
            self.issue(node.start_mark, path, f"expected {kind} without a tag, found {kind} tagged {tag}")
            return None
        self._open.add(id(node))
        value: Any
        if isinstance(node, yaml.MappingNode):
            value = self._mapping(node, path)
        elif isinstance(node, yaml.SequenceNode):
            value = [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        else:
            value = self.scalar(node, path)
        self._open.discard(id(node))
        return value

    def scalar(self, node: yaml.Node, path: FieldPath, expected: str | None = None) -> Any:
        """The value of a scalar node; one that cannot be read is an issue (and None).

        `expected` replaces what the issue says was expected (for a key: a string).
        """
        try:
            return self.loader.construct_object(node)
        except _BadScalar as exc:
            problem = exc
        except yaml.YAMLError:
            raise
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError):
            # An explicit tag whose constructor cannot read the text (`!!bool maybe`, `!!timestamp soon`).
            tag = _short_tag(node.tag)
            problem = _BadScalar(f"a value that {tag} can read", f"{show_value(node.value)} tagged {tag}")
        self.issue(node.start_mark, path, f"expected {expected or problem.expected}, found {problem.found}")
        return None

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
                self.issue(key_node.start_mark, path + (key,), f"expected each key once in a mapping, found "
                           f"{show_value(key)} again (first at line {first.line + 1}, column {first.column + 1})")
                continue
            self.keys[path + (key,)] = key_node.start_mark
            data[key] = self.build(value_node, path + (key,))
        return merged | data

    def _key(self, node: yaml.Node, path: FieldPath) -> str | None:
        if isinstance(node, yaml.ScalarNode):
            issues = len(self.issues)
            key = self.scalar(node, path, "a string key")
            if isinstance(key, str):
                return key
            if len(self.issues) > issues:
                return None
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
        loader = _Loader(text, file)
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


def _caps_in(annotation: Any) -> Cap | None:
    """The `Cap` in an annotation's `Annotated[...]` metadata, looking inside `... | None`."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        cap = next((m for m in annotation.__metadata__ if isinstance(m, Cap)), None)
        return cap or _caps_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return next((c for c in map(_caps_in, typing.get_args(annotation)) if c is not None), None)
    return None


def _cap_at(loc: FieldPath) -> Cap | None:
    """Why the field at `loc` has its upper bound, if the schema says."""
    node: Any = Spec
    cap = None
    try:
        for part in loc:
            if isinstance(part, int):
                items = typing.get_args(node)
                raw = items[0] if items[-1] is Ellipsis else items[part]
                cap = _caps_in(raw)
            else:
                info = node.model_fields[part]
                raw = info.annotation
                cap = next((m for m in info.metadata if isinstance(m, Cap)), None) or _caps_in(raw)
            node = _unwrap(raw)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return cap


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
    if kind == "k2c_value":  # a field validator's finding about the field's own value
        return Problem(loc, ctx["expected"], found, at=loc)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = list(_schema_at(loc[:-1]).model_fields)
        close = difflib.get_close_matches(key, allowed, n=1) if len(key) <= MAX_SHOWN else []
        hint = f"did you mean '{close[0]}'? " if close else ""
        return Problem(loc, f"no key {show_value(key)} here ({hint}allowed: {', '.join(allowed)})",
                       f"key {show_value(key)}", at=loc, on_key=True)
    if kind == "missing" and isinstance(loc[-1], int):  # a fixed-length list with too few items
        size = len(typing.get_args(_schema_at(loc[:-1])))
        return Problem(loc[:-1], f"a list of {size} items", found, at=loc[:-1])
    if kind == "missing":
        return Problem(loc, f"a value for '{loc[-1]}' (required)", "nothing", at=loc[:-1])
    if kind in _BOUNDS:
        bound, sign = _BOUNDS[kind]
        expected = f"a number {sign} {_number(ctx[bound])}"
        cap = _cap_at(loc) if kind == "less_than_equal" else None
        if cap is not None:
            expected += f" (k2c's cap: {cap.why})"
    elif kind == "literal_error":
        choices = [repr(choice) for choice in typing.get_args(_schema_at(loc))]
        expected = choices[0] if len(choices) == 1 else f"one of {', '.join(choices)}"
    elif kind == "too_long":
        expected = f"a list of at most {ctx['max_length']} items"
    elif kind == "string_too_short":
        expected = "a non-empty string" if ctx["min_length"] == 1 else f"at least {ctx['min_length']} characters"
    elif kind == "string_too_long":
        expected = f"a string of at most {ctx['max_length']} characters"
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
