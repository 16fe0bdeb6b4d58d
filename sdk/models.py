"""Segmentation and classification models: a compact U-Net and adapters for external encoders.

Every model here is described by a plain ``config`` dict (str/int/float/bool/list values only) so
that a checkpoint can store it and :func:`build_model` can rebuild the same architecture later;
weights then come from the checkpoint's ``state_dict``. Nothing in this module downloads weights:
an external encoder (torchvision, timm, segmentation_models_pytorch, or any importable factory)
is built without weights and, if asked, filled from a *local file* (:func:`load_encoder_weights`).
torchvision, timm and segmentation_models_pytorch are optional and imported only when a config
names them.

Models expose :meth:`transfer_blocks`, the ordered list ``[(name, module, role), ...]`` from the
input to the output with ``role`` in ``{"backbone", "head"}``; :mod:`sdk.transfer` freezes,
unfreezes and grades learning rates along that list.

Config keys (``arch`` selects the class)::

    {"arch": "unet", "in_channels": 1, "num_classes": 2, "depth": 4, "width": 32,
     "norm": "batch", "dropout": 0.0, "upsample": "transpose"}
    {"arch": "encoder_unet", "encoder": {"source": "conv", ...} | {"source": "timm", "name": ...},
     "num_classes": 2, "decoder_width": 32, "norm": "batch"}
    {"arch": "classifier", "encoder": {...}, "num_classes": 2, "dropout": 0.0}
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from twin.errors import EmtwinError

__all__ = [
    "ModelError",
    "NORMS",
    "ConvEncoder",
    "UNet",
    "EncoderUNet",
    "Classifier",
    "build_model",
    "build_encoder",
    "load_encoder_weights",
    "count_parameters",
    "unet_config",
    "model_config",
]

NORMS = ("batch", "group", "instance", "none")
UPSAMPLES = ("transpose", "bilinear")


class ModelError(EmtwinError):
    """A model config, encoder or weights file that the user can fix (one line)."""


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ModelError(f"norm {kind!r} is not allowed (choose one of {', '.join(NORMS)})")


class ConvBlock(nn.Sequential):
    """Two ``3x3 conv -> norm -> ReLU`` layers (the U-Net double convolution).

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    norm : str
        One of :data:`NORMS`.
    dropout : float
        Spatial dropout probability after the block (0 disables it).
    """

    def __init__(self, c_in: int, c_out: int, norm: str = "batch", dropout: float = 0.0) -> None:
        bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), _norm(norm, c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias), _norm(norm, c_out), nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class ConvEncoder(nn.Module):
    """A plain convolutional encoder that returns one feature map per scale.

    Block 0 works at full resolution; each further block halves the resolution (max-pool) and
    doubles the width. ``forward`` returns the list of all block outputs, input scale first.

    Parameters
    ----------
    in_channels : int
        Image channels.
    depth : int
        Number of blocks (>= 1); the deepest map is ``2**(depth-1)`` times smaller.
    width : int
        Channels of block 0.
    norm : str
        One of :data:`NORMS`.
    dropout : float
        Dropout after the deepest block.
    """

    def __init__(self, in_channels: int = 1, depth: int = 4, width: int = 32, norm: str = "batch",
                 dropout: float = 0.0) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("depth", depth, 1, 8)
        _check_int("width", width, 1)
        self.channels = [width * 2**i for i in range(depth)]
        blocks = []
        c = in_channels
        for i, w in enumerate(self.channels):
            blocks.append(ConvBlock(c, w, norm, dropout if i == depth - 1 else 0.0))
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.reduction = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats


class UpBlock(nn.Module):
    """Upsample the deeper map to the skip's size, concatenate, double convolution."""

    def __init__(self, c_deep: int, c_skip: int, c_out: int, norm: str, upsample: str) -> None:
        super().__init__()
        if upsample == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(c_deep, c_deep // 2 or 1, 2, stride=2)
            c_up = c_deep // 2 or 1
        elif upsample == "bilinear":
            self.up = nn.Conv2d(c_deep, c_deep // 2 or 1, 1)
            c_up = c_deep // 2 or 1
        else:
            raise ModelError(f"upsample {upsample!r} is not allowed (choose one of {', '.join(UPSAMPLES)})")
        self.mode = upsample
        self.conv = ConvBlock(c_up + c_skip, c_out, norm)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.mode == "bilinear":
            deep = F.interpolate(deep, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            deep = self.up(deep)
        else:
            deep = self.up(deep)
            if deep.shape[-2:] != skip.shape[-2:]:
                deep = F.interpolate(deep, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([deep, skip], dim=1))


class UNetDecoder(nn.Module):
    """U-Net decoder over a list of encoder feature maps (input scale first).

    Parameters
    ----------
    encoder_channels : sequence of int
        Channels of each encoder map, shallow to deep.
    decoder_channels : sequence of int, optional
        Output channels of each up block, deep to shallow (default: the skip's channels).
    norm, upsample : str
        Normalisation and upsampling mode.
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int] | None = None,
                 norm: str = "batch", upsample: str = "transpose") -> None:
        super().__init__()
        enc = list(encoder_channels)
        skips = enc[:-1][::-1]
        if decoder_channels is None:
            decoder_channels = skips
        decoder_channels = list(decoder_channels)
        if len(decoder_channels) != len(skips):
            raise ModelError(f"decoder needs {len(skips)} widths, got {len(decoder_channels)}")
        blocks = []
        c = enc[-1]
        for c_skip, c_out in zip(skips, decoder_channels):
            blocks.append(UpBlock(c, c_skip, c_out, norm, upsample))
            c = c_out
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = c

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = block(x, skip)
        return x


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ModelError(f"model {name} must be an int {rng}, got {value!r}")


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if (ph < h and pw < w) else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """A compact U-Net with configurable depth, width and normalisation.

    Inputs of any size are accepted: they are padded (reflection) to a multiple of
    ``2**(depth-1)`` and the logits are cropped back to the input size.

    Parameters
    ----------
    in_channels : int
        Image channels (1 for grey micrographs).
    num_classes : int
        Output channels (logits); 2 for a binary boundary/background task.
    depth : int
        Number of resolution levels (encoder blocks), 1-8.
    width : int
        Channels at full resolution; doubled at every level.
    norm : {"batch", "group", "instance", "none"}
        Normalisation layer.
    dropout : float
        Dropout after the bottleneck.
    upsample : {"transpose", "bilinear"}
        Learned transposed convolution or bilinear interpolation + 1x1 conv.

    Examples
    --------
    >>> net = UNet(in_channels=1, num_classes=2, depth=3, width=8)
    >>> net(torch.zeros(1, 1, 50, 70)).shape
    torch.Size([1, 2, 50, 70])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, depth: int = 4, width: int = 32,
                 norm: str = "batch", dropout: float = 0.0, upsample: str = "transpose") -> None:
        super().__init__()
        _check_int("num_classes", num_classes, 1)
        if norm not in NORMS:
            raise ModelError(f"norm {norm!r} is not allowed (choose one of {', '.join(NORMS)})")
        self.config = unet_config(in_channels=in_channels, num_classes=num_classes, depth=depth,
                                  width=width, norm=norm, dropout=dropout, upsample=upsample)
        self.encoder = ConvEncoder(in_channels, depth, width, norm, dropout)
        self.decoder = UNetDecoder(self.encoder.channels, norm=norm, upsample=upsample)
        self.head = nn.Conv2d(self.decoder.out_channels, num_classes, 1)
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = _pad_to_multiple(x, self.encoder.reduction)
        logits = self.head(self.decoder(self.encoder(x)))
        return logits[..., :h, :w]

    def transfer_blocks(self) -> list[tuple[str, nn.Module, str]]:
        """``[(name, module, role)]`` from input to output; encoder blocks are the backbone."""
        out = [(f"encoder.blocks.{i}", b, "backbone") for i, b in enumerate(self.encoder.blocks)]
        out += [(f"decoder.blocks.{i}", b, "head") for i, b in enumerate(self.decoder.blocks)]
        out.append(("head", self.head, "head"))
        return out


def _feature_list(out: Any, drop_first: bool = False) -> list[torch.Tensor]:
    """Normalise an encoder's output (list, tuple, dict or tensor) to a list of 4-D maps."""
    if isinstance(out, Mapping):
        out = list(out.values())
    elif isinstance(out, torch.Tensor):
        out = [out]
    out = [f for f in out if isinstance(f, torch.Tensor) and f.dim() == 4]
    return out[1:] if drop_first else out


class EncoderUNet(nn.Module):
    """A U-Net decoder on any encoder that returns a list (or dict) of feature maps.

    This is the adapter for external backbones: a timm model made with ``features_only=True``,
    a torchvision feature extractor (dict of maps), a segmentation_models_pytorch encoder (list
    whose first item is the input itself, dropped automatically when it has the input's size and
    channels), or any user module. Feature maps may have any strides; each decoder stage
    resizes the deeper map to the skip's size, and the logits are resized to the input size.

    Parameters
    ----------
    encoder : nn.Module
        Returns a list/tuple/dict of ``(B, C_i, H_i, W_i)`` maps, shallow to deep.
    num_classes : int
        Output channels.
    in_channels : int
        Channels of the images the encoder takes (used to probe its output channels).
    decoder_width : int
        Channels of the shallowest decoder stage (doubled per level upwards, capped at 256).
    norm, upsample : str
        Decoder normalisation and upsampling mode.
    encoder_config : dict, optional
        How to rebuild ``encoder`` (stored in :attr:`config`); without it the model cannot be
        rebuilt by :func:`build_model` from a checkpoint.
    blocks : sequence of str, optional
        Dotted names of the encoder's sub-modules in input-to-output order, for
        :mod:`sdk.transfer` (default: the encoder's top-level children).
    probe_size : int
        Side of the dummy input used to probe the encoder's channels.
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 2, in_channels: int = 1,
                 decoder_width: int = 32, norm: str = "batch", upsample: str = "bilinear",
                 encoder_config: Mapping[str, Any] | None = None, blocks: Sequence[str] | None = None,
                 probe_size: int = 64) -> None:
        super().__init__()
        _check_int("num_classes", num_classes, 1)
        self.encoder = encoder
        channels, drop_first = _probe_encoder(encoder, in_channels, probe_size)
        self._drop_first = drop_first
        n = len(channels)
        widths = [min(decoder_width * 2**i, 256) for i in range(n - 1)][::-1]
        self.decoder = UNetDecoder(channels, widths if n > 1 else [], norm=norm, upsample=upsample)
        self.head = nn.Conv2d(self.decoder.out_channels, num_classes, 1)
        self.encoder_channels = channels
        self.in_channels = in_channels
        self.num_classes = num_classes
        self._block_names = list(blocks) if blocks else None
        self.config = {"arch": "encoder_unet", "encoder": dict(encoder_config or {}),
                       "num_classes": num_classes, "in_channels": in_channels,
                       "decoder_width": decoder_width, "norm": norm, "upsample": upsample,
                       "blocks": list(blocks) if blocks else None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = _feature_list(self.encoder(x), self._drop_first)
        y = self.head(self.decoder(feats))
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y

    def transfer_blocks(self) -> list[tuple[str, nn.Module, str]]:
        out = [(f"encoder.{n}", m, "backbone") for n, m in _encoder_blocks(self.encoder, self._block_names)]
        out += [(f"decoder.blocks.{i}", b, "head") for i, b in enumerate(self.decoder.blocks)]
        out.append(("head", self.head, "head"))
        return out


class Classifier(nn.Module):
    """Image classifier: an encoder, global average pooling of its deepest map, a linear head.

    Parameters
    ----------
    encoder : nn.Module
        Returns a list/dict of feature maps (e.g. :class:`ConvEncoder`) or a single map.
    num_classes : int
        Number of classes.
    in_channels : int
        Image channels (for probing the encoder).
    dropout : float
        Dropout before the linear layer.
    encoder_config : dict, optional
        How to rebuild ``encoder`` (stored in :attr:`config`).
    blocks : sequence of str, optional
        Encoder sub-module names for :mod:`sdk.transfer` (default: top-level children).
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 2, in_channels: int = 1,
                 dropout: float = 0.0, encoder_config: Mapping[str, Any] | None = None,
                 blocks: Sequence[str] | None = None, probe_size: int = 64) -> None:
        super().__init__()
        _check_int("num_classes", num_classes, 1)
        self.encoder = encoder
        channels, drop_first = _probe_encoder(encoder, in_channels, probe_size)
        self._drop_first = drop_first
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(channels[-1], num_classes)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self._block_names = list(blocks) if blocks else None
        self.config = {"arch": "classifier", "encoder": dict(encoder_config or {}),
                       "num_classes": num_classes, "in_channels": in_channels, "dropout": dropout,
                       "blocks": list(blocks) if blocks else None}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled deepest features ``(B, C)``."""
        return _feature_list(self.encoder(x), self._drop_first)[-1].mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def transfer_blocks(self) -> list[tuple[str, nn.Module, str]]:
        out = [(f"encoder.{n}", m, "backbone") for n, m in _encoder_blocks(self.encoder, self._block_names)]
        out.append(("head", self.head, "head"))
        return out


def _encoder_blocks(encoder: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    if names:
        mods = dict(encoder.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise ModelError(f"encoder has no sub-module(s) {', '.join(missing)}")
        return [(n, mods[n]) for n in names]
    if isinstance(encoder, ConvEncoder):
        return [(f"blocks.{i}", b) for i, b in enumerate(encoder.blocks)]
    children = [(n, m) for n, m in encoder.named_children() if any(True for _ in m.parameters())]
    if len(children) == 1 and not any(True for _ in encoder.parameters(recurse=False)):
        # a wrapper around one model (e.g. torchvision's feature extractor): look one level down
        inner_name, inner = children[0]
        sub = [(f"{inner_name}.{n}", m) for n, m in inner.named_children()
               if any(True for _ in m.parameters())]
        if len(sub) > 1:
            return sub
    return children


@torch.no_grad()
def _probe_encoder(encoder: nn.Module, in_channels: int, size: int) -> tuple[list[int], bool]:
    """Channels of each feature map the encoder returns, probed with a zero image."""
    was_training = encoder.training
    encoder.eval()
    try:
        dummy = torch.zeros(1, in_channels, size, size,
                            device=next((p.device for p in encoder.parameters()), torch.device("cpu")))
        feats = _feature_list(encoder(dummy))
    except Exception as exc:  # noqa: BLE001 - any failure of a user's encoder, reported in one line
        raise ModelError(f"the encoder failed on a {in_channels}x{size}x{size} probe image: {exc}") from exc
    finally:
        encoder.train(was_training)
    if not feats:
        raise ModelError("the encoder returned no 4-D feature maps (it must return a list/dict of (B,C,H,W))")
    drop_first = len(feats) > 1 and feats[0].shape[1] == in_channels and feats[0].shape[-2:] == (size, size)
    if drop_first:  # segmentation_models_pytorch encoders return the input as their first "feature"
        feats = feats[1:]
    return [int(f.shape[1]) for f in feats], drop_first


# --------------------------------------------------------------------------------------------
# Configs and builders
# --------------------------------------------------------------------------------------------


def unet_config(in_channels: int = 1, num_classes: int = 2, depth: int = 4, width: int = 32,
                norm: str = "batch", dropout: float = 0.0, upsample: str = "transpose") -> dict[str, Any]:
    """The config dict of a :class:`UNet` (what :func:`build_model` takes)."""
    return {"arch": "unet", "in_channels": int(in_channels), "num_classes": int(num_classes),
            "depth": int(depth), "width": int(width), "norm": str(norm), "dropout": float(dropout),
            "upsample": str(upsample)}


def _import_optional(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install (torchvision vs torch mismatch)
        raise ModelError(f"{what} needs the optional package {name!r}, which does not import here: "
                         f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc


def build_encoder(spec: Mapping[str, Any], in_channels: int = 1) -> tuple[nn.Module, list[str] | None]:
    """Build an encoder (without downloading anything) from a spec dict.

    Parameters
    ----------
    spec : dict
        ``source`` selects the kind:

        - ``"conv"``: :class:`ConvEncoder` (keys ``depth``, ``width``, ``norm``, ``dropout``).
        - ``"timm"``: ``timm.create_model(name, features_only=True, pretrained=False,
          in_chans=in_channels, **kwargs)``.
        - ``"torchvision"``: ``torchvision.models.<name>(weights=None, **kwargs)`` wrapped by
          ``create_feature_extractor`` with ``return_nodes`` (default for ResNets:
          ``relu, layer1..layer4``).
        - ``"smp"``: ``segmentation_models_pytorch.encoders.get_encoder(name,
          in_channels=in_channels, depth=depth, weights=None)``.
        - ``"python"``: ``factory="package.module:callable"`` called with ``in_channels`` and
          ``kwargs``; it must return an ``nn.Module`` that returns feature maps.

        ``weights`` (optional) is a local file loaded by :func:`load_encoder_weights`.
    in_channels : int
        Image channels.

    Returns
    -------
    encoder : nn.Module
    blocks : list of str or None
        Names of its sub-modules in input-to-output order for :mod:`sdk.transfer`, when known.

    Raises
    ------
    ModelError
        Unknown source, missing optional package, or unreadable weights file.
    """
    spec = dict(spec)
    source = spec.get("source", "conv")
    kwargs = dict(spec.get("kwargs") or {})
    blocks = spec.get("blocks")
    if source == "conv":
        enc: nn.Module = ConvEncoder(in_channels, int(spec.get("depth", 4)), int(spec.get("width", 32)),
                                     str(spec.get("norm", "batch")), float(spec.get("dropout", 0.0)))
    elif source == "timm":
        timm = _import_optional("timm", "encoder source 'timm'")
        enc = timm.create_model(spec["name"], features_only=True, pretrained=False,
                                in_chans=in_channels, **kwargs)
    elif source == "torchvision":
        tvm = _import_optional("torchvision.models", "encoder source 'torchvision'")
        fx = _import_optional("torchvision.models.feature_extraction", "encoder source 'torchvision'")
        model = getattr(tvm, spec["name"])(weights=None, **kwargs)
        nodes = spec.get("return_nodes") or ["relu", "layer1", "layer2", "layer3", "layer4"]
        if in_channels != 3 and hasattr(model, "conv1"):
            old = model.conv1
            model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride,
                                    old.padding, bias=old.bias is not None)
        enc = fx.create_feature_extractor(model, return_nodes={n: n for n in nodes})
        if blocks is None and all(hasattr(model, n) for n in ("conv1", "layer1", "layer4")):
            blocks = ["conv1", "layer1", "layer2", "layer3", "layer4"]
    elif source == "smp":
        smp = _import_optional("segmentation_models_pytorch", "encoder source 'smp'")
        enc = smp.encoders.get_encoder(spec["name"], in_channels=in_channels,
                                       depth=int(spec.get("depth", 5)), weights=None, **kwargs)
    elif source == "python":
        factory = spec.get("factory", "")
        mod_name, _, attr = str(factory).partition(":")
        if not mod_name or not attr:
            raise ModelError(f"encoder factory {factory!r} must look like 'package.module:callable'")
        try:
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelError(f"encoder factory {factory!r} cannot be imported: {exc}") from exc
        enc = fn(in_channels=in_channels, **kwargs)
        if not isinstance(enc, nn.Module):
            raise ModelError(f"encoder factory {factory!r} returned {type(enc).__name__}, not an nn.Module")
    else:
        raise ModelError(f"encoder source {source!r} is not known "
                         "(choose one of conv, timm, torchvision, smp, python)")
    if spec.get("weights"):
        load_encoder_weights(enc, spec["weights"], strict=bool(spec.get("strict", False)))
    return enc, (list(blocks) if blocks else None)


def load_encoder_weights(module: nn.Module, path: str | os.PathLike, strict: bool = False,
                         prefixes: Iterable[str] = ("module.", "encoder.", "backbone.", "model.")
                         ) -> dict[str, list[str]]:
    """Load weights for ``module`` from a local ``.pt``/``.pth``/``.safetensors`` file.

    The file may hold a plain state dict, or a dict with ``state_dict``/``model`` in it (e.g. an
    emtwin checkpoint). Leading ``prefixes`` are stripped when that makes more keys match.
    URLs are refused: nothing is downloaded.

    Parameters
    ----------
    module : nn.Module
        The module to fill.
    path : path-like
        Local file.
    strict : bool
        Fail unless every key matches (otherwise mismatches are returned).
    prefixes : iterable of str
        Key prefixes to try stripping.

    Returns
    -------
    dict
        ``{"missing": [...], "unexpected": [...]}`` after loading.

    Raises
    ------
    ModelError
        URL, missing/unreadable file, no matching keys, or a strict mismatch.
    """
    text = os.fspath(path)
    if "://" in text:
        raise ModelError(f"weights must be a local file, not a URL ({text}): emtwin never downloads weights")
    p = Path(text)
    if not p.is_file():
        raise ModelError(f"weights file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            st = _import_optional("safetensors.torch", "a .safetensors weights file")
            state = st.load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"weights file {p} cannot be read: {exc}".splitlines()[0]) from exc
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ModelError(f"weights file {p} holds no state dict")
    own = module.state_dict()
    best = dict(state)
    best_hits = len(set(best) & set(own))
    for prefix in prefixes:
        cand = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        hits = len(set(cand) & set(own))
        if hits > best_hits:
            best, best_hits = cand, hits
    if best_hits == 0:
        raise ModelError(f"weights file {p}: none of its {len(state)} keys match the encoder")
    shape_bad = [k for k in best if k in own and tuple(best[k].shape) != tuple(own[k].shape)]
    if shape_bad:
        raise ModelError(f"weights file {p}: shape mismatch for {', '.join(shape_bad[:3])}")
    res = module.load_state_dict(best, strict=False)
    out = {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}
    if strict and (out["missing"] or out["unexpected"]):
        raise ModelError(f"weights file {p}: {len(out['missing'])} missing and "
                         f"{len(out['unexpected'])} unexpected keys (strict loading)")
    return out


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build a model from its config dict (as stored in a checkpoint).

    Parameters
    ----------
    config : dict
        ``arch`` is ``"unet"``, ``"encoder_unet"`` or ``"classifier"``; see the module docstring.

    Returns
    -------
    nn.Module
        Freshly initialised (use the global torch RNG; seed it, e.g. inside
        ``torch.random.fork_rng()``, for reproducible initial weights).

    Raises
    ------
    ModelError
        Unknown arch or invalid values.
    """
    cfg = dict(config)
    arch = cfg.pop("arch", "unet")
    if arch == "unet":
        allowed = {"in_channels", "num_classes", "depth", "width", "norm", "dropout", "upsample"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ModelError(f"unet config has unknown key(s) {', '.join(unknown)} "
                             f"(allowed: {', '.join(sorted(allowed))})")
        return UNet(**cfg)
    if arch in ("encoder_unet", "classifier"):
        in_ch = int(cfg.get("in_channels", 1))
        enc, blocks = build_encoder(cfg.get("encoder") or {"source": "conv"}, in_ch)
        blocks = cfg.get("blocks") or blocks
        enc_cfg = dict(cfg.get("encoder") or {"source": "conv"})
        enc_cfg.pop("weights", None)  # the checkpoint's state_dict holds the weights from now on
        if arch == "encoder_unet":
            return EncoderUNet(enc, num_classes=int(cfg.get("num_classes", 2)), in_channels=in_ch,
                               decoder_width=int(cfg.get("decoder_width", 32)),
                               norm=str(cfg.get("norm", "batch")),
                               upsample=str(cfg.get("upsample", "bilinear")),
                               encoder_config=enc_cfg, blocks=blocks)
        return Classifier(enc, num_classes=int(cfg.get("num_classes", 2)), in_channels=in_ch,
                          dropout=float(cfg.get("dropout", 0.0)), encoder_config=enc_cfg, blocks=blocks)
    raise ModelError(f"model arch {arch!r} is not known (choose one of unet, encoder_unet, classifier)")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The rebuildable config of a model from this module.

    Raises
    ------
    ModelError
        If the model carries no config (e.g. an ``EncoderUNet`` built around a bare module).
    """
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, Mapping):
        raise ModelError(f"{type(model).__name__} has no config: it cannot be saved for build_model")
    if cfg.get("arch") in ("encoder_unet", "classifier") and not cfg.get("encoder"):
        raise ModelError("this model's encoder was passed as a module without encoder_config: "
                         "it cannot be rebuilt from a checkpoint")
    return dict(cfg)



# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "emtwin-model"
CHECKPOINT_VERSION = 1
__all__ += ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint",
            "read_checkpoint"]


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
            _check_plain(v, f"{where}[{k}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ModelError(f"checkpoint key {where}.{k!r} must be a str or int")
            _check_plain(v, f"{where}.{k}")
        return
    raise ModelError(f"checkpoint value {where} has type {type(value).__name__} "
                     "(allowed: dict, list, str, int, float, bool, None, tensor)")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **meta: Any) -> Path:
    """Write ``model`` and plain metadata to ``path`` atomically.

    The file holds ``format``, ``format_version``, ``model_config`` (for :func:`build_model`),
    ``state_dict`` (on the CPU) and every keyword in ``meta`` (e.g. ``data`` = label, channels,
    normalisation; ``log`` = the training history). All of it is plain (dicts, lists, str,
    numbers, tensors), so ``torch.load(path, weights_only=True)`` reads it.

    Raises
    ------
    ModelError
        If ``meta`` holds a non-plain value or the model has no config.
    """
    cfg = model_config(model)
    _check_plain(meta, "meta")
    _check_plain(cfg, "model_config")
    blob = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
            "model_config": cfg,
            "state_dict": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}}
    for key in meta:
        if key in blob:
            raise ModelError(f"checkpoint meta may not set {key!r}")
    blob.update(meta)
    out = Path(os.fspath(path))
    if out.parent and not out.parent.exists():
        raise ModelError(f"cannot write {out}: folder {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw content of a checkpoint (``weights_only=True``), validated.

    Raises
    ------
    ModelError
        Missing, unreadable or foreign file, or an unknown format version.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise ModelError(f"model file {p} does not exist")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{p} is not a readable model file: {exc}".splitlines()[0]) from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{p} is not an emtwin model file (no format={CHECKPOINT_FORMAT!r})")
    if blob.get("format_version") != CHECKPOINT_VERSION:
        raise ModelError(f"{p} has model format_version {blob.get('format_version')!r}; "
                         f"this emtwin reads version {CHECKPOINT_VERSION}")
    return blob


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint and load its weights.

    Returns
    -------
    model : nn.Module
        In eval mode, on ``device``.
    meta : dict
        Everything else in the file (``model_config``, ``data``, ``log``, ...).
    """
    blob = read_checkpoint(path)
    model = build_model(blob["model_config"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit the stored model config: "
                         f"{str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, meta
