"""§5's optimiser against its formula, and the learning-rate rules."""

import copy

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


def test_fused_update_matches_the_foreach_form():
    """PaperSGD(fused=True): kernels.c's one-pass update against the foreach reference, over
    steps with decay, a learning-rate drop, a channels_last weight, and a parameter the kernel
    does not take (fp64: foreach)."""
    from reproduction.ops import kernels
    if kernels.library() is None:
        pytest.skip("no C compiler: the fused update falls back to the foreach form")
    g = torch.Generator().manual_seed(0)
    shapes = [(96, 3, 11, 11), (4096,), (7, 5)]

    def make():
        ps = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(shapes)]
        ps[0] = torch.nn.Parameter(ps[0].data.contiguous(memory_format=torch.channels_last))
        ps.append(torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))))
        return ps

    ref, fast = make(), make()
    opts = [PaperSGD([{"params": ps[:1] + ps[2:], "weight_decay": 5e-4}, {"params": ps[1:2], "weight_decay": 0.0}],
                     lr=0.01, momentum=0.9, fused=f) for ps, f in ((ref, False), (fast, True))]
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ref]
        for ps, opt in zip((ref, fast), opts):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone().to(memory_format=torch.channels_last) if p.dim() == 4 else gr.clone()
            if step == 3:
                for group in opt.param_groups:
                    group["lr"] = 0.001
            opt.step()
    for a, b in zip(ref, fast):
        torch.testing.assert_close(b.data, a.data, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opts[1].state[b]["velocity"], opts[0].state[a]["velocity"], rtol=1e-6, atol=1e-7)
    assert opts[1].state[fast[0]]["velocity"].is_contiguous(memory_format=torch.channels_last)


def test_velocity_loaded_in_another_layout_takes_the_parameters():
    """A checkpoint's velocities are NCHW; after the net goes channels_last the first step puts
    each velocity in its parameter's layout (the fast foreach path), the same values."""
    w = torch.nn.Parameter(torch.randn(4, 3, 5, 5))
    opt = PaperSGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones_like(w)
    opt.step()
    state = copy.deepcopy(opt.state_dict())  # as a checkpoint holds it, not the live tensors
    w2 = torch.nn.Parameter(w.data.clone().contiguous(memory_format=torch.channels_last))
    opt2 = PaperSGD([w2], lr=0.1, momentum=0.9)
    opt2.load_state_dict(state)
    w.grad = torch.ones_like(w)
    w2.grad = torch.ones_like(w2)
    opt.step()
    opt2.step()
    assert opt2.state[w2]["velocity"].stride() == w2.stride()
    torch.testing.assert_close(w2.data, w.data)
