"""Active learning: which real images to label next.

:func:`select` picks ``k`` unlabelled items of a pool by

- ``"entropy"``: highest mean per-pixel predictive entropy ``-Σ_c p_c log p_c`` (nats) of the
  model's softmax (classification: per image);
- ``"mc_dropout"``: the same entropy of the mean softmax over ``passes`` stochastic forward passes
  with dropout on (Gal & Ghahramani 2016). Only the dropout layers are switched to train mode
  (BatchNorm keeps its running statistics); a model without dropout layers (the default
  :class:`sdk.models.UNet`) gets spatial dropout of probability ``dropout`` injected on its
  bottleneck (the deepest encoder map) for the scoring passes only;
- ``"kcentre"``: greedy k-centre (Sener & Savarese 2018) on globally pooled deepest encoder
  features: repeatedly the pool item farthest (Euclidean) from every labelled or already chosen
  item; with nothing labelled the first centre is drawn by ``rng``;
- ``"entropy+kcentre"``: the ``candidates`` most uncertain items (default ``min(4k, pool)``), then
  k-centre among them (uncertain *and* diverse);
- ``"random"``: uniform without replacement (the cold-start seed batch, and the baseline).

:func:`simulate_annotation` replays an annotation campaign on a labelled set whose labels act as
the oracle: a random seed batch, then rounds of training from scratch on the labelled items and
selecting ``batch`` more, recording the test metric against the number of labels used.
:func:`compare_strategies` runs it for several strategies from the same seed batch and
:func:`labels_to_reach` reads off how many labels a curve needs to reach a metric.

The pool must give the same image for an index every time (no random crops: use ``crop=None``,
or ``SyntheticDataset(..., tiles=True)``). All randomness comes from the ``numpy.random.Generator``
passed in; the global torch RNG is left as it was.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from twin.errors import EmtwinError

__all__ = ["ActiveError", "STRATEGIES", "entropy_map", "uncertainty_scores", "pool_features",
           "kcentre_greedy", "select", "simulate_annotation", "compare_strategies", "labels_to_reach"]

STRATEGIES = ("entropy", "mc_dropout", "kcentre", "entropy+kcentre", "random")


class ActiveError(EmtwinError, ValueError):
    """An active-learning request that cannot be met (k too large, unknown strategy, no encoder)."""


def entropy_map(logits: torch.Tensor) -> torch.Tensor:
    """Predictive entropy (nats) per image: softmax over dim 1, mean over any further dims → (B,)."""
    logp = F.log_softmax(logits.float(), dim=1)
    ent = -(logp.exp() * logp).sum(1)
    return ent.reshape(ent.shape[0], -1).mean(1)


def _entropy_of_probs(p: torch.Tensor) -> torch.Tensor:
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return ent.reshape(ent.shape[0], -1).mean(1)


def _pool_batches(pool: Any, batch_size: int):
    if isinstance(pool, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(pool).float()
        for i in range(0, len(t), batch_size):
            yield t[i:i + batch_size]
        return
    n = len(pool)
    for i in range(0, n, batch_size):
        items = [pool[j] for j in range(i, min(i + batch_size, n))]
        xs = [torch.as_tensor(it[0] if isinstance(it, (tuple, list)) else it).float() for it in items]
        if all(x.shape == xs[0].shape for x in xs):
            yield torch.stack(xs)
        else:  # images of different sizes (whole real micrographs): one at a time
            for x in xs:
                yield x[None]


def _dropout_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


def _deepest(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [f for f in out if isinstance(f, torch.Tensor)][-1]
    return out


@torch.no_grad()
def _run_pool(model: nn.Module, pool: Any, *, batch_size: int, device: torch.device, passes: int = 1,
              dropout: float = 0.0, want_features: bool = False,
              feature_module: nn.Module | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(uncertainty per item, pooled features per item or None) in one sweep over the pool."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    hooks = []
    feats: list[torch.Tensor] = []
    captured: list[torch.Tensor] = []
    enc = feature_module if feature_module is not None else getattr(model, "encoder", None)
    if (want_features or (passes > 1 and dropout > 0)) and not isinstance(enc, nn.Module):
        raise ActiveError(f"{type(model).__name__} has no .encoder: pass feature_module")
    if want_features:
        def capture(m: nn.Module, a: Any, out: Any) -> None:
            f = _deepest(out).float()
            captured.append(f.reshape(f.shape[0], f.shape[1], -1).mean(-1))
        hooks.append(enc.register_forward_hook(capture))
    if passes > 1:
        if dropout > 0:  # inject spatial dropout on the bottleneck for the scoring passes
            def inject(m: nn.Module, a: Any, out: Any) -> Any:
                if isinstance(out, (list, tuple)):
                    out = list(out)
                    out[-1] = F.dropout2d(out[-1], dropout, training=True) if out[-1].dim() == 4 \
                        else F.dropout(out[-1], dropout, training=True)
                    return out
                return F.dropout(out, dropout, training=True)
            hooks.append(enc.register_forward_hook(inject))
        else:
            for m in _dropout_layers(model):
                m.train()
    scores = []
    try:
        for x in _pool_batches(pool, batch_size):
            x = x.to(device)
            if passes <= 1:
                scores.append(entropy_map(model(x)).cpu())
            else:
                probs = 0
                for t in range(passes):
                    probs = probs + model(x).float().softmax(1)
                scores.append(_entropy_of_probs(probs / passes).cpu())
            if want_features:
                feats.append(captured[0].cpu())  # the first (only) pass of this batch
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if not scores:
        raise ActiveError("the pool is empty")
    u = torch.cat(scores).numpy().astype(np.float64)
    return u, (torch.cat(feats).numpy().astype(np.float64) if want_features else None)


def _device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def uncertainty_scores(model: nn.Module, pool: Any, *, mc_passes: int = 0, dropout: float = 0.1,
                       batch_size: int = 8, device: Any = None, seed: int = 0,
                       feature_module: nn.Module | None = None) -> np.ndarray:
    """Mean predictive entropy (nats) of every pool item; MC dropout with ``mc_passes`` > 1.

    Parameters
    ----------
    model : nn.Module
        Logits ``(B, K, H, W)`` (segmentation) or ``(B, K)``.
    pool : Dataset of ``(image, ...)`` or images, or tensor (N, C, H, W)
    mc_passes : int
        0 or 1: one deterministic pass; T > 1: entropy of the mean softmax of T dropout passes.
    dropout : float
        Probability of the dropout injected on the bottleneck when the model has no dropout
        layer (ignored when it has one).
    seed : int
        Seeds the dropout masks (global torch RNG forked, left unchanged).

    Returns
    -------
    ndarray (N,) float64
    """
    dev = _device(model, device)
    has_dropout = bool(_dropout_layers(model))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        u, _ = _run_pool(model, pool, batch_size=batch_size, device=dev, passes=max(int(mc_passes), 1),
                         dropout=0.0 if has_dropout else float(dropout), feature_module=feature_module)
    return u


def pool_features(model: nn.Module, pool: Any, *, batch_size: int = 8, device: Any = None,
                  feature_module: nn.Module | None = None) -> np.ndarray:
    """Globally average-pooled deepest encoder features ``(N, C)`` of every pool item (eval mode)."""
    _, f = _run_pool(model, pool, batch_size=batch_size, device=_device(model, device), want_features=True,
                     feature_module=feature_module)
    assert f is not None
    return f


def kcentre_greedy(features: np.ndarray, k: int, labelled: Sequence[int] = (),
                   candidates: Sequence[int] | None = None,
                   rng: np.random.Generator | None = None) -> list[int]:
    """Greedy k-centre: ``k`` indices, each the candidate farthest from all centres so far.

    Parameters
    ----------
    features : array (N, D)
    k : int
    labelled : indices already labelled (the initial centres; never returned)
    candidates : indices allowed to be chosen (default: all not labelled)
    rng : numpy Generator
        Draws the first centre when nothing is labelled (required then).

    Returns
    -------
    list of int
        In the order chosen. Ties go to the lowest index.
    """
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    lab = sorted({int(i) for i in labelled})
    cand = np.array(sorted(set(range(n)) - set(lab)) if candidates is None
                    else sorted({int(i) for i in candidates} - set(lab)), dtype=np.int64)
    if k > len(cand):
        raise ActiveError(f"cannot choose {k} items from {len(cand)} unlabelled candidates")
    chosen: list[int] = []
    if k == 0:
        return chosen
    mind = np.full(len(cand), np.inf)
    centres = list(lab)
    if not centres:
        if rng is None:
            raise ActiveError("kcentre_greedy needs rng when nothing is labelled")
        first = int(cand[rng.integers(len(cand))])
        chosen.append(first)
        centres = [first]
    for c in centres:
        mind = np.minimum(mind, np.linalg.norm(f[cand] - f[c], axis=1))
    mind[np.isin(cand, chosen)] = -np.inf
    while len(chosen) < k:
        j = int(np.argmax(mind))
        chosen.append(int(cand[j]))
        mind = np.minimum(mind, np.linalg.norm(f[cand] - f[cand[j]], axis=1))
        mind[j] = -np.inf
    return chosen


def select(model: nn.Module, pool: Any, k: int, *, strategy: str = "entropy+kcentre",
           rng: np.random.Generator, labelled: Sequence[int] = (), candidates: int | None = None,
           mc_passes: int = 8, dropout: float = 0.1, batch_size: int = 8, device: Any = None,
           feature_module: nn.Module | None = None) -> list[int]:
    """Indices of the ``k`` pool items to label next (never one in ``labelled``, none twice).

    Parameters
    ----------
    model : nn.Module
    pool : Dataset of ``(image, ...)`` / images, or tensor (N, C, H, W)
        Deterministic items (no random crops).
    k : int
    strategy : {"entropy", "mc_dropout", "kcentre", "entropy+kcentre", "random"}
        See the module docstring.
    rng : numpy Generator
        Random choice, the first k-centre centre, and the MC dropout seed.
    labelled : indices already labelled
    candidates : int, optional
        ``entropy+kcentre``: size of the uncertain short list (default ``min(4k, unlabelled)``).
    mc_passes, dropout : MC dropout settings (see :func:`uncertainty_scores`)
    batch_size, device, feature_module : scoring settings

    Returns
    -------
    list of int
        In order of choice (most uncertain first for ``entropy``/``mc_dropout``; ties → lower index).

    Raises
    ------
    ActiveError
        Unknown strategy, or ``k`` larger than the unlabelled pool.
    """
    if strategy not in STRATEGIES:
        raise ActiveError(f"strategy {strategy!r} is not known (choose one of {', '.join(STRATEGIES)})")
    n = len(pool)
    lab = {int(i) for i in labelled}
    if any(i < 0 or i >= n for i in lab):
        raise ActiveError(f"labelled indices must be in [0, {n})")
    free = np.array(sorted(set(range(n)) - lab), dtype=np.int64)
    if isinstance(k, bool) or k < 0 or k > len(free):
        raise ActiveError(f"cannot select k={k} items: {len(free)} of {n} are unlabelled")
    if k == 0:
        return []
    if strategy == "random":
        return [int(i) for i in rng.choice(free, size=k, replace=False)]
    seed = int(rng.integers(2**31))
    if strategy == "kcentre":
        feats = pool_features(model, pool, batch_size=batch_size, device=device, feature_module=feature_module)
        return kcentre_greedy(feats, k, labelled=sorted(lab), rng=rng)
    if strategy == "entropy+kcentre":
        u, feats = _run_pool(model, pool, batch_size=batch_size, device=_device(model, device),
                             want_features=True, feature_module=feature_module)
        assert feats is not None
        m = min(len(free), candidates if candidates is not None else 4 * k)
        if m < k:
            raise ActiveError(f"candidates={m} is smaller than k={k}")
        short = free[np.argsort(-u[free], kind="stable")[:m]]
        return kcentre_greedy(feats, k, labelled=sorted(lab), candidates=short, rng=rng)
    u = uncertainty_scores(model, pool, mc_passes=mc_passes if strategy == "mc_dropout" else 0,
                           dropout=dropout, batch_size=batch_size, device=device, seed=seed,
                           feature_module=feature_module)
    return [int(i) for i in free[np.argsort(-u[free], kind="stable")[:k]]]


def _metric_fn(metric: str | Callable[[nn.Module, Any], float]) -> Callable[[nn.Module, Any], float]:
    if callable(metric):
        return metric
    from sdk.trainer import evaluate_segmentation

    def fn(model: nn.Module, data: Any) -> float:
        res = evaluate_segmentation(model, data, _device(model, None),
                                    boundary_class=1 if metric.startswith("boundary") else None)
        if metric not in res:
            raise ActiveError(f"metric {metric!r} is not known (one of {', '.join(res)})")
        return float(res[metric])

    return fn


def simulate_annotation(make_model: Callable[[], nn.Module],
                        train_fn: Callable[[nn.Module, Dataset], nn.Module | None],
                        pool_dataset: Dataset, test_dataset: Any, *, rounds: int, batch: int,
                        seed_batch: int, strategy: str = "entropy+kcentre",
                        rng: np.random.Generator, metric: str | Callable[[nn.Module, Any], float] = "iou",
                        seed_indices: Sequence[int] | None = None,
                        select_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Replay an annotation campaign on a labelled pool (its labels act as the oracle).

    Round 0 labels a random seed batch (cold start); each of the ``rounds`` further rounds trains
    a fresh model (``make_model()``) with ``train_fn(model, Subset(pool_dataset, labelled))`` and
    adds ``batch`` items chosen by ``strategy`` with that model. After every training the model is
    scored on ``test_dataset``.

    Parameters
    ----------
    make_model : callable () -> nn.Module
        A fresh model (seed it inside, e.g. with :func:`sdk.trainer.seeded_build`).
    train_fn : callable (model, dataset) -> model or None
        Trains in place (returning the model, or None).
    pool_dataset : Dataset of (image, target)
        Deterministic items; selection scores images only, training reads the targets.
    test_dataset : Dataset
    rounds, batch, seed_batch : int
        Acquisition rounds after the seed round; items per round; items of the seed batch.
    strategy : see :func:`select`
    rng : numpy Generator
    metric : str or callable (model, test_dataset) -> float
        A key of :func:`sdk.trainer.evaluate_segmentation` (``"iou"``, ``"dice"``,
        ``"boundary_f1"`` with class 1 as the boundary) or a function; larger is better.
    seed_indices : optional
        Use this seed batch instead of drawing one (compare strategies from the same start).
    select_kwargs : dict, optional
        Extra keywords for :func:`select`.

    Returns
    -------
    list of dict
        One per trained model: ``round``, ``n_labels``, ``metric``, ``strategy``, ``labelled``
        (indices used for that model) and ``selected`` (added after it; empty in the last round).
    """
    n = len(pool_dataset)  # type: ignore[arg-type]
    if seed_batch < 1 or batch < 1 or rounds < 0:
        raise ActiveError("seed_batch and batch must be >= 1 and rounds >= 0")
    if seed_batch + rounds * batch > n:
        raise ActiveError(f"{seed_batch} + {rounds} x {batch} labels exceed the pool of {n} items")
    labelled = ([int(i) for i in seed_indices] if seed_indices is not None
                else [int(i) for i in rng.choice(n, size=seed_batch, replace=False)])
    score = _metric_fn(metric)
    out: list[dict[str, Any]] = []
    for r in range(rounds + 1):
        model = make_model()
        trained = train_fn(model, Subset(pool_dataset, list(labelled)))
        model = trained if trained is not None else model
        value = float(score(model, test_dataset))
        new: list[int] = []
        if r < rounds:
            new = select(model, pool_dataset, batch, strategy=strategy, rng=rng, labelled=labelled,
                         **(select_kwargs or {}))
        out.append({"round": r, "n_labels": len(labelled), "metric": value, "strategy": strategy,
                    "labelled": list(labelled), "selected": list(new)})
        labelled = labelled + new
    return out


def compare_strategies(make_model: Callable[[], nn.Module],
                       train_fn: Callable[[nn.Module, Dataset], nn.Module | None],
                       pool_dataset: Dataset, test_dataset: Any, *, rounds: int, batch: int, seed_batch: int,
                       rng: np.random.Generator, strategies: Sequence[str] = ("entropy+kcentre", "random"),
                       metric: str | Callable[[nn.Module, Any], float] = "iou",
                       select_kwargs: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """:func:`simulate_annotation` per strategy, all from the same random seed batch.

    Each strategy gets its own child generator (``rng.spawn``), so adding a strategy does not
    change the others' curves.
    """
    n = len(pool_dataset)  # type: ignore[arg-type]
    seed_idx = [int(i) for i in rng.choice(n, size=seed_batch, replace=False)]
    children = rng.spawn(len(strategies))
    return {s: simulate_annotation(make_model, train_fn, pool_dataset, test_dataset, rounds=rounds, batch=batch,
                                   seed_batch=seed_batch, strategy=s, rng=g, metric=metric,
                                   seed_indices=seed_idx, select_kwargs=select_kwargs)
            for s, g in zip(strategies, children)}


def labels_to_reach(curve: Sequence[dict[str, Any]], value: float) -> int | None:
    """Fewest labels at which a curve's metric reaches ``value`` (None if it never does)."""
    hits = [r["n_labels"] for r in curve if r["metric"] >= value]
    return min(hits) if hits else None
