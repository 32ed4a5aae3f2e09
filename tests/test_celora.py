"""CE-LoRA's autograd Functions against LoRA written out plainly and against CE-LoRA's own formula.

Keep ratio 1 must be LoRA exactly. Below 1, the input gradient must be `(dY B0) A0 + dY[:, S] R[S, :]` with
B0 A0 the rank-k truncated SVD of W, R = W - B0 A0 and S the top channels by ||dY[:, i]|| * ||R[i, :]||, all
recomputed here from W and dY; S must follow dY and stay fixed between refreshes. The expert stack must equal
the linear version run expert by expert.
"""

from __future__ import annotations

import math

import pytest
import torch

from k2c.runtime import adapters as runtime_adapters
from k2c.runtime.plan import AdapterPlan, AdapterSite


@pytest.fixture(scope="module")
def adapters():
    return runtime_adapters


def randn(*shape, generator, requires_grad=False):
    return torch.randn(*shape, generator=generator).requires_grad_(requires_grad)


def lora_reference(x, weight, lora_A, lora_B, scale):
    return x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T


def svd_split(weight, k):
    """B0 = U_k S_k^1/2, A0 = S_k^1/2 V_k^T, and the residual R = W - B0 A0."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    b0 = u[:, :k] * s[:k].sqrt()
    a0 = s[:k].sqrt()[:, None] * vh[:k]
    return b0, a0, weight - b0 @ a0


def critical_set(dy, residual, keep_ratio):
    score = dy.norm(dim=0) * residual.norm(dim=1)
    return score.topk(math.ceil(keep_ratio * residual.shape[0])).indices.sort().values


def celora_input_grad(dy, weight, lora_A, lora_B, scale, k, kept):
    b0, a0, residual = svd_split(weight, k)
    return (dy @ b0) @ a0 + dy[:, kept] @ residual[kept] + scale * (dy @ lora_B) @ lora_A


def decaying_weight(m, n, generator, decay=0.85):
    """A matrix whose singular values fall geometrically, like a trained weight's."""
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    s = decay ** torch.arange(min(m, n), dtype=torch.float32)
    return (u[:, : s.numel()] * s) @ v[:, : s.numel()].T


def hot_channels_dy(rows, m, hot, generator):
    """dY [rows, m] whose channels `hot` are 30x larger than the others."""
    dy = randn(rows, m, generator=generator)
    dy[:, hot] *= 30
    return dy


def run_linear(adapters, x, weight, lora_A, lora_B, scale, dy, double_lora=None):
    x = x.detach().requires_grad_(True)
    lora_A = lora_A.detach().requires_grad_(True)
    lora_B = lora_B.detach().requires_grad_(True)
    y = adapters.LoRALinearFunction.apply(x, x, weight, lora_A, lora_B, scale, double_lora)
    y.backward(dy)
    return y.detach(), x.grad, lora_A.grad, lora_B.grad


def reference_grads(x, weight, lora_A, lora_B, scale, dy):
    x, lora_A, lora_B = (t.detach().requires_grad_(True) for t in (x, lora_A, lora_B))
    y = lora_reference(x, weight, lora_A, lora_B, scale)
    y.backward(dy)
    return y.detach(), x.grad, lora_A.grad, lora_B.grad


def test_keep_ratio_one_is_exact_lora(adapters):
    g = torch.Generator().manual_seed(0)
    n, m, r, rows = 24, 40, 4, 33
    x, weight, dy = randn(rows, n, generator=g), randn(m, n, generator=g), randn(rows, m, generator=g)
    lora_A, lora_B = randn(r, n, generator=g), randn(m, r, generator=g)
    ours = run_linear(adapters, x, weight, lora_A, lora_B, 1.7, dy)
    for got, want in zip(ours, reference_grads(x, weight, lora_A, lora_B, 1.7, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_linear_module_matches_the_plain_formula_with_dropout(adapters):
    g = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(16, 24, bias=False)
    site = AdapterSite("l", None, "lora", rank=4, alpha=6.0, keep_ratio=1.0, svd_rank=0)
    plan = AdapterPlan(kind="lora", rank=4, alpha=6.0, rslora=True, dropout=0.25, refresh_every=5, sites=(site,))
    layer = adapters.LoRALinear(base, site, plan)
    assert layer.weight is base.weight and not layer.weight.requires_grad
    assert not list(layer.buffers())  # exact LoRA keeps no SVD pair and no channel set
    with torch.no_grad():
        layer.lora_B.copy_(randn(24, 4, generator=g))
    x = randn(2, 5, 16, generator=g, requires_grad=True)
    dy = randn(2, 5, 24, generator=g)

    torch.manual_seed(7)
    y = layer(x)
    y.backward(dy)
    torch.manual_seed(7)
    x_ref = x.detach().requires_grad_(True)
    a_ref, b_ref = (p.detach().requires_grad_(True) for p in (layer.lora_A, layer.lora_B))
    dropped = torch.nn.functional.dropout(x_ref.reshape(-1, 16), 0.25).view_as(x_ref)
    y_ref = x_ref @ base.weight.T + (6.0 / 2.0) * (dropped @ a_ref.T) @ b_ref.T  # rsLoRA: alpha / sqrt(4)
    y_ref.backward(dy)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, a_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, b_ref.grad, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None


def test_input_gradient_follows_the_celora_formula(adapters):
    g = torch.Generator().manual_seed(2)
    n, m, r, k, rows, keep = 40, 48, 4, 5, 64, 0.3
    x, weight = randn(rows, n, generator=g), decaying_weight(m, n, g)
    dy = hot_channels_dy(rows, m, [3, 17, 41], g)
    lora_A, lora_B = randn(r, n, generator=g), randn(m, r, generator=g)
    double_lora = adapters.DoubleLoRA(k, keep, refresh_every=10)
    y, dx, da, db = run_linear(adapters, x, weight, lora_A, lora_B, 0.5, dy, double_lora)

    _, exact_dx, exact_da, exact_db = reference_grads(x, weight, lora_A, lora_B, 0.5, dy)
    kept = critical_set(dy, svd_split(weight, k)[2], keep)
    assert {3, 17, 41} <= set(kept.tolist())
    torch.testing.assert_close(dx, celora_input_grad(dy, weight, lora_A, lora_B, 0.5, k, kept), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(da, exact_da, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, exact_db, rtol=1e-5, atol=1e-5)
    assert (dx - exact_dx).norm() > 1e-3 * exact_dx.norm()  # the approximation is really in use


def test_error_falls_as_the_keep_ratio_rises(adapters):
    g = torch.Generator().manual_seed(3)
    n, m, rows = 64, 80, 96
    x, weight = randn(rows, n, generator=g), decaying_weight(m, n, g, decay=0.95)
    dy = randn(rows, m, generator=g) * torch.rand(m, generator=g)  # channels of unequal size
    lora_A, lora_B = randn(4, n, generator=g), torch.zeros(m, 4)
    exact = dy @ weight
    errors = []
    for keep in [i / 10 for i in range(1, 11)]:
        _, dx, _, _ = run_linear(adapters, x, weight, lora_A, lora_B, 1.0, dy, adapters.DoubleLoRA(4, keep, 1))
        errors.append(((dx - exact).norm() / exact.norm()).item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-5, errors


def test_critical_set_follows_dy_and_holds_between_refreshes(adapters):
    g = torch.Generator().manual_seed(4)
    n, m, r, k, rows, keep, period = 32, 40, 4, 4, 50, 0.1, 3
    x, weight = randn(rows, n, generator=g), decaying_weight(m, n, g)
    lora_A, lora_B = randn(r, n, generator=g), randn(m, r, generator=g)
    residual = svd_split(weight, k)[2]
    first, second = [1, 9, 22, 30], [5, 13, 27, 38]
    dy_first, dy_second = hot_channels_dy(rows, m, first, g), hot_channels_dy(rows, m, second, g)
    kept_first, kept_second = critical_set(dy_first, residual, keep), critical_set(dy_second, residual, keep)
    assert kept_first.tolist() == first and kept_second.tolist() == second

    double_lora = adapters.DoubleLoRA(k, keep, refresh_every=period)
    schedule = [(dy_first, kept_first), (dy_second, kept_first), (dy_second, kept_first), (dy_second, kept_second)]
    for dy, kept in schedule:
        _, dx, _, _ = run_linear(adapters, x, weight, lora_A, lora_B, 2.0, dy, double_lora)
        torch.testing.assert_close(dx, celora_input_grad(dy, weight, lora_A, lora_B, 2.0, k, kept),
                                   rtol=1e-4, atol=1e-4)
        assert double_lora.kept.tolist() == kept.tolist()


def test_a_weight_changed_in_place_is_factorized_again(adapters):
    g = torch.Generator().manual_seed(5)
    n, m, k, rows, keep = 24, 30, 3, 20, 0.4
    x, weight = randn(rows, n, generator=g), decaying_weight(m, n, g)
    lora_A, lora_B, dy = randn(4, n, generator=g), randn(m, 4, generator=g), randn(rows, m, generator=g)
    double_lora = adapters.DoubleLoRA(k, keep, refresh_every=100)
    run_linear(adapters, x, weight, lora_A, lora_B, 1.0, dy, double_lora)
    with torch.no_grad():
        weight.copy_(decaying_weight(m, n, g))  # as a checkpoint load does
    _, dx, _, _ = run_linear(adapters, x, weight, lora_A, lora_B, 1.0, dy, double_lora)
    kept = critical_set(dy, svd_split(weight, k)[2], keep)
    torch.testing.assert_close(dx, celora_input_grad(dy, weight, lora_A, lora_B, 1.0, k, kept), rtol=1e-4, atol=1e-5)


def expert_problem(generator, experts=4, n=24, m=36, r=3, counts=(7, 0, 12, 5)):
    weight = torch.stack([decaying_weight(m, n, generator) for _ in range(experts)])
    lora_A, lora_B = randn(experts, r, n, generator=generator), randn(experts, m, r, generator=generator)
    rows = sum(counts)
    return list(counts), weight, lora_A, lora_B, randn(rows, n, generator=generator)


def run_experts(adapters, x, weight, lora_A, lora_B, scale, counts, dy, double_lora=None):
    x, lora_A, lora_B = (t.detach().requires_grad_(True) for t in (x, lora_A, lora_B))
    y = adapters.ExpertLoRAFunction.apply(x, x, weight, lora_A, lora_B, scale, counts, double_lora)
    y.backward(dy)
    return y.detach(), x.grad, lora_A.grad, lora_B.grad


def test_experts_at_keep_ratio_one_are_exact_lora(adapters):
    g = torch.Generator().manual_seed(6)
    counts, weight, lora_A, lora_B, x = expert_problem(g)
    dy = randn(x.shape[0], weight.shape[1], generator=g)
    ours = run_experts(adapters, x, weight, lora_A, lora_B, 0.8, counts, dy)

    x_ref, a_ref, b_ref = (t.detach().requires_grad_(True) for t in (x, lora_A, lora_B))
    y_ref = torch.cat([lora_reference(x_e, weight[e], a_ref[e], b_ref[e], 0.8)
                       for e, x_e in enumerate(x_ref.split(counts))])
    y_ref.backward(dy)
    for got, want in zip(ours, (y_ref.detach(), x_ref.grad, a_ref.grad, b_ref.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_expert_stack_equals_the_linear_version_expert_by_expert(adapters):
    g = torch.Generator().manual_seed(7)
    counts, weight, lora_A, lora_B, x = expert_problem(g)
    k, keep, period = 3, 0.4, 2
    stack = adapters.DoubleLoRA(k, keep, refresh_every=period)
    singles = [adapters.DoubleLoRA(k, keep, refresh_every=period) for _ in counts]
    for step in range(3):  # select, reuse, select again
        dy = randn(x.shape[0], weight.shape[1], generator=g)
        batched = run_experts(adapters, x, weight, lora_A, lora_B, 1.5, counts, dy, stack)
        per_expert = [
            run_linear(adapters, x_e, weight[e], lora_A[e], lora_B[e], 1.5, dy_e, singles[e])
            for e, (x_e, dy_e) in enumerate(zip(x.split(counts), dy.split(counts)))
        ]
        y, dx, da, db = zip(*per_expert)
        for got, want in zip(batched, (torch.cat(y), torch.cat(dx), torch.stack(da), torch.stack(db))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for e, count in enumerate(counts):
            if count:
                assert stack.kept[e].tolist() == singles[e].kept.tolist(), (step, e)
