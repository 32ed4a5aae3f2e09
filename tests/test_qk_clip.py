"""QK-Clip in the generated MuonClip optimizer: each clipped head's logits scale by exactly gamma, nothing else moves.

The pre-softmax logits are recomputed here from the projections' outputs, with RoPE written plainly as complex
rotations, and checked against the maxima the model records.
"""

import dataclasses
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import import_generated
from k2c.codegen import build_package
from k2c.runtime.train import leave_process_group
from specs_for_tests import tiny_spec


def build(spec, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(spec.name) / spec.name
    build_package(spec, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    return build(tiny_spec(name="clip_tiny"), tmp_path_factory)


@pytest.fixture(scope="module")
def g(package_dir):
    return import_generated(package_dir)


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """Adapters on the query and kv_b projections: their base weights are frozen, so the clip is a logit scale."""
    spec = tiny_spec(name="clip_frozen", adapter={"kind": "lora", "targets": [{"match": "attn.{q_b,kv_b}"}]})
    return import_generated(build(spec, tmp_path_factory))


def fresh(g, seed=0):
    torch.manual_seed(seed)
    model = g.build_model()
    model.eval()
    return model, g.build_optimizer(model)


def attention_path(site):
    return site.q_weight.rsplit(".", 2)[0]


def rotate(x, rope):
    """RoPE on x [batch, seq, ..., dr]: the rotary dims as complex pairs (interleaved or split halves), turned by
    position * theta^(-2i/dr)."""
    if rope.interleaved:
        pairs = torch.complex(x[..., 0::2].double(), x[..., 1::2].double())
    else:
        half = x.shape[-1] // 2
        pairs = torch.complex(x[..., :half].double(), x[..., half:].double())
    freq = rope.theta ** (-torch.arange(0, x.shape[-1], 2, dtype=torch.float64) / x.shape[-1])
    angles = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * freq
    angles = angles.view(x.shape[1], *[1] * (x.dim() - 3), -1)  # broadcast over the heads, if any
    return pairs * torch.polar(torch.ones_like(angles), angles)


def projections(site):
    """The modules whose outputs make the logits: the query projection, kv_a (rotary key) and kv_b (non-rotary key)."""
    return (site.q_weight.rsplit(".", 1)[0], f"{attention_path(site)}.kv_a_proj_with_mqa",
            site.kv_weight.rsplit(".", 1)[0])


def forward(g, model, input_ids, attention_inputs=None):
    """One forward pass; returns what each clip site's attention layer was fed and its projections' outputs.

    Given `attention_inputs` ({layer: hidden states}), every attention layer is fed those instead of its own, so
    that a clip in one layer does not change what the next layer sees.
    """
    fed, outputs, hooks = {}, {}, []

    def feed(module, args, layer):  # the attention's input, as the projections that read it receive it
        x = args[0] if attention_inputs is None else attention_inputs[layer]
        fed[layer] = x
        return (x,)

    def keep(module, args, out, name):
        outputs[name] = out

    for site in g.QK_CLIP_SITES:
        attention = model.get_submodule(attention_path(site))
        readers = (attention.q_a_proj if hasattr(attention, "q_a_proj") else attention.q_proj,
                   attention.kv_a_proj_with_mqa)
        hooks += [m.register_forward_pre_hook(partial(feed, layer=site.layer)) for m in readers]
        hooks += [model.get_submodule(m).register_forward_hook(partial(keep, name=m)) for m in projections(site)]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    return fed, outputs


def pre_softmax_logits(g, outputs, batch, t):
    """{layer: logits [batch, heads, t, t] (fp64, -inf above the diagonal)} from the projections' outputs."""
    a = g.PLAN.model.layers[0].attention
    assert a.rope.yarn is None  # plain RoPE in `rotate`
    heads, dn, dr, dv = a.heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    logits = {}
    for site in g.QK_CLIP_SITES:
        q_out, kv_a_out, kv_b_out = (outputs[m] for m in projections(site))
        q = q_out.view(batch, t, heads, dn + dr).double()
        k_nope = kv_b_out.view(batch, t, heads, dn + dv)[..., :dn].double()
        k_rope = kv_a_out[..., a.kv_lora_rank:]
        nope = torch.einsum("bqhd,bkhd->bhqk", q[..., :dn], k_nope)
        rope = torch.einsum("bqhd,bkd->bhqk", rotate(q[..., dn:], a.rope), rotate(k_rope, a.rope).conj()).real
        logits[site.layer] = ((nope + rope) * a.softmax_scale).masked_fill(~causal, -math.inf)
    return logits


def with_tau(model, tau):
    """Clip every attention layer of `model` at `tau` from now on (None: no clip)."""
    for attention in model.attentions():
        clip = attention.plan.clip
        clip = dataclasses.replace(clip, mode="off") if tau is None else dataclasses.replace(clip, tau=tau)
        attention.plan = dataclasses.replace(attention.plan, clip=clip)


def gamma_of(max_logits, tau):
    return torch.where(max_logits > tau, tau / max_logits, torch.ones_like(max_logits))


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def test_clip_scales_each_clipped_heads_logits_by_gamma(g):
    cfg = g.CONFIG
    heads, dn, dr, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    model, opt = fresh(g)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 24))
    fed, outputs = forward(g, model, input_ids)
    old = pre_softmax_logits(g, outputs, *input_ids.shape)
    recorded = model.step_max_logits()
    for site in g.QK_CLIP_SITES:  # the logits computed here are the model's own
        torch.testing.assert_close(old[site.layer].amax(dim=(0, 2, 3)), recorded[site.layer].double())

    tau = recorded.median().item()
    gamma = gamma_of(recorded, tau)
    clipped = gamma < 1
    assert 0 < clipped.sum() < clipped.numel()
    with_tau(model, tau)
    before = snapshot(model)
    opt.step()  # no gradients: the clip is the only change
    assert opt.last_report["clipped_heads"] == clipped.sum().item()
    assert opt.last_report["max_logits"] == recorded.amax(dim=1).tolist()

    _, outputs = forward(g, model, input_ids, fed)
    new = pre_softmax_logits(g, outputs, *input_ids.shape)
    for site in g.QK_CLIP_SITES:
        for h in range(heads):
            if clipped[site.layer, h]:
                expected = old[site.layer][:, h] * gamma[site.layer, h].double()
                torch.testing.assert_close(new[site.layer][:, h], expected, rtol=1e-5, atol=1e-7)
            else:
                assert torch.equal(new[site.layer][:, h], old[site.layer][:, h])
    after_max = model.max_logits()
    torch.testing.assert_close(after_max[clipped], torch.full_like(after_max[clipped], tau), rtol=1e-5, atol=0)
    assert torch.equal(after_max[~clipped], recorded[~clipped])

    after = snapshot(model)
    for site in g.QK_CLIP_SITES:
        root, gam = gamma[site.layer].sqrt().view(heads, 1, 1), gamma[site.layer].view(heads, 1, 1)
        q_old, q_new = (t[site.q_weight].view(heads, dn + dr, -1) for t in (before, after))
        torch.testing.assert_close(q_new[:, :dn], q_old[:, :dn] * root, rtol=1e-6, atol=0)
        torch.testing.assert_close(q_new[:, dn:], q_old[:, dn:] * gam, rtol=1e-6, atol=0)
        kv_old, kv_new = (t[site.kv_weight].view(heads, dn + dv, -1) for t in (before, after))
        torch.testing.assert_close(kv_new[:, :dn], kv_old[:, :dn] * root, rtol=1e-6, atol=0)
        assert torch.equal(kv_new[:, dn:], kv_old[:, dn:])  # values
    touched = {name for site in g.QK_CLIP_SITES for name in (site.q_weight, site.kv_weight)}
    for name in before.keys() - touched:  # shared rotary key (kv_a_proj_with_mqa), o_proj, q_a_proj, ...
        assert torch.equal(after[name], before[name]), name


def test_clip_leaves_the_optimizer_state_alone(g):
    """One step with and one without the clip, from the same weights and gradients: same momentum everywhere."""
    input_ids = torch.randint(0, g.CONFIG.vocab_size, (2, 24))
    runs = []
    for tau in (None, 1e-3):  # far below every head's max logit: all are clipped
        model, opt = fresh(g)
        with_tau(model, tau)
        model(input_ids, labels=input_ids).loss.backward()
        opt.step()
        runs.append((model, opt))
    (plain, plain_opt), (clipped, clipped_opt) = runs
    assert plain_opt.last_report["clipped_heads"] == 0
    assert clipped_opt.last_report["clipped_heads"] == g.CONFIG.num_layers * g.CONFIG.num_heads
    touched = {name for site in g.QK_CLIP_SITES for name in (site.q_weight, site.kv_weight)}
    for (name, p), q in zip(plain.named_parameters(), clipped.parameters()):
        assert torch.equal(p, q) != (name in touched), name
        for key, value in plain_opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(clipped_opt.state[q][key])), name


def test_no_clip_without_muonclip(tmp_path_factory):
    g = import_generated(build(tiny_spec(name="clip_muon", optimizer={"kind": "muon", "qk_clip": {"tau": 1e-3}}),
                               tmp_path_factory))
    assert g.QK_CLIP_SITES == ()
    model, opt = fresh(g)
    model(torch.randint(0, g.CONFIG.vocab_size, (1, 16)))
    recorded = model.step_max_logits().clone()
    before = snapshot(model)
    opt.step()
    assert opt.last_report["clipped_heads"] == 0
    assert opt.last_report["max_logits"] == recorded.amax(dim=1).tolist()
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert (model.step_max_logits() == -math.inf).all()  # statistics reset for the next step


def test_frozen_weights_clip_through_the_logit_scale(frozen):
    g = frozen
    assert {site.mode for site in g.QK_CLIP_SITES} == {"scale"}
    model, opt = fresh(g)
    input_ids = torch.randint(0, g.CONFIG.vocab_size, (2, 24))
    fed, _ = forward(g, model, input_ids)
    recorded = model.step_max_logits().clone()
    tau = recorded.median().item()
    gamma = gamma_of(recorded, tau)
    clipped = gamma < 1
    assert 0 < clipped.sum() < clipped.numel()
    with_tau(model, tau)
    before = snapshot(model)
    opt.step()

    forward(g, model, input_ids, fed)
    torch.testing.assert_close(model.max_logits(), recorded * gamma, rtol=1e-6, atol=0)
    after = snapshot(model)
    for site in g.QK_CLIP_SITES:
        assert torch.equal(after[f"{attention_path(site)}.qk_scale"], gamma[site.layer])
    scales = {f"{attention_path(site)}.qk_scale" for site in g.QK_CLIP_SITES}
    for name in before.keys() - scales:
        assert torch.equal(after[name], before[name]), name


def clip_across_ranks(rank, package_dir, init_file):
    """One of two gloo ranks: each sees its own batch; the clip must use the max over both."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        g = import_generated(Path(package_dir))
        model, opt = fresh(g)
        model(torch.randint(0, g.CONFIG.vocab_size, (1, 16), generator=torch.Generator().manual_seed(rank)))
        local = model.step_max_logits().clone()
        both = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(both, local)
        global_max = torch.maximum(*both)
        # a tau that one rank's max exceeds and the other's does not, on at least one head
        split = (both[0] - both[1]).abs().argmax()
        tau = ((both[0].flatten()[split] + both[1].flatten()[split]) / 2).item()
        assert ((both[0] > tau) != (both[1] > tau)).any()
        with_tau(model, tau)

        before = snapshot(model)
        opt.step()
        gamma = gamma_of(global_max, tau)
        assert opt.last_report["clipped_heads"] == (gamma < 1).sum().item()
        assert opt.last_report["max_logits"] == global_max.amax(dim=1).tolist()
        heads, dn, dr = g.CONFIG.num_heads, g.CONFIG.qk_nope_head_dim, g.CONFIG.qk_rope_head_dim
        for site in g.QK_CLIP_SITES:
            q_old = before[site.q_weight].view(heads, dn + dr, -1)
            q_new = model.get_parameter(site.q_weight).detach().view(heads, dn + dr, -1)
            torch.testing.assert_close(q_new[:, dn:], q_old[:, dn:] * gamma[site.layer].view(heads, 1, 1),
                                       rtol=1e-6, atol=0)
    finally:
        leave_process_group()


def test_clip_takes_the_max_over_ranks(package_dir, tmp_path):
    mp.spawn(clip_across_ranks, args=(str(package_dir), str(tmp_path / "rendezvous")), nprocs=2, join=True)
