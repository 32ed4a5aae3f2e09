"""MLA's causal attention fwd+bwd from its projections, with the per-head max logit (QK-Clip's input), bf16.

At k2-1b's step shape: b=8, t=2048, h=16, dn=128, dr=64 (interleaved pairs, as every shipped spec), dv=128. Each
variant starts from the q projection [b, t, h*(dn+dr)], the rotary key (a slice of kv_a [b, t, 256+dr]) and kv_b's
output [b, t, h*(dn+dv)], and ends with out [b, t, h*dv] and the three inputs' gradients, as the model runs it. The
anchor is what transformers does: RoPE and the q/k/v layout in eager torch, then PyTorch SDPA without the max
logit (the backend its dispatcher picks; the others that run are timed too). Beside it: SDPA plus the max logit
from materialised scores (matmul and amax, a head at a time), and FlexAttention compiled with
`AuxRequest(max_scores=True)`.

Ours is checked against the reference in fp32 at batch 1 (the reference materialises [b, h, t, t] fp32 scores),
with a per-head scale; the anchors' outputs and max logits are checked against ours at full size. FLOPs count the
causal half, t^2 / 2 pairs a head: forward q k^T and p v, backward q k^T again, dO v^T, p^T dO, dS k and dS^T q,
i.e. (8 dqk + 6 dv) per pair.
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
BATCH, SEQ, HEADS, DN, DR, DV, LATENT = 8, 2048, 16, 128, 64, 128, 256
SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
NAMES = ("out", "max_logit", "dq", "dkv_a", "dkv")


def leaves(batch: int) -> list[torch.Tensor]:
    """The q projection, kv_a and kv_b's output."""
    return [torch.randn(batch, SEQ, d, device=DEV, dtype=DTYPE, requires_grad=True)
            for d in (HEADS * (DN + DR), LATENT + DR, HEADS * (DN + DV))]


def tables(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(SEQ, device=DEV, dtype=torch.float32)
    angles = positions[:, None] * 50000.0 ** (-torch.arange(0, DR, 2, device=DEV) / DR)  # [seq, dr/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def fwd_bwd(attend, inputs, dout):
    """attend(q, k_rot, kv) -> (out, max_logit or None); a step that runs it and the input gradients."""
    def step():
        q, kv_a, kv = inputs
        out, max_logit = attend(q, kv_a[..., LATENT:], kv)
        return out, max_logit, *torch.autograd.grad(out, inputs, dout)

    return step


def laid_out(attend, scale: float):
    """attend(q, k, v) on q, k, v [b, h, t, d] laid out by eager torch, as transformers does, merged back after."""
    cos, sin = tables(DTYPE)

    def run(q, k_rot, kv):
        out, max_logit = attend(*kernel.attention_inputs_reference(q, k_rot, kv, cos, sin, HEADS, True), scale)
        return out.transpose(1, 2).reshape(q.shape[0], SEQ, -1), max_logit

    return run


def tuned(fn) -> str:
    cfg = fn.best_config
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def check_ours(h: Harness, work: str, scale: float) -> str:
    """Ours in bf16 against the reference on fp32 copies of the same inputs, at batch 1, with a head scale. All at
    bf16's tolerance, the max logit too: ours rounds the rotated dims to bf16, as the model's torch path does."""
    inputs = leaves(1)
    head_scale = torch.rand(HEADS, device=DEV) * 0.5 + 0.5
    dout = torch.randn(1, SEQ, HEADS * DV, device=DEV, dtype=DTYPE)
    cos, sin = tables(DTYPE)
    got = fwd_bwd(lambda *x: kernel.attention(*x, cos, sin, HEADS, True, scale, head_scale), inputs, dout)()
    exact = [x.detach().float().requires_grad_() for x in inputs]
    want = fwd_bwd(lambda *x: kernel.attention_reference(*x, cos.float(), sin.float(), HEADS, True, scale,
                                                         head_scale), exact, dout.float())()
    try:
        return "; ".join(h.check(name, g, w, dtype=DTYPE) for name, g, w in zip(NAMES, got, want, strict=True))
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


def sdpa_default_backend(scale: float) -> str:
    q, k, v = (torch.empty(1, HEADS, SEQ, d, device=DEV, dtype=DTYPE) for d in (DN + DR, DN + DR, DV))
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

    def attend(q, k, v, scale):
        out, aux = flex(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(max_scores=True))
        return out, aux.max_scores.amax(dim=(0, 2)).float()

    step = fwd_bwd(laid_out(attend, scale), inputs, dout)
    try:
        step()
    except Exception as err:  # noqa: BLE001  an anchor that cannot run on this torch is a note, not a failure
        return None, f"unavailable: {type(err).__name__}: {str(err)[:200]}"
    return step, ""


def run(h: Harness) -> None:
    torch.manual_seed(0)
    work = (f"MLA causal attention fwd+bwd from the projections (RoPE included), b={BATCH} t={SEQ} h={HEADS} "
            f"dn={DN} dr={DR} dv={DV}, bf16")
    scale = (DN + DR) ** -0.5
    pairs = BATCH * HEADS * SEQ * SEQ / 2
    flops = pairs * (8 * (DN + DR) + 6 * DV)
    inputs = leaves(BATCH)
    dout = torch.randn(BATCH, SEQ, HEADS * DV, device=DEV, dtype=DTYPE)
    cos, sin = tables(DTYPE)
    ours = fwd_bwd(lambda *x: kernel.attention(*x, cos, sin, HEADS, True, scale), inputs, dout)
    out, max_logit = ours()[:2]  # the autotuner picks its configs at these shapes, then the check runs them
    check = check_ours(h, work, scale)
    ours_ms = h.time(ours)

    plain = fwd_bwd(laid_out(lambda q, k, v, s: (sdpa(q, k, v, s), None), scale), inputs, dout)
    anchor_ms = h.time(plain)
    h.row(work, f"eager RoPE and layout + SDPA, default dispatch ({sdpa_default_backend(scale)}), no max logit "
          "(anchor)", anchor_ms, anchor_ms, h.check("out vs ours", plain()[0], out), flops)
    h.row(work, f"k2c Triton, with max logit (fwd {tuned(kernel._attn_fwd_tuned)}, dq "
          f"{tuned(kernel._attn_bwd_dq_tuned)}, dkdv {tuned(kernel._attn_bwd_dkdv_tuned)})", ours_ms, anchor_ms,
          check, flops)
    for forced in SDPA_BACKENDS:
        with sdpa_kernel(forced):
            try:
                plain()
            except RuntimeError:
                continue  # this backend does not take these shapes
            h.row(work, f"eager RoPE and layout + SDPA forced to {forced.name}, no max logit", h.time(plain),
                  anchor_ms, "", flops)

    materialised = fwd_bwd(laid_out(lambda q, k, v, s: (sdpa(q, k, v, s), max_logit_materialised(q, k, s)), scale),
                           inputs, dout)
    h.row(work, "eager RoPE and layout + SDPA + max logit from materialised scores (a head at a time)",
          h.time(materialised), anchor_ms, h.check("max_logit vs ours", materialised()[1], max_logit, DTYPE), flops)

    flex, note = flex_step(inputs, dout, scale)
    if flex is None:
        h.row(work, f"FlexAttention compiled + max scores ({note})", float("nan"), anchor_ms)
    else:
        h.row(work, "eager RoPE and layout + FlexAttention compiled + AuxRequest(max_scores=True)", h.time(flex),
              anchor_ms, h.check("max_logit vs ours", flex()[1], max_logit, DTYPE), flops)
    for row in h.rows:  # as they come: a run cut short still shows what it measured
        print(f"{row.work} | {row.variant} | {row.ms:.3f} ms | {row.speedup:.2f}x", flush=True)
