"""One training step of a spec's model, k2c against transformers, on one GPU, in one run; and k2c's kernels against
its own torch path over a short training run.

    python benchmarks/bench_step.py [--spec specs/k2-1b.yaml] [--batch 8] [--seq 2048] [--only k2c,hf,...]

Steps (bf16, random token ids, labels = inputs; wall time over `--steps` steps after `--warmup`):
- k2c: the full MuonClip step (forward, backward, Muon + AdamW, QK-Clip), with the spec's kernels and with
  K2C_KERNELS=torch; LoRA r=16 and CE-LoRA keep 0.25 on every linear and the routed experts.
- k2c, CUDA graph: `k2c train`'s step (the above with gradient clipping, k2c.runtime.train.training_step) replayed
  from a CUDA graph (k2c.runtime.graph.CudaGraphStep), full, LoRA and CE-LoRA; first `--check-steps` steps of it
  and of the same step run eagerly, from the same weights, must give losses and weights that agree within bf16
  rounding (BF16_AGREEMENT), then both are timed (the eager time is in the row's note). `graph_standard` and
  `graph_gram`: the full step with the spec's Newton-Schulz set to that form, to compare the two in one run.
- anchors: transformers' DeepseekV3ForCausalLM (SDPA) built from k2c's config.json export, with torch.optim.Muon
  on its 2D hidden weights and AdamW on the rest; and with PEFT LoRA r=16 on the attention and dense/shared-expert
  linears (PEFT cannot target the fused 3D experts by module name).
Loss check: the spec's model trained `--loss-steps` steps on the bundled corpus with the kernels and with the torch
path, from the same weights and batches, against the gap between the torch path in bf16 and in fp32 (bf16 noise).

Writes benchmarks/results/<date>-<gpu>-step.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from k2c.codegen import build_package  # noqa: E402
from k2c.runtime import data as runtime_data  # noqa: E402
from k2c.runtime.graph import CudaGraphStep  # noqa: E402
from k2c.runtime.hf_config import hf_config  # noqa: E402
from k2c.runtime.packages import import_package  # noqa: E402
from k2c.runtime.train import training_step  # noqa: E402
from k2c.spec import Spec, load_spec  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16
LORA_TARGETS = ["attn.*", "mlp.*", "shared.*", "experts.*"]
BF16_AGREEMENT = 1e-2  # graphed against eager: |a - b| <= this x |b|, for the losses and each weight tensor


@dataclasses.dataclass
class Row:
    variant: str
    ms_per_step: float
    tokens_per_s: float
    peak_gib: float
    note: str = ""


def with_adapter(spec: Spec, kind: str, keep: float | None, name: str) -> Spec:
    doc = spec.model_dump(mode="json")
    doc["name"] = name
    targets = [{"match": m} if keep is None else {"match": m, "keep_ratio": keep} for m in LORA_TARGETS]
    doc["adapter"] = {"kind": kind, "rank": 16, "alpha": 32.0, "targets": targets}
    return Spec.model_validate(doc)


def package_of(spec: Spec, workdir: Path):
    build_package(spec, workdir / spec.name)
    return import_package(workdir / spec.name, f"bench_{spec.name}")


def timed(step: Callable[[], torch.Tensor], steps: int, warmup: int, reset: bool = True) -> tuple[float, float]:
    """(ms per step, peak GiB) over `steps` steps after `warmup`; the peak since the last reset of the peak stats if
    not `reset`."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    if reset:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    return ms, torch.cuda.max_memory_allocated() / 2**30


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def k2c_step(model, opt, ids: torch.Tensor):
    """One training step of a generated model on `ids`, returning its loss."""

    def step() -> torch.Tensor:
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def k2c_row(variant: str, package, ids: torch.Tensor, args, kernels: str | None = None) -> Row:
    if kernels is not None:
        os.environ["K2C_KERNELS"] = kernels
    try:
        torch.manual_seed(0)
        model = package.build_model(DEV, BF16)
        model.train()
        ms, peak = timed(k2c_step(model, package.build_optimizer(model), ids), args.steps, args.warmup)
    finally:
        os.environ.pop("K2C_KERNELS", None)
    return Row(variant, ms, ids.numel() / ms * 1e3, peak)


def checked_and_timed(package, batch: torch.Tensor, args, graphed: bool):
    """(losses of the first args.check_steps steps, the trainable weights after them, ms per step, peak GiB) of
    `k2c train`'s step on `batch` (labels = inputs) from seed 0's weights, eager or replayed from a CUDA graph.

    A replay allocates nothing: the step's memory was taken at capture into the graph's pool. So the peak is read
    over the whole variant, capture and the eager steps before it included."""
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = package.build_model(DEV, BF16)
    model.train()
    opt = package.build_optimizer(model)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = package.PLAN.optimizer.grad_clip or math.inf

    def eager(ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return training_step(model, opt, params, ids, labels, max_norm)

    graph = CudaGraphStep(eager, model, opt) if graphed else None
    step = graph or eager
    losses = torch.stack([step(batch, batch)["loss"] for _ in range(args.check_steps)])
    if graph is not None and graph.graph is None:
        raise RuntimeError(f"none of {args.check_steps} steps was captured: ask for more --check-steps")
    weights = [p.detach().clone() for p in params]
    ms, peak = timed(lambda: step(batch, batch)["loss"], args.steps, args.warmup, reset=False)
    return losses, weights, ms, peak


def graph_row(variant: str, package, ids: torch.Tensor, args) -> Row:
    """`k2c train`'s step replayed from a CUDA graph against the same step run eagerly, from the same weights:
    their first args.check_steps steps must agree (BF16_AGREEMENT) before either time counts.

    The kernels are autotuned by an eager run first, so that both runs use the same configs: a config changes the
    order of a product's sums, and a last-bit change in the gradients can move a channel across CE-LoRA's kept-set
    boundary, after which the two runs' updates differ by far more than rounding."""
    batch = ids[None]  # [micro-batches, batch, seq]: one micro-batch
    checked_and_timed(package, batch, args, graphed=False)
    release()
    eager_losses, eager_weights, eager_ms, _ = checked_and_timed(package, batch, args, graphed=False)
    release()
    losses, weights, ms, peak = checked_and_timed(package, batch, args, graphed=True)
    pairs = [("loss", losses, eager_losses), *(("weight", a, b) for a, b in zip(weights, eager_weights))]
    far = [name for name, a, b in pairs if (a.float() - b.float()).norm() > BF16_AGREEMENT * b.float().norm()]
    if far:
        raise AssertionError(f"the graphed step departs from the eager one in {args.check_steps} steps: {len(far)} "
                             f"of the loss and weights beyond {BF16_AGREEMENT:g} ({far[0]} first); losses "
                             f"{losses.tolist()} against {eager_losses.tolist()}")
    return Row(variant, ms, ids.numel() / ms * 1e3, peak,
               f"eager {eager_ms:.1f} ms for the same step; its first {args.check_steps} steps equal the eager "
               f"ones within {BF16_AGREEMENT:g}")


def hf_model(plan):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(**hf_config(plan), attn_implementation="sdpa")
    with torch.device(DEV):
        return DeepseekV3ForCausalLM(config).to(BF16)


def hf_full_row(plan, ids: torch.Tensor, args) -> Row:
    model = hf_model(plan)
    model.train()
    hidden = [p for n, p in model.named_parameters()
              if p.ndim == 2 and "embed_tokens" not in n and "lm_head" not in n and ".gate.weight" not in n]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    o = plan.optimizer
    muon = torch.optim.Muon(hidden, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, nesterov=o.nesterov,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=o.lr, betas=o.adamw_betas, eps=o.adamw_eps, weight_decay=o.weight_decay,
                              fused=True)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        muon.step()
        adamw.step()
        muon.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
        return loss

    ms, peak = timed(step, args.steps, args.warmup)
    return Row("transformers + torch.optim.Muon (2D) + AdamW (anchor)", ms, ids.numel() / ms * 1e3, peak,
               "3D fused experts on AdamW: torch.optim.Muon takes 2D matrices only")


def hf_lora_row(plan, ids: torch.Tensor, args) -> Row:
    from peft import LoraConfig, get_peft_model

    model = hf_model(plan)
    target = r".*\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj)|shared_experts\.(gate_proj|up_proj|down_proj))"  # noqa: E501
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=target))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=plan.optimizer.lr, fused=True)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    ms, peak = timed(step, args.steps, args.warmup)
    return Row("transformers + PEFT LoRA r16 (anchor)", ms, ids.numel() / ms * 1e3, peak,
               "attention and dense/shared linears; routed experts untouched")


def loss_curves(package, args) -> dict:
    """Losses of `--loss-steps` steps on the bundled corpus: kernels in bf16, torch in bf16, torch in fp32."""
    t = dataclasses.replace(package.PLAN.training, batch_size=args.loss_batch)
    train_tokens = runtime_data.load(t, package.CONFIG.vocab_size)[0].tokens
    curves = {}
    for label, kernels, dtype in (("kernels bf16", None, BF16), ("torch bf16", "torch", BF16),
                                  ("torch fp32", "torch", torch.float32)):
        if kernels is not None:
            os.environ["K2C_KERNELS"] = kernels
        try:
            torch.manual_seed(0)
            model = package.build_model(DEV, dtype)
            model.train()
            opt = package.build_optimizer(model)
            schedule = package.build_scheduler(opt)
            batches = torch.Generator().manual_seed(0)
            losses = []
            for _ in range(args.loss_steps):
                starts = torch.randint(len(train_tokens) - args.seq + 1, (args.loss_batch,), generator=batches)
                ids = runtime_data.windows(train_tokens.to(DEV), starts.to(DEV), args.seq)
                loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                schedule.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            curves[label] = losses
        finally:
            os.environ.pop("K2C_KERNELS", None)
        release()

    def gap(a: str, b: str) -> float:
        return max(abs(x - y) / abs(y) for x, y in zip(curves[a], curves[b]))

    return {"curves": curves, "kernels_vs_torch_bf16": gap("kernels bf16", "torch bf16"),
            "torch_bf16_vs_fp32": gap("torch bf16", "torch fp32")}


VARIANTS = ("k2c", "k2c_torch", "graph", "graph_standard", "graph_gram", "hf", "lora", "celora", "lora_graph",
            "celora_graph", "hf_lora", "loss")


def main() -> None:
    ap = argparse.ArgumentParser(description="One training step, k2c against transformers in the same run.")
    ap.add_argument("--spec", default=str(REPO / "specs" / "k2-1b.yaml"), help="the model (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8, help="sequences a step (default: %(default)s)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens a sequence (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--loss-steps", type=int, default=50, help="steps of the loss check (default: %(default)s)")
    ap.add_argument("--loss-batch", type=int, default=4, help="sequences a loss-check step (default: %(default)s)")
    # past CE-LoRA's two eager steps and the warm-up
    ap.add_argument("--check-steps", type=int, default=8,
                    help="graphed steps checked against eager ones (default: %(default)s)")
    ap.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants (default: all of them)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results folder (default: %(default)s)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    unknown = sorted(only - set(VARIANTS))
    if unknown:
        ap.error(f"--only: unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_step.py needs a CUDA GPU")
    spec = load_spec(Path(args.spec))
    ids = torch.randint(0, spec.model.vocab_size, (args.batch, args.seq), device=DEV,
                        generator=torch.Generator(DEV).manual_seed(0))
    rows: list[Row] = []
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = package_of(spec, work)
        plan = base.PLAN

        @functools.cache
        def adapted(kind: str) -> ModuleType:
            keep = 0.25 if kind == "ce_lora" else None
            return package_of(with_adapter(spec, kind, keep, f"bench_{kind.replace('_', '')}"), work)

        @functools.cache
        def in_form(form: str) -> ModuleType:
            """The spec with its Muon matrices' Newton-Schulz in `form` (group_params still keeps the Gram form to
            the matrices where it saves work)."""
            doc = spec.model_dump(mode="json")
            doc["name"] = f"bench_{form}"
            doc["optimizer"]["muon"]["newton_schulz"] = form
            return package_of(Spec.model_validate(doc), work)

        jobs: list[tuple[str, Callable[[], Row]]] = [
            ("hf", lambda: hf_full_row(plan, ids, args)),
            ("k2c", lambda: k2c_row("k2c MuonClip step, fused kernels", base, ids, args)),
            ("k2c_torch", lambda: k2c_row("k2c MuonClip step, torch path", base, ids, args, "torch")),
            ("graph", lambda: graph_row("k2c MuonClip step, CUDA graph", base, ids, args)),
            *((f"graph_{form}", lambda form=form: graph_row(f"k2c MuonClip step, CUDA graph, {form} Newton-Schulz",
                                                            in_form(form), ids, args))
              for form in ("standard", "gram")),
            ("hf_lora", lambda: hf_lora_row(plan, ids, args)),
            ("lora", lambda: k2c_row("k2c LoRA r16 (routed experts too)", adapted("lora"), ids, args)),
            ("celora", lambda: k2c_row("k2c CE-LoRA keep 0.25 (same sites)", adapted("ce_lora"), ids, args)),
            ("lora_graph", lambda: graph_row("k2c LoRA r16, CUDA graph", adapted("lora"), ids, args)),
            ("celora_graph", lambda: graph_row("k2c CE-LoRA keep 0.25, CUDA graph", adapted("ce_lora"), ids, args)),
        ]
        for key, job in jobs:
            if key in only:
                try:
                    rows.append(job())
                except Exception as err:  # one variant's failure must not hide the others' figures
                    rows.append(Row(key, math.nan, math.nan, math.nan, f"FAILED: {type(err).__name__}: {err}"))
                release()  # the variant's model and optimizer died with its function
                print(rows[-1], flush=True)
        if "loss" in only:
            result["loss_check"] = loss_curves(base, args)
            print({k: v for k, v in result["loss_check"].items() if k != "curves"}, flush=True)

    import transformers
    import triton

    gpu = torch.cuda.get_device_name()
    meta = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "spec": Path(args.spec).name, "batch": args.batch, "seq": args.seq,
            "timing": f"wall time over {args.steps} steps after {args.warmup} warm-up steps, bf16"}
    stem = f"{meta['date']}-{gpu.replace(' ', '-').lower()}-step"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows],
                                                  **result}, indent=1) + "\n")
    anchors = {"full": next((r for r in rows if r.variant.startswith("transformers + torch")), None),
               "lora": next((r for r in rows if r.variant.startswith("transformers + PEFT")), None)}
    lines = [f"# One training step, {meta['spec']}, {args.batch} x {args.seq} tokens, {gpu}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}; "
             f"{meta['timing']}. Speed is tokens/s over the anchor's in the same run (full steps against "
             "transformers + Muon, adapter steps against transformers + PEFT).", "",
             "| variant | ms/step | tokens/s | peak GiB | vs anchor | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        anchor = anchors["lora" if "LoRA" in r.variant else "full"]
        ratio = f"{r.tokens_per_s / anchor.tokens_per_s:.2f}x" if anchor and math.isfinite(r.tokens_per_s) else ""
        lines.append(f"| {r.variant} | {r.ms_per_step:.1f} | {r.tokens_per_s:,.0f} | {r.peak_gib:.1f} | {ratio} | "
                     f"{r.note} |")
    if "loss_check" in result:
        lc = result["loss_check"]
        lines += ["", f"Loss over {args.loss_steps} steps ({args.loss_batch} x {args.seq} tokens of the bundled "
                  f"corpus): largest relative gap kernels vs torch path (bf16) {lc['kernels_vs_torch_bf16']:.2e}; "
                  f"torch path bf16 vs fp32 (bf16 noise) {lc['torch_bf16_vs_fp32']:.2e}; final losses "
                  + ", ".join(f"{k} {v[-1]:.4f}" for k, v in lc["curves"].items()) + "."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
