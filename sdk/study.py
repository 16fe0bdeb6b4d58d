"""Sim-to-real studies: which training condition, and which generator feature, works on real data.

A *study file* (YAML, see ``recipes/studies/``) names the synthetic recipe, the labelled real folder,
how real images group into micrographs, the label counts ``k``, the conditions and a CPU budget.
:func:`run_study` then runs grouped cross-validation over the real micrographs (never crops of one
micrograph on both sides of a split): in every fold the held-out micrographs are the test set and
the ``k`` labelled crops come from the other micrographs.

Conditions (each a name in the study file):

``classical``           zero labels: Canny edges on Lab channels (boundary task) or Gaussian + Otsu
                        (particle task), parameters tuned on the fold's dev images.
``grid``                zero labels, image-blind: a regular grid of lines with the dev-tuned spacing
                        (boundary task only) — the floor any method must beat.
``scratch``             a U-Net from random weights on the ``k`` real crops, geometric flips only.
``scratch_all``         the same on every dev crop of the fold (the "many labels" reference).
``augmentation``        scratch on ``k`` crops with the strong physics-gated augmentation pipeline.
``synthetic_only``      the U-Net pretrained on synthetic data, no real label.
``synthetic_threshold`` the same, its class-1 probability cut at a threshold tuned on the dev fold's
                        labels (one number fitted, like the classical methods' parameters; no training
                        on real data) instead of 0.5: it absorbs a systematic offset between exact
                        geometric labels and the real annotation convention.
``synthetic_adabn``     the same after re-estimating its BatchNorm statistics on the fold's unlabelled
                        dev images (AdaBN; still zero labels, test images never seen).
``feature_extraction``  the synthetic encoder frozen (BatchNorm pinned), decoder trained on ``k``.
``finetune``            full fine-tuning: head first, then gradual unfreezing with depth-graded
                        learning rates (:mod:`sdk.transfer`).
``finetune_adabn``      fine-tuning after re-estimating BatchNorm statistics on unlabelled dev images.
``finetune_fda``        fine-tuning with Fourier domain adaptation of the real crops' style onto
                        synthetic images mixed in (:mod:`sdk.adapt`).
``finetune_dann``       fine-tuning with a gradient-reversal domain classifier (:mod:`sdk.adapt`).
``all``                 augmentation + AdaBN + fine-tuning.
``active``              simulated annotation on the fold's dev images (their masks are the oracle): from
                        a random seed batch of 2, rounds of 2 chosen by uncertainty + k-centre
                        (:mod:`sdk.active`) or at random, each model fine-tuned from the synthetic
                        U-Net; rows ``active/entropy+kcentre`` and ``active/random`` per label count.
``ablation``            for every variant made by :func:`twin.ablate` (each generator feature off
                        alone), synthetic-only and fine-tuned scores: the table says what each
                        feature is worth on the real data.

Predictions: class-1 probability > 0.5 (argmax); ``model.tta`` averages the 8 dihedral transforms;
``model.threshold`` (``metric`` or ``grain_size``) cuts every model trained on real labels at a
threshold tuned on its own training crops (:mod:`sdk.threshold`; recorded in the ``threshold`` column).

Output (``out/``): ``results.csv`` (one row per condition, k, fold), ``summary.md`` (mean ± standard
deviation over folds), ``metric_vs_k.png`` and ``study.json`` (spec, timings, environment).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin.errors import EmtwinError

__all__ = ["StudyError", "StudySpec", "load_study", "parse_study", "run_study", "CONDITIONS",
           "classical_boundary", "classical_particles", "grid_boundary", "summarise"]

CONDITIONS = ("classical", "grid", "scratch", "scratch_all", "augmentation", "synthetic_only", "synthetic_threshold",
              "synthetic_adabn", "feature_extraction", "finetune", "finetune_adabn", "finetune_fda", "finetune_dann",
              "all", "ablation", "active")
_ZERO_LABEL = ("classical", "grid", "synthetic_only", "synthetic_threshold", "synthetic_adabn")
_NEEDS_SYNTHETIC = ("synthetic_only", "synthetic_threshold", "synthetic_adabn", "feature_extraction", "finetune", "finetune_adabn",
                    "finetune_fda", "finetune_dann", "all", "ablation", "active")


class StudyError(EmtwinError):
    """A study file or a study run cannot proceed (message says why)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RealSpec(_Strict):
    root: str = Field(description="folder with images/ and masks/ (relative to the study file)")
    group_regex: str | None = Field(None, description="regex whose group 1 is the micrograph id")
    channels: Literal[1, 3] = 1
    mask_threshold: int = Field(128, ge=1, le=65535)


class SyntheticSpec(_Strict):
    recipe: str = Field(description="generation recipe (relative to the study file)")
    samples: int = Field(400, ge=4, le=1_000_000)
    label: str = "boundary"
    seed: int = Field(0, ge=0)
    ablate: list[str] | None = Field(None, description="features for the ablation condition (None: all on)")
    ablation_samples: int | None = Field(None, ge=4)


class ModelSpec(_Strict):
    depth: int = Field(4, ge=2, le=6)
    width: int = Field(16, ge=4, le=128)
    norm: Literal["batch", "group", "instance", "none"] = "batch"
    crop: int = Field(128, ge=32, le=1024)
    batch_size: int = Field(8, ge=1, le=256)
    steps_per_epoch: int = Field(20, ge=1)
    lr: float = Field(2e-3, gt=0)
    tta: bool = Field(False, description="predict every real image as the mean over the 8 dihedral "
                                         "transforms (sdk.trainer.predict_tiled)")
    threshold: Literal["argmax", "metric", "grain_size"] = Field(
        "argmax", description="decision threshold of every model trained on real labels: argmax (0.5), or "
                              "tuned on the model's own k training crops for the main metric or for the "
                              "Heyn grain size (sdk.threshold.tune_threshold; boundary task only). "
                              "The active-learning rows stay argmax")


class BudgetSpec(_Strict):
    pretrain_minutes: float = Field(10.0, gt=0)
    model_minutes: float = Field(1.5, gt=0, description="wall-clock budget of every real-data model")
    max_epochs: int = Field(60, ge=1)
    total_minutes: float = Field(60.0, gt=0, description="the study stops starting new models after this")


class StudySpec(_Strict):
    """A sim-to-real study (see the module docstring and ``recipes/studies/*.yaml``)."""

    name: str = Field(min_length=1)
    task: Literal["boundary", "particle"]
    real: RealSpec
    synthetic: SyntheticSpec | None = None
    folds: int = Field(3, ge=2, le=20)
    k: list[int] = Field([0, 4, 8])
    conditions: list[str] = Field(["classical", "scratch", "synthetic_only", "finetune"])
    model: ModelSpec = ModelSpec()
    budget: BudgetSpec = BudgetSpec()
    tolerance: int = Field(2, ge=0, le=20, description="boundary F1 tolerance, px")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _threshold_task(self) -> "StudySpec":
        if self.model.threshold == "grain_size" and self.task != "boundary":
            raise ValueError("model.threshold: 'grain_size' needs task 'boundary' (Heyn intercepts of "
                             f"boundary maps), got task {self.task!r}; use 'metric' or 'argmax'")
        return self

    @field_validator("conditions")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in CONDITIONS]
        if bad:
            raise ValueError(f"unknown condition(s) {bad}; allowed: {', '.join(CONDITIONS)}")
        if not v or len(set(v)) != len(v):
            raise ValueError("conditions must be a non-empty list without repeats")
        return v

    @field_validator("k")
    @classmethod
    def _k(cls, v: list[int]) -> list[int]:
        if not v or any(x < 0 for x in v) or len(set(v)) != len(v):
            raise ValueError("k must be a non-empty list of distinct label counts >= 0")
        return sorted(v)


def parse_study(text: str, source: str = "<study>") -> StudySpec:
    """Validate study YAML text (one clear :class:`StudyError` line on any problem)."""
    from twin.recipe import format_validation_error

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StudyError(f"{source}: malformed YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{source}: a study must be a YAML mapping")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise StudyError(format_validation_error(exc, source).replace("invalid recipe", "invalid study")) from None
    if spec.synthetic is None and any(c in _NEEDS_SYNTHETIC for c in spec.conditions):
        need = [c for c in spec.conditions if c in _NEEDS_SYNTHETIC]
        raise StudyError(f"{source}: conditions {need} need a 'synthetic' section (recipe, samples)")
    if spec.task == "particle" and "grid" in spec.conditions:
        raise StudyError(f"{source}: the 'grid' condition is a boundary baseline; remove it for task particle")
    return spec


def load_study(path: str | os.PathLike) -> tuple[StudySpec, Path]:
    """Read and validate a study file; returns the spec and the file's folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise StudyError(f"{p}: cannot read study file: {exc.strerror or exc}") from None
    return parse_study(text, str(p)), p.resolve().parent


def quick(spec: StudySpec) -> StudySpec:
    """A reduced copy of a study for smoke runs and tests (2 folds, tiny model, seconds per model)."""
    syn = spec.synthetic.model_copy(update={"samples": min(spec.synthetic.samples, 48),
                                            "ablation_samples": 24}) if spec.synthetic else None
    ks = sorted({min(spec.k), *([k for k in spec.k if k > 0][:1])})
    return spec.model_copy(update={
        "folds": 2, "k": ks, "synthetic": syn,
        "model": spec.model.model_copy(update={"depth": 3, "width": 8, "crop": 64, "steps_per_epoch": 4,
                                               "batch_size": 4}),
        "budget": spec.budget.model_copy(update={"pretrain_minutes": 0.4, "model_minutes": 0.1,
                                                 "max_epochs": 3, "total_minutes": 4.0}),
    })


# ------------------------------------------------------------------------------------------------
# Classical baselines (zero labels; parameters tuned on the dev images of the fold)
# ------------------------------------------------------------------------------------------------


def _band(edges: np.ndarray, radius: int) -> np.ndarray:
    from scipy import ndimage

    if radius <= 0:
        return edges.astype(bool)
    st = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_dilation(edges, structure=st, iterations=radius)


def classical_boundary(image: np.ndarray, sigma: float, low: float, high: float, radius: int = 1) -> np.ndarray:
    """Canny edges on the L*, a*, b* channels (OR-combined), dilated to a band.

    Parameters
    ----------
    image : ndarray (H, W) grey or (H, W, 3) RGB, any numeric dtype
    sigma : float
        Gaussian smoothing of Canny, px.
    low, high : float
        Hysteresis thresholds as quantiles (0–1) of each channel's gradient magnitude.
    radius : int
        Dilation of the one-pixel edges, px (a band ≈ 2·radius + 1 px wide).

    Returns
    -------
    ndarray (H, W) bool boundary map
    """
    from skimage import color, feature

    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] >= 3:
        scale = 255.0 if img.max() > 1.0 else 1.0
        lab = color.rgb2lab(np.clip(img[..., :3] / scale, 0, 1))
        chans = [lab[..., i] for i in range(3)]
    else:
        chans = [img if img.ndim == 2 else img[..., 0]]
    edges = np.zeros(chans[0].shape, dtype=bool)
    for c in chans:
        if np.ptp(c) <= 0:
            continue
        edges |= feature.canny(c, sigma=sigma, low_threshold=low, high_threshold=high, use_quantiles=True)
    return _band(edges, radius)


def grid_boundary(shape: tuple[int, int], spacing: float, radius: int = 1) -> np.ndarray:
    """Image-blind baseline: horizontal and vertical lines every ``spacing`` px, dilated by ``radius``."""
    h, w = shape
    m = np.zeros((h, w), dtype=bool)
    s = max(2.0, float(spacing))
    m[np.round(np.arange(s / 2, h, s)).astype(int).clip(0, h - 1), :] = True
    m[:, np.round(np.arange(s / 2, w, s)).astype(int).clip(0, w - 1)] = True
    return _band(m, radius)


def classical_particles(image: np.ndarray, sigma: float, dark: bool = True) -> np.ndarray:
    """Gaussian filter (``sigma`` px) then an Otsu threshold; ``dark``: particles below it."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    s = ndimage.gaussian_filter(img, sigma) if sigma > 0 else img
    t = threshold_otsu(s) if np.ptp(s) > 0 else s.mean()
    return s < t if dark else s > t


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------


def score(pred: np.ndarray, true: np.ndarray, task: str, tolerance: int) -> dict[str, float]:
    """Per-image scores: boundary F1 (tolerance px) and Heyn grain-size error, or IoU and Dice."""
    from sdk import metrics

    pred = np.asarray(pred, dtype=bool)
    true = np.asarray(true, dtype=bool)
    if task == "boundary":
        bf = metrics.boundary_f1(pred, true, tolerance=tolerance)
        row = {"boundary_f1": float(bf["f1"]), "precision": float(bf["precision"]),
               "recall": float(bf["recall"])}
        try:
            row["grain_size_error"] = float(metrics.grain_size_error(pred, true))
        except (ValueError, ZeroDivisionError):
            row["grain_size_error"] = float("nan")
        return row
    return {"iou": float(metrics.iou(pred, true)), "dice": float(metrics.dice(pred, true))}


def _main_metric(task: str) -> str:
    return "boundary_f1" if task == "boundary" else "iou"


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=float)
        v = v[np.isfinite(v)]
        out[k] = float(v.mean()) if v.size else float("nan")
    return out


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class _Real:
    """Every real image and its binary target, loaded once."""

    names: list[str]
    groups: list[str]
    raw: list[np.ndarray]          # as read, for the classical methods (H, W) or (H, W, 3)
    x: list[np.ndarray]            # network input (C, H, W) float32
    y: list[np.ndarray]            # (H, W) bool target


@dataclass
class _Ctx:
    spec: StudySpec
    base: Path
    out: Path
    real: _Real
    rows: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    pretrained: dict[str, Any] = field(default_factory=dict)
    synthetic_h5: Path | None = None
    log: Callable[[str], None] = print
    skipped: list[str] = field(default_factory=list)

    def minutes(self) -> float:
        return (time.monotonic() - self.t0) / 60.0

    def over_budget(self) -> bool:
        return self.minutes() > self.spec.budget.total_minutes


def _group_fn(regex: str | None) -> Callable[[str], str]:
    from sdk.data import default_group

    if regex is None:
        return default_group
    pat = re.compile(regex)

    def fn(name: str) -> str:
        m = pat.search(Path(name).name)
        return m.group(1) if m and m.groups() else (m.group(0) if m else default_group(name))

    return fn


def _load_real(spec: StudySpec, base: Path) -> _Real:
    from PIL import Image

    from sdk.data import DataError, RealDataset

    root = (base / spec.real.root).resolve()
    try:
        ds = RealDataset(root, crop=None, channels=spec.real.channels, normalize="percentile",
                         group_fn=_group_fn(spec.real.group_regex), mask_threshold=spec.real.mask_threshold)
    except DataError as exc:
        raise StudyError(str(exc)) from None
    names = [str(n) for n in ds.names]
    raw, xs, ys = [], [], []
    for i, n in enumerate(names):
        img = np.asarray(Image.open(root / "images" / n))
        if img.ndim == 3 and img.shape[-1] == 4:
            img = img[..., :3]
        if img.ndim == 3 and np.all(img[..., 0] == img[..., 1]) and np.all(img[..., 1] == img[..., 2]):
            img = img[..., 0]
        x, y = ds[i]
        raw.append(img)
        xs.append(x.numpy())
        ys.append(y.numpy() > 0)
    return _Real(names=names, groups=[str(g) for g in ds.groups], raw=raw, x=xs, y=ys)


def _folds(real: _Real, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sdk.splits import assert_disjoint, group_kfold

    groups = np.asarray(real.groups)
    n = min(n_folds, len(np.unique(groups)))
    if n < 2:
        raise StudyError("a study needs real images from at least 2 micrographs (groups)")
    folds = [(np.asarray(a, dtype=int), np.asarray(b, dtype=int)) for a, b in group_kfold(groups, n)]
    for a, b in folds:
        assert_disjoint(groups, a, b)
    return folds


def _choose(real: _Real, dev: np.ndarray, k: int, seed: int) -> list[int]:
    """``k`` dev images spread over distinct micrographs (round robin, seeded)."""
    from sdk.cli import choose_crops

    names = [real.names[i] for i in dev]
    groups = [real.groups[i] for i in dev]
    train, _ = choose_crops(names, groups, k, 0, seed)
    return [int(dev[names.index(n)]) for n in train]


class _ArrayData:
    """(image, target) pairs from arrays with random crops and optional albumentations transform."""

    def __init__(self, xs: list[np.ndarray], ys: list[np.ndarray], crop: int | None, transform: Any = None,
                 seed: int = 0) -> None:
        self.xs, self.ys, self.crop, self.transform = xs, ys, crop, transform
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, i: int):
        import torch

        x, y = self.xs[i], self.ys[i].astype(np.int64)
        if self.crop is not None and min(y.shape) > self.crop:
            r = int(self.rng.integers(0, y.shape[0] - self.crop + 1))
            c = int(self.rng.integers(0, y.shape[1] - self.crop + 1))
            x, y = x[:, r:r + self.crop, c:c + self.crop], y[r:r + self.crop, c:c + self.crop]
        if self.transform is not None:
            out = self.transform(image=np.ascontiguousarray(np.moveaxis(x, 0, -1)), mask=y)
            x, y = np.moveaxis(out["image"], -1, 0), out["mask"]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(
            np.ascontiguousarray(y, dtype=np.int64))


def _augment(strength: str, colour: bool):
    from sdk.augment import Physics, build_pipeline

    return build_pipeline(Physics(), strength=strength, colour=colour)


def _new_model(spec: StudySpec, seed: int):
    from sdk.models import build_model, unet_config
    from sdk.trainer import seeded_build

    m = spec.model
    cfg = unet_config(in_channels=spec.real.channels, num_classes=2, depth=m.depth, width=m.width, norm=m.norm)
    return seeded_build(lambda: build_model(cfg), seed)


def _fit(ctx: _Ctx, model, data, *, minutes: float, seed: int, lr: float | None = None,
         param_groups=None, unfreezer=None, **trainer_kw: Any):
    from sdk.trainer import TrainConfig, Trainer

    m, b = ctx.spec.model, ctx.spec.budget
    cfg = TrainConfig(epochs=b.max_epochs, steps_per_epoch=m.steps_per_epoch, batch_size=m.batch_size,
                      lr=lr or m.lr, max_minutes=minutes, seed=seed, device="cpu", amp="off", patience=None,
                      boundary_class=1 if ctx.spec.task == "boundary" else None, progress=False)
    Trainer(model, data, None, cfg, param_groups=param_groups, unfreezer=unfreezer, **trainer_kw).fit()
    return model


def _probability(model, x: np.ndarray, tta: bool = False) -> np.ndarray:
    """Class-1 softmax probability (H, W) of one image (``tta``: mean over the 8 dihedral transforms)."""
    import torch

    from sdk.trainer import predict_tiled

    with torch.no_grad():
        return predict_tiled(model, x, tile=max(x.shape[-2:]), overlap=0, device="cpu", amp="off", tta=tta)[1]


def _predict(model, x: np.ndarray, tta: bool = False) -> np.ndarray:
    """Class map (H, W) bool of one image: the class with the larger probability (argmax)."""
    if not tta:
        import torch

        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(x[None])).argmax(1)[0].numpy().astype(bool)
    return _probability(model, x, tta) > 0.5


def _predict_all(ctx: _Ctx, model, idx) -> list[np.ndarray]:
    """:func:`_predict` of the real images ``idx`` with the study's ``model.tta`` setting."""
    return [_predict(model, ctx.real.x[i], ctx.spec.model.tta) for i in idx]


def _predict_trained(ctx: _Ctx, model, train_idx, test) -> tuple[list[np.ndarray], float | None]:
    """Test predictions of a model trained on the real images ``train_idx``, with the study's
    ``model.threshold`` rule: argmax, or a threshold tuned on those same training images (returned)."""
    rule = ctx.spec.model.threshold
    if rule == "argmax":
        return _predict_all(ctx, model, test), None
    from sdk.threshold import tune_threshold

    tta = ctx.spec.model.tta
    probs = [_probability(model, ctx.real.x[i], tta) for i in train_idx]
    th = tune_threshold(probs, [ctx.real.y[i] for i in train_idx], objective=rule, task=ctx.spec.task,
                        tolerance=ctx.spec.tolerance)
    return [_probability(model, ctx.real.x[i], tta) > th for i in test], th


#: decision thresholds tried by ``synthetic_threshold``
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def _run_threshold(ctx: _Ctx, fold: int, dev: np.ndarray, test: np.ndarray, model) -> None:
    """Zero training labels; the probability threshold is tuned on the dev fold (≤ 24 images)."""
    t = time.monotonic()
    task, tol = ctx.spec.task, ctx.spec.tolerance
    main = _main_metric(task)
    pick = dev if len(dev) <= 24 else np.random.default_rng(ctx.spec.seed).choice(dev, 24, replace=False)
    probs = {int(i): _probability(model, ctx.real.x[i], ctx.spec.model.tta) for i in pick}
    scores = [np.nanmean([score(probs[int(i)] > th, ctx.real.y[i], task, tol)[main] for i in pick])
              for th in THRESHOLDS]
    best = THRESHOLDS[int(np.nanargmax(scores))]
    preds = [_probability(model, ctx.real.x[i], ctx.spec.model.tta) > best for i in test]
    _record(ctx, "synthetic_threshold", 0, fold, test, preds, time.monotonic() - t, variant=f"threshold={best:g}")


def _record(ctx: _Ctx, condition: str, k: int, fold: int, test: np.ndarray, preds: list[np.ndarray],
            seconds: float, variant: str = "", n_train: int | None = None,
            threshold: float | None = None) -> dict[str, Any]:
    """One result row; ``k = -1`` means every dev image of the fold (``n_train`` of them);
    ``threshold``: the decision threshold tuned on the training images, when one was."""
    per = [score(p, ctx.real.y[i], ctx.spec.task, ctx.spec.tolerance) for p, i in zip(preds, test)]
    row = {"condition": condition, "variant": variant, "k": k, "fold": fold, "n_test": len(test),
           "n_train": k if n_train is None else n_train,
           **_mean_rows(per), "seconds": round(seconds, 1)}
    if threshold is not None:
        row["threshold"] = threshold
    ctx.rows.append(row)
    main = _main_metric(ctx.spec.task)
    ctx.log(f"[{ctx.minutes():5.1f} min] fold {fold} {condition}{'/' + variant if variant else ''} k={k}: "
            f"{main}={row[main]:.3f} ({seconds:.0f} s)")
    return row


# ---- zero-label baselines ----------------------------------------------------------------------


def _tune_classical(ctx: _Ctx, dev: np.ndarray) -> dict[str, Any]:
    task, tol = ctx.spec.task, ctx.spec.tolerance
    main = _main_metric(task)
    # tuning on at most 24 dev images keeps it fast
    pick = dev if len(dev) <= 24 else np.random.default_rng(ctx.spec.seed).choice(dev, 24, replace=False)
    best, best_v = {}, -1.0
    if task == "boundary":
        grid = [dict(sigma=s, low=lo, high=hi, radius=r) for s in (1.0, 2.0, 3.0, 4.0)
                for lo, hi in ((0.6, 0.85), (0.75, 0.92), (0.85, 0.95)) for r in (0, 1)]
        fn = lambda im, p: classical_boundary(im, **p)  # noqa: E731
    else:
        grid = [dict(sigma=s, dark=d) for s in (0.0, 2.0, 3.0, 5.0, 8.0) for d in (True, False)]
        fn = lambda im, p: classical_particles(im, **p)  # noqa: E731
    for p in grid:
        v = np.nanmean([score(fn(ctx.real.raw[i], p), ctx.real.y[i], task, tol)[main] for i in pick])
        if v > best_v:
            best, best_v = p, float(v)
    return best


def _run_classical(ctx: _Ctx, fold: int, dev: np.ndarray, test: np.ndarray) -> None:
    t = time.monotonic()
    p = _tune_classical(ctx, dev)
    fn = classical_boundary if ctx.spec.task == "boundary" else classical_particles
    preds = [fn(ctx.real.raw[i], **p) for i in test]
    _record(ctx, "classical", 0, fold, test, preds, time.monotonic() - t, variant=json.dumps(p))


def _run_grid(ctx: _Ctx, fold: int, dev: np.ndarray, test: np.ndarray) -> None:
    t = time.monotonic()
    best, best_v = (8.0, 1), -1.0
    for s in (8, 12, 16, 20, 24, 32, 40, 48):
        for r in (0, 1):
            v = np.nanmean([score(grid_boundary(ctx.real.y[i].shape, s, r), ctx.real.y[i], "boundary",
                                  ctx.spec.tolerance)["boundary_f1"] for i in dev])
            if v > best_v:
                best, best_v = (float(s), r), float(v)
    preds = [grid_boundary(ctx.real.y[i].shape, *best) for i in test]
    _record(ctx, "grid", 0, fold, test, preds, time.monotonic() - t, variant=f"spacing={best[0]:g},radius={best[1]}")


# ---- synthetic pretraining ---------------------------------------------------------------------


def _synthetic_file(ctx: _Ctx, recipe: Path, n: int, tag: str) -> Path:
    from twin.generate import generate_dataset

    out = ctx.out / "synthetic" / f"{tag}.h5"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx.log(f"[{ctx.minutes():5.1f} min] generating {n} synthetic samples ({tag}) from {recipe.name}")
    return Path(generate_dataset(recipe, out, n=n, seed=ctx.spec.synthetic.seed, progress=False))


def _pretrain(ctx: _Ctx, h5: Path, tag: str, minutes: float):
    """U-Net trained on a synthetic file (cached per tag for the whole study)."""
    if tag in ctx.pretrained:
        return ctx.pretrained[tag]
    from sdk.data import SyntheticDataset

    spec = ctx.spec
    t = time.monotonic()
    ds = SyntheticDataset(h5, label=spec.synthetic.label, crop=spec.model.crop, channels=spec.real.channels,
                          normalize="percentile", random_crop=True,
                          transform=_augment("medium", spec.real.channels == 3))
    model = _new_model(spec, spec.seed)
    _fit(ctx, model, ds, minutes=minutes, seed=spec.seed)
    ctx.pretrained[tag] = model
    from sdk.models import save_checkpoint

    (ctx.out / "models").mkdir(exist_ok=True)
    save_checkpoint(ctx.out / "models" / (re.sub(r"[^A-Za-z0-9_.-]", "_", tag) + ".pt"), model,
                    data={"label": spec.synthetic.label, "channels": spec.real.channels, "normalize": "percentile",
                          "crop": spec.model.crop, "source": "synthetic", "dataset": str(h5)},
                    stage="study-pretrain")
    ctx.log(f"[{ctx.minutes():5.1f} min] pretrained on {tag} ({time.monotonic() - t:.0f} s)")
    return model


def _adabn_copy(ctx: _Ctx, base, images: np.ndarray):
    """A copy of ``base`` whose BatchNorm statistics are re-estimated on real images (no labels)."""
    import torch

    from sdk.adapt import adabn

    model = copy.deepcopy(base)
    return adabn(model, torch.from_numpy(np.stack([ctx.real.x[i] for i in images])), batch_size=8, device="cpu")


def _finetune(ctx: _Ctx, base, train, seed: int, *, frozen: bool, bn_reestimate: np.ndarray | None = None,
              copy_base: bool = True, **trainer_kw: Any):
    from sdk.transfer import GradualUnfreezing, freeze_backbone, param_groups

    if bn_reestimate is not None:
        model = _adabn_copy(ctx, base, bn_reestimate)
    else:
        model = copy.deepcopy(base) if copy_base else base
    freeze_backbone(model, bn="eval" if bn_reestimate is not None else "train")
    if frozen:  # feature extraction: the encoder stays frozen, decoder/head learn
        return _fit(ctx, model, train, minutes=ctx.spec.budget.model_minutes, seed=seed, **trainer_kw)
    unf = GradualUnfreezing(model, epochs_per_stage=2, bn="eval" if bn_reestimate is not None else "train")
    groups = param_groups(model, head_lr=ctx.spec.model.lr, backbone_lr=ctx.spec.model.lr / 100)
    return _fit(ctx, model, train, minutes=ctx.spec.budget.model_minutes, seed=seed, param_groups=groups,
                unfreezer=unf, **trainer_kw)


def _run_models(ctx: _Ctx, fold: int, dev: np.ndarray, test: np.ndarray, k: int, conditions: list[str],
                base) -> None:
    spec, real = ctx.spec, ctx.real
    seed = spec.seed * 1000 + fold * 100 + (k if k >= 0 else 99)
    idx = list(dev) if k < 0 else _choose(real, dev, k, seed)
    kk = len(idx)
    colour = spec.real.channels == 3
    crop = spec.model.crop
    for cond in conditions:
        if ctx.over_budget():
            ctx.skipped.append(f"fold {fold} {cond} k={k} (total budget spent)")
            continue
        t = time.monotonic()
        xs, ys = [real.x[i] for i in idx], [real.y[i] for i in idx]
        if cond in ("scratch", "scratch_all"):
            model = _fit(ctx, _new_model(spec, seed), _ArrayData(xs, ys, crop, _augment("light", False), seed),
                         minutes=spec.budget.model_minutes, seed=seed)
        elif cond == "augmentation":
            model = _fit(ctx, _new_model(spec, seed), _ArrayData(xs, ys, crop, _augment("strong", colour), seed),
                         minutes=spec.budget.model_minutes, seed=seed)
        elif cond == "feature_extraction":
            model = _finetune(ctx, base, _ArrayData(xs, ys, crop, _augment("light", False), seed), seed, frozen=True)
        elif cond == "finetune":
            model = _finetune(ctx, base, _ArrayData(xs, ys, crop, _augment("light", False), seed), seed, frozen=False)
        elif cond == "finetune_adabn":
            model = _finetune(ctx, base, _ArrayData(xs, ys, crop, _augment("light", False), seed), seed,
                              frozen=False, bn_reestimate=dev)
        elif cond == "all":
            model = _finetune(ctx, base, _ArrayData(xs, ys, crop, _augment("strong", colour), seed), seed,
                              frozen=False, bn_reestimate=dev)
        elif cond in _ADAPT_CONDITIONS:
            model = _ADAPT_CONDITIONS[cond](ctx, base, xs, ys, dev, seed)
        else:  # pragma: no cover - guarded by the schema
            raise StudyError(f"unknown condition {cond}")
        preds, th = _predict_trained(ctx, model, idx, test)
        _record(ctx, cond, kk if cond != "scratch_all" else -1, fold, test, preds, time.monotonic() - t,
                n_train=kk, threshold=th)


def _dev_tensor(ctx: _Ctx, dev: np.ndarray, crop: int, seed: int):
    """Unlabelled dev images as one (N, C, crop, crop) tensor (a seeded random crop of each)."""
    import torch

    rng = np.random.default_rng(seed)
    out = []
    for i in dev:
        x = ctx.real.x[i]
        h, w = x.shape[-2:]
        c = min(crop, h, w)
        r0, c0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        out.append(x[:, r0:r0 + c, c0:c0 + c])
    return torch.from_numpy(np.stack(out).astype(np.float32))


def _finetune_dann(ctx: _Ctx, base, xs, ys, dev, seed):
    """Fine-tuning plus a gradient-reversal domain classifier: real dev images are the target."""
    from sdk.adapt import DANN

    crop = ctx.spec.model.crop
    data = _ArrayData(xs, ys, crop, _augment("light", False), seed)
    model = copy.deepcopy(base)
    dann = DANN(model, _dev_tensor(ctx, dev, crop, seed), hidden=32, weight=0.3, seed=seed)
    return _finetune(ctx, model, data, seed, frozen=False, adaptation=dann, copy_base=False)


def _finetune_fda(ctx: _Ctx, base, xs, ys, dev, seed):
    """Fine-tuning on the k real crops mixed with synthetic crops restyled by Fourier domain
    adaptation towards the (unlabelled) dev images (Yang & Soatto 2020)."""
    from torch.utils.data import ConcatDataset

    from sdk.adapt import FDATransform
    from sdk.data import SyntheticDataset

    spec = ctx.spec
    crop = spec.model.crop
    targets = [np.moveaxis(ctx.real.x[i], 0, -1) for i in dev]
    syn = SyntheticDataset(ctx.synthetic_h5, label=spec.synthetic.label, crop=crop, channels=spec.real.channels,
                           normalize="percentile", random_crop=True,
                           transform=FDATransform(targets, beta=(0.005, 0.02), seed=seed, p=1.0))
    real = _ArrayData(xs, ys, crop, _augment("light", False), seed)
    # as many real items as synthetic ones: the real crops are seen every other batch on average
    reps = max(1, len(syn) // max(1, len(real)))
    data = ConcatDataset([syn] + [real] * reps)
    return _finetune(ctx, base, data, seed, frozen=False)


#: adaptation conditions: name → fn(ctx, base_model, xs, ys, dev_indices, seed) -> model
_ADAPT_CONDITIONS: dict[str, Callable[..., Any]] = {"finetune_dann": _finetune_dann,
                                                     "finetune_fda": _finetune_fda}


def run_study(spec: StudySpec, base_dir: str | os.PathLike, out: str | os.PathLike, *,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a study; writes results.csv, summary.md, metric_vs_k.png and study.json under ``out``.

    Parameters
    ----------
    spec : StudySpec
    base_dir : folder the study's relative paths start from (the study file's folder)
    out : output folder (created)
    log : progress printer

    Returns
    -------
    dict with ``rows`` (one per condition, k and fold), ``summary`` and ``minutes``.
    """
    import torch

    base = Path(base_dir)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    real = _load_real(spec, base)
    ctx = _Ctx(spec=spec, base=base, out=outp, real=real, log=log)
    folds = _folds(real, spec.folds)
    log(f"study {spec.name}: {len(real.names)} real images from {len(set(real.groups))} micrographs, "
        f"{len(folds)} grouped folds, k={spec.k}, conditions {spec.conditions}")

    base_model = None
    if any(c in _NEEDS_SYNTHETIC and c != "ablation" for c in spec.conditions):  # ablation pretrains per variant
        recipe = (base / spec.synthetic.recipe).resolve()
        if not recipe.is_file():
            raise StudyError(f"synthetic recipe not found: {recipe}")
        h5 = ctx.synthetic_h5 = _synthetic_file(ctx, recipe, spec.synthetic.samples, "main")
        base_model = _pretrain(ctx, h5, "main", spec.budget.pretrain_minutes)

    with torch.random.fork_rng():
        for fold, (dev, test) in enumerate(folds):
            for cond in spec.conditions:
                if cond == "classical":
                    _run_classical(ctx, fold, dev, test)
                elif cond == "grid":
                    _run_grid(ctx, fold, dev, test)
                elif cond == "synthetic_only":
                    t = time.monotonic()
                    _record(ctx, cond, 0, fold, test, _predict_all(ctx, base_model, test),
                            time.monotonic() - t)
                elif cond == "synthetic_threshold":
                    _run_threshold(ctx, fold, dev, test, base_model)
                elif cond == "synthetic_adabn":
                    t = time.monotonic()
                    m = _adabn_copy(ctx, base_model, dev)
                    _record(ctx, cond, 0, fold, test, _predict_all(ctx, m, test), time.monotonic() - t)
            if "scratch_all" in spec.conditions:
                _run_models(ctx, fold, dev, test, -1, ["scratch_all"], base_model)
            model_conds = [c for c in spec.conditions
                           if c not in _ZERO_LABEL and c not in ("scratch_all", "ablation", "active")]
            for k in [k for k in spec.k if k > 0]:
                _run_models(ctx, fold, dev, test, k, model_conds, base_model)
        if "active" in spec.conditions:
            _run_active(ctx, folds, base_model)
        if "ablation" in spec.conditions:
            _run_ablation(ctx, folds)

    summary = summarise(ctx.rows, spec.task)
    result = {"rows": ctx.rows, "summary": summary, "minutes": round(ctx.minutes(), 2), "skipped": ctx.skipped}
    _write(ctx, result)
    return result


def _run_active(ctx: _Ctx, folds: list[tuple[np.ndarray, np.ndarray]], base) -> None:
    """Active vs random choice of the crops to label, up to the largest k, per fold."""
    from sdk.active import compare_strategies

    spec = ctx.spec
    kmax = max(spec.k)
    seed_batch, batch = min(2, kmax), 2
    rounds = max(0, (kmax - seed_batch) // batch)
    main = _main_metric(spec.task)
    for fold, (dev, test) in enumerate(folds):
        if ctx.over_budget():
            ctx.skipped.append(f"active fold {fold} (total budget spent)")
            continue
        seed = spec.seed * 1000 + fold * 100 + 77
        pool = _ArrayData([ctx.real.x[i] for i in dev], [ctx.real.y[i] for i in dev], None)
        test_set = [(ctx.real.x[i], ctx.real.y[i]) for i in test]

        def train_fn(model, subset):
            xs = [pool.xs[i] for i in subset.indices]
            ys = [pool.ys[i] for i in subset.indices]
            return _finetune(ctx, model, _ArrayData(xs, ys, spec.model.crop, _augment("light", False), seed), seed,
                             frozen=False, copy_base=False)

        def metric(model, data):
            rows = [score(_predict(model, x, spec.model.tta), y, spec.task, spec.tolerance) for x, y in data]
            return _mean_rows(rows)[main]

        t = time.monotonic()
        curves = compare_strategies(lambda: copy.deepcopy(base), train_fn, pool, test_set, rounds=rounds,
                                    batch=batch, seed_batch=seed_batch, rng=np.random.default_rng(seed),
                                    metric=metric, select_kwargs={"device": "cpu"})
        for strategy, curve in curves.items():
            for r in curve:
                row = {"condition": "active", "variant": strategy, "k": int(r["n_labels"]), "fold": fold,
                       "n_test": len(test), "n_train": int(r["n_labels"]), main: float(r["metric"]),
                       "seconds": round((time.monotonic() - t) / max(1, len(curve) * len(curves)), 1)}
                ctx.rows.append(row)
        ctx.log(f"[{ctx.minutes():5.1f} min] fold {fold} active: "
                + "; ".join(f"{s}: " + " ".join(f"{r['n_labels']}→{r['metric']:.3f}" for r in c)
                            for s, c in curves.items()))


def _run_ablation(ctx: _Ctx, folds: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Pretrain on every ``twin ablate`` variant; synthetic-only and fine-tuned (largest k) scores."""
    from twin.ablate import ablate  # the composition root: generation is twin's job

    spec = ctx.spec
    recipe = (ctx.base / spec.synthetic.recipe).resolve()
    n = spec.synthetic.ablation_samples or spec.synthetic.samples
    adir = ctx.out / "ablation"
    mpath = adir / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else None
    if manifest is None or manifest.get("samples_per_variant") != n:
        ctx.log(f"[{ctx.minutes():5.1f} min] twin ablate {recipe.name}: {n} samples per variant")
        mpath = ablate(recipe, adir, features=spec.synthetic.ablate, n=n, seed=spec.synthetic.seed,
                       overwrite=True)
        manifest = json.loads(Path(mpath).read_text())
    k = max(spec.k)
    minutes = spec.budget.pretrain_minutes
    for v in manifest["variants"]:
        if ctx.over_budget():
            ctx.skipped.append(f"ablation variant {v['name']} (total budget spent)")
            continue
        model = _pretrain(ctx, adir / v["dataset"], "ablate-" + v["name"], minutes)
        for fold, (dev, test) in enumerate(folds):
            t = time.monotonic()
            _record(ctx, "ablation", 0, fold, test, _predict_all(ctx, model, test),
                    time.monotonic() - t, variant=v["name"])
            if k > 0 and not ctx.over_budget():
                seed = spec.seed * 1000 + fold * 100 + (k if k >= 0 else 99)
                idx = _choose(ctx.real, dev, k, seed)
                t = time.monotonic()
                m = _finetune(ctx, model, _ArrayData([ctx.real.x[i] for i in idx], [ctx.real.y[i] for i in idx],
                                                     spec.model.crop, _augment("light", False), seed), seed,
                              frozen=False)
                preds, th = _predict_trained(ctx, m, idx, test)
                _record(ctx, "ablation", len(idx), fold, test, preds, time.monotonic() - t, variant=v["name"],
                        threshold=th)


def summarise(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Mean and standard deviation over folds per (condition, variant, k)."""
    keys = ["boundary_f1", "grain_size_error"] if task == "boundary" else ["iou", "dice"]
    out = []
    seen: dict[tuple, list[dict]] = {}
    for r in rows:
        keep = r["condition"] in ("ablation", "active")
        seen.setdefault((r["condition"], r["variant"] if keep else "", r["k"]), []).append(r)
    for (cond, var, k), rs in seen.items():
        row: dict[str, Any] = {"condition": cond, "variant": var, "k": k, "folds": len(rs)}
        for key in keys:
            v = np.array([x.get(key, np.nan) for x in rs], dtype=float)
            v = v[np.isfinite(v)]
            row[key] = float(v.mean()) if v.size else float("nan")
            row[key + "_sd"] = float(v.std()) if v.size else float("nan")
        out.append(row)
    return out


def _markdown(spec: StudySpec, summary: list[dict[str, Any]], minutes: float) -> str:
    keys = ["boundary_f1", "grain_size_error"] if spec.task == "boundary" else ["iou", "dice"]
    lines = [f"# Study `{spec.name}`", "",
             f"{spec.folds}-fold cross-validation grouped by micrograph; {minutes:.1f} min in all.", "",
             "| condition | k | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in summary:
        name = r["condition"] + (f" ({r['variant']})" if r["variant"] else "")
        kk = "all dev" if r["k"] < 0 else r["k"]
        lines.append(f"| {name} | {kk} | "
                     + " | ".join(f"{r[k]:.3f} ± {r[k + '_sd']:.3f}" for k in keys) + " |")
    abl = [r for r in summary if r["condition"] == "ablation"]
    if abl:
        main = _main_metric(spec.task)
        ref = {r["k"]: r[main] for r in abl if r["variant"] == "all_on"}
        lines += ["", "## Ablation: change when a feature is switched off", "",
                  f"| variant | k | {main} | Δ vs all on |", "|---|---|---|---|"]
        for r in abl:
            d = r[main] - ref.get(r["k"], float("nan"))
            lines.append(f"| {r['variant']} | {r['k']} | {r[main]:.3f} | {d:+.3f} |")
    return "\n".join(lines) + "\n"


def _write(ctx: _Ctx, result: dict[str, Any]) -> None:
    out = ctx.out
    cols: list[str] = []
    for r in ctx.rows:
        cols += [c for c in r if c not in cols]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(ctx.rows)
    (out / "summary.md").write_text(_markdown(ctx.spec, result["summary"], result["minutes"]))
    (out / "study.json").write_text(json.dumps({"spec": ctx.spec.model_dump(), **result}, indent=1, default=str))
    _plot(ctx.spec, result["summary"], out / "metric_vs_k.png")


def _plot(spec: StudySpec, summary: list[dict[str, Any]], path: Path) -> None:
    """Metric vs k: one line per trained condition, dashed horizontal lines for zero-label rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = _main_metric(spec.task)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = plt.get_cmap("tab20").colors
    conds = [(r["condition"], r["variant"]) for r in summary if r["condition"] != "ablation"]
    conds = list(dict.fromkeys((c, v if c == "active" else "") for c, v in conds))
    all_k: set[int] = set()
    for n, (c, v) in enumerate(conds):
        rs = sorted([r for r in summary if r["condition"] == c and (c != "active" or r["variant"] == v)],
                    key=lambda r: r["k"])
        name = f"{c} ({v})" if v else c
        colour = colours[n % len(colours)]
        if len(rs) == 1 and c in _ZERO_LABEL + ("scratch_all",):
            k = rs[0]["k"]
            ax.axhline(rs[0][main], ls=(0, (4, 2)) if c != "scratch_all" else "-.", lw=1.3, color=colour,
                       label=f"{name} ({'all dev' if k < 0 else f'k={k}'}): {rs[0][main]:.3f}")
            continue
        ks = [r["k"] for r in rs if r["k"] >= 0]
        all_k.update(ks)
        ax.errorbar(ks, [r[main] for r in rs if r["k"] >= 0], yerr=[r[main + "_sd"] for r in rs if r["k"] >= 0],
                    marker="o", capsize=3, color=colour, label=name)
    if all_k:
        ax.set_xticks(sorted(all_k))
        ax.set_xlim(min(all_k) - 1, max(all_k) + 1)
    ax.set(xlabel="real labelled crops k", ylabel=main, title=f"{spec.name}: {main} vs k (mean ± sd over folds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
