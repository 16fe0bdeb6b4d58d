"""Shortcut diagnostics: where does a model look?

A network trained on synthetic micrographs can learn shortcuts that do not transfer: the image
border (padding artefacts, edge-of-field effects), the data bar that SEMs burn into the bottom of
a micrograph, or vignetted (darker) corners. This module computes attribution maps —
Grad-CAM (Selvaraju et al. 2017; for segmentation the score is the class logit summed over a
region, as in Seg-Grad-CAM, Vinogradova et al. 2020) or the plain input gradient — and reports
how much attribution falls on each of those regions compared with the region's share of the
image (``enrichment`` = attribution fraction / area fraction; 1 means "no preference"), and how
much falls on the structure itself (e.g. the true grain boundaries, dilated by a few pixels).

Used by ``twin evaluate --saliency``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from twin.errors import EmtwinError

__all__ = [
    "DiagnoseError",
    "gradcam",
    "input_gradient",
    "region_masks",
    "detect_databar",
    "attribution_report",
    "diagnose_segmentation",
    "diagnose_classification",
    "saliency_png",
]

REGIONS = ("border", "databar", "corners")


class DiagnoseError(EmtwinError):
    """Bad input to a diagnostic (unknown layer, wrong image shape)."""


def _as_batch(images: Any, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not isinstance(images, torch.Tensor) else images
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise DiagnoseError(f"images must be (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    return x.float().to(device)


def _resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    if layer is None:
        from sdk.transfer import model_blocks

        backbone = [b for b in model_blocks(model) if b.role == "backbone"]
        if not backbone:
            raise DiagnoseError("the model has no backbone block: pass layer= explicitly")
        return backbone[-1].module
    mods = dict(model.named_modules())
    if layer not in mods:
        raise DiagnoseError(f"the model has no layer {layer!r}")
    return mods[layer]


def _score(logits: torch.Tensor, target_class: int, region: torch.Tensor | None,
           score: str = "logprob") -> torch.Tensor:
    """Scalar score per batch item: the class score (classification) or its sum over a region.

    ``"logprob"`` explains the log-softmax of the class — the evidence *for it against the other
    classes* — and ``"logit"`` the raw logit, which also rewards evidence every class shares.
    """
    if score not in ("logprob", "logit"):
        raise DiagnoseError(f"score {score!r} is not known (logprob or logit)")
    s = logits.log_softmax(1) if score == "logprob" else logits
    if logits.dim() == 2:
        return s[:, target_class]
    z = s[:, target_class]
    if region is None:
        pred = logits.argmax(1) == target_class
        # images where nothing is predicted as the class: use every pixel
        empty = pred.flatten(1).sum(1) == 0
        region = pred | empty[:, None, None]
    return (z * region.to(z.dtype)).flatten(1).sum(1)


def _score_backward(model: nn.Module, images: Any, target_class: int, region: Any,
                    device: str | torch.device | None, score: str) -> torch.Tensor:
    """Forward ``images`` in eval mode and backpropagate the summed class score.

    Returns the input batch (its ``.grad`` set); the model's train/eval mode is restored.
    """
    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    x = _as_batch(images, device).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x)
            reg = None if region is None else torch.as_tensor(np.asarray(region, dtype=bool), device=device)
            if reg is not None and reg.dim() == 2:
                reg = reg[None]
            total = _score(logits.float(), target_class, reg, score).sum()
            model.zero_grad(set_to_none=True)
            total.backward()
    finally:
        model.train(was_training)
    return x


def gradcam(model: nn.Module, images: Any, target_class: int = 1, layer: str | nn.Module | None = None,
            region: Any = None, device: str | torch.device | None = None, score: str = "logprob") -> np.ndarray:
    """Grad-CAM maps at the input's resolution.

    Parameters
    ----------
    model : nn.Module
        Segmentation model (logits ``(B, K, H, W)``) or classifier (logits ``(B, K)``).
    images : array or tensor, (C, H, W) or (B, C, H, W)
    target_class : int
        Class whose score is explained.
    layer : str or nn.Module, optional
        Layer whose activations are weighted (default: the last backbone block, from
        :func:`sdk.transfer.model_blocks`).
    region : bool array (B, H, W), optional
        Pixels whose class logits are summed for segmentation (default: pixels predicted as
        ``target_class``, or all pixels if none is).
    device : optional
        Default: the model's device.
    score : {"logprob", "logit"}
        Explain the class log-probability (default) or the raw logit.

    Returns
    -------
    ndarray (B, H, W) float32
        Non-negative maps (ReLU of the gradient-weighted activations), bilinearly upsampled.
    """
    target = _resolve_layer(model, layer)
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        t = out[-1] if isinstance(out, (list, tuple)) else out
        t.retain_grad()
        store["a"] = t

    handle = target.register_forward_hook(hook)
    try:
        x = _score_backward(model, images, target_class, region, device, score)
    finally:
        handle.remove()
    a = store.get("a")
    if a is None or a.grad is None:
        raise DiagnoseError("the chosen layer took no part in the forward pass (no activations/gradients)")
    weights = a.grad.mean(dim=(-2, -1), keepdim=True)
    cam = F.relu((weights * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam.detach().cpu().numpy().astype(np.float32)


def input_gradient(model: nn.Module, images: Any, target_class: int = 1, region: Any = None,
                   device: str | torch.device | None = None, score: str = "logprob") -> np.ndarray:
    """Vanilla saliency: ``|d score / d image|``, maximum over channels, ``(B, H, W)``."""
    x = _score_backward(model, images, target_class, region, device, score)
    return x.grad.abs().amax(1).cpu().numpy().astype(np.float32)


def detect_databar(image: Any, min_rows: int = 3, max_fraction: float = 0.25, flat: float = 0.5) -> int:
    """Height in rows of a data bar at the bottom of a micrograph (0 if none).

    A data-bar row is one where at least ``flat`` of the pixels share the row's most common
    (8-bit quantised) value — a uniform strip with text on it — unlike the noisy image above.
    Rows are counted upwards from the bottom; fewer than ``min_rows`` count as no bar.
    """
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3:
        a = a.mean(0)
    lo, hi = float(a.min()), float(a.max())
    q = np.round((a - lo) / max(hi - lo, 1e-12) * 255).astype(np.int64)
    rows = 0
    for r in range(a.shape[0] - 1, int(a.shape[0] * (1 - max_fraction)) - 1, -1):
        counts = np.bincount(q[r], minlength=256)
        if counts.max() / q.shape[1] >= flat:
            rows += 1
        else:
            break
    return rows if rows >= min_rows else 0


def region_masks(shape: tuple[int, int], border: float = 0.05, databar: int = 0,
                 corner_radius: float = 1.0) -> dict[str, np.ndarray]:
    """Boolean masks of the shortcut-prone regions of an ``(H, W)`` image.

    Parameters
    ----------
    shape : (H, W)
    border : float
        Width of the border strip: a fraction of the shorter side if < 1, else pixels.
    databar : int
        Height of the data bar at the bottom (rows); 0 for none (no ``databar`` mask then).
    corner_radius : float
        Corners are the pixels farther from the centre than ``corner_radius`` times half the
        shorter side (1.0: outside the inscribed circle, where vignetting darkens an image).
    """
    h, w = int(shape[0]), int(shape[1])
    b = max(1, int(round(border * min(h, w)))) if border < 1 else int(border)
    out: dict[str, np.ndarray] = {}
    m = np.zeros((h, w), bool)
    m[:b], m[-b:], m[:, :b], m[:, -b:] = True, True, True, True
    out["border"] = m
    if databar > 0:
        d = np.zeros((h, w), bool)
        d[h - int(databar):] = True
        out["databar"] = d
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) / (min(h, w) / 2)
    out["corners"] = r > corner_radius
    return out


def attribution_report(attr: Any, regions: Mapping[str, Any], structure: Any = None) -> dict[str, dict[str, float]]:
    """Share of the (non-negative) attribution in each region, vs the region's share of the image.

    Returns
    -------
    dict
        ``{region: {"fraction", "area", "enrichment"}}``, plus ``"structure"`` when given.
        With an all-zero map every fraction is 0 and enrichment NaN.
    """
    a = np.clip(np.asarray(attr, dtype=np.float64), 0, None)
    total = a.sum()
    masks = dict(regions)
    if structure is not None:
        masks = {"structure": np.asarray(structure, bool), **masks}
    out = {}
    for name, m in masks.items():
        m = np.asarray(m, bool)
        if m.shape != a.shape:
            raise DiagnoseError(f"region {name!r} has shape {m.shape}, the attribution map {a.shape}")
        frac = float(a[m].sum() / total) if total > 0 else 0.0
        area = float(m.mean())
        out[name] = {"fraction": frac, "area": area,
                     "enrichment": frac / area if (area > 0 and total > 0) else float("nan")}
    return out


def _summarise(per_image: list[dict[str, dict[str, float]]], threshold: float, min_fraction: float
               ) -> tuple[dict[str, dict[str, float]], list[str]]:
    names = sorted({k for r in per_image for k in r})
    mean = {}
    for k in names:
        rows = [r[k] for r in per_image if k in r]
        mean[k] = {}
        for f in ("fraction", "area", "enrichment"):
            vals = [r[f] for r in rows if np.isfinite(r[f])]
            mean[k][f] = float(np.mean(vals)) if vals else float("nan")
    flags = []
    for k in REGIONS:
        if k in mean:
            m = mean[k]
            if m["enrichment"] > threshold and m["fraction"] > min_fraction:
                flags.append(f"{k}: {m['fraction']:.0%} of the attribution on {m['area']:.0%} of the image "
                             f"(x{m['enrichment']:.1f})")
    return mean, flags


def _diagnose(model: nn.Module, images: Sequence[Any], structures: Sequence[Any] | None, target_class: int,
              method: str, layer: Any, border: float, databar: int | str, corner_radius: float,
              device: Any, threshold: float, min_fraction: float, dilate: int) -> dict[str, Any]:
    if method not in ("gradcam", "gradient"):
        raise DiagnoseError(f"method {method!r} is not known (gradcam or gradient)")
    per_image, maps = [], []
    for k, img in enumerate(images):
        img = np.asarray(img, dtype=np.float32)
        if method == "gradcam":
            m = gradcam(model, img, target_class, layer=layer, device=device)[0]
        else:
            m = input_gradient(model, img, target_class, device=device)[0]
        bar = detect_databar(img) if databar == "auto" else int(databar)
        regions = region_masks(m.shape, border=border, databar=bar, corner_radius=corner_radius)
        struct = None
        if structures is not None:
            struct = np.asarray(structures[k], bool)
            if dilate > 0 and struct.any():
                struct = ndimage.binary_dilation(struct, iterations=dilate)
        per_image.append(attribution_report(m, regions, struct))
        maps.append(m)
    mean, flags = _summarise(per_image, threshold, min_fraction)
    return {"method": method, "target_class": target_class, "per_image": per_image, "mean": mean,
            "flags": flags, "maps": maps}


def diagnose_segmentation(model: nn.Module, images: Sequence[Any], structures: Sequence[Any] | None = None,
                          target_class: int = 1, method: str = "gradcam", layer: Any = None,
                          border: float = 0.05, databar: int | str = "auto", corner_radius: float = 1.0,
                          device: Any = None, threshold: float = 2.0, min_fraction: float = 0.05,
                          dilate: int = 2) -> dict[str, Any]:
    """Attribution report of a segmentation model over images.

    Parameters
    ----------
    images : sequence of (C, H, W) arrays
    structures : sequence of bool (H, W) arrays, optional
        The structure the model should look at (e.g. true boundaries), dilated by ``dilate`` px.
    target_class : int
        Class explained (the boundary class).
    method : {"gradcam", "gradient"}
    border, corner_radius : see :func:`region_masks`
    databar : int or "auto"
        Data-bar height, or detect it per image (:func:`detect_databar`).
    threshold, min_fraction : float
        A region is flagged when its enrichment exceeds ``threshold`` and it holds more than
        ``min_fraction`` of the attribution.

    Returns
    -------
    dict
        ``method, target_class, per_image`` (list of region reports), ``mean`` (per region),
        ``flags`` (list of str), ``maps`` (list of (H, W) arrays).
    """
    return _diagnose(model, images, structures, target_class, method, layer, border, databar,
                     corner_radius, device, threshold, min_fraction, dilate)


def diagnose_classification(model: nn.Module, images: Sequence[Any], target_class: int | Sequence[int] = 0,
                            method: str = "gradcam", layer: Any = None, border: float = 0.05,
                            databar: int | str = "auto", corner_radius: float = 1.0, device: Any = None,
                            threshold: float = 2.0, min_fraction: float = 0.05) -> dict[str, Any]:
    """Attribution report of a classifier (see :func:`diagnose_segmentation`).

    ``target_class`` may be one class for all images or one per image (e.g. the predictions).
    """
    if isinstance(target_class, int):
        return _diagnose(model, images, None, target_class, method, layer, border, databar,
                         corner_radius, device, threshold, min_fraction, 0)
    parts = [_diagnose(model, [img], None, int(c), method, layer, border, databar, corner_radius,
                       device, threshold, min_fraction, 0) for img, c in zip(images, target_class)]
    per_image = [p["per_image"][0] for p in parts]
    mean, flags = _summarise(per_image, threshold, min_fraction)
    return {"method": method, "target_class": [int(c) for c in target_class], "per_image": per_image,
            "mean": mean, "flags": flags, "maps": [p["maps"][0] for p in parts]}


def saliency_png(images: Sequence[Any], maps: Sequence[Any], path: str | os.PathLike, tile: int = 192) -> Path:
    """Write image | attribution overlay pairs, one row per image, to a PNG."""
    from PIL import Image

    path = Path(path)
    rows = []
    for img, m in zip(images, maps):
        a = np.asarray(img, dtype=np.float32)
        g = a.mean(0) if a.ndim == 3 else a
        lo, hi = np.percentile(g, (1, 99))
        g = np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)
        h = np.asarray(m, dtype=np.float32)
        h = h / h.max() if h.max() > 0 else h
        over = np.stack([0.5 * g + 0.5 * h, 0.5 * g, 0.5 * g * (1 - h)], -1)
        pair = np.concatenate([np.stack([g] * 3, -1), over], 1)
        im = Image.fromarray((pair * 255).astype(np.uint8)).resize((2 * tile, tile), Image.BILINEAR)
        rows.append(np.asarray(im))
    if not rows:
        raise DiagnoseError("saliency_png got no images")
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    return path
