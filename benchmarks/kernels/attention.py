"""Causal attention fwd+bwd that also returns the per-head max logit (QK-Clip's input), bf16, B=4, H=16, S=4096.

At MLA head dims (qk 192 = 128 + 64, v 128) and at d=128. The anchor is PyTorch SDPA without the max logit (the
backend its dispatcher picks; the others that run are timed too); beside it SDPA plus the max logit from
materialised scores (matmul and amax, a head at a time), and FlexAttention compiled with
`AuxRequest(max_scores=True)`. The target: at most 1.15x SDPA's time at MLA dims.

Our kernel is checked against the reference in fp32 at batch 1 (the reference materialises [b, h, s, s] fp32
scores), with a per-head scale; the anchors' outputs and max logits are checked against ours at full size. FLOPs
count the causal half, S^2 / 2 pairs a head: forward q k^T and p v, backward q k^T again, dO v^T, p^T dO, dS k and
dS^T q, i.e. (8 dqk + 6 dv) per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import Harness, MismatchError
from torch.nn.attention import SDPBackend, sdpa_kernel

from k2c.runtime.kernels import attention as kernel

try:
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
except ImportError as missing:  # older torch: FlexAttention's row says so
    FLEX_MISSING = f"unavailable: {missing}"
else:
    FLEX_MISSING = ""

DEV = torch.device("cuda")
DTYPE = torch.bfloat16
BATCH, HEADS, SEQ = 4, 16, 4096
SHAPES = [("MLA qk 192 / v 128", 192, 128), ("d 128", 128, 128)]
SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def leaves(batch: int, dqk: int, dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.randn(batch, HEADS, SEQ, d, device=DEV, dtype=DTYPE, requires_grad=True)
                 for d in (dqk, dqk, dv))


def fwd_bwd(attend, inputs, dout):
    """attend(q, k, v) -> (out, max_logit or None); a step that runs it and the input gradients."""
    def step():
        out, max_logit = attend(*inputs)
        return out, max_logit, *torch.autograd.grad(out, inputs, dout)

    return step


def tuned(fn) -> str:
    cfg = fn.best_config
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def print_tuning(work: str) -> None:
    """The autotuner's time for every candidate, for choosing the next candidates."""
    for name in ("_attn_fwd_tuned", "_attn_bwd_dq_tuned", "_attn_bwd_dkdv_tuned"):
        timings = getattr(getattr(kernel, name), "configs_timings", None) or {}
        print(f"{work}: {name}: " + ", ".join(
            f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}: "
            f"{t[0] if isinstance(t, list) else t:.3f}" for c, t in timings.items()), flush=True)


def check_ours(h: Harness, work: str, dqk: int, dv: int, scale: float) -> str:
    """Ours in bf16 against the reference on fp32 copies of the same inputs, at batch 1, with a head scale."""
    inputs = leaves(1, dqk, dv)
    head_scale = torch.rand(HEADS, device=DEV) * 0.5 + 0.5
    dout = torch.randn(1, HEADS, SEQ, dv, device=DEV, dtype=DTYPE)
    got = fwd_bwd(lambda q, k, v: kernel.attention(q, k, v, scale, head_scale), inputs, dout)()
    exact = tuple(x.detach().float().requires_grad_() for x in inputs)
    want = fwd_bwd(lambda q, k, v: kernel.attention_reference(q, k, v, scale, head_scale), exact, dout.float())()
    try:
        return "; ".join(h.check(name, g, w, dtype=torch.float32 if name == "max_logit" else DTYPE)
                         for name, g, w in zip(("out", "max_logit", "dq", "dk", "dv"), got, want, strict=True))
    except MismatchError as err:
        raise MismatchError(f"{work}: {err}") from None


def max_logit_materialised(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """What QK-Clip does without a fused kernel: the scores of one head at a time, masked, then amax."""
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool, device=DEV).tril()
    with torch.no_grad():
        return torch.stack([((q[:, i] @ k[:, i].transpose(-2, -1)) * scale).masked_fill_(~causal, -torch.inf).amax()
                            for i in range(HEADS)]).float()


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def sdpa_default_backend(q, k, v, scale) -> str:
    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=scale)).name
    except (AttributeError, RuntimeError, TypeError, ValueError) as err:
        return f"unknown ({type(err).__name__})"


def flex_step(inputs, dout, scale):
    """FlexAttention, compiled, returning each row's max score; None and the reason where it is unavailable."""
    if FLEX_MISSING:
        return None, FLEX_MISSING
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, SEQ, SEQ, device=DEV)
    flex = torch.compile(flex_attention)

    def attend(q, k, v):
        out, aux = flex(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(max_scores=True))
        return out, aux.max_scores.amax(dim=(0, 2)).float()

    step = fwd_bwd(attend, inputs, dout)
    try:
        step()
    except Exception as err:  # noqa: BLE001  an anchor that cannot run on this torch is a note, not a failure
        return None, f"unavailable: {type(err).__name__}: {str(err)[:200]}"
    return step, ""


def bench_shape(h: Harness, shape: str, dqk: int, dv: int) -> None:
    work = f"causal attention fwd+bwd, B={BATCH} H={HEADS} S={SEQ}, {shape}, bf16"
    scale = dqk ** -0.5
    pairs = BATCH * HEADS * SEQ * SEQ / 2
    flops, fwd_flops = pairs * (8 * dqk + 6 * dv), pairs * 2 * (dqk + dv)
    first = len(h.rows)
    inputs = leaves(BATCH, dqk, dv)
    dout = torch.randn(BATCH, HEADS, SEQ, dv, device=DEV, dtype=DTYPE)
    ours = fwd_bwd(lambda q, k, v: kernel.attention(q, k, v, scale), inputs, dout)
    out, max_logit = ours()[:2]  # the autotuner picks its configs at these shapes, then the check runs them
    print_tuning(shape)
    check = check_ours(h, work, dqk, dv, scale)
    ours_ms = h.time(ours)

    backend = sdpa_default_backend(*inputs, scale)
    plain = fwd_bwd(lambda q, k, v: (sdpa(q, k, v, scale), None), inputs, dout)
    anchor_ms = h.time(plain)
    h.row(work, f"SDPA, default dispatch ({backend}), no max logit (anchor)", anchor_ms, anchor_ms,
          h.check("out vs ours", sdpa(*inputs, scale), out), flops)
    h.row(work, f"k2c Triton, with max logit (fwd {tuned(kernel._attn_fwd_tuned)}, dq "
          f"{tuned(kernel._attn_bwd_dq_tuned)}, dkdv {tuned(kernel._attn_bwd_dkdv_tuned)})", ours_ms, anchor_ms,
          check, flops)
    for forced in SDPA_BACKENDS:
        with sdpa_kernel(forced):
            try:
                plain()
            except RuntimeError:
                continue  # this backend does not take these shapes
            h.row(work, f"SDPA forced to {forced.name}, no max logit", h.time(plain), anchor_ms, "", flops)

    materialised = fwd_bwd(lambda q, k, v: (sdpa(q, k, v, scale), max_logit_materialised(q, k, scale)),
                           inputs, dout)
    h.row(work, "SDPA + max logit from materialised scores (matmul + amax a head at a time)",
          h.time(materialised), anchor_ms, h.check("max_logit vs ours", materialised()[1], max_logit, DTYPE), flops)

    flex, note = flex_step(inputs, dout, scale)
    if flex is None:
        h.row(work, f"FlexAttention compiled + max scores ({note})", float("nan"), anchor_ms)
    else:
        h.row(work, "FlexAttention compiled + AuxRequest(max_scores=True)", h.time(flex), anchor_ms,
              h.check("max_logit vs ours", flex()[1], max_logit, DTYPE), flops)

    fwd_work = f"causal attention forward only, B={BATCH} H={HEADS} S={SEQ}, {shape}, bf16"
    fwd_anchor_ms = h.time(lambda: sdpa(*inputs, scale))
    h.row(fwd_work, "SDPA, default dispatch, no max logit (anchor)", fwd_anchor_ms, fwd_anchor_ms, "", fwd_flops)
    h.row(fwd_work, "k2c Triton, with max logit", h.time(lambda: kernel.attention(*inputs, scale)), fwd_anchor_ms,
          "", fwd_flops)
    print(f"{shape}: ours timed again, last: {h.time(ours):.3f} ms (first {ours_ms:.3f})")
    for row in h.rows[first:]:  # as they come: a run cut short still shows what it measured
        print(f"{row.work} | {row.variant} | {row.ms:.3f} ms | {row.speedup:.2f}x", flush=True)


def run(h: Harness) -> None:
    torch.manual_seed(0)
    for shape, dqk, dv in SHAPES:
        bench_shape(h, shape, dqk, dv)
        torch.cuda.empty_cache()
