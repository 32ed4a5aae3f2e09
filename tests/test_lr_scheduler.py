"""The generated optimizer follows PyTorch's conventions: each step uses its group's lr, so that a user's
torch.optim.lr_scheduler drives it, and the spec's own schedule is such a scheduler (`build_scheduler`)."""

from __future__ import annotations

import io

import pytest
import torch
from specs_for_tests import tiny_spec

from k2c.runtime.optim import lr_at

WIDE = "model.layers.1.self_attn.q_a_proj.weight"


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    from conftest import import_generated
    from k2c.codegen import build_package

    spec = tiny_spec(name="lr_tiny", optimizer={"lr": 0.02, "weight_decay": 0.0,
                                                "schedule": {"warmup_steps": 3, "final_lr_ratio": 0.1}},
                     **{"training.steps": 10})
    out = tmp_path_factory.mktemp("lr") / spec.name
    build_package(spec, out)
    return import_generated(out)


def update_norm(opt, w, grad):
    before = w.detach().clone()
    w.grad = grad.clone()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (w.detach() - before).norm().item()


def test_a_users_lambda_lr_changes_the_steps_learning_rate(g):
    torch.manual_seed(0)
    model = g.build_model()
    opt = g.build_optimizer(model)
    assert all(group["lr"] == g.PLAN.optimizer.lr for group in opt.param_groups)  # the peak, no schedule applied
    factors = [1.0, 0.5, 0.0, 0.25]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[min(step, len(factors) - 1)])
    w = model.get_parameter(WIDE)
    grad = torch.randn_like(w)
    norms = []
    for factor in factors:
        norms.append(update_norm(opt, w, grad))
        assert opt.last_report["lr"] == g.PLAN.optimizer.lr * factor  # what the step used
        scheduler.step()
    # Muon's orthogonalised update has a fixed size per unit of lr; no weight decay here
    assert norms[2] == 0.0
    assert norms[1] == pytest.approx(norms[0] * 0.5, rel=0.05)
    assert norms[3] == pytest.approx(norms[0] * 0.25, rel=0.05)


def test_the_specs_schedule_is_a_lambda_lr_that_resumes(g):
    plan = g.PLAN.optimizer
    torch.manual_seed(0)
    model = g.build_model()
    opt = g.build_optimizer(model)
    scheduler = g.build_scheduler(opt)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert opt.param_groups[0]["lr"] == lr_at(0, plan)
    for step in range(4):
        opt.step()
        assert opt.last_report["lr"] == lr_at(step, plan)
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # what a training checkpoint saves
    assert opt.state_dict()["scheduler"]["last_epoch"] == 4  # the scheduler's state rides in the optimizer's
    buffer.seek(0)
    opt2 = g.build_optimizer(model)
    scheduler2 = g.build_scheduler(opt2)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))  # loads the scheduler too, without pickled code
    assert scheduler2.last_epoch == 4 and opt2.param_groups[0]["lr"] == lr_at(4, plan)
    for step in range(4, 8):
        opt.step()
        opt2.step()
        assert opt2.last_report["lr"] == opt.last_report["lr"] == lr_at(step, plan)
        scheduler.step()
        scheduler2.step()


def test_build_scheduler_takes_a_stretched_schedule(g):
    model = g.build_model()
    opt = g.build_optimizer(model)
    scheduler = g.build_scheduler(opt, warmup_steps=0, decay_steps=4)
    lrs = []
    for _ in range(5):
        opt.step()
        lrs.append(opt.last_report["lr"])
        scheduler.step()
    assert lrs[0] == pytest.approx(g.PLAN.optimizer.lr)
    assert lrs[4] == pytest.approx(g.PLAN.optimizer.lr * 0.1)
