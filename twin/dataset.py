"""The emtwin HDF5 dataset file: writer and reader.

This module implements the file layout of DESIGN.md section 3, the contract between ``twin``
(which writes datasets) and ``sdk`` (which reads them)::

    /                    attrs: format, format_version, created, emtwin_version, n_samples,
                         complete, + caller attrs (recipe, recipe_sha256, root_seed, instrument,
                         pixel_size, pixel_size_unit, ...)
    /images              (N, H, W) or (N, H, W, C), one chunk per sample
    /labels/<name>       (N, H, W), attrs: kind, classes, description
    /geometry/<name>     (N,) variable-length float64 (optional), attr row_shape
    /meta/specimen_id    (N,) int64
    /meta/index          (N,) int64
    /meta/params         (N,) JSON text (variable-length UTF-8)

Writing is atomic: :class:`DatasetWriter` writes a hidden temporary file next to the target and
renames it over the target only when every sample has been written. Reading is lazy and
worker-safe: :class:`EmtwinDataset` validates the file, closes it, and re-opens it on first data
access in each process (h5py handles do not survive ``fork``).

Files written with the default ``"lz4"`` compression use the Blosc filter from ``hdf5plugin``;
this module imports ``hdf5plugin`` so the filter is registered. Code that reads such a file with
h5py directly must ``import hdf5plugin`` first. ``"gzip"`` files open in any HDF5 tool.

:class:`DatasetWriter` compresses each sample's image and label chunks itself where it can
reproduce the dataset's filters (Blosc, through the library hdf5plugin registers; no filter) and
writes them as stored (``write_direct_chunk``): the bytes HDF5's filter pipeline would store
(tested), each compressed once, on the calling thread, without HDF5's chunk cache, and at hand
for a checksum (:func:`data_sha256`) without reading the file back. gzip chunks go through
HDF5's filters.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as _dt
import functools
import hashlib
import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from twin.errors import EmtwinError

try:  # registers the Blosc filter with HDF5 (needed to write *and* read "lz4" files)
    import hdf5plugin as _hdf5plugin
except ImportError:  # pragma: no cover - hdf5plugin is a hard dependency; degrade clearly
    _hdf5plugin = None

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "COMPRESSIONS",
    "DEFAULT_COMPRESSION",
    "LABEL_KINDS",
    "DatasetError",
    "LabelSpec",
    "DatasetWriter",
    "EmtwinDataset",
    "open_dataset",
    "data_sha256",
    "CHECKSUM_SCHEME",
]

FORMAT = "emtwin-dataset"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

LABEL_KINDS = ("semantic", "instance", "boundary")

COMPRESSIONS = ("lz4", "gzip", "none")
# Chosen by bench/compression.py --n 64 (median of 3 runs; 512x512 uint16 image + int32 grain_id +
# uint8 boundary per sample = 1.84 MB raw; 2-core machine, local disk; "read" from the page cache,
# "cold" after dropping the file's cached pages):
#
#   compression  write samples/s  read samples/s  cold read/s  MB/sample  (x gzip: write/read/size)
#   lz4                      626            1361         1119      0.442   5.70 / 3.52 / 1.20
#   gzip (level 1, shuffle)  110             387          377      0.369   1.00 / 1.00 / 1.00
#   none                     223            2616          788      1.835   2.03 / 6.76 / 4.98
#
# Blosc-LZ4 + byte shuffle writes ~5.7x and reads ~3.5x (cold ~3x) faster than gzip-1 for a file
# only 1.2x larger, and beats "none" everywhere except warm reads (uncompressed is 4x larger and
# its writes are disk-bound), so it is the default. "gzip" is for files that must open in any
# HDF5 tool without plugins (the shuffle filter is built into HDF5; it made gzip-1 both faster
# and ~20% smaller here).
DEFAULT_COMPRESSION = "lz4"

_GZIP_LEVEL = 1
_BLOSC_LEVEL = 5
# per-sample /meta rows are written in batches of this many (one HDF5 write per dataset and
# batch instead of three per sample: ~0.1 ms per sample; bounded memory for large files)
_META_BATCH = 64

# Root attributes the writer owns; callers may not pass them in ``attrs``.
_RESERVED_ATTRS = frozenset(
    {"format", "format_version", "created", "emtwin_version", "n_samples", "complete"}
)

_tmp_counter = itertools.count()


class DatasetError(EmtwinError):
    """A problem with an emtwin dataset file that the user can cause or fix.

    The message is one line that names the file and what is wrong with it.
    """


# --------------------------------------------------------------------------------------------
# Label specification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSpec:
    """Declaration of one per-pixel label map stored under ``/labels/<name>``.

    Parameters
    ----------
    dtype : str
        NumPy dtype name of the label map, e.g. ``"int32"`` for instance ids or ``"uint8"`` for
        masks. Must be a boolean, integer or floating-point type.
    kind : str
        One of ``"semantic"``, ``"instance"`` or ``"boundary"``.
    classes : tuple of str, optional
        Class names, index ``k`` naming label value ``k`` (for semantic/boundary labels).
    description : str, optional
        Free text stored with the label.

    Raises
    ------
    ValueError
        If ``kind`` or ``dtype`` is not allowed or ``classes`` are not strings.
    """

    dtype: str
    kind: str
    classes: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ValueError(
                f"LabelSpec kind {self.kind!r} is not allowed (allowed: {', '.join(LABEL_KINDS)})"
            )
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"LabelSpec dtype {self.dtype!r} is not a NumPy dtype") from exc
        if dt.kind not in "biuf":
            raise ValueError(
                f"LabelSpec dtype {self.dtype!r} is not allowed (use a bool, integer or float type)"
            )
        object.__setattr__(self, "dtype", dt.name)
        if isinstance(self.classes, str):
            raise ValueError("LabelSpec classes must be a sequence of str, not a single str")
        classes = tuple(self.classes)
        if not all(isinstance(c, str) for c in classes):
            raise ValueError(f"LabelSpec classes must all be str, got {classes!r}")
        object.__setattr__(self, "classes", classes)
        if not isinstance(self.description, str):
            raise ValueError("LabelSpec description must be a str")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _emtwin_version() -> str:
    """The installed package version (looked up once: ~1 ms per lookup, once per file)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "unknown"
    try:
        return version("emtwin")
    except PackageNotFoundError:
        return "unknown"


def _json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: NumPy scalars/arrays, dataclasses, sets, paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"value of type {type(obj).__name__} is not JSON-serialisable")


# what ``json.dumps(obj, sort_keys=True, default=_json_default)`` builds on every call (its
# ``encode`` keeps no state between calls)
_JSON_ENCODER = json.JSONEncoder(sort_keys=True, default=_json_default)


def _dumps(obj: Any) -> str:
    """``json.dumps(obj, sort_keys=True, default=_json_default)``, without a new encoder per call."""
    return _JSON_ENCODER.encode(obj)


def _check_name(path: Path, what: str, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise DatasetError(
            f"{path.name}: {what} name {name!r} is not allowed (a non-empty str without '/')"
        )
    return name


def _attr_value(path: Path, key: str, value: Any) -> Any:
    """Convert a caller attribute to something HDF5 stores portably."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return _dumps(value)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path.name}: attribute {key!r} cannot be JSON-encoded: {exc}")
    raise DatasetError(
        f"{path.name}: attribute {key!r} has type {type(value).__name__} "
        "(allowed: str, int, float, bool, or a dict/list JSON-encoded to str)"
    )


def _py(value: Any) -> Any:
    """HDF5 attribute value -> plain Python (str, int, float, bool, list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _py(value.item())
    if isinstance(value, list):
        return [_py(v) for v in value]
    return value


def _compression_kwargs(compression: str) -> dict[str, Any]:
    if compression == "lz4":
        if _hdf5plugin is None:  # pragma: no cover
            raise DatasetError("compression 'lz4' needs the hdf5plugin package (pip install hdf5plugin)")
        return dict(
            _hdf5plugin.Blosc(cname="lz4", clevel=_BLOSC_LEVEL, shuffle=_hdf5plugin.Blosc.SHUFFLE)
        )
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": _GZIP_LEVEL, "shuffle": True}
    return {}



def _filter_pipeline(ds: h5py.Dataset) -> tuple:
    """(filter id, client values) of every filter of a dataset, in order."""
    plist = ds.id.get_create_plist()
    out = []
    for k in range(plist.get_nfilters()):
        code, _flags, values, _name = plist.get_filter(k)
        out.append((int(code), tuple(int(v) for v in values)))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _blosc_compress_ctx() -> Any:
    """``blosc_compress_ctx`` of the Blosc library that HDF5's Blosc filter (32001) runs, or
    ``None`` where it cannot be found.

    hdf5plugin registers that filter from its ``libh5blosc`` library, which also exports the
    reentrant c-blosc API; calling it with the filter's settings (clevel, shuffle, compressor,
    the dataset's type size, automatic block size, output no larger than the input) gives the
    bytes the filter writes (tested), without HDF5's chunk cache: each chunk is compressed once,
    as it is written, and its stored bytes are at hand (for a checksum without reading back).
    """
    if _hdf5plugin is None:  # pragma: no cover
        return None
    try:
        path = _hdf5plugin.get_config().registered_filters.get("blosc")
        if not path:
            return None
        fn = ctypes.CDLL(path).blosc_compress_ctx
    except (OSError, AttributeError, TypeError):  # pragma: no cover - another hdf5plugin build
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
                   ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


#: Blosc compressor codes (the filter's 7th client value) -> names
_BLOSC_NAMES = (b"blosclz", b"lz4", b"lz4hc", b"snappy", b"zlib", b"zstd")


class _ChunkEncoder:
    """Encodes one sample's array (a whole chunk) as a dataset's filters store it.

    For datasets without filters (the chunk is the array's bytes) and with only the Blosc
    filter (its settings read from the dataset's filter pipeline: type size, clevel, shuffle,
    compressor). ``encode(arr)`` returns the chunk's stored bytes (a memoryview, valid until the
    next call) or ``None`` where this path does not apply (another filter, an incompressible
    chunk, which the filter would store unfiltered): the caller then writes through HDF5's
    filters. Compression runs on the calling thread (no Blosc threads; ctypes releases the GIL).
    """

    def __init__(self, ds: h5py.Dataset) -> None:
        pipeline = _filter_pipeline(ds) if _one_chunk_per_sample(ds) else None
        self.raw = pipeline == ()
        self._fn = None
        self._out = np.empty(0, dtype=np.uint8)
        self._out_ptr = self._out.ctypes.data
        if pipeline and len(pipeline) == 1 and pipeline[0][0] == 32001:
            values = pipeline[0][1]
            if len(values) >= 7 and 0 <= values[6] < len(_BLOSC_NAMES):
                self._fn = _blosc_compress_ctx()
                self._typesize = max(1, values[2])
                self._clevel, self._shuffle = values[4], values[5]
                self._cname = _BLOSC_NAMES[values[6]]

    @property
    def active(self) -> bool:
        """Whether :meth:`encode` can produce this dataset's chunks."""
        return self.raw or self._fn is not None

    def encode(self, arr: np.ndarray) -> memoryview | None:
        arr = np.ascontiguousarray(arr)
        if self.raw:
            return memoryview(arr.reshape(-1).view(np.uint8))
        if self._fn is None:
            return None
        nbytes = arr.nbytes
        if self._out.shape[0] < nbytes:
            self._out = np.empty(nbytes, dtype=np.uint8)
            self._out_ptr = self._out.ctypes.data
        # as the filter: the output may not be larger than the input (else it is stored as is)
        n = self._fn(self._clevel, self._shuffle, self._typesize, nbytes, arr.ctypes.data,
                     self._out_ptr, nbytes, self._cname, 0, 1)
        if n <= 0:
            return None
        return memoryview(self._out)[:n]


#: a chunk record's head: filter mask (uint32) and length (uint64), native byte order, no
#: padding (the bytes of ``np.uint32(mask).tobytes() + np.uint64(n).tobytes()``)
_CHUNK_HEAD = struct.Struct("=IQ")


def _chunk_record(h: Any, mask: int, data: Any) -> None:
    """Feed one stored chunk to a checksum (filter mask, length, bytes)."""
    h.update(_CHUNK_HEAD.pack(mask, len(data)))
    h.update(data)


class _ArraySlot:
    """What writing one sample's chunk of an image/label dataset needs, looked up once.

    h5py's ``Dataset.name`` and ``Dataset.ndim`` ask HDF5 on every access (~1.5 and ~4 us);
    the writer reads them here, when the dataset is created, not per chunk.

    Parameters
    ----------
    ds : h5py.Dataset
        A per-sample dataset of the file being written.
    """

    __slots__ = ("ds", "dsid", "name", "encoder", "tail")

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds = ds
        self.dsid = ds.id
        self.name: str = ds.name
        self.encoder = _ChunkEncoder(ds)
        #: chunk offset after the sample position (a chunk holds one whole sample)
        self.tail: tuple[int, ...] = (0,) * (ds.ndim - 1)


def _one_chunk_per_sample(ds: h5py.Dataset) -> bool:
    return ds.chunks is not None and ds.chunks[0] == 1 and ds.chunks[1:] == ds.shape[1:]


def _array_digest(ds: h5py.Dataset) -> bytes:
    """SHA-256 over a per-sample dataset's stored chunks, in sample order (decoded samples when
    it is not chunked one sample per chunk)."""
    h = hashlib.sha256()
    n = int(ds.shape[0])
    if _one_chunk_per_sample(ds):
        zeros = (0,) * (ds.ndim - 1)
        for k in range(n):
            mask, data = ds.id.read_direct_chunk((k, *zeros))
            _chunk_record(h, mask, data)
    else:
        for k in range(n):
            h.update(np.ascontiguousarray(ds[k]).tobytes())
    return h.digest()


#: name of the data checksum :func:`data_sha256` computes (stored by twin.shards with it)
CHECKSUM_SCHEME = "sha256-per-array-v2"


def data_sha256(f: h5py.File, array_digests: Mapping[str, bytes] | None = None) -> str:
    """SHA-256 of the data of an open dataset file, as stored.

    The digest of, in order: for ``/images`` and every ``/labels/<name>`` (sorted), the
    dataset's name and the SHA-256 of its stored (compressed) chunks in sample order, each with
    its filter mask and length (:func:`_array_digest`); then ``/meta/index``,
    ``/meta/specimen_id``, the ``/meta/params`` texts and any ``/geometry`` rows. Hashing the
    stored chunks (~4x fewer bytes than the decoded arrays with lz4, and no decompression)
    detects any change of the stored data. Per-array digests make the checksum computable while
    the file is written (:meth:`DatasetWriter.data_sha256`), with the same result.

    Parameters
    ----------
    f : h5py.File
        An emtwin dataset file open for reading (or being written).
    array_digests : dict of str to bytes, optional
        Per-array digests already known (by dataset name, e.g. ``"/images"``); the others are
        computed from the file.

    Returns
    -------
    str
        Hexadecimal digest.
    """
    h = hashlib.sha256()
    arrays = [f["images"]] + [f["labels"][name] for name in sorted(f["labels"].keys())]
    known = array_digests or {}
    for ds in arrays:
        h.update(ds.name.encode("utf-8"))
        d = known.get(ds.name)
        h.update(d if d is not None else _array_digest(ds))
    h.update(f["meta/index"][...].astype("<i8").tobytes())
    h.update(f["meta/specimen_id"][...].astype("<i8").tobytes())
    for raw_text in f["meta/params"][...]:
        b = raw_text.encode("utf-8") if isinstance(raw_text, str) else bytes(raw_text)
        h.update(np.uint64(len(b)).tobytes())
        h.update(b)
    if "geometry" in f:
        for name in sorted(f["geometry"].keys()):
            h.update(name.encode("utf-8"))
            for row in f["geometry"][name][...]:
                b = np.asarray(row, dtype="<f8").tobytes()
                h.update(np.uint64(len(b)).tobytes())
                h.update(b)
    return h.hexdigest()


def _copy_chunks(src: h5py.Dataset, dst: h5py.Dataset, start: int, m: int) -> None:
    """Copy ``src[0:m]`` to ``dst[start:start+m]``; raw chunk copy when the layouts match."""
    raw = (src.chunks is not None and src.chunks == dst.chunks and src.chunks[0] == 1
           and _filter_pipeline(src) == _filter_pipeline(dst))
    if raw:
        zeros = (0,) * (src.ndim - 1)
        try:
            for k in range(m):
                mask, data = src.id.read_direct_chunk((k, *zeros))
                dst.id.write_direct_chunk((start + k, *zeros), data, filter_mask=mask)
            return
        except (OSError, KeyError, RuntimeError):  # e.g. an unallocated chunk: decode instead
            pass
    step = max(1, (64 << 20) // max(1, int(np.prod(src.shape[1:])) * src.dtype.itemsize))
    for k in range(0, m, step):
        dst[start + k:start + min(m, k + step)] = src[k:min(m, k + step)]


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class DatasetWriter:
    """Write an emtwin dataset file atomically.

    The file is written under a hidden temporary name in the target directory and renamed to
    ``path`` (``os.replace``) by :meth:`close` once every sample has been written. If the
    ``with`` block raises, or :meth:`close` finds samples missing, the temporary file is removed
    and nothing at ``path`` is created or changed.

    Parameters
    ----------
    path : str or os.PathLike
        Final file name.
    n_samples : int
        Number of samples N; every index ``0 <= i < N`` must be written.
    image_shape : tuple of int
        ``(H, W)`` or ``(H, W, C)``.
    image_dtype : dtype-like
        Image dtype (normally ``uint16`` counts or ``float32``). Images passed to :meth:`write`
        must have exactly this dtype.
    labels : dict of str to LabelSpec
        Label maps stored per sample under ``/labels/<name>``, each of shape ``(H, W)``.
    attrs : dict
        Extra root attributes (recipe text, recipe_sha256, root_seed, instrument, pixel_size,
        pixel_size_unit, ...). Values must be str, int, float or bool; dicts and lists are stored
        as JSON text.
    compression : {"lz4", "gzip", "none"}, optional
        Filter for images and labels. ``"lz4"`` is Blosc-LZ4 with byte shuffle (needs
        ``hdf5plugin`` to read), ``"gzip"`` is deflate level 1 with shuffle (opens anywhere).
    durable : bool
        ``fsync`` the finished file before renaming it to ``path`` (default), so that after an
        OS crash or power loss ``path`` is either the complete file or absent. ``False`` keeps
        the atomic rename but leaves flushing to the OS: for files whose contents are verified
        by a checksum before they are used (the shards of :mod:`twin.shards`), where an fsync
        per file only costs time.
    checksum : bool
        Keep a running :func:`data_sha256` of the images and labels as their chunks are
        written (for a file written sample by sample in order, without reading it back):
        :meth:`data_sha256` then only reads the small ``/meta`` datasets.

    Raises
    ------
    DatasetError
        If an argument is invalid or the target directory does not exist or is not writable.

    Examples
    --------
    >>> spec = {"grain_id": LabelSpec("int32", "instance")}
    >>> with DatasetWriter("out.h5", n_samples=2, image_shape=(64, 64), image_dtype="uint16",
    ...                    labels=spec, attrs={"root_seed": 1}) as w:      # doctest: +SKIP
    ...     for i in range(2):
    ...         w.write(i, img[i], {"grain_id": ids[i]}, specimen_id=0, index=i, params={})
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        n_samples: int,
        image_shape: tuple[int, ...],
        image_dtype: Any,
        labels: Mapping[str, LabelSpec],
        attrs: Mapping[str, Any],
        compression: str = DEFAULT_COMPRESSION,
        durable: bool = True,
        checksum: bool = False,
    ) -> None:
        self.path = Path(os.fspath(path))
        self.durable = bool(durable)
        self.checksum = bool(checksum)
        name = self.path.name
        self._file: h5py.File | None = None
        self._tmp: Path | None = None
        self._closed = False

        # ---- argument checks (before touching the filesystem) ----
        if compression not in COMPRESSIONS:
            raise DatasetError(
                f"{name}: compression {compression!r} is not supported "
                f"(choose one of {', '.join(COMPRESSIONS)})"
            )
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise DatasetError(f"{name}: n_samples must be a positive int, got {n_samples!r}")
        self.n_samples = int(n_samples)
        try:
            shape = tuple(int(s) for s in image_shape)
        except (TypeError, ValueError):
            raise DatasetError(f"{name}: image_shape must be a tuple of ints, got {image_shape!r}")
        if len(shape) not in (2, 3) or any(s < 1 for s in shape):
            raise DatasetError(
                f"{name}: image_shape must be (H, W) or (H, W, C) with positive sizes, got {shape}"
            )
        self.image_shape = shape
        try:
            self.image_dtype = np.dtype(image_dtype)
        except TypeError:
            raise DatasetError(f"{name}: image_dtype {image_dtype!r} is not a NumPy dtype")
        if self.image_dtype.kind not in "biuf":
            raise DatasetError(
                f"{name}: image_dtype {self.image_dtype} is not allowed (use an integer or float type)"
            )
        if not isinstance(labels, Mapping):
            raise DatasetError(f"{name}: labels must be a dict of name -> LabelSpec")
        for lname, spec in labels.items():
            _check_name(self.path, "label", lname)
            if not isinstance(spec, LabelSpec):
                raise DatasetError(
                    f"{name}: label {lname!r} must be a LabelSpec, got {type(spec).__name__}"
                )
        self.labels = dict(labels)
        if not isinstance(attrs, Mapping):
            raise DatasetError(f"{name}: attrs must be a dict")
        clash = sorted(set(attrs) & _RESERVED_ATTRS)
        if clash:
            raise DatasetError(
                f"{name}: attrs may not set {', '.join(clash)} (the writer sets these itself)"
            )
        root_attrs = {}
        for key, value in attrs.items():
            if not isinstance(key, str) or not key:
                raise DatasetError(f"{name}: attribute name {key!r} must be a non-empty str")
            root_attrs[key] = _attr_value(self.path, key, value)
        self.compression = compression
        filters = _compression_kwargs(compression)

        # ---- target directory ----
        directory = self.path.parent
        if self.path.is_dir():
            raise DatasetError(f"{self.path}: is a directory, expected a file name")
        if not directory.exists():
            raise DatasetError(f"{self.path}: directory {directory} does not exist")
        if not directory.is_dir():
            raise DatasetError(f"{self.path}: {directory} is not a directory")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise DatasetError(f"{self.path}: directory {directory} is not writable")

        # ---- create the temporary file (exclusive, so two writers never share one) ----
        for _ in range(100):
            tmp = directory / f".{name}.tmp-{os.getpid()}-{next(_tmp_counter)}"
            try:
                self._file = h5py.File(tmp, "x", track_order=False)
            except FileExistsError:
                continue
            except OSError as exc:
                if tmp.exists() and self._file is None:
                    # 'x' refuses existing files with a plain OSError on some h5py versions
                    continue
                raise DatasetError(f"{self.path}: cannot create a file in {directory}: {exc}")
            self._tmp = tmp
            break
        else:  # pragma: no cover
            raise DatasetError(f"{self.path}: cannot find a free temporary file name in {directory}")

        try:
            self._create_layout(root_attrs, filters)
        except BaseException:
            self._abort()
            raise
        self._written = np.zeros(self.n_samples, dtype=bool)

    # ---- layout ----

    def _create_layout(self, root_attrs: dict[str, Any], filters: dict[str, Any]) -> None:
        f = self._file
        assert f is not None
        n, shape = self.n_samples, self.image_shape
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = np.int64(FORMAT_VERSION)
        f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["emtwin_version"] = _emtwin_version()
        f.attrs["n_samples"] = np.int64(n)
        f.attrs["complete"] = False
        for key in sorted(root_attrs):
            try:
                f.attrs[key] = root_attrs[key]
            except (OSError, ValueError, TypeError) as exc:
                raise DatasetError(f"{self.path.name}: cannot store attribute {key!r}: {exc}")

        common = dict(track_times=False, **filters)
        self._images = f.create_dataset(
            "images", shape=(n, *shape), dtype=self.image_dtype, chunks=(1, *shape), **common
        )
        lab = f.create_group("labels")
        self._label_ds: dict[str, h5py.Dataset] = {}
        for lname in sorted(self.labels):
            spec = self.labels[lname]
            ds = lab.create_dataset(
                lname, shape=(n, *shape[:2]), dtype=np.dtype(spec.dtype), chunks=(1, *shape[:2]),
                **common,
            )
            ds.attrs["kind"] = spec.kind
            ds.attrs["classes"] = np.array(list(spec.classes), dtype=h5py.string_dtype())
            ds.attrs["description"] = spec.description
            self._label_ds[lname] = ds
        # chunks encoded here and written as stored (HDF5's filters only where that cannot be)
        self._image_slot = _ArraySlot(self._images)
        self._label_slots = {lname: _ArraySlot(ds) for lname, ds in self._label_ds.items()}
        self._label_dtypes = {lname: np.dtype(self.labels[lname].dtype) for lname in self.labels}
        slots = [self._image_slot, *self._label_slots.values()]
        self._encoders = {slot.name: slot.encoder for slot in slots}
        # running per-array digests: [hash, next sample] (None once a write was out of order)
        self._streams: dict[str, list | None] | None = (
            {slot.name: [hashlib.sha256(), 0] for slot in slots} if self.checksum else None)
        meta = f.create_group("meta")
        self._specimen = meta.create_dataset("specimen_id", shape=(n,), dtype=np.int64, track_times=False)
        self._index = meta.create_dataset("index", shape=(n,), dtype=np.int64, track_times=False)
        self._params = meta.create_dataset(
            "params", shape=(n,), dtype=h5py.string_dtype("utf-8"), track_times=False
        )
        # per-sample meta rows waiting to be written in one call per dataset (position ->
        # (specimen_id, index, params JSON)); at most _META_BATCH of them
        self._meta_pending: dict[int, tuple[int, int, str]] = {}
        self._geometry: dict[str, h5py.Dataset] = {}

    # ---- writing ----

    @property
    def n_written(self) -> int:
        """Number of distinct sample indices written so far."""
        return int(self._written.sum()) if hasattr(self, "_written") else 0

    def write(
        self,
        i: int,
        image: np.ndarray,
        labels: Mapping[str, np.ndarray],
        *,
        specimen_id: int,
        index: int,
        params: Mapping[str, Any],
        geometry: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write sample ``i``.

        Parameters
        ----------
        i : int
            Position in the file, ``0 <= i < n_samples``. Writing the same position twice
            overwrites it.
        image : numpy.ndarray
            Array of shape ``image_shape`` and dtype ``image_dtype``.
        labels : dict of str to numpy.ndarray
            One ``(H, W)`` array per declared label, each with its declared dtype.
        specimen_id : int
            Specimen (group for splitting) the sample belongs to.
        index : int
            Sample index used for regeneration (the ``spawn_key`` of its RNG).
        params : dict
            Every drawn parameter; stored as JSON (NumPy scalars/arrays and dataclasses are
            converted to plain Python values).
        geometry : dict of str to numpy.ndarray, optional
            Vector truth per sample (e.g. atom positions ``(n, 3)``), stored as float64 under
            ``/geometry/<name>``. All samples of one name must share the trailing shape.

        Raises
        ------
        DatasetError
            If the writer is closed, ``i`` is out of range, an array has the wrong shape or
            dtype, a label is missing or unknown, or ``params`` is not JSON-serialisable.
        """
        name = self.path.name
        if self._closed or self._file is None:
            raise DatasetError(f"{name}: writer is closed")
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.n_samples:
            raise DatasetError(f"{name}: sample position {i!r} out of range 0..{self.n_samples - 1}")
        i = int(i)
        image = np.asarray(image)
        if image.shape != self.image_shape:
            raise DatasetError(
                f"{name}: sample {i}: image has shape {image.shape}, expected {self.image_shape}"
            )
        if image.dtype != self.image_dtype:
            raise DatasetError(
                f"{name}: sample {i}: image has dtype {image.dtype}, expected {self.image_dtype}"
            )
        if not isinstance(labels, Mapping):
            raise DatasetError(f"{name}: sample {i}: labels must be a dict of name -> array")
        missing = sorted(set(self.labels) - set(labels))
        unknown = sorted(set(labels) - set(self.labels))
        if missing:
            raise DatasetError(f"{name}: sample {i}: missing label(s) {', '.join(map(repr, missing))}")
        if unknown:
            raise DatasetError(
                f"{name}: sample {i}: unknown label(s) {', '.join(map(repr, unknown))} "
                f"(declared: {', '.join(sorted(self.labels)) or 'none'})"
            )
        hw = self.image_shape[:2]
        label_arrays = {}
        for lname, spec in self.labels.items():
            arr = np.asarray(labels[lname])
            if arr.shape != hw:
                raise DatasetError(
                    f"{name}: sample {i}: label {lname!r} has shape {arr.shape}, expected {hw}"
                )
            if arr.dtype != self._label_dtypes[lname]:
                raise DatasetError(
                    f"{name}: sample {i}: label {lname!r} has dtype {arr.dtype}, expected {spec.dtype}"
                )
            label_arrays[lname] = arr
        for key, value in (("specimen_id", specimen_id), ("index", index)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DatasetError(f"{name}: sample {i}: {key} must be an int, got {value!r}")
        if not isinstance(params, Mapping):
            raise DatasetError(f"{name}: sample {i}: params must be a dict, got {type(params).__name__}")
        try:
            params_json = _dumps(dict(params))
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{name}: sample {i}: params cannot be stored as JSON: {exc}")
        geo_arrays = {}
        for gname, value in (geometry or {}).items():
            _check_name(self.path, "geometry", gname)
            try:
                arr = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise DatasetError(f"{name}: sample {i}: geometry {gname!r} is not numeric: {exc}")
            if arr.ndim == 0:
                arr = arr.reshape(1)
            ds = self._geometry.get(gname)
            if ds is not None and tuple(ds.attrs["row_shape"]) != arr.shape[1:]:
                raise DatasetError(
                    f"{name}: sample {i}: geometry {gname!r} has rows of shape {arr.shape[1:]}, "
                    f"earlier samples had {tuple(int(s) for s in ds.attrs['row_shape'])}"
                )
            geo_arrays[gname] = arr

        # all checks passed: write
        try:
            self._store(self._image_slot, i, image)
            for lname, arr in label_arrays.items():
                self._store(self._label_slots[lname], i, arr)
            self._meta_pending[i] = (int(specimen_id), int(index), params_json)
            if len(self._meta_pending) >= _META_BATCH:
                self._flush_meta()
            for gname, arr in geo_arrays.items():
                ds = self._geometry.get(gname)
                if ds is None:
                    grp = self._file.require_group("geometry")
                    ds = grp.create_dataset(
                        gname, shape=(self.n_samples,), dtype=h5py.vlen_dtype(np.float64),
                        track_times=False,
                    )
                    ds.attrs["row_shape"] = np.array(arr.shape[1:], dtype=np.int64)
                    self._geometry[gname] = ds
                ds[i] = arr.ravel()
        except OSError as exc:
            raise DatasetError(f"{name}: cannot write sample {i}: {exc}")
        self._written[i] = True

    def _flush_meta(self) -> None:
        """Write the pending ``/meta`` rows, one call per dataset and run of positions."""
        pending = self._meta_pending
        if not pending:
            return
        pos = sorted(pending)
        self._meta_pending = {}
        a = 0
        while a < len(pos):
            b = a + 1
            while b < len(pos) and pos[b] == pos[b - 1] + 1:
                b += 1
            rows = [pending[p] for p in pos[a:b]]
            lo, hi = pos[a], pos[b - 1] + 1
            self._specimen[lo:hi] = np.array([r[0] for r in rows], dtype=np.int64)
            self._index[lo:hi] = np.array([r[1] for r in rows], dtype=np.int64)
            self._params[lo:hi] = np.array([r[2] for r in rows], dtype=object)
            a = b

    def _store(self, slot: _ArraySlot, i: int, arr: np.ndarray) -> None:
        """Write sample ``i`` of an image/label dataset (one chunk), feeding its checksum."""
        data = slot.encoder.encode(arr)
        streams = self._streams
        if data is None:  # through HDF5's filters; its checksum is computed from the file
            slot.ds[i] = arr
            if streams is not None:
                streams[slot.name] = None
            return
        slot.dsid.write_direct_chunk((i,) + slot.tail, data, filter_mask=0)
        if streams is not None:
            st = streams[slot.name]
            if st is not None and st[1] == i:
                _chunk_record(st[0], 0, data)
                st[1] += 1
            else:
                streams[slot.name] = None

    def data_sha256(self) -> str:
        """:func:`data_sha256` of the file as written so far (before :meth:`close`).

        With ``checksum=True`` and every sample written once, in order, the images' and labels'
        digests are the ones kept while writing their chunks; otherwise (or for chunks written
        through HDF5's filters) they are computed by reading the stored chunks back.

        Raises
        ------
        DatasetError
            If the writer is closed.
        """
        if self._closed or self._file is None:
            raise DatasetError(f"{self.path.name}: writer is closed")
        known = {name: st[0].digest() for name, st in (self._streams or {}).items()
                 if st is not None and st[1] == self.n_samples}
        try:
            self._flush_meta()
            if len(known) < len(self._encoders):
                self._file.flush()  # chunks still in HDF5's cache: the stored bytes, as on disk
            return data_sha256(self._file, known)
        except OSError as exc:
            raise DatasetError(f"{self.path.name}: cannot read back what was written: {exc}")

    # ---- attributes and bulk copies ----

    @property
    def file(self) -> h5py.File:
        """The open temporary file, to read back what was written before :meth:`close`.

        For callers that need e.g. a checksum of the stored data; do not modify it (use
        :meth:`write` and :meth:`set_attrs`).
        """
        if self._closed or self._file is None:
            raise DatasetError(f"{self.path.name}: writer is closed")
        try:
            self._flush_meta()
        except OSError as exc:
            raise DatasetError(f"{self.path.name}: cannot write the samples' meta rows: {exc}")
        return self._file

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Set (or replace) root attributes before :meth:`close`.

        For values known only after the samples are written (e.g. a checksum). The same rules
        as the constructor's ``attrs`` apply: the writer's own attributes are reserved.

        Raises
        ------
        DatasetError
            If the writer is closed, a key is reserved or a value cannot be stored.
        """
        if self._closed or self._file is None:
            raise DatasetError(f"{self.path.name}: writer is closed")
        clash = sorted(set(attrs) & _RESERVED_ATTRS)
        if clash:
            raise DatasetError(
                f"{self.path.name}: attrs may not set {', '.join(clash)} (the writer sets these itself)"
            )
        for key in sorted(attrs):
            if not isinstance(key, str) or not key:
                raise DatasetError(f"{self.path.name}: attribute name {key!r} must be a non-empty str")
            value = _attr_value(self.path, key, attrs[key])
            try:
                self._file.attrs[key] = value
            except (OSError, ValueError, TypeError) as exc:
                raise DatasetError(f"{self.path.name}: cannot store attribute {key!r}: {exc}")

    def copy_from(self, source: str | os.PathLike, start: int) -> int:
        """Copy every sample of another dataset file into positions ``start, start + 1, ...``.

        Used to join shards (:mod:`twin.shards`). Images and labels whose chunk shape and filter
        pipeline match this writer's are copied as raw compressed chunks (no decompression);
        otherwise they are decoded and re-encoded. Root attributes of ``source`` are not copied.

        Parameters
        ----------
        source : path
            An emtwin dataset file (complete or not) with the same image shape/dtype and labels.
        start : int
            Position of the source's first sample in this file.

        Returns
        -------
        int
            Number of samples copied.

        Raises
        ------
        DatasetError
            If the source cannot be read, does not match this writer's layout or does not fit.
        """
        name = self.path.name
        if self._closed or self._file is None:
            raise DatasetError(f"{name}: writer is closed")
        src_path = Path(os.fspath(source))
        try:
            src = h5py.File(src_path, "r")
        except OSError as exc:
            raise DatasetError(f"{src_path}: cannot open it to copy from: {exc}")
        try:
            try:
                m = self._copy_all(src, src_path, int(start))
            except (OSError, KeyError, ValueError, TypeError) as exc:
                raise DatasetError(f"{name}: cannot copy samples from {src_path}: {exc}")
        finally:
            src.close()
        return m

    def _copy_all(self, src: h5py.File, src_path: Path, start: int) -> int:
        name = self.path.name
        self._flush_meta()  # rows written before are overwritten by the copy, as they were
        images = src["images"]
        m = int(images.shape[0])
        if images.shape[1:] != self.image_shape or images.dtype != self.image_dtype:
            raise DatasetError(
                f"{name}: {src_path.name} has images {images.shape[1:]} {images.dtype}, "
                f"expected {self.image_shape} {self.image_dtype}"
            )
        if not 0 <= start <= self.n_samples - m:
            raise DatasetError(
                f"{name}: {m} samples from {src_path.name} at position {start} do not fit in "
                f"{self.n_samples}"
            )
        src_labels = set(src["labels"].keys()) if "labels" in src else set()
        if src_labels != set(self.labels):
            raise DatasetError(
                f"{name}: {src_path.name} has labels {sorted(src_labels)}, expected {sorted(self.labels)}"
            )
        pairs = [(images, self._images)]
        for lname in sorted(self.labels):
            s = src["labels"][lname]
            if s.dtype != np.dtype(self.labels[lname].dtype):
                raise DatasetError(
                    f"{name}: {src_path.name} label {lname!r} is {s.dtype}, expected "
                    f"{self.labels[lname].dtype}"
                )
            pairs.append((s, self._label_ds[lname]))
        for s, d in pairs:
            _copy_chunks(s, d, start, m)
        for key, dst in (("specimen_id", self._specimen), ("index", self._index),
                         ("params", self._params)):
            dst[start:start + m] = src["meta"][key][...]
        if "geometry" in src:
            for gname, s in src["geometry"].items():
                d = self._geometry.get(gname)
                row = np.asarray(s.attrs.get("row_shape", np.zeros(0, np.int64)), dtype=np.int64)
                if d is None:
                    grp = self._file.require_group("geometry")
                    d = grp.create_dataset(gname, shape=(self.n_samples,),
                                           dtype=h5py.vlen_dtype(np.float64), track_times=False)
                    d.attrs["row_shape"] = row
                    self._geometry[gname] = d
                elif tuple(d.attrs["row_shape"]) != tuple(row):
                    raise DatasetError(f"{name}: geometry {gname!r} of {src_path.name} has rows "
                                       f"of shape {tuple(row)}, expected {tuple(d.attrs['row_shape'])}")
                for k in range(m):
                    d[start + k] = s[k]
        self._written[start:start + m] = True
        return m

    # ---- finishing ----

    def close(self) -> None:
        """Finish the file: mark it complete and rename it to ``path``.

        Raises
        ------
        DatasetError
            If not every sample was written (the temporary file is removed and ``path`` is left
            as it was) or the file cannot be finished.
        """
        if self._closed:
            return
        missing = self.n_samples - self.n_written
        if missing:
            self._abort()
            first = int(np.flatnonzero(~self._written)[0])
            raise DatasetError(
                f"{self.path}: dataset is incomplete: {missing} of {self.n_samples} samples were "
                f"not written (first missing: {first}); no file was written"
            )
        try:
            assert self._file is not None and self._tmp is not None
            self._flush_meta()
            self._file.attrs["complete"] = True
            self._file.close()
            self._file = None
            if self.durable:
                fd = os.open(self._tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._abort()
            raise DatasetError(f"{self.path}: cannot finish the file: {exc}")
        self._tmp = None
        self._closed = True

    def abort(self) -> None:
        """Discard everything written: close and remove the temporary file."""
        self._abort()

    def _abort(self) -> None:
        self._closed = True
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except Exception:  # pragma: no cover - best effort cleanup
                pass
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        self.close()

    def __del__(self) -> None:
        # An abandoned writer never leaves a temporary file behind.
        try:
            if not getattr(self, "_closed", True):
                self._abort()
        except Exception:  # pragma: no cover
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.n_written}/{self.n_samples} written"
        return f"DatasetWriter({str(self.path)!r}, {state})"


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


class EmtwinDataset:
    """Read-only, lazy, worker-safe view of an emtwin dataset file.

    The file is validated and closed on construction; only metadata is kept. The HDF5 handle is
    opened on first data access and re-opened in a new process (after ``fork``, or after
    unpickling), so one instance can be handed to DataLoader workers.

    Parameters
    ----------
    path : str or os.PathLike
        The dataset file.
    allow_incomplete : bool, optional
        Accept a file whose ``complete`` attribute is False (e.g. a shard of an interrupted run).

    Raises
    ------
    DatasetError
        If the file is missing, not HDF5, truncated or corrupt, not an emtwin dataset, of an
        unsupported ``format_version``, incomplete, or lacks required groups.
    """

    def __init__(self, path: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.path = Path(os.fspath(path))
        self._file: h5py.File | None = None
        self._pid: int | None = None
        p = self.path
        if not p.exists():
            shards = p.with_name(p.name + ".shards")
            if shards.is_dir():  # a sharded run (twin.shards) is in progress or was interrupted
                raise DatasetError(
                    f"{p}: dataset is incomplete: generation is running or was interrupted "
                    f"(its shards are in {shards}); rerun 'twin generate' to finish it"
                )
            raise DatasetError(f"{p}: no such file")
        if not p.is_file():
            raise DatasetError(f"{p}: not a file")
        try:
            f = h5py.File(p, "r")
        except OSError as exc:
            if not h5py.is_hdf5(p):
                raise DatasetError(f"{p}: not an HDF5 file (and so not an emtwin dataset)")
            raise DatasetError(f"{p}: file is truncated or corrupt (HDF5 could not open it: {exc})")
        try:
            self._read_metadata(f, allow_incomplete)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{p}: file is truncated or corrupt (cannot read its layout: {exc})")
        finally:
            f.close()

    def _read_metadata(self, f: h5py.File, allow_incomplete: bool) -> None:
        p = self.path
        attrs = {k: _py(f.attrs[k]) for k in f.attrs.keys()}
        if "format" not in attrs:
            raise DatasetError(f"{p}: not an emtwin dataset (no 'format' attribute)")
        if attrs["format"] != FORMAT:
            raise DatasetError(
                f"{p}: not an emtwin dataset (format is {attrs['format']!r}, expected {FORMAT!r})"
            )
        version = attrs.get("format_version")
        if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
            supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise DatasetError(
                f"{p}: format_version {version} is not supported by this emtwin "
                f"(supports {supported}); upgrade emtwin or regenerate the dataset"
            )
        if attrs.get("complete") is not True and not allow_incomplete:
            raise DatasetError(
                f"{p}: dataset is incomplete (complete={attrs.get('complete')}): "
                "generation did not finish"
            )
        for required in ("images", "labels", "meta", "meta/specimen_id", "meta/index", "meta/params"):
            if required not in f:
                raise DatasetError(f"{p}: not a valid emtwin dataset (missing '/{required}')")
        images = f["images"]
        if not isinstance(images, h5py.Dataset) or images.ndim not in (3, 4):
            raise DatasetError(f"{p}: not a valid emtwin dataset ('/images' is not an (N, H, W[, C]) array)")
        n = int(images.shape[0])
        if attrs.get("n_samples", n) != n:
            raise DatasetError(
                f"{p}: n_samples attribute {attrs.get('n_samples')} does not match /images ({n})"
            )
        self.attrs: dict[str, Any] = attrs
        self.n_samples: int = n
        self.image_shape: tuple[int, ...] = tuple(int(s) for s in images.shape[1:])
        self.image_dtype: np.dtype = images.dtype
        for key in ("meta/specimen_id", "meta/index", "meta/params"):
            if f[key].shape != (n,):
                raise DatasetError(f"{p}: '/{key}' has shape {f[key].shape}, expected ({n},)")
        self._label_attrs: dict[str, dict[str, Any]] = {}
        for lname, ds in f["labels"].items():
            if not isinstance(ds, h5py.Dataset) or ds.shape != (n, *self.image_shape[:2]):
                raise DatasetError(
                    f"{p}: label '{lname}' has shape {getattr(ds, 'shape', None)}, "
                    f"expected {(n, *self.image_shape[:2])}"
                )
            la = {k: _py(ds.attrs[k]) for k in ds.attrs.keys()}
            la["classes"] = list(la.get("classes", []))
            la["dtype"] = ds.dtype.name
            self._label_attrs[lname] = la
        self._geometry_rows: dict[str, tuple[int, ...]] = {}
        if "geometry" in f:
            for gname, ds in f["geometry"].items():
                row = ds.attrs.get("row_shape", np.zeros(0, dtype=np.int64))
                self._geometry_rows[gname] = tuple(int(s) for s in np.asarray(row).ravel())

    # ---- handle management ----

    def _h5(self) -> h5py.File:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            # After fork the inherited handle belongs to the parent: never use or close it here.
            self._file = None
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as exc:
                raise DatasetError(f"{self.path}: cannot re-open the file: {exc}")
            self._pid = pid
        return self._file

    def close(self) -> None:
        """Close the HDF5 handle (data access re-opens it)."""
        f, self._file = self._file, None
        if f is not None and self._pid == os.getpid():
            try:
                f.close()
            except Exception:  # pragma: no cover
                pass
        self._pid = None

    def __enter__(self) -> "EmtwinDataset":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ---- metadata ----

    def __len__(self) -> int:
        return self.n_samples

    @property
    def label_names(self) -> list[str]:
        """Names of the stored label maps, sorted."""
        return sorted(self._label_attrs)

    @property
    def geometry_names(self) -> list[str]:
        """Names of the stored per-sample geometries, sorted (possibly empty)."""
        return sorted(self._geometry_rows)

    def label_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of label ``name``: kind, classes (list of str), description, dtype.

        Raises
        ------
        DatasetError
            If there is no such label.
        """
        self._check_label(name)
        la = self._label_attrs[name]
        return {**la, "classes": list(la["classes"])}

    def _check_label(self, name: str) -> None:
        if name not in self._label_attrs:
            raise DatasetError(
                f"{self.path}: no label {name!r} (available: {', '.join(self.label_names) or 'none'})"
            )

    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"sample index must be an int, got {type(i).__name__}")
        j = int(i)
        if j < 0:
            j += self.n_samples
        if not 0 <= j < self.n_samples:
            raise IndexError(f"sample {i} out of range for {self.n_samples} samples")
        return j

    def _read(self, what: str, fn):
        try:
            return fn(self._h5())
        except OSError as exc:
            hint = ""
            if "filter" in str(exc).lower():
                hint = " (is hdf5plugin installed? 'lz4' files need it)"
            raise DatasetError(f"{self.path}: cannot read {what}: {exc}{hint}")

    # ---- data ----

    def image(self, i: int) -> np.ndarray:
        """Image of sample ``i``, shape ``image_shape``, dtype ``image_dtype``."""
        j = self._index(i)
        return self._read(f"image {j}", lambda f: f["images"][j])

    def label(self, name: str, i: int) -> np.ndarray:
        """Label map ``name`` of sample ``i``, shape ``(H, W)``."""
        self._check_label(name)
        j = self._index(i)
        return self._read(f"label {name!r} of sample {j}", lambda f: f["labels"][name][j])

    def params(self, i: int) -> dict[str, Any]:
        """Drawn parameters of sample ``i`` (decoded JSON)."""
        j = self._index(i)
        raw = self._read(f"params of sample {j}", lambda f: f["meta/params"][j])
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{self.path}: params of sample {j} are not valid JSON: {exc}")

    def specimen_ids(self) -> np.ndarray:
        """``(N,)`` int64 specimen id of every sample (the grouping for splits)."""
        return self._read("/meta/specimen_id", lambda f: f["meta/specimen_id"][...].astype(np.int64))

    def indices(self) -> np.ndarray:
        """``(N,)`` int64 regeneration index of every sample."""
        return self._read("/meta/index", lambda f: f["meta/index"][...].astype(np.int64))

    def geometry(self, name: str, i: int) -> np.ndarray:
        """Geometry ``name`` of sample ``i`` as float64, shape ``(n, *row_shape)``.

        Samples written without this geometry give an empty array.
        """
        if name not in self._geometry_rows:
            raise DatasetError(
                f"{self.path}: no geometry {name!r} "
                f"(available: {', '.join(self.geometry_names) or 'none'})"
            )
        j = self._index(i)
        flat = self._read(f"geometry {name!r} of sample {j}", lambda f: f["geometry"][name][j])
        flat = np.asarray(flat, dtype=np.float64)
        row = self._geometry_rows[name]
        width = math.prod(row)
        if row and width and flat.size % width == 0:
            return flat.reshape(-1, *row)
        return flat

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i`` as ``dict(image, labels, specimen_id, index, params)``."""
        j = self._index(i)

        def read(f: h5py.File) -> dict[str, Any]:
            return {
                "image": f["images"][j],
                "labels": {name: f["labels"][name][j] for name in self.label_names},
                "specimen_id": int(f["meta/specimen_id"][j]),
                "index": int(f["meta/index"][j]),
            }

        out = self._read(f"sample {j}", read)
        out["params"] = self.params(j)
        return out

    def __repr__(self) -> str:
        return (
            f"EmtwinDataset({str(self.path)!r}, n_samples={self.n_samples}, "
            f"image={self.image_shape} {self.image_dtype}, labels={self.label_names})"
        )


def open_dataset(path: str | os.PathLike, *, allow_incomplete: bool = False) -> EmtwinDataset:
    """Open and validate an emtwin dataset file.

    Parameters
    ----------
    path : str or os.PathLike
        The dataset file.
    allow_incomplete : bool, optional
        Accept a file whose ``complete`` attribute is False.

    Returns
    -------
    EmtwinDataset
        Lazy reader; the HDF5 file is opened on first data access.

    Raises
    ------
    DatasetError
        If the file is missing, corrupt, not an emtwin dataset, of an unknown format_version, or
        incomplete.
    """
    return EmtwinDataset(path, allow_incomplete=allow_incomplete)
