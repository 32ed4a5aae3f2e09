"""Muon's Newton-Schulz iteration, batched, as Triton kernels; and the memory-bound passes of a Muon step around it.

The torch reference is `k2c.runtime.optim.newton_schulz`; `newton_schulz` here keeps its contract. Each of the
quintic steps on a batch of wide matrices X [B, n, m] (n <= m) is three launches over the whole batch, every
product accumulating in fp32 and rounding once into the working dtype (bf16 on a GPU), as torch's baddbmm does:

- `gram`: G = X X^T. G is symmetric, so only tiles from the diagonal rightwards are computed, and each entry
  above the diagonal is stored twice, as itself and mirrored: a little over half of the 2 n^2 m multiply-adds.
- `gram_polynomial`: P = b G + c G G. G G = G G^T is symmetric too: the same kernel, half of the 2 n^3.
- `apply_polynomial`: X' = a X + P X, the full 2 n^2 m.

The Gram form (`form="gram"`; `k2c.runtime.optim.newton_schulz` says what it is) runs on the same kernels: `gram` into
fp16, `gram_polynomial` with a I added on the diagonal tiles (Z), `commuting_product` for Q Z and Z R Z (the product
of two symmetric matrices that commute is symmetric, so half of it is computed here too), and `apply_polynomial` with
a = 0 for Q X at each restart.

The operand tiles come in through tensor descriptors (Hopper's tensor memory accelerator; zeros past a matrix's
edges), so a matrix's rows must be a multiple of 16 bytes (`fits`; other shapes take the torch path). Tiles are
numbered matrix by matrix: the programs resident at one time work on one or two matrices, whose X and G stay in L2.
A persistent grid (a program per multiprocessor, looping over tiles) is one of the autotuned choices: small matrices
make short tiles, whose set-up a launch per tile would repeat. Flattened, its tile loop and K loop are pipelined as
one, so that the next tile's loads overlap this one's epilogue: on an H200, at 276 matrices 512 x 1536, 4-9% off
the Gram product and 14-15% off G G for the same tiles (benchmarks/results/*-newton-schulz-sweep.md). Tall matrices
are iterated on transposed (the Gram matrix is then the small one); a caller batches them with the wide matrices of
the transposed shape.

`muon_input` and `muon_update` are a Muon step's elementwise work, one pass over memory each. The input pass
advances the momentum, forms the Nesterov input U and writes it, unnormalised, into the batch in the working dtype
(transposed where the matrix is tall), summing U^2 per tile on the way; the Frobenius norms are complete only
after that pass, so instead of a second pass that divides by them, the first Newton-Schulz step scales by
1 / (||U||_F + eps) in its fp32 epilogues: it starts from s V with V = U rounded, where the reference starts from
U s rounded, the same size of rounding error (one bf16 rounding), for 14 bytes an element moved instead of 22.
The update pass reads the weight and the orthogonalised matrix once. Per-tile sums of squares are added in torch,
not by atomics, so a step gives the same bits on every run.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from k2c.runtime.kernels.tiles import addressable, column_halves, descriptor_scratch
from k2c.runtime.kernels.tuning import autotune
from k2c.runtime.plan import GRAM, NS_FORMS, STANDARD, restart_segments

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-7  # added to the Frobenius norm before dividing by it, as torch.optim.Muon and the reference do
# Under TRITON_INTERPRET=1 (the CPU tests) one small config runs and nothing is timed. Read at import, as Triton
# reads it when it decorates the kernels below.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
# The elementwise passes' tiles are TILE x TILE: square, so that a tile can be written transposed through shared
# memory. Small under the interpreter, so that the tests' shapes cross tile edges.
TILE = 16 if INTERPRETED else 64


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the Gram form's n x n iterates for matrices of `dtype`: fp16 for half precision, whose 3 more
    mantissa bits than bf16 keep the Gram matrix's small eigenvalues from turning negative and growing, else `dtype`.
    fp16's range is ample: R has norm about 1 at most, Z and Q about a^3 = 41 (3 steps between restarts)."""
    return torch.float16 if dtype in (torch.bfloat16, torch.float16) else dtype


# --------------------------------------------------------------------------- Newton-Schulz kernels


def _configs(symmetric: bool) -> list[triton.Config]:
    """Tile shapes (square BLOCK_N = BLOCK_M for the symmetric products); PERSISTENT: one program per
    multiprocessor looping over tiles, else one program per tile; FLATTEN (persistent only): the tile loop and
    its K loop software-pipelined as one, so that a tile's first loads are in flight during the last one's
    epilogue, which short K (n = 512: 8 steps) would otherwise leave exposed."""
    if INTERPRETED:  # one config, timed by no one: tiles of 16 (tl.dot's smallest), so that the tests' shapes cross
        # their edges; four persistent programs (`_multiprocessors`), so that each loops over several tiles and
        # matrices (flattening changes nothing under the interpreter)
        return [triton.Config({"BLOCK_N": 16, "BLOCK_M": 16 if symmetric else 32, "BLOCK_K": 16, "PERSISTENT": True,
                               "FLATTEN": True, **({} if symmetric else {"HALVES": True})})]
    # bf16 on Hopper (H200 sweep at 276 matrices 512 x 1536, 2026-12-01): 128 x 128 tiles for the symmetric
    # products, whose mirrored store stages a transposed tile in shared memory (128 x 256 ones do not fit); 128 x 256
    # tiles keep two warpgroups busy in the polynomial's: with 3 stages, the flattened loop fits in shared memory only
    # with its epilogue in halves (`benchmarks/offline_compile.py`: 208 KiB, whole 272), with 2 stages whole; in a
    # later sweep (`-newton-schulz-px-sweep.md`) the halves took 0.488 ms, 2 stages 0.583, 128 x 128 0.514; smaller
    # tiles for matrices too small to fill the GPU. Configs that do not fit are dropped by the autotuner.
    shapes: list[tuple[int, int, int, int, int, bool | None]]  # HALVES: None for the symmetric products
    if symmetric:
        shapes = [(128, 128, 64, 4, 4, None), (128, 128, 64, 5, 8, None), (64, 64, 64, 4, 4, None)]
    else:
        shapes = [(128, 256, 64, 2, 8, False), (128, 256, 64, 3, 8, True), (128, 128, 64, 4, 8, False),
                  (128, 128, 64, 4, 4, False), (64, 128, 64, 4, 4, False)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_M": m, "BLOCK_K": k, "PERSISTENT": persistent, "FLATTEN": flat,
                           **({} if halves is None else {"HALVES": halves})}, num_stages=stages, num_warps=warps)
            for n, m, k, stages, warps, halves in shapes
            for persistent, flat in ((False, False), (True, False), (True, True))]


@triton.jit
def _triangle_tile(tile):
    """Tile number `tile` of a matrix's tiles on and above the diagonal, numbered column by column: its block row i
    and block column j, i <= j. Column j starts at tile j (j + 1) / 2; the square root's rounding is corrected
    exactly in integers."""
    j = ((tl.sqrt((8 * tile + 1).to(tl.float32)) - 1) / 2).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > tile, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= tile, j + 1, j)
    return tile - j * (j + 1) // 2, j


@autotune(_configs(symmetric=True), key=["BATCH", "N", "K"])
@triton.jit
def _symmetric_product_kernel(
    x_ptr,  # X [BATCH, N, K], contiguous
    y_ptr,  # Y [BATCH, N, K], contiguous (X itself for a Gram matrix)
    scale_ptr,  # S [BATCH] fp32 (SCALED only): matrix b's X and Y are taken as S[b] X and S[b] Y
    out_ptr,  # OUT [BATCH, N, N], contiguous: alpha X Y^T (+ beta X, when ADD_X; + gamma I, when DIAG), in OUT's dtype
    BATCH, N, K,
    alpha, beta, gamma,
    SCALED: tl.constexpr,
    ADD_X: tl.constexpr,  # add beta X: X is then square and symmetric (G), and X X^T = G G
    DIAG: tl.constexpr,  # add gamma I (ADD_X only)
    TWO_OPERANDS: tl.constexpr,  # Y is not X
    BLOCK_N: tl.constexpr,  # a tile's rows and columns (BLOCK_M = BLOCK_N: tiles lie on or off the diagonal)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,  # read by the grid only
    FLATTEN: tl.constexpr,
):
    tl.static_assert(BLOCK_N == BLOCK_M)
    # the tensor memory accelerator loads the operand tiles, zero beyond each matrix's edges, and clips the stores
    rows_of = tl.make_tensor_descriptor(x_ptr, [BATCH, N, K], [N * K, K, 1], [1, BLOCK_N, BLOCK_K])
    # a second descriptor only for a second operand, and the diagonal's add only where asked: each costs registers
    # (benchmarks/offline_compile.py, 128 x 128 x 64 tiles, flattened: G G takes 132 a thread at 8 warps; with both,
    # the add as a branch on i == j, it took 208, and at 4 warps spilled 1394 bytes)
    cols_of = rows_of
    if TWO_OPERANDS:
        cols_of = tl.make_tensor_descriptor(y_ptr, [BATCH, N, K], [N * K, K, 1], [1, BLOCK_N, BLOCK_K])
    out_of = tl.make_tensor_descriptor(out_ptr, [BATCH, N, N], [N * N, N, 1], [1, BLOCK_N, BLOCK_N])
    x_tile = tl.make_tensor_descriptor(x_ptr, [BATCH, N, K], [N * K, K, 1], [1, BLOCK_N, BLOCK_N])  # ADD_X: K = N
    blocks = tl.cdiv(N, BLOCK_N)
    tiles = blocks * (blocks + 1) // 2  # of one matrix, on and above its diagonal
    # tiles numbered matrix by matrix, so that the programs resident at one time share one or two matrices in L2
    for tile in tl.range(tl.program_id(0), BATCH * tiles, tl.num_programs(0), flatten=FLATTEN):
        batch = tile // tiles
        i, j = _triangle_tile(tile % tiles)
        row, col = i * BLOCK_N, j * BLOCK_N

        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            a = rows_of.load([batch, row, k]).reshape(BLOCK_N, BLOCK_K)
            b = cols_of.load([batch, col, k]).reshape(BLOCK_N, BLOCK_K)
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")

        if SCALED:
            s = tl.load(scale_ptr + batch)
            acc *= alpha * s * s
        else:
            acc *= alpha
        r = tl.arange(0, BLOCK_N)
        if ADD_X:
            acc += beta * x_tile.load([batch, row, col]).reshape(BLOCK_N, BLOCK_N).to(tl.float32)
            if DIAG:
                acc = tl.where((r[:, None] == r[None, :]) & (i == j), acc + gamma, acc)
        out = acc.to(out_ptr.dtype.element_ty)

        # OUT exactly symmetric: a tile above the diagonal is stored where it is and mirrored below; a diagonal
        # tile takes its lower triangle from its upper one
        if i == j:
            out = tl.where(r[:, None] <= r[None, :], out, tl.trans(out))
        else:
            out_of.store([batch, col, row], tl.trans(out).reshape(1, BLOCK_N, BLOCK_N))
        out_of.store([batch, row, col], out.reshape(1, BLOCK_N, BLOCK_N))


@autotune(_configs(symmetric=False), key=["BATCH", "N", "M"])
@triton.jit
def _apply_polynomial_kernel(
    p_ptr,  # P [BATCH, N, N], contiguous
    x_ptr,  # X [BATCH, N, M], contiguous
    scale_ptr,  # S [BATCH] fp32 (SCALED only): matrix b's X is taken as S[b] X
    out_ptr,  # OUT [BATCH, N, M], contiguous: a X + P X
    BATCH, N, M,
    a,
    SCALED: tl.constexpr,
    ADD_X: tl.constexpr,  # a != 0: the epilogue reads X's tile (the Gram form's Q X has a = 0, and skips the read)
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PERSISTENT: tl.constexpr,  # read by the grid only
    FLATTEN: tl.constexpr,
    HALVES: tl.constexpr,  # the epilogue a half tile of columns at a time: half the shared memory for X and OUT
):
    p_of = tl.make_tensor_descriptor(p_ptr, [BATCH, N, N], [N * N, N, 1], [1, BLOCK_N, BLOCK_K])
    x_of = tl.make_tensor_descriptor(x_ptr, [BATCH, N, M], [N * M, M, 1], [1, BLOCK_K, BLOCK_M])
    cols: tl.constexpr = BLOCK_M // 2 if HALVES else BLOCK_M  # of the epilogue's pieces
    out_tile = tl.make_tensor_descriptor(out_ptr, [BATCH, N, M], [N * M, M, 1], [1, BLOCK_N, cols])
    x_tile = out_tile  # unread without ADD_X
    if ADD_X:
        x_tile = tl.make_tensor_descriptor(x_ptr, [BATCH, N, M], [N * M, M, 1], [1, BLOCK_N, cols])
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles = tl.cdiv(N, BLOCK_N) * tiles_m
    # tiles numbered matrix by matrix, row by row within one
    for tile in tl.range(tl.program_id(0), BATCH * tiles, tl.num_programs(0), flatten=FLATTEN):
        batch, within = tile // tiles, tile % tiles
        row, col = (within // tiles_m) * BLOCK_N, (within % tiles_m) * BLOCK_M

        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(0, N, BLOCK_K):
            p = p_of.load([batch, row, k]).reshape(BLOCK_N, BLOCK_K)
            x = x_of.load([batch, k, col]).reshape(BLOCK_K, BLOCK_M)
            acc = tl.dot(p, x, acc, input_precision="ieee")

        s = tl.load(scale_ptr + batch) if SCALED else 1.0
        dtype: tl.constexpr = out_ptr.dtype.element_ty
        if HALVES:
            left, right = column_halves(acc, BLOCK_N, cols)
            _finish_polynomial(left, x_tile, out_tile, batch, row, col, a, s, BLOCK_N, cols, dtype, ADD_X)
            _finish_polynomial(right, x_tile, out_tile, batch, row, col + cols, a, s, BLOCK_N, cols, dtype, ADD_X)
        else:
            _finish_polynomial(acc, x_tile, out_tile, batch, row, col, a, s, BLOCK_N, cols, dtype, ADD_X)


@triton.jit
def _finish_polynomial(acc, x_tile, out_tile, batch, row, col, a, s, ROWS: tl.constexpr, COLS: tl.constexpr,
                       DTYPE: tl.constexpr, ADD_X: tl.constexpr):
    """The epilogue of a piece of P X: a X added, the scale applied, then one rounding, and the store."""
    if ADD_X:
        acc += a * x_tile.load([batch, row, col]).reshape(ROWS, COLS).to(tl.float32)
    acc = acc * s
    out_tile.store([batch, row, col], acc.to(DTYPE).reshape(1, ROWS, COLS))


# --------------------------------------------------------------------------- Muon's elementwise kernels


@triton.jit
def _matrix_tile(R, C, BLOCK: tl.constexpr):
    """This program's tile of an [R, C] matrix: program id 0 numbers the tiles row by row, program id 1 the matrix.
    Returns (tile number, matrix, its rows, its columns, which entries lie inside the matrix)."""
    pid, e = tl.program_id(0), tl.program_id(1).to(tl.int64)
    tiles_c = tl.cdiv(C, BLOCK)
    rows = (pid // tiles_c) * BLOCK + tl.arange(0, BLOCK)
    cols = (pid % tiles_c) * BLOCK + tl.arange(0, BLOCK)
    return pid, e, rows, cols, (rows[:, None] < R) & (cols[None, :] < C)


@triton.jit
def _momentum_kernel(
    m_ptr,  # M [E, R, C] fp32: each matrix's momentum, advanced in place to mu M + G
    g_ptr,  # G [E, R, C]: its gradient
    g_scale_ptr,  # [] fp32 (SCALED only): G's factor, the gradient clip's, read on the device
    x_ptr,  # X [E, N, K] with N K = R C: U, entry (r, c) of matrix e at r * stride_xr + c * stride_xc
    sumsq_ptr,  # [E, programs along axis 0] fp32: each program's sum of U^2 over its tile, U before rounding
    R, C,
    stride_xr, stride_xc,
    mu,
    NESTEROV: tl.constexpr,  # U = G + mu M, else U = M
    SCALED: tl.constexpr,  # G times g_scale
    BLOCK: tl.constexpr,
):
    pid, e, rows, cols, inside = _matrix_tile(R, C, BLOCK)
    offs = e * R * C + rows[:, None] * C + cols[None, :]

    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if SCALED:
        g = g * tl.load(g_scale_ptr)
    m = mu * tl.load(m_ptr + offs, mask=inside, other=0.0) + g
    tl.store(m_ptr + offs, m, mask=inside)
    if NESTEROV:
        u = g + mu * m
    else:
        u = m
    x = x_ptr + e * R * C + rows[:, None] * stride_xr + cols[None, :] * stride_xc
    tl.store(x, u.to(x_ptr.dtype.element_ty), mask=inside)
    tl.store(sumsq_ptr + e * tl.num_programs(0) + pid, tl.sum(u * u))


@triton.jit
def _update_kernel(
    w_ptr,  # W [E, R, C]: updated in place to W * decay + step * O
    o_ptr,  # O [E, N, K] with N K = R C: entry (r, c) of matrix e at r * stride_or + c * stride_oc
    decay_ptr, step_ptr,  # [] fp32 each: read on the device, so that a replayed CUDA graph sees each step's lr
    R, C,
    stride_or, stride_oc,
    BLOCK: tl.constexpr,
):
    pid, e, rows, cols, inside = _matrix_tile(R, C, BLOCK)
    w = w_ptr + e * R * C + rows[:, None] * C + cols[None, :]
    o = tl.load(o_ptr + e * R * C + rows[:, None] * stride_or + cols[None, :] * stride_oc, mask=inside)
    decay, step = tl.load(decay_ptr), tl.load(step_ptr)
    new = tl.load(w, mask=inside).to(tl.float32) * decay + step * o.to(tl.float32)
    tl.store(w, new.to(w_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------- wrappers


def _addressable(cols: int, dtype: torch.dtype) -> bool:
    """Whether the kernels' tensor descriptors can address rows of `cols` entries: a multiple of 16 bytes."""
    return cols * dtype.itemsize % 16 == 0


def fits(n: int, m: int, dtype: torch.dtype) -> bool:
    """Whether the Newton-Schulz kernels take matrices n x m (n <= m) of `dtype`: the rows of X and of the n x n
    Gram matrices must be a multiple of 16 bytes, 8 elements in bf16."""
    return _addressable(n, dtype) and _addressable(m, dtype)


@functools.cache
def _multiprocessors(device: int) -> int:
    return 4 if INTERPRETED else torch.cuda.get_device_properties(device).multi_processor_count


def _programs(tiles: int, meta: dict) -> tuple[int]:
    """The grid: a program per tile, or (PERSISTENT) one per multiprocessor, each looping over tiles."""
    if meta["PERSISTENT"]:
        return (min(tiles, _multiprocessors(0 if INTERPRETED else torch.cuda.current_device())),)
    return (tiles,)


def _check(what: str, **tensors: torch.Tensor) -> None:
    """Every tensor a contiguous batch of matrices [B, rows, cols] of DTYPES, on a GPU (or under the interpreter)."""
    for name, t in tensors.items():
        if t.ndim != 3 or not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be a contiguous [batch, rows, cols], found shape "
                             f"{tuple(t.shape)} with strides {t.stride()}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{what}: {name} must be fp32, bf16 or fp16, found {t.dtype}")
        if not (t.is_cuda or INTERPRETED):
            raise ValueError(f"{what}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")


def _check_matrices(what: str, **tensors: torch.Tensor) -> None:
    """`_check`, and rows that the Newton-Schulz kernels' tensor descriptors can address (`fits`)."""
    _check(what, **tensors)
    for name, t in tensors.items():
        if not addressable(t):
            raise ValueError(f"{what}: {name}'s rows must start 16-byte aligned and hold a multiple of 16 bytes "
                             f"(the kernels' tensor descriptors), found rows of {t.shape[-1]} x {t.dtype}")


def _output(what: str, out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor,
            dtypes: tuple[torch.dtype, ...] = ()) -> torch.Tensor:
    """The kernel's output, given or made (in like's dtype, or one of `dtypes`); its rows too must suit the
    descriptors (a Gram matrix's are n long)."""
    if out is None:
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
    elif tuple(out.shape) != shape or out.dtype not in (like.dtype, *dtypes):
        allowed = " or ".join(str(d) for d in dict.fromkeys((like.dtype, *dtypes)))
        raise ValueError(f"{what}: out must be {allowed} of shape {shape}, found {out.dtype} {tuple(out.shape)}")
    _check_matrices(what, out=out)
    return out


def _scale(what: str, scale: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The per-matrix scale as the kernels take it (any tensor stands in for None: SCALED is off then)."""
    if scale is None:
        return x
    if scale.shape != (x.shape[0],) or scale.dtype != torch.float32 or scale.device != x.device:
        raise ValueError(f"{what}: scale must be fp32 of shape ({x.shape[0]},) on {x.device}, found {scale.dtype} "
                         f"{tuple(scale.shape)} on {scale.device}")
    return scale


def _launch_symmetric(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor,
                      alpha: float, beta: float = 0.0, gamma: float = 0.0, add_x: bool = False) -> None:
    batch, n, k = x.shape

    def grid(meta):
        blocks = triton.cdiv(n, meta["BLOCK_N"])
        return _programs(batch * blocks * (blocks + 1) // 2, meta)

    triton.set_allocator(descriptor_scratch)  # the tensor descriptors' global memory
    _symmetric_product_kernel[grid](x, y, _scale("gram", scale, x), out, batch, n, k, float(alpha), float(beta),
                                    float(gamma), SCALED=scale is not None, ADD_X=add_x, DIAG=gamma != 0,
                                    TWO_OPERANDS=y is not x)


def _check_square(what: str, **tensors: torch.Tensor) -> None:
    _check_matrices(what, **tensors)
    for name, t in tensors.items():
        if t.shape[1] != t.shape[2]:
            raise ValueError(f"{what}: {name} must be square matrices, found shape {tuple(t.shape)}")


def gram(x: torch.Tensor, out: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """G = X X^T [B, n, n] of X [B, n, k], in out's dtype (X's by default): about half of it computed, G exactly
    symmetric.

    scale [B] fp32: G of S[b] X[b] instead, the scale applied in fp32 before G is rounded.
    """
    _check_matrices("gram", x=x)
    batch, n, _ = x.shape
    out = _output("gram", out, (batch, n, n), x, DTYPES)
    _launch_symmetric(x, x, scale, out, 1.0)
    return out


def gram_polynomial(g: torch.Tensor, b: float, c: float, out: torch.Tensor | None = None,
                    a: float = 0.0) -> torch.Tensor:
    """P = a I + b G + c G G [B, n, n] of a symmetric G [B, n, n] (a Gram matrix), in out's dtype (G's by default):
    about half of it computed, P exactly symmetric.

    G's symmetry is what makes G G = G G^T; it is not checked.
    """
    _check_square("gram_polynomial", g=g)
    out = _output("gram_polynomial", out, tuple(g.shape), g, DTYPES)
    _launch_symmetric(g, g, None, out, c, b, a, add_x=True)
    return out


def commuting_product(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """P Q [B, n, n] of symmetric P and Q that commute (polynomials in one Gram matrix), in out's dtype (P's by
    default): then P Q = P Q^T is symmetric, so about half of it is computed and the rest mirrored.

    Neither the symmetry nor the commuting is checked: the product of matrices that do not commute is not symmetric,
    and only its upper triangle would be right.
    """
    _check_square("commuting_product", p=p, q=q)
    if q.shape != p.shape or q.dtype != p.dtype:
        raise ValueError(f"commuting_product: q must be {p.dtype} of shape {tuple(p.shape)}, found {q.dtype} "
                         f"{tuple(q.shape)}")
    out = _output("commuting_product", out, tuple(p.shape), p, DTYPES)
    _launch_symmetric(p, q, None, out, 1.0)
    return out


def apply_polynomial(p: torch.Tensor, x: torch.Tensor, a: float, out: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """a X + P X [B, n, m] for P [B, n, n] and X [B, n, m], in X's dtype.

    scale [B] fp32: of S[b] X[b] instead, the scale applied in fp32 before the result is rounded.
    """
    _check_matrices("apply_polynomial", p=p, x=x)
    batch, n, m = x.shape
    if tuple(p.shape) != (batch, n, n) or p.dtype != x.dtype:
        raise ValueError(f"apply_polynomial: p must be {x.dtype} of shape {(batch, n, n)} for x of shape "
                         f"{tuple(x.shape)}, found {p.dtype} {tuple(p.shape)}")
    out = _output("apply_polynomial", out, (batch, n, m), x)

    def grid(meta):
        return _programs(batch * triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(m, meta["BLOCK_M"]), meta)

    triton.set_allocator(descriptor_scratch)
    _apply_polynomial_kernel[grid](p, x, _scale("apply_polynomial", scale, x), out, batch, n, m, float(a),
                                   SCALED=scale is not None, ADD_X=a != 0)
    return out


def newton_schulz_(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float],
                   scale: torch.Tensor | None = None, form: str = STANDARD) -> torch.Tensor:
    """`steps` quintic Newton-Schulz steps on wide matrices X [B, n, m] (n <= m), contiguous, of norm about 1, in
    `form` (`k2c.runtime.optim.newton_schulz` says what each is).

    scale [B] fp32: the iteration starts from S[b] X[b] (normalising X by its norm), the scale applied inside the
    first step's fp32 epilogues. Returns the result. The steps alternate between x and one scratch buffer of its
    size, so x is overwritten: the caller's batch is a scratch of its own (the optimizer's is).
    """
    _check_matrices("newton_schulz_", x=x)
    batch, n, m = x.shape
    if n > m:
        raise ValueError(f"newton_schulz_: x must be wide (n <= m) so that X X^T is the small side, found {(n, m)}")
    if form not in NS_FORMS:
        raise ValueError(f"newton_schulz_: form must be one of {NS_FORMS}, found {form!r}")
    a, b, c = coefficients
    other = torch.empty_like(x)
    if form == GRAM:
        return _gram_newton_schulz(x, other, steps, coefficients, scale)
    g = torch.empty((batch, n, n), dtype=x.dtype, device=x.device)
    p = torch.empty_like(g)
    for _ in range(steps):
        gram(x, out=g, scale=scale)
        gram_polynomial(g, b, c, out=p)
        apply_polynomial(p, x, a, out=other, scale=scale)
        x, other, scale = other, x, None
    return x


def _gram_newton_schulz(x: torch.Tensor, other: torch.Tensor, steps: int, coefficients: tuple[float, float, float],
                        scale: torch.Tensor | None) -> torch.Tensor:
    """The Gram form on the kernels: each segment's R, Z and Q in `gram_dtype(x.dtype)`, each rounded once from
    fp32, and its last Q in X's dtype, which the product with X needs (the reference rounds at the same points, except
    that it forms R from an fp16 copy of X and rounds R + a/b I inside Z)."""
    a, b, c = coefficients
    batch, n, _ = x.shape
    # R, Z, Q and a spare; a segment's last Q goes into the spare's storage, in X's dtype (of the same size)
    r, z, q, spare = (torch.empty((batch, n, n), dtype=gram_dtype(x.dtype), device=x.device) for _ in range(4))
    for length in restart_segments(steps):
        gram(x, out=r, scale=scale)
        for k in range(length):
            final = k == length - 1
            if k == 0:  # Q = Z
                gram_polynomial(r, b, c, a=a, out=spare.view(x.dtype) if final else q)
                step_z = q
            elif final:
                gram_polynomial(r, b, c, a=a, out=z)
                commuting_product(q, z, out=spare.view(x.dtype))
            else:
                gram_polynomial(r, b, c, a=a, out=z)
                commuting_product(q, z, out=spare)
                q, spare, step_z = spare, q, z
            if not final:  # R <- Z R Z, through the spare
                commuting_product(step_z, r, out=spare)
                commuting_product(spare, step_z, out=r)
        apply_polynomial(spare.view(x.dtype), x, 0.0, out=other, scale=scale)
        x, other, scale = other, x, None
    return x


def newton_schulz(u: torch.Tensor, steps: int, coefficients: tuple[float, float, float],
                  dtype: torch.dtype = torch.bfloat16, form: str = STANDARD) -> torch.Tensor:
    """`k2c.runtime.optim.newton_schulz` on the kernels: every matrix of u [..., n, m] orthogonalised in `dtype`, in
    `form`.

    Each matrix is normalised by its own Frobenius norm in fp32 and iterated on in the wide orientation; the result
    has u's shape, in `dtype`.
    """
    n, m = u.shape[-2:]
    x = u.float().reshape(-1, n, m)
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + EPS)
    if n > m:
        x = x.mT
    x = newton_schulz_(x.to(dtype).contiguous(), steps, coefficients, form=form)
    if n > m:
        x = x.mT
    return x.reshape(u.shape)


def _orientation(rows: int, cols: int, x: torch.Tensor) -> tuple[int, int]:
    """Strides that address entry (r, c) of an [rows, cols] matrix in x's wide matrices: itself or transposed."""
    return (1, x.stride(1)) if rows > cols else (x.stride(1), 1)


def _check_factor(fn: str, name: str, factor: torch.Tensor, device: torch.device) -> None:
    if factor.shape != () or factor.dtype != torch.float32 or factor.device != device:
        raise ValueError(f"{fn}: {name} must be a 0-dim fp32 tensor on {device}, found {factor.dtype} of shape "
                         f"{tuple(factor.shape)} on {factor.device}")


def norm_tiles(r: int, c: int) -> int:
    """How many partial sums of squares `muon_input` writes for an r x c matrix: one per tile."""
    return triton.cdiv(r, TILE) * triton.cdiv(c, TILE)


def muon_input(momentum: torch.Tensor, grad: torch.Tensor, mu: float, nesterov: bool, out: torch.Tensor,
               sumsq: torch.Tensor, grad_scale: torch.Tensor | None = None) -> None:
    """Advance the momentum M [E, R, C] (fp32) to mu M + G and write each matrix's U into out; one pass.

    G is grad, times grad_scale (a 0-dim fp32 tensor on its device: the gradient clip's factor) if given, in fp32.
    U = G + mu M with Nesterov, else M. out [E, n, m] holds the matrices wide (n <= m), transposed if R > C, in its
    dtype. sumsq [E, norm_tiles(R, C)] fp32, contiguous, gets each matrix's partial sums of U^2: a caller fills the
    rows of one buffer for its whole batch, then `inverse_norms` finishes them all at once (four small kernels for
    the batch, where finishing them here took four for every call).
    """
    _check("muon_input", momentum=momentum, grad=grad, out=out)
    e, r, c = momentum.shape
    if momentum.dtype != torch.float32 or grad.shape != momentum.shape:
        raise ValueError(f"muon_input: momentum must be fp32 and grad of its shape {tuple(momentum.shape)}, found "
                         f"{momentum.dtype} and {tuple(grad.shape)}")
    if tuple(out.shape) != (e, min(r, c), max(r, c)):
        raise ValueError(f"muon_input: out must have shape {(e, min(r, c), max(r, c))}, found {tuple(out.shape)}")
    if grad_scale is not None:
        _check_factor("muon_input", "grad_scale", grad_scale, momentum.device)
    tiles = norm_tiles(r, c)
    if sumsq.shape != (e, tiles) or sumsq.dtype != torch.float32 or not sumsq.is_contiguous():
        raise ValueError(f"muon_input: sumsq must be a contiguous fp32 [{e}, {tiles}], found {sumsq.dtype} of shape "
                         f"{tuple(sumsq.shape)}")
    _momentum_kernel[(tiles, e)](momentum, grad, grad if grad_scale is None else grad_scale, out, sumsq, r, c,
                                 *_orientation(r, c, out), float(mu), NESTEROV=nesterov,
                                 SCALED=grad_scale is not None, BLOCK=TILE)


def inverse_norms(sumsq: torch.Tensor) -> torch.Tensor:
    """1 / (||U||_F + EPS) per matrix [B], fp32, from `muon_input`'s partial sums [B, tiles]: `newton_schulz_`'s
    scale."""
    return sumsq.sum(1).sqrt_().add_(EPS).reciprocal_()


def muon_update(weight: torch.Tensor, update: torch.Tensor, decay: torch.Tensor, step: torch.Tensor) -> None:
    """weight [E, R, C] <- weight * decay + step * O, in fp32 and rounded once to weight's dtype.

    update [E, n, m] holds each O wide (n <= m), as `muon_input` wrote the matrices: transposed back if R > C.
    decay and step are 0-dim fp32 tensors on weight's device (they follow the learning rate).
    """
    _check("muon_update", weight=weight, update=update)
    e, r, c = weight.shape
    if tuple(update.shape) != (e, min(r, c), max(r, c)):
        raise ValueError(f"muon_update: update must have shape {(e, min(r, c), max(r, c))}, found "
                         f"{tuple(update.shape)}")
    for name, factor in (("decay", decay), ("step", step)):
        _check_factor("muon_update", name, factor, weight.device)
    _update_kernel[(triton.cdiv(r, TILE) * triton.cdiv(c, TILE), e)](
        weight, update, decay, step, r, c, *_orientation(r, c, update), BLOCK=TILE)
