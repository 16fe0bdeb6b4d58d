"""A small, readable training loop for segmentation and classification.

:class:`Trainer` does one thing per line of :meth:`Trainer.fit`: per epoch it (optionally)
advances a :class:`sdk.transfer.GradualUnfreezing` schedule, trains on the training data with
mixed precision where the device supports it, validates, logs a row, keeps the best checkpoint
by a validation metric and stops early when that metric stops improving — or when the wall-clock
budget (``max_minutes``) runs out. It writes ``log.csv``, ``log.json`` and ``curves.png`` (loss and
metric per epoch) to ``out_dir``.

Randomness: model initialisation is the caller's business (see :func:`seeded_build`); the loop
draws batches from a ``torch.Generator`` seeded with ``config.seed`` and runs under
``torch.random.fork_rng`` seeded the same way (dropout), so it leaves the global RNG as it was.

Also here: :func:`evaluate_segmentation`, :func:`predict_tiled` (large images in overlapping
tiles, blended with a smooth window) and :func:`select_device`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from twin.errors import EmtwinError

__all__ = [
    "TrainError",
    "TrainConfig",
    "Trainer",
    "select_device",
    "seeded_build",
    "segmentation_loss",
    "evaluate_segmentation",
    "evaluate_classification",
    "predict_tiled",
    "write_log",
    "plot_log",
]


class TrainError(EmtwinError):
    """A training request that cannot run (bad setting, empty data)."""


# --------------------------------------------------------------------------------------------
# Configuration and helpers
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Settings of :class:`Trainer`.

    Parameters
    ----------
    task : {"segmentation", "classification"}
        Segmentation targets are ``(H, W)`` int64 class maps; classification targets are ints.
    epochs : int
        Maximum number of epochs.
    steps_per_epoch : int, optional
        Batches per epoch, drawn with replacement when more than the data has (default: one
        pass over the training data, shuffled).
    batch_size : int
    lr : float
        Learning rate of the default AdamW optimizer (ignored if an optimizer is passed).
    weight_decay : float
    loss : {"ce", "ce+dice"}
        Cross-entropy, or cross-entropy plus soft Dice on the non-background classes
        (segmentation; robust to the thin-boundary class imbalance).
    class_weights : list of float, optional
        Cross-entropy class weights.
    max_minutes : float, optional
        Wall-clock budget of :meth:`Trainer.fit`, validation and checkpointing included.
    seed : int
        Seeds batch order, random crops drawn with torch, and dropout.
    device : str
        ``"auto"`` (CUDA, then Apple MPS, then CPU) or a torch device string.
    amp : {"auto", "on", "off"}
        Mixed precision: ``"auto"`` uses float16 autocast + gradient scaling on CUDA and
        nothing on the CPU; ``"on"`` also uses bfloat16 autocast on the CPU.
    monitor : str
        Validation metric for checkpoints and early stopping (``"auto"``: ``val_boundary_f1``
        when ``boundary_class`` is set, else ``val_iou``; ``val_accuracy`` for classification;
        ``val_loss`` without metrics). Without validation data the last epoch is kept.
    mode : {"auto", "max", "min"}
        Whether the monitored metric should grow (``auto``: min for losses, max otherwise).
    patience : int, optional
        Stop after this many epochs without improvement (None: never).
    min_delta : float
        Smallest change counted as an improvement.
    boundary_class : int, optional
        Class index whose map is a boundary map: adds boundary precision/recall/F1 with
        ``boundary_tolerance`` (px) to the validation metrics.
    boundary_tolerance : int
    num_workers : int
        DataLoader worker processes.
    grad_clip : float, optional
        Clip the gradient norm to this value.
    scheduler : {"cosine", "none"}
        Per-epoch cosine decay to 1 % of the initial rates, or constant rates.
    out_dir : str, optional
        Folder for ``log.csv``, ``log.json`` and ``curves.png``.
    checkpoint : str, optional
        Where to save the best (or last) model with :func:`sdk.models.save_checkpoint`.
    progress : bool
        Show a progress bar (tqdm) per epoch.
    """

    task: str = "segmentation"
    epochs: int = 20
    steps_per_epoch: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "ce+dice"
    class_weights: list[float] | None = None
    max_minutes: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    monitor: str = "auto"
    mode: str = "auto"
    patience: int | None = 10
    min_delta: float = 1e-4
    boundary_class: int | None = None
    boundary_tolerance: int = 2
    num_workers: int = 0
    grad_clip: float | None = None
    scheduler: str = "cosine"
    out_dir: str | None = None
    checkpoint: str | None = None
    progress: bool = True
    val_batch_size: int = 4

    def __post_init__(self) -> None:
        checks = [
            (self.task in ("segmentation", "classification"), "task", "segmentation or classification"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1, "steps_per_epoch", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.lr > 0, "lr", "> 0"),
            (self.loss in ("ce", "ce+dice"), "loss", "ce or ce+dice"),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes", "> 0"),
            (self.amp in ("auto", "on", "off"), "amp", "auto, on or off"),
            (self.mode in ("auto", "max", "min"), "mode", "auto, max or min"),
            (self.patience is None or self.patience >= 1, "patience", ">= 1"),
            (self.scheduler in ("cosine", "none"), "scheduler", "cosine or none"),
            (self.num_workers >= 0, "num_workers", ">= 0"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise TrainError(f"training setting {name}={getattr(self, name)!r} is not allowed ({allowed})")


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else Apple MPS, else CPU; otherwise ``torch.device(device)``.

    Raises
    ------
    TrainError
        If the named device is not available.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {device!r} was asked for but CUDA is not available here")
    return dev


def seeded_build(fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Call ``fn()`` (e.g. ``lambda: build_model(cfg)``) with the CPU RNG seeded by ``seed``,
    without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return fn()


def _amp_settings(device: torch.device, amp: str) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast enabled, dtype, use GradScaler)."""
    if amp == "off":
        return False, None, False
    if device.type == "cuda":
        return True, torch.float16, True
    if amp == "on" and device.type == "cpu":
        return True, torch.bfloat16, False
    return False, None, False


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce+dice",
                      class_weights: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy (+ soft Dice over the non-background classes) for ``(B,K,H,W)`` logits.

    Parameters
    ----------
    logits : tensor (B, K, H, W)
    target : tensor (B, H, W) int64
    kind : {"ce", "ce+dice"}
    class_weights : tensor (K,), optional
    ignore_index : int
        Target value excluded from both terms.
    """
    logits = logits.float()
    loss = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index)
    if kind == "ce+dice" and logits.shape[1] > 1:
        valid = (target != ignore_index).unsqueeze(1).float()
        prob = logits.softmax(1) * valid
        onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
        inter = (prob * onehot).sum(dim=(0, 2, 3))[1:]
        denom = (prob + onehot).sum(dim=(0, 2, 3))[1:]
        loss = loss + (1 - (2 * inter + 1) / (denom + 1)).mean()
    return loss


def _boundary_f1(pred: np.ndarray, true: np.ndarray, tolerance: int) -> dict[str, float]:
    from sdk.metrics import boundary_f1

    out = boundary_f1(pred.astype(bool), true.astype(bool), tolerance=tolerance)
    return {k: float(out[k]) for k in ("precision", "recall", "f1")}


def _iou_dice(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(pred, true).sum())
    a, b = float(pred.sum()), float(true.sum())
    union = a + b - inter
    iou = inter / union if union > 0 else 1.0
    dice = 2 * inter / (a + b) if a + b > 0 else 1.0
    return iou, dice


def _autocast(device: torch.device, enabled: bool, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, data: Dataset | DataLoader, device: torch.device | str = "cpu",
                          boundary_class: int | None = None, tolerance: int = 2,
                          loss: str = "ce+dice", amp: str = "auto", batch_size: int = 4,
                          per_image: bool = False) -> dict[str, Any]:
    """Loss and metrics of a segmentation model on ``(image, target)`` data.

    Metrics are computed per image and averaged: ``iou`` and ``dice`` of the foreground
    (class 1 for two classes; mean over classes >= 1 otherwise), ``pixel_accuracy``, and with
    ``boundary_class`` the boundary ``precision``/``recall``/``boundary_f1`` of
    :func:`sdk.metrics.boundary_f1` at ``tolerance`` px.

    Returns
    -------
    dict
        ``{"loss", "iou", "dice", "pixel_accuracy", ["boundary_precision", "boundary_recall",
        "boundary_f1"], ["per_image": list of dicts]}``.
    """
    device = torch.device(device)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    enabled, dtype, _ = _amp_settings(device, amp)
    was_training = model.training
    model.eval()
    rows: list[dict[str, float]] = []
    losses: list[tuple[float, int]] = []
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with _autocast(device, enabled, dtype):
                logits = model(x)
            losses.append((float(segmentation_loss(logits, y, loss)), int(x.shape[0])))
            pred = logits.argmax(1).cpu().numpy()
            true = y.cpu().numpy()
            k = logits.shape[1]
            for p, t in zip(pred, true):
                classes = [1] if k == 2 else list(range(1, k))
                ious, dices = zip(*[_iou_dice(p == c, t == c) for c in classes]) if classes else ((1.0,), (1.0,))
                row = {"iou": float(np.mean(ious)), "dice": float(np.mean(dices)),
                       "pixel_accuracy": float(np.mean(p == t))}
                if boundary_class is not None:
                    bf = _boundary_f1(p == boundary_class, t == boundary_class, tolerance)
                    row.update(boundary_precision=bf["precision"], boundary_recall=bf["recall"],
                               boundary_f1=bf["f1"])
                rows.append(row)
    finally:
        model.train(was_training)
    if not rows:
        raise TrainError("evaluation data is empty")
    out: dict[str, Any] = {"loss": sum(l * n for l, n in losses) / sum(n for _, n in losses)}
    for key in rows[0]:
        out[key] = float(np.mean([r[key] for r in rows]))
    if per_image:
        out["per_image"] = rows
    return out


@torch.no_grad()
def evaluate_classification(model: nn.Module, data: Dataset | DataLoader, device: torch.device | str = "cpu",
                            amp: str = "auto", batch_size: int = 32) -> dict[str, float]:
    """Cross-entropy loss and accuracy of a classifier on ``(image, label)`` data."""
    device = torch.device(device)
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    enabled, dtype, _ = _amp_settings(device, amp)
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    try:
        for x, y in loader:
            x, y = x.to(device), torch.as_tensor(y).to(device)
            with _autocast(device, enabled, dtype):
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += int(y.shape[0])
    finally:
        model.train(was_training)
    if total == 0:
        raise TrainError("evaluation data is empty")
    return {"loss": loss_sum / total, "accuracy": correct / total}


# --------------------------------------------------------------------------------------------
# Logs and plots
# --------------------------------------------------------------------------------------------


def write_log(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``log.csv`` and ``log.json`` (one row per epoch) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    csv_path, json_path = out / "log.csv", out / "log.json"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    json_path.write_text(json.dumps(list(rows), indent=1))
    return csv_path, json_path


def plot_log(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Plot loss (train/val) and validation metrics per epoch to a PNG.

    Uses matplotlib when it is installed, else a plain Pillow drawing (same content, simpler).
    """
    path = Path(path)
    loss_keys = [k for k in ("train_loss", "val_loss") if any(k in r for r in rows)]
    metric_keys = [k for k in ("val_boundary_f1", "val_iou", "val_dice", "val_accuracy", "train_accuracy")
                   if any(k in r for r in rows)]

    def series(k: str) -> tuple[list[float], list[float]]:
        pts = [(r["epoch"], r[k]) for r in rows if k in r and r[k] is not None]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - matplotlib missing or broken: fall back to Pillow
        return _plot_pil([(k, *series(k)) for k in loss_keys], [(k, *series(k)) for k in metric_keys],
                         path, title)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in loss_keys:
        axes[0].plot(*series(k), marker=".", label=k)
    axes[0].set_xlabel("epoch"); axes[0].set_ylabel("loss"); axes[0].legend(); axes[0].grid(alpha=0.3)
    for k in metric_keys:
        axes[1].plot(*series(k), marker=".", label=k)
    axes[1].set_xlabel("epoch"); axes[1].set_ylabel("metric"); axes[1].grid(alpha=0.3)
    if metric_keys:
        axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_pil(losses: list, metrics: list, path: Path, title: str) -> Path:
    from PIL import Image, ImageDraw

    W, H, pad = 900, 340, 40
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for panel, curves in enumerate((losses, metrics)):
        x0, x1, y0, y1 = panel * W // 2 + pad, (panel + 1) * W // 2 - 10, pad, H - pad
        draw.rectangle([x0, y0, x1, y1], outline="black")
        pts = [(x, y) for _, xs, ys in curves for x, y in zip(xs, ys) if math.isfinite(y)]
        if not pts:
            continue
        xmin, xmax = min(p[0] for p in pts), max(p[0] for p in pts) or 1
        ymin, ymax = min(p[1] for p in pts), max(p[1] for p in pts)
        if ymax == ymin:
            ymax = ymin + 1
        if xmax == xmin:
            xmax = xmin + 1
        for c, (name, xs, ys) in enumerate(curves):
            xy = [(x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (y - ymin) / (ymax - ymin) * (y1 - y0))
                  for x, y in zip(xs, ys)]
            col = colours[c % len(colours)]
            if len(xy) > 1:
                draw.line(xy, fill=col, width=2)
            draw.text((x0 + 5, y0 + 5 + 12 * c), name, fill=col)
        draw.text((x0, y1 + 5), f"epoch {xmin:g}..{xmax:g}   y {ymin:.3g}..{ymax:.3g}", fill="black")
    if title:
        draw.text((pad, 10), title, fill="black")
    img.save(path)
    return path


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class History:
    """What :meth:`Trainer.fit` returns: the per-epoch rows and how training ended."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_value: float | None = None
    monitor: str = ""
    stopped: str = ""
    seconds: float = 0.0
    images_seen: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Train a model with validation, checkpoints, early stopping and a time budget.

    Parameters
    ----------
    model : nn.Module
        A model from :mod:`sdk.models` (needed for checkpoints) or any module.
    train_data : Dataset
        Yields ``(image (C,H,W) float32, target)``.
    val_data : Dataset, optional
        Same form; validation after every epoch.
    config : TrainConfig
    optimizer : torch.optim.Optimizer, optional
        Default: AdamW over :func:`sdk.transfer.param_groups`-style groups if given via
        ``param_groups``, else over all parameters at ``config.lr``.
    param_groups : list of dict, optional
        Parameter groups for the default AdamW (e.g. depth-graded ones).
    unfreezer : sdk.transfer.GradualUnfreezing, optional
        Advanced at the start of every epoch.
    checkpoint_meta : dict, optional
        Extra plain metadata saved in every checkpoint (label, channels, normalisation, split).
    on_epoch_end : callable, optional
        ``fn(row)`` after each epoch (row = the logged dict).
    adaptation : sdk.adapt.Adaptation or list of them, optional
        Domain adaptation (:class:`sdk.adapt.AdaBN`, :class:`sdk.adapt.DANN`,
        :class:`sdk.adapt.FDA`): its extra parameters join the optimizer, it may change each
        training batch, add a loss per step and act after each epoch (before validation);
        what it reports is logged in the epoch row.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, val_data: Dataset | None = None,
                 config: TrainConfig | None = None, optimizer: torch.optim.Optimizer | None = None,
                 param_groups: list[dict[str, Any]] | None = None, unfreezer: Any = None,
                 checkpoint_meta: Mapping[str, Any] | None = None,
                 on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
                 adaptation: Any = None) -> None:
        self.config = config or TrainConfig()
        if len(train_data) == 0:  # type: ignore[arg-type]
            raise TrainError("the training data is empty")
        self.device = select_device(self.config.device)
        self.model = model.to(self.device)
        self.train_data = train_data
        self.val_data = val_data
        self.unfreezer = unfreezer
        self.checkpoint_meta = dict(checkpoint_meta or {})
        self.on_epoch_end = on_epoch_end
        if optimizer is None:
            groups = param_groups if param_groups is not None else [
                {"params": [p for p in model.parameters()], "lr": self.config.lr, "name": "all"}]
            optimizer = torch.optim.AdamW(groups, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.optimizer = optimizer
        if adaptation is None:
            self.adaptations: list[Any] = []
        else:
            self.adaptations = list(adaptation) if isinstance(adaptation, (list, tuple)) else [adaptation]
        for a in self.adaptations:
            extra = list(a.setup(self.model, self.device))
            if extra:
                self.optimizer.add_param_group({"params": extra, "lr": self.config.lr,
                                                "name": f"adaptation:{getattr(a, 'name', type(a).__name__)}"})
        self._step, self._total_steps = 0, 1
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.amp_enabled, self.amp_dtype, use_scaler = _amp_settings(self.device, self.config.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.monitor, self.mode = self._resolve_monitor()
        self.history = History(monitor=self.monitor)

    # ---- setup helpers ------------------------------------------------------------------

    def _resolve_monitor(self) -> tuple[str, str]:
        c = self.config
        if self.val_data is None:
            return "train_loss", "min"
        mon = c.monitor
        if mon == "auto":
            if c.task == "classification":
                mon = "val_accuracy"
            else:
                mon = "val_boundary_f1" if c.boundary_class is not None else "val_iou"
        mode = c.mode
        if mode == "auto":
            mode = "min" if mon.endswith("loss") else "max"
        return mon, mode

    def _loader(self, generator: torch.Generator) -> DataLoader:
        c = self.config
        n = len(self.train_data)  # type: ignore[arg-type]
        if c.steps_per_epoch is None:
            sampler = RandomSampler(self.train_data, generator=generator)
        else:
            samples = c.steps_per_epoch * c.batch_size
            sampler = RandomSampler(self.train_data, replacement=samples > n, num_samples=samples,
                                    generator=generator)
        return DataLoader(self.train_data, batch_size=c.batch_size, sampler=sampler,
                          num_workers=c.num_workers, drop_last=False,
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=c.num_workers > 0, generator=generator)

    def _class_weights(self) -> torch.Tensor | None:
        if self.config.class_weights is None:
            return None
        return torch.tensor(self.config.class_weights, dtype=torch.float32, device=self.device)

    # ---- one epoch ----------------------------------------------------------------------

    def _train_epoch(self, loader: DataLoader, epoch: int, deadline: float | None,
                     reserve: float) -> tuple[float, float | None, int, bool]:
        """Returns (mean loss, train accuracy or None, images, ran out of time)."""
        c = self.config
        self.model.train()
        weights = self._class_weights()
        total, n_img, correct = 0.0, 0, 0
        out_of_time = False
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            tqdm = None
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{c.epochs}", leave=False,
                   disable=not c.progress) if tqdm else None
        for x, y in loader:
            if deadline is not None and time.monotonic() + reserve > deadline:
                out_of_time = True
                break
            x = x.to(self.device, non_blocking=True)
            y = torch.as_tensor(y).to(self.device, non_blocking=True)
            progress = self._step / self._total_steps
            for a in self.adaptations:
                x, y = a.adapt_batch(x, y, progress)
            with _autocast(self.device, self.amp_enabled, self.amp_dtype):
                logits = self.model(x)
                extras = [a.extra_loss(self.model, x, logits, progress) for a in self.adaptations]
            if c.task == "segmentation":
                loss = segmentation_loss(logits, y, c.loss, weights)
            else:
                loss = F.cross_entropy(logits.float(), y, weight=weights)
                correct += int((logits.argmax(1) == y).sum())
            for extra in extras:
                if extra is not None:
                    loss = loss + extra.float()
            self._step += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if c.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total += float(loss.detach()) * int(x.shape[0])
            n_img += int(x.shape[0])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / n_img:.4f}")
        if bar is not None:
            bar.close()
        mean = total / n_img if n_img else float("nan")
        acc = correct / n_img if (n_img and c.task == "classification") else None
        return mean, acc, n_img, out_of_time

    def validate(self) -> dict[str, float]:
        """Validation loss and metrics (empty dict without validation data)."""
        if self.val_data is None:
            return {}
        c = self.config
        if c.task == "classification":
            res = evaluate_classification(self.model, self.val_data, self.device, c.amp, c.val_batch_size)
        else:
            res = evaluate_segmentation(self.model, self.val_data, self.device, c.boundary_class,
                                        c.boundary_tolerance, c.loss, c.amp, c.val_batch_size)
        return {f"val_{k}": v for k, v in res.items()}

    def _improved(self, value: float) -> bool:
        best = self.history.best_value
        if best is None or not math.isfinite(best):
            return math.isfinite(value)
        if self.mode == "max":
            return value > best + self.config.min_delta
        return value < best - self.config.min_delta

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Save the current model with the checkpoint metadata and the log so far."""
        path = path or self.config.checkpoint
        if path is None:
            return None
        from sdk.models import save_checkpoint

        meta = dict(self.checkpoint_meta)
        meta["log"] = [dict(r) for r in self.history.rows]
        meta["train"] = {"monitor": self.monitor, "best_epoch": self.history.best_epoch,
                         "best_value": self.history.best_value, "stopped": self.history.stopped,
                         "config": {k: v for k, v in asdict(self.config).items()
                                    if isinstance(v, (str, int, float, bool, list)) or v is None}}
        return save_checkpoint(path, self.model, **meta)

    # ---- the loop -----------------------------------------------------------------------

    def fit(self) -> History:
        """Train; returns the :class:`History`. The model ends with the best weights kept."""
        c = self.config
        start = time.monotonic()
        deadline = start + 60 * c.max_minutes if c.max_minutes else None
        gen = torch.Generator().manual_seed(int(c.seed))
        loader = self._loader(gen)
        self._step, self._total_steps = 0, max(1, c.epochs * len(loader))
        for a in self.adaptations:
            a.start(self._total_steps, int(c.seed))
        best_state: dict[str, torch.Tensor] | None = None
        since_best = 0
        val_seconds = 0.0
        h = self.history
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            torch.manual_seed(int(c.seed))
            for epoch in range(c.epochs):
                row: dict[str, Any] = {"epoch": epoch + 1}
                if self.unfreezer is not None:
                    newly = self.unfreezer.step(epoch)
                    row["stage"] = self.unfreezer.stage
                    if newly:
                        row["unfrozen"] = list(newly)
                if c.scheduler == "cosine" and c.epochs > 1:
                    factor = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * epoch / (c.epochs - 1)))
                    for g in self.optimizer.param_groups:
                        g["lr"] = g["initial_lr"] * factor
                row["lr"] = max(g["lr"] for g in self.optimizer.param_groups)
                reserve = (1.3 * val_seconds + min(2.0, 0.05 * 60 * c.max_minutes)) if deadline else 0.0
                loss, acc, n_img, out_of_time = self._train_epoch(loader, epoch, deadline, reserve)
                h.images_seen += n_img
                if n_img == 0:
                    h.stopped = "time budget"
                    if not h.rows:
                        raise TrainError(f"the time budget ({c.max_minutes:.3g} min) ran out before "
                                         "the first training step")
                    break
                row["train_loss"] = loss
                if acc is not None:
                    row["train_accuracy"] = acc
                for a in self.adaptations:
                    row.update(a.epoch_end(self.model, self.device))
                t0 = time.monotonic()
                row.update(self.validate())
                val_seconds = time.monotonic() - t0
                row["seconds"] = round(time.monotonic() - start, 2)
                row["images"] = h.images_seen
                h.rows.append(row)
                value = float(row.get(self.monitor, float("nan")))
                if self._improved(value) or (self.val_data is None):
                    h.best_epoch, h.best_value = epoch + 1, value
                    best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    since_best = 0
                    if self.val_data is not None:
                        self.save()
                else:
                    since_best += 1
                if self.on_epoch_end is not None:
                    self.on_epoch_end(row)
                if c.out_dir:
                    write_log(h.rows, c.out_dir)
                if out_of_time:
                    h.stopped = "time budget"
                    break
                if deadline is not None and time.monotonic() + reserve > deadline:
                    h.stopped = "time budget"
                    break
                if c.patience is not None and since_best >= c.patience:
                    h.stopped = f"early stopping ({self.monitor} not improved for {c.patience} epochs)"
                    break
            else:
                h.stopped = "epochs done"
        if best_state is not None:
            self.model.load_state_dict(best_state)
        h.seconds = round(time.monotonic() - start, 2)
        if c.out_dir and h.rows:
            write_log(h.rows, c.out_dir)
            plot_log(h.rows, Path(c.out_dir) / "curves.png", title=f"monitor: {self.monitor}")
        if h.rows:
            self.save()
        return h


# --------------------------------------------------------------------------------------------
# Inference on large images
# --------------------------------------------------------------------------------------------


def _window(size: int, overlap: int) -> np.ndarray:
    """1-D blending weights: a raised-cosine ramp over ``overlap`` px at each end, 1 inside."""
    w = np.ones(size, dtype=np.float32)
    if overlap > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap) + 0.5) / overlap)
        w[:overlap] = ramp
        w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return np.maximum(w, 1e-3)


def _starts(n: int, tile: int, step: int) -> list[int]:
    if n <= tile:
        return [0]
    s = list(range(0, n - tile, step))
    s.append(n - tile)
    return sorted(set(s))


@torch.no_grad()
def predict_tiled(model: nn.Module, image: torch.Tensor | np.ndarray, tile: int = 512, overlap: int = 64,
                  device: torch.device | str = "cpu", amp: str = "auto", batch_size: int = 4,
                  tta: bool = False) -> np.ndarray:
    """Class probabilities of a segmentation model on an image of any size.

    Images no larger than ``tile`` go through in one piece. Larger ones are cut into
    ``tile``-sized tiles overlapping by ``overlap`` px; the softmax outputs are blended with a
    raised-cosine window, so seams do not show. With ``tta`` the probabilities are the mean over
    the 8 elements of the dihedral group D4 (identity, 90° rotations and their mirror images):
    each transformed image is predicted and the output transformed back (8× the cost). A
    micrograph has no preferred orientation, so this averages out the orientation biases of a
    model without changing what it was trained to predict.

    Parameters
    ----------
    model : nn.Module
    image : array (C, H, W) float
        Normalised as in training.
    tile, overlap : int
    device, amp : see :class:`TrainConfig`
    batch_size : int
        Tiles per forward pass.
    tta : bool
        Average over the 8 dihedral transforms (test-time augmentation).

    Returns
    -------
    ndarray (K, H, W) float32
        Probabilities (sum to 1 over K).
    """
    if overlap < 0 or overlap * 2 >= tile:
        raise TrainError(f"overlap must be in [0, tile/2), got overlap={overlap}, tile={tile}")
    if tta:
        img = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
        if img.ndim != 3:
            raise TrainError(f"predict_tiled expects a (C, H, W) image, got shape {img.shape}")
        total: np.ndarray | None = None
        for k in range(4):
            for mirror in (False, True):
                t = np.rot90(img, k, axes=(1, 2))
                t = t[:, :, ::-1] if mirror else t
                p = predict_tiled(model, np.ascontiguousarray(t), tile, overlap, device, amp, batch_size)
                p = p[:, :, ::-1] if mirror else p
                p = np.rot90(p, -k, axes=(1, 2))
                total = p.copy() if total is None else total + p
        assert total is not None
        return np.ascontiguousarray(total / 8.0, dtype=np.float32)
    device = torch.device(device)
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))
    if x.dim() != 3:
        raise TrainError(f"predict_tiled expects a (C, H, W) image, got shape {tuple(x.shape)}")
    _, H, W = x.shape
    enabled, dtype, _ = _amp_settings(device, amp)
    model.eval()
    if H <= tile and W <= tile:
        with _autocast(device, enabled, dtype):
            out = model(x[None].to(device)).float().softmax(1)[0]
        return out.cpu().numpy()
    th, tw = min(tile, H), min(tile, W)
    ys, xs = _starts(H, th, th - overlap), _starts(W, tw, tw - overlap)
    weight = np.outer(_window(th, overlap if H > th else 0), _window(tw, overlap if W > tw else 0))
    acc: np.ndarray | None = None
    norm = np.zeros((H, W), dtype=np.float32)
    coords = [(y, x0) for y in ys for x0 in xs]
    for i in range(0, len(coords), batch_size):
        chunk = coords[i:i + batch_size]
        batch = torch.stack([x[:, y:y + th, x0:x0 + tw] for y, x0 in chunk]).to(device)
        with _autocast(device, enabled, dtype):
            probs = model(batch).float().softmax(1).cpu().numpy()
        if acc is None:
            acc = np.zeros((probs.shape[1], H, W), dtype=np.float32)
        for (y, x0), p in zip(chunk, probs):
            acc[:, y:y + th, x0:x0 + tw] += p * weight
            norm[y:y + th, x0:x0 + tw] += weight
    assert acc is not None
    return acc / norm
