"""Does CE-LoRA fine-tune like LoRA? A CPU comparison on the tiny spec.

1. Pretrain `specs/k2-tiny.yaml` on the first 75% of the bundled corpus.
2. Export it in the published checkpoint layout and fine-tune it on the held-out last 25% (which pretraining
   never saw) three times, from the same weights, data and seed, with the same rank budget:
   LoRA (exact backward), CE-LoRA at keep ratio 0.5 and CE-LoRA at keep ratio 0.25.
   Adapters sit on every attention, MLP, shared-expert and routed-expert matrix; as in the CE-LoRA authors'
   configuration, the paths that feed the softmax (q, kv) and the gate nonlinearity keep the exact backward,
   and the keep ratio applies to the attention output and the up/down projections.
3. Report the fine-tuning eval losses, and, on the pretrained weights and a real batch's output gradients, the
   relative error of CE-LoRA's input gradient against the exact `dY W` for keep ratios 0.1 .. 1.0.
   Writes docs/celora_finetune.{json,png,md}.

    python scripts/celora_finetune.py [--pretrain-steps 300] [--finetune-steps 200] [--svd-rank K]
                                      [--refresh-every N] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from k2c.runtime import adapters as runtime_adapters  # noqa: E402
from k2c.runtime import train as runtime_train  # noqa: E402
from k2c.runtime.packages import import_package  # noqa: E402
from k2c.codegen import build_package  # noqa: E402
from k2c.spec import Spec, load_spec  # noqa: E402

VARIANTS = {"lora": ("lora", None), "ce_lora_0.5": ("ce_lora", 0.5), "ce_lora_0.25": ("ce_lora", 0.25)}
APPROXIMATED = ("attn.o", "mlp.{up,down}", "shared.{up,down}", "experts.{up,down}")
EXACT = ("attn.{q_a,q_b,kv_a,kv_b}", "mlp.gate", "shared.gate", "experts.gate")


def with_changes(base: Spec, name: str, **sections) -> Spec:
    doc = base.model_dump(mode="json")
    doc["name"] = name
    for section, values in sections.items():
        doc[section] = {**doc.get(section, {}), **values}
    return Spec.model_validate(doc)


def run(spec: Spec, workdir: Path) -> tuple[dict, object]:
    build_package(spec, workdir / spec.name)
    package = import_package(workdir / spec.name, spec.name)
    return runtime_train.run(package, workdir / f"{spec.name}_run"), package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--svd-rank", type=int, help="rank of CE-LoRA's frozen SVD pair (default: the adapter rank)")
    ap.add_argument("--refresh-every", type=int, default=20, help="backward passes between critical-channel choices")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args()
    svd_rank = args.svd_rank or args.rank

    base = load_spec(REPO / "specs" / "k2-tiny.yaml")
    corpus = (REPO / "k2c" / "data" / "corpus.txt").read_bytes()
    cut = int(len(corpus) * 0.75)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "pretrain.txt").write_bytes(corpus[:cut])
        (work / "finetune.txt").write_bytes(corpus[cut:])

        pre = with_changes(base, "ft_pretrain", training={"data": str(work / "pretrain.txt"),
                                                          "steps": args.pretrain_steps})
        pre_summary, pre_package = run(pre, work)
        model = pre_package.build_model()
        checkpoint = torch.load(pre_summary["checkpoint"], weights_only=True)
        model.load_state_dict(checkpoint["model"])
        save_file({k: v.contiguous() for k, v in pre_package.hf_state_dict(model).items()}, work / "base.safetensors")
        error_curve = input_grad_errors(pre_package, model, corpus[cut:], svd_rank)

        for label, (kind, keep) in VARIANTS.items():
            targets = [{"match": m, "keep_ratio": keep} for m in APPROXIMATED] + [{"match": m} for m in EXACT]
            spec = with_changes(
                base, f"ft_{label.replace('.', '')}",
                adapter={"kind": kind, "rank": args.rank, "alpha": 2.0 * args.rank, "svd_rank": svd_rank,
                         "refresh_every": args.refresh_every, "targets": targets},
                optimizer={"lr": args.lr, "schedule": {"warmup_steps": 10, "decay": "cosine", "final_lr_ratio": 0.1}},
                training={"data": str(work / "finetune.txt"), "steps": args.finetune_steps, "eval_every": 25,
                          "init_from": str(work / "base.safetensors")},
            )
            summary, _ = run(spec, work)
            records = [json.loads(line) for line in summary["metrics"].read_text().splitlines()]
            results[label] = {
                "final_eval_loss": summary["eval_loss"],
                "eval_curve": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
                "train_loss": [(r["step"], r["loss"]) for r in records],
                "cpu_tokens_per_s": summary["tokens_per_s"],
            }
            print(f"{label}: final eval loss {summary['eval_loss']:.4f}", file=sys.stderr)

    lora = results["lora"]["final_eval_loss"]
    for r in results.values():
        r["relative_to_lora"] = r["final_eval_loss"] / lora - 1
    meta = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU", "pretrain_steps": args.pretrain_steps,
        "pretrain_eval_loss": pre_summary["eval_loss"], "finetune_steps": args.finetune_steps, "rank": args.rank,
        "lr": args.lr, "svd_rank": svd_rank, "refresh_every": args.refresh_every,
        "approximated_sites": APPROXIMATED, "exact_sites": EXACT,
    }
    results_doc = {"meta": meta, "results": results, "input_grad_error": error_curve}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "celora_finetune.json").write_text(json.dumps(results_doc, indent=1) + "\n")
    plot(results, args.out / "celora_finetune.png")
    write_markdown(meta, results, error_curve, args.out / "celora_finetune.md")
    print(json.dumps({k: {"final_eval_loss": v["final_eval_loss"], "relative_to_lora": v["relative_to_lora"]}
                      for k, v in results.items()}, indent=1))


KEEP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ERROR_SITES = ("model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj")


def input_grad_errors(package, model, text: bytes, svd_rank: int) -> dict[str, list[float]]:
    """||dX_CE - dY W|| / ||dY W|| per site and keep ratio, with W and dY from the pretrained model on held-out text."""
    grads: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(name).register_full_backward_hook(
            lambda _m, _gi, go, name=name: grads.__setitem__(name, go[0].reshape(-1, go[0].shape[-1])))
        for name in ERROR_SITES
    ]
    ids = torch.tensor(list(text[: 16 * 128]), dtype=torch.long).view(16, 128)
    model(ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    curves = {}
    for name in ERROR_SITES:
        weight, dy = model.get_submodule(name).weight.detach(), grads[name]
        exact = dy @ weight
        errors = []
        for keep in KEEP_RATIOS:
            double = runtime_adapters.DoubleLoRA(svd_rank, keep, refresh_every=1)
            double.refresh_due(weight)
            double.select(weight, torch.linalg.vector_norm(dy, dim=0))
            approx = runtime_adapters.base_input_grad(dy, weight, double.residual())
            errors.append((torch.linalg.norm(approx - exact) / torch.linalg.norm(exact)).item())
        curves[name] = errors
    return curves


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_train, ax_eval = fig.subplots(1, 2)
    for label, r in results.items():
        ax_train.plot(*zip(*r["train_loss"]), label=label, lw=0.8)
        ax_eval.plot(*zip(*r["eval_curve"]), marker="o", label=label)
    ax_train.set(xlabel="fine-tuning step", ylabel="training loss (nats/byte)", title="Training loss")
    ax_eval.set(xlabel="fine-tuning step", ylabel="held-out loss (nats/byte)", title="Eval loss")
    ax_train.legend()
    ax_eval.legend()
    fig.suptitle("k2-tiny fine-tuned on held-out text: LoRA vs CE-LoRA (same rank)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_markdown(meta: dict, results: dict, error_curve: dict, path: Path) -> None:
    rows = "\n".join(
        f"| {label} | {r['final_eval_loss']:.4f} | {100 * r['relative_to_lora']:+.2f}% |"
        for label, r in results.items()
    )
    error_rows = "\n".join(
        f"| `{name}` | " + " | ".join(f"{e:.3f}" for e in errors) + " |" for name, errors in error_curve.items()
    )
    path.write_text(
        "# CE-LoRA against LoRA: fine-tuning the tiny spec\n\n"
        f"Made by `scripts/celora_finetune.py` on {meta['date']} ({meta['machine']}, torch {meta['torch']}).\n"
        f"Pretraining: {meta['pretrain_steps']} steps on the first 75% of the bundled corpus "
        f"(eval loss {meta['pretrain_eval_loss']:.4f}). Fine-tuning: {meta['finetune_steps']} steps on the last 25%, "
        f"rank {meta['rank']} everywhere, SVD rank {meta['svd_rank']}, critical channels refreshed every "
        f"{meta['refresh_every']} backward passes, AdamW lr {meta['lr']:g}, same seed and batches for every run.\n"
        f"Keep ratio applies to {', '.join(meta['approximated_sites'])}; "
        f"exact backward on {', '.join(meta['exact_sites'])}.\n\n"
        "| adapter | final eval loss | vs LoRA |\n|---|---|---|\n"
        f"{rows}\n\n![fine-tuning curves](celora_finetune.png)\n\n"
        "## Input-gradient error against the keep ratio\n\n"
        f"Relative error `||dX_CE - dY W|| / ||dY W||` of the base input gradient, SVD rank {meta['svd_rank']}, "
        "on the pretrained weights and the output gradients of one held-out batch (16 x 128 bytes).\n\n"
        "| site | " + " | ".join(f"{k:g}" for k in KEEP_RATIOS) + " |\n|---|" + "---|" * len(KEEP_RATIOS) + "\n"
        f"{error_rows}\n"
    )


if __name__ == "__main__":
    main()
