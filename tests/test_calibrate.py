"""Head calibration from the devices' feature statistics (da3.federated.calibrate)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from da3.errors import Da3Error
from da3.federated.calibrate import Mixture, calibrate_head, check_rank, feature_stats


def features(seed: int = 0, n: int = 40, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)
    y = torch.arange(n) % 3
    return x + 4 * y[:, None].float(), y


def test_stats_are_each_class_mean_and_spread():
    """Per class: the count, the mean, and components whose outer product plus the residual
    variance gives the class's covariance (its diagonal at any rank; all of it when the
    rank covers the class's spread)."""
    x, y = features()
    for rank in (2, 16):
        s = feature_stats(x, y, rank)
        assert s["classes"].tolist() == [0, 1, 2] and s["counts"].tolist() == [14, 13, 13]
        assert s["components"].shape == (3, 6, rank) and s["residual"].shape == (3, 6)
        for j in range(3):
            xc = x[y == j]
            cov = torch.cov(xc.T)
            assert torch.allclose(s["means"][j], xc.mean(0), atol=1e-5)
            c = s["components"][j]
            rebuilt = c @ c.T + torch.diag(s["residual"][j] ** 2)
            assert torch.allclose(torch.diagonal(rebuilt), torch.diagonal(cov), rtol=1e-4)
            if rank >= 6:
                assert torch.allclose(rebuilt, cov, rtol=1e-4, atol=1e-4)
                assert s["residual"][j].max() < 1e-3
    # a class of one image: its mean, no spread
    one = feature_stats(x[:1], y[:1], 4)
    assert torch.equal(one["means"][0], x[0]) and one["components"].abs().sum() == 0
    assert one["residual"].abs().sum() == 0


def test_virtual_features_follow_the_devices_gaussians():
    """Each class is drawn from the components of that class only, in proportion to the
    devices' counts; the draws have the components' mean and covariance."""
    x, y = features(n=300)
    a = feature_stats(x[:150], y[:150], 6)
    b = feature_stats(x[150:] + 100, y[150:], 6)  # a second device, far away
    b["counts"] = b["counts"] * 3  # three times as many images as the first
    mix = Mixture([a, b], num_classes=3)
    assert mix.classes == [0, 1, 2] and len(mix.owner) == 6
    g = torch.Generator().manual_seed(0)
    draws = mix.sample(torch.full((20000,), 1), g)
    far = draws.mean(1) > 50
    assert far.float().mean() == pytest.approx(0.75, abs=0.02)  # counts 3:1
    near = draws[~far]
    assert torch.allclose(near.mean(0), a["means"][1], atol=0.15)
    want = a["components"][1] @ a["components"][1].T + torch.diag(a["residual"][1] ** 2)
    assert torch.allclose(torch.cov(near.T), want, atol=0.1 * want.abs().max())
    with pytest.raises(Da3Error, match="statistics of class 5"):
        Mixture([{**a, "classes": torch.tensor([0, 1, 5])}], num_classes=3)
    with pytest.raises(Da3Error, match="no device sent feature statistics"):
        Mixture([], num_classes=3)


def test_calibration_mends_a_biased_head():
    """A linear head that favours one class (as averaging heads trained on a few classes
    each leaves it) is re-fitted on virtual features of every class: on real features of
    the same distributions it then gets them right; the head's requires_grad is as before
    and no gradient is left on it."""
    x, y = features(n=600)
    stats = [feature_stats(x[y != 2], y[y != 2], 6), feature_stats(x[y == 2], y[y == 2], 6)]
    head = nn.Linear(6, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    head.requires_grad_(False)
    assert (head(x).argmax(1) == y).float().mean() < 0.4
    done = calibrate_head(head, stats, lr=0.05, seed=0)
    assert done["classes"] == 3 and done["components"] == 3 and done["steps"] > 0
    assert (head(x).argmax(1) == y).float().mean() > 0.95
    assert all(not p.requires_grad and p.grad is None for p in head.parameters())
    with pytest.raises(Da3Error, match="needs a linear head"):
        calibrate_head(nn.Sequential(nn.Linear(6, 3)), stats, lr=0.05, seed=0)
    with pytest.raises(Da3Error, match="features of 6 values, the head reads 7"):
        calibrate_head(nn.Linear(7, 3), stats, lr=0.05, seed=0)


def test_the_same_seed_calibrates_the_same():
    x, y = features(n=120)
    stats = [feature_stats(x, y, 4)]
    heads = []
    for _ in range(2):
        torch.manual_seed(1)
        head = nn.Linear(6, 3)
        calibrate_head(head, stats, lr=0.01, seed=3)
        heads.append(head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])


def test_rank_bounds():
    check_rank(0), check_rank(16)
    for bad in (-1, 10_000):
        with pytest.raises(Da3Error, match="--calibrate-head must be between 0"):
            check_rank(bad)
