"""sdk.active: uncertainty and diversity selection, and the simulated annotation loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sdk.active import (  # noqa: E402
    ActiveError,
    compare_strategies,
    entropy_map,
    kcentre_greedy,
    labels_to_reach,
    select,
    simulate_annotation,
    uncertainty_scores,
)
from sdk.models import UNet  # noqa: E402
from sdk.trainer import TrainConfig, Trainer, seeded_build  # noqa: E402


class _Fixed(nn.Module):
    """Logits proportional to the image's first pixel: sharp where it is large, flat where small."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Identity()

    def forward(self, x):
        s = self.encoder(x)[:, :1]
        return torch.cat([s, -s], dim=1)  # (B, 2, H, W)


def _entropy2(a):
    p = 1 / (1 + math.exp(-2 * a))
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_entropy_ranks_confident_and_uncertain_images():
    levels = [3.0, 0.1, 1.0, 0.0, 2.0]
    pool = torch.stack([torch.full((1, 8, 8), v) for v in levels])
    u = uncertainty_scores(_Fixed(), pool)
    np.testing.assert_allclose(u, [_entropy2(a) for a in levels], rtol=1e-5)  # analytic 2-class entropy
    assert u[3] == pytest.approx(math.log(2))
    rng = np.random.default_rng(0)
    assert select(_Fixed(), pool, 2, strategy="entropy", rng=rng) == [3, 1]
    assert select(_Fixed(), pool, 2, strategy="entropy", rng=rng, labelled=[3]) == [1, 2]
    np.testing.assert_allclose(entropy_map(torch.zeros(2, 4)).numpy(), math.log(4), rtol=1e-6)
    # whole images of different sizes are scored one at a time
    mixed = [torch.full((1, 8, 8), 3.0), torch.full((1, 12, 10), 0.0), torch.full((1, 8, 8), 1.0)]
    np.testing.assert_allclose(uncertainty_scores(_Fixed(), mixed), [_entropy2(3.0), math.log(2), _entropy2(1.0)],
                               rtol=1e-5)


def _brute_kcentre(f, k, labelled):
    chosen, centres = [], list(labelled)
    for _ in range(k):
        best, best_d = None, -1.0
        for i in range(len(f)):
            if i in centres:
                continue
            d = min(np.linalg.norm(f[i] - f[c]) for c in centres)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
        centres.append(best)
    return chosen


def test_kcentre_matches_brute_force_greedy_and_picks_far_points():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(40, 3))
    for labelled in ([0], [5, 17, 30]):
        assert kcentre_greedy(f, 6, labelled) == _brute_kcentre(f, 6, labelled)
    # corners of a square far from a central cluster: chosen before any cluster point
    pts = np.vstack([rng.normal(scale=0.1, size=(20, 2)), [[10, 10], [-10, 10], [10, -10], [-10, -10]]])
    assert sorted(kcentre_greedy(pts, 4, labelled=[0])) == [20, 21, 22, 23]
    # nothing labelled: the first centre comes from rng, deterministically
    a = kcentre_greedy(f, 5, rng=np.random.default_rng(3))
    assert a == kcentre_greedy(f, 5, rng=np.random.default_rng(3)) and len(set(a)) == 5
    with pytest.raises(ActiveError, match="rng"):
        kcentre_greedy(f, 2)


def _pool(n=12, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.avg_pool2d(torch.randn(n, 1, size, size, generator=g), 3, 1, 1) * 3
    x = x * torch.linspace(0.2, 2.0, n)[:, None, None, None]  # varied contrast: varied confidence
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0.3).long())


@pytest.mark.parametrize("strategy", ["entropy", "mc_dropout", "kcentre", "entropy+kcentre", "random"])
def test_select_never_repeats_or_picks_labelled_and_is_deterministic(strategy):
    pool = _pool()
    net = seeded_build(lambda: UNet(1, 2, depth=2, width=4), 0)
    state = torch.random.get_rng_state()
    labelled = [0, 3, 7]
    a = select(net, pool, 5, strategy=strategy, rng=np.random.default_rng(5), labelled=labelled, mc_passes=3)
    b = select(net, pool, 5, strategy=strategy, rng=np.random.default_rng(5), labelled=labelled, mc_passes=3)
    assert a == b and len(a) == 5 and len(set(a)) == 5 and not set(a) & set(labelled)
    assert all(0 <= i < len(pool) for i in a)
    assert torch.equal(state, torch.random.get_rng_state())
    all_free = select(net, pool, 9, strategy=strategy, rng=np.random.default_rng(5), labelled=labelled, mc_passes=2)
    assert sorted(all_free) == sorted(set(range(12)) - set(labelled))
    with pytest.raises(ActiveError, match="unlabelled"):
        select(net, pool, 10, strategy=strategy, rng=np.random.default_rng(0), labelled=labelled)


def test_mc_dropout_varies_with_the_seed_and_restores_modes():
    pool = _pool(6)
    net = seeded_build(lambda: UNet(1, 2, depth=2, width=4), 0).eval()
    with torch.no_grad():
        net.head.weight.mul_(30)  # confident logits, so dropout noise shows in the entropy
    one = uncertainty_scores(net, pool)
    mc1 = uncertainty_scores(net, pool, mc_passes=4, seed=1)
    mc2 = uncertainty_scores(net, pool, mc_passes=4, seed=2)
    assert not np.allclose(mc1, mc2) and not np.allclose(mc1, one)
    np.testing.assert_array_equal(mc1, uncertainty_scores(net, pool, mc_passes=4, seed=1))
    assert not any(m.training for m in net.modules())
    # a model with its own dropout: only those layers switch on (the injected one is not used)
    drop = seeded_build(lambda: UNet(1, 2, depth=2, width=4, dropout=0.5), 0).eval()
    with torch.no_grad():
        drop.head.weight.mul_(30)
    assert not np.allclose(uncertainty_scores(drop, pool, mc_passes=4, seed=1, dropout=0.0),
                           uncertainty_scores(drop, pool))
    with pytest.raises(ActiveError, match="strategy"):
        select(net, pool, 1, strategy="bald", rng=np.random.default_rng(0))


def test_annotation_loop_runs_and_reports_metric_vs_labels():
    pool, test = _pool(12, 16, seed=0), _pool(4, 16, seed=1)

    def make():
        return seeded_build(lambda: UNet(1, 2, depth=2, width=4), 0)

    def train(model, data):
        Trainer(model, data, config=TrainConfig(epochs=1, batch_size=4, lr=1e-2, progress=False,
                                                boundary_class=None)).fit()

    res = compare_strategies(make, train, pool, test, rounds=2, batch=3, seed_batch=2,
                             rng=np.random.default_rng(0), strategies=("entropy+kcentre", "random"))
    for strategy, curve in res.items():
        assert [r["n_labels"] for r in curve] == [2, 5, 8]
        assert all(0.0 <= r["metric"] <= 1.0 for r in curve)
        used = curve[-1]["labelled"]
        assert len(set(used)) == len(used) == 8 and curve[-1]["selected"] == []
        assert all(r["strategy"] == strategy for r in curve)
    assert res["random"][0]["labelled"] == res["entropy+kcentre"][0]["labelled"]  # same cold start
    again = simulate_annotation(make, train, pool, test, rounds=1, batch=3, seed_batch=2,
                                strategy="entropy", rng=np.random.default_rng(4))
    twice = simulate_annotation(make, train, pool, test, rounds=1, batch=3, seed_batch=2,
                                strategy="entropy", rng=np.random.default_rng(4))
    assert again == twice
    assert labels_to_reach([{"n_labels": 2, "metric": 0.3}, {"n_labels": 5, "metric": 0.6}], 0.5) == 5
    assert labels_to_reach([{"n_labels": 2, "metric": 0.3}], 0.5) is None
    with pytest.raises(ActiveError, match="exceed"):
        simulate_annotation(make, train, pool, test, rounds=5, batch=4, seed_batch=2, rng=np.random.default_rng(0))
