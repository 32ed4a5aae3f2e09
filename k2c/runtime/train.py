"""Train a generated model on the spec's data: the MuonClip loop, metrics, a plot, and checkpoints that resume
exactly.

`run(package, run_dir)` is what `k2c train` calls, with the generated package (its plan and its `build_model`,
`build_optimizer`, `build_scheduler`, `load_hf_state_dict`); the scheduler steps after every optimizer step.
The data (k2c.runtime.data) are read and tokenised before anything is written: a text or records, UTF-8 bytes or a
tokenizer's tokens, the last `eval_fraction` held out. Which windows each step reads comes from one torch.Generator
seeded with the plan's seed (`data.Batches`), and its state travels in the checkpoint with the model, the optimizer
(and in its state the scheduler's) and torch's RNG states, so a resumed run takes the very steps that an
uninterrupted one would, bit for bit.

What a run does so that nothing is lost:

- Checkpoints: every `training.checkpoint_every` steps when that is set, else every DEFAULT_CHECKPOINT_MINUTES
  minutes of wall time (`checkpoint_minutes` overrides either way; 0 turns the timer off), always after the last
  step, and when SIGINT or SIGTERM asks the run to stop: the step in progress finishes, then the checkpoint, the
  metrics and the plot are written and `Interrupted` is raised. A second SIGINT during the step stops at once
  without saving (the last checkpoint stays); signals during the save wait for it.
- Every file is written beside its target and renamed over it; the checkpoint ends with a sha256 of its bytes that
  is verified before it is read, so a checkpoint cut short, overwritten or changed on disk is refused by name.
- The run folder is locked (an `flock` that the OS releases if the process dies): a second run on it stops at once,
  saying who holds it. Temporaries that a killed run left behind are removed when the next one takes the lock.

The learning-rate schedule of a run spans the run: a run of N steps (`steps`, `training.steps` by default) stretches
the spec's schedule to N steps (warm-up scaled by N / training.steps, decay ending at step N); with N =
training.steps it is the spec's schedule exactly. The schedule is fixed when the run starts and travels in the
checkpoint: a resume follows it whatever `steps` it asks for, so an interrupted run resumed gives the uninterrupted
run's steps. A resume without `steps` goes on to the run's own end; with more steps than the schedule spans, the
steps past its end run at the schedule's final learning rate (lr x final_lr_ratio; the peak lr when constant).

A step (`training_step`) never waits for the device: the host reads the loss and the rest of a step's record back
only on the steps it logs, evaluates or saves, and checks then that the losses since the last read are finite. On
a GPU, with one process and the fused kernels, the step is captured in a CUDA graph and replayed
(k2c.runtime.graph; K2C_CUDA_GRAPH=0 runs it eagerly instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from k2c.runtime.checkpoint import CheckpointError
from k2c.runtime.data import Batches, DataError, Part, eval_picks, spec_path, windows
from k2c.runtime.data import load as load_data
from k2c.runtime.files import (
    CorruptFile,
    FolderBusy,
    folder_lock,
    os_error_reason,
    remove_stale_temporaries,
    verify_checksum,
    write_atomic,
    write_checksummed,
)
from k2c.runtime import parallel
from k2c.runtime.graph import CudaGraphStep, capturable
from k2c.runtime.mesh import LayoutError
from k2c.runtime.optim import lr_at
from k2c.runtime.plan import OptimizerPlan, Plan, TrainingPlan

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
# training settings that may change between a run and its resume: they do not touch the trajectory
RUN_FIELDS = ("steps", "eval_every", "log_every", "checkpoint_every")
DEFAULT_CHECKPOINT_MINUTES = 10.0  # the checkpoint period when training.checkpoint_every is 0
SHARDS_SUFFIX = ".shards"  # the folder of a sharded checkpoint's tensors, beside the file that names it
CHECKPOINT_FORMAT = 1  # what `state["format"]` says; a checkpoint of another format is refused, not misread
CHECKPOINT_KEYS = ("format", "step", "run", "model", "optimizer", "batches", "torch_rng", "cuda_rng", "plan")
SIGNAL_NAMES: dict[int, str] = {int(signal.SIGINT): "SIGINT", int(signal.SIGTERM): "SIGTERM"}
CUDA_GRAPH = "K2C_CUDA_GRAPH"  # "0": run every step eagerly, also where it could be replayed from a CUDA graph
_clock = time.monotonic  # wall time for the checkpoint period (tests move it)


class TrainError(Exception):
    """A run that cannot start or go on as asked: the message says why and what to do."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after `step`; the checkpoint, metrics and plot of that step are written."""

    def __init__(self, signum: int, step: int, steps: int, run_dir: Path, saved: bool):
        self.signum, self.step, self.steps, self.run_dir, self.saved = signum, step, steps, run_dir, saved
        what = f"checkpoint and plot saved in {run_dir}/" if saved else "this process saved nothing (rank 0 saves)"
        super().__init__(f"interrupted by {SIGNAL_NAMES.get(signum, signum)} at step {step} of {steps}; {what}")


# --------------------------------------------------------------------------- data


def batch(part: Part, picks: torch.Tensor, seq_len: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids and labels of a part's windows `picks`, gathered where the part lies and moved to `dev`; to a
    GPU from pinned memory, so that the copy queues behind the steps in flight instead of waiting for them."""
    ids = windows(part.tokens, part.starts(picks), seq_len)
    labels = part.labels(ids, picks)
    if dev.type == "cuda" and ids.device.type == "cpu":
        return ids.pin_memory().to(dev, non_blocking=True), labels.pin_memory().to(dev, non_blocking=True)
    return ids.to(dev), labels.to(dev)


@torch.no_grad()
def evaluate(model, part: Part, picks, t: TrainingPlan, dev):
    model.eval()
    losses = [model(ids, labels=labels).loss
              for ids, labels in (batch(part, p, t.seq_len, dev) for p in picks.split(t.batch_size))]
    model.train()
    model.reset_step_stats()  # held-out logits must not count toward the next step's QK-Clip
    return torch.stack(losses).mean().item()


# --------------------------------------------------------------------------- the step


def training_step(model, opt, params, ids: torch.Tensor, labels: torch.Tensor, max_norm: float,
                  processes: int = 1) -> dict[str, torch.Tensor]:
    """One optimizer step on the micro-batches ids, labels [micro-batches, batch, seq]: the forward and backward of
    each, the optimizer's step on the gradients of `params` clipped to norm max_norm (inf: measured only), and every
    gradient set to None.

    Returns the loss (the mean over the micro-batches and the processes) and the gradient norm before clipping, on
    the device. Nothing in it waits for the device (tests/test_step_sync_free.py), so that the host can queue the
    next step while this one runs, and a CUDA graph can capture it whole (k2c.runtime.graph).
    """
    step_loss = torch.zeros((), device=ids.device)
    for micro_ids, micro_labels in zip(ids, labels):
        micro_loss = model(micro_ids, labels=micro_labels).loss / len(ids)
        micro_loss.backward()
        step_loss += micro_loss.detach()
    if processes > 1:  # the gradients are averaged already, by FSDP2's reduce-scatter
        dist.all_reduce(step_loss)
        step_loss /= processes
    grad_norm = (parallel.grad_norm(params) if processes > 1 else
                 torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    # torch's clip_grad_norm_ factor, computed on the device (deciding on the host would wait for the norm) and
    # applied by the optimizer as it reads the gradients: scaling them first is a pass over every gradient
    opt.step(grad_scale=(max_norm / (grad_norm + 1e-6)).clamp(max=1.0))
    opt.zero_grad(set_to_none=True)
    return {"loss": step_loss, "grad_norm": grad_norm}


def checked_losses(unread: list[tuple[int, torch.Tensor]]) -> list[float]:
    """The losses of (step, loss) pairs, read back to the host at once; TrainError for the first one that is not
    finite."""
    losses = torch.stack([loss for _, loss in unread]).tolist()
    for (step, _), loss in zip(unread, losses):
        if not math.isfinite(loss):
            raise TrainError(f"the loss is {loss} at step {step}; try a lower optimizer.lr")
    return losses


# --------------------------------------------------------------------------- checkpoints


def resume_settings(plan: Plan) -> dict:
    """What a checkpoint must agree on to resume: the whole plan but the settings in RUN_FIELDS (and the schedule's
    length, which training.steps sets: the checkpoint carries its run's own schedule)."""
    settings = dataclasses.asdict(plan)
    for field in RUN_FIELDS:
        settings["training"].pop(field)
    settings["optimizer"].pop("decay_steps")
    return settings


def run_schedule(steps: int, o: OptimizerPlan) -> dict:
    """The schedule of a fresh run of `steps` steps: the spec's, stretched to `steps` (see the module docstring)."""
    if steps == o.decay_steps:
        return {"warmup_steps": o.warmup_steps, "decay_steps": o.decay_steps}
    warmup = 0 if o.warmup_steps == 0 else min(steps, max(1, round(o.warmup_steps * steps / max(1, o.decay_steps))))
    return {"warmup_steps": warmup, "decay_steps": steps}


def optimizer_settings(opt) -> dict:
    """The optimizer's state_dict without its tensors: groups, step count, schedule."""
    settings = opt.state_dict()
    return {**settings, "state": {"step": settings["state"]["step"]}}


def save_checkpoint(path, model, opt, batches, step, plan: Plan, run: dict | None = None):
    """Write the whole training state to `path` so that a crash at any moment leaves the previous one intact; the
    file ends with the sha256 of its bytes (k2c.runtime.files.write_checksummed). `run` is the run's target step
    count and schedule. The learning-rate scheduler's state is in the optimizer's (k2c.runtime.optim.Schedule)."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "run": run if run is not None else {"steps": plan.training.steps, **run_schedule(plan.training.steps,
                                                                                            plan.optimizer)},
        "model": model if isinstance(model, dict) else model.state_dict(),
        "optimizer": opt.state_dict() if isinstance(model, torch.nn.Module) else optimizer_settings(opt),
        "batches": batches.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "plan": resume_settings(plan),
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    write_checksummed(Path(path), write, durable=True)


def read_checkpoint(path) -> dict:
    """A checkpoint's state, once its checksum holds; TrainError naming the file for anything else: missing, a
    folder, unreadable, empty, cut short, changed on disk, or not written by this k2c."""
    path = Path(path)
    try:
        verify_checksum(path)
    except CorruptFile as err:
        raise TrainError(str(err)) from None
    except FileNotFoundError:
        raise TrainError(f"nothing to resume: {path} does not exist") from None
    except OSError as err:
        raise TrainError(f"{path}: cannot be read ({os_error_reason(err)})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the checksum held, so this is a file that k2c did not write
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainError(f"{path}: not a k2c checkpoint (torch.load: {reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TrainError(f"{path}: not a k2c checkpoint of format {CHECKPOINT_FORMAT} (found format {found!r})")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise TrainError(f"{path}: not a k2c checkpoint (no {', '.join(missing)})")
    return state


def _differences(a, b, prefix=""):
    """Dotted names of the settings that differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def save_sharded_checkpoint(path, model, opt, batches, step, plan: Plan, run: dict, layout, lead: bool) -> None:
    """A checkpoint of a run over several processes: every process writes its shards of the model and optimizer
    state (torch.distributed.checkpoint) to a folder named after the step; then the lead writes `path` as
    save_checkpoint does, with the folder's name where the tensors would be, and removes older folders. Until
    `path` is replaced the previous checkpoint and its folder stay whole."""
    path = Path(path)
    folder = f"{path.stem}-{step}{SHARDS_SUFFIX}"
    partial = path.parent / (folder + ".partial")
    if lead and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    parallel.save_shards(partial, model, opt, layout)
    if not lead:
        return
    if (path.parent / folder).exists():  # left by a run that stopped before it named the folder
        shutil.rmtree(path.parent / folder)
    partial.rename(path.parent / folder)
    save_checkpoint(path, {"shards": folder, "processes": layout.world}, opt, batches, step, plan, run)
    remove_shards(path, keep=folder)


def remove_shards(path: Path, keep: str | None = None) -> None:
    """Remove the shard folders beside checkpoint `path` that it no longer names."""
    for old in path.parent.glob(f"{path.stem}-*{SHARDS_SUFFIX}"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def shards_of(state: dict) -> str | None:
    """The folder of a sharded checkpoint's tensors (beside its file), or None for a single-file checkpoint."""
    shards = state["model"].get("shards")
    return shards if isinstance(shards, str) else None


def load_model(path, state: dict, model) -> None:
    """The model of checkpoint `path` (read already as `state`), sharded or not, into a single process's model."""
    shards = shards_of(state)
    if shards is None:
        model.load_state_dict(state["model"])
    else:
        parallel.load_shards(Path(path).parent / shards, model, None, None)


def load_checkpoint(path, model, opt, batches, plan: Plan, scheduler=None, *, state: dict | None = None,
                    layout=None) -> tuple[int, dict]:
    """Restore what save_checkpoint (or save_sharded_checkpoint) wrote; returns the step it was taken after and
    its run (target, schedule).

    `scheduler` (built on `opt` with the run's schedule) loads with the optimizer, whose state_dict carries it; a
    checkpoint written without it (by an older k2c) sets it to the checkpoint's step. `state`: the checkpoint
    already read. `layout`: this run's mesh (k2c.runtime.parallel), None for a single process. A sharded
    checkpoint resumes on any mesh, or in one process."""
    path = Path(path)
    state = read_checkpoint(path) if state is None else state
    changed = _differences(resume_settings(plan), state["plan"])
    if changed:
        raise TrainError(f"{path} was written under other settings ({', '.join(changed)}); it cannot resume here")
    shards = shards_of(state)
    if shards is None and layout is not None:
        raise TrainError(f"{path} was written by a single process; resume it with one process")
    opt.load_state_dict(state["optimizer"])
    if shards is None:
        model.load_state_dict(state["model"])
    else:
        parallel.load_shards(path.parent / shards, model, opt, layout)
    if scheduler is not None and "scheduler" not in state["optimizer"]:
        scheduler.jump_to(state["step"])
    batches.set_state(state["batches"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["run"]


def _metric_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of a metrics file; a line cut short by a crash (no newline) is left out."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.endswith("\n"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise TrainError(f"{path}:{number}: not a metrics record; move the file away to resume")
        records.append((line, record))
    return records


def read_metrics(path) -> list[dict]:
    """The records of a metrics file, in order; a line cut short by a crash is left out."""
    return [record for _, record in _metric_lines(Path(path))]


def keep_metrics(path, step):
    """Drop the metrics of steps after `step` (and a line cut short): those steps are about to run again."""
    write_atomic(Path(path), "".join(line for line, record in _metric_lines(Path(path)) if record["step"] <= step))


# --------------------------------------------------------------------------- reporting


def clock(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def show_progress(step, steps, record, eval_loss, eta_s, log_every):
    """One status line on stderr, for a step whose values the host read (logged, evaluated or saved): redrawn in
    place on a terminal, every log_every steps in a log file."""
    width = 24
    filled = width * step // steps
    line = (
        f"[{'#' * filled}{'-' * (width - filled)}] {step}/{steps} loss {record['loss']:.4f}"
        + (f" eval {eval_loss:.4f}" if eval_loss is not None else "")
        + f" lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s ETA {clock(eta_s)}"
    )
    if sys.stderr.isatty():
        print(f"\r{line}\x1b[K", end="\n" if step == steps else "", file=sys.stderr, flush=True)
    elif step % log_every == 0 or step == steps:
        print(line, file=sys.stderr, flush=True)


def plot(records, path, plan: Plan):
    """Train and eval loss on top; each layer's max attention logit and the clipped heads below."""
    fig = Figure(figsize=(8, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    steps = [r["step"] for r in records]
    top.plot(steps, [r["loss"] for r in records], label="train")
    evals = [r for r in records if "eval_loss" in r]
    top.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    top.set_ylabel(f"loss (nats per {'byte' if plan.training.tokenizer == 'bytes' else 'token'})")
    top.set_title(plan.name)
    top.legend()
    for layer, series in enumerate(zip(*(r["max_logits"] for r in records))):
        bottom.plot(steps, series, linewidth=1, label=f"layer {layer}")
    for tau in sorted({layer.attention.clip.tau for layer in plan.model.layers if layer.attention.clip.mode != "off"}):
        bottom.axhline(tau, color="gray", linestyle="--", label="tau")
    bottom.set_ylabel("max attention logit")
    bottom.set_xlabel("step")
    bottom.legend(loc="upper left", fontsize="small", ncol=4)
    clipped = bottom.twinx()
    counts = [r["clipped_heads"] for r in records]
    clipped.step(steps, counts, where="mid", color="black", alpha=0.4)
    clipped.set_ylim(0, 1.1 * max(1, *counts))
    clipped.yaxis.set_major_locator(MaxNLocator(integer=True))
    clipped.set_ylabel("clipped heads (gray)")
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))


# --------------------------------------------------------------------------- the loop


def device():
    """K2C_DEVICE if set, else the GPU when there is one (under a launcher, this process's local GPU)."""
    dev = torch.device(os.environ.get("K2C_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        # Exact resume needs a step to give the same bits every time; on CUDA that takes deterministic kernels
        # (the embedding gradient otherwise sums repeated tokens with atomics) and a fixed cuBLAS workspace.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return dev


def process_group(dev):
    """(rank, world size, whether this call started the process group). Under torchrun (WORLD_SIZE > 1) the
    processes train together on the mesh of the plan's parallel section (k2c.runtime.parallel)."""
    started = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=parallel.timeout())
    if not dist.is_initialized():
        return 0, 1, False
    return dist.get_rank(), dist.get_world_size(), started


def lost_process(err: RuntimeError) -> bool:
    """Whether a collective failed because another process of the run is gone (NCCL's timeout or abort; gloo's
    closed connection)."""
    return isinstance(err, dist.DistError) or "gloo/transport" in str(err)


def leave_process_group() -> None:
    """Destroy the default process group and free it at once. A reference cycle can keep gloo's group alive past
    destroy_process_group; left to the interpreter's last collection, its worker threads wake when the interpreter
    no longer lets them take the GIL, and the process aborts (about one exit in three, seen on two CPU ranks)."""
    dist.destroy_process_group()
    gc.collect()


class StopSignals:
    """SIGINT and SIGTERM, while the loop runs: the first asks it to stop after the step in progress (and save);
    a second SIGINT during a step stops at once (KeyboardInterrupt: nothing saved since the last checkpoint).
    While a checkpoint is being written, and for SIGTERM (which a launcher such as torchrun sends after the user's
    SIGINT), signals only confirm the stop. Handlers are installed only in the main thread (Python's rule)."""

    def __init__(self, abort_on_second: bool = True) -> None:
        self.signum: int | None = None
        self.saving = False
        self.abort_on_second = abort_on_second
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum, frame) -> None:
        name = SIGNAL_NAMES.get(signum, str(signum))
        if self.signum is None:
            self.signum = signum
            again = signum == signal.SIGINT and self.abort_on_second
            print(f"\n{name}: stopping after this step, then saving a checkpoint"
                  + (" (Ctrl-C again to stop at once, without saving)" if again else ""),
                  file=sys.stderr, flush=True)
        elif self.saving or signum != signal.SIGINT or not self.abort_on_second:
            print(f"{name}: still finishing; the checkpoint is on its way", file=sys.stderr, flush=True)
        else:
            raise KeyboardInterrupt


def _close_quietly(f) -> None:
    with contextlib.suppress(OSError):
        f.close()


def _write_error(path: Path, err: OSError, last_checkpoint: int) -> TrainError:
    kept = f"; the checkpoint of step {last_checkpoint} is intact" if last_checkpoint else ""
    return TrainError(f"cannot write {path}: {os_error_reason(err)}{kept}")


def run(package: ModuleType, run_dir, steps=None, resume=False, *, checkpoint_minutes: float | None = None,
        spec_dir: Path | None = None, data: tuple[Part, Part] | None = None):
    """Train a generated package's model to `steps` optimizer steps, writing checkpoint, metrics and plot to run_dir.

    `steps` defaults to training.steps for a fresh run and to the run's own target on a resume; the learning-rate
    schedule follows the rule in the module docstring. With `resume`, continue from run_dir's checkpoint.
    `checkpoint_minutes`: the wall-time checkpoint period (default DEFAULT_CHECKPOINT_MINUTES when
    training.checkpoint_every is 0, else none; 0: none). `spec_dir`: where relative paths in training.data and
    training.init_from start (the cwd when None). `data`: the (training, held-out) parts that k2c.runtime.data.load
    gave for this plan, when the caller has read them already.

    Returns a summary of the run (None on ranks other than 0). Raises TrainError for a run that cannot go as asked
    (nothing in run_dir is overwritten then), and Interrupted after a SIGINT / SIGTERM stopped it and it saved.
    """
    run_dir = Path(run_dir)
    plan: Plan = package.PLAN
    t = plan.training
    if steps is not None and steps < 1:
        raise TrainError(f"steps must be at least 1, not {steps}")
    checkpoint_path = run_dir / CHECKPOINT
    if resume and not (checkpoint_path.exists() or checkpoint_path.is_symlink()):
        raise TrainError(f"nothing to resume: {checkpoint_path} does not exist")
    if data is None:  # before anything is created: data that cannot be read leave no empty run folder
        try:
            data = load_data(t, plan.model.vocab_size, spec_dir)
        except DataError as err:
            raise TrainError(str(err)) from None

    dev = device()
    rank, size, started_group = process_group(dev)
    lead = rank == 0  # the one process that writes metrics, checkpoints and plots
    created = False
    try:
        with contextlib.ExitStack() as stack:
            if lead:
                created = not run_dir.exists()
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    raise TrainError(f"cannot create the run folder {run_dir}: {os_error_reason(err)}") from None
                try:
                    stack.enter_context(folder_lock(run_dir))
                except FolderBusy as err:
                    raise TrainError(str(err)) from None
                except OSError as err:
                    raise TrainError(f"cannot lock the run folder {run_dir}: {os_error_reason(err)}") from None
                if not resume and (checkpoint_path.exists() or checkpoint_path.is_symlink()):
                    raise TrainError(f"{checkpoint_path} exists: resume from it, or train in another run folder")
                remove_stale_temporaries(run_dir, (CHECKPOINT, METRICS, PLOT))
            return _train(package, run_dir, data, steps, resume, checkpoint_minutes, spec_dir, dev, rank, size)
    finally:
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty: a run that stopped before it wrote anything leaves no folder
        if started_group:
            leave_process_group()


def build_model(package: ModuleType, dev, placement=None, spec_dir: Path | None = None):
    """The run's model on `dev`: what `package.build_model(dev)` gives after torch.manual_seed(training.seed), with
    its base weights from training.init_from when that is set.

    It is built on the meta device, sharded there over the processes of `placement` (k2c.runtime.parallel) when
    there are several, and only then allocated: each process draws (k2c.runtime.model.SeededInit) and reads
    (k2c.runtime.checkpoint) its own shards alone, so that none ever holds the whole model.
    """
    plan: Plan = package.PLAN
    t = plan.training
    torch.manual_seed(t.seed)
    model = package.build_model("meta", getattr(torch, t.dtype))
    if placement is not None:
        parallel.shard(model, plan.parallel, placement)
    model.to_empty(device=dev)
    model.init_weights(model.init_seed)
    if t.init_from is not None:
        try:
            package.load_hf_state_dict(model, spec_path(t.init_from, spec_dir))
        except (OSError, ValueError) as err:  # CheckpointError is a ValueError
            reason = str(err) if isinstance(err, CheckpointError) else f"{err.__class__.__name__}: {err}"
            raise TrainError(f"training.init_from {t.init_from!r} cannot be loaded: {reason}") from None
    return model


def _train(package, run_dir: Path, data: tuple[Part, Part], steps, resume, checkpoint_minutes, spec_dir, dev, rank,
           size):
    plan: Plan = package.PLAN
    t = plan.training
    lead = rank == 0
    checkpoint_path, metrics_path, plot_path = run_dir / CHECKPOINT, run_dir / METRICS, run_dir / PLOT
    train_part, eval_part = data  # they stay where they lie (memory-mapped); each batch is moved to dev
    held_out = eval_picks(eval_part, t.batch_size)
    placement = None
    if size > 1:
        try:
            placement = parallel.layout(plan, dev.type)
        except LayoutError as err:
            raise TrainError(str(err)) from None
    model = build_model(package, dev, placement, spec_dir)
    if t.init_from is None and plan.adapter.kind != "none" and lead and not resume:
        print(f"warning: adapter kind {plan.adapter.kind!r} without training.init_from: the adapters train on a "
              "randomly initialised base model; set training.init_from to the base checkpoint to fine-tune it",
              file=sys.stderr, flush=True)
    model.train()
    opt = package.build_optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = Batches(train_part, t.seed)
    start = 0
    if resume:
        state = read_checkpoint(checkpoint_path)
        run = state["run"]
        scheduler = package.build_scheduler(opt, warmup_steps=run["warmup_steps"], decay_steps=run["decay_steps"])
        start, run = load_checkpoint(checkpoint_path, model, opt, batches, plan, scheduler, state=state,
                                     layout=placement)
        steps = run["steps"] if steps is None else steps
        run = {**run, "steps": steps}
    else:
        steps = t.steps if steps is None else steps
        run = {"steps": steps, **run_schedule(steps, plan.optimizer)}
        scheduler = package.build_scheduler(opt, warmup_steps=run["warmup_steps"], decay_steps=run["decay_steps"])
    if start >= steps:
        raise TrainError(f"{checkpoint_path} is at step {start} already; to train on, ask for more steps "
                         f"(--steps N; steps past {run['decay_steps']} run at the schedule's final learning rate)")
    schedule = dataclasses.replace(plan.optimizer, warmup_steps=run["warmup_steps"], decay_steps=run["decay_steps"])
    last_checkpoint = start
    if lead:
        try:
            if resume:
                keep_metrics(metrics_path, start)
            else:
                write_atomic(metrics_path, "")
        except OSError as err:
            raise _write_error(metrics_path, err, last_checkpoint) from None
    if lead and steps > run["decay_steps"] and plan.optimizer.decay != "constant":
        print(f"note: this run's schedule ends at step {run['decay_steps']}; steps {max(start, run['decay_steps']) + 1}"
              f"-{steps} run at its final learning rate {lr_at(run['decay_steps'], schedule):.3g}",
              file=sys.stderr, flush=True)
    if lead and dev.type == "cuda":
        print("note: the first steps compile the Triton kernels and time their configs at these shapes (minutes for "
              "a large model); Triton's cache keeps both for later runs on this machine", file=sys.stderr, flush=True)

    if checkpoint_minutes is None:
        checkpoint_minutes = 0.0 if t.checkpoint_every else DEFAULT_CHECKPOINT_MINUTES
    period_s = checkpoint_minutes * 60 if checkpoint_minutes > 0 else math.inf
    max_norm = plan.optimizer.grad_clip or math.inf  # inf scales by exactly 1: the norm is measured all the same

    def eager_step(ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return training_step(model, opt, params, ids, labels, max_norm, size)

    # Whether the step is replayed from a CUDA graph is decided here, as the run starts, not by a compiler pass: the
    # plan cannot know which device a run lands on. It takes a GPU, one process and the fused MoE kernels
    # (graph.capturable); K2C_CUDA_GRAPH=0 turns it off. The steps in which CE-LoRA refreshes still run eagerly.
    graphed = os.environ.get(CUDA_GRAPH, "1") != "0" and capturable(model, dev, size)
    train_step = CudaGraphStep(eager_step, model, opt) if graphed else eager_step
    tokens_per_step = t.grad_accum * t.batch_size * t.seq_len
    began, train_time, eval_loss = time.perf_counter(), 0.0, None
    saved_at = _clock()
    share = t.batch_size // size

    def save(step: int) -> None:
        nonlocal last_checkpoint, saved_at
        stop.saving = True
        try:
            if placement is None:
                save_checkpoint(checkpoint_path, model, opt, batches, step, plan, run)
                remove_shards(checkpoint_path)  # of a sharded run this one resumed
            else:
                save_sharded_checkpoint(checkpoint_path, model, opt, batches, step, plan, run, placement, lead)
        except OSError as err:
            raise _write_error(checkpoint_path, err, last_checkpoint) from None
        finally:
            stop.saving = False
        last_checkpoint, saved_at = step, _clock()

    def close_metrics(metrics) -> None:
        try:
            metrics.close()
        except OSError as err:
            raise _write_error(metrics_path, err, last_checkpoint) from None

    def write_plot() -> None:
        stop.saving = True
        try:
            plot(read_metrics(metrics_path), plot_path, plan)
        except OSError as err:
            raise _write_error(plot_path, err, last_checkpoint) from None
        finally:
            stop.saving = False

    with contextlib.ExitStack() as stack:
        # under a launcher the terminal's SIGINT and the launcher's copy of it arrive together: never abort then
        stop = stack.enter_context(StopSignals(abort_on_second=size == 1))
        metrics = None
        if lead:
            try:
                metrics = open(metrics_path, "a", encoding="utf-8")
            except OSError as err:
                raise _write_error(metrics_path, err, last_checkpoint) from None
            stack.callback(_close_quietly, metrics)  # on the way out of an error: that error is the one to report
        step = start  # for a failure before the first step
        unread: list[tuple[int, torch.Tensor]] = []  # (step, loss) of the steps whose loss the host has not read
        window_steps, window_time = 0, 0.0  # the steps since the last record, and their wall time
        try:
            for step in range(start + 1, steps + 1):
                t0 = time.perf_counter()
                # every rank draws the whole batch from the same generator and keeps its share of it
                picks = batches.draw(t.grad_accum, t.batch_size)[:, rank * share : (rank + 1) * share]
                ids, labels = batch(train_part, picks.flatten(), t.seq_len, dev)
                values = train_step(ids.view(*picks.shape, -1), labels.view(*picks.shape, -1))
                scheduler.step()  # the learning rate of the next step
                unread.append((step, values["loss"]))
                evaluating = step % t.eval_every == 0 or step == steps
                stopping = stop.signum is not None
                every = t.checkpoint_every and step % t.checkpoint_every == 0
                saving = step == steps or every or _clock() - saved_at >= period_s
                if size > 1:  # every rank stops, and saves, at the same step, whichever rank's signal or clock said so
                    flags = torch.tensor([float(stopping), float(saving)], device=dev)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    stopping, saving = bool(flags[0].item()), bool(flags[1].item())
                logging = step % t.log_every == 0 or evaluating or stopping
                # The host reads a step's values back, and so waits for the device, only on a step that is logged or
                # saved (on every rank alike, and the losses of the steps before it are checked then, before anything
                # is saved); on the others it goes on to queue the next step while the device works.
                record = None
                if logging or saving:
                    report = opt.last_report  # learning rate, clipped heads and max logit per layer of this step
                    record = {
                        "step": step,
                        "loss": checked_losses(unread)[-1],
                        "lr": report["lr"],
                        "grad_norm": values["grad_norm"].item(),
                        "max_logits": report["max_logits"],
                        "clipped_heads": report["clipped_heads"],
                    }
                    unread.clear()
                took = time.perf_counter() - t0
                train_time += took
                window_steps, window_time = window_steps + 1, window_time + took
                if record is not None:
                    # all ranks together, over the steps since the last record: a step's own time is the host's
                    # until one waits for the device
                    record["tokens_per_s"] = tokens_per_step * window_steps / window_time
                    window_steps, window_time = 0, 0.0
                    if evaluating:
                        eval_loss = record["eval_loss"] = evaluate(model, eval_part, held_out, t, dev)
                    if metrics is not None and logging:
                        try:
                            metrics.write(json.dumps(record) + "\n")
                            metrics.flush()
                        except OSError as err:
                            raise _write_error(metrics_path, err, last_checkpoint) from None
                if saving or stopping:
                    save(step)
                if metrics is not None and record is not None and not stopping:  # the lead process
                    done = step - start
                    eta = (time.perf_counter() - began) / done * (steps - step)
                    show_progress(step, steps, record, eval_loss, eta, t.log_every)
                if stopping:
                    if metrics is not None:
                        close_metrics(metrics)
                        write_plot()
                    raise Interrupted(stop.signum or signal.SIGTERM, step, steps, run_dir, saved=lead)
        except RuntimeError as err:
            if size == 1 or not lost_process(err):
                raise
            raise TrainError(f"a process of the run stopped at step {step} "
                             f"({str(err).strip().splitlines()[0]}); the checkpoint of step {last_checkpoint} "
                             "resumes it (--resume)") from None

        if metrics is not None:  # the lead process
            close_metrics(metrics)
            write_plot()
    if size > 1:
        # the other ranks leave once the lead's checkpoint, metrics and plot are written: a launcher that sees every
        # rank exit sees a finished run, and no rank tears down the process group under another's feet
        dist.barrier()
    if not lead:
        return None

    records = read_metrics(metrics_path)
    summary = {
        "steps": steps,
        "loss": records[-1]["loss"],
        "eval_loss": records[-1]["eval_loss"],  # the last step is always evaluated
        "tokens_per_s": (steps - start) * tokens_per_step / train_time,
        "run_dir": run_dir,
        "checkpoint": checkpoint_path,
        "metrics": metrics_path,
        "plot": plot_path,
    }
    print(
        f"{plan.name}: {steps} steps, loss {summary['loss']:.4f}, eval loss {summary['eval_loss']:.4f}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s; metrics, plot and checkpoint in {run_dir}/"
    )
    return summary
