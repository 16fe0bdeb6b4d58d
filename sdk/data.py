"""PyTorch datasets over emtwin HDF5 files and folders of real images and masks.

Both datasets return ``(image, target)``: ``image`` a float32 tensor ``(C, H, W)`` with ``C`` 1 or 3,
``target`` an int64 tensor ``(H, W)`` (or a dict of them when several labels are asked for). They
drop into any training loop and any ``DataLoader``::

    from torch.utils.data import DataLoader
    from sdk.augment import Physics, build_pipeline
    from sdk.data import SyntheticDataset

    ds = SyntheticDataset("grains.h5", label="boundary", crop=256,
                          transform=build_pipeline(Physics(metric=True)))
    for image, target in DataLoader(ds, batch_size=8, shuffle=True, num_workers=2):
        ...

Per sample the steps are: read → random (or centre) crop → colour handling → scale to a float32
working image in ``[0, 1]`` → ``transform(image=..., mask=...)`` in ONE call with every label →
final normalisation → channels → tensors.

- **Normalisation** ``"percentile"``: the 0.5 and 99.5 percentiles *of the whole image* (not the
  crop, so crops of one image share one intensity scale) map to 0 and 1, clipped; ``"zscore"``:
  zero mean and unit variance of the transformed crop; ``"none"``: values in the stored units
  (counts), the transform working on a min–max scaled copy that is scaled back.
- **Channels** ``1``: grey (RGB inputs become the mean of R, G and B); ``3``: RGB kept, grey
  repeated, for ImageNet-style backbones (keep the pretrained first convolution).
- **Randomness** (random crops and the transform) comes from a generator seeded from
  ``torch.initial_seed()`` in each process, so DataLoader workers differ, epochs differ, and a
  run is reproducible from the DataLoader's seed. Nothing touches global random state.
- **Files** are opened lazily in each process (h5py handles do not survive ``fork``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from twin.errors import EmtwinError

__all__ = [
    "DataError",
    "SyntheticDataset",
    "RealDataset",
    "boundary_from_instances",
    "default_group",
    "read_image_file",
    "prepare_image",
    "NORMALIZATIONS",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "VENDOR_SUFFIXES",
]

NORMALIZATIONS = ("percentile", "zscore", "none")
PERCENTILES = (0.5, 99.5)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")
VENDOR_SUFFIXES = (".dm3", ".dm4", ".emd", ".ser", ".mrc")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".npy")


class DataError(EmtwinError, ValueError):
    """A dataset the user pointed at cannot be used (unpaired or mismatched files, bad label, ...).

    The message names the files or the label and what is wrong.
    """


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check_common(crop: int | None, channels: int, normalize: str) -> None:
    if crop is not None and (isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 1):
        raise ValueError(f"crop must be a positive int (px) or None, got {crop!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB / grey repeated), got {channels!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize {normalize!r} is not allowed (allowed: {', '.join(NORMALIZATIONS)})")


def _colour(img: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB float32; alpha dropped; RGB -> mean for 1 channel."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3:
        if a.shape[-1] == 2:  # grey + alpha
            a = a[..., 0]
        elif a.shape[-1] >= 3:
            rgb = a[..., :3]
            if channels == 1:
                a = rgb.astype(np.float32).mean(axis=-1)
            elif np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
                a = rgb[..., 0]  # grey stored as RGB(A): one channel, repeated at the end
            else:
                a = rgb
    if a.ndim not in (2, 3):
        raise ValueError(f"image of shape {np.shape(img)} is not (H, W) or (H, W, C)")
    return a.astype(np.float32, copy=False)


def _scale_range(img: np.ndarray, normalize: str) -> tuple[float, float]:
    """Values mapped to 0 and 1 in the working image."""
    if normalize == "percentile":
        flat = img.reshape(-1)
        if flat.size > 1 << 18:  # a regular subsample is plenty for two percentiles
            flat = flat[:: flat.size >> 18]
        lo, hi = np.percentile(flat, PERCENTILES)
    else:
        lo, hi = float(img.min()), float(img.max())
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def _crop_box(h: int, w: int, crop: int | None, rng: np.random.Generator | None,
              where: str) -> tuple[int, int, int, int]:
    if crop is None:
        return 0, 0, h, w
    if crop > h or crop > w:
        raise DataError(f"{where}: crop {crop} px is larger than the image ({h}x{w} px)")
    if rng is None:
        y, x = (h - crop) // 2, (w - crop) // 2
    else:
        y = int(rng.integers(0, h - crop + 1))
        x = int(rng.integers(0, w - crop + 1))
    return y, x, crop, crop


def _mask_in(m: np.ndarray) -> np.ndarray:
    """Label map as an int32 array albumentations/OpenCV can warp (nearest neighbour)."""
    m = np.asarray(m)
    if m.dtype == np.int32:
        return np.ascontiguousarray(m)
    if m.size and (m.max() > np.iinfo(np.int32).max or m.min() < np.iinfo(np.int32).min):
        raise DataError(f"label values outside the int32 range cannot be augmented "
                        f"(min {m.min()}, max {m.max()})")
    return np.ascontiguousarray(m, dtype=np.int32)


def _to_numpy(a: Any, image: bool) -> np.ndarray:
    if isinstance(a, torch.Tensor):  # e.g. a user's pipeline ending in ToTensorV2 (C, H, W)
        a = a.detach().cpu().numpy()
        if image and a.ndim == 3:
            a = np.moveaxis(a, 0, -1)
    return np.asarray(a)


def _finish(img: np.ndarray, masks: list[np.ndarray], *, channels: int, normalize: str,
            scale: tuple[float, float], transform: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Working image -> transform (one call) -> normalisation -> (C, H, W) float32 + int64 masks."""
    lo, hi = scale
    x = (img - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    if normalize == "percentile":
        np.clip(x, 0.0, 1.0, out=x)
    if transform is not None:
        if len(masks) == 1:
            out = transform(image=x, mask=_mask_in(masks[0]))
            masks = [_to_numpy(out["mask"], False)]
        else:
            out = transform(image=x, masks=[_mask_in(m) for m in masks])
            masks = [_to_numpy(m, False) for m in out["masks"]]
        x = _to_numpy(out["image"], True).astype(np.float32, copy=False)
    if normalize == "percentile":
        x = np.clip(x, 0.0, 1.0)
    elif normalize == "zscore":
        mu, sd = float(x.mean()), float(x.std())
        x = (x - np.float32(mu)) / np.float32(sd if sd > 0 else 1.0)
    else:
        x = x * np.float32(hi - lo) + np.float32(lo)
    if x.ndim == 2:
        x = np.repeat(x[None], channels, axis=0)
    else:
        if x.shape[-1] == 1:
            x = np.repeat(x[..., :1], channels, axis=-1)
        x = np.moveaxis(x, -1, 0)
        if x.shape[0] != channels:
            raise ValueError(f"the transform returned {x.shape[0]} channels, expected {channels}")
    image = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return image, [torch.from_numpy(np.ascontiguousarray(m, dtype=np.int64)) for m in masks]


def prepare_image(image: np.ndarray, channels: int = 1, normalize: str = "percentile") -> torch.Tensor:
    """One image prepared exactly as the datasets prepare theirs (for inference on new files).

    Colour handling (RGB -> mean of R, G, B for 1 channel; grey repeated for 3), then the
    per-image normalisation; no crop, no transform.

    Parameters
    ----------
    image : ndarray (H, W) or (H, W, C)
        As read, e.g. by :func:`read_image_file` (any dtype).
    channels : {1, 3}
    normalize : {"percentile", "zscore", "none"}

    Returns
    -------
    torch.Tensor (channels, H, W) float32
    """
    _check_common(None, channels, normalize)
    img = _colour(image, channels)
    out, _ = _finish(img, [], channels=channels, normalize=normalize,
                     scale=_scale_range(img, normalize), transform=None)
    return out


class _Seeded:
    """Per-process random generator seeded from ``torch.initial_seed()``.

    Recreated whenever the process or torch's initial seed changes (a new DataLoader worker, a
    new epoch with non-persistent workers, ``torch.manual_seed`` in the main process); the
    dataset's transform is reseeded from the same seed, so its draws differ between workers too.
    """

    _rng: np.random.Generator | None
    _rng_key: tuple[int, int] | None
    transform: Any

    def _init_rng(self) -> None:
        self._rng = None
        self._rng_key = None

    def _generator(self) -> np.random.Generator:
        seed = int(torch.initial_seed())
        key = (os.getpid(), seed)
        if self._rng is None or self._rng_key != key:
            ss = np.random.SeedSequence(seed)
            crop_ss, tf_ss = ss.spawn(2)
            self._rng = np.random.default_rng(crop_ss)
            self._rng_key = key
            if self.transform is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(int(tf_ss.generate_state(1, dtype=np.uint32)[0]))
        return self._rng

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_rng"] = None
        state["_rng_key"] = None
        return state

    def with_transform(self, transform: Any):
        """A shallow copy of this dataset with another transform (the file is shared)."""
        new = copy.copy(self)
        new.transform = transform
        new._init_rng()
        return new


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def boundary_from_instances(labels: Any, width: int = 2) -> np.ndarray:
    """Boundary mask of an instance (``grain_id``) map.

    Parameters
    ----------
    labels : array-like or torch.Tensor, (H, W) or (N, H, W), integer
        Instance ids.
    width : int
        Band width in px across a straight boundary. 2: every pixel with a 4-neighbour of
        another id (both sides; equals ``skimage.segmentation.find_boundaries(mode="thick")``);
        1: only the pixel on the lower/right side of each change; wider bands grow these by a
        3x3 cross, one px per side per step.

    Returns
    -------
    ndarray or torch.Tensor (matching the input), uint8 {0, 1}, same shape
    """
    is_tensor = isinstance(labels, torch.Tensor)
    a = labels.detach().cpu().numpy() if is_tensor else np.asarray(labels)
    if isinstance(width, bool) or int(width) != width or width < 1:
        raise ValueError(f"width must be a positive int (px), got {width!r}")
    if a.ndim == 3:
        out = np.stack([boundary_from_instances(x, width) for x in a])
    elif a.ndim == 2:
        out = np.zeros(a.shape, dtype=bool)
        dy = a[1:, :] != a[:-1, :]
        dx = a[:, 1:] != a[:, :-1]
        out[1:, :] |= dy
        out[:, 1:] |= dx
        if width % 2 == 0:
            out[:-1, :] |= dy
            out[:, :-1] |= dx
        steps = (int(width) - 1) // 2 if width % 2 else (int(width) - 2) // 2
        if steps:
            from scipy import ndimage

            out = ndimage.binary_dilation(out, structure=ndimage.generate_binary_structure(2, 1),
                                          iterations=steps)
        out = out.astype(np.uint8)
    else:
        raise ValueError(f"labels must be (H, W) or (N, H, W), got shape {a.shape}")
    return torch.from_numpy(out) if is_tensor else out


# --------------------------------------------------------------------------------------------
# Synthetic data (emtwin HDF5)
# --------------------------------------------------------------------------------------------


class SyntheticDataset(_Seeded, Dataset):
    """Samples of an emtwin HDF5 dataset as ``(image, target)`` tensors.

    Parameters
    ----------
    path : str or os.PathLike
        An emtwin dataset file (``twin generate``), or a complete shard directory
        (``OUT.h5.shards`` of ``twin generate --keep-shards``), read in place.
    label : str or sequence of str
        Label map(s) under ``/labels``: e.g. ``"boundary"`` (0/1), ``"grain_id"`` (instance ids,
        see :func:`boundary_from_instances`). A sequence gives a dict ``{name: target}``.
    crop : int or None
        Square crop size in px; None for the full image.
    channels : {1, 3}
        Output channels (3: grey repeated / RGB kept).
    normalize : {"percentile", "zscore", "none"}
        See the module docstring.
    transform : callable, optional
        An :mod:`sdk.augment` pipeline or any albumentations Compose, called once per sample as
        ``transform(image=..., mask=...)`` (``masks=[...]`` for several labels) on the float32
        working image in ``[0, 1]`` (H, W) or (H, W, 3) and int32 label maps. Must return NumPy
        arrays (a final ``ToTensorV2`` is tolerated).
    length : int, optional
        Items per epoch (default: the number of samples); item ``i`` uses sample ``i % N``, so a
        larger length gives several random crops of every sample.
    random_crop : bool
        Random crop position (per-worker generator); False: centred.
    tiles : bool
        Keyword-only. Enumerate every non-overlapping ``crop``-sized tile of every sample instead
        (deterministic; ``length`` and ``random_crop`` are ignored). For evaluation.

    Attributes
    ----------
    groups : ndarray (len(self),) int64
        Specimen id of every item (group by it when splitting).
    labels : tuple of str
    classes : dict str -> list of str
        Class names of each label (empty for instance labels).
    kinds : dict str -> str
        ``semantic``, ``instance`` or ``boundary`` for each label.

    Raises
    ------
    DataError
        Missing/corrupt/unknown file, unknown label, crop larger than the images.
    ValueError
        Bad ``crop``, ``channels`` or ``normalize``.
    """

    def __init__(self, path: str | os.PathLike, label: str | Sequence[str] = "boundary",
                 crop: int | None = 256, channels: int = 1, normalize: str = "percentile",
                 transform: Callable[..., Any] | None = None, length: int | None = None,
                 random_crop: bool = True, *, tiles: bool = False) -> None:
        from twin.dataset import DatasetError, open_dataset  # h5py + hdf5plugin, no Numba
        from twin.errors import EmtwinError
        from twin.shards import open_sharded  # (also free of Numba)

        _check_common(crop, channels, normalize)
        try:
            # a finished dataset file, or a shard directory (``OUT.h5.shards``) read in place
            is_shards = os.path.isdir(path)
            self._ds = open_sharded(path) if is_shards else open_dataset(path)
            specimen = self._ds.specimen_ids()
        except (DatasetError, EmtwinError) as exc:
            raise DataError(str(exc)) from exc
        self.path = Path(os.fspath(path))
        self._multi = not isinstance(label, str)
        self.labels: tuple[str, ...] = (label,) if isinstance(label, str) else tuple(label)
        if not self.labels:
            raise DataError(f"{self.path}: no label asked for (labels: {', '.join(self._ds.label_names)})")
        for name in self.labels:
            if name not in self._ds.label_names:
                raise DataError(f"{self.path}: no label {name!r} "
                                f"(labels: {', '.join(self._ds.label_names) or 'none'})")
        self.kinds = {n: self._ds.label_attrs(n).get("kind", "semantic") for n in self.labels}
        self.classes = {n: list(self._ds.label_attrs(n).get("classes", [])) for n in self.labels}
        h, w = self._ds.image_shape[:2]
        if crop is not None and (crop > h or crop > w):
            raise DataError(f"{self.path}: crop {crop} px is larger than the images ({h}x{w} px)")
        self.crop, self.channels, self.normalize = crop, channels, normalize
        self.transform = transform
        self.random_crop = bool(random_crop)
        self.tiles = bool(tiles)
        n = len(self._ds)
        if self.tiles:
            c = crop if crop is not None else min(h, w)
            ys, xs = range(0, h - c + 1, c), range(0, w - c + 1, c)
            self._items = [(i, y, x) for i in range(n) for y in ys for x in xs]
            self._len = len(self._items)
            self.groups = np.asarray(specimen[[it[0] for it in self._items]], dtype=np.int64)
        else:
            if length is not None and (isinstance(length, bool) or int(length) < 1):
                raise ValueError(f"length must be a positive int, got {length!r}")
            self._items = None
            self._len = n if length is None else int(length)
            self.groups = np.asarray(specimen[np.arange(self._len) % n], dtype=np.int64)
        self._init_rng()

    # ---- metadata ----

    def __len__(self) -> int:
        return self._len

    @property
    def n_samples(self) -> int:
        """Samples in the file (``len(self)`` may differ: ``length``, ``tiles``)."""
        return len(self._ds)

    @property
    def num_classes(self) -> int:
        """Classes of the (first) label: ``len(classes)`` (at least 2 for a boundary label)."""
        name = self.labels[0]
        k = len(self.classes[name])
        return max(k, 2) if self.kinds[name] == "boundary" else k

    def sample_index(self, i: int) -> int:
        """Index of the file sample that item ``i`` reads."""
        i = self._item(i)
        return self._items[i][0] if self._items is not None else i % len(self._ds)

    def _item(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        j = int(i) + (self._len if i < 0 else 0)
        if not 0 <= j < self._len:
            raise IndexError(f"item {i} out of range for {self._len} items")
        return j

    # ---- data ----

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        j = self._item(i)
        rng = self._generator()
        if self._items is not None:
            k, y, x = self._items[j]
            c = self.crop if self.crop is not None else min(self._ds.image_shape[:2])
            box = (y, x, c, c)
        else:
            k = j % len(self._ds)
            h, w = self._ds.image_shape[:2]
            box = _crop_box(h, w, self.crop, rng if self.random_crop else None, str(self.path))
        from twin.dataset import DatasetError

        try:
            raw = self._ds.image(k)
            maps = [self._ds.label(name, k) for name in self.labels]
        except DatasetError as exc:
            raise DataError(str(exc)) from exc
        img = _colour(raw, self.channels)
        scale = _scale_range(img, self.normalize)
        y, x, ch, cw = box
        img = img[y:y + ch, x:x + cw]
        maps = [m[y:y + ch, x:x + cw] for m in maps]
        image, targets = _finish(img, maps, channels=self.channels, normalize=self.normalize,
                                 scale=scale, transform=self.transform)
        if self._multi:
            return image, dict(zip(self.labels, targets))
        return image, targets[0]

    def close(self) -> None:
        """Close the HDF5 handle of this process (data access re-opens it)."""
        self._ds.close()

    def __repr__(self) -> str:
        return (f"SyntheticDataset({str(self.path)!r}, label={self.labels if self._multi else self.labels[0]!r}, "
                f"crop={self.crop}, channels={self.channels}, normalize={self.normalize!r}, "
                f"items={len(self)}, transform={'yes' if self.transform is not None else 'none'})")


# --------------------------------------------------------------------------------------------
# Real data (folders of images and masks)
# --------------------------------------------------------------------------------------------


def default_group(name: str) -> str:
    """Group of a file: the part of its stem before the first ``-`` (else the whole stem).

    ``"10-256-512.png"`` -> ``"10"`` (crops of TBM micrograph 10); ``"image_3.png"`` ->
    ``"image_3"``.
    """
    stem = Path(str(name)).stem
    return stem.split("-", 1)[0] or stem


def _planar_to_last(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        return np.moveaxis(a, 0, -1)
    return a


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """Pixels of one image or mask file, dtype as stored.

    PNG/BMP/JPEG (Pillow; 8 or 16 bit, grey, grey+alpha, RGB, RGBA, palette images as indices),
    TIFF (tifffile if installed, else Pillow; first page), ``.npy``, and vendor formats
    (``.dm3``/``.dm4``/``.emd``/``.ser``/``.mrc`` through :func:`twin.io.read_image`; first frame).

    Returns
    -------
    ndarray (H, W) or (H, W, C)

    Raises
    ------
    DataError
        Unreadable or unsupported file.
    """
    p = Path(os.fspath(path))
    suf = p.suffix.lower()
    try:
        if suf == ".npy":
            a = np.load(p, allow_pickle=False)
        elif suf in (".tif", ".tiff"):
            try:
                import tifffile
            except ImportError:  # pragma: no cover - tifffile ships with the sdk environment
                tifffile = None
            if tifffile is not None:
                with tifffile.TiffFile(p) as tf:
                    a = tf.pages[0].asarray()
            else:  # pragma: no cover
                from PIL import Image

                with Image.open(p) as im:
                    a = np.asarray(im)
        elif suf in VENDOR_SUFFIXES:
            from twin.io import read_image

            a = read_image(p).frames[0]
        else:
            from PIL import Image

            with Image.open(p) as im:
                a = np.asarray(im)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot read the file: {exc}") from exc
    a = _planar_to_last(np.asarray(a))
    if a.ndim not in (2, 3) or a.dtype.kind not in "biuf":
        raise DataError(f"{p}: not an image (array of shape {a.shape}, dtype {a.dtype})")
    return a


def _header_shape(path: Path) -> tuple[int, int] | None:
    """(H, W) from the file header without decoding the pixels (None if unknown cheaply)."""
    suf = path.suffix.lower()
    try:
        if suf in (".png", ".bmp", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(path) as im:
                return int(im.size[1]), int(im.size[0])
        if suf in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                shape = _planar_to_last(np.empty(tf.pages[0].shape, dtype=np.uint8)).shape
                return int(shape[0]), int(shape[1])
        if suf == ".npy":
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            return int(a.shape[0]), int(a.shape[1])
    except Exception as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from exc
    return None


def _listing(names: Iterable[str], limit: int = 10) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class RealDataset(_Seeded, Dataset):
    """Labelled real images: ``root/images/<name>`` paired with ``root/masks/<name>``.

    Images: PNG, TIFF, BMP, JPEG, ``.npy`` (8/16-bit or float, grey, grey+alpha, RGB, RGBA) and
    vendor formats (``.dm3``, ``.dm4``, ``.emd``, ``.ser``, ``.mrc``). Masks: PNG, TIFF, BMP or
    ``.npy`` (lossless only) with the same stem as their image. Hidden files and other suffixes
    are ignored.

    Parameters
    ----------
    root : str or os.PathLike
        Folder with ``images/`` and ``masks/``.
    crop : int or None
        Square random (per-worker generator) crop size in px; None: whole images.
    channels : {1, 3}
        1: grey (mean of R, G, B); 3: RGB kept, grey repeated.
    normalize : {"percentile", "zscore", "none"}
        Per image, see :mod:`sdk.data`.
    transform : callable, optional
        Albumentations pipeline called once per sample with the image and the mask.
    group_fn : callable name -> hashable, optional
        Group (micrograph / specimen) of a file name; default :func:`default_group`.
    mask_threshold : int or None
        Binary masks: ``mask >= mask_threshold`` is class 1 (value for 8-bit masks; scaled by
        257 for 16-bit masks; masks whose values are all 0/1 are used as they are). None: mask
        values are class indices (multi-class masks, palette PNGs). A colour mask uses its first
        channel.
    files : iterable of str, optional
        Restrict to these names (file names or stems), e.g. for k-label experiments.

    Attributes
    ----------
    names : list of str
        Image file names, sorted.
    groups : ndarray (len(self),) of str
        Group of every item.

    Raises
    ------
    DataError
        No such folders, no images, unpaired files (names listed), a mask whose size differs from
        its image, duplicate stems, lossy (JPEG) masks, names in ``files`` that do not exist.
    """

    def __init__(self, root: str | os.PathLike, crop: int | None = None, channels: int = 1,
                 normalize: str = "percentile", transform: Callable[..., Any] | None = None,
                 group_fn: Callable[[str], Any] | None = None, mask_threshold: int | None = 128,
                 files: Iterable[str] | None = None) -> None:
        _check_common(crop, channels, normalize)
        self.root = Path(os.fspath(root))
        img_dir, mask_dir = self.root / "images", self.root / "masks"
        if not img_dir.is_dir() or not mask_dir.is_dir():
            raise DataError(f"{self.root}: expected the folders images/ and masks/ "
                            "(mask files with the same names as their images)")
        images = self._scan(img_dir, IMAGE_SUFFIXES + VENDOR_SUFFIXES, "image")
        masks = self._scan(mask_dir, MASK_SUFFIXES + (".jpg", ".jpeg"), "mask")
        lossy = [m.name for m in masks.values() if m.suffix.lower() in (".jpg", ".jpeg")]
        if lossy:
            raise DataError(f"{mask_dir}: JPEG masks are lossy (label values change at edges): "
                            f"save them as PNG or TIFF: {_listing(lossy)}")
        no_mask = [images[s].name for s in images if s not in masks]
        no_image = [masks[s].name for s in masks if s not in images]
        if no_mask or no_image:
            parts = []
            if no_mask:
                parts.append(f"{len(no_mask)} image(s) without a mask in masks/: {_listing(no_mask)}")
            if no_image:
                parts.append(f"{len(no_image)} mask(s) without an image in images/: {_listing(no_image)}")
            raise DataError(f"{self.root}: unpaired files: " + "; ".join(parts))
        stems = sorted(images)
        if files is not None:
            wanted = [str(f) for f in ([files] if isinstance(files, str) else files)]
            by_name = {images[s].name: s for s in stems}
            chosen, missing = [], []
            for f in wanted:
                s = by_name.get(Path(f).name)
                if s is None and f in images:
                    s = f
                if s is None and Path(f).stem in images:
                    s = Path(f).stem
                (chosen if s is not None else missing).append(s if s is not None else f)
            if missing:
                raise DataError(f"{self.root}: files not found in images/: {_listing(missing)}")
            stems = sorted(set(chosen))
        if not stems:
            raise DataError(f"{img_dir}: no images (suffixes: {', '.join(IMAGE_SUFFIXES + VENDOR_SUFFIXES)})")
        self._pairs = [(images[s], masks[s]) for s in stems]
        for ip, mp in self._pairs:
            hi, hm = _header_shape(ip), _header_shape(mp)
            if hi is not None and hm is not None and hi != hm:
                raise DataError(f"{self.root}: mismatched pair {ip.name}: image is {hi[0]}x{hi[1]} px "
                                f"but mask {mp.name} is {hm[0]}x{hm[1]} px")
        self.names = [ip.name for ip, _ in self._pairs]
        fn = group_fn or default_group
        self.groups = np.asarray([fn(n) for n in self.names])
        self.crop, self.channels, self.normalize = crop, channels, normalize
        self.transform = transform
        if mask_threshold is not None and (isinstance(mask_threshold, bool) or mask_threshold < 0):
            raise ValueError(f"mask_threshold must be a non-negative number or None, got {mask_threshold!r}")
        self.mask_threshold = mask_threshold
        self._init_rng()

    @staticmethod
    def _scan(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in suffixes:
                continue
            if p.stem in out:
                raise DataError(f"{folder}: two {what} files with the stem {p.stem!r} "
                                f"({out[p.stem].name}, {p.name}): keep one")
            out[p.stem] = p
        return out

    def __len__(self) -> int:
        return len(self._pairs)

    def mask_to_label(self, mask: np.ndarray, where: str = "mask") -> np.ndarray:
        """Class map (H, W) int64 from a stored mask (see ``mask_threshold``)."""
        m = np.asarray(mask)
        if m.ndim == 3:
            m = m[..., 0]
        if m.dtype == bool:
            return m.astype(np.int64)
        if self.mask_threshold is None:
            if m.dtype.kind == "f" and not np.all(m == np.round(m)):
                raise DataError(f"{where}: float mask with non-integer values; give mask_threshold")
            return m.astype(np.int64)
        if m.size and m.max() <= 1 and m.min() >= 0:
            return (m > 0).astype(np.int64)
        t = float(self.mask_threshold)
        if m.dtype == np.uint16 and t <= 255 and m.max() > 255:
            t *= 257.0
        return (m >= t).astype(np.int64)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``i`` as stored: ``(image (H, W[, C]), label (H, W) int64)``, no crop or scaling.

        Raises
        ------
        DataError
            Unreadable files or an image and mask of different sizes.
        """
        ip, mp = self._pairs[i]
        img = read_image_file(ip)
        mask = read_image_file(mp)
        if img.shape[:2] != mask.shape[:2]:
            raise DataError(f"{self.root}: mismatched pair {ip.name}: image is "
                            f"{img.shape[0]}x{img.shape[1]} px but mask {mp.name} is "
                            f"{mask.shape[0]}x{mask.shape[1]} px")
        return img, self.mask_to_label(mask, str(mp))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        i = int(i) % len(self)
        rng = self._generator()
        raw, label = self.read(i)
        img = _colour(raw, self.channels)
        scale = _scale_range(img, self.normalize)
        y, x, ch, cw = _crop_box(img.shape[0], img.shape[1], self.crop, rng, self.names[i])
        image, (target,) = _finish(img[y:y + ch, x:x + cw], [label[y:y + ch, x:x + cw]],
                                   channels=self.channels, normalize=self.normalize, scale=scale,
                                   transform=self.transform)
        return image, target

    def __repr__(self) -> str:
        return (f"RealDataset({str(self.root)!r}, items={len(self)}, groups={len(set(self.groups.tolist()))}, "
                f"crop={self.crop}, channels={self.channels}, normalize={self.normalize!r})")
