"""The learning-rate schedules, as functions of progress: one-cycle equals PyTorch's OneCycleLR."""

from __future__ import annotations

import pytest
import torch

from lstmlab.training.schedules import schedule


def test_onecycle_follows_torch_onecycle() -> None:
    """Ours at step s of n (progress s/n) lies within one step of OneCycleLR's: lr and Adam's beta1."""
    steps, peak = 1000, 3e-3
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=peak)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=steps, pct_start=0.25)
    want = []
    for _ in range(steps):
        want.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
        optimizer.step()
        reference.step()
    for step in range(steps):
        got = schedule("onecycle", peak, step / steps)
        near = want[max(step - 1, 0) : step + 2]
        for k in (0, 1):
            values = [w[k] for w in near]
            assert min(values) * (1 - 1e-9) - 1e-15 <= got[k] <= max(values) * (1 + 1e-9) + 1e-15, (step, k)
    assert schedule("onecycle", peak, 0.25)[0] == pytest.approx(peak)


def test_cosine_and_constant() -> None:
    lrs = [schedule("cosine", 0.1, k / 100)[0] for k in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert {schedule("none", 0.1, k / 10) for k in range(11)} == {(0.1, None)}
    assert schedule("onecycle", 1.0, 7.0) == schedule("onecycle", 1.0, 1.0)  # progress past the end is the end
