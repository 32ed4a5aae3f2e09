"""Time k2c's generated MuonClip and LoRA / CE-LoRA linears against their anchors, on one GPU, in one run.

Anchors (shared reference, anchors.md): `torch.optim.Muon` over the expert matrices of one Moonlight MoE layer,
and PEFT's LoRA (eager and torch.compile) on a frozen 7168 -> 2048 linear over 16384 tokens, bf16.
Every variant is checked against its reference before it is timed. Medians of `triton.testing.do_bench`.
Writes benchmarks/results/<date>-<gpu>.{json,md}.

    python benchmarks/bench_gpu.py
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from k2c.runtime import adapters, optim  # noqa: E402
from k2c.runtime.packages import import_package  # noqa: E402
from k2c.runtime.plan import AdapterPlan, AdapterSite  # noqa: E402

g = import_package(REPO / "generated" / "k2_tiny", "k2_tiny")  # its optimizer settings, changed below
DEV = torch.device("cuda")


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


# --------------------------------------------------------------------------- Muon on one MoE layer's experts


class Experts(torch.nn.Module):
    """Moonlight's routed experts of one layer, stacked as k2c stores them: [64, 1408, 2048] x 2 and [64, 2048, 1408].

    fp32 master weights, as mixed-precision training keeps them (in bf16 weights most of a 2e-4 update rounds
    away, and the two optimizers could not be compared); both run Newton-Schulz in bf16.
    """

    def __init__(self):
        super().__init__()
        e, i, h = 64, 1408, 2048
        self.gate_proj = torch.nn.Parameter(torch.randn(e, i, h, device=DEV) * 0.02)
        self.up_proj = torch.nn.Parameter(torch.randn(e, i, h, device=DEV) * 0.02)
        self.down_proj = torch.nn.Parameter(torch.randn(e, h, i, device=DEV) * 0.02)

    # what MuonClip asks of its model after the update: no router, no attention here
    def moe_layers(self):
        return {}

    def attentions(self):
        return []

    def step_max_logits(self):
        return torch.full((1, 1), -torch.inf, device=DEV)

    def reset_step_stats(self):
        pass


def muon_rows() -> list[dict]:
    # the anchor's settings: constant lr 2e-4, weight decay 0.1; no attention here, so no QK-Clip
    plan = dataclasses.replace(g.PLAN.optimizer, lr=2e-4, warmup_steps=0, decay="constant", weight_decay=0.1)
    torch.manual_seed(0)
    ours_model = Experts()
    grads = {n: torch.randn_like(p) for n, p in ours_model.named_parameters()}
    for n, p in ours_model.named_parameters():
        p.grad = grads[n]
    ours = optim.MuonClip(ours_model, [{"params": list(ours_model.named_parameters()), "kind": "muon",
                                        "weight_decay": 0.1}], plan)
    # the anchor: the same 192 matrices as 2D parameters, one at a time
    flat = [torch.nn.Parameter(p.detach()[e].clone()) for p in ours_model.parameters() for e in range(64)]
    for p, grad in zip(flat, (grads[n][e] for n in grads for e in range(64))):
        p.grad = grad.clone()
    anchor = torch.optim.Muon(flat, lr=2e-4, weight_decay=0.1, momentum=0.95, nesterov=True,
                              adjust_lr_fn="match_rms_adamw")

    # check before timing: one step of each from the same weights and gradients agrees per matrix
    before = [p.detach().clone() for p in flat]
    ours.step()
    anchor.step()
    ours_after = [p.detach()[e] for p in ours_model.parameters() for e in range(64)]
    worst = max(((a.float() - b.float()).norm() / (b.float() - w.float()).norm()).item()
                for a, b, w in zip(ours_after, flat, before))
    assert worst < 0.1, f"MuonClip and torch.optim.Muon disagree: relative update difference {worst:.3f}"

    flops = 192 * 5 * (4 * 1408**2 * 2048 + 2 * 1408**3)  # Newton-Schulz, Gram on the short side
    t_anchor, t_ours = bench(anchor.step), bench(ours.step)
    return [
        {"work": "Muon step, 192 expert matrices 1408x2048 (one Moonlight MoE layer), fp32 weights, bf16 Newton-Schulz",
         "variant": "torch.optim.Muon (anchor)", "ms": t_anchor, "tflops": flops / t_anchor / 1e9, "vs_anchor": 1.0},
        {"work": "same", "variant": "k2c MuonClip (stacked experts, one batched Newton-Schulz)", "ms": t_ours,
         "tflops": flops / t_ours / 1e9, "vs_anchor": t_anchor / t_ours,
         "check": f"update within {worst:.3f} relative of the anchor's, per matrix (bf16 Newton-Schulz in both)"},
    ]


# --------------------------------------------------------------------------- LoRA / CE-LoRA linear


def lora_rows(tokens: int = 16384, n_in: int = 7168, n_out: int = 2048, rank: int = 16) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Linear(n_in, n_out, bias=False, device=DEV, dtype=torch.bfloat16)
    x = torch.randn(tokens, n_in, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, n_out, device=DEV, dtype=torch.bfloat16)

    holder = torch.nn.Sequential(base)
    peft_model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]))
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.02)
    compiled = torch.compile(peft_model)

    def ours(keep: float):
        kind = "ce_lora" if keep < 1 else "lora"
        site = AdapterSite("bench", None, kind, rank=rank, alpha=2.0 * rank, keep_ratio=keep,
                           svd_rank=7 * rank // 8 if keep < 1 else 0)
        plan = AdapterPlan(kind=kind, rank=rank, alpha=2.0 * rank, rslora=False, dropout=0.0, refresh_every=200,
                           sites=(site,))
        layer = adapters.LoRALinear(torch.nn.Linear(n_in, n_out, bias=False, device=DEV, dtype=torch.bfloat16),
                                    site, plan)
        with torch.no_grad():
            layer.weight.copy_(base.weight)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
        return layer

    def step(module):
        def run():
            x.grad = None
            module(x).backward(dy)
        return run

    def grads(module):
        step(module)()
        return x.grad.float().clone()

    reference = grads(peft_model)
    flops = 2 * (2 * tokens * n_in * n_out)  # forward GEMM and input-gradient GEMM of the frozen base
    t_eager, t_compiled = bench(step(peft_model)), bench(step(compiled))
    rows = [
        {"work": f"LoRA r={rank} fwd+bwd, T={tokens}, {n_in} -> {n_out}, bf16", "variant": "PEFT eager (anchor)",
         "ms": t_eager, "tflops": flops / t_eager / 1e9, "vs_anchor": 1.0},
        {"work": "same", "variant": "PEFT + torch.compile", "ms": t_compiled, "tflops": flops / t_compiled / 1e9,
         "vs_anchor": t_eager / t_compiled},
    ]
    for keep in (1.0, 0.5, 0.25):
        layer = ours(keep)
        error = ((grads(layer) - reference).norm() / reference.norm()).item()
        if keep == 1.0:
            assert error < 1e-2, f"k2c LoRA input gradient differs from PEFT's by {error:.3g}"
        t = bench(step(layer))
        rows.append({"work": "same", "variant": f"k2c {'LoRA' if keep == 1 else f'CE-LoRA keep {keep}'}",
                     "ms": t, "tflops": flops / t / 1e9, "vs_anchor": t_eager / t,
                     "check": f"input-gradient relative difference from PEFT's exact one: {error:.3g}"
                              + ("" if keep == 1 else " (random W: a flat spectrum, CE-LoRA's worst case)")})
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    rows = muon_rows() + lora_rows()
    gpu = torch.cuda.get_device_name()
    meta = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "timing": "median of triton.testing.do_bench (warmup 25 ms, rep 200 ms)"}
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date']}-{gpu.replace(' ', '-').lower()}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# k2c on {gpu}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; {meta['timing']}. Ratios are against the anchor "
             "measured in the same run.", "",
             "TFLOP/s counts the dense work of the task (CE-LoRA's rows: the FLOPs it avoids count as done).", "",
             "| work | variant | ms | TFLOP/s | speed vs anchor | check |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['work']} | {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['vs_anchor']:.2f}x | "
              f"{r.get('check', '')} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
