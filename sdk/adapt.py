"""Domain adaptation from synthetic to real micrographs: AdaBN, DANN and Fourier domain adaptation.

Each method works from plain PyTorch and from :class:`sdk.trainer.Trainer`
(``Trainer(..., adaptation=AdaBN(real_images) | DANN(model, real_images) | FDA(real_images))``;
a list combines several):

- **AdaBN** (Li et al. 2016): :func:`adabn` re-estimates every BatchNorm layer's running mean and
  variance on *unlabelled* target images; weights stay. :class:`AdaBN` does it in the trainer after
  every epoch (before validation, so checkpoints hold the adapted statistics) and/or at the start.
- **DANN** (Ganin et al. 2016): a :class:`DomainClassifier` on globally pooled encoder features
  learns to tell source from target batches, while a gradient reversal layer
  (:func:`grad_reverse`) makes the encoder learn features it cannot tell apart. The reversal
  strength follows Ganin's schedule ``λ(p) = 2 / (1 + exp(-10 p)) - 1`` over training progress
  ``p ∈ [0, 1]`` (:func:`ganin_lambda`).
- **FDA** (Yang & Soatto 2020): :func:`fda` swaps the low-frequency amplitude spectrum of a source
  (synthetic) image with that of a target (real) one, keeping the source phase: the synthetic
  geometry (and so its exact labels) with the real image's "style" (mean level, shading, slow
  contrast). :class:`FDATransform` is the albumentations transform for :mod:`sdk.data` datasets;
  :class:`FDA` does the same to whole batches inside the trainer.
- **Calibrated rendering** needs no code here: calibrate the instrument twin on the real images
  (``twin calibrate``), generate a dataset with that profile (``twin generate``), and train on it.

Randomness: target images are drawn from a ``torch.Generator`` (DANN, FDA) or the transform's
seeded generator (FDATransform); nothing touches global random state. Only PyTorch, NumPy and
albumentations are imported (no abTEM, no Numba).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from twin.errors import EmtwinError

__all__ = [
    "AdaptError",
    "Adaptation",
    "adabn",
    "AdaBN",
    "GradientReversal",
    "grad_reverse",
    "GradientReversalLayer",
    "ganin_lambda",
    "DomainClassifier",
    "DANN",
    "pooled_features",
    "feature_module",
    "fda",
    "fda_beta_size",
    "FDATransform",
    "FDA",
]


class AdaptError(EmtwinError, ValueError):
    """A domain-adaptation request that cannot run (bad beta, no target images, no encoder)."""


# --------------------------------------------------------------------------------------------
# The trainer protocol
# --------------------------------------------------------------------------------------------


class Adaptation:
    """Base class of what :class:`sdk.trainer.Trainer` accepts as ``adaptation``: every hook is a no-op.

    The trainer calls, in this order: :meth:`setup` once (extra trainable parameters are added to
    the optimizer as a group ``"adaptation:<name>"``), :meth:`start` at the start of ``fit``, then per
    training step :meth:`adapt_batch` (before the forward pass) and :meth:`extra_loss` (after it,
    added to the task loss), and :meth:`epoch_end` after the training part of every epoch, before
    validation (its dict is logged in the epoch row).
    """

    name = "adaptation"

    def setup(self, model: nn.Module, device: torch.device) -> list[nn.Parameter]:
        return []

    def start(self, total_steps: int, seed: int) -> None:
        pass

    def adapt_batch(self, x: torch.Tensor, y: Any, progress: float) -> tuple[torch.Tensor, Any]:
        return x, y

    def extra_loss(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor,
                   progress: float) -> torch.Tensor | None:
        return None

    def epoch_end(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return {}


# --------------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------------


def _item_image(item: Any) -> torch.Tensor:
    x = item[0] if isinstance(item, (tuple, list)) else item
    x = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).float()
    return x


def _batches(images: Any, batch_size: int) -> Iterable[torch.Tensor]:
    """Batches ``(B, C, H, W)`` from a tensor/array (N,C,H,W), a Dataset, a DataLoader or an iterable."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(images).float()
        if t.dim() == 3:
            t = t.unsqueeze(1)
        if t.dim() != 4:
            raise AdaptError(f"target images must be (N, C, H, W), got shape {tuple(t.shape)}")
        return list(t.split(batch_size))
    if isinstance(images, Dataset) and not isinstance(images, DataLoader):
        return (_stack([images[j] for j in range(i, min(i + batch_size, len(images)))])  # type: ignore[arg-type]
                for i in range(0, len(images), batch_size))  # type: ignore[arg-type]
    return (_item_image(b) for b in images)


def _stack(items: Sequence[Any]) -> torch.Tensor:
    return torch.stack([_item_image(it) for it in items])


class _TargetSampler:
    """Random target batches from a tensor (N,C,H,W), a Dataset or a sequence of images."""

    def __init__(self, target: Any) -> None:
        if isinstance(target, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(target).float()
            if t.dim() == 3:
                t = t.unsqueeze(1)
            if t.dim() < 2:
                raise AdaptError(f"target images must be (N, C, H, W), got shape {tuple(t.shape)}")
            self._tensor: torch.Tensor | None = t
            self._items: Any = None
            n = t.shape[0]
        else:
            self._tensor = None
            self._items = target
            n = len(target)
        if n == 0:
            raise AdaptError("no target images were given")
        self.n = n
        self.generator = torch.Generator().manual_seed(0)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def draw(self, k: int) -> torch.Tensor:
        idx = torch.randint(self.n, (k,), generator=self.generator)
        if self._tensor is not None:
            return self._tensor[idx]
        return _stack([self._items[int(i)] for i in idx])


# --------------------------------------------------------------------------------------------
# AdaBN
# --------------------------------------------------------------------------------------------


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adabn(model: nn.Module, images_or_loader: Any, *, max_batches: int | None = None,
          batch_size: int = 32, device: str | torch.device | None = None) -> nn.Module:
    """Re-estimate every BatchNorm layer's running statistics on unlabelled target images (AdaBN).

    Running means and variances are reset and replaced by the cumulative average
    (``momentum=None``) of the per-batch statistics of the target images: each BatchNorm layer in
    train mode, every other layer in eval mode (dropout off), no gradients. With one batch the
    result is exactly that batch's mean and unbiased variance per channel; with several it is the
    equal-weight average of the per-batch values. Affine weights are not touched. Training modes
    and momenta are restored afterwards, and so are BatchNorm layers pinned to eval mode by
    :func:`sdk.transfer.freeze` (they are re-estimated too).

    Parameters
    ----------
    model : nn.Module
    images_or_loader : tensor/array (N, C, H, W), Dataset, DataLoader or iterable of batches
        Target images (normalised as in training); ``(image, target)`` items/batches are fine,
        targets are ignored.
    max_batches : int, optional
        Use at most this many batches.
    batch_size : int
        Batch size when a tensor or a Dataset is given.
    device : optional
        Default: the model's device.

    Returns
    -------
    nn.Module
        ``model`` itself, adapted in place.

    Raises
    ------
    AdaptError
        No target image.
    """
    from sdk.transfer import _HOOK_ATTR, _force_eval

    layers = _bn_layers(model)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    saved = [(bn.momentum, getattr(bn, _HOOK_ATTR, None)) for bn in layers]
    model.eval()
    for bn in layers:
        handle = getattr(bn, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0
    try:
        for k, x in enumerate(_batches(images_or_loader, batch_size)):
            if max_batches is not None and k >= max_batches:
                break
            if x.dim() == 3:
                x = x.unsqueeze(0)
            model(x.to(device))
            seen += int(x.shape[0])
    finally:
        for bn, (momentum, handle) in zip(layers, saved):
            bn.momentum = momentum
            if handle is not None:
                setattr(bn, _HOOK_ATTR, bn.register_forward_pre_hook(_force_eval))
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise AdaptError("adabn got no target images")
    return model


class AdaBN(Adaptation):
    """AdaBN in :class:`sdk.trainer.Trainer`: re-estimate BatchNorm statistics on target images.

    Parameters
    ----------
    target : tensor (N, C, H, W), Dataset or iterable
        Unlabelled target (real) images.
    when : {"epoch_end", "start", "both"}
        After every epoch (before validation; the checkpoint keeps the adapted statistics), once
        before training (e.g. before fine-tuning a synthetic model on real crops), or both.
    max_batches, batch_size : see :func:`adabn`
    """

    name = "adabn"

    def __init__(self, target: Any, when: str = "epoch_end", max_batches: int | None = None,
                 batch_size: int = 32) -> None:
        if when not in ("epoch_end", "start", "both"):
            raise AdaptError(f"AdaBN when={when!r} is not allowed (epoch_end, start or both)")
        self.target, self.when = target, when
        self.max_batches, self.batch_size = max_batches, batch_size
        self._model: nn.Module | None = None
        self._device: torch.device | None = None

    def setup(self, model: nn.Module, device: torch.device) -> list[nn.Parameter]:
        self._model, self._device = model, device
        return []

    def start(self, total_steps: int, seed: int) -> None:
        if self.when in ("start", "both") and self._model is not None:
            adabn(self._model, self.target, max_batches=self.max_batches, batch_size=self.batch_size,
                  device=self._device)

    def epoch_end(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        if self.when in ("epoch_end", "both"):
            adabn(model, self.target, max_batches=self.max_batches, batch_size=self.batch_size, device=device)
            return {"adabn": 1.0}
        return {}


# --------------------------------------------------------------------------------------------
# DANN
# --------------------------------------------------------------------------------------------


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-lambd`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambd: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lambd * grad, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``-lambd`` (the DANN reversal layer)."""
    return GradientReversal.apply(x, float(lambd))


class GradientReversalLayer(nn.Module):
    """Module form of :func:`grad_reverse` (set :attr:`lambd` to schedule it)."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = float(lambd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambd)


def ganin_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s reversal schedule ``2 / (1 + exp(-gamma p)) - 1`` (0 at p=0, → 1)."""
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def _pool(out: Any) -> torch.Tensor:
    """Deepest 4-D map of an encoder output (list/tuple/dict/tensor), globally average-pooled → (B, C)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        maps = [f for f in out if isinstance(f, torch.Tensor) and f.dim() == 4]
        if not maps:
            raise AdaptError("the feature module returned no 4-D feature maps")
        out = maps[-1]
    if out.dim() == 4:
        return out.float().mean(dim=(-2, -1))
    if out.dim() == 2:
        return out.float()
    raise AdaptError(f"cannot pool features of shape {tuple(out.shape)}")


def feature_module(model: nn.Module, name: str | nn.Module | None = None) -> nn.Module:
    """The module whose output are the features used by DANN and :mod:`sdk.active`.

    Default ``model.encoder`` (every :mod:`sdk.models` model has one); ``name`` is a dotted
    sub-module name or a module.

    Raises
    ------
    AdaptError
        No such module.
    """
    if isinstance(name, nn.Module):
        return name
    if name is None:
        enc = getattr(model, "encoder", None)
        if not isinstance(enc, nn.Module):
            raise AdaptError(f"{type(model).__name__} has no .encoder: name the feature module")
        return enc
    mods = dict(model.named_modules())
    if name not in mods:
        raise AdaptError(f"model has no sub-module {name!r}")
    return mods[name]


def pooled_features(model: nn.Module, x: torch.Tensor, module: str | nn.Module | None = None) -> torch.Tensor:
    """Globally pooled deepest features ``(B, C)`` of ``module`` (default the encoder) for images ``x``."""
    return _pool(feature_module(model, module)(x))


class DomainClassifier(nn.Module):
    """Small MLP telling source (0) from target (1) on pooled features: one logit per image.

    Parameters
    ----------
    in_features : int
        Feature channels ``C``; inputs ``(B, C)`` or ``(B, C, H, W)`` (pooled first).
    hidden : int
        Width of the two hidden layers.
    """

    def __init__(self, in_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() == 4:
            feats = feats.mean(dim=(-2, -1))
        return self.net(feats).squeeze(-1)


class DANN(Adaptation):
    """Domain-adversarial training on the model's encoder features.

    The domain loss is ``weight · BCE(D(R_λ(f_s)), 0) + BCE(D(R_λ(f_t)), 1)`` averaged over the
    source and target images, with ``f`` the pooled deepest encoder features, ``R_λ`` the gradient
    reversal and ``λ = lambda_max · ganin_lambda(progress)``. Minimising it trains the domain
    classifier ``D`` to separate the domains and the encoder (through the reversal) to confuse it.

    Plain PyTorch::

        dann = DANN(model, real_images)
        opt = torch.optim.AdamW([*model.parameters(), *dann.parameters()])
        for step, (x, y) in enumerate(loader):
            logits = model(x)                     # the encoder features are captured here
            loss = task_loss(logits, y) + dann.domain_loss(progress=step / n_steps)
            opt.zero_grad(); loss.backward(); opt.step()

    In the trainer: ``Trainer(model, data, config=cfg, adaptation=DANN(model, real_images))``.

    Parameters
    ----------
    model : nn.Module
    target : tensor (N, C, H, W), Dataset or sequence of images
        Unlabelled target images (same normalisation and channels as the source).
    module : str or nn.Module, optional
        Feature module (default ``model.encoder``); see :func:`feature_module`.
    hidden : int
        Domain classifier width.
    weight : float
        Weight of the domain loss.
    lambda_max : float
        Final reversal strength.
    gamma : float
        Steepness of the schedule.
    batch_size : int, optional
        Target images per step (default: the source batch size).
    seed : int
        Seeds the target draws (the trainer reseeds with its own seed).
    """

    name = "dann"

    def __init__(self, model: nn.Module, target: Any, *, module: str | nn.Module | None = None,
                 hidden: int = 64, weight: float = 1.0, lambda_max: float = 1.0, gamma: float = 10.0,
                 batch_size: int | None = None, seed: int = 0) -> None:
        self.sampler = _TargetSampler(target)
        self.sampler.seed(seed)
        self.module_spec = module
        self.weight, self.lambda_max, self.gamma = float(weight), float(lambda_max), float(gamma)
        self.batch_size = batch_size
        self._total_steps = 1
        self._step = 0
        self._captured: torch.Tensor | None = None
        self._handle: Any = None
        self._stats = [0.0, 0.0, 0]  # loss sum, correct, images
        self.model: nn.Module | None = None
        self._bind(model)
        probe = self.sampler.draw(1).to(next((p.device for p in model.parameters()), torch.device("cpu")))
        was = model.training
        model.eval()
        with torch.no_grad():
            c = int(pooled_features(model, probe, self.module).shape[1])
        model.train(was)
        self._captured = None
        self.classifier = DomainClassifier(c, hidden)

    def _bind(self, model: nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
        self.model = model
        self.module = feature_module(model, self.module_spec)
        self._handle = self.module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: Any, out: Any) -> None:
        self._captured = _pool(out)

    def parameters(self) -> Iterable[nn.Parameter]:
        """The domain classifier's parameters (give them to the optimizer)."""
        return self.classifier.parameters()

    def lambda_at(self, progress: float) -> float:
        """Reversal strength at training progress ``p ∈ [0, 1]``."""
        return self.lambda_max * ganin_lambda(progress, self.gamma)

    def domain_loss(self, source: torch.Tensor | None = None, target: torch.Tensor | None = None,
                    progress: float | None = None) -> torch.Tensor:
        """The weighted domain loss for one step.

        Parameters
        ----------
        source : tensor (B, C, H, W), optional
            Source images; None: the features captured by the model's last forward pass.
        target : tensor (B', C, H, W), optional
            Target images; None: a random batch of the target set (size ``batch_size`` or B).
        progress : float, optional
            Training progress in [0, 1] for the λ schedule; None: the internal step count over
            the ``total_steps`` set by :meth:`start` (1 without it, i.e. full strength).
        """
        assert self.model is not None
        if progress is None:
            progress = self._step / max(self._total_steps, 1)
        self._step += 1
        if source is not None:
            fs = pooled_features(self.model, source, self.module)
        elif self._captured is not None:
            fs = self._captured
        else:
            raise AdaptError("DANN.domain_loss: no source images and no captured forward pass")
        self._captured = None
        dev = fs.device
        if target is None:
            target = self.sampler.draw(self.batch_size or int(fs.shape[0]))
        ft = pooled_features(self.model, target.to(dev), self.module)
        self._captured = None
        self.classifier.to(dev)
        feats = grad_reverse(torch.cat([fs, ft]), self.lambda_at(progress))
        logits = self.classifier(feats)
        labels = torch.cat([torch.zeros(len(fs), device=dev), torch.ones(len(ft), device=dev)])
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        with torch.no_grad():
            self._stats[0] += float(loss) * len(labels)
            self._stats[1] += float(((logits > 0).float() == labels).sum())
            self._stats[2] += len(labels)
        return self.weight * loss

    # ---- trainer hooks ----

    def setup(self, model: nn.Module, device: torch.device) -> list[nn.Parameter]:
        if model is not self.model:
            self._bind(model)
        self.classifier.to(device)
        return list(self.classifier.parameters())

    def start(self, total_steps: int, seed: int) -> None:
        self._total_steps = max(int(total_steps), 1)
        self._step = 0
        self.sampler.seed(seed)

    def extra_loss(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor,
                   progress: float) -> torch.Tensor | None:
        return self.domain_loss(progress=progress)

    def epoch_end(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        loss, correct, n = self._stats
        self._stats = [0.0, 0.0, 0]
        out = {"dann_lambda": self.lambda_at(self._step / max(self._total_steps, 1))}
        if n:
            out.update(dann_loss=loss / n, dann_accuracy=correct / n)
        return out


# --------------------------------------------------------------------------------------------
# Fourier domain adaptation
# --------------------------------------------------------------------------------------------


def fda_beta_size(shape: Sequence[int], beta: float) -> int:
    """Half-size ``b = floor(min(H, W) · beta)`` (px in frequency) of the swapped square."""
    if not 0 <= beta < 0.5:
        raise AdaptError(f"FDA beta must be in [0, 0.5), got {beta}")
    return int(math.floor(min(shape[-2], shape[-1]) * beta))


def _channel_axis(a: np.ndarray, channel_axis: int | None) -> int | None:
    if a.ndim == 2:
        return None
    if a.ndim != 3:
        raise AdaptError(f"fda takes (H, W), (C, H, W) or (H, W, C) arrays, got shape {a.shape}")
    if channel_axis is not None:
        return channel_axis % 3
    first, last = a.shape[0] <= 4, a.shape[-1] <= 4
    if first and not last:
        return 0
    if last and not first:
        return 2
    raise AdaptError(f"fda cannot tell the channel axis of shape {a.shape}: pass channel_axis")


def _fda_last2(src: Any, trg: Any, b: int, lib: Any) -> Any:
    """FDA over the last two axes (numpy or torch namespace ``lib``)."""
    fs = lib.fft.fft2(src)
    ft = lib.fft.fft2(trg)
    amp_s, pha_s, amp_t = lib.abs(fs), lib.angle(fs), lib.abs(ft)
    amp_s = lib.fft.fftshift(amp_s, axes=(-2, -1)) if lib is np else torch.fft.fftshift(amp_s, dim=(-2, -1))
    amp_t = lib.fft.fftshift(amp_t, axes=(-2, -1)) if lib is np else torch.fft.fftshift(amp_t, dim=(-2, -1))
    h, w = src.shape[-2], src.shape[-1]
    ch, cw = h // 2, w // 2
    amp_s = amp_s.clone() if lib is torch else amp_s.copy()
    amp_s[..., ch - b:ch + b + 1, cw - b:cw + b + 1] = amp_t[..., ch - b:ch + b + 1, cw - b:cw + b + 1]
    amp_s = lib.fft.ifftshift(amp_s, axes=(-2, -1)) if lib is np else torch.fft.ifftshift(amp_s, dim=(-2, -1))
    out = lib.fft.ifft2(amp_s * lib.exp(1j * pha_s))
    return out.real


def fda(source: Any, target: Any, beta: float, *, channel_axis: int | None = None) -> Any:
    """Fourier domain adaptation: the source's phase with the target's low-frequency amplitude.

    In the centred (``fftshift``-ed) 2-D spectrum of every channel, the amplitudes of the square
    of frequencies ``|k_y|, |k_x| <= b`` with ``b = floor(min(H, W) · beta)`` (side ``2b + 1``,
    Yang & Soatto 2020) are replaced by the target's; all phases and the other amplitudes stay the
    source's. ``beta = 0`` returns the source unchanged; any ``beta > 0`` swaps at least the DC
    term, so the output mean equals the target mean when the source mean is positive (any
    intensity image; a negative-mean source keeps its sign, as its DC phase is π). The swapped
    square is symmetric about DC, so the result is real (the inverse FFT's real part is returned).

    Parameters
    ----------
    source, target : ndarray or tensor, same shape
        NumPy: ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` (channel axis guessed from a size <= 4, or
        ``channel_axis``). Torch: any ``(..., H, W)`` (batches, channels first).
    beta : float in [0, 0.5)
        Size of the swapped band relative to the image side (the paper uses 0.01–0.09).
    channel_axis : int, optional
        NumPy arrays of 3 dimensions only.

    Returns
    -------
    same type, shape and (floating) dtype as ``source``
    """
    if isinstance(source, torch.Tensor):
        tgt = torch.as_tensor(target, device=source.device)
        if tgt.shape != source.shape:
            raise AdaptError(f"fda source and target shapes differ: {tuple(source.shape)} vs {tuple(tgt.shape)}")
        b = fda_beta_size(source.shape, beta)
        if beta == 0:
            return source.clone()
        dt = source.dtype if source.is_floating_point() else torch.float32
        return _fda_last2(source.double(), tgt.double(), b, torch).to(dt)
    src, tgt = np.asarray(source), np.asarray(target)
    if src.shape != tgt.shape:
        raise AdaptError(f"fda source and target shapes differ: {src.shape} vs {tgt.shape}")
    axis = _channel_axis(src, channel_axis)
    shape = src.shape if axis is None else np.moveaxis(src, axis, 0).shape
    b = fda_beta_size(shape, beta)
    dt = src.dtype if src.dtype.kind == "f" else np.float32
    if beta == 0:
        return src.astype(dt, copy=True)
    s = src.astype(np.float64) if axis is None else np.moveaxis(src, axis, 0).astype(np.float64)
    t = tgt.astype(np.float64) if axis is None else np.moveaxis(tgt, axis, 0).astype(np.float64)
    out = _fda_last2(s, t, b, np)
    if axis is not None:
        out = np.moveaxis(out, 0, axis)
    return out.astype(dt)


def _as_hw_images(images: Any) -> list[np.ndarray]:
    """Target images as float arrays (H, W) or (H, W, C); Datasets give ``item[0]`` (C, H, W)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and np.asarray(images).ndim in (2, 3) and \
            not isinstance(images, list):
        a = np.asarray(images)
        images = [a] if a.ndim == 2 or a.shape[-1] <= 4 else list(a)
    out = []
    for k in range(len(images)):
        it = images[k]
        if isinstance(it, (tuple, list)):
            it = it[0]
        if isinstance(it, torch.Tensor):
            it = it.detach().cpu().numpy()
            if it.ndim == 3:
                it = np.moveaxis(it, 0, -1)
        a = np.asarray(it, dtype=np.float32)
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3):
            raise AdaptError(f"target image {k} has shape {a.shape}; expected (H, W) or (H, W, C)")
        out.append(a)
    if not out:
        raise AdaptError("FDATransform needs at least one target image")
    return out


def _percentile_scale(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, (0.5, 99.5))
    return np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0).astype(np.float32)


class FDATransform(A.ImageOnlyTransform):
    """Albumentations transform: FDA with a random target image (and a random crop of it).

    Use it in an :mod:`sdk.data` dataset (``SyntheticDataset(..., transform=A.Compose([...,
    FDATransform(real_images, beta=0.01)]))``) or on its own (``FDATransform(...)(image=img)``).
    Per call it draws the target image, a crop position (targets larger than the image are
    cropped; smaller ones are refused) and beta (a ``(low, high)`` range is drawn uniformly) from
    the transform's generator (``seed``, or the seed :mod:`sdk.data` sets per worker). Labels are
    not touched: FDA keeps the source's geometry.

    Parameters
    ----------
    target_images : sequence of arrays (H, W)/(H, W, C), array (N, H, W[, C]) or Dataset
        Target (real) images; Dataset items ``(image (C, H, W), ...)`` are used as they are.
    beta : float or (float, float)
        See :func:`fda`.
    scale : {"percentile", "none"}
        ``"percentile"`` maps each target's 0.5–99.5 percentiles to [0, 1] (the working scale
        :mod:`sdk.data` hands transforms) and clips the output to [0, 1], so transforms after it
        (gamma, shot noise) see valid intensities; ``"none"`` keeps the values unclipped.
    seed : int, optional
    p : float
        Probability of applying.
    """

    def __init__(self, target_images: Any, beta: float | tuple[float, float] = 0.01,
                 scale: str = "percentile", seed: int | None = None, p: float = 1.0) -> None:
        super().__init__(p=p)
        if scale not in ("percentile", "none"):
            raise AdaptError(f"FDATransform scale={scale!r} is not allowed (percentile or none)")
        lo, hi = (beta, beta) if isinstance(beta, (int, float)) else (float(beta[0]), float(beta[1]))
        fda_beta_size((1, 1), lo), fda_beta_size((1, 1), hi)
        if lo > hi:
            raise AdaptError(f"FDA beta range must be (low, high) with low <= high, got {beta}")
        self.beta = (float(lo), float(hi))
        imgs = _as_hw_images(target_images)
        self.targets_ = [_percentile_scale(a) if scale == "percentile" else a for a in imgs]
        self.scale = scale
        if seed is not None:
            self.set_random_seed(seed)

    def get_params(self) -> dict[str, Any]:
        g = self.random_generator
        lo, hi = self.beta
        return {"index": int(g.integers(len(self.targets_))), "beta": float(g.uniform(lo, hi)) if hi > lo else lo,
                "u": float(g.random()), "v": float(g.random())}

    def _target_like(self, img: np.ndarray, index: int, u: float, v: float) -> np.ndarray:
        t = self.targets_[index]
        if img.ndim == 2 and t.ndim == 3:
            t = t.mean(axis=-1)
        elif img.ndim == 3 and t.ndim == 2:
            t = np.repeat(t[..., None], img.shape[-1], axis=-1)
        elif img.ndim == 3 and t.shape[-1] != img.shape[-1]:
            t = np.repeat(t.mean(axis=-1, keepdims=True), img.shape[-1], axis=-1)
        h, w = img.shape[:2]
        if t.shape[0] < h or t.shape[1] < w:
            raise AdaptError(f"FDA target image {index} ({t.shape[0]}x{t.shape[1]} px) is smaller than "
                             f"the image ({h}x{w} px)")
        y = int(u * (t.shape[0] - h + 1))
        x = int(v * (t.shape[1] - w + 1))
        return t[y:y + h, x:x + w]

    def apply(self, img: np.ndarray, index: int = 0, beta: float = 0.0, u: float = 0.0, v: float = 0.0,
              **params: Any) -> np.ndarray:
        if beta == 0:
            return img
        trg = self._target_like(img, index, u, v)
        src = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img
        out = fda(src, trg.astype(np.float32), beta, channel_axis=-1 if img.ndim == 3 else None)
        if self.scale == "percentile":  # the working scale is [0, 1]: later transforms rely on it
            out = np.clip(out, 0.0, 1.0)
        if img.dtype == np.uint8:
            return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
        return out.astype(img.dtype, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("beta", "scale")


class FDA(Adaptation):
    """FDA inside :class:`sdk.trainer.Trainer`: each training batch gets random target styles.

    Every source image of a batch is, with probability ``p``, replaced by :func:`fda` of itself
    with a randomly drawn target image (same shape as the training crops: give target crops of
    that size). Validation data are untouched.

    Parameters
    ----------
    target : tensor (N, C, H, W), Dataset or sequence of (C, H, W) images
    beta : float
    p : float
        Fraction of the batch images adapted.
    """

    name = "fda"

    def __init__(self, target: Any, beta: float = 0.01, p: float = 1.0) -> None:
        fda_beta_size((1, 1), beta)
        self.sampler = _TargetSampler(target)
        self.beta, self.p = float(beta), float(p)

    def start(self, total_steps: int, seed: int) -> None:
        self.sampler.seed(seed)

    def adapt_batch(self, x: torch.Tensor, y: Any, progress: float) -> tuple[torch.Tensor, Any]:
        trg = self.sampler.draw(x.shape[0]).to(x.device)
        if trg.shape != x.shape:
            raise AdaptError(f"FDA target images {tuple(trg.shape[1:])} differ from the training crops "
                             f"{tuple(x.shape[1:])}")
        keep = torch.rand(x.shape[0], generator=self.sampler.generator) >= self.p
        out = fda(x, trg, self.beta)
        out[keep.to(x.device)] = x[keep.to(x.device)]
        return out, y
