"""Train a generated model on the bytes of a text: the MuonClip loop, metrics, a plot, and checkpoints that resume
exactly.

`run(package, run_dir)` is what `k2c train` calls, with the generated package (its plan and its `build_model`,
`build_optimizer`, `load_hf_state_dict`). Tokens are UTF-8 bytes (a vocabulary of 256); the last `eval_fraction`
of them is held out. Every training batch comes from one torch.Generator seeded with the plan's seed, and its state
travels in the checkpoint with the model, the optimizer and torch's RNG states, so a resumed run takes the very
steps that an uninterrupted one would, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from k2c.runtime.files import write_atomic
from k2c.runtime.plan import Plan, TrainingPlan

CORPUS = "corpus.txt"  # k2c/data/corpus.txt: Python's reference documentation, PSF licensed
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
EVAL_BATCHES = 4  # each evaluation reads the same EVAL_BATCHES x batch_size held-out windows
# training settings that may change between a run and its resume: they do not touch the trajectory
RUN_FIELDS = ("steps", "eval_every", "log_every", "checkpoint_every")


class TrainError(Exception):
    """A run that cannot start or go on as asked: the message says why and what to do."""


# --------------------------------------------------------------------------- data


def bundled_corpus() -> bytes:
    """The corpus that ships with k2c: Python's reference documentation as UTF-8 text."""
    return (resources.files("k2c") / "data" / CORPUS).read_bytes()


def read_corpus(t: TrainingPlan) -> bytes:
    """The training text as bytes: the corpus bundled with k2c, or a UTF-8 text file (relative to the cwd)."""
    if t.data == "bundled":
        return bundled_corpus()
    try:
        raw = Path(t.data).read_bytes()
        raw.decode("utf-8")  # a byte model trains on any file, but a text that is not UTF-8 is a mistake
    except (OSError, UnicodeDecodeError) as err:
        raise TrainError(f"training.data {t.data!r} is not a readable UTF-8 text file: {err}") from None
    return raw


def split(raw: bytes, t: TrainingPlan, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) uint8 token tensors: the last eval_fraction of the bytes is held out."""
    if vocab_size < 256:
        raise TrainError(f"byte-level training needs model.vocab_size >= 256, not {vocab_size}")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_eval = int(len(tokens) * t.eval_fraction)
    if min(n_eval, len(tokens) - n_eval) < t.seq_len:
        raise TrainError(
            f"a corpus of {len(tokens)} bytes split by eval_fraction {t.eval_fraction} leaves a part shorter "
            f"than seq_len ({t.seq_len})"
        )
    return tokens[:-n_eval], tokens[-n_eval:]


def windows(tokens, starts, seq_len):
    """[len(starts), seq_len] token ids: the model shifts its labels inside, so labels are the inputs."""
    return tokens[starts[:, None] + torch.arange(seq_len, device=starts.device)].long()


def eval_starts(tokens, t: TrainingPlan):
    """Window starts spread evenly over the held-out bytes: the same windows at every evaluation."""
    return torch.linspace(0, len(tokens) - t.seq_len, EVAL_BATCHES * t.batch_size).long()


@torch.no_grad()
def evaluate(model, tokens, starts, t: TrainingPlan):
    model.eval()
    batches = (windows(tokens, s, t.seq_len) for s in starts.split(t.batch_size))
    losses = [model(ids, labels=ids).loss for ids in batches]
    model.train()
    model.reset_step_stats()  # held-out logits must not count toward the next step's QK-Clip
    return torch.stack(losses).mean().item()


# --------------------------------------------------------------------------- checkpoints


def resume_settings(plan: Plan) -> dict:
    """What a checkpoint must agree on to resume: the whole plan but the settings in RUN_FIELDS."""
    settings = dataclasses.asdict(plan)
    for field in RUN_FIELDS:
        settings["training"].pop(field)
    return settings


def save_checkpoint(path, model, opt, batches, step, plan: Plan):
    """Write the whole training state to `path` so that a crash at any moment leaves the previous one intact."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "batches": batches.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "plan": resume_settings(plan),
    }
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    write_atomic(path, write, durable=True)


def _differences(a, b, prefix=""):
    """Dotted names of the settings that differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def load_checkpoint(path, model, opt, batches, plan: Plan):
    """Restore what save_checkpoint wrote; returns the step it was taken after."""
    if not path.exists():
        raise TrainError(f"nothing to resume: {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    changed = _differences(resume_settings(plan), state.get("plan"))
    if changed:
        raise TrainError(f"{path} was written under other settings ({', '.join(changed)}); it cannot resume here")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    batches.set_state(state["batches"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def keep_metrics(path, step):
    """Drop the metrics of steps after `step` (and a line cut short): those steps are about to run again."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    write_atomic(path, "".join(kept))


# --------------------------------------------------------------------------- reporting


def clock(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def show_progress(step, steps, record, eval_loss, eta_s, log_every):
    """One status line on stderr: redrawn in place on a terminal, every log_every steps in a log file."""
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
    top.set_ylabel("loss (nats per byte)")
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
    fig.savefig(path, dpi=120)


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


def data_parallel(dev, batch_size):
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) every process holds the whole model and takes its
    share of each batch; gradients are averaged, so all ranks take the same step."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return 0, 1
    if batch_size % dist.get_world_size():
        raise TrainError(f"training.batch_size {batch_size} must split evenly over "
                         f"{dist.get_world_size()} processes")
    return dist.get_rank(), dist.get_world_size()


def average_gradients(params, size):
    """All ranks end with the mean gradient, summed in one flat buffer per dtype."""
    by_dtype = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def run(package: ModuleType, run_dir, steps=None, resume=False):
    """Train a generated package's model to `steps` optimizer steps (training.steps by default), writing checkpoint,
    metrics and plot to run_dir.

    With `resume`, continue from run_dir's checkpoint. Returns a summary of the run (None on ranks other than 0).
    Raises TrainError for a run that cannot go as asked.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan: Plan = package.PLAN
    t = plan.training
    steps = t.steps if steps is None else steps
    if steps < 1:
        raise TrainError(f"steps must be at least 1, not {steps}")
    checkpoint_path, metrics_path, plot_path = run_dir / CHECKPOINT, run_dir / METRICS, run_dir / PLOT
    if not resume and checkpoint_path.exists():
        raise TrainError(f"{checkpoint_path} exists: resume from it, or train in another run folder")

    dev = device()
    rank, size = data_parallel(dev, t.batch_size)
    lead = rank == 0  # the one process that writes metrics, checkpoints and plots
    train_tokens, eval_tokens = (part.to(dev) for part in split(read_corpus(t), t, plan.model.vocab_size))
    held_out = eval_starts(eval_tokens, t).to(dev)
    torch.manual_seed(t.seed)
    model = package.build_model(dev, getattr(torch, t.dtype))
    if t.init_from is not None:
        try:
            package.load_hf_state_dict(model, t.init_from)
        except (OSError, ValueError) as err:
            raise TrainError(f"training.init_from {t.init_from!r} cannot be loaded: {err}") from None
    model.train()
    opt = package.build_optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = torch.Generator().manual_seed(t.seed)
    start = 0
    if resume:
        start = load_checkpoint(checkpoint_path, model, opt, batches, plan)
        if start >= steps:
            raise TrainError(f"{checkpoint_path} is at step {start} already; ask for more steps to go on")
        if lead:
            keep_metrics(metrics_path, start)
    elif lead:
        metrics_path.write_text("", encoding="utf-8")

    tokens_per_step = t.grad_accum * t.batch_size * t.seq_len
    began, train_time, eval_loss = time.perf_counter(), 0.0, None
    share = t.batch_size // size
    with open(metrics_path, "a", encoding="utf-8") if lead else contextlib.nullcontext() as metrics:
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            step_loss = torch.zeros((), device=dev)
            # every rank draws the whole batch from the same generator and keeps its share of it
            starts = torch.randint(len(train_tokens) - t.seq_len + 1, (t.grad_accum, t.batch_size), generator=batches)
            for micro in starts[:, rank * share : (rank + 1) * share].to(dev):
                ids = windows(train_tokens, micro, t.seq_len)
                micro_loss = model(ids, labels=ids).loss / t.grad_accum
                micro_loss.backward()
                step_loss += micro_loss.detach()
            if size > 1:
                average_gradients(params, size)
                dist.all_reduce(step_loss)
                step_loss /= size
            loss = step_loss.item()
            if not math.isfinite(loss):
                raise TrainError(f"the loss is {loss} at step {step}; try a lower optimizer.lr")
            # max_norm inf scales by exactly 1: the norm is still measured when clipping is off
            grad_norm = torch.nn.utils.clip_grad_norm_(params, plan.optimizer.grad_clip or math.inf).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            report = opt.last_report  # learning rate, clipped heads and max logit per layer of this step
            took = time.perf_counter() - t0
            train_time += took
            record = {
                "step": step,
                "loss": loss,
                "lr": report["lr"],
                "grad_norm": grad_norm,
                "max_logits": report["max_logits"],
                "clipped_heads": report["clipped_heads"],
                "tokens_per_s": tokens_per_step / took,  # all ranks together
            }
            if step % t.eval_every == 0 or step == steps:
                eval_loss = record["eval_loss"] = evaluate(model, eval_tokens, held_out, t)
            if metrics is None:  # not the lead process
                continue
            if step % t.log_every == 0 or "eval_loss" in record:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if step == steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
                save_checkpoint(checkpoint_path, model, opt, batches, step, plan)
            done = step - start
            eta = (time.perf_counter() - began) / done * (steps - step)
            show_progress(step, steps, record, eval_loss, eta, t.log_every)

    if not lead:
        return None

    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    plot(records, plot_path, plan)
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
