"""Sharded, parallel, resumable and distributed generation (DESIGN.md section 7).

A run of ``N`` samples is cut into shards of ``shard_size`` consecutive sample indices. Each shard
is one task (:func:`run_shard`, a plain top-level function, so it pickles to a process pool or a
Dask worker) that generates its samples and writes them to its own file with
:class:`twin.dataset.DatasetWriter` (temporary name + rename: a shard file either is complete or
does not exist). Because sample ``i`` draws only from ``SeedSequence(root_seed, spawn_key=(i,))``
(:mod:`twin.seeding`), a shard's bytes do not depend on which process, machine or thread count
made it. When every shard is there they are joined into the final file, again written under a
temporary name and renamed, with the layout of DESIGN.md section 3.

On disk, for an output ``OUT.h5``::

    OUT.h5.shards/                  exists only while a run is unfinished (or with keep_shards)
        manifest.json               what the run is: recipe/instrument hashes, seed, n, shard size,
                                    compression; a resume with other values is refused
        .lock                       flock()ed by the running ``twin generate`` (one writer at a time)
        shard-000000.h5             samples [0, shard_size): a complete emtwin dataset of its own,
        shard-000001.h5             with root attrs shard_index, shard_start, shard_stop,
        ...                         run_fingerprint, shard_sha256 (a digest of its data, computed
                                    while writing it) and shard_checksum (the digest's scheme)
    OUT.h5                          appears (atomically) only when the whole run is complete

So a reader opened during a run sees either the previous complete ``OUT.h5`` or no file, and
:func:`twin.dataset.open_dataset` then says the dataset is incomplete (the ``.shards`` directory
is there). A rerun (after a crash, ``SIGKILL``, Ctrl-C, a full disk) verifies every shard file
already there against its checksum, keeps the good ones, regenerates missing or corrupt ones,
and joins; nothing finished is recomputed. That check is also why shard files are not
``fsync``-ed (``DatasetWriter(durable=False)``; ~0.8 ms of wall time per 512x512 sample here):
one that an OS crash or power loss leaves truncated fails it and is regenerated. The final file
is ``fsync``-ed before its rename.

Joining: a merge, not HDF5 virtual datasets (VDS). Measured by ``bench/scaling.py`` (512x512 SEM
samples, lz4, 128 samples in 16 shards, 2-core machine, page cache, two runs): the raw-chunk
merge used here (compressed chunks copied with ``read_direct_chunk``/``write_direct_chunk``, no
decompression) joins ~2,000-2,100 samples/s (~900-950 MB/s), 4.5-5x faster than decoding and
re-encoding (~420-450/s) and ~2-2.5 % of the time it took to generate the samples. A VDS is
built in ~8 ms, but reading it was 2.2-3.8x slower in order (~570-1,040 vs ~2,200-2,300
samples/s) and 1.2-1.6x slower in random order (~1,400-2,000 vs ~2,300); it is also thousands
of files that must move together (one open handle per shard file while reading) whose source
paths every reader (h5py in the SDK, other HDF5 tools) must resolve. (HDF5 2.0 does map the
variable-length ``params`` through a VDS.) The merged file is one self-contained file that reads
like a single-process run's and holds the same data whatever the number of workers. The cost
is transient disk space: shards + final file until the shards are deleted.

Processes and threads: local workers are ``spawn``-ed (``fork`` is unsafe with Numba's thread
pool) with ``NUMBA_NUM_THREADS``/``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS``
set to ``max(1, cores // workers)`` in their environment, so ``N`` workers do not oversubscribe
the cores. Dask tasks set Numba's thread count to ``max(1, cores of the host // Dask threads on
the host)``. Starting a worker (spawn, importing NumPy/SciPy/Numba, loading the cached kernels)
costs ~1-1.5 s, once per run: ``workers=1`` (generation in the calling process) is faster for
runs of a few seconds. A worker exits by itself if its parent dies (e.g. ``SIGKILL``), so no
orphan keeps writing shards.

Dask clusters: the workers must be able to import emtwin, and (unless ``return_shards``) reach
the output's directory under the same path. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536``
in its workers, which disables glibc's dynamic mmap threshold, so every multi-MB NumPy temporary
is mmap'd and page-faulted afresh: one 512x512 SEM sample took 32.7 instead of 25.4 ms on one
thread here (29 % slower). Start emtwin workers with that variable unset, e.g. in the Dask
config ``distributed: {nanny: {pre-spawn-environ: {MALLOC_TRIM_THRESHOLD_: null}}}`` (or
``dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})``
before creating a ``LocalCluster``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import h5py
import numpy as np

from twin.dataset import (
    CHECKSUM_SCHEME,
    FORMAT_VERSION,
    DatasetError,
    DatasetWriter,
    EmtwinDataset,
    LabelSpec,
    _dumps,
    _py,
    data_sha256,
)
from twin.errors import EmtwinError

__all__ = [
    "GenerationError",
    "RunSpec",
    "ShardJob",
    "ShardResult",
    "ShardedDataset",
    "THREAD_ENV_VARS",
    "default_shard_size",
    "generate_sharded",
    "open_sharded",
    "tune_allocator",
    "run_shard",
    "shard_dir_for",
    "verify_shard",
]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "emtwin-shards"
MANIFEST_VERSION = 1
LOCK = ".lock"
SHARD_LOG_ENV = "EMTWIN_SHARD_LOG"
THREAD_ENV_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                   "MKL_NUM_THREADS")
# with the default worker count, runs whose remaining work would take less than this in the
# calling process stay there (worker start-up, ~1-1.5 s, would not pay off)
AUTO_POOL_MIN_S = 5.0
_SHARD_ATTRS = ("shard_index", "shard_start", "shard_stop", "shard_size", "run_fingerprint",
                "shard_sha256", "shard_checksum")


#: set to 1 to leave glibc's allocator settings alone (see :func:`tune_allocator`)
NO_MALLOC_TUNING_ENV = "EMTWIN_NO_MALLOC_TUNING"
_MALLOC_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                    "MALLOC_MMAP_MAX_")
_malloc_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep the multi-MB per-sample arrays in glibc's heap (once per process; Linux/glibc).

    glibc serves blocks above a dynamic threshold (128 KiB, raised to the largest block freed)
    with ``mmap`` and gives the heap's free top back above a trim threshold, so which of a
    sample's 0.25-4 MB arrays (coordinates, labels, signal, HDF5/Blosc chunk buffers, tile
    lists) come back as fresh pages depends on the allocation history; every fresh 4 KiB page
    is a page fault (~1.5 us on the VMs measured). Measured on the SEM recipe, one thread:
    100-550 faults and 0.7-1.8 ms of system time per sample, varying from run to run; with
    ``M_MMAP_THRESHOLD`` = 32 MiB and ``M_TRIM_THRESHOLD`` = 256 MiB, ~30 faults and ~0.6-0.8 ms
    less CPU per sample. The cost: freed memory stays in the process (up to the peak of a
    sample, tens of MB) instead of going back to the OS.

    Called by :func:`write_shard`. Does nothing when one of glibc's ``MALLOC_*_`` variables is
    set (e.g. by a Dask nanny), when ``EMTWIN_NO_MALLOC_TUNING=1``, or off glibc. Returns
    whether the settings were applied (in this call or before).
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if os.environ.get(NO_MALLOC_TUNING_ENV, "") not in ("", "0") or any(
            v in os.environ for v in _MALLOC_ENV_VARS) or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 32 << 20) == 1 and mallopt(m_trim_threshold, 256 << 20) == 1
    _malloc_tuned = bool(ok)
    return _malloc_tuned


class GenerationError(EmtwinError):
    """A run could not finish; finished shards are kept and a rerun resumes.

    The message is one line: what failed, where the finished shards are, what to do.
    """


# --------------------------------------------------------------------------------------------
# What a run is
# --------------------------------------------------------------------------------------------


def default_shard_size(n_samples: int) -> int:
    """Samples per shard when none is given: ``clip(ceil(n / 256), 16, 256)``.

    Depends on ``n`` only (never on the number of workers), so a resume with other workers finds
    the same shards. At most ~256 shards up to 65,536 samples (enough to balance hundreds of
    workers), shards of 256 samples beyond that (bounded work lost per crash, a bounded
    per-task scheduler overhead); at least 16 samples per shard so that the per-shard costs do
    not dominate: a shard file's writer set-up (~26 attributes, 6 datasets: ~2.5 ms of CPU), its
    checksum, close, verification and merge cost ~4 ms per shard beyond its samples, ~0.5 ms per
    512x512 SEM sample (~4 % of its ~12.7 ms) at 8 samples per shard, half that at 16 (measured
    on 2 cores, 32 samples per process). The minimum only matters below 4,096 samples; there a
    crash loses at most 16 samples per worker (~0.2 s of SEM work, seconds of multislice), and
    a run of ``n`` samples still has ``n / 16`` shards to balance (4 per worker at 64 samples
    per worker).
    """
    return int(min(256, max(16, math.ceil(n_samples / 256))))


@dataclass(frozen=True)
class RunSpec:
    """Everything a shard task needs, self-contained (no paths to the recipe or profile).

    Attributes
    ----------
    recipe_text, instrument_text : str
        YAML texts (the worker parses them; it needs no access to the user's files).
    seed : int
        Root seed.
    n_samples, shard_size : int
        Size of the run and of its shards (the last shard may be shorter).
    compression : str
        Filter of every file (``twin.dataset.COMPRESSIONS``).
    image_shape : tuple of int
    image_dtype : str
    labels : dict of str to LabelSpec
    attrs : dict
        Root attributes of the final file (and of every shard).
    """

    recipe_text: str
    instrument_text: str
    seed: int
    n_samples: int
    shard_size: int
    compression: str
    image_shape: tuple[int, ...]
    image_dtype: str
    labels: Mapping[str, LabelSpec]
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return -(-self.n_samples // self.shard_size)

    def shard_range(self, k: int) -> tuple[int, int]:
        """``(start, stop)`` sample indices of shard ``k``."""
        if not 0 <= k < self.n_shards:
            raise IndexError(f"shard {k} out of range 0..{self.n_shards - 1}")
        start = k * self.shard_size
        return start, min(self.n_samples, start + self.shard_size)

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (stored in the manifest)."""
        return {
            "recipe_sha256": hashlib.sha256(self.recipe_text.encode("utf-8")).hexdigest(),
            "instrument_sha256": hashlib.sha256(self.instrument_text.encode("utf-8")).hexdigest(),
            "seed": int(self.seed),
            "n_samples": int(self.n_samples),
            "shard_size": int(self.shard_size),
            "compression": self.compression,
            "format_version": FORMAT_VERSION,
        }

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(_dumps(self.identity()).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ShardJob:
    """One task: generate shard ``shard`` of ``spec``.

    ``path`` is where the worker writes the shard file (a directory all workers can reach);
    ``None`` makes the worker return the file's bytes instead (:attr:`ShardResult.data`).
    ``threads`` caps Numba's threads in the task; ``threads_by_host`` (Dask) gives it per host.
    """

    spec: RunSpec
    shard: int
    path: str | None
    threads: int | None = None
    threads_by_host: Mapping[str, int] | None = None


@dataclass(frozen=True)
class ShardResult:
    """What a task returns: its range, the checksum, timing, and the bytes if asked."""

    shard: int
    start: int
    stop: int
    sha256: str
    seconds: float
    data: bytes | None = None


def shard_dir_for(out: str | os.PathLike) -> Path:
    """The shard directory of an output file: ``OUT.h5`` -> ``OUT.h5.shards``."""
    p = Path(os.fspath(out))
    return p.with_name(p.name + ".shards")


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.h5"


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def verify_shard(path: str | os.PathLike, spec: RunSpec, k: int, *, full: bool = True) -> str | None:
    """Check a shard file; return ``None`` if it is good, else why it is not (one line).

    Checks that it is a complete emtwin dataset of this run (fingerprint), has shard ``k``'s
    range and indices, and (``full``) that its arrays match the stored checksum.
    """
    p = Path(os.fspath(path))
    start, stop = spec.shard_range(k)
    try:
        with h5py.File(p, "r") as f:
            a = {key: _py(f.attrs[key]) for key in f.attrs.keys()}
            if a.get("complete") is not True:
                return "not marked complete"
            if a.get("run_fingerprint") != spec.fingerprint:
                return "written by a different run (fingerprint differs)"
            got = (a.get("shard_index"), a.get("shard_start"), a.get("shard_stop"))
            if got != (k, start, stop):
                return f"holds shard/start/stop {got}, expected {(k, start, stop)}"
            if f["images"].shape != (stop - start, *spec.image_shape):
                return f"images have shape {f['images'].shape}"
            if not np.array_equal(f["meta/index"][...], np.arange(start, stop)):
                return "sample indices do not match its range"
            if a.get("shard_checksum") != CHECKSUM_SCHEME:
                return (f"its checksum is of another scheme ({a.get('shard_checksum')!r}, "
                        f"expected {CHECKSUM_SCHEME!r}: written by another emtwin version)")
            if full and data_sha256(f) != a.get("shard_sha256"):
                return "checksum mismatch (its data are corrupt)"
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------

_PIPELINES: dict[tuple[str, str, int], Any] = {}


def _pipeline(spec: RunSpec):
    """Pipeline of a run, built once per process (parsing is cheap, but keep the specimen cache)."""
    key = (spec.recipe_text, spec.instrument_text, int(spec.seed))
    pipe = _PIPELINES.get(key)
    if pipe is None:
        from twin.generate import pipeline_from_text

        _PIPELINES.clear()
        pipe = _PIPELINES[key] = pipeline_from_text(spec.recipe_text, spec.instrument_text, spec.seed)
    return pipe


def _set_numba_threads(n: int) -> None:
    """Cap Numba's threads for the calling thread (results do not depend on it, DESIGN §2)."""
    if "numba" not in sys.modules:
        return
    import numba

    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _task_threads(job: ShardJob) -> int | None:
    if job.threads_by_host:
        try:
            from distributed import get_worker
            from urllib.parse import urlparse

            host = urlparse(get_worker().address).hostname
            return int(job.threads_by_host.get(host, job.threads or 1))
        except (ImportError, ValueError):
            return job.threads or 1
    return job.threads


def _log_shard(job: ShardJob, start: int, stop: int, seconds: float) -> None:
    log = os.environ.get(SHARD_LOG_ENV)
    if not log:
        return
    threads = sys.modules["numba"].get_num_threads() if "numba" in sys.modules else 0
    line = f"{job.shard} {start} {stop} {os.getpid()} {seconds:.3f} {threads}\n".encode()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write with O_APPEND: lines from processes never interleave
    finally:
        os.close(fd)


def write_shard(spec: RunSpec, k: int, path: str | os.PathLike,
                on_sample: Callable[[int], None] | None = None) -> str:
    """Generate shard ``k`` of ``spec`` into ``path`` (atomically); return its checksum."""
    start, stop = spec.shard_range(k)
    tune_allocator()
    pipe = _pipeline(spec)
    shard_attrs = dict(spec.attrs)
    shard_attrs.update(shard_index=k, shard_start=start, shard_stop=stop,
                       shard_size=spec.shard_size, run_fingerprint=spec.fingerprint)
    with DatasetWriter(path, n_samples=stop - start, image_shape=spec.image_shape,
                       image_dtype=spec.image_dtype, labels=spec.labels, attrs=shard_attrs,
                       compression=spec.compression, durable=False, checksum=True) as writer:
        for i in range(start, stop):
            try:
                s = pipe.generate(i)
            except ValueError as exc:  # a drawn parameter the generators cannot honour
                raise GenerationError(f"sample {i}: {exc}") from exc
            writer.write(i - start, s.image, s.labels, specimen_id=s.specimen_id, index=s.index,
                         params=s.params, geometry=getattr(s, "geometry", None) or None)
            if on_sample is not None:
                on_sample(i)
        # the images' and labels' digests were kept as their chunks were written
        digest = writer.data_sha256()
        writer.set_attrs({"shard_sha256": digest, "shard_checksum": CHECKSUM_SCHEME})
    return digest


def run_shard(job: ShardJob) -> ShardResult:
    """Generate one shard (the task run by a process pool or a Dask worker).

    Writes ``job.path`` (or, when it is ``None``, a temporary file whose bytes are returned).
    Appends ``"<shard> <start> <stop> <pid> <seconds> <numba threads>"`` to the file named by
    the environment variable ``EMTWIN_SHARD_LOG``, if set, after the shard is written.

    Raises
    ------
    GenerationError
        If the shard cannot be generated or written (the message names the shard and range).
    """
    t0 = time.perf_counter()
    spec, k = job.spec, job.shard
    start, stop = spec.shard_range(k)
    threads = _task_threads(job)
    try:
        _pipeline(spec)  # imports Numba, so the thread cap below applies
        if threads:
            _set_numba_threads(threads)
        data = None
        if job.path is not None:
            digest = write_shard(spec, k, job.path)
        else:
            with tempfile.TemporaryDirectory(prefix="emtwin-shard-") as tmp:
                p = Path(tmp) / shard_name(k)
                digest = write_shard(spec, k, p)
                data = p.read_bytes()
    except (EmtwinError, OSError) as exc:
        raise GenerationError(f"shard {k} (samples {start}..{stop - 1}): {exc}") from None
    seconds = time.perf_counter() - t0
    _log_shard(job, start, stop, seconds)
    return ShardResult(shard=k, start=start, stop=stop, sha256=digest, seconds=seconds, data=data)


def _watch_parent(ppid: int, interval: float = 0.2) -> None:
    while os.getppid() == ppid:
        time.sleep(interval)
    os._exit(1)  # the parent died (e.g. SIGKILL): stop; a half-written shard is a temporary file


def _init_worker(threads: int, ppid: int) -> None:
    """Process-pool initializer.

    Caps threads (the environment was already set by the parent when it spawned this process,
    before Numba could be imported), leaves Ctrl-C to the parent (which stops the pool), and
    exits if the parent dies, so no orphan keeps writing shards.
    """
    import signal
    import threading

    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)
    _set_numba_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True,
                     name="emtwin-parent-watch").start()


def _new_pool(n_workers: int) -> tuple[ProcessPoolExecutor, int]:
    """A ``spawn`` process pool and the threads per worker, ``max(1, cores // n_workers)``.

    Submit the first ``n_workers`` tasks inside ``_child_env(threads)``: processes are spawned
    by ``submit`` and inherit that environment.
    """
    import multiprocessing as mp

    threads = max(1, _cpu_count() // n_workers)
    ex = ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads, os.getpid()))
    return ex, threads


@contextlib.contextmanager
def _child_env(threads: int) -> Iterator[None]:
    """Set the thread variables in ``os.environ`` while worker processes are spawned."""
    old = {v: os.environ.get(v) for v in THREAD_ENV_VARS}
    try:
        for v in THREAD_ENV_VARS:
            os.environ[v] = str(threads)
        yield
    finally:
        for v, val in old.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val


# --------------------------------------------------------------------------------------------
# The run (orchestration, in the calling process)
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _file_compression(ds: h5py.Dataset) -> str:
    filters = ds._filters  # noqa: SLF001 - h5py's decoded filter pipeline
    if "gzip" in filters:
        return "gzip"
    if "32001" in filters or 32001 in filters:
        return "lz4"
    return "none"


def _existing_output(out: Path, spec: RunSpec) -> str | None:
    """``None`` if ``out`` is a complete dataset of exactly this run, else what differs."""
    try:
        with h5py.File(out, "r") as f:
            a = {k: _py(f.attrs[k]) for k in f.attrs.keys()}
            if a.get("format") != "emtwin-dataset":
                return "it is not an emtwin dataset"
            if a.get("complete") is not True:
                return "it is incomplete"
            diffs = []
            for key in ("recipe", "instrument", "root_seed", "n_samples"):
                want = {"recipe": spec.recipe_text, "instrument": spec.instrument_text,
                        "root_seed": spec.seed, "n_samples": spec.n_samples}[key]
                if a.get(key) != want:
                    diffs.append(key)
            if _file_compression(f["images"]) != spec.compression:
                diffs.append("compression")
            if diffs:
                return "its " + ", ".join(diffs) + " differ"
    except (OSError, KeyError, TypeError, ValueError) as exc:
        return f"it cannot be read as an emtwin dataset ({exc})"
    return None


class _Lock:
    """An exclusive ``flock`` on ``DIR/.lock`` (released by the kernel if the process dies)."""

    def __init__(self, directory: Path, out: Path) -> None:
        self.path = directory / LOCK
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise GenerationError(f"{out}: cannot create the lock file {self.path}: "
                                  f"{exc.strerror or exc}") from None
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except OSError:
            os.close(self.fd)
            raise GenerationError(
                f"{out}: another 'twin generate' is writing this output right now "
                f"(lock {self.path} is held); wait for it or use another output name"
            ) from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _is_ours(name: str) -> bool:
    return (name in (MANIFEST, LOCK) or (name.startswith("shard-") and name.endswith(".h5"))
            or (name.startswith(".") and ".tmp-" in name))


def _clear_dir(d: Path, out: Path) -> None:
    """Remove a shard directory's contents (refusing anything that is not ours)."""
    foreign = [p.name for p in d.iterdir() if not _is_ours(p.name) or not p.is_file()]
    if foreign:
        raise GenerationError(
            f"{out}: {d} holds files that are not emtwin shards ({', '.join(sorted(foreign)[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); remove them yourself"
        )
    for p in d.iterdir():
        if p.name != LOCK:
            p.unlink()


def _read_manifest(d: Path) -> dict[str, Any] | None:
    p = d / MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable manifest: treated as absent (its shards fail verification)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        return None
    return m


def _manifest(spec: RunSpec) -> dict[str, Any]:
    import datetime as _dt

    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **spec.identity(),
            "fingerprint": spec.fingerprint, "n_shards": spec.n_shards,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _threads_by_host(client) -> dict[str, int]:
    """Numba threads per task on each Dask host: ``max(1, cores // Dask threads there)``."""
    from urllib.parse import urlparse

    info = client.scheduler_info(**({"n_workers": -1} if _accepts_n_workers(client) else {}))
    workers = info.get("workers", {})
    cores = client.run(_cpu_count)
    per_host: dict[str, list[int]] = {}
    for addr, w in workers.items():
        host = urlparse(addr).hostname or addr
        nthreads, ncores = int(w.get("nthreads", 1)), int(cores.get(addr, 1))
        t, c = per_host.get(host, [0, 0])
        per_host[host] = [t + nthreads, max(c, ncores)]
    return {host: max(1, c // max(1, t)) for host, (t, c) in per_host.items()}


def _accepts_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _connect(scheduler: str):
    try:
        from distributed import Client
    except ImportError:
        raise GenerationError(
            "--scheduler needs Dask distributed: pip install 'dask[distributed]' "
            "(or 'emtwin[dask]')"
        ) from None
    try:
        return Client(scheduler, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise GenerationError(f"cannot connect to the Dask scheduler at {scheduler}: {exc}") from None


def generate_sharded(
    spec: RunSpec,
    out: str | os.PathLike,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    client: Any = None,
    scheduler: str | None = None,
    return_shards: bool = False,
    keep_shards: bool = False,
    shard_size_given: bool = True,
    progress: bool = False,
    on_sample: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Run (or resume) a sharded generation and join the shards into ``out``.

    Parameters
    ----------
    spec : RunSpec
        The run. If ``shard_size_given`` is False and an unfinished run of the same recipe,
        seed, n and compression exists, its shard size is adopted.
    out : path
        Final dataset file.
    workers : int, optional
        Local worker processes. ``1`` generates in this process. ``None`` (default): the number
        of usable cores, after timing the first shard here: if the rest would take less than
        ``AUTO_POOL_MIN_S`` (5 s) in this process, it stays here (worker start-up would not pay
        off). Ignored with ``client``/``scheduler``.
    overwrite : bool
        Discard any unfinished run and any existing ``out`` (replaced atomically at the end).
    client : distributed.Client, optional
        Run the shard tasks on this Dask cluster.
    scheduler : str, optional
        Address of a Dask scheduler (``tcp://host:8786``) to connect a client to.
    return_shards : bool
        Dask workers return each shard's bytes to this process instead of writing the shard
        directory themselves (for workers that cannot reach the output's directory).
    keep_shards : bool
        Keep the shard directory after the final file is written.
    progress : bool
        Show a progress bar over samples (stderr).
    on_sample : callable, optional
        Called with each sample index once it is written (in this process).
    log : callable, optional
        Receives one-line status messages (resuming, corrupt shards, up to date).

    Returns
    -------
    Path of the final file.

    Raises
    ------
    GenerationError
        A shard failed, the disk is full, the output or shard directory is unusable, another run
        holds the output, or an unfinished run of a different recipe/seed/n is in the way. Every
        finished shard is kept; rerunning the same call resumes.
    """
    out = Path(os.fspath(out))
    say = log or (lambda msg: None)
    if return_shards and client is None and scheduler is None:
        raise GenerationError("returning shards to the client needs a Dask cluster (--scheduler)")
    directory = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise GenerationError(f"{out}: is a directory, expected a file name")
    if not directory.is_dir():
        raise GenerationError(f"{out}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise GenerationError(f"{out}: directory {directory} is not writable")
    shard_dir = shard_dir_for(out)

    # ---- an existing complete output ----
    if out.exists() and not overwrite:
        why = _existing_output(out, spec)
        if why is None:
            say(f"{out} is already complete (same recipe, instrument, seed, n and compression); "
                "nothing to do (--overwrite regenerates it)")
            if shard_dir.is_dir() and not keep_shards:  # left by a crash after the final rename
                with contextlib.suppress(GenerationError):
                    _remove_shard_dir(shard_dir, _Lock(shard_dir, out))
            return out
        m = _read_manifest(shard_dir) if shard_dir.is_dir() else None
        same_run = m is not None and all(
            m.get(k) == v for k, v in spec.identity().items()
            if k != "shard_size" or shard_size_given)
        if not same_run:  # (an interrupted --overwrite run of this spec resumes)
            raise GenerationError(
                f"{out} already exists and is not this run's dataset ({why}); "
                "pass --overwrite to replace it, or choose another output"
            )

    # ---- shard directory, lock, manifest ----
    try:
        shard_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise GenerationError(f"{out}: cannot create the shard directory {shard_dir}: "
                              f"{exc.strerror or exc}") from None
    if not shard_dir.is_dir():
        raise GenerationError(f"{out}: {shard_dir} exists and is not a directory")
    lock = _Lock(shard_dir, out)
    try:
        if overwrite:
            _clear_dir(shard_dir, out)
        manifest = _read_manifest(shard_dir)
        if manifest is not None:
            same = {k: manifest.get(k) for k in spec.identity() if k != "shard_size"}
            want = {k: v for k, v in spec.identity().items() if k != "shard_size"}
            if same != want or (shard_size_given and manifest.get("shard_size") != spec.shard_size):
                diffs = [k for k in spec.identity() if manifest.get(k) != spec.identity()[k]
                         and (k != "shard_size" or shard_size_given)]
                raise GenerationError(
                    f"{out}: an unfinished run with another {', '.join(diffs)} is in {shard_dir}; "
                    "rerun it with the same settings to resume, or pass --overwrite to discard it"
                )
            if not shard_size_given and manifest.get("shard_size") != spec.shard_size:
                spec = dataclasses.replace(spec, shard_size=int(manifest["shard_size"]))
        else:
            stray = [p for p in shard_dir.iterdir() if p.name.startswith("shard-")]
            if stray:  # shards without a manifest: cannot know whose they are
                _clear_dir(shard_dir, out)
        try:
            _write_atomic(shard_dir / MANIFEST, json.dumps(_manifest(spec), indent=1).encode())
        except OSError as exc:
            raise GenerationError(
                f"{out}: cannot write {shard_dir / MANIFEST}: {exc.strerror or exc}"
            ) from None
        # temporary files of dead runs (we hold the lock, so none is being written)
        for p in list(shard_dir.iterdir()) + list(directory.glob(f".{out.name}.tmp-*")):
            if p.name.startswith(".") and ".tmp-" in p.name and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()

        done = _verify_existing(spec, shard_dir, say)
        todo = [k for k in range(spec.n_shards) if k not in done]
        if done:
            say(f"resuming {out}: {len(done)} of {spec.n_shards} shards already done and verified, "
                f"{len(todo)} to generate")
        try:
            _run_shards(spec, out, shard_dir, todo, done, workers=workers, client=client,
                        scheduler=scheduler, return_shards=return_shards, progress=progress,
                        on_sample=on_sample)
        except BaseException:
            # no shard finished (e.g. a recipe whose draws the generators cannot honour, out of
            # memory, Ctrl-C in the first shard): nothing to resume, and a fixed recipe must not
            # meet an "unfinished run of another recipe" in the way
            with contextlib.suppress(OSError):
                if not any(p.name.startswith("shard-") for p in shard_dir.iterdir()):
                    _remove_shard_dir(shard_dir, lock)
            raise
        _join(spec, out, shard_dir)
        if not keep_shards:
            _remove_shard_dir(shard_dir, lock)
    finally:
        lock.release()
    return out


def _remove_shard_dir(shard_dir: Path, lock: _Lock) -> None:
    """Delete our files in the shard directory, then the directory (if empty), under ``lock``."""
    try:
        for p in shard_dir.iterdir():
            if _is_ours(p.name) and p.name != LOCK:
                with contextlib.suppress(OSError):
                    p.unlink()
        with contextlib.suppress(OSError):
            (shard_dir / LOCK).unlink()
    finally:
        lock.release()
    with contextlib.suppress(OSError):
        shard_dir.rmdir()


def _verify_existing(spec: RunSpec, shard_dir: Path, say: Callable[[str], None]) -> set[int]:
    done: set[int] = set()
    for k in range(spec.n_shards):
        p = shard_dir / shard_name(k)
        if not p.exists():
            continue
        why = verify_shard(p, spec, k)
        if why is None:
            done.add(k)
        else:
            say(f"{p.name} is bad ({why}): regenerating it")
            with contextlib.suppress(OSError):
                p.unlink()
    return done


def _failure(out: Path, shard_dir: Path, spec: RunSpec, n_done: int, what: str) -> GenerationError:
    if n_done == 0:  # (generate_sharded then removes the shard directory: nothing to resume)
        return GenerationError(f"{what}; no shard was finished, nothing was written")
    return GenerationError(
        f"{what}; {n_done} of {spec.n_shards} shards are finished and kept in {shard_dir}; "
        f"rerun the same command to resume"
    )


def _run_shards(spec: RunSpec, out: Path, shard_dir: Path, todo: list[int], done: set[int], *,
                workers: int | None, client: Any, scheduler: str | None, return_shards: bool,
                progress: bool, on_sample: Callable[[int], None] | None) -> None:
    from tqdm import tqdm

    n_done_samples = sum(spec.shard_range(k)[1] - spec.shard_range(k)[0] for k in done)
    bar = tqdm(total=spec.n_samples, initial=n_done_samples, desc=f"generating {out.name}",
               unit="sample", disable=not progress, file=sys.stderr, smoothing=0.1)
    finished = set(done)

    def finished_shard(res: ShardResult) -> None:
        finished.add(res.shard)
        if on_sample is not None:
            for i in range(res.start, res.stop):
                on_sample(i)
        if res.data is None:
            bar.update(res.stop - res.start)

    try:
        if not todo:
            return
        if client is not None or scheduler is not None:
            _run_dask(spec, out, shard_dir, todo, finished, client, scheduler, return_shards,
                      finished_shard, bar)
            return
        n_workers = _cpu_count() if workers is None else int(workers)
        if n_workers < 1:
            raise GenerationError(f"--workers must be >= 1, got {n_workers}")
        n_workers = min(n_workers, len(todo))

        def in_process(k: int) -> float:
            start, stop = spec.shard_range(k)
            t0 = time.perf_counter()

            def one(i: int) -> None:
                bar.update(1)
                if on_sample is not None:
                    on_sample(i)

            try:
                write_shard(spec, k, shard_dir / shard_name(k), on_sample=one)
            except (EmtwinError, OSError) as exc:
                raise _failure(out, shard_dir, spec, len(finished),
                               f"shard {k} (samples {start}..{stop - 1}) failed: {exc}") from None
            seconds = time.perf_counter() - t0
            _log_shard(ShardJob(spec, k, None), start, stop, seconds)
            finished.add(k)
            return seconds

        todo = list(todo)
        if workers is None and n_workers > 1:
            # Default worker count: time the first shard here; if the rest would take less than
            # AUTO_POOL_MIN_S in this process (all cores' threads), starting worker processes
            # (~1-1.5 s each) would not pay off, so stay here.
            seconds = in_process(todo.pop(0))
            if not todo or seconds * len(todo) < AUTO_POOL_MIN_S:
                n_workers = 1
            n_workers = min(n_workers, max(1, len(todo)))
        if n_workers == 1:
            for k in todo:
                in_process(k)
            return
        _run_pool(spec, out, shard_dir, todo, finished, n_workers, finished_shard)
    finally:
        bar.close()


def _run_pool(spec: RunSpec, out: Path, shard_dir: Path, todo: list[int], finished: set[int],
              n_workers: int, finished_shard: Callable[[ShardResult], None]) -> None:
    ex, threads = _new_pool(n_workers)
    pending: dict[Any, int] = {}
    error: BaseException | None = None
    try:
        with _child_env(threads):  # workers are spawned by submit() with this environment
            for k in todo:
                job = ShardJob(spec, k, str(shard_dir / shard_name(k)), threads=threads)
                pending[ex.submit(run_shard, job)] = k
        while pending:
            ready, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in ready:
                k = pending.pop(fut)
                try:
                    finished_shard(fut.result())
                except GenerationError as exc:
                    error = error or exc
                except Exception as exc:  # a dead worker (BrokenProcessPool), a pickling error
                    start, stop = spec.shard_range(k)
                    error = error or GenerationError(
                        f"shard {k} (samples {start}..{stop - 1}): {type(exc).__name__}: {exc}")
            if error is not None:
                # let running shards finish (their work is kept), start no new ones
                for fut in pending:
                    fut.cancel()
                ex.shutdown(wait=True, cancel_futures=True)
                for fut in list(pending):
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        finished_shard(fut.result())
                raise _failure(out, shard_dir, spec, len(finished), str(error)) from None
    except BaseException:
        # Ctrl-C (or an error above): stop the workers now; a half-written shard is only a
        # temporary file, removed by the next run
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            with contextlib.suppress(Exception):
                p.terminate()
        for p in procs:
            with contextlib.suppress(Exception):
                p.join(5)
        raise
    ex.shutdown(wait=True)


def _run_dask(spec: RunSpec, out: Path, shard_dir: Path, todo: list[int], finished: set[int],
              client: Any, scheduler: str | None, return_shards: bool,
              finished_shard: Callable[[ShardResult], None], bar) -> None:
    own = client is None
    if own:
        client = _connect(scheduler)  # type: ignore[arg-type]
    try:
        from distributed import as_completed

        try:
            by_host = _threads_by_host(client)
        except Exception:  # noqa: BLE001 - a worker that does not answer: 1 thread per task
            by_host = {}
        token = uuid.uuid4().hex[:8]
        futures = []
        for k in todo:
            path = None if return_shards else str((shard_dir / shard_name(k)).resolve())
            job = ShardJob(spec, k, path, threads=1, threads_by_host=by_host)
            futures.append(client.submit(run_shard, job, key=f"emtwin-shard-{token}-{k:06d}",
                                         pure=False))
        error: BaseException | None = None
        for fut in as_completed(futures):
            if error is not None:
                continue
            try:
                res: ShardResult = fut.result()
            except GenerationError as exc:
                error = exc
            except Exception as exc:  # a lost worker, a scheduler problem
                error = GenerationError(f"{type(exc).__name__}: {exc}")
            else:
                if res.data is not None:
                    p = shard_dir / shard_name(res.shard)
                    try:
                        _write_atomic(p, res.data)
                    except OSError as exc:
                        error = GenerationError(
                            f"shard {res.shard}: cannot write {p}: {exc.strerror or exc}")
                        continue
                    bar.update(res.stop - res.start)
                finished_shard(res)
            if error is not None:
                client.cancel([f for f in futures if not f.done()])
        if error is not None:
            raise _failure(out, shard_dir, spec, len(finished), str(error))
    finally:
        if own:
            client.close()


def _join(spec: RunSpec, out: Path, shard_dir: Path) -> None:
    """Merge the shards into ``out`` (temporary file + rename; raw chunk copies)."""
    try:
        with DatasetWriter(out, n_samples=spec.n_samples, image_shape=spec.image_shape,
                           image_dtype=spec.image_dtype, labels=spec.labels, attrs=spec.attrs,
                           compression=spec.compression) as w:
            for k in range(spec.n_shards):
                w.copy_from(shard_dir / shard_name(k), spec.shard_range(k)[0])
    except (DatasetError, OSError) as exc:
        raise GenerationError(
            f"{out}: cannot write the final file: {exc}; all {spec.n_shards} shards are finished "
            f"and kept in {shard_dir}; rerun the same command to finish"
        ) from None


# --------------------------------------------------------------------------------------------
# Reading a shard directory directly
# --------------------------------------------------------------------------------------------


class ShardedDataset:
    """Read-only view of a complete shard directory with the :class:`EmtwinDataset` interface.

    For ``keep_shards`` runs read in place, without the final file. Shards are opened lazily
    (at most ``max_open`` at a time, least recently used closed first), so the object pickles
    to DataLoader workers like :class:`EmtwinDataset`.

    Parameters
    ----------
    directory : path
        ``OUT.h5.shards`` (or ``OUT.h5``, whose shard directory is then used).
    max_open : int
        Most shard files held open at once.

    Raises
    ------
    DatasetError
        No manifest, or a shard missing (the run is incomplete).

    Examples
    --------
    Both readers are map-style (``len`` + integer indexing), lazy and picklable, so they work
    with ``DistributedSampler`` and DataLoader workers. ``torchrun --nproc_per_node=4 train.py``
    with, in ``train.py``::

        import torch.distributed as dist
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler
        from twin.dataset import open_dataset          # or twin.shards.open_sharded

        dist.init_process_group("gloo")                 # "nccl" on GPUs; torchrun sets the env
        ds = MyTorchDataset(open_dataset("grains.h5"))  # e.g. the SDK's SyntheticDataset
        sampler = DistributedSampler(ds, shuffle=True, seed=0)  # rank/world from the group
        loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=4)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)                    # a different shuffle each epoch
            for batch in loader: ...
    """

    def __init__(self, directory: str | os.PathLike, *, max_open: int = 64) -> None:
        d = Path(os.fspath(directory))
        if d.suffix != ".shards" and not (d / MANIFEST).exists():
            d = shard_dir_for(d)
        m = _read_manifest(d) if d.is_dir() else None
        if m is None:
            raise DatasetError(f"{d}: not an emtwin shard directory (no readable {MANIFEST})")
        self.directory = d
        self.n_samples = int(m["n_samples"])
        self.shard_size = int(m["shard_size"])
        self.n_shards = int(m["n_shards"])
        missing = [k for k in range(self.n_shards) if not (d / shard_name(k)).is_file()]
        if missing:
            raise DatasetError(
                f"{d}: dataset is incomplete: {len(missing)} of {self.n_shards} shards are missing "
                f"(first: {shard_name(missing[0])}); rerun 'twin generate' to finish it"
            )
        self.max_open = int(max_open)
        self._open: dict[int, EmtwinDataset] = {}
        first = self._shard(0)
        self.attrs = {k: v for k, v in first.attrs.items() if k not in _SHARD_ATTRS}
        self.attrs["n_samples"] = self.n_samples
        self.image_shape = first.image_shape
        self.image_dtype = first.image_dtype
        self.label_names = first.label_names
        self.geometry_names = first.geometry_names

    def _shard(self, k: int) -> EmtwinDataset:
        ds = self._open.pop(k, None)
        if ds is None:
            ds = EmtwinDataset(self.directory / shard_name(k))
            while len(self._open) >= self.max_open:
                self._open.pop(next(iter(self._open))).close()
        self._open[k] = ds  # most recently used last
        return ds

    def _locate(self, i: int) -> tuple[EmtwinDataset, int]:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"sample index must be an int, got {type(i).__name__}")
        j = int(i) + (self.n_samples if int(i) < 0 else 0)
        if not 0 <= j < self.n_samples:
            raise IndexError(f"sample {i} out of range for {self.n_samples} samples")
        return self._shard(j // self.shard_size), j % self.shard_size

    def __len__(self) -> int:
        return self.n_samples

    def label_attrs(self, name: str) -> dict[str, Any]:
        return self._shard(0).label_attrs(name)

    def image(self, i: int) -> np.ndarray:
        ds, j = self._locate(i)
        return ds.image(j)

    def label(self, name: str, i: int) -> np.ndarray:
        ds, j = self._locate(i)
        return ds.label(name, j)

    def params(self, i: int) -> dict[str, Any]:
        ds, j = self._locate(i)
        return ds.params(j)

    def geometry(self, name: str, i: int) -> np.ndarray:
        ds, j = self._locate(i)
        return ds.geometry(name, j)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ds, j = self._locate(i)
        return ds[j]

    def _concat(self, what: str) -> np.ndarray:
        return np.concatenate([getattr(self._shard(k), what)() for k in range(self.n_shards)])

    def specimen_ids(self) -> np.ndarray:
        return self._concat("specimen_ids")

    def indices(self) -> np.ndarray:
        return self._concat("indices")

    def close(self) -> None:
        for ds in self._open.values():
            ds.close()
        self._open.clear()

    def __enter__(self) -> "ShardedDataset":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def __repr__(self) -> str:
        return (f"ShardedDataset({str(self.directory)!r}, n_samples={self.n_samples}, "
                f"shards={self.n_shards}, image={self.image_shape} {self.image_dtype})")


def open_sharded(path: str | os.PathLike, *, max_open: int = 64) -> ShardedDataset:
    """Open a complete shard directory (``OUT.h5.shards``, or ``OUT.h5`` to find it).

    See :class:`ShardedDataset`.
    """
    return ShardedDataset(path, max_open=max_open)
