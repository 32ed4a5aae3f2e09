"""The generated MuonClip optimizer: its Muon and AdamW updates, schedule, groups, router bias and resume.

Muon is checked against torch.optim.Muon and against Algorithm 1 of the Kimi K2 report written out below in fp64.
Newton-Schulz runs in bf16 (as in both references), so those comparisons allow for its rounding; see BF16_TOL.
"""

import dataclasses
import io
import math

import pytest
import torch

from conftest import import_generated
from k2c.codegen import build_package
from k2c.runtime import optim
from k2c.runtime.optim import lr_at
from k2c.runtime.plan import restart_segments
from specs_for_tests import tiny_spec

# Five bf16 Newton-Schulz steps (8 significant bits, each step amplifying by up to a = 3.4) land within about 2.5%
# of exact arithmetic by Frobenius norm and within two units in the last place at 1.0 (2^-7) entrywise, for the
# matrix shapes of this model (measured over 100 random matrices each, for torch.optim.Muon and for ours). Two such
# runs (ours and torch.optim.Muon, or ours and exact fp64) are allowed twice that. Units: the update scale
# lr * rms_scale * sqrt(max(n, m)), under which the orthogonalised update has entries below 1.
BF16_TOL = 4 * 2.0**-7
BF16_FRO_TOL = 0.05

SQUARE, WIDE, TALL = (
    "model.layers.1.self_attn.o_proj.weight",  # [64, 64]
    "model.layers.1.self_attn.q_a_proj.weight",  # [32, 64]
    "model.layers.1.self_attn.kv_b_proj.weight",  # [128, 16]
)
EXPERTS = "model.layers.2.mlp.experts.up_proj"  # [8, 32, 64]


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    spec = tiny_spec(
        name="muon_tiny",
        optimizer={"lr": 0.02, "weight_decay": 0.1, "schedule": {"warmup_steps": 2, "final_lr_ratio": 0.1}},
        **{"training.steps": 20},
    )
    out_dir = tmp_path_factory.mktemp("muon") / spec.name
    build_package(spec, out_dir)
    return import_generated(out_dir)


@pytest.fixture(scope="module")
def gram_form(tmp_path_factory):
    """The same model with `newton_schulz: gram`: its wide and tall matrices take the Gram form, the square one not."""
    spec = tiny_spec(
        name="muon_gram",
        optimizer={"lr": 0.02, "weight_decay": 0.1, "schedule": {"warmup_steps": 2, "final_lr_ratio": 0.1},
                   "muon": {"newton_schulz": "gram"}},
        **{"training.steps": 20},
    )
    out_dir = tmp_path_factory.mktemp("muon") / spec.name
    build_package(spec, out_dir)
    return import_generated(out_dir)


@pytest.fixture(scope="module")
def low_tau(tmp_path_factory):
    """The same model with a tau under the logits of the first steps: QK-Clip acts on every step."""
    spec = tiny_spec(name="muon_low_tau", optimizer={"qk_clip": {"tau": 0.05}})
    out_dir = tmp_path_factory.mktemp("muon") / spec.name
    build_package(spec, out_dir)
    return import_generated(out_dir)


def fresh(g, seed=0, dtype=None):
    torch.manual_seed(seed)
    model = g.build_model(dtype=dtype)
    return model, g.build_optimizer(model)


def update_scale(g, lr, shape):
    return lr * (g.PLAN.optimizer.rms_scale * math.sqrt(max(shape[-2:])))  # grouped as the optimizer groups it


def assert_updates_match(ours, ref, scale):
    """Two Muon updates (parameter deltas), compared in units of the update scale."""
    ours, ref = ours.double() / scale, ref.double() / scale
    assert (ours - ref).abs().max().item() < BF16_TOL
    assert ((ours - ref).norm() / ref.norm()).item() < BF16_FRO_TOL


def algorithm_1(w, momentum, grad, lr, cfg):
    """One step of Algorithm 1 (Kimi K2) for one matrix, in fp64. Returns the new weight and momentum."""
    momentum = cfg.momentum * momentum + grad
    u = grad + cfg.momentum * momentum if cfg.nesterov else momentum
    x = u / (u.norm() + 1e-7)
    n, m = x.shape
    if n > m:
        x = x.T
    a, b, c = cfg.ns_coefficients
    for _ in range(cfg.ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if n > m:
        x = x.T
    o = x * cfg.rms_scale * math.sqrt(max(n, m))
    return w - lr * (o + cfg.weight_decay * w), momentum


@pytest.mark.parametrize("name", [SQUARE, WIDE, TALL], ids=["square", "wide", "tall"])
def test_muon_matches_torch_muon(g, name):
    model, opt = fresh(g)
    scheduler = g.build_scheduler(opt)  # the learning rate changes from step to step (warm-up, then decay)
    cfg = g.PLAN.optimizer
    w = model.get_parameter(name)
    ref_w = w.detach().clone().requires_grad_()
    ref = torch.optim.Muon(
        [ref_w], lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
        ns_coefficients=cfg.ns_coefficients, eps=1e-7, ns_steps=cfg.ns_steps, adjust_lr_fn="match_rms_adamw",
    )
    for step in range(6):
        grad = torch.randn_like(w)
        w.grad, ref_w.grad = grad.clone(), grad.clone()  # every other parameter has no gradient and stays put
        ref.param_groups[0]["lr"] = lr_at(step, g.PLAN.optimizer)
        before, ref_before = w.detach().clone(), ref_w.detach().clone()
        opt.step()
        scheduler.step()
        ref.step()
        scale = update_scale(g, ref.param_groups[0]["lr"], w.shape)
        assert_updates_match(w.detach() - before, ref_w.detach() - ref_before, scale)
        # the momentum is a plain sum; torch keeps the EMA, (1 - mu) times it
        torch.testing.assert_close(opt.state[w]["momentum"] * (1 - cfg.momentum),
                                   ref.state[ref_w]["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_muon_weight_decay_uses_the_unscaled_lr(g):
    """A zero gradient orthogonalises to zero, leaving W - lr * wd * W, exactly as torch.optim.Muon does."""
    model, opt = fresh(g)
    cfg = g.PLAN.optimizer
    w = model.get_parameter(WIDE)
    ref_w = w.detach().clone().requires_grad_()
    ref = torch.optim.Muon([ref_w], lr=g.PLAN.optimizer.lr, weight_decay=cfg.weight_decay,
                           adjust_lr_fn="match_rms_adamw")
    expected = w.detach() * (1 - g.PLAN.optimizer.lr * cfg.weight_decay)
    w.grad, ref_w.grad = torch.zeros_like(w), torch.zeros_like(w)
    opt.step()
    ref.step()
    assert torch.equal(w.detach(), ref_w.detach())
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("package", ["g", "gram_form"])
def test_muon_matches_algorithm_1_for_every_matrix(package, request):
    """Every Muon parameter of the model, stacked experts as a loop over their matrices; in either form of
    Newton-Schulz (Algorithm 1's is the standard one)."""
    g = request.getfixturevalue(package)
    model, opt = fresh(g)
    cfg = g.PLAN.optimizer
    in_muon = {id(p): group["newton_schulz"] for group in opt.param_groups if group["kind"] == "muon"
               for p in group["params"]}
    muon = {name: p for name, p in model.named_parameters() if id(p) in in_muon}
    assert {SQUARE, WIDE, TALL, EXPERTS} <= muon.keys()
    forms = {name: in_muon[id(muon[name])] for name in (SQUARE, WIDE, TALL, EXPERTS)}
    if package == "gram_form":
        assert forms == {SQUARE: "standard", WIDE: "gram", TALL: "gram", EXPERTS: "gram"}
    else:
        assert set(forms.values()) == {"standard"}
    ref = {name: (p.detach().double(), torch.zeros_like(p, dtype=torch.float64)) for name, p in muon.items()}
    for _ in range(4):
        lr = g.PLAN.optimizer.lr  # no scheduler: the plan's lr
        before = {name: p.detach().clone() for name, p in muon.items()}
        for p in muon.values():
            p.grad = torch.randn_like(p)
        for name, p in muon.items():
            w, momentum = ref[name]
            grad = p.grad.double()
            if p.ndim == 2:
                ref[name] = algorithm_1(w, momentum, grad, lr, cfg)
            else:
                experts = [algorithm_1(w[e], momentum[e], grad[e], lr, cfg) for e in range(p.shape[0])]
                ref[name] = tuple(torch.stack(t) for t in zip(*experts))
        opt.step()
        for name, p in muon.items():
            ours = (p.detach() - before[name]).view(-1, *p.shape[-2:])
            exact = (ref[name][0] - before[name].double()).view(-1, *p.shape[-2:])
            for ours_one, exact_one in zip(ours, exact):  # per matrix: experts are separate matrices
                assert_updates_match(ours_one, exact_one, update_scale(g, lr, p.shape))


def test_stacked_experts_get_what_a_loop_over_experts_gets(g):
    model, opt = fresh(g)
    cfg = g.PLAN.optimizer
    w = model.get_parameter(EXPERTS)
    momentum = torch.zeros_like(w)
    for _ in range(3):
        lr = g.PLAN.optimizer.lr  # no scheduler: the plan's lr
        w.grad = torch.randn_like(w)
        before = w.detach().clone()
        momentum.mul_(cfg.momentum).add_(w.grad)
        u = w.grad.add(momentum, alpha=cfg.momentum)  # Nesterov, rounded as the optimizer rounds it
        scale = update_scale(g, lr, w.shape)
        # the optimizer's arithmetic: fp32 factors (it computes them from the lr on the device), a product, a sum
        decay, step = torch.tensor(1 - lr * cfg.weight_decay), torch.tensor(-scale)
        loop = torch.stack([
            before[e].mul(decay).add(
                optim.newton_schulz(u[e], cfg.ns_steps, cfg.ns_coefficients, optim.ns_dtype(w.device)).float() * step)
            for e in range(w.shape[0])
        ])
        # torch.optim.Muon on each expert as a 2D matrix of its own
        ref_w = [before[e].clone().requires_grad_() for e in range(w.shape[0])]
        ref = torch.optim.Muon(
            ref_w, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
            ns_coefficients=cfg.ns_coefficients, eps=1e-7, ns_steps=cfg.ns_steps, adjust_lr_fn="match_rms_adamw",
        )
        for e, rw in enumerate(ref_w):
            rw.grad = u[e].clone()  # a fresh torch Muon orthogonalises the direction of its first gradient
        ref.step()
        opt.step()
        assert torch.equal(w.detach(), loop)
        for e, rw in enumerate(ref_w):
            assert_updates_match(w.detach()[e] - before[e], rw.detach() - before[e], scale)


def test_batching_does_not_change_the_update(g, monkeypatch):
    """Same-shape matrices share one batched Newton-Schulz; one at a time must give the same bits."""
    results = []
    for batch_elements in (optim.NS_BATCH_ELEMENTS, 1):
        monkeypatch.setattr(optim, "NS_BATCH_ELEMENTS", batch_elements)
        model, opt = fresh(g)
        torch.manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        results.append(model.state_dict())
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


def test_ns_batches_cover_every_matrix_once_in_even_batches(monkeypatch):
    """24 matrices of 2 x 3 (stacked, single, tall) at most 10 to a batch: three batches of 8, cut across params."""
    monkeypatch.setattr(optim, "NS_BATCH_ELEMENTS", 10 * 6)
    params = [torch.zeros(7, 2, 3), torch.zeros(3, 2), torch.zeros(16, 3, 2)]
    batches = list(optim.ns_batches(params, 6))
    assert [sum(end - first for _, first, end in batch) for batch in batches] == [8, 8, 8]
    covered = [(id(p), i) for batch in batches for p, first, end in batch for i in range(first, end)]
    assert covered == [(id(p), i) for p in params for i in range(p.numel() // 6)]


def test_newton_schulz_orthogonalises_each_matrix(g):
    """Run to convergence (the classic cubic iteration), every matrix of a stack becomes semi-orthogonal.

    The matrices differ in scale by 10^6: normalising the stack as a whole would leave the small one far from it.
    """
    u = torch.randn(3, 8, 20) * torch.tensor([1e-3, 1.0, 1e3]).view(3, 1, 1)
    x = optim.newton_schulz(u, 20, (1.5, -0.5, 0.0)).double()
    eye = torch.eye(8, dtype=torch.float64).expand(3, 8, 8)
    assert (x @ x.mT - eye).abs().max().item() < 0.05
    tall = optim.newton_schulz(u.mT, 20, (1.5, -0.5, 0.0)).double()
    assert (tall.mT @ tall - eye).abs().max().item() < 0.05


def test_restarts_split_the_steps_evenly_into_segments_of_at_most_three():
    for steps in range(1, 13):
        segments = restart_segments(steps)
        assert sum(segments) == steps and max(segments) <= 3 and segments == sorted(segments)
        assert max(segments) - min(segments) <= 1 and len(segments) == math.ceil(steps / 3)
    assert restart_segments(5) == [2, 3]  # Muon's 5 steps: one restart, after the second


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("shape", [(2, 24, 40), (40, 24), (3, 16, 96)])
def test_gram_form_is_the_standard_form_in_exact_arithmetic(shape, steps):
    """In fp64 the Gram form (steps on X X^T, restarts between segments) gives the standard iteration's X."""
    u = torch.randn(shape, dtype=torch.float64)
    coefficients = (3.4445, -4.7750, 2.0315)
    gram = optim.newton_schulz(u, steps, coefficients, torch.float64, "gram")
    standard = optim.newton_schulz(u, steps, coefficients, torch.float64, "standard")
    assert ((gram - standard).norm() / standard.norm()).item() < 1e-10


@pytest.mark.parametrize("decay", [0.0, 5.0, 15.0])
def test_gram_form_in_half_precision_is_as_close_to_exact_as_the_standard_form_in_bf16(decay):
    """bf16 matrices: the Gram form rounds its n x n iterates to fp16, the standard form its products to bf16. On
    wide matrices whose singular values decay (a momentum's are far from flat), against fp64, the Gram form's error
    stays within 1.1x the standard form's at this shape (on an H200 at 1408 x 2048 it came to 1.17x:
    benchmarks/newton_schulz_forms.py). Rounding R through bf16 on the way to fp16 doubles it, and fails this."""
    torch.manual_seed(0)
    n, m = 32, 96
    u = torch.linalg.qr(torch.randn(4, n, n, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(4, m, n, dtype=torch.float64))[0]
    x = (u * torch.exp(-decay * torch.arange(n, dtype=torch.float64) / n)) @ v.mT
    coefficients = (3.4445, -4.7750, 2.0315)
    exact = optim.newton_schulz(x, 5, coefficients, torch.float64)

    def error(form):
        got = optim.newton_schulz(x, 5, coefficients, torch.bfloat16, form).double()
        return (torch.linalg.matrix_norm(got - exact) / torch.linalg.matrix_norm(exact)).max().item()

    assert error("gram") <= 1.1 * error("standard")


def test_adamw_group_matches_torch_adamw(g):
    """The AdamW group runs torch's fused AdamW (one kernel for all its tensors): the same bits as
    torch.optim.AdamW(fused=True). The fused kernel orders its arithmetic differently from the single-tensor loop
    (foreach=False), whose results it matches within fp32 rounding only."""
    model, opt = fresh(g)
    scheduler = g.build_scheduler(opt)
    cfg = g.PLAN.optimizer
    adamw = [p for group in opt.param_groups if group["kind"] == "adamw" for p in group["params"]]
    assert any(p is model.model.embed_tokens.weight for p in adamw)
    assert any(p is model.model.norm.weight for p in adamw)
    fused, single = ([p.detach().clone().requires_grad_() for p in adamw] for _ in range(2))
    settings = {"lr": cfg.lr, "betas": cfg.adamw_betas, "eps": cfg.adamw_eps, "weight_decay": cfg.weight_decay}
    refs = [torch.optim.AdamW(fused, fused=True, **settings), torch.optim.AdamW(single, foreach=False, **settings)]
    for step in range(5):
        for p, f, s in zip(adamw, fused, single):
            p.grad = torch.randn_like(p)
            f.grad, s.grad = p.grad.clone(), p.grad.clone()
        for ref in refs:
            ref.param_groups[0]["lr"] = lr_at(step, g.PLAN.optimizer)
            ref.step()
        opt.step()
        scheduler.step()
        for p, f, s in zip(adamw, fused, single):
            assert torch.equal(p.detach(), f.detach())
            torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-6, atol=1e-7)


def test_adamw_keeps_fp32_moments_for_bf16_parameters(g):
    """A bf16 parameter steps as its fp32 value would under fused AdamW with fp32 moments, rounded once. (The
    router's weight stays fp32 in a bf16 model.)"""
    model, opt = fresh(g, dtype=torch.bfloat16)
    cfg = g.PLAN.optimizer
    adamw = [p for group in opt.param_groups if group["kind"] == "adamw" for p in group["params"]]
    assert any(p.dtype == torch.bfloat16 for p in adamw)
    masters = [p.detach().float().requires_grad_() for p in adamw]
    ref = torch.optim.AdamW(masters, lr=cfg.lr, betas=cfg.adamw_betas, eps=cfg.adamw_eps,
                            weight_decay=cfg.weight_decay, fused=True)
    for _ in range(3):
        for p, master in zip(adamw, masters):
            p.grad = torch.randn_like(p)
            master.grad = p.grad.float()
        ref.param_groups[0]["lr"] = g.PLAN.optimizer.lr  # no scheduler: the plan's lr
        ref.step()
        opt.step()
        for p, master in zip(adamw, masters):
            assert torch.equal(p.detach(), master.detach().to(p.dtype))
            assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
            with torch.no_grad():
                master.copy_(p)  # the optimizer keeps no fp32 copy: each step starts from the rounded weight


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
def test_lr_schedule(g, monkeypatch, decay):
    warmup, steps, peak, ratio = 4, 20, 0.5, 0.1
    plan = dataclasses.replace(g.PLAN.optimizer, lr=peak, warmup_steps=warmup, decay_steps=steps, decay=decay,
                               final_lr_ratio=ratio)
    floor = peak * ratio
    for step in range(steps + 5):
        if step < warmup:
            expected = peak * (step + 1) / warmup
        elif decay == "constant":
            expected = peak
        else:
            t = min(step - warmup, steps - warmup) / (steps - warmup)
            shape = (1 + math.cos(math.pi * t)) / 2 if decay == "cosine" else 1 - t
            expected = floor + (peak - floor) * shape
        assert lr_at(step, plan) == pytest.approx(expected, rel=1e-12)
    assert lr_at(warmup - 1, plan) == pytest.approx(peak)
    assert lr_at(steps, plan) == pytest.approx(peak if decay == "constant" else floor)

    model, _ = fresh(g)
    opt = optim.build_optimizer(model, plan)
    assert all(group["lr"] == peak for group in opt.param_groups)  # without a scheduler, the plan's lr
    scheduler = optim.build_scheduler(opt, plan)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    for step in range(6):
        assert scheduler.lr_lambdas[0](step) == pytest.approx(lr_at(step, plan) / peak, rel=1e-12)
        opt.step()
        assert opt.last_report["lr"] == lr_at(step, plan)  # to the bit
        assert all(group["lr"] == lr_at(step, plan) for group in opt.param_groups)
        scheduler.step()


def test_param_groups_follow_the_rules(g):
    model, opt = fresh(g)
    kind = {id(p): group["kind"] for group in opt.param_groups for p in group["params"]}
    expected = {
        "model.embed_tokens.weight": "adamw",
        "model.layers.1.input_layernorm.weight": "adamw",
        "model.layers.1.mlp.gate.weight": "adamw",  # router weight: the spec's default
        SQUARE: "muon",
        WIDE: "muon",
        TALL: "muon",
        EXPERTS: "muon",
        "model.layers.0.mlp.down_proj.weight": "muon",
        "lm_head.weight": "adamw",
    }
    for name, want in expected.items():
        assert kind[id(model.get_parameter(name))] == want, name
    assert len(kind) == sum(1 for _ in model.parameters())
    assert all(group["weight_decay"] == g.PLAN.optimizer.weight_decay for group in opt.param_groups)

    model.model.norm.weight.requires_grad_(False)
    assert all(p is not model.model.norm.weight for group in g.build_optimizer(model).param_groups
               for p in group["params"])

    model.register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match="'stray'"):
        g.build_optimizer(model)


def test_router_bias_moves_against_the_load(g):
    model, opt = fresh(g)
    model.train()
    with torch.no_grad():
        model(torch.randint(0, g.CONFIG.vocab_size, (2, 32)))
    loads = model.expert_loads()
    assert loads.keys() == {1, 2}
    biases = {i: model.get_buffer(f"model.layers.{i}.mlp.gate.e_score_correction_bias") for i in loads}
    before = {i: b.clone() for i, b in biases.items()}
    opt.step()
    for i, load in loads.items():
        assert load.sum() == 2 * 32 * g.CONFIG.experts_per_token
        rate = g.PLAN.model.layers[i].mlp.router.bias_rate
        assert rate > 0
        expected = before[i] + rate * torch.sign(load.mean() - load)
        assert torch.equal(biases[i], expected)
        assert (biases[i] != before[i]).any()
    assert all((load == 0).all() for load in model.expert_loads().values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_exact(low_tau, dtype):
    g = low_tau
    data = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, g.CONFIG.vocab_size, (2, 16), generator=data) for _ in range(8)]

    def train(model, opt, batch_list):
        clipped = 0
        for x in batch_list:
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            clipped += opt.last_report["clipped_heads"]
        return clipped

    model, opt = fresh(g, dtype=dtype)
    model.train()
    train(model, opt, batches[:3])
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    assert train(model, opt, batches[3:]) > 0

    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed, resumed_opt = fresh(g, seed=1, dtype=dtype)
    resumed.train()
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    assert resumed_opt.state["step"] == 3
    assert all(t.dtype == torch.float32 for s in resumed_opt.state.values() if isinstance(s, dict)
               for t in s.values() if torch.is_tensor(t))
    train(resumed, resumed_opt, batches[3:])

    assert resumed_opt.state["step"] == opt.state["step"] == 8
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed_opt.state[q][key])), key
