"""Plain Muon lets attention logits grow; MuonClip holds them at tau. A CPU reproduction on the tiny spec.

Trains `specs/k2-tiny.yaml` twice from the same initialisation and data, at a deliberately high learning rate:
once with plain Muon (`optimizer.kind: muon`) and once with MuonClip at a small tau. After every step it
measures the max pre-softmax logit again on the step's own batch, so "held at tau after every step" is checked
on the weights the clip left, not only on the logits the clip saw. Writes docs/qk_clip.{json,png,md}.

    python scripts/qk_clip_behaviour.py [--steps 300] [--lr 2e-2] [--tau 30]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from k2c.runtime import data as runtime_data  # noqa: E402
from k2c.runtime.packages import import_package  # noqa: E402
from k2c.codegen import build_package  # noqa: E402
from k2c.spec import Spec, load_spec  # noqa: E402


def variant(base: Spec, name: str, kind: str, lr: float, tau: float, steps: int) -> Spec:
    doc = base.model_dump(mode="json")
    doc["name"] = name
    doc["optimizer"].update(kind=kind, lr=lr, weight_decay=0.0, qk_clip={"enabled": True, "tau": tau})
    doc["optimizer"]["schedule"] = {"warmup_steps": 10, "decay": "constant", "final_lr_ratio": 1.0}
    doc["training"]["steps"] = steps
    return Spec.model_validate(doc)


def train(spec: Spec, workdir: Path) -> dict[str, list[float]]:
    build_package(spec, workdir / spec.name)
    package = import_package(workdir / spec.name, spec.name)
    cfg = package.PLAN.training
    train_tokens = runtime_data.load(cfg, package.CONFIG.vocab_size)[0].tokens
    torch.manual_seed(cfg.seed)
    model = package.build_model()
    opt = package.build_optimizer(model)
    schedule = package.build_scheduler(opt)
    batches = torch.Generator().manual_seed(cfg.seed)
    curves: dict[str, list[float]] = {"loss": [], "seen": [], "after": [], "clipped_heads": []}
    for step in range(1, cfg.steps + 1):
        starts = torch.randint(len(train_tokens) - cfg.seq_len + 1, (cfg.batch_size,), generator=batches)
        ids = runtime_data.windows(train_tokens, starts, cfg.seq_len)
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), package.PLAN.optimizer.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        report = opt.last_report
        with torch.no_grad():  # the same batch through the weights the step (and its clip) left
            model.eval()
            model(ids)
            after = model.max_logits().max().item()
        model.reset_step_stats()  # the measurement must not feed the next step's clip
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{spec.name}: loss is {loss.item()} at step {step}")
        curves["loss"].append(loss.item())
        curves["seen"].append(max(report["max_logits"]))
        curves["after"].append(after)
        curves["clipped_heads"].append(report["clipped_heads"])
        if step % 25 == 0 or step == cfg.steps:
            print(f"{spec.name} step {step:4d}  loss {loss.item():.3f}  max logit seen {curves['seen'][-1]:7.2f}"
                  f"  after step {after:7.2f}  clipped heads {report['clipped_heads']}", file=sys.stderr)
    return curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--tau", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args()

    base = load_spec(REPO / "specs" / "k2-tiny.yaml")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in (("qk_demo_muon", "muon"), ("qk_demo_muonclip", "muonclip")):
            runs[kind] = train(variant(base, name, kind, args.lr, args.tau, args.steps), Path(tmp))

    tail = max(1, args.steps // 10)
    summary = {
        kind: {
            "max_logit_peak": max(c["seen"]),
            "max_logit_after_step_peak": max(c["after"]),
            "first_step_above_tau": next((i + 1 for i, v in enumerate(c["seen"]) if v > args.tau), None),
            "final_loss_mean_last_10pct": sum(c["loss"][-tail:]) / tail,
            "steps_with_clipped_heads": sum(1 for n in c["clipped_heads"] if n),
        }
        for kind, c in runs.items()
    }
    meta = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU, torch threads: {torch.get_num_threads()}",
        "spec": "specs/k2-tiny.yaml, weight_decay 0, constant lr after 10 warm-up steps",
        "steps": args.steps, "lr": args.lr, "tau": args.tau,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "qk_clip.json").write_text(json.dumps({"meta": meta, "summary": summary, "curves": runs}) + "\n")
    plot(runs, args, args.out / "qk_clip.png")
    write_markdown(meta, summary, args.out / "qk_clip.md")
    print(json.dumps(summary, indent=1))


def plot(runs: dict, args: argparse.Namespace, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_logit, ax_loss = fig.subplots(1, 2)
    steps = range(1, args.steps + 1)
    for kind, color in (("muon", "tab:red"), ("muonclip", "tab:blue")):
        ax_logit.plot(steps, runs[kind]["seen"], color=color, label=f"{kind}: max logit in the step's forward")
        ax_logit.plot(steps, runs[kind]["after"], color=color, ls=":", label=f"{kind}: same batch after the step")
        ax_loss.plot(steps, runs[kind]["loss"], color=color, label=kind, lw=0.8)
    ax_logit.axhline(args.tau, color="k", lw=0.8, ls="--", label=f"tau = {args.tau:g}")
    ax_logit.set(xlabel="step", ylabel="max pre-softmax logit (all layers, heads)", title="Max attention logit")
    ax_loss.set(xlabel="step", ylabel="training loss (nats/byte)", title="Loss")
    ax_logit.legend(fontsize=7)
    ax_loss.legend(fontsize=8)
    fig.suptitle(f"k2-tiny, lr {args.lr:g}, no weight decay: plain Muon vs MuonClip (tau {args.tau:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_markdown(meta: dict, summary: dict, path: Path) -> None:
    rows = "\n".join(
        f"| {kind} | {s['max_logit_peak']:.1f} | {s['max_logit_after_step_peak']:.1f} | "
        f"{s['first_step_above_tau'] or 'never'} | {s['steps_with_clipped_heads']} | "
        f"{s['final_loss_mean_last_10pct']:.4f} |"
        for kind, s in summary.items()
    )
    path.write_text(
        "# QK-Clip on the tiny spec: plain Muon against MuonClip\n\n"
        f"Made by `scripts/qk_clip_behaviour.py` on {meta['date']} ({meta['machine']}, torch {meta['torch']}).\n"
        f"Settings: {meta['spec']}; lr {meta['lr']:g}; tau {meta['tau']:g}; {meta['steps']} steps; "
        "same initialisation and batches for both runs.\n\n"
        "| optimizer | peak max logit seen | peak max logit after a step | first step above tau | "
        "steps with clipped heads | mean loss, last 10% of steps |\n|---|---|---|---|---|---|\n"
        f"{rows}\n\n![max logit and loss](qk_clip.png)\n"
    )


if __name__ == "__main__":
    main()
