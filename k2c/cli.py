"""The `k2c` command: check, inspect, build, train, export, generate and import-hf.

Every failure a user can cause ends in one clear message on stderr and exit code 2; a traceback means a bug.
A training run stopped by SIGINT / SIGTERM saves its checkpoint and exits 130 / 143.
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
from k2c.codegen.lower import lower
from k2c.ir import IRError
from k2c.passes import PassError, PlacementError
from k2c.report import inspect_json, inspect_text
from k2c.runtime.files import write_atomic
from k2c.spec import SpecError, load_spec
from k2c.spec.import_hf import import_hf_config
from k2c.spec.loader import field_error
from k2c.spec.schema import Spec


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


@contextlib.contextmanager
def writing(what: Path) -> Iterator[None]:
    """An OSError while writing `what` (read-only, full, not a folder) is a user error that names the file."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        raise UsageError(f"cannot write {err.filename or what}: {reason}") from None


DATA_KINDS = {"text": "a UTF-8 text file", "jsonl": "a JSON Lines file", "parquet": "a Parquet file",
              "datasets": "a folder saved by datasets' save_to_disk"}


def check_paths(spec_file: str, spec: Spec) -> None:
    """training.data, training.tokenizer and training.init_from must exist, and the tokenizer must fit the model:
    found by `check`, not after a build at the first step.

    Relative paths start at the spec's folder, as `k2c train` reads them."""
    base = Path(spec_file).resolve().parent
    t = spec.training
    if t.data != "bundled":
        path = base / Path(t.data).expanduser()
        folder = t.source_format == "datasets"
        if not (path.is_dir() if folder else path.is_file()):
            found = "a folder" if path.is_dir() else "a file" if path.exists() else "nothing"
            raise field_error(spec_file, ("training", "data"), f"expected {DATA_KINDS[t.source_format]} (a relative "
                              f"path starts at the spec's folder), found {found} at {path}")
    if t.tokenizer != "bytes":
        check_tokenizer(spec_file, spec, base)
    if t.init_from is not None:
        path = base / Path(t.init_from).expanduser()
        if not path.exists():
            raise field_error(spec_file, ("training", "init_from"), "expected a .safetensors file or a checkpoint "
                              f"folder (a relative path starts at the spec's folder), found nothing at {path}")


def check_tokenizer(spec_file: str, spec: Spec, base: Path) -> None:
    """The tokenizer folder loads, has no more tokens than the model's vocabulary, and a chat template for chat."""
    from k2c.runtime import data

    t = spec.training
    path = base / Path(t.tokenizer).expanduser()
    at = ("training", "tokenizer")
    if not path.is_dir():
        found = "a file" if path.exists() else "nothing"
        raise field_error(spec_file, at, "expected a tokenizer folder in the Hugging Face layout (tokenizer.json, "
                          "tokenizer_config.json; a relative path starts at the spec's folder), found "
                          f"{found} at {path}")
    try:
        tokenizer = data.load_tokenizer(t.tokenizer, base)
    except data.DataError as err:
        raise field_error(spec_file, at, f"expected a tokenizer that transformers loads, found: {err}") from None
    problem = data.vocabulary_problem(tokenizer, spec.model.vocab_size)
    if problem is not None:
        raise field_error(spec_file, at, f"expected {problem}")
    if t.chat and not tokenizer.has_chat_template:
        raise field_error(spec_file, at, f"expected a tokenizer with a chat template (training.chat is true), found "
                          f"none in {path}")


def warn_about(spec: Spec) -> None:
    if spec.adapter.kind != "none" and spec.training.init_from is None:
        print(f"warning: adapter kind {spec.adapter.kind!r} without training.init_from: the adapters would train on "
              "a randomly initialised base model; set training.init_from to the base checkpoint to fine-tune it",
              file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    with at_spec_fields(args.spec):
        compile_spec(spec)
    check_paths(args.spec, spec)
    warn_about(spec)
    print(f"{args.spec}: ok ({spec.name})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from k2c.runtime import memory, mesh

    spec = _load(args.spec)
    with at_spec_fields(args.spec):
        graph = compile_spec(spec)
    plan = lower(graph)
    world = memory.smallest_world(plan) if args.world is None else args.world
    try:
        estimate = memory.estimate(plan, world)
    except mesh.LayoutError as err:
        raise UsageError(f"--world {world}: {err}") from None
    if args.json:
        print(json.dumps({**inspect_json(spec, graph), "memory": estimate.as_dict()}, indent=1, sort_keys=True))
    else:
        print(inspect_text(spec, graph) + estimate.text(), end="")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    spec = _load(args.spec)
    out = Path(args.out) if args.out else default_out_dir(spec.name)
    start = time.perf_counter()
    with at_spec_fields(args.spec):
        if args.dump_ir:  # the IR after each pass, written before the package so that a failing pass still has it
            with writing(Path(args.dump_ir)):
                compile_spec(spec, Path(args.dump_ir))
        with writing(out):
            result = build_package(spec, out, force=args.force)
    took = time.perf_counter() - start
    changed = ", ".join(result.written) if result.written else "nothing changed"
    print(f"built {out}/ in {took:.2f}s ({changed})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, not {args.steps}")
    if args.checkpoint_minutes is not None and not args.checkpoint_minutes >= 0:
        raise UsageError(f"--checkpoint-minutes must be 0 (off) or more, not {args.checkpoint_minutes}")
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, not {args.nproc_per_node}")
    if args.nproc_per_node > 1 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UsageError("--nproc-per-node starts its own processes; under torchrun, leave it out")
    spec = _load(args.spec)
    out = Path(args.out) if args.out else default_out_dir(spec.name)
    with at_spec_fields(args.spec):
        graph = compile_spec(spec)
    check_paths(args.spec, spec)
    from k2c.runtime import mesh

    world = max(args.nproc_per_node, int(os.environ.get("WORLD_SIZE", 1)))
    try:  # before any process starts
        mesh.mesh_shape(lower(graph), world)
    except mesh.LayoutError as err:
        raise field_error(args.spec, tuple(err.field.split(".")), err.reason) from None
    if args.run_dir is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UsageError("under a multi-process launcher (torchrun), pass --run-dir so that every process "
                         "uses the same run folder")
    if args.resume:
        run_dir = Path(args.run_dir) if args.run_dir else latest_run_dir(spec.name)
        if not (run_dir / "checkpoint.pt").exists():
            raise UsageError(f"nothing to resume: {run_dir / 'checkpoint.pt'} does not exist")
    from k2c.runtime import data

    spec_dir = Path(args.spec).resolve().parent
    try:  # read (and tokenised into the cache) before anything else is written, and once for all processes
        parts = data.load(lower(graph).training, spec.model.vocab_size, spec_dir)
    except data.DataError as err:
        raise UsageError(str(err)) from None
    with at_spec_fields(args.spec), writing(out):
        result = build_package(spec, out)
    if result.written:
        print(f"built {out}/ ({', '.join(result.written)})")
    from k2c.runtime import train
    from k2c.runtime.packages import import_package

    package = import_package(out, spec.name)
    claimed = None
    if not args.resume:
        if args.run_dir is not None:
            run_dir = Path(args.run_dir)
        else:
            with writing(Path("runs") / spec.name):
                run_dir = claimed = claim_run_dir(spec.name)
    if args.nproc_per_node > 1:
        try:
            return launch(args, out, run_dir)
        finally:
            if claimed is not None:
                with contextlib.suppress(OSError):
                    claimed.rmdir()
    try:
        train.run(package, run_dir, steps=args.steps, resume=args.resume, checkpoint_minutes=args.checkpoint_minutes,
                  spec_dir=spec_dir, data=parts)
    except train.TrainError as err:
        raise UsageError(str(err)) from None
    except train.Interrupted as err:
        if int(os.environ.get("RANK", 0)) == 0:
            again = ["k2c", "train", args.spec, "--resume"]
            again += ["--run-dir", args.run_dir] if args.run_dir else []
            again += ["-o", args.out] if args.out else []
            print(f"{err}; resume with: {' '.join(again)}", file=sys.stderr)
        return 128 + err.signum
    finally:
        if claimed is not None:
            with contextlib.suppress(OSError):
                claimed.rmdir()  # only when empty: a run that stopped before it wrote anything leaves no folder
    return 0


def launch(args: argparse.Namespace, out: Path, run_dir: Path) -> int:
    """`k2c train --nproc-per-node N`: torchrun's launcher, started in this process on the package built here, so
    that a failure ends as every k2c failure does (the processes' one message, exit 2) instead of in torchrun's
    traceback, and the processes never race to build the package."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = ["--standalone", "--nproc-per-node", str(args.nproc_per_node), "-m", "k2c.cli", "train", args.spec,
            "-o", str(out), "--run-dir", str(run_dir)]
    argv += ["--steps", str(args.steps)] if args.steps is not None else []
    argv += ["--resume"] if args.resume else []
    argv += ["--checkpoint-minutes", str(args.checkpoint_minutes)] if args.checkpoint_minutes is not None else []
    for name in ("torch.distributed.run", "torch.distributed.elastic"):  # k2c reports the outcome itself
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHED] = "1"  # the processes leave their error to this one: one message, whichever fails first
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode == 2:  # a k2c error: the processes left its message in their error files, not on stderr
            print(failure.message, file=sys.stderr)
            return 2
        if failure.exitcode in (130, 143):  # interrupted: rank 0 said so, and where it saved
            return failure.exitcode
        raise UsageError(f"training process {rank} of {args.nproc_per_node} failed (exit code {failure.exitcode}): "
                         f"{failure.message}") from None
    except SignalException as err:  # the processes finished their step and saved; rank 0 said so
        return 128 + int(err.sigval)
    finally:
        del os.environ[LAUNCHED]  # this process speaks for itself
    return 0


def latest_run_dir(spec_name: str) -> Path:
    """runs/<name>/<n> with the largest n: what --resume continues when no --run-dir is given."""
    base = Path("runs") / spec_name
    numbers = [int(p.name) for p in base.glob("*") if p.name.isdigit()] if base.is_dir() else []
    if not numbers:
        raise UsageError(f"nothing to resume: {base}/ holds no runs (train without --resume to start one)")
    return base / str(max(numbers))


def claim_run_dir(spec_name: str) -> Path:
    """A new runs/<name>/<n>, created here so that two runs started at once never pick the same folder."""
    base = Path("runs") / spec_name
    base.mkdir(parents=True, exist_ok=True)
    number = max((int(p.name) for p in base.glob("*") if p.name.isdigit()), default=0)
    while True:
        number += 1
        try:
            (base / str(number)).mkdir()
            return base / str(number)
        except FileExistsError:
            continue


SIZE = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
        "GIB": 2**30}


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB` or a number of bytes."""
    number = text.strip()
    unit = number.lstrip("0123456789.").strip().upper()
    digits = number[: len(number) - len(number.lstrip("0123456789."))]
    try:
        value = float(digits) * SIZE[unit]
    except (ValueError, KeyError):
        raise UsageError(f"--shard-size: expected a size such as 5GB, 500MB or 2GiB, not {text!r}") from None
    if value < 1:
        raise UsageError(f"--shard-size must be at least 1 byte, not {text!r}")
    return int(value)


def load_run(run_dir: Path, spec_file: str | None, what: str, allocate: bool = True):
    """(package, model with the run's last checkpoint, the checkpoint's state, the spec's folder) of a run folder.

    The run's package is generated/<name>/ (what `k2c train` built); `spec_file` builds it from the spec instead.
    `what` the command does with the run, for the message when there is no checkpoint. Without `allocate`, the
    model of a sharded checkpoint stays on the meta device, unread: for a reader that reads it a piece at a time
    (k2c.runtime.parallel.tensor_loader)."""
    import torch

    from k2c.runtime import train
    from k2c.runtime.packages import import_package

    if not run_dir.is_dir():
        raise UsageError(f"no run folder {run_dir} (a folder that `k2c train` wrote, such as runs/<name>/1)")
    checkpoint = run_dir / train.CHECKPOINT
    if not (checkpoint.exists() or checkpoint.is_symlink()):
        raise UsageError(f"{run_dir} holds no {train.CHECKPOINT}: nothing to {what} (train until a checkpoint is "
                         "written)")
    try:
        state = train.read_checkpoint(checkpoint)
    except train.TrainError as err:
        raise UsageError(str(err)) from None
    name = state["plan"].get("name") if isinstance(state["plan"], dict) else None
    spec_dir = Path.cwd()
    if spec_file:
        spec = _load(spec_file)
        if spec.name != name:
            raise UsageError(f"{checkpoint} was trained from spec {name!r}, not {spec.name!r} ({spec_file})")
        package_dir = default_out_dir(spec.name)
        with at_spec_fields(spec_file), writing(package_dir):
            build_package(spec, package_dir)
        spec_dir = Path(spec_file).resolve().parent
    else:
        package_dir = default_out_dir(str(name))
        if not (package_dir / "__init__.py").is_file():
            raise UsageError(f"{checkpoint} was trained from spec {name!r}, whose package {package_dir}/ is not "
                             "here; pass --spec SPEC (the spec it was trained with)")
    package = import_package(package_dir, str(name))
    changed = train._differences(train.resume_settings(package.PLAN), state["plan"])
    if changed:
        raise UsageError(f"{checkpoint} was trained under other settings than {package_dir}/ "
                         f"({', '.join(changed[:5])}); pass --spec SPEC (the spec it was trained with)")
    if not allocate and train.shards_of(state) is not None:
        return package, package.build_model("meta", getattr(torch, package.PLAN.training.dtype)), state, spec_dir
    model = package.build_model(dtype=getattr(torch, package.PLAN.training.dtype))
    try:
        train.load_model(checkpoint, state, model)
    except RuntimeError as err:
        raise UsageError(f"{checkpoint}: the model's tensors do not fit {package_dir}/ "
                         f"({str(err).strip().splitlines()[-1].strip()})") from None
    return package, model, state, spec_dir


def cmd_export(args: argparse.Namespace) -> int:
    from k2c.runtime import export
    from k2c.runtime.data import BYTES, spec_path

    run_dir, out = Path(args.run_dir), Path(args.output)
    shard_bytes = parse_size(args.shard_size)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} is not empty; export into a new folder, or pass --force to write over it")
    from k2c.runtime import parallel, train

    # a sharded run's model may not fit one process: it is read and written a piece at a time
    package, model, state, spec_dir = load_run(run_dir, args.spec, "export", allocate=False)
    load = None
    if (folder := train.shards_of(state)) is not None:
        try:
            load = parallel.tensor_loader(run_dir / folder, model)
        except (ValueError, OSError) as err:
            raise UsageError(f"{run_dir / train.CHECKPOINT}: the model's tensors cannot be read ({err})") from None
    plan = package.PLAN
    # the tokenizer trained with, else the fine-tuning base's (a published checkpoint folder holds its tokenizer)
    tokenizer = plan.training.tokenizer if plan.training.tokenizer != BYTES else plan.training.init_from
    tokenizer_from = spec_path(tokenizer, spec_dir) if tokenizer is not None else None
    if tokenizer_from is not None and not tokenizer_from.exists():
        tokenizer_from = None
    created = not out.exists()
    try:
        with writing(out):
            notes = export.export_hf(model, plan, out, peft=args.peft, fp8=args.fp8, max_shard_bytes=shard_bytes,
                                     tokenizer_from=tokenizer_from, force=args.force, load=load)
    except export.ExportError as err:
        if created:
            export.remove_partial(out)
        raise UsageError(str(err)) from None
    except BaseException:
        if created:
            export.remove_partial(out)
        raise
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    shards = len(list(out.glob("model-*-of-*.safetensors")))
    what = ("base + PEFT adapter in adapter/" if args.peft else "FP8" if args.fp8 else plan.training.dtype)
    print(f"exported {run_dir} (step {state['step']}) to {out}/: {shards} shard(s), {what}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from k2c.runtime import data, generate, train

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be 0 (greedy) or more, not {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, not {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must lie in (0, 1], not {args.top_p}")
    package, model, _, spec_dir = load_run(Path(args.run_dir), args.spec, "generate from")
    t = package.PLAN.training
    try:
        tokenizer = data.load_tokenizer(t.tokenizer, spec_dir)
    except data.DataError as err:
        raise UsageError(f"{err} (pass --spec SPEC when the run's spec is not in this folder)") from None
    if args.chat and not tokenizer.has_chat_template:
        raise UsageError(f"--chat: the tokenizer {tokenizer.name} has no chat template")
    text = (tokenizer.render([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
            if args.chat else args.prompt)
    prompt = [int(i) for i in tokenizer.encode([text])[0]]
    if not prompt:
        raise UsageError("--prompt is empty: there is nothing to go on from")
    model = model.to(train.device())
    new = generate.generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, eos=tokenizer.eos, seed=args.seed)
    print(tokenizer.decode(new))
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    text = import_hf_config(Path(args.config), name=args.name)
    if args.output:
        out = Path(args.output)
        if out.exists() and not args.force:
            raise UsageError(f"{out} exists; refusing to overwrite it (pass --force to replace it)")
        with writing(out):
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
    c.add_argument("--world", type=int, metavar="N", help="estimate the memory per device of a training step "
                   "over N processes (default: 1, or the fewest the spec's parallel section takes)")
    c.set_defaults(run=cmd_inspect)

    c = sub.add_parser("build", help="generate the Python package of a spec")
    c.add_argument("spec")
    c.add_argument("-o", "--out", help="package folder (default: generated/<name>)")
    c.add_argument("--force", action="store_true", help="overwrite files edited since the last build")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pass into DIR")
    c.set_defaults(run=cmd_build)

    c = sub.add_parser("train", help="build if needed, then train on the spec's data",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("spec")
    c.add_argument("-o", "--out", help="package folder (default: generated/<name>)")
    c.add_argument("--run-dir", help="metrics, plots and checkpoints (default: a new runs/<name>/<n>; with "
                   "--resume, the latest)")
    c.add_argument("--steps", type=int, help="train to this many steps instead of training.steps (a fresh run's "
                   "schedule is stretched to them; see below)")
    c.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    c.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="train data-parallel in N processes started here (torchrun's launcher; one GPU each, or CPU "
                   "processes)")
    c.add_argument("--checkpoint-minutes", type=float, metavar="M",
                   help="also checkpoint every M minutes of wall time (default: 10 when training.checkpoint_every is "
                   "0, else off; 0: off)")
    c.set_defaults(run=cmd_train)

    c = sub.add_parser("export", help="a trained run as a Hugging Face model folder (transformers, vLLM, SGLang)",
                       description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of `k2c train` (runs/<name>/<n>)")
    c.add_argument("-o", "--output", required=True, metavar="DIR", help="the model folder to write")
    c.add_argument("--spec", help="the spec the run was trained with (default: its package generated/<name>/)")
    c.add_argument("--peft", action="store_true", help="write the base weights and the adapters as a PEFT folder "
                   "DIR/adapter instead of merging them")
    c.add_argument("--fp8", action="store_true", help="store linear weights as FP8 e4m3 with 128x128 block scales, "
                   "as the published Kimi K2 / DeepSeek-V3 weights are")
    c.add_argument("--shard-size", default="5GB", metavar="SIZE", help="largest safetensors shard (default 5GB)")
    c.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    c.set_defaults(run=cmd_export)

    c = sub.add_parser("generate", help="text from a trained run: greedy or sampled decoding with a KV cache",
                       description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of `k2c train` (runs/<name>/<n>)")
    c.add_argument("--prompt", required=True, help="the text to go on from")
    c.add_argument("--chat", action="store_true", help="the prompt is a user's message: rendered with the "
                   "tokenizer's chat template, the assistant answers")
    c.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="at most this many tokens (default 64)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy; above 0: sampled from "
                   "softmax(logits / temperature)")
    c.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens only")
    c.add_argument("--top-p", type=float, metavar="P", help="sample among the likeliest tokens that together hold "
                   "probability P")
    c.add_argument("--seed", type=int, default=0, help="of the sampling (default 0)")
    c.add_argument("--spec", help="the spec the run was trained with (default: its package generated/<name>/; "
                   "relative tokenizer paths start at its folder, else at the current one)")
    c.set_defaults(run=cmd_generate)

    c = sub.add_parser("import-hf", help="a spec from a Hugging Face DeepSeek-V3 / Kimi K2 config.json")
    c.add_argument("config")
    c.add_argument("-o", "--output", help="write the spec here instead of stdout")
    c.add_argument("--name", help="spec name (default: from the config)")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.set_defaults(run=cmd_import_hf)
    return p


TRAIN_HELP = """Build the spec's package if needed, then train it; metrics.jsonl, loss.png and checkpoint.pt go to
the run folder, which one run at a time may use (a second one stops with a message saying who holds it).

Checkpoints: every training.checkpoint_every steps, or, when that is 0, every 10 minutes of wall time
(--checkpoint-minutes); after the last step; and on SIGINT (Ctrl-C) or SIGTERM, which finish the step in
progress, save checkpoint, metrics and plot, and exit 130 / 143. A second Ctrl-C stops at once without saving.

Schedule: a fresh run of N steps (--steps N, else training.steps) stretches the spec's learning-rate schedule to
N steps: warm-up round(warmup_steps x N / training.steps) (at least 1 when the spec has one), decay ending at
step N; with N = training.steps it is the spec's schedule. --resume keeps the schedule the run started with and
goes on to the run's own N; --resume --steps M goes to M instead, and steps past the schedule's end run at its
final learning rate (lr x final_lr_ratio). So an interrupted run, resumed, takes the uninterrupted run's steps,
bit for bit.

Paths in training.data and training.init_from are relative to the spec's folder."""


EXPORT_HELP = """Write a run's last checkpoint as a Hugging Face model folder: config.json in the published
DeepSeek-V3 / Kimi K2 format, model-0000i-of-0000n.safetensors shards with model.safetensors.index.json, and the
tokenizer files of training.init_from when it has any (a byte-level run has none). Adapters are merged into the
weights, or with --peft written as a PEFT adapter folder DIR/adapter beside the base weights. The folder loads with
transformers' AutoModelForCausalLM.from_pretrained(DIR).

The run's package is generated/<name>/ (what `k2c train` built); --spec SPEC builds it from the spec instead."""


GENERATE_HELP = """Print what a run's model writes after a prompt: tokens decoded one at a time with a KV cache,
greedily (the default) or sampled (--temperature, --top-k, --top-p, --seed), until the tokenizer's end-of-text
token or --max-new-tokens. The prompt is tokenised with training.tokenizer (UTF-8 bytes for a byte-level run); with
--chat it is a user's message in the tokenizer's chat template, and the model answers as the assistant.

The run's package is generated/<name>/ (what `k2c train` built); --spec SPEC builds it from the spec instead."""


LAUNCHED = "K2C_LAUNCHED"  # set for the processes that `k2c train --nproc-per-node` starts


def tell_the_launcher(message: str) -> None:
    """Under torchrun, leave the message where its failure report looks (TORCHELASTIC_ERROR_FILE), so that the
    report names k2c's error rather than "To enable traceback see ..."."""
    file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if file:
        with contextlib.suppress(OSError):
            Path(file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code = 2
    try:
        return args.run(args)
    except SpecError as err:
        message = str(err)  # already one `file:line:column: error: ...` line per issue
    except USER_ERRORS as err:
        message = f"error: {err}"
    except OSError as err:  # a file system failure that no command anticipated: still one line, with the path
        where = f"{err.filename}: " if err.filename else ""
        message = f"error: {where}{err.strerror or err}"
    except KeyboardInterrupt:  # in `train`: before its first step, or a second Ctrl-C that would not wait
        message, code = "interrupted" + ("; nothing saved since the last checkpoint" if args.command == "train"
                                         else ""), 130
    tell_the_launcher(message)
    # Under a launcher every process fails alike: rank 0 says so; under `k2c train --nproc-per-node`, k2c does.
    if int(os.environ.get("RANK", 0)) == 0 and not os.environ.get(LAUNCHED):
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
