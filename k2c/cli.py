"""The `k2c` command: check, inspect, build, train and import-hf.

Every failure a user can cause ends in one clear message on stderr and exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from k2c import __version__
from k2c.codegen import CodegenError, build_package, compile_spec
from k2c.ir import IRError
from k2c.passes import PassError, PlacementError
from k2c.report import inspect_json, inspect_text
from k2c.runtime.files import write_atomic
from k2c.spec import SpecError, load_spec
from k2c.spec.loader import field_error
from k2c.spec.import_hf import import_hf_config

class UsageError(Exception):
    """A command asked for something it cannot do as given; the message says what to change."""


USER_ERRORS = (SpecError, PlacementError, CodegenError, IRError, PassError, UsageError)


def default_out_dir(spec_name: str) -> Path:
    return Path("generated") / spec_name


def _load(path: str):
    return load_spec(Path(path))


@contextlib.contextmanager
def at_spec_fields(path: str) -> Iterator[None]:
    """A spec that the passes cannot place is reported at its field in the file, like any other spec error."""
    try:
        yield
    except PlacementError as err:
        raise field_error(path, err.field, err.message) from None


def cmd_check(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    with at_spec_fields(args.spec):
        compile_spec(spec)
    print(f"{args.spec}: ok ({spec.name})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    with at_spec_fields(args.spec):
        graph = compile_spec(spec)
    if args.json:
        print(json.dumps(inspect_json(spec, graph), indent=1, sort_keys=True))
    else:
        print(inspect_text(spec, graph), end="")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    out = Path(args.out) if args.out else default_out_dir(spec.name)
    start = time.perf_counter()
    with at_spec_fields(args.spec):
        result = build_package(spec, out, force=args.force, dump_ir=Path(args.dump_ir) if args.dump_ir else None)
    took = time.perf_counter() - start
    changed = ", ".join(result.written) if result.written else "nothing changed"
    print(f"built {out}/ in {took:.2f}s ({changed})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    out = Path(args.out) if args.out else default_out_dir(spec.name)
    with at_spec_fields(args.spec):
        result = build_package(spec, out)
    if result.written:
        print(f"built {out}/ ({', '.join(result.written)})")
    from k2c.runtime import train
    from k2c.runtime.packages import import_package

    package = import_package(out, spec.name)
    if args.run_dir is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UsageError("under a multi-process launcher (torchrun), pass --run-dir so that every process "
                           "uses the same run folder")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(spec.name, args.resume)
    try:
        train.run(package, run_dir, steps=args.steps, resume=args.resume)
    except train.TrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def default_run_dir(spec_name: str, resume: bool) -> Path:
    """runs/<name>/<n>: a new numbered folder per run, so training again never overwrites an earlier run;
    with --resume, the latest one."""
    base = Path("runs") / spec_name
    numbers = [int(p.name) for p in base.glob("*") if p.name.isdigit()] if base.exists() else []
    latest = max(numbers, default=0)
    return base / str(latest if resume and latest else latest + 1)


def cmd_import_hf(args: argparse.Namespace) -> int:
    text = import_hf_config(Path(args.config), name=args.name)
    if args.output:
        out = Path(args.output)
        if out.exists() and not args.force:
            raise UsageError(f"{out} exists; refusing to overwrite it (pass --force to replace it)")
        write_atomic(out, text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2c", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"k2c {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate a spec")
    c.add_argument("spec")
    c.set_defaults(run=cmd_check)

    c = sub.add_parser("inspect", help="show what the compiler decided for a spec")
    c.add_argument("spec")
    c.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    c.set_defaults(run=cmd_inspect)

    c = sub.add_parser("build", help="generate the Python package of a spec")
    c.add_argument("spec")
    c.add_argument("-o", "--out", help="package folder (default: generated/<name>)")
    c.add_argument("--force", action="store_true", help="overwrite files edited since the last build")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pass into DIR")
    c.set_defaults(run=cmd_build)

    c = sub.add_parser("train", help="build if needed, then train on the spec's data")
    c.add_argument("spec")
    c.add_argument("-o", "--out", help="package folder (default: generated/<name>)")
    c.add_argument("--run-dir", help="metrics, plots and checkpoints (default: runs/<name>)")
    c.add_argument("--steps", type=int, help="override training.steps")
    c.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    c.set_defaults(run=cmd_train)

    c = sub.add_parser("import-hf", help="a spec from a Hugging Face DeepSeek-V3 / Kimi K2 config.json")
    c.add_argument("config")
    c.add_argument("-o", "--output", help="write the spec here instead of stdout")
    c.add_argument("--name", help="spec name (default: from the config)")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.set_defaults(run=cmd_import_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except SpecError as err:
        print(err, file=sys.stderr)  # already one `file:line:column: error: ...` line per issue
        return 2
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
