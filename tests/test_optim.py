"""§5's optimiser against its formula, and the learning-rate rules."""

import pytest
import torch
from torch import nn

from reproduction.optim import PaperSGD, fixed_schedule_lr, paper_param_groups, plateau_lr


def test_update_follows_the_formula_step_by_step_across_a_drop():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = PaperSGD(paper_param_groups(model), lr=0.01)
    w, b = model.weight.detach().clone().double(), model.bias.detach().clone().double()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    lrs = [0.01] * 4 + [0.001] * 8  # a ÷10 drop after step 4
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        x = torch.randn(5, 4)
        opt.zero_grad()
        model(x).square().sum().backward()
        gw, gb = model.weight.grad.double(), model.bias.grad.double()
        opt.step()
        # v ← 0.9·v − 0.0005·ε·w − ε·g ; w ← w + v (no decay on the bias)
        vw = 0.9 * vw - 0.0005 * lr * w - lr * gw
        vb = 0.9 * vb - lr * gb
        w, b = w + vw, b + vb
        torch.testing.assert_close(model.weight.double(), w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model.bias.double(), b, rtol=1e-5, atol=1e-7)


def test_differs_from_torch_sgd_only_after_a_drop():
    """Same trajectory as torch.optim.SGD at constant ε; after a drop the old velocity keeps
    its old scale here, so the next step is larger than torch's."""
    torch.manual_seed(0)
    ours, theirs = nn.Linear(4, 3), nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    opt_ours = PaperSGD([{"params": ours.parameters(), "weight_decay": 0.0}], lr=0.01)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9)
    xs = torch.randn(6, 5, 4)
    for i, x in enumerate(xs):
        if i == 4:
            for opt in (opt_ours, opt_theirs):
                opt.param_groups[0]["lr"] = 0.001
        steps = []
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            before = model.weight.detach().clone()
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
            steps.append((model.weight - before).norm().item())
        if i < 4:
            torch.testing.assert_close(ours.weight, theirs.weight)
        if i == 4:  # the first step at the new rate: the old velocity still carries ε = 0.01
            assert steps[0] > 3 * steps[1]


def test_weight_decay_exempts_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    weights, biases = paper_param_groups(model)
    assert all(p.ndim > 1 for p in weights["params"]) and len(weights["params"]) == 2
    assert all(p.ndim == 1 for p in biases["params"]) and len(biases["params"]) == 2
    assert (weights["weight_decay"], biases["weight_decay"]) == (5e-4, 0.0)


def test_state_round_trip():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = PaperSGD(paper_param_groups(model))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    restored = PaperSGD(paper_param_groups(model))
    restored.load_state_dict(opt.state_dict())
    v = restored.state[model.weight]["velocity"]
    assert torch.equal(v, opt.state[model.weight]["velocity"]) and v.abs().sum() > 0


def test_rejects_negative_hyperparameters():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        PaperSGD(nn.Linear(2, 2).parameters(), lr=-1)


def test_fixed_schedule():
    lrs = [fixed_schedule_lr(e, 0.01, (30, 60, 80)) for e in (0, 29, 30, 59, 60, 80, 89)]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 1e-4, 1e-5, 1e-5])


def test_plateau_rule():
    rule = dict(patience=2, min_improvement=0.001)
    assert plateau_lr([], 0.01, **rule) == 0.01
    assert plateau_lr([0.9, 0.8, 0.7, 0.6], 0.01, **rule) == 0.01            # still improving
    assert plateau_lr([0.9, 0.8, 0.8], 0.01, **rule) == 0.01                 # one stale epoch
    assert plateau_lr([0.9, 0.8, 0.8, 0.8005], 0.01, **rule) == pytest.approx(0.001)  # two: drop
    # the count restarts at the new rate, and there are at most three drops
    flat = [0.5] * 40
    assert plateau_lr(flat[:5], 0.01, **rule) == pytest.approx(0.001)
    assert plateau_lr(flat, 0.01, **rule) == pytest.approx(1e-5)
