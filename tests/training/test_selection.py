"""Selective backprop with stale losses: which samples an epoch keeps, and its record."""

from __future__ import annotations

import pytest
import torch

from lstmlab.training.selection import StaleLossSelection


def test_warmup_epochs_train_on_everything() -> None:
    sel = StaleLossSelection(100, beta=3.0, warmup_epochs=2)
    sel.record(torch.arange(100), torch.linspace(0, 1, 100))
    g = torch.Generator().manual_seed(0)
    for epoch in (0, 1):
        assert sorted(sel.epoch_order(epoch, g).tolist()) == list(range(100))
    assert len(sel.epoch_order(2, g)) < 100


def test_never_trained_samples_are_always_kept() -> None:
    sel = StaleLossSelection(50, beta=4.0)
    assert torch.equal(sel.probabilities(), torch.ones(50))
    sel.record(torch.arange(10), torch.rand(10))
    q = sel.probabilities()
    assert torch.equal(q[10:], torch.ones(40))


def test_probability_is_the_loss_percentile_to_the_power_beta() -> None:
    sel = StaleLossSelection(5, beta=2.0, floor=0.05)
    sel.record(torch.tensor([4, 0, 3, 1, 2]), torch.tensor([0.9, 0.1, 0.7, 0.3, 0.5]))
    # losses by sample: 0.1, 0.3, 0.5, 0.7, 0.9 -> percentiles 0, 1/4, 1/2, 3/4, 1
    expected = torch.tensor([0.05, 1 / 16, 1 / 4, 9 / 16, 1.0])  # the smallest one at the floor
    assert torch.allclose(sel.probabilities(), expected)


def test_kept_fraction_follows_the_probabilities() -> None:
    n, beta = 20000, 3.0
    sel = StaleLossSelection(n, beta=beta)
    sel.record(torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(1)))
    kept = sel.epoch_order(1, torch.Generator().manual_seed(2))
    assert len(set(kept.tolist())) == len(kept)  # no repeats
    expected = n / (beta + 1)  # E[r^beta] over uniform percentiles
    assert abs(len(kept) - expected) < 5 * (n * 0.25) ** 0.5
    high = sel.losses[kept] > 0.9
    assert high.float().mean() > 0.3  # the biggest losers dominate what is kept


def test_the_same_generator_draws_the_same_epochs() -> None:
    def run() -> list[list[int]]:
        sel = StaleLossSelection(300, beta=2.0, floor=0.1)
        g = torch.Generator().manual_seed(7)
        orders = []
        for epoch in range(3):
            order = sel.epoch_order(epoch, g)
            sel.record(order, torch.rand(len(order), generator=g))
            orders.append(order.tolist())
        return orders

    assert run() == run()


def test_state_round_trip_and_refuses_another_split() -> None:
    sel = StaleLossSelection(10, beta=1.0)
    sel.record(torch.arange(5), torch.rand(5))
    other = StaleLossSelection(10, beta=1.0)
    other.load(sel.state())
    assert torch.equal(other.losses.nan_to_num(-1), sel.losses.nan_to_num(-1))
    with pytest.raises(ValueError, match="10 samples, the training split 11"):
        StaleLossSelection(11, beta=1.0).load(sel.state())


@pytest.mark.parametrize("kwargs", [{"n": 0, "beta": 1.0}, {"n": 5, "beta": -1.0}, {"n": 5, "beta": 1.0, "floor": 2.0}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        StaleLossSelection(**kwargs)


def _config(*argv: str):  # noqa: ANN202
    from lstmlab.cli import build_parser
    from lstmlab.config.flags import config_from_args

    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_the_fast_and_fashion_recipes() -> None:
    fast = _config("--recipe", "fast")
    t = fast.train
    assert (t.select, t.select_beta, t.time_budget, t.lr) == ("stale-loss", 4.0, 30.0, 6e-3)
    assert fast.model == _config().model  # the default's model, trained for 30 s with selection
    fashion = _config("--dataset", "fashion-mnist")  # the dataset picks its recipe
    assert fashion.recipe == "fashion+flags" and fashion.model.bidirectional and fashion.data.dataset == "fashion-mnist"
    assert (fashion.model.zoneout, fashion.model.recurrent_dropout, fashion.train.epochs) == ([0.1, 0.05], 0.25, 30)
    assert not _config("--dataset", "fashion-mnist", "--recipe", "default").model.bidirectional
    assert _config("--select", "stale-loss", "--select-beta", "2").train.select_beta == 2.0


def test_the_pixel_recipes_and_the_view_picks_them() -> None:
    from lstmlab.config.recipes import PIXEL_LR

    for view in ("pixels", "permuted"):
        config = _config("--view", view)
        assert config.recipe == f"{view}+flags" and config.data.view == view
        t, m, d = config.train, config.model, config.data
        assert (t.time_budget, t.batch_size, t.lr, m.forget_bias, d.augment_shift) == (1800.0, 128, PIXEL_LR[view],
                                                                                       1.0, 0)
        assert _config("--recipe", view).recipe == view
        assert m.cell == ("layernorm" if view == "pixels" else "lstm")
    assert _config("--view", "pixels", "--recipe", "default").train.time_budget is None
    assert _config("--view", "permuted", "--time-budget", "60").train.time_budget == 60.0
