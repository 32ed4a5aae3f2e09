"""The LoRA / CE-LoRA linear on k2c's fused Triton kernels against PEFT and against a frozen linear.

T = 16384 tokens, r = 16, alpha = 32, bf16, at 7168 -> 2048 and 2048 -> 7168. A step is the forward and the
backward for dX, dA and dB from a fixed dY (X' = X: no dropout, PEFT's default). Anchors, timed in the same run:
PEFT eager and PEFT + torch.compile on the same frozen weights, and a frozen nn.Linear's forward + input
gradient, the floor for any adapter (W is frozen, so that is its two GEMMs and nothing else). CE-LoRA runs at keep
0.25 with SVD rank 14 and a random S (which channels are kept does not change the work). Targets: CE-LoRA at least
3x PEFT eager and 2.5x PEFT compiled; exact LoRA within 1.15x of the frozen linear (a speed of at least 0.87x).

Then each GEMM-sized piece alone against what torch does in its place, to show where the time goes.
"""

from __future__ import annotations

import math

import torch

from k2c.runtime.kernels import lora as K

TOKENS, RANK, ALPHA, KEEP, SVD_RANK = 16384, 16, 32, 0.25, 14
SHAPES = ((7168, 2048), (2048, 7168))  # (in, out)


def run(h) -> None:
    for n_in, n_out in SHAPES:
        compare(h, TOKENS, n_in, n_out, device="cuda", dtype=torch.bfloat16)


def compare(h, tokens: int, n_in: int, n_out: int, device: str, dtype: torch.dtype) -> None:
    """Check every variant against the references, then time it; one shape."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    scale = ALPHA / RANK
    base = torch.nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)
    peft_model = get_peft_model(torch.nn.Sequential(base), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"]))
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():  # PEFT starts B at zero, which would hide the adapter's share of dX and of Y
        peft_layer.lora_B["default"].weight.normal_(0, 0.02)
    compiled = torch.compile(peft_model)
    weight = base.weight.detach()
    # PEFT keeps its adapter in fp32 (autocast_adapter_dtype); k2c keeps it in the base weight's dtype
    lora_A = peft_layer.lora_A["default"].weight.detach().to(dtype, copy=True).requires_grad_()
    lora_B = peft_layer.lora_B["default"].weight.detach().to(dtype, copy=True).requires_grad_()
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n_out, device=device, dtype=dtype)

    # CE-LoRA's stand-in for W, as the runtime's DoubleLoRA builds it: B0 A0 from the rank-k SVD, R_S on a random S
    u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = sigma[:SVD_RANK].sqrt()
    svd_B, svd_A = (u[:, :SVD_RANK] * root).to(dtype), (root[:, None] * vh[:SVD_RANK]).to(dtype)
    kept = torch.randperm(n_out, device=device)[: math.ceil(KEEP * n_out)].sort().values
    kept_rows = weight[kept] - svd_B[kept] @ svd_A
    celora = (kept, kept_rows, svd_B, svd_A)

    leaves = (x, lora_A, lora_B, *peft_layer.lora_A.parameters(), *peft_layer.lora_B.parameters())

    def step(forward):
        def fwd_bwd():
            for t in leaves:
                t.grad = None
            forward(x).backward(dy)
        return fwd_bwd

    frozen = step(lambda x: torch.nn.functional.linear(x, weight))
    peft_eager, peft_compiled = step(peft_model), step(compiled)
    ours = step(lambda x: K.LoRALinearKernel.apply(x, x, weight, lora_A, lora_B, scale, None))
    ours_ce = step(lambda x: K.LoRALinearKernel.apply(x, x, weight, lora_A, lora_B, scale, celora))

    # checks: every output of ours against the fp32 references; PEFT's dX too, so the anchor does the same work
    with torch.no_grad():
        y_ref, xa_ref = K.lora_forward_reference(x, x, weight, lora_A, lora_B, scale)
        dx_ref = K.lora_input_grad_reference(dy, weight, lora_A, lora_B, scale)
        dx_ce_ref, sq_ref = K.celora_input_grad_reference(dy, *celora, lora_A, lora_B, scale, channel_norms=True)
        grad_a_ref, grad_b_ref = K.lora_weight_grads_reference(dy, x, xa_ref, lora_B, scale)
        y = K.LoRALinearKernel.apply(x, x, weight, lora_A, lora_B, scale)
        sq = K.celora_input_grad(dy, *celora, lora_A, lora_B, scale, channel_norms=True)[1]
    peft_eager()
    notes = {"peft": h.check("PEFT dX", x.grad, dx_ref)}
    for name, fn, want_dx in (("ours", ours, dx_ref), ("ours_ce", ours_ce, dx_ce_ref)):
        fn()
        notes[name] = "; ".join((h.check("Y", y, y_ref), h.check("dX", x.grad, want_dx),
                                 h.check("dA", lora_A.grad, grad_a_ref), h.check("dB", lora_B.grad, grad_b_ref)))
    notes["ours_ce"] += "; " + h.check("||dY[:, i]||^2", sq, sq_ref)

    work = f"LoRA r={RANK} fwd+bwd, T={tokens}, {n_in} -> {n_out}, {str(dtype).removeprefix('torch.')}"
    flops = 2 * (2 * tokens * n_in * n_out)  # the frozen base's forward GEMM and input-gradient GEMM
    t_frozen, t_eager, t_compiled = h.time(frozen), h.time(peft_eager), h.time(peft_compiled)
    t_ours, t_ce = h.time(ours), h.time(ours_ce)
    rows = [
        ("frozen nn.Linear fwd + input grad (anchor)", t_frozen, t_frozen, ""),
        ("PEFT eager (anchor)", t_eager, t_eager, notes["peft"]),
        ("PEFT + torch.compile", t_compiled, t_eager, ""),
        ("k2c LoRA, Triton (vs frozen linear; target >= 0.87x)", t_ours, t_frozen, notes["ours"]),
        ("k2c LoRA, Triton (vs PEFT eager)", t_ours, t_eager, ""),
        (f"k2c CE-LoRA keep {KEEP}, Triton (vs PEFT eager; target >= 3x)", t_ce, t_eager, notes["ours_ce"]),
        (f"k2c CE-LoRA keep {KEEP}, Triton (vs PEFT compiled; target >= 2.5x)", t_ce, t_compiled, ""),
    ]
    for variant, ms, anchor_ms, check in rows:
        record(h, work, variant, ms, anchor_ms, check, flops)

    # the pieces: each GEMM-sized product of ours against torch's way to the same result
    pieces = [
        ("forward: X' A^T, then X W^T (cuBLAS) + s XA B^T added in", "torch X W^T alone (cuBLAS)",
         lambda: K.lora_forward(x, x, weight, lora_A, lora_B, scale), lambda: x @ weight.T),
        ("exact dX: dY W + s dYB A in one GEMM, dY B given", "torch dY W alone (cuBLAS)",
         lambda: K.lora_input_grad(dy, weight, lora_A, lora_B, scale, dy_B=dy_B), lambda: dy @ weight),
        (f"CE-LoRA dX keep {KEEP}: thin pass, dY[:, S] copy, GEMM over S", "torch dY W alone (cuBLAS)",
         lambda: K.celora_input_grad(dy, *celora, lora_A, lora_B, scale), lambda: dy @ weight),
        (f"CE-LoRA dX keep {KEEP}: thin pass, dY[:, S] copy, GEMM over S",
         "torch: index_select copy of dY[:, S], then matmuls (the torch runtime's way)",
         lambda: K.celora_input_grad(dy, *celora, lora_A, lora_B, scale),
         lambda: ((dy @ svd_B) @ svd_A).addmm_(dy.index_select(1, kept), kept_rows)
         .addmm_(dy @ lora_B, lora_A, alpha=scale)),
    ]
    with torch.no_grad():
        dy_B = dy @ lora_B
        for variant, anchor, fn, torch_fn in pieces:
            record(h, f"{work}: one piece", f"{variant} (vs {anchor})", h.time(fn), h.time(torch_fn), "",
                   2 * tokens * n_in * n_out)
        # the r-wide products alone: Triton's pass against cuBLAS at the same width (LoRA sites take cuBLAS's)
        low = torch.cat((lora_B, svd_B), 1)
        thin = [
            ("X' A^T, Triton thin_matmul", lambda: K.thin_matmul(x, lora_A.T)[0], lambda: x @ lora_A.T, n_in, RANK),
            ("dY [B | B0], Triton thin_matmul", lambda: K.thin_matmul(dy, lora_B, v2=svd_B)[0], lambda: dy @ low,
             n_out, SVD_RANK + RANK),
        ]
        for variant, fn, torch_fn, k, r in thin:
            record(h, f"{work}: one piece", f"{variant} (vs torch's matmul, cuBLAS)", h.time(fn), h.time(torch_fn),
                   "", 2 * tokens * k * r)


def record(h, work: str, variant: str, ms: float, anchor_ms: float, check: str, flops: float) -> None:
    """h.row, and the row printed at once: a run cut short still shows what it measured."""
    h.row(work, variant, ms, anchor_ms, check, flops)
    print(f"{work} | {variant} | {ms:.3f} ms | {anchor_ms / ms:.2f}x | {check}", flush=True)
