"""The MoE layer's router and routed experts as Triton kernels: dropless, no host synchronisation, no atomics on floats.

The torch reference is the model's own path (`Router`, `Experts.project`, `MoE.combine` in k2c/runtime/model.py,
`ExpertLoRAFunction` in adapters.py): it splits the rows by a host copy of the expert counts, so every MoE layer
waits for the GPU, and it runs one small GEMM per expert. Here the counts stay on the device:

- `route`: the router's epilogue after the fp32 GEMM x W^T (`router_logits`, on the LoRA kernels' thin GEMM, which
  reads x in its own dtype; a bf16 x meets W as exact products of W's bf16 parts): sigmoid, the correction bias for
  the choice only, the group-limited top-k, the combine weights from the unbiased scores (normalised over the k when
  the plan says, times routed_scaling) and the tokens per expert, in one pass over the logits. Its backward gives
  the logits' gradient, from which `router_logits` gives the input's (rounded once to x's dtype) and the router
  weight's.
- Rows are grouped by expert with a stable argsort (torch, on the device); expert e owns rows offsets[e] to
  offsets[e+1]. A grouped GEMM launches a grid sized from host-known bounds (at most cdiv(N*k, BLOCK_M) + E row
  tiles, since each expert's last tile may be partial) and each program finds its expert and rows from the offsets:
  a cumulative sum over the E experts' tile counts. Programs past the last tile return at once. No padding of the
  activations to a capacity, no tokens dropped.
- `grouped_linear`: one projection of the expert stack on rows already grouped by expert (the generated wiring's
  `project`), with the adapter inside: the forward adds s (X' A^T) B^T to the GEMM's accumulator; the backward's
  input gradient adds s (dY B) A the same way, or is CE-LoRA's dY[:, S] R_S + (dY B0) A0 with the kept channels
  S packed per expert (`pack_columns`) and the low-rank terms folded into the GEMM's epilogue.
- `swiglu_experts`: the whole routed MLP, `down(silu(gate(x)) * up(x))` per expert, weighted and put back in
  (token, slot) order, as one autograd Function: the gate/up GEMM reads each row's token from x directly (no
  permuted copy of x), runs both products on one load of x and applies SwiGLU in its epilogue; the down GEMM
  multiplies by the combine weight and stores each row at its (token, slot) position. The backward mirrors it: the
  down input-gradient GEMM gathers the output gradient by token, and its epilogue applies the combine weight, the
  SwiGLU backward and the combine weight's gradient (dw = act . (dOut W_down), summed per column tile, no atomics);
  the gate/up input-gradient GEMM runs both products into one accumulator and stores each row at its (token, slot)
  position. LoRA rides in the same kernels, and so does CE-LoRA: an input-gradient GEMM runs over each expert's
  kept channels (packed per expert; for down, gathered by token and weighted as dY is), with the SVD pair's
  (dY B0) A0 in the epilogue beside the adapter's term. Under CE-LoRA on down the forward also keeps the rows before
  their weight, y, so that the combine weight's gradient dOut . y stays exact. The k rows of a token are summed in
  slot order, with the shared experts' output, by `combine_slots` (forward) and `slot_sum` (the input gradient).
- W's tiles: the grouped GEMM's wide tiles load them by pointer loads or, where W is addressable
  (`descriptor_order`), by tensor descriptor, each tile shape both ways; the autotuner keeps the faster. The gate/up
  GEMM and the down backward load W by pointers: on an H200 their autotuners never chose the descriptor path
  (`-kernels-moe-breakdown.md` in benchmarks/results).
- Weight gradients: `grouped_weight_grad` gives dW[e] = P_e^T Q_e over expert e's rows (a program per output tile
  per expert, looping over that expert's rows), reading gathered or weighted rows in place. A full weight's
  gradient in bf16 on Hopper goes to cuBLAS's grouped GEMM instead, on rows first copied into expert order
  (`gather_rows`), which together took less time than the kernel's gathering loads.

Determinism: every output element is written by one program, summing in a fixed order; the only atomics are the
router's integer counts, exact in any order. So a step gives the same bits on every run, as the torch path does.

Numerics: products accumulate in fp32 and round once to the output's dtype, as torch's matmuls do; the SwiGLU and
combine-weight epilogues round where the reference rounds (silu(gate), the expert output before its weight, the
activations' gradient). fp32 operands multiply in full precision (`input_precision="ieee"`), not tf32.

Offsets, row indices and every pointer offset that scales with the rows are int64: N*k*H passes 2**31 at real
sizes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from k2c.runtime.kernels import lora as lora_kernel
from k2c.runtime.kernels.tiles import addressable, column_halves, descriptor_scratch
from k2c.runtime.kernels.tuning import autotune

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Under TRITON_INTERPRET=1 (the CPU tests) one small config runs and nothing is timed; read at import, as Triton
# reads it. Its 16-wide tiles make the tests' small shapes cross every tile edge.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
# Column tile of the down-projection backward: fixed, not tuned, because the combine weight's gradient is summed
# over a [rows, column tiles] buffer whose width the launch must know.
DOWN_BACKWARD_BLOCK_N = 16 if INTERPRETED else 128


def _configs(gpu: list[tuple[int, int, int, int, int]], **fixed) -> list[triton.Config]:
    """Autotuning candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on a GPU; one small one under the
    interpreter, where every program runs in numpy. `fixed`: further meta-parameters, the same in every one."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, **fixed})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, **fixed}, num_warps=w,
                          num_stages=s) for m, n, k, w, s in gpu]


# bf16 on Hopper: 128-row tiles feed wgmma; 128 x 256 keeps two warpgroups busy on the wide products. The thin ones
# (N <= 64: X A^T, dY B, the LoRA rank) stream their A operand once and are memory-bound: narrow tiles, deep K.
WIDE = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3),
        (64, 128, 64, 4, 4)]
THIN = [(64, 16, 128, 4, 4), (128, 16, 128, 4, 4), (64, 32, 128, 4, 4), (128, 32, 64, 4, 4), (64, 64, 64, 4, 4)]
# two accumulators (gate and up) of BLOCK_M x BLOCK_N each
GATE_UP = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
DOWN_BACKWARD = [(128, DOWN_BACKWARD_BLOCK_N, 64, 8, 3), (128, DOWN_BACKWARD_BLOCK_N, 64, 8, 4),
                 (128, DOWN_BACKWARD_BLOCK_N, 64, 8, 5), (64, DOWN_BACKWARD_BLOCK_N, 64, 4, 4)]
# dW[e] = P_e^T Q_e: a reduction over the ~N*k/E rows of one expert per output tile, whose loads (P transposed,
# rows gathered) gain from a deep pipeline: 5 stages took 0.88x the time of 3 for k2-1b's experts on an H200; the
# thin ones for the LoRA factors' gradients ([r, in] and [out, r])
WEIGHT_GRAD = [(128, 128, 64, 8, 5), (128, 128, 32, 4, 5), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
               (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)]
WEIGHT_GRAD_THIN = [(16, 128, 64, 4, 4), (32, 128, 64, 4, 4), (16, 64, 128, 4, 4), (128, 16, 64, 4, 4),
                    (128, 32, 64, 4, 4), (64, 16, 128, 4, 4), (64, 64, 64, 4, 4)]


def _prune_by_width(configs, named_args, **kwargs):
    """The thin candidates, cut to tiles that fit N, for N <= 64; the wide ones otherwise."""
    if INTERPRETED:
        return configs
    n = max(16, triton.next_power_of_2(named_args["N"]))
    kept = [c for c in configs if (c.kwargs["BLOCK_N"] <= 64) == (n <= 64) and c.kwargs["BLOCK_N"] <= n]
    return kept or configs


WEIGHT_GRAD_CONFIGS = _configs(WEIGHT_GRAD)
WEIGHT_GRAD_THIN_CONFIGS = [] if INTERPRETED else _configs(WEIGHT_GRAD_THIN)  # the interpreter's one config will do


WEIGHT_GRAD_THIN_SIDE = 64  # a side of dW at most this wide is a LoRA rank's


def _prune_weight_grad(configs, named_args, **kwargs):
    """The thin candidates when a side of dW is a LoRA rank's, cut to tiles that fit it; else the wide."""
    if INTERPRETED:
        return configs
    mo, no = (max(16, triton.next_power_of_2(named_args[dim])) for dim in ("MO", "NO"))
    pool = {id(c) for c in (WEIGHT_GRAD_THIN_CONFIGS if min(mo, no) <= WEIGHT_GRAD_THIN_SIDE else WEIGHT_GRAD_CONFIGS)}
    kept = [c for c in configs if id(c) in pool and c.kwargs["BLOCK_M"] <= mo and c.kwargs["BLOCK_N"] <= no]
    return kept or configs


# --------------------------------------------------------------------------- router


@triton.jit
def _route_kernel(
    logits_ptr,  # [N, E] fp32, contiguous: x W^T
    bias_ptr,  # [E] fp32: the correction bias, which steers the choice only
    experts_ptr,  # [N, TOP_K] int64, out: each token's experts, best first
    weights_ptr,  # [N, TOP_K] fp32, out: their combine weights
    counts_ptr,  # [E] int32, zeroed: tokens per expert
    N, E,
    routed_scaling,
    TOP_K: tl.constexpr,
    GROUPS: tl.constexpr,
    GROUPS_PER_TOKEN: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_E: tl.constexpr,  # E rounded up to a power of two
    BLOCK_K: tl.constexpr,  # TOP_K rounded up to a power of two
    BLOCK_G: tl.constexpr,  # GROUPS rounded up to a power of two
):
    # program id -> BLOCK_T tokens, each with its whole row of E logits
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_in, col_in = rows < N, cols < E
    logits = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)
    scores = tl.sigmoid(logits)
    bias = tl.load(bias_ptr + cols, mask=col_in, other=0.0)
    choice = tl.where(col_in[None, :], scores + bias[None, :], float("-inf"))

    # group-limited choice: a group's score is the sum of its two best; experts outside the best groups drop out
    if GROUPS > 1:
        group = cols // (E // GROUPS)
        gs = tl.arange(0, BLOCK_G)
        group_scores = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
        for g in tl.static_range(GROUPS):
            in_group = tl.where(group[None, :] == g, choice, float("-inf"))
            first = tl.max(in_group, axis=1)
            at = tl.argmax(in_group, axis=1)
            second = tl.max(tl.where(cols[None, :] == at[:, None], float("-inf"), in_group), axis=1)
            group_scores = tl.where(gs[None, :] == g, (first + second)[:, None], group_scores)
        keep = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
        for _ in tl.static_range(GROUPS_PER_TOKEN):
            best = tl.argmax(group_scores, axis=1)
            keep = keep | (group[None, :] == best[:, None])
            group_scores = tl.where(gs[None, :] == best[:, None], float("-inf"), group_scores)
        choice = tl.where(keep, choice, float("-inf"))

    # top-k by repeated argmax; the weights come from the unbiased scores
    ks = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_T, BLOCK_K), tl.int64)
    weights = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    counts = tl.zeros((BLOCK_E,), tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(choice, axis=1)
        hit = cols[None, :] == best[:, None]
        chosen = tl.where(ks[None, :] == j, best.to(tl.int64)[:, None], chosen)
        weights = tl.where(ks[None, :] == j, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], weights)
        counts += tl.sum((hit & row_in[:, None]).to(tl.int32), axis=0)
        choice = tl.where(hit, float("-inf"), choice)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    out = rows[:, None] * TOP_K + ks[None, :]
    out_in = row_in[:, None] & (ks[None, :] < TOP_K)
    tl.store(experts_ptr + out, chosen, mask=out_in)
    tl.store(weights_ptr + out, weights * routed_scaling, mask=out_in)
    # integer sums: exact in whatever order the programs land
    tl.atomic_add(counts_ptr + cols, counts, mask=col_in, sem="relaxed")


@triton.jit
def _route_backward_kernel(
    logits_ptr,  # [N, E] fp32, contiguous
    experts_ptr,  # [N, TOP_K] int64
    dweights_ptr,  # [N, TOP_K] fp32: gradient of the combine weights
    dlogits_ptr,  # [N, E] fp32, out: zero but at the chosen experts
    N, E,
    routed_scaling,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_E)
    row_in = rows < N
    slot_in = row_in[:, None] & (ks[None, :] < TOP_K)
    experts = tl.load(experts_ptr + rows[:, None] * TOP_K + ks[None, :], mask=slot_in, other=0)
    dw = tl.load(dweights_ptr + rows[:, None] * TOP_K + ks[None, :], mask=slot_in, other=0.0)
    s = tl.sigmoid(tl.load(logits_ptr + rows[:, None] * E + experts, mask=slot_in, other=0.0))
    s = tl.where(slot_in, s, 0.0)
    # w_j = c s_j / S (S = sum of the k scores + 1e-20), or c s_j: dL/ds_j = c (g_j / S - sum_i g_i s_i / S^2)
    if NORMALIZE:
        total = tl.sum(s, axis=1)[:, None] + 1e-20
        ds = routed_scaling * (dw / total - tl.sum(dw * s, axis=1)[:, None] / (total * total))
    else:
        ds = routed_scaling * dw
    dlogit = ds * s * (1.0 - s)
    dense = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for j in tl.static_range(TOP_K):
        expert_j = tl.sum(tl.where(ks[None, :] == j, experts, 0), axis=1)
        dlogit_j = tl.sum(tl.where(ks[None, :] == j, dlogit, 0.0), axis=1)
        dense = tl.where(cols[None, :] == expert_j[:, None], dlogit_j[:, None], dense)
    tl.store(dlogits_ptr + rows[:, None] * E + cols[None, :], dense, mask=row_in[:, None] & (cols[None, :] < E))


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, groups, groups_per_token, normalize, routed_scaling):
        n, e = logits.shape
        experts = torch.empty((n, top_k), device=logits.device, dtype=torch.int64)
        weights = torch.empty((n, top_k), device=logits.device, dtype=torch.float32)
        counts = torch.zeros(e, device=logits.device, dtype=torch.int32)
        # a [BLOCK_T, E] row block of a few fp32 tensors stays in registers: about 2048 elements each
        block_t = 16 if INTERPRETED else max(1, min(32, 2048 // triton.next_power_of_2(e)))
        _route_kernel[(triton.cdiv(n, block_t),)](
            logits, bias, experts, weights, counts, n, e, float(routed_scaling),
            TOP_K=top_k, GROUPS=groups, GROUPS_PER_TOKEN=groups_per_token, NORMALIZE=normalize, BLOCK_T=block_t,
            BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_G=triton.next_power_of_2(groups), num_warps=4,
        )
        ctx.mark_non_differentiable(experts, counts)
        ctx.set_materialize_grads(False)  # the indices' and counts' gradients would be zero-filled for nothing
        ctx.save_for_backward(logits, experts)
        ctx.top_k, ctx.normalize, ctx.routed_scaling, ctx.block_t = top_k, normalize, routed_scaling, block_t
        return experts, weights, counts

    @staticmethod
    def backward(ctx, _dexperts, dweights, _dcounts):
        logits, experts = ctx.saved_tensors
        n, e = logits.shape
        dlogits = torch.empty_like(logits)
        _route_backward_kernel[(triton.cdiv(n, ctx.block_t),)](
            logits, experts, dweights.contiguous(), dlogits, n, e, float(ctx.routed_scaling),
            TOP_K=ctx.top_k, NORMALIZE=ctx.normalize, BLOCK_T=ctx.block_t, BLOCK_E=triton.next_power_of_2(e),
            BLOCK_K=triton.next_power_of_2(ctx.top_k), num_warps=4,
        )
        return dlogits, None, None, None, None, None, None


# The thin GEMM holds a [rows, E] fp32 accumulator in registers, as it does a LoRA rank's columns: past this many
# experts (DeepSeek-V3's 256, Kimi K2's 384) the router's GEMM is torch's, on an fp32 copy of x.
ROUTER_THIN_MAX_EXPERTS = 64


def _bf16_parts(t: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """fp32 t as bf16 tensors summing to it: each part holds the next 8 bits of the mantissa."""
    out = []
    for _ in range(parts):
        out.append(t.to(torch.bfloat16))
        t = t - out[-1].float()
    return out


class _RouterLogits(torch.autograd.Function):
    """x [N, H], W [E, H] fp32 -> x W^T [N, E] fp32: `F.linear(x.float(), W)`, with x read in its own dtype. The
    fp32 copy of x ([N, H], twice x's bytes) and, backward, x's gradient in fp32 with its cast are not made.

    For a bf16 x (on a GPU) every product is of bf16 parts on the tensor cores (fp32 GEMMs run on the CUDA cores):
    the forward's in the thin kernel; dW = dL^T x from dL's three parts, exact products summed in fp32, so fp32's
    result; dx = dL W from two parts of each (the largest three cross terms, 2^-16 of the result), rounded to bf16.
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return lora_kernel.thin_matmul(x, weight.T)[0]

    @staticmethod
    def backward(ctx, dlogits):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad
        if not lora_kernel.bf16_split_products(x, weight):
            dx = lora_kernel.matmul_plus_low_rank(dlogits, weight, out_dtype=x.dtype) if need_x else None
            return dx, dlogits.T @ x.float() if need_w else None
        d = _bf16_parts(dlogits, 3)
        dx = dw = None
        if need_x:
            w_hi, w_lo = _bf16_parts(weight, 2)
            dx = torch.cat((d[0], d[1], d[0]), 1) @ torch.cat((w_hi, w_hi, w_lo))
        if need_w:
            e, h = weight.shape
            dw = torch.mm(torch.cat(d, 1).T, x, out_dtype=torch.float32).view(3, e, h).sum(0)
        return dx, dw


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[N, E] fp32: the router's GEMM x W^T over x [N, H] (fp32, bf16 or fp16) and its fp32 weight W [E, H], products
    and sums in fp32 as `F.linear(x.float(), W)`; differentiable in both."""
    if weight.dtype != torch.float32 or weight.ndim != 2 or x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"router_logits: x {tuple(x.shape)} and an fp32 weight [E, {x.shape[-1]}] expected, found "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if weight.shape[0] > ROUTER_THIN_MAX_EXPERTS:
        return torch.nn.functional.linear(x.float(), weight)
    return _RouterLogits.apply(x, weight)


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, groups: int, groups_per_token: int,
          normalize: bool, routed_scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts [N, k] int64 best first, combine weights [N, k] fp32, tokens per expert [E] int32) from the router
    logits [N, E] (fp32, x W^T) and the correction bias [E]; differentiable in the logits through the weights.

    The semantics of `Router.forward` (shared/reference/models.md), which returns the k experts in no set order.
    """
    if logits.dtype != torch.float32 or logits.ndim != 2:
        raise ValueError(f"route: logits must be 2D fp32, found {logits.dtype} of shape {tuple(logits.shape)}")
    e = logits.shape[1]
    if bias.shape != (e,) or bias.dtype != torch.float32:
        raise ValueError(f"route: bias must be fp32 of shape ({e},), found {bias.dtype} {tuple(bias.shape)}")
    if not (0 < top_k <= e and e % groups == 0 and 0 < groups_per_token <= groups
            and (groups == 1 or e // groups >= 2)):
        raise ValueError(f"route: cannot choose {top_k} of {e} experts in {groups_per_token} of {groups} groups")
    return _Route.apply(logits.contiguous(), bias.contiguous(), top_k, groups, groups_per_token, normalize,
                        routed_scaling)


# --------------------------------------------------------------------------- tiles of rows grouped by expert


@triton.jit
def _row_tile(offsets_ptr, M, N, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
              GROUP_M: tl.constexpr):
    """This program's tile: (expert, rows [BLOCK_M] int64, which rows are real, column tile).

    The grid holds cdiv(M, BLOCK_M) + E row tiles (a bound on sum_e cdiv(rows_e, BLOCK_M)) times the column tiles,
    walked GROUP_M row tiles at a time so that neighbours share W's column tiles in L2. Row tile t belongs to the
    expert whose cumulative tile count first exceeds t; expert == E past the last one (the caller returns). Rows past
    the expert's last are clamped onto it: loads need no row mask, and stores are masked by the returned flags.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M) + E
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % group) % group_m
    tile_n = (pid % group) // group_m

    es = tl.arange(0, BLOCK_E)
    starts = tl.load(offsets_ptr + es, mask=es < E, other=0)
    ends = tl.load(offsets_ptr + es + 1, mask=es < E, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, axis=0)  # row tiles of experts 0..e
    expert = tl.sum((last <= tile_m).to(tl.int32), axis=0)
    mine = es == expert
    first_tile = tl.sum(tl.where(mine, last - tiles, 0), axis=0)
    start = tl.sum(tl.where(mine, starts, 0), axis=0)
    end = tl.sum(tl.where(mine, ends, 0), axis=0)
    rows = start + (tile_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_in = rows < end
    return expert, tl.minimum(rows, end - 1), row_in, tile_n


@triton.jit
def _row_offsets(rows, index_ptr, stride, GATHER: tl.constexpr):
    """Element offsets of the rows, rows * stride, after looking the rows up in index_ptr (a gather). Multiplying by
    the stride, which Triton knows to be a multiple of 16, keeps the loads of a gathered row vectorised."""
    if GATHER:
        rows = tl.load(index_ptr + rows)
    return rows * stride


@triton.jit
def _dot_loop(acc, a_ptr, a_rows, stride_ak, w_ptr, stride_wk, stride_wn, cols, K, BLOCK_K: tl.constexpr):
    """acc += A[a_rows, :K] @ W[:K, cols]; a_rows are element offsets, w_ptr points at the expert's matrix."""
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows[:, None] + ks[None, :] * stride_ak
    w_tile = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_in = ks < K - k * BLOCK_K
        a = tl.load(a_tile, mask=k_in[None, :], other=0.0)
        w = tl.load(w_tile, mask=k_in[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
        a_tile += BLOCK_K * stride_ak
        w_tile += BLOCK_K * stride_wk
    return acc


@triton.jit
def _w_descriptor(w_ptr, E, K, N, stride_we, stride_wk, stride_wn, ORDER: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """A tensor descriptor over W [E, K, N] (zero past K and N) as `descriptor_order` found it addressable: ORDER 1,
    rows of N ([E, K, N] tiles [1, BLOCK_K, BLOCK_N]); ORDER 2, rows of K (W^T [E, N, K], tiles [1, BLOCK_N,
    BLOCK_K])."""
    # if / else, not an early return: the compiler builds the statements after a constexpr branch's return too, and
    # the other order's descriptor has a stride of 1 (a launch makes it a constant) where it needs 16 bytes
    if ORDER == 1:
        w_of = tl.make_tensor_descriptor(w_ptr, [E, K, N], [stride_we, stride_wk, 1], [1, BLOCK_K, BLOCK_N])
    else:
        w_of = tl.make_tensor_descriptor(w_ptr, [E, N, K], [stride_we, stride_wn, 1], [1, BLOCK_N, BLOCK_K])
    return w_of


@triton.jit
def _w_tile(w_of, expert, k, col, ORDER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[expert][k : k + BLOCK_K, col : col + BLOCK_N] through `_w_descriptor`'s w_of."""
    if ORDER == 1:
        w = w_of.load([expert, k, col]).reshape(BLOCK_K, BLOCK_N)
    else:
        w = tl.trans(w_of.load([expert, col, k]).reshape(BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _dot_loop_described(acc, a_ptr, a_rows, stride_ak, w_of, expert, col, K, ORDER: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_dot_loop` with W's tiles from w_of (`_w_descriptor`): expert `expert`'s, at columns col to col + BLOCK_N."""
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows[:, None] + ks[None, :] * stride_ak
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_in = ks < K - k * BLOCK_K
        a = tl.load(a_tile, mask=k_in[None, :], other=0.0)
        acc = tl.dot(a, _w_tile(w_of, expert, k * BLOCK_K, col, ORDER, BLOCK_K, BLOCK_N), acc, input_precision="ieee")
        a_tile += BLOCK_K * stride_ak
    return acc


@triton.jit
def _add_low_rank(acc, la_ptr, rows, stride_lam, stride_lar, lb_ptr, stride_lbr, stride_lbn, cols, R, scale,
                  BLOCK_R: tl.constexpr):
    """acc += scale * L_a[rows, :R] @ L_b[:R, cols]; the scale multiplies the [rows, R] factor, the cheap side."""
    rs = tl.arange(0, BLOCK_R)
    la = tl.load(la_ptr + rows[:, None] * stride_lam + rs[None, :] * stride_lar, mask=rs[None, :] < R, other=0.0)
    lb = tl.load(lb_ptr + rs[:, None] * stride_lbr + cols[None, :] * stride_lbn, mask=rs[:, None] < R, other=0.0)
    return tl.dot((la.to(tl.float32) * scale).to(lb.dtype), lb, acc, input_precision="ieee")


# --------------------------------------------------------------------------- grouped GEMM


def _prune_grouped(configs, named_args, **kwargs):
    """`_prune_by_width`'s configs, those that load W by tensor descriptor only where W is addressable
    (W_DESCRIPTOR); under the interpreter, which times nothing, one config: by descriptor where it can be."""
    described = bool({**named_args, **kwargs}["W_DESCRIPTOR"])  # a constexpr: among the keyword arguments
    able = [c for c in _prune_by_width(configs, named_args, **kwargs) if c.kwargs["DESC"] <= described]
    return [c for c in able if c.kwargs["DESC"] == described] if INTERPRETED else able


# the wide tile shapes twice, W's tiles by pointer loads and by tensor descriptor; the thin ones stream A and read
# little of W
@autotune(_configs(WIDE + THIN, DESC=False) + _configs(WIDE, DESC=True),
          key=["N", "K", "K2", "R", "GATHER", "TWO", "ROW_SCALE", "SCATTER", "UNSCALED", "LOW_RANK", "W_DESCRIPTOR"],
          prune_configs_by={"early_config_prune": _prune_grouped})
@triton.jit
def _grouped_matmul_kernel(
    a_ptr,  # A [*, K]: row i of the product reads A's row a_rows[i] (GATHER), else row i
    a_rows_ptr,  # [M] int64 (GATHER only)
    w_ptr,  # W [E, K, N], any strides: rows of expert e multiply by W[e]
    a2_ptr,  # A2 [M, K2] (TWO only): a second product into the same accumulator
    w2_ptr,  # W2 [E, K2, N] (TWO only)
    la_ptr,  # L_a [M, R] (LOW_RANK only): a low-rank term scale * L_a L_b[e] in the epilogue
    lb_ptr,  # L_b [E, R, N]
    scale_ptr,  # [M] fp32 (ROW_SCALE only): row i, rounded to C's dtype, times scale[i]
    out_rows_ptr,  # [M] int64 (SCATTER only): row i is stored at row out_rows[i] of C, else at row i
    c_ptr,  # C [*, N]
    u_ptr,  # U [M, N] out (UNSCALED only): row i before the row scale and the scatter
    offsets_ptr,  # [E + 1] int64: expert e owns rows offsets[e] to offsets[e+1]
    M, N, K, K2, R, E,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn,
    stride_a2m, stride_a2k, stride_w2e, stride_w2k, stride_w2n,
    stride_lam, stride_lar, stride_lbe, stride_lbr, stride_lbn,
    stride_cm, stride_cn,
    lr_scale,
    GATHER: tl.constexpr,
    TWO: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    SCATTER: tl.constexpr,
    UNSCALED: tl.constexpr,
    LOW_RANK: tl.constexpr,
    W_DESCRIPTOR: tl.constexpr,  # 0, or how W (and W2) are addressable by tensor descriptor (`descriptor_order`)
    BLOCK_R: tl.constexpr,  # R rounded up to a power of two, at least 16 (tl.dot's smallest)
    BLOCK_E: tl.constexpr,  # E rounded up to a power of two, at least 16
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DESC: tl.constexpr,  # load W's (and W2's) tiles by tensor descriptor (W_DESCRIPTOR only)
):
    expert, rows, row_in, tile_n = _row_tile(offsets_ptr, M, N, E, BLOCK_M, BLOCK_N, BLOCK_E, GROUP_M)
    if expert >= E:
        return
    e = expert.to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_w = cols % N  # wrapped: loads need no column mask; the duplicates are never stored

    # main loop(s): acc = A[rows] @ W[e] (+ A2[rows] @ W2[e])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = _row_offsets(rows, a_rows_ptr, stride_am, GATHER)
    if DESC:
        tl.static_assert(W_DESCRIPTOR > 0)
        w_of = _w_descriptor(w_ptr, E, K, N, stride_we, stride_wk, stride_wn, W_DESCRIPTOR, BLOCK_K, BLOCK_N)
        acc = _dot_loop_described(acc, a_ptr, a_rows, stride_ak, w_of, expert, tile_n * BLOCK_N, K, W_DESCRIPTOR,
                                  BLOCK_K, BLOCK_N)
        if TWO:
            w2_of = _w_descriptor(w2_ptr, E, K2, N, stride_w2e, stride_w2k, stride_w2n, W_DESCRIPTOR, BLOCK_K,
                                  BLOCK_N)
            acc = _dot_loop_described(acc, a2_ptr, rows * stride_a2m, stride_a2k, w2_of, expert, tile_n * BLOCK_N, K2,
                                      W_DESCRIPTOR, BLOCK_K, BLOCK_N)
    else:
        acc = _dot_loop(acc, a_ptr, a_rows, stride_ak, w_ptr + e * stride_we, stride_wk, stride_wn, cols_w, K,
                        BLOCK_K)
        if TWO:
            acc = _dot_loop(acc, a2_ptr, rows * stride_a2m, stride_a2k, w2_ptr + e * stride_w2e, stride_w2k,
                            stride_w2n, cols_w, K2, BLOCK_K)

    # epilogue: low-rank term, row scale, store (scattered)
    if LOW_RANK:
        acc = _add_low_rank(acc, la_ptr, rows, stride_lam, stride_lar, lb_ptr + e * stride_lbe, stride_lbr,
                            stride_lbn, cols_w, R, lr_scale, BLOCK_R)
    mask = row_in[:, None] & (cols[None, :] < N)
    if UNSCALED:
        # U is laid out as C is (the wrapper allocates both [*, N] contiguous)
        tl.store(u_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(u_ptr.dtype.element_ty),
                 mask=mask)
    if ROW_SCALE:
        row_scale = tl.load(scale_ptr + rows)
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32) * row_scale[:, None]
    out_rows = _row_offsets(rows, out_rows_ptr, 1, SCATTER)
    c = c_ptr + out_rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- SwiGLU experts: gate/up and its backward


@autotune(_configs(GATE_UP, HALVES=True), key=["N", "K", "RG", "RU", "LORA_GATE", "LORA_UP"])
@triton.jit
def _gate_up_kernel(
    x_ptr,  # X [*, K]: the layer's input, a row per token
    x_rows_ptr,  # [M] int64: the token (row of X) of each expert row
    wg_ptr,  # gate weights [E, N, K]
    wu_ptr,  # up weights [E, N, K], the gate's strides
    lag_ptr,  # X A_g^T [M, RG] (LORA_GATE only): the gate adapter's low-rank input
    lbg_ptr,  # B_g^T [E, RG, N]
    lau_ptr,  # X A_u^T [M, RU] (LORA_UP only)
    lbu_ptr,  # B_u^T [E, RU, N]
    gate_ptr,  # [M, N] out: gate projection
    up_ptr,  # [M, N] out: up projection
    act_ptr,  # [M, N] out: silu(gate) * up
    offsets_ptr,  # [E + 1] int64
    M, N, K, RG, RU, E,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk,
    stride_lagm, stride_lagr, stride_lbge, stride_lbgr, stride_lbgn,
    stride_laum, stride_laur, stride_lbue, stride_lbur, stride_lbun,
    stride_om, stride_on,
    scale_g, scale_u,
    LORA_GATE: tl.constexpr,
    LORA_UP: tl.constexpr,
    BLOCK_RG: tl.constexpr,
    BLOCK_RU: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HALVES: tl.constexpr,
):
    expert, rows, row_in, tile_n = _row_tile(offsets_ptr, M, N, E, BLOCK_M, BLOCK_N, BLOCK_E, GROUP_M)
    if expert >= E:
        return
    e = expert.to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_w = cols % N

    # main loop: one load of the gathered X tile feeds both products
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + _row_offsets(rows, x_rows_ptr, stride_xm, True)[:, None] + ks[None, :] * stride_xk
    w_tile = ks[:, None] * stride_wk + cols_w[None, :] * stride_wn
    wg_tile = wg_ptr + e * stride_we + w_tile
    wu_tile = wu_ptr + e * stride_we + w_tile
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_in = ks < K - k * BLOCK_K
        x = tl.load(x_tile, mask=k_in[None, :], other=0.0)
        wg = tl.load(wg_tile, mask=k_in[:, None], other=0.0)
        wu = tl.load(wu_tile, mask=k_in[:, None], other=0.0)
        acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
        acc_u = tl.dot(x, wu, acc_u, input_precision="ieee")
        x_tile += BLOCK_K * stride_xk
        wg_tile += BLOCK_K * stride_wk
        wu_tile += BLOCK_K * stride_wk

    # epilogue: the adapters, then SwiGLU with the reference's rounding of silu(gate)
    if LORA_GATE:
        acc_g = _add_low_rank(acc_g, lag_ptr, rows, stride_lagm, stride_lagr, lbg_ptr + e * stride_lbge, stride_lbgr,
                              stride_lbgn, cols_w, RG, scale_g, BLOCK_RG)
    if LORA_UP:
        acc_u = _add_low_rank(acc_u, lau_ptr, rows, stride_laum, stride_laur, lbu_ptr + e * stride_lbue, stride_lbur,
                              stride_lbun, cols_w, RU, scale_u, BLOCK_RU)
    if HALVES:  # a half tile of columns at a time: the whole tile's epilogue spills registers at 8 warps
        half: tl.constexpr = BLOCK_N // 2
        gate_left, gate_right = column_halves(acc_g, BLOCK_M, half)
        up_left, up_right = column_halves(acc_u, BLOCK_M, half)
        left = tile_n * BLOCK_N + tl.arange(0, half)
        _swiglu_epilogue(gate_left, up_left, rows, row_in, left, N, gate_ptr, up_ptr, act_ptr, stride_om, stride_on)
        _swiglu_epilogue(gate_right, up_right, rows, row_in, left + half, N, gate_ptr, up_ptr, act_ptr, stride_om,
                         stride_on)
    else:
        _swiglu_epilogue(acc_g, acc_u, rows, row_in, cols, N, gate_ptr, up_ptr, act_ptr, stride_om, stride_on)


@triton.jit
def _swiglu_epilogue(acc_g, acc_u, rows, row_in, cols, N, gate_ptr, up_ptr, act_ptr, stride_om, stride_on):
    """gate, up and silu(gate) * up over columns `cols`, stored; silu(gate) rounded as the reference rounds it."""
    dtype = act_ptr.dtype.element_ty
    gate = acc_g.to(dtype)
    up = acc_u.to(dtype)
    g = gate.to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(dtype).to(tl.float32)
    act = (silu * up.to(tl.float32)).to(dtype)
    out = rows[:, None] * stride_om + cols[None, :] * stride_on
    mask = row_in[:, None] & (cols[None, :] < N)
    tl.store(gate_ptr + out, gate, mask=mask)
    tl.store(up_ptr + out, up, mask=mask)
    tl.store(act_ptr + out, act, mask=mask)


@autotune(_configs(DOWN_BACKWARD, HALVES=True), key=["N", "K", "R", "GATHER", "LOW_RANK"])
@triton.jit
def _down_backward_kernel(
    dout_ptr,  # dOut [*, K]: the gradient of each (token, slot)'s weighted output
    dout_rows_ptr,  # [M] int64 (GATHER only): the row of dOut that holds each expert row's gradient, else row i
    wd_ptr,  # down weights [E, K, N] ([E, H, I]: K is the hidden size, N the expert's intermediate size)
    lu_ptr,  # dOut B_d [M, R] (LOW_RANK only): the down adapter's low-rank gradient, before the combine weight
    ad_ptr,  # A_d [E, R, N]
    weight_ptr,  # [M] fp32: combine weights
    gate_ptr,  # [M, N]: the forward's gate projection
    up_ptr,  # [M, N]: the forward's up projection
    dgate_ptr,  # [M, N] out
    dup_ptr,  # [M, N] out
    dw_ptr,  # [M, cdiv(N, BLOCK_N)] fp32 out (COMBINE only): this tile's share of act . (dOut W_d + s lu A_d)
    offsets_ptr,  # [E + 1] int64
    M, N, K, R, E,
    stride_dm, stride_dk, stride_we, stride_wk, stride_wn,
    stride_lum, stride_lur, stride_ade, stride_adr, stride_adn,
    stride_gm, stride_gn, stride_dwm,
    scale_d,
    GATHER: tl.constexpr,
    COMBINE: tl.constexpr,
    LOW_RANK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HALVES: tl.constexpr,
):
    expert, rows, row_in, tile_n = _row_tile(offsets_ptr, M, N, E, BLOCK_M, BLOCK_N, BLOCK_E, GROUP_M)
    if expert >= E:
        return
    e = expert.to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_w = cols % N

    # main loop: acc = dOut[(token, slot) of each row] @ W_d[e], the activations' gradient before the weight
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dout_rows = _row_offsets(rows, dout_rows_ptr, stride_dm, GATHER)
    acc = _dot_loop(acc, dout_ptr, dout_rows, stride_dk, wd_ptr + e * stride_we, stride_wk, stride_wn, cols_w, K,
                    BLOCK_K)

    # epilogue, a half tile of columns at a time when HALVES: a whole 128 x 128 tile's fp32 temporaries spill
    # registers at 8 warps (on an H200 at k2-1b's experts, halves took 0.78x the time at the best config, 0.324
    # against 0.416 ms, and were faster at every config swept: `-down-backward-sweep.md` in benchmarks/results)
    # the adapter's term joins the product in place: act . (dOut W_d + s lu A_d) is then the combine weight's whole
    # gradient, dOut . y, with one tile of accumulators live
    if LOW_RANK:
        acc = _add_low_rank(acc, lu_ptr, rows, stride_lum, stride_lur, ad_ptr + e * stride_ade, stride_adr,
                            stride_adn, cols_w, R, scale_d, BLOCK_R)
    row_weight = tl.load(weight_ptr + rows)
    if HALVES:
        half: tl.constexpr = BLOCK_N // 2
        left_tile, right_tile = column_halves(acc, BLOCK_M, half)
        left = tile_n * BLOCK_N + tl.arange(0, half)
        dw = _down_epilogue(left_tile, rows, row_in, left, N, row_weight, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
                            stride_gm, stride_gn)
        dw += _down_epilogue(right_tile, rows, row_in, left + half, N, row_weight, gate_ptr, up_ptr, dgate_ptr,
                             dup_ptr, stride_gm, stride_gn)
    else:
        dw = _down_epilogue(acc, rows, row_in, cols, N, row_weight, gate_ptr, up_ptr, dgate_ptr, dup_ptr, stride_gm,
                            stride_gn)
    if COMBINE:
        tl.store(dw_ptr + rows * stride_dwm + tile_n, dw, mask=row_in)


@triton.jit
def _down_epilogue(acc, rows, row_in, cols, N, row_weight, gate_ptr, up_ptr, dgate_ptr, dup_ptr, stride_gm,
                   stride_gn):
    """The down backward's epilogue over columns `cols`: act recomputed from gate and up as the forward rounded it,
    dAct = weight * acc (the product, with the adapter's term) rounded as the reference's is, the SwiGLU backward
    stored; returns each row's act . acc, its share of the combine weight's gradient (masked columns have act 0)."""
    mask = row_in[:, None] & (cols[None, :] < N)
    gu = rows[:, None] * stride_gm + cols[None, :] * stride_gn
    dtype = dgate_ptr.dtype.element_ty
    g = tl.load(gate_ptr + gu, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + gu, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = (g * sig).to(dtype).to(tl.float32)
    act = (silu * u).to(dtype).to(tl.float32)
    dact = (acc * row_weight[:, None]).to(dtype).to(tl.float32)
    # silu'(g) = s + g s (1 - s)
    tl.store(dup_ptr + gu, (dact * silu).to(dtype), mask=mask)
    tl.store(dgate_ptr + gu, (dact * u * sig * (1.0 + g * (1.0 - sig))).to(dtype), mask=mask)
    return tl.sum(acc * act, axis=1)


# --------------------------------------------------------------------------- per-expert reductions over rows


@autotune(WEIGHT_GRAD_CONFIGS + WEIGHT_GRAD_THIN_CONFIGS,
          key=["MO", "NO", "P_GATHER", "P_SCALE", "Q_GATHER"],
          prune_configs_by={"early_config_prune": _prune_weight_grad})
@triton.jit
def _weight_grad_kernel(
    p_ptr,  # P [*, MO]: row p_rows[i] (P_GATHER), else row i, is the i-th of the reduction
    p_rows_ptr,  # [M] int64 (P_GATHER only)
    p_scale_ptr,  # [M] fp32 (P_SCALE only): row i of P times p_scale[i], rounded to P's dtype
    q_ptr,  # Q [*, NO]: likewise
    q_rows_ptr,  # [M] int64 (Q_GATHER only)
    c_ptr,  # C [E, MO, NO] out: scale * P_e^T Q_e over expert e's rows
    offsets_ptr,  # [E + 1] int64
    MO, NO,
    stride_pm, stride_pk, stride_qm, stride_qn, stride_ce, stride_cm, stride_cn,
    scale,
    P_GATHER: tl.constexpr,
    P_SCALE: tl.constexpr,
    Q_GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # rows per step of the reduction
    GROUP_M: tl.constexpr,
):
    # program id -> (expert, output tile); an expert's tiles are neighbours, walked GROUP_M tile rows at a time
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(MO, BLOCK_M)
    tiles_n = tl.cdiv(NO, BLOCK_N)
    e = (pid // (tiles_m * tiles_n)).to(tl.int64)
    local = pid % (tiles_m * tiles_n)
    group = GROUP_M * tiles_n
    first_m = (local // group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (local % group) % group_m
    tile_n = (local % group) // group_m
    ms = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms_w, ns_w = ms % MO, ns % NO

    # reduction over the expert's rows, masked at its end (an empty expert stores zeros)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    rs = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + rs
        r_in = rows < end
        rows = tl.minimum(rows, end - 1)
        p_rows = _row_offsets(rows, p_rows_ptr, stride_pm, P_GATHER)
        q_rows = _row_offsets(rows, q_rows_ptr, stride_qm, Q_GATHER)
        p = tl.load(p_ptr + p_rows[None, :] + ms_w[:, None] * stride_pk, mask=r_in[None, :], other=0.0)  # P^T
        if P_SCALE:
            p = (p.to(tl.float32) * tl.load(p_scale_ptr + rows)[None, :]).to(p_ptr.dtype.element_ty)
        q = tl.load(q_ptr + q_rows[:, None] + ns_w[None, :] * stride_qn, mask=r_in[:, None], other=0.0)
        acc = tl.dot(p, q, acc, input_precision="ieee")

    c = c_ptr + e * stride_ce + ms[:, None] * stride_cm + ns[None, :] * stride_cn
    tl.store(c, (acc * scale).to(c_ptr.dtype.element_ty), mask=(ms[:, None] < MO) & (ns[None, :] < NO))


@triton.jit
def _segment_sumsq_kernel(
    x_ptr,  # X [*, C]: row x_rows[i] (GATHER), else row i, is the i-th, rows grouped by expert
    x_rows_ptr,  # [M] int64 (GATHER only)
    scale_ptr,  # [M] fp32 (ROW_SCALE only): row i times scale[i], rounded to X's dtype
    out_ptr,  # [E, C] fp32 out: sum over expert e's rows of X[:, c]^2
    offsets_ptr,  # [E + 1] int64
    C,
    stride_xm, stride_xc,
    GATHER: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # program id -> (expert, column block); a fixed order of summation, so the same bits on every run
    e = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_in = cols < C
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_in = rows < end
        rows = tl.minimum(rows, end - 1)
        x = tl.load(x_ptr + _row_offsets(rows, x_rows_ptr, stride_xm, GATHER)[:, None] + cols[None, :] * stride_xc,
                    mask=row_in[:, None] & col_in[None, :], other=0.0)
        if ROW_SCALE:
            x = (x.to(tl.float32) * tl.load(scale_ptr + rows)[:, None]).to(x_ptr.dtype.element_ty)
        x = x.to(tl.float32)
        acc += tl.sum(x * x, axis=0)
    tl.store(out_ptr + e * C + cols, acc, mask=col_in)


@triton.jit
def _pack_columns_kernel(
    x_ptr,  # X [*, C]: row x_rows[i] (GATHER), else row i, is the i-th, rows grouped by expert
    x_rows_ptr,  # [M] int64 (GATHER only)
    kept_ptr,  # [E, S] int64: the columns each expert keeps
    out_ptr,  # [M, S] out: row i holds X[i, kept[e(i)]]
    offsets_ptr,  # [E + 1] int64
    M, S, E,
    stride_xm, stride_xc, stride_ke, stride_om,
    GATHER: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    expert, rows, row_in, tile_n = _row_tile(offsets_ptr, M, S, E, BLOCK_M, BLOCK_N, BLOCK_E, 1)
    if expert >= E:
        return
    js = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_in = js < S
    kept = tl.load(kept_ptr + expert.to(tl.int64) * stride_ke + js, mask=j_in, other=0)
    x_rows = _row_offsets(rows, x_rows_ptr, stride_xm, GATHER)
    x = tl.load(x_ptr + x_rows[:, None] + kept[None, :] * stride_xc, mask=j_in[None, :], other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_om + js[None, :], x, mask=row_in[:, None] & j_in[None, :])


@triton.jit
def _row_dots_kernel(
    x_ptr,  # X [*, C]: row x_rows[i] (GATHER), else row i, is the i-th
    x_rows_ptr,  # [M] int64 (GATHER only)
    y_ptr,  # Y [M, C]
    out_ptr,  # [M] fp32 out: X_i . Y_i
    M, C,
    stride_xm, stride_xc, stride_ym, stride_yc,
    GATHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < M
    rows = tl.minimum(rows, M - 1)
    x_rows = _row_offsets(rows, x_rows_ptr, stride_xm, GATHER)
    cs = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cs
        col_in = cols < C
        x = tl.load(x_ptr + x_rows[:, None] + cols[None, :] * stride_xc, mask=col_in[None, :], other=0.0)
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yc, mask=col_in[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, acc, mask=row_in)


@triton.jit
def _gather_rows_kernel(
    x_ptr,  # X [*, C]
    rows_ptr,  # [M] int64 (GATHER only): row i of OUT is X's row rows[i], else row i
    scale_ptr,  # [M] fp32 (ROW_SCALE only): row i times scale[i], in fp32, rounded once to OUT's dtype
    out_ptr,  # [M, C] out, contiguous
    M, C,
    stride_xm, stride_xc,
    GATHER: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_in = rows < M
    rows = tl.minimum(rows, M - 1)
    inside = row_in[:, None] & (cols[None, :] < C)
    x = tl.load(x_ptr + _row_offsets(rows, rows_ptr, stride_xm, GATHER)[:, None] + cols[None, :] * stride_xc,
                mask=inside, other=0.0)
    if ROW_SCALE:
        x = (x.to(tl.float32) * tl.load(scale_ptr + rows)[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], x, mask=inside)


@triton.jit
def _slot_sum_kernel(
    slots_ptr,  # S [N, K, H]
    add_ptr,  # A [N, H] (ADD only)
    out_ptr,  # [N, H] out: sum over k of S[:, k] (+ A), in fp32, rounded once
    N, H,
    stride_sn, stride_sk, stride_sh, stride_an, stride_ah,
    K: tl.constexpr,
    ADD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    inside = (rows[:, None] < N) & (cols[None, :] < H)
    base = slots_ptr + rows[:, None] * stride_sn + cols[None, :] * stride_sh
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(K):  # slot order, as torch's sum over the slots
        acc += tl.load(base + k * stride_sk, mask=inside, other=0.0).to(tl.float32)
    if ADD:
        acc += tl.load(add_ptr + rows[:, None] * stride_an + cols[None, :] * stride_ah, mask=inside,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------- wrappers


def _block(n: int) -> int:
    """A tl.dot dim: n rounded up to a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def _block_e(experts: int) -> int:
    return max(16, triton.next_power_of_2(experts))


def _check_offsets(what: str, offsets: torch.Tensor, experts: int, like: torch.Tensor) -> None:
    if offsets.dtype != torch.int64 or offsets.shape != (experts + 1,) or offsets.device != like.device:
        raise ValueError(f"{what}: offsets must be int64 of shape ({experts + 1},) on {like.device}, found "
                         f"{offsets.dtype} of shape {tuple(offsets.shape)} on {offsets.device}")


def _check_rows(what: str, name: str, rows: torch.Tensor | None, m: int, like: torch.Tensor) -> None:
    if rows is not None and (rows.dtype != torch.int64 or rows.shape != (m,) or rows.device != like.device):
        raise ValueError(f"{what}: {name} must be int64 of shape ({m},) on {like.device}, found {rows.dtype} of "
                         f"shape {tuple(rows.shape)} on {rows.device}")


def _check_row_scale(what: str, name: str, scale: torch.Tensor | None, m: int, like: torch.Tensor) -> None:
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (m,) or scale.device != like.device):
        raise ValueError(f"{what}: {name} must be fp32 of shape ({m},) on {like.device}, found {scale.dtype} of "
                         f"shape {tuple(scale.shape)} on {scale.device}")


def _check_dtype(what: str, like: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    if like.dtype not in DTYPES:
        raise ValueError(f"{what}: expected fp32, bf16 or fp16 tensors, found {like.dtype}")
    for name, t in tensors.items():
        if t is not None and (t.dtype != like.dtype or t.device != like.device):
            raise ValueError(f"{what}: {name} must be {like.dtype} on {like.device} like the others, "
                             f"found {t.dtype} on {t.device}")


def descriptor_order(w: torch.Tensor) -> int:
    """How a tensor descriptor can address W [E, K, N] (a view, maybe transposed): 1 by rows of N, 2 by rows of K
    (W's transpose is the stored layout), 0 not at all (`addressable`)."""
    if addressable(w):
        return 1
    return 2 if addressable(w.transpose(1, 2)) else 0


LowRank = tuple[torch.Tensor, torch.Tensor, float]  # (L_a [M, R], L_b [E, R, N], scale)


def grouped_mm(a: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, a_rows: torch.Tensor | None = None,
               a2: torch.Tensor | None = None, w2: torch.Tensor | None = None, low: LowRank | None = None,
               row_scale: torch.Tensor | None = None, out_rows: torch.Tensor | None = None,
               out_size: int | None = None, unscaled: torch.Tensor | None = None) -> torch.Tensor:
    """C [M, N]: row i is A[i] W[e] for the expert e that owns row i (offsets [E+1], int64, on the device).

    a [*, K]; with a_rows [M] (int64) row i reads a's row a_rows[i] instead: a gather.
    w [E, K, N] any strides (`W.transpose(1, 2)` multiplies by W[e]^T). a2 [M, K2] and w2 [E, K2, N] add a second
    product; low = (L_a [M, R], L_b [E, R, N], s) adds s L_a[i] L_b[e]. row_scale [M] fp32 multiplies row i after
    rounding it to C's dtype. out_rows [M] int64 stores row i at row out_rows[i] of a C of out_size rows (default
    M): a scatter. unscaled, a contiguous [M, N] tensor of C's dtype, receives row i before the row scale and the
    scatter. M is a_rows' length, else a's.
    """
    m = a_rows.shape[0] if a_rows is not None else a.shape[0]
    experts, k, n = w.shape
    _check_dtype("grouped_mm", a, w=w, a2=a2, w2=w2, la=low[0] if low else None, lb=low[1] if low else None)
    _check_offsets("grouped_mm", offsets, experts, a)
    _check_rows("grouped_mm", "a_rows", a_rows, m, a)
    _check_rows("grouped_mm", "out_rows", out_rows, m, a)
    if a.ndim != 2 or a.shape[1] != k:
        raise ValueError(f"grouped_mm: a must be [*, {k}] to match w {tuple(w.shape)}, found {tuple(a.shape)}")
    if (a2 is None) != (w2 is None):
        raise ValueError("grouped_mm: give a2 and w2 together")
    a2_, w2_ = (a2, w2) if a2 is not None and w2 is not None else (a, w)  # unused pointers: any tensor will do
    two = a2 is not None
    if two and (a2_.shape[0] != m or w2_.shape[0] != experts or w2_.shape[2] != n or w2_.shape[1] != a2_.shape[1]):
        raise ValueError(f"grouped_mm: a2 {tuple(a2_.shape)} and w2 {tuple(w2_.shape)} do not fit M={m}, N={n}")
    if low is not None and (low[0].shape[0] != m or low[1].shape != (experts, low[0].shape[1], n)):
        raise ValueError(f"grouped_mm: the low-rank pair {tuple(low[0].shape)} {tuple(low[1].shape)} does not fit "
                         f"M={m}, E={experts}, N={n}")
    _check_row_scale("grouped_mm", "row_scale", row_scale, m, a)
    c = lora_kernel.empty_aligned_rows(m if out_size is None else out_size, n, a)
    if unscaled is not None and (unscaled.shape != (m, n) or not unscaled.is_contiguous()
                                 or unscaled.dtype != c.dtype or unscaled.device != c.device):
        raise ValueError(f"grouped_mm: unscaled must be a contiguous {c.dtype} tensor of shape ({m}, {n})")
    if m == 0:
        return c
    la, lb, lr_scale = low if low is not None else (a, w, 1.0)
    r = la.shape[1] if low is not None else 0
    order = descriptor_order(w)
    if two and descriptor_order(w2_) != order:
        order = 0
    if order:
        triton.set_allocator(descriptor_scratch)

    def grid(meta):
        return ((triton.cdiv(m, meta["BLOCK_M"]) + experts) * triton.cdiv(n, meta["BLOCK_N"]),)

    _grouped_matmul_kernel[grid](
        a, a if a_rows is None else a_rows, w, a2_, w2_, la, lb,
        a if row_scale is None else row_scale, a if out_rows is None else out_rows, c,
        c if unscaled is None else unscaled, offsets,
        m, n, k, a2_.shape[1] if two else 0, r, experts,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        a2_.stride(0), a2_.stride(1), w2_.stride(0), w2_.stride(1), w2_.stride(2),
        la.stride(0), la.stride(1), lb.stride(0), lb.stride(1), lb.stride(2),
        c.stride(0), c.stride(1),
        float(lr_scale),
        GATHER=a_rows is not None, TWO=two, ROW_SCALE=row_scale is not None, SCATTER=out_rows is not None,
        UNSCALED=unscaled is not None, LOW_RANK=low is not None, W_DESCRIPTOR=order, BLOCK_R=_block(r),
        BLOCK_E=_block_e(experts),
    )
    return c


def grouped_weight_grad(p: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor, *,
                        p_rows: torch.Tensor | None = None, p_scale: torch.Tensor | None = None,
                        q_rows: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """C [E, MO, NO] = scale * P_e^T Q_e, summed over expert e's rows (zeros for an expert without rows).

    p [*, MO], q [*, NO]; p_rows / q_rows [M] (int64 row indices) gather their rows, p_scale [M] fp32 weights
    P's (rounded to its dtype, as the reference's weighted gradient is). C takes q's dtype.

    A full weight's gradient in bf16 on a GPU (both sides wider than a LoRA rank) is cuBLAS's grouped GEMM on rows
    already in expert order (`_by_cublas`); the callers pass those. Otherwise the Triton kernel, which reads gathered
    and weighted rows in place.
    """
    m = p_rows.shape[0] if p_rows is not None else p.shape[0]
    experts = offsets.shape[0] - 1
    mo, no = p.shape[1], q.shape[1]
    _check_dtype("grouped_weight_grad", q, p=p)
    _check_offsets("grouped_weight_grad", offsets, experts, p)
    _check_rows("grouped_weight_grad", "p_rows", p_rows, m, p)
    _check_rows("grouped_weight_grad", "q_rows", q_rows, m, p)
    if q_rows is None and q.shape[0] != m:
        raise ValueError(f"grouped_weight_grad: q must have {m} rows like p, found {tuple(q.shape)}")
    _check_row_scale("grouped_weight_grad", "p_scale", p_scale, m, p)
    if p_rows is None and p_scale is None and q_rows is None and scale == 1.0 and _by_cublas(p, q):
        # P^T as a column-major view: every expert's rows then lie along the strided dim, which needs no alignment
        return torch._grouped_mm(p.t(), q, offs=offsets[1:].to(torch.int32))
    c = torch.empty((experts, mo, no), device=q.device, dtype=q.dtype)

    def grid(meta):
        return (experts * triton.cdiv(mo, meta["BLOCK_M"]) * triton.cdiv(no, meta["BLOCK_N"]),)

    _weight_grad_kernel[grid](
        p, p if p_rows is None else p_rows, p if p_scale is None else p_scale, q, q if q_rows is None else q_rows,
        c, offsets, mo, no,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), c.stride(0), c.stride(1), c.stride(2),
        float(scale),
        P_GATHER=p_rows is not None, P_SCALE=p_scale is not None, Q_GATHER=q_rows is not None,
    )
    return c


def _by_cublas(p: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether P^T Q per expert runs as cuBLAS's grouped GEMM (`torch._grouped_mm`): bf16 (as it was measured),
    both sides wider than a LoRA rank, rows contiguous and 16-byte aligned, offsets that fit int32, and a Hopper GPU
    or the CPU (where torch has a reference of it, which the tests run). On an H200 at k2-1b's experts it took 0.175
    ms against the Triton kernel's 0.312 on rows gathered and weighted in its loads (down) and 0.261 on gathered ones
    (gate, up); the copies into expert order it needs first take 0.08 ms each, one for down and one shared by gate
    and up: 0.82x the time per layer (`benchmarks/results/2026-12-01-nvidia-h200-moe-weight-grad-sweep.md`)."""
    if p.dtype != torch.bfloat16 or min(p.shape[1], q.shape[1]) <= WEIGHT_GRAD_THIN_SIDE or p.shape[0] >= 2**31:
        return False
    for t in (p, q):
        if t.stride(1) != 1 or t.stride(0) * t.element_size() % 16 or t.data_ptr() % 16:
            return False
    return not p.is_cuda or torch.cuda.get_device_capability(p.device) == (9, 0)


def gather_rows(x: torch.Tensor, rows: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """[M, C] contiguous, in x's dtype: x's row rows[i] (rows [M] int64; None: row i) as row i, times scale[i]
    (scale [M] fp32) in fp32 when given, rounded once. Puts rows in expert order (and weights them) for
    `grouped_weight_grad`'s cuBLAS path."""
    m = rows.shape[0] if rows is not None else x.shape[0]
    _check_rows("gather_rows", "rows", rows, m, x)
    _check_row_scale("gather_rows", "scale", scale, m, x)
    out = torch.empty((m, x.shape[1]), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    block_m, block_c = (16, 16) if INTERPRETED else (8, 512)
    _gather_rows_kernel[(triton.cdiv(m, block_m), triton.cdiv(x.shape[1], block_c))](
        x, x if rows is None else rows, x if scale is None else scale, out, m, x.shape[1], x.stride(0), x.stride(1),
        GATHER=rows is not None, ROW_SCALE=scale is not None, BLOCK_M=block_m, BLOCK_C=block_c)
    return out


def segment_norms(x: torch.Tensor, offsets: torch.Tensor, *, rows: torch.Tensor | None = None,
                  row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """[E, C] fp32: ||X_e[:, c]|| over each expert's rows of x [M, C] (CE-LoRA's channel scores).

    rows [M] int64 reads x's row rows[i] as the i-th (a gather); row_scale [M] fp32 scales row i first, rounding it
    to x's dtype as the weighted gradient it stands for is rounded.
    """
    experts = offsets.shape[0] - 1
    m = rows.shape[0] if rows is not None else x.shape[0]
    _check_offsets("segment_norms", offsets, experts, x)
    _check_rows("segment_norms", "rows", rows, m, x)
    _check_row_scale("segment_norms", "row_scale", row_scale, m, x)
    out = torch.empty((experts, x.shape[1]), device=x.device, dtype=torch.float32)
    block_c = 16 if INTERPRETED else 128
    _segment_sumsq_kernel[(experts, triton.cdiv(x.shape[1], block_c))](
        x, x if rows is None else rows, x if row_scale is None else row_scale, out, offsets, x.shape[1],
        x.stride(0), x.stride(1), GATHER=rows is not None, ROW_SCALE=row_scale is not None,
        BLOCK_M=16 if INTERPRETED else 64, BLOCK_C=block_c,
    )
    return out.sqrt_()


def pack_columns(x: torch.Tensor, offsets: torch.Tensor, kept: torch.Tensor, *,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
    """[M, S]: row i of x [M, C] (or x's row rows[i], rows [M] int64) at its expert's kept columns kept[e]
    ([E, S] int64).

    CE-LoRA's GEMM over the kept channels then reads dense rows: gathering the columns inside the GEMM's loads runs
    across x's contiguous dim, a scalar access per element (k2c/runtime/kernels/lora.py measures why it loses).
    Here too each kept element is its own load, but the loads are independent: a trial that loaded whole tiles and
    picked the kept columns out of registers (tl.gather) took 0.072 against 0.045 ms at [65536, 512] on an H200
    (benchmarks/results/2026-12-02-nvidia-h200-kernels-pack-trial.md).
    """
    experts, s = kept.shape
    m = rows.shape[0] if rows is not None else x.shape[0]
    _check_offsets("pack_columns", offsets, experts, x)
    _check_rows("pack_columns", "rows", rows, m, x)
    if kept.dtype != torch.int64 or kept.stride(1) != 1:
        raise ValueError(f"pack_columns: kept must be int64 with contiguous rows, found {kept.dtype}")
    out = torch.empty((m, s), device=x.device, dtype=x.dtype)
    block_m, block_n = (16, 16) if INTERPRETED else (64, 64)
    grid = ((triton.cdiv(m, block_m) + experts) * triton.cdiv(s, block_n),)
    _pack_columns_kernel[grid](x, x if rows is None else rows, kept, out, offsets, m, s, experts, x.stride(0),
                               x.stride(1), kept.stride(0), out.stride(0), GATHER=rows is not None,
                               BLOCK_E=_block_e(experts), BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def slot_sum(slots: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """[N, H] in slots' dtype: the sum of slots [N, k, H] over its k (token, slot) rows, plus add [N, H] if given,
    in fp32 and rounded once; one pass, where torch's sum and add take two and round twice."""
    n, k, h = slots.shape
    if add is not None and (add.shape != (n, h) or add.dtype != slots.dtype or add.device != slots.device):
        raise ValueError(f"slot_sum: add must be {slots.dtype} [{n}, {h}] on {slots.device}, found {add.dtype} "
                         f"{tuple(add.shape)} on {add.device}")
    out = torch.empty((n, h), device=slots.device, dtype=slots.dtype)
    if n == 0:
        return out
    block_n, block_h = (16, 16) if INTERPRETED else (8, 512)
    _slot_sum_kernel[(triton.cdiv(n, block_n), triton.cdiv(h, block_h))](
        slots, slots if add is None else add, out, n, h, *slots.stride(),
        *((0, 0) if add is None else add.stride()), K=k, ADD=add is not None, BLOCK_N=block_n, BLOCK_H=block_h)
    return out


class _SlotSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, slots, add):
        ctx.slots_shape, ctx.has_add = slots.shape, add is not None
        return slot_sum(slots, add)

    @staticmethod
    def backward(ctx, dout):
        # every slot's gradient is the sum's, a view with stride 0 over the slots, which the experts read in place
        dslots = dout.unsqueeze(1).expand(ctx.slots_shape)
        return dslots, dout if ctx.has_add else None


def combine_slots(slots: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """`slot_sum` with autograd: the MoE layer's output from the experts' [N, k, H] and the shared experts' [N, H]."""
    return _SlotSum.apply(slots, add)


def row_dots(x: torch.Tensor, y: torch.Tensor, *, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[M] fp32: X_i . Y_i, the products and their sum in fp32, for x [*, C] read at rows [M] int64 (a gather; None:
    row i) and y [M, C] of x's dtype, in one pass over both (no gathered or fp32 copies of either): the combine
    weights' gradient dOut . y under CE-LoRA on down, and the down adapter's share of it (dOut B_d) . (act A_d^T)."""
    m, c = y.shape
    _check_dtype("row_dots", y, x=x)
    _check_rows("row_dots", "rows", rows, m, x)
    if x.ndim != 2 or x.shape[1] != c or (rows is None and x.shape[0] != m):
        raise ValueError(f"row_dots: x {tuple(x.shape)} does not fit y {tuple(y.shape)}")
    out = torch.empty(m, device=y.device, dtype=torch.float32)
    if m == 0:
        return out
    block_m, block_c = (16, 16) if INTERPRETED else (16, 256)
    _row_dots_kernel[(triton.cdiv(m, block_m),)](x, x if rows is None else rows, y, out, m, c, x.stride(0),
                                                  x.stride(1), y.stride(0), y.stride(1), GATHER=rows is not None,
                                                  BLOCK_M=block_m, BLOCK_C=block_c)
    return out


def gate_up_swiglu(x: torch.Tensor, x_rows: torch.Tensor, offsets: torch.Tensor, gate_proj: torch.Tensor,
                   up_proj: torch.Tensor, low_gate: LowRank | None = None, low_up: LowRank | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, silu(gate) * up), each [M, I]: row i is x's row x_rows[i] (its token) times its expert's
    W_gate^T and W_up^T ([E, I, H] each), plus s (X A^T) B^T from low = (X A^T [M, r], B^T [E, r, I], s)."""
    m, (experts, inter, hidden) = x_rows.shape[0], gate_proj.shape
    _check_dtype("gate_up_swiglu", x, gate_proj=gate_proj, up_proj=up_proj)
    _check_offsets("gate_up_swiglu", offsets, experts, x)
    _check_rows("gate_up_swiglu", "x_rows", x_rows, m, x)
    if up_proj.shape != gate_proj.shape or up_proj.stride() != gate_proj.stride() or x.shape[1] != hidden:
        raise ValueError(f"gate_up_swiglu: x {tuple(x.shape)}, gate {tuple(gate_proj.shape)} and up "
                         f"{tuple(up_proj.shape)} must agree, gate and up with one layout")
    gate, up, act = (torch.empty((m, inter), device=x.device, dtype=x.dtype) for _ in range(3))
    lag, lbg, scale_g = low_gate if low_gate is not None else (x, gate_proj, 1.0)
    lau, lbu, scale_u = low_up if low_up is not None else (x, gate_proj, 1.0)
    rg = lag.shape[1] if low_gate is not None else 0
    ru = lau.shape[1] if low_up is not None else 0

    def grid(meta):
        return ((triton.cdiv(m, meta["BLOCK_M"]) + experts) * triton.cdiv(inter, meta["BLOCK_N"]),)

    _gate_up_kernel[grid](
        x, x_rows, gate_proj, up_proj, lag, lbg, lau, lbu, gate, up, act, offsets,
        m, inter, hidden, rg, ru, experts,
        x.stride(0), x.stride(1), gate_proj.stride(0), gate_proj.stride(1), gate_proj.stride(2),
        lag.stride(0), lag.stride(1), lbg.stride(0), lbg.stride(1), lbg.stride(2),
        lau.stride(0), lau.stride(1), lbu.stride(0), lbu.stride(1), lbu.stride(2),
        gate.stride(0), gate.stride(1),
        float(scale_g), float(scale_u),
        LORA_GATE=low_gate is not None, LORA_UP=low_up is not None,
        BLOCK_RG=_block(rg), BLOCK_RU=_block(ru), BLOCK_E=_block_e(experts),
    )
    return gate, up, act


def down_backward(dout: torch.Tensor, dout_rows: torch.Tensor | None, offsets: torch.Tensor, down_proj: torch.Tensor,
                  weights: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, low: LowRank | None = None,
                  combine: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(d gate, d up, act . (dOut W_d)) for the rows of `swiglu_experts`: see `_down_backward_kernel`.

    dout [*, H] read at the rows dout_rows [M] (None: row i); down_proj [E, H, I]; weights [M] fp32; gate, up
    [M, I]; low = (dOut B_d [M, r], A_d [E, r, I], s). The third output [M] fp32 (None unless `combine`) is the
    combine weight's gradient, act . (dOut W_d + s (dOut B_d) A_d).
    CE-LoRA passes its packed kept channels dOut[:, S] as dout and R_S [E, |S|, I] as down_proj.
    """
    m, (experts, hidden, inter) = gate.shape[0], down_proj.shape
    _check_dtype("down_backward", gate, dout=dout, down_proj=down_proj, up=up)
    _check_offsets("down_backward", offsets, experts, gate)
    _check_rows("down_backward", "dout_rows", dout_rows, m, gate)
    if dout_rows is None and dout.shape[0] != m:
        raise ValueError(f"down_backward: dout must have M={m} rows without dout_rows, found {tuple(dout.shape)}")
    if gate.shape != (m, inter) or up.stride() != gate.stride() or dout.shape[1] != hidden:
        raise ValueError(f"down_backward: gate {tuple(gate.shape)}, up, dout {tuple(dout.shape)} and down_proj "
                         f"{tuple(down_proj.shape)} do not fit M={m}")
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    tiles_n = triton.cdiv(inter, DOWN_BACKWARD_BLOCK_N)
    dw = torch.empty((m, tiles_n) if combine else (0, 1), device=gate.device, dtype=torch.float32)
    lu, ad, scale = low if low is not None else (gate, down_proj, 1.0)
    r = lu.shape[1] if low is not None else 0

    def grid(meta):
        return ((triton.cdiv(m, meta["BLOCK_M"]) + experts) * tiles_n,)

    _down_backward_kernel[grid](
        dout, dout if dout_rows is None else dout_rows, down_proj, lu, ad, weights, gate, up, dgate, dup, dw, offsets,
        m, inter, hidden, r, experts,
        dout.stride(0), dout.stride(1), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
        lu.stride(0), lu.stride(1), ad.stride(0), ad.stride(1), ad.stride(2),
        gate.stride(0), gate.stride(1), dw.stride(0),
        float(scale),
        GATHER=dout_rows is not None, COMBINE=combine, LOW_RANK=low is not None,
        BLOCK_R=_block(r), BLOCK_E=_block_e(experts),
    )
    return dgate, dup, dw.sum(dim=1) if combine else None


# --------------------------------------------------------------------------- autograd: one projection


# CE-LoRA's stand-in for W: called with a function that gives the per-expert channel norms ||dY_e[:, i]|| [E, m]
# (run only on a step that chooses the kept channels); returns (B0 [E, m, k], A0 [E, k, n], S [E, |S|] int64,
# R_S [E, |S|, n]).
Residual = Callable[[Callable[[], torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ExpertAdapter:
    """A LoRA adapter on one projection of the expert stack: W[e] + s B[e] A[e], CE-LoRA's input gradient when
    `residual` is given."""

    lora_A: torch.Tensor  # [E, r, in]
    lora_B: torch.Tensor  # [E, out, r]
    scale: float
    residual: Residual | None = None


class _GroupedLinear(torch.autograd.Function):
    """x [M, n] (rows grouped by expert), x_adapter [M, n] (x or dropout(x)), W [E, m, n], A [E, r, n] and
    B [E, m, r] (or None, None: no adapter) -> [M, m]."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, lora_A, lora_B, offsets, scale, residual):
        need_w, need_a, need_b = ctx.needs_input_grad[2:5]
        if lora_A is None:
            y, xa = grouped_mm(x, weight.transpose(1, 2), offsets), None
        else:
            if need_w:
                raise RuntimeError("an adapted base weight must be frozen (requires_grad=False): it gets no gradient")
            xa = grouped_mm(x_adapter, lora_A.transpose(1, 2), offsets)
            y = grouped_mm(x, weight.transpose(1, 2), offsets, low=(xa, lora_B.transpose(1, 2), scale))
        # X for dW, X' for dA, X' A^T for dB; W, A and B are parameters and cost nothing to keep
        ctx.save_for_backward(x if need_w else None, x_adapter if need_a else None, xa if need_b else None,
                              weight, lora_A, lora_B, offsets)
        ctx.scale, ctx.residual, ctx.shared = scale, residual, x_adapter is x
        return y

    @staticmethod
    def backward(ctx, dy):
        x, x_adapter, xa, weight, lora_A, lora_B, offsets = ctx.saved_tensors
        need_x, need_x_adapter, need_w, need_a, need_b = ctx.needs_input_grad[:5]
        scale, residual, shared = ctx.scale, ctx.residual, ctx.shared
        dx = dx_adapter = grad_w = grad_a = grad_b = None
        if lora_A is None:
            if need_x:
                dx = grouped_mm(dy, weight, offsets)
            if need_w:
                grad_w = grouped_weight_grad(dy, x, offsets)
            return dx, None, grad_w, None, None, None, None, None

        if residual is not None and (need_x or need_x_adapter):
            svd_B, svd_A, kept, kept_rows = residual(lambda: segment_norms(dy, offsets))
            r = lora_B.shape[2]
            # [dY B | dY B0], one pass over dY; dY B first, so that its rows start 16-byte aligned (empty_aligned_rows)
            low = grouped_mm(dy, torch.cat((lora_B, svd_B), dim=2), offsets)
            dy_B = low[:, :r]
            if shared:
                dx = grouped_mm(pack_columns(dy, offsets, kept), kept_rows, offsets,
                                low=(low, torch.cat((lora_A * scale, svd_A), dim=1), 1.0))
            else:
                dx = grouped_mm(pack_columns(dy, offsets, kept), kept_rows, offsets, low=(low[:, r:], svd_A, 1.0))
        else:
            dy_B = grouped_mm(dy, lora_B, offsets)
            if need_x:
                dx = grouped_mm(dy, weight, offsets, low=(dy_B, lora_A, scale) if shared else None)
        if need_x_adapter and not shared:
            dx_adapter = grouped_mm(dy_B, lora_A, offsets).mul_(scale)
        if need_a:
            grad_a = grouped_weight_grad(dy_B, x_adapter, offsets, scale=scale)
        if need_b:
            grad_b = grouped_weight_grad(dy, xa, offsets, scale=scale)
        return dx, dx_adapter, None, grad_a, grad_b, None, None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, adapter: ExpertAdapter | None = None,
                   x_adapter: torch.Tensor | None = None) -> torch.Tensor:
    """[M, out]: row i of x [M, in] (rows grouped by expert, offsets [E+1] int64) through its expert's W [E, out, in]
    and adapter, whose input is x_adapter (dropout(x); default x). Differentiable in x, x_adapter, W (without an
    adapter; with one W must be frozen), A and B."""
    if adapter is None:
        return _GroupedLinear.apply(x, None, weight, None, None, offsets, 1.0, None)
    return _GroupedLinear.apply(x, x if x_adapter is None else x_adapter, weight, adapter.lora_A, adapter.lora_B,
                                offsets, adapter.scale, adapter.residual)


# --------------------------------------------------------------------------- autograd: the routed SwiGLU experts


class _SwiGLUExperts(torch.autograd.Function):
    """x [N, H] (a row per token), weights [M] fp32 (each expert row's combine weight), W_gate, W_up [E, I, H],
    W_down [E, H, I], then each projection's (A, B) or (None, None) -> [N, k, H]: row (t, s) is the weighted output
    of token t's s-th expert. `order` [M] int64 gives each expert row's (token, slot) position t*k + s; `residuals`
    holds each projection's CE-LoRA `Residual` (or None: its exact input gradient)."""

    @staticmethod
    def forward(ctx, x, weights, gate_proj, up_proj, down_proj, gate_A, gate_B, up_A, up_B, down_A, down_B,
                order, offsets, top_k, scales, residuals):
        n, hidden = x.shape
        m = order.shape[0]
        scale_g, scale_u, scale_d = scales
        x_rows = order // top_k  # each expert row's token
        # the adapters' inputs X A^T: one thin pass over the gathered rows for gate and up together
        xa_gate = xa_up = xa_down = None
        if gate_A is not None or up_A is not None:
            stacked = torch.cat([a for a in (gate_A, up_A) if a is not None], dim=1)
            xa = grouped_mm(x, stacked.transpose(1, 2), offsets, a_rows=x_rows)
            xa_gate = xa[:, : gate_A.shape[1]] if gate_A is not None else None
            xa_up = xa[:, xa.shape[1] - up_A.shape[1]:] if up_A is not None else None
        gate, up, act = gate_up_swiglu(
            x, x_rows, offsets, gate_proj, up_proj,
            low_gate=(xa_gate, gate_B.transpose(1, 2), scale_g) if gate_A is not None else None,
            low_up=(xa_up, up_B.transpose(1, 2), scale_u) if up_A is not None else None,
        )
        low_down = None
        if down_A is not None:
            xa_down = grouped_mm(act, down_A.transpose(1, 2), offsets)
            low_down = (xa_down, down_B.transpose(1, 2), scale_d)
        # CE-LoRA on down approximates dOut W_d, so the combine weight's gradient dOut . y cannot come from it
        # (as the exact path's act . (dOut W_d) does): keep y, the rows before their weight
        y = x.new_empty((m, hidden)) if residuals[2] is not None else None
        out = grouped_mm(act, down_proj.transpose(1, 2), offsets, low=low_down, row_scale=weights, out_rows=order,
                         out_size=m, unscaled=y)
        ctx.save_for_backward(x, weights, gate_proj, up_proj, down_proj, gate_A, gate_B, up_A, up_B, down_A, down_B,
                              order, offsets, gate, up, act, xa_gate, xa_up, xa_down, y)
        ctx.top_k, ctx.scales, ctx.residuals = top_k, scales, residuals
        return out.view(n, top_k, hidden)

    @staticmethod
    def backward(ctx, dout):
        (x, weights, gate_proj, up_proj, down_proj, gate_A, gate_B, up_A, up_B, down_A, down_B, order, offsets,
         gate, up, act, xa_gate, xa_up, xa_down, y) = ctx.saved_tensors
        need = dict(zip(("x", "weights", "gate_proj", "up_proj", "down_proj", "gate_A", "gate_B", "up_A", "up_B",
                         "down_A", "down_B"), ctx.needs_input_grad, strict=False))
        scale_g, scale_u, scale_d = ctx.scales
        residual_g, residual_u, residual_d = ctx.residuals
        k = ctx.top_k
        grads = dict.fromkeys(need)
        # dout [N, k, H] is usually the slot sum's gradient, expanded over the slots (stride 0): read in place, a
        # token's row for each of its expert rows; otherwise a row per (token, slot)
        x_rows = order // k
        if dout.stride(1) == 0 and dout.stride(2) == 1:
            dout, dout_rows = dout.select(1, 0), x_rows
        else:
            dout, dout_rows = dout.reshape(-1, dout.shape[2]).contiguous(), order

        # down: d gate, d up and the combine weights' gradient from one GEMM over dOut gathered by (token, slot)
        lu = None
        if residual_d is not None:
            # CE-LoRA: dAct ~ (dY B0) A0 + dY[:, S] R_S with dY = weight * dOut, the weight applied in the epilogue
            svd_B, svd_A, kept, kept_rows = residual_d(
                lambda: segment_norms(dout, offsets, rows=dout_rows, row_scale=weights))
            low_cols = grouped_mm(dout, torch.cat((down_B, svd_B), dim=2), offsets, a_rows=dout_rows)
            lu = low_cols[:, :down_B.shape[2]]  # dOut B_d, first: its rows start aligned
            low = (low_cols, torch.cat((down_A * scale_d, svd_A), dim=1), 1.0)
            dgate, dup, _ = down_backward(pack_columns(dout, offsets, kept, rows=dout_rows), None, offsets, kept_rows,
                                          weights, gate, up, low=low, combine=False)
            dw = row_dots(dout, y, rows=dout_rows)
        else:
            if down_A is not None:
                lu = grouped_mm(dout, down_B, offsets, a_rows=dout_rows)  # dOut B_d, before the combine weight
            dgate, dup, dw = down_backward(dout, dout_rows, offsets, down_proj, weights, gate, up,
                                           low=(lu, down_A, scale_d) if lu is not None else None)
        grads["weights"] = dw
        if need["down_proj"]:
            # dY = weight * dOut in expert order, for the full weights' grouped GEMM on dense rows
            grads["down_proj"] = grouped_weight_grad(gather_rows(dout, dout_rows, weights), act, offsets)
        if lu is not None and need["down_A"]:
            grads["down_A"] = grouped_weight_grad(lu, act, offsets, p_scale=weights, scale=scale_d)
        if lu is not None and need["down_B"]:
            grads["down_B"] = grouped_weight_grad(dout, xa_down, offsets, p_rows=dout_rows, p_scale=weights,
                                                  scale=scale_d)

        # gate and up: dx from both products in one accumulator, each row stored at its (token, slot); an adapter's
        # low-rank terms (and CE-LoRA's SVD pair) ride in the epilogue, CE-LoRA's product runs over its kept channels
        products, low_a, low_b, d_Bs = [], [], [], {}
        for name, d, weight, lora_A, lora_B, scale, residual in (
                ("gate", dgate, gate_proj, gate_A, gate_B, scale_g, residual_g),
                ("up", dup, up_proj, up_A, up_B, scale_u, residual_u)):
            if residual is not None and need["x"]:
                svd_B, svd_A, kept, kept_rows = residual(lambda d=d: segment_norms(d, offsets))
                cols = grouped_mm(d, torch.cat((lora_B, svd_B), dim=2), offsets)  # [dY B | dY B0], one pass
                d_Bs[name] = cols[:, :lora_B.shape[2]]  # first: its rows start aligned
                products.append((pack_columns(d, offsets, kept), kept_rows))
                low_a.append(cols)
                low_b.append(torch.cat((lora_A * scale, svd_A), dim=1))
                continue
            products.append((d, weight))
            if lora_A is not None:
                d_Bs[name] = grouped_mm(d, lora_B, offsets)
                low_a.append(d_Bs[name])
                low_b.append(lora_A * scale)
        if need["x"]:
            low = (torch.cat(low_a, dim=1), torch.cat(low_b, dim=1), 1.0) if low_a else None
            (a, w), (a2, w2) = products
            dx_slots = grouped_mm(a, w, offsets, a2=a2, w2=w2, low=low, out_rows=order, out_size=order.shape[0])
            grads["x"] = slot_sum(dx_slots.view(-1, k, x.shape[1]))
        x_grouped = gather_rows(x, x_rows) if need["gate_proj"] or need["up_proj"] else None  # one copy for both
        # dA_gate and dA_up both read x by token: with one scale, one pass gives [dA_gate; dA_up]
        both_A = all(name in d_Bs and need[f"{name}_A"] for name in ("gate", "up")) and scale_g == scale_u
        if both_A:
            stacked = grouped_weight_grad(torch.cat((d_Bs["gate"], d_Bs["up"]), dim=1), x, offsets, q_rows=x_rows,
                                          scale=scale_g)
            grads["gate_A"], grads["up_A"] = stacked.split((gate_A.shape[1], up_A.shape[1]), dim=1)
        for name, d, xa, scale in (("gate", dgate, xa_gate, scale_g), ("up", dup, xa_up, scale_u)):
            if need[f"{name}_proj"]:
                grads[f"{name}_proj"] = grouped_weight_grad(d, x_grouped, offsets)
            if name in d_Bs and need[f"{name}_A"] and not both_A:
                grads[f"{name}_A"] = grouped_weight_grad(d_Bs[name], x, offsets, q_rows=x_rows, scale=scale)
            if name in d_Bs and need[f"{name}_B"]:
                grads[f"{name}_B"] = grouped_weight_grad(d, xa, offsets, scale=scale)
        return (*grads.values(), None, None, None, None, None)


def swiglu_experts(x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int,
                   gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                   adapters: dict[str, ExpertAdapter] | None = None) -> torch.Tensor:
    """[N, k, H]: slot (t, s) holds weights[i] * down_e(silu(gate_e(x_t)) * up_e(x_t)) for the expert row i at
    (token, slot) position order[i] = t*k + s; summing over the slots gives the routed experts' output.

    x [N, H], a row per token; weights [M] fp32; order [M] int64; offsets [E+1] int64 (rows grouped by expert, as
    `MoE.route` groups them); W_gate, W_up [E, I, H], W_down [E, H, I]. adapters: LoRA by projection name
    (`gate_proj`, `up_proj`, `down_proj`), their input x itself (no dropout), with CE-LoRA's input gradient where
    an adapter has a residual. Differentiable in x, weights, the weights without an adapter, and every A and B.
    """
    adapters = adapters or {}
    if x.ndim != 2 or order.shape != weights.shape or order.shape[0] != x.shape[0] * top_k:
        raise ValueError(f"swiglu_experts: x {tuple(x.shape)}, weights {tuple(weights.shape)} and order "
                         f"{tuple(order.shape)} do not fit top_k={top_k}")
    factors: list[torch.Tensor | None] = []
    for name, weight in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
        adapter = adapters.get(name)
        if adapter is not None and weight.requires_grad:
            raise RuntimeError(f"swiglu_experts: {name} has an adapter, so it must be frozen (requires_grad=False)")
        factors += (adapter.lora_A, adapter.lora_B) if adapter is not None else (None, None)
    names = ("gate_proj", "up_proj", "down_proj")
    scales = tuple(adapters[name].scale if name in adapters else 1.0 for name in names)
    residuals = tuple(adapters[name].residual if name in adapters else None for name in names)
    return _SwiGLUExperts.apply(x, weights, gate_proj, up_proj, down_proj, *factors, order, offsets, top_k, scales,
                                residuals)
