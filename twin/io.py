"""Reading micrographs for calibration: TIFF/PNG/NumPy and vendor formats.

:func:`read_image` returns an :class:`ImageData`: the frames as an ``(N, H, W)`` array in the file's
own dtype (integer counts stay integers), the pixel size from the metadata (converted to nm) and a
few acquisition facts (dwell time, voltage, detector) that ``twin calibrate`` records.

Formats:

- ``.tif``/``.tiff`` (tifffile; a multi-page file is a stack of frames), ``.png``/``.jpg``/``.bmp``
  (Pillow; colour only if the channels are equal), ``.npy`` (NumPy, 2-D or a 3-D stack);
- ``.dm3``/``.dm4`` (Gatan), ``.emd`` (Berkeley and Thermo Velox), ``.ser``/``.emi`` (FEI TIA),
  ``.mrc`` through ncempy (``ncempy.io.read``; for a Velox file with several detectors, the first
  image dataset, as ncempy reads it); rosettasciio, if installed, is tried for other extensions.

Every failure a user can cause (missing file, not an image, a spectrum instead of an image, a
colour image, a wrong dtype) raises :class:`ImageReadError` with what is wrong and how to fix it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twin.errors import EmtwinError

__all__ = ["ImageData", "ImageReadError", "read_image", "as_frames", "IMAGE_SUFFIXES",
           "VENDOR_SUFFIXES"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".npy")
VENDOR_SUFFIXES = (".dm3", ".dm4", ".emd", ".ser", ".emi", ".mrc")

_TO_NM = {"m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "μm": 1e3, "nm": 1.0, "n_m": 1.0,
          "a": 0.1, "å": 0.1, "angstrom": 0.1, "pm": 1e-3}


class ImageReadError(EmtwinError):
    """A file that cannot be used as a micrograph (missing, unreadable, not an image, bad dtype)."""


@dataclass
class ImageData:
    """Frames of one file and what its metadata says about them.

    Attributes
    ----------
    frames : ndarray (N, H, W)
        The image data in the file's dtype (N = 1 for a single image).
    path : str
    pixel_size_nm : float or None
        Pixel size from the metadata, converted to nm (None when the file has none, or it is
        a reciprocal-space calibration).
    metadata : dict
        Small JSON-ready subset: ``format``, ``dwell_time_s``, ``voltage_kv``, ``detector``,
        ``kind_hint`` (``stem``/``tem``/``sem``/``optical`` when the metadata says so).
    """

    frames: np.ndarray
    path: str
    pixel_size_nm: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.frames.shape[1]), int(self.frames.shape[2])


def _pixel_size_nm(size, unit) -> float | None:
    try:
        s = float(np.ravel(size)[-1])
        u = str(np.ravel(unit)[-1] if not isinstance(unit, str) else unit).strip().lower()
    except (TypeError, ValueError, IndexError):
        return None
    if not np.isfinite(s) or s <= 0 or u not in _TO_NM:
        return None
    return s * _TO_NM[u]


def as_frames(array: Any, source: str = "<array>") -> np.ndarray:
    """Validate an image array and return it as ``(N, H, W)`` frames (dtype kept).

    Accepts a real 2-D image, a 3-D stack of frames, or a grey RGB(A) image whose colour channels
    are equal (last axis 3 or 4).

    Raises
    ------
    ImageReadError
        Wrong dtype (bool, complex, object, strings), wrong number of dimensions, a colour image,
        non-finite values or an image smaller than 16 x 16 px.
    """
    a = np.asarray(array)
    if a.dtype == bool or a.dtype.kind not in "iuf":
        raise ImageReadError(
            f"{source}: an image of dtype {a.dtype} cannot be calibrated: give detector counts as "
            "an integer (uint8/uint16/int16/...) or real float array")
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] > 4:
        rgb = a[..., :3]
        if a.shape[-1] == 4 and np.ptp(a[..., 3]) != 0:
            raise ImageReadError(f"{source}: an RGBA image with a varying alpha channel is not a "
                                 "micrograph: save the detector image as a grey TIFF")
        grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        if not grey:
            raise ImageReadError(
                f"{source}: a colour image cannot be calibrated as one detector: calibrate one "
                "channel at a time (save it as a grey image) or give the raw detector frames")
        a = rgb[..., 0]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ImageReadError(f"{source}: expected a 2-D image or a 3-D stack of frames, got an "
                             f"array of shape {a.shape}")
    if a.shape[1] < 16 or a.shape[2] < 16:
        raise ImageReadError(f"{source}: the image is {a.shape[1]}x{a.shape[2]} px; calibration "
                             "needs at least 16x16 px (better 256x256 or more)")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ImageReadError(f"{source}: the image contains NaN or infinite values: give the raw "
                             "detector counts")
    return a


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            frames = []
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                frames.append(np.array(im))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: not a readable image file ({exc})") from None
    return frames[0] if len(frames) == 1 else np.stack(frames)


def _read_tiff(path: Path) -> tuple[np.ndarray, float | None]:
    try:
        import tifffile
    except ImportError:  # pragma: no cover - tifffile is a dependency
        return _read_pillow(path), None
    try:
        with tifffile.TiffFile(path) as tf:
            data = tf.asarray()
            px = None
            page = tf.pages[0]
            ij = tf.imagej_metadata or {}
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(getattr(tags["ResolutionUnit"].value, "value",
                                   tags["ResolutionUnit"].value))
                if num > 0 and den > 0:
                    per = den / num  # length per pixel
                    if unit == 3:  # cm
                        px = per * 1e7
                    elif unit == 2 and ij.get("unit") in ("nm", "micron", "um", "µm"):
                        px = per * (1.0 if ij["unit"] == "nm" else 1e3)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError) as exc:
        raise ImageReadError(f"{path}: not a readable TIFF file ({exc})") from None
    return data, px


def _ncempy_read(path: Path) -> dict:
    import ncempy.io as nio

    suffix = path.suffix.lower()
    target = path
    if suffix == ".emi":
        cands = sorted(path.parent.glob(path.stem + "_*.ser"))
        if not cands:
            raise ImageReadError(f"{path}: a TIA .emi file holds only metadata; its data file "
                                 f"'{path.stem}_1.ser' was not found next to it")
        target = cands[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = nio.read(target)
        except ImageReadError:
            raise
        except Exception as exc:  # vendor readers raise many types on corrupt files
            raise ImageReadError(f"{path}: cannot read this {suffix} file with ncempy "
                                 f"({type(exc).__name__}: {exc})") from None
    if not isinstance(out, dict) or "data" not in out:
        raise ImageReadError(f"{path}: ncempy found no image data in this file")
    return out


def _read_vendor(path: Path) -> tuple[np.ndarray, float | None, dict]:
    d = _ncempy_read(path)
    data = np.asarray(d["data"])
    px = _pixel_size_nm(d.get("pixelSize"), d.get("pixelUnit", "")) if "pixelSize" in d else None
    meta: dict[str, Any] = {"format": path.suffix.lower().lstrip(".")}
    md = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
    dwell = md.get("DwellTimePath") or d.get("dwellTime")
    try:
        if dwell is not None and float(dwell) > 0:
            meta["dwell_time_s"] = float(dwell)
    except (TypeError, ValueError):
        pass
    kv = md.get("High tension [kV]")
    if kv is not None:
        try:
            meta["voltage_kv"] = float(kv)
        except (TypeError, ValueError):
            pass
    det = d.get("detectorName")
    if det:
        meta["detector"] = str(det)
    if "dwell_time_s" in meta:
        meta["kind_hint"] = "stem"
    elif det and any(k in str(det).lower() for k in ("ceta", "camera", "k2", "k3", "falcon")):
        meta["kind_hint"] = "tem"
    # a spectrum (1 x N, or 1-D) is not an image
    if data.ndim == 1 or (data.ndim == 2 and min(data.shape) == 1):
        raise ImageReadError(
            f"{path}: this file holds a spectrum of shape {data.shape}, not an image: give "
            "image files (or dark frames) of the detector to calibrate")
    return data, px, meta


def read_image(path: str | Path) -> ImageData:
    """Read a micrograph (or a stack of frames) and its pixel size.

    Raises
    ------
    ImageReadError
        The file is missing, unreadable, not an image, or of a dtype that cannot be calibrated.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: file not found")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a directory; give image files")
    suffix = p.suffix.lower()
    px: float | None = None
    meta: dict[str, Any] = {"format": suffix.lstrip(".")}
    if suffix in (".tif", ".tiff"):
        data, px = _read_tiff(p)
    elif suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        data = _read_pillow(p)
    elif suffix == ".npy":
        try:
            data = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ImageReadError(f"{p}: not a readable .npy array ({exc})") from None
    elif suffix in VENDOR_SUFFIXES:
        data, px, meta = _read_vendor(p)
    else:
        data = _read_other(p)
    frames = as_frames(data, str(p))
    return ImageData(frames=frames, path=str(p), pixel_size_nm=px, metadata=meta)


def _read_other(p: Path) -> np.ndarray:
    """Last resort: rosettasciio (if installed), else Pillow; else a clear error."""
    try:
        from rsciio import IO_PLUGINS  # type: ignore[import-not-found]
    except ImportError:
        IO_PLUGINS = None
    if IO_PLUGINS is not None:
        import importlib

        ext = p.suffix.lower().lstrip(".")
        for plugin in IO_PLUGINS:
            if ext in [e.lower() for e in plugin.get("file_extensions", [])]:
                try:
                    mod = importlib.import_module(plugin["api"])
                    out = mod.file_reader(str(p))
                    return np.asarray(out[0]["data"])
                except Exception:  # noqa: BLE001 - fall through to the clear error below
                    break
    try:
        return _read_pillow(p)
    except ImageReadError:
        pass
    raise ImageReadError(
        f"{p}: not an image file emtwin can read; supported: "
        f"{', '.join(IMAGE_SUFFIXES + VENDOR_SUFFIXES)} (install rosettasciio for other "
        "vendor formats)")
