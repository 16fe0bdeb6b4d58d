"""Scaling of sharded generation: local processes and a Dask LocalCluster, and what limits it.

One run prints, for the SEM recipe (default 512x512, ``--n 128`` samples):

1. samples/s of ``twin generate --workers 1`` and ``--workers 2`` (spawned processes, Numba
   threads = cores // workers), plus ``--workers 1`` with Numba on one thread (the per-core
   rate). "end-to-end" at 2n includes process start-up, generation, shard writes, checksums
   and the merge; "steady" = n / (t(2n) - t(n)) removes the fixed costs (~1-1.5 s of worker
   start-up). Speed-ups are on the steady rate, against both baselines.
2. The same on a ``dask.distributed.LocalCluster`` of 1 and 2 worker processes with one core
   each (cluster start-up excluded, workers warmed), and the speed-up.
3. Joining the shards: raw-chunk merge vs decode/re-encode merge vs an HDF5 virtual dataset
   (VDS): build time and read speed of the result (the measurement behind the choice in
   ``twin/shards.py``).
4. What limits scaling beyond one machine: the per-task overhead of the Dask scheduler and of a
   local process pool (trivial tasks), the shard write bandwidth of one process, and the merge
   bandwidth of the client, with the resulting ceilings.

Usage::

    python bench/scaling.py [--n 128] [--size 512] [--workers 1,2] [--dask 1,2] [--dir DIR]

What limits scaling beyond one machine (numbers from the run are printed at the end):

* Per-task scheduler overhead ``t_o`` (a few ms on Dask, ~0.1-0.3 ms on a local pool). A shard
  of ``k`` samples costing ``t_s`` each keeps a worker busy for ``k t_s``; efficiency is
  ``k t_s / (k t_s + t_o)``. With multislice samples (``t_s`` ~ seconds) and ``k >= 8`` this is
  > 99.9 %; for 512x512 SEM samples (``t_s`` ~ 20-30 ms per core) shards of 8 already give
  > 98 %. The scheduler itself handles ~1/t_o tasks/s: thousands of workers need shards of
  hundreds of samples (``--shard-size``).
* Shard size: bigger shards amortise ``t_o`` and file opens, but bound the load balance (the run
  ends when the last shard ends: keep >= ~4 shards per worker) and the work lost per crash.
* Write bandwidth: every worker writes its shards to the shared directory (``~0.45 MB`` per
  512x512 lz4 sample), and the client merges all of them into one file at the merge rate
  (raw chunk copy: no compression work, so disk/network bound). The merge is a serial tail of
  ``N / merge_rate`` seconds; a cluster producing samples faster than the merge (or the shared
  filesystem's write bandwidth) is limited by it. ``--return-shards`` additionally sends every
  shard through the client's network link.
* Worker environment: Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` slows NumPy-heavy samples
  by ~30 % (see ``twin/shards.py``); the LocalCluster here runs without it.

Multislice on paper: with ``t_s`` ~ 2 s per sample per core, a shard of 8 is 16 s of work
against ~2 ms of scheduling (99.99 %), so scaling is linear in cores until the client's merge
(~2,000 samples/s here, i.e. ~4,000 cores at 2 s/sample) or the shared filesystem's write
bandwidth saturates; the last lines of the output compute these break-even core counts from the
numbers measured in the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402

from twin import shards as shards_mod  # noqa: E402
from twin.dataset import DatasetWriter, open_dataset  # noqa: E402
from twin.generate import generate_dataset, run_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _noop(x: int) -> int:
    return x


def _warm() -> int:
    """Import the pipeline (and load Numba's cached kernels) in a worker."""
    import twin.pipeline  # noqa: F401

    return os.getpid()


def make_recipe(directory: Path, size: int, n: int) -> Path:
    text = (ROOT / "recipes" / "sem_voronoi_grains.yaml").read_text()
    text = text.replace("size: [512, 512]", f"size: [{size}, {size}]")
    text = text.replace("samples: 64 ", f"samples: {max(n, 16)} ")
    p = directory / "recipe.yaml"
    p.write_text(text)
    return p


def timed_run(recipe: Path, out: Path, n: int, **kw) -> float:
    t0 = time.perf_counter()
    generate_dataset(recipe, out, n=n, overwrite=True, progress=False, **kw)
    return time.perf_counter() - t0


def local_scaling(recipe: Path, d: Path, ns: tuple[int, int], workers: list[int],
                  shard_size: int | None) -> dict:
    """Seconds for each n in ``ns``, per configuration ("1 (1 thread)", "1", "2", ...)."""
    import numba

    timed_run(recipe, d / "warm.h5", 4, workers=1)  # JIT cache loaded in this process
    rows = {}
    default_threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        rows["1 (1 thread)"] = [timed_run(recipe, d / "w1t1.h5", n, workers=1,
                                          shard_size=shard_size) for n in ns]
    finally:
        numba.set_num_threads(default_threads)
    for w in workers:
        rows[str(w)] = [timed_run(recipe, d / f"w{w}.h5", n, workers=w, shard_size=shard_size)
                        for n in ns]
    return rows


def dask_scaling(recipe: Path, d: Path, ns: tuple[int, int], counts: list[int],
                 shard_size: int | None) -> dict:
    """Seconds for each n in ``ns`` on a LocalCluster of each size (one cluster per size)."""
    import dask
    from distributed import Client, LocalCluster

    rows = {}
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which disables glibc's
    # dynamic mmap threshold: every multi-MB NumPy temporary is then mmap'd and page-faulted
    # afresh, which made one 512x512 SEM sample ~29 % slower here (25.4 -> 32.7 ms on one
    # thread). Drop it (a null value) for these workers, as we recommend for emtwin clusters.
    # NUMBA_NUM_THREADS=1: one core per worker, so the table shows scaling with workers (with
    # emtwin's default a lone worker would take every core of the host through Numba).
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                          "distributed.nanny.pre-spawn-environ.NUMBA_NUM_THREADS": 1}):
        for k in counts:
            with LocalCluster(n_workers=k, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                client.run(_warm)
                rows[str(k)] = [timed_run(recipe, d / f"dask{k}.h5", n, client=client,
                                          shard_size=shard_size) for n in ns]
    return rows


def print_table(rows: dict, ns: tuple[int, int], baselines: dict[str, str]) -> None:
    """End-to-end samples/s at n, steady samples/s (marginal n -> 2n), speed-ups (steady)."""
    n1, n2 = ns
    steady = {k: (n2 - n1) / max(1e-9, t[1] - t[0]) for k, t in rows.items()}
    head = f"{'workers':>14s} {'end-to-end/s':>13s} {'steady/s':>9s}"
    print(head + "".join(f" {'x ' + name:>13s}" for name in baselines))
    for k, t in rows.items():
        line = f"{k:>14s} {n2 / t[1]:13.1f} {steady[k]:9.1f}"
        line += "".join(f" {steady[k] / steady[b]:13.2f}" for b in baselines.values())
        print(line)


def task_overhead(n_tasks: int = 500) -> dict:
    """Seconds per trivial task: Dask scheduler (2 workers) and a local spawn pool (2)."""
    from distributed import Client, LocalCluster

    out = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.gather(client.map(_noop, range(20), pure=False))
        t0 = time.perf_counter()
        client.gather([client.submit(_noop, i, pure=False) for i in range(n_tasks)])
        out["dask"] = (time.perf_counter() - t0) / n_tasks
    ex, _ = shards_mod._new_pool(2)
    try:
        [f.result() for f in [ex.submit(_noop, i) for i in range(20)]]
        t0 = time.perf_counter()
        [f.result() for f in [ex.submit(_noop, i) for i in range(n_tasks)]]
        out["local pool"] = (time.perf_counter() - t0) / n_tasks
    finally:
        ex.shutdown()
    return out


def join_bench(recipe: Path, d: Path, n: int, shard_size: int) -> dict:
    """Shard write, merge (raw/decoded), VDS: times and read speeds."""
    out = d / "join.h5"
    t0 = time.perf_counter()
    generate_dataset(recipe, out, n=n, overwrite=True, progress=False, workers=1,
                     shard_size=shard_size, keep_shards=True)
    gen = time.perf_counter() - t0
    spec = run_spec(recipe, n=n, shard_size=shard_size)
    sd = shards_mod.shard_dir_for(out)
    shard_bytes = sum(p.stat().st_size for p in sd.glob("shard-*.h5"))
    res = {"generate_s": gen, "mb_per_sample": shard_bytes / n / 1e6}

    # shard write bandwidth: one process writing already generated samples (lz4)
    src = open_dataset(out)
    samples = [src[i] for i in range(min(n, 32))]
    t0 = time.perf_counter()
    with DatasetWriter(d / "w.h5", n_samples=len(samples), image_shape=spec.image_shape,
                       image_dtype=spec.image_dtype, labels=spec.labels, attrs=spec.attrs,
                       compression=spec.compression) as w:
        for i, s in enumerate(samples):
            w.write(i, s["image"], s["labels"], specimen_id=s["specimen_id"], index=s["index"],
                    params=s["params"])
    dt = time.perf_counter() - t0
    res["write_samples_s"] = len(samples) / dt
    res["write_mb_s"] = (d / "w.h5").stat().st_size / dt / 1e6

    # raw-chunk merge (what twin.shards does)
    merged = d / "merged.h5"
    t0 = time.perf_counter()
    shards_mod._join(spec, merged, sd)
    res["merge_raw_s"] = time.perf_counter() - t0

    # decode + re-encode merge (for comparison)
    def decoded(src_path: Path, dst, start: int) -> None:
        with h5py.File(src_path, "r") as f:
            m = f["images"].shape[0]
            dst._images[start:start + m] = f["images"][...]
            for name, ds in dst._label_ds.items():
                ds[start:start + m] = f["labels"][name][...]
            dst._specimen[start:start + m] = f["meta/specimen_id"][...]
            dst._index[start:start + m] = f["meta/index"][...]
            dst._params[start:start + m] = f["meta/params"][...]
            dst._written[start:start + m] = True

    t0 = time.perf_counter()
    with DatasetWriter(d / "merged_decoded.h5", n_samples=n, image_shape=spec.image_shape,
                       image_dtype=spec.image_dtype, labels=spec.labels, attrs=spec.attrs,
                       compression=spec.compression) as w:
        for k in range(spec.n_shards):
            decoded(sd / shards_mod.shard_name(k), w, spec.shard_range(k)[0])
    res["merge_decoded_s"] = time.perf_counter() - t0

    # virtual dataset over the shards (relative source paths)
    vds = d / "vds.h5"
    t0 = time.perf_counter()
    params_vds = "yes"
    with h5py.File(vds, "w") as f:
        for name in ["images", *[f"labels/{x}" for x in sorted(spec.labels)],
                     "meta/specimen_id", "meta/index", "meta/params"]:
            with h5py.File(sd / shards_mod.shard_name(0), "r") as s0:
                dtype, tail = s0[name].dtype, s0[name].shape[1:]
            layout = h5py.VirtualLayout(shape=(n, *tail), dtype=dtype)
            for k in range(spec.n_shards):
                a, b = spec.shard_range(k)
                rel = os.path.relpath(sd / shards_mod.shard_name(k), vds.parent)
                layout[a:b] = h5py.VirtualSource(rel, name, shape=(b - a, *tail))
            try:
                f.create_virtual_dataset(name, layout)
            except (TypeError, ValueError, OSError, RuntimeError) as exc:
                params_vds = f"no ({type(exc).__name__})"
    res["vds_build_s"] = time.perf_counter() - t0
    res["vds_params"] = params_vds

    def read_rate(path: Path, random: bool) -> float:
        order = np.random.default_rng(0).permutation(n) if random else np.arange(n)
        t0 = time.perf_counter()
        with h5py.File(path, "r") as f:
            im, gid = f["images"], f["labels/grain_id"]
            for i in order:
                im[int(i)]
                gid[int(i)]
        return n / (time.perf_counter() - t0)

    for name, path in (("merged", merged), ("vds", vds)):
        res[f"read_{name}_seq"] = read_rate(path, False)
        res[f"read_{name}_rand"] = read_rate(path, True)
    ok = read_rate(merged, False) > 0
    with h5py.File(merged, "r") as a, h5py.File(vds, "r") as b:
        same = ok and np.array_equal(a["images"][...], b["images"][...])
    res["vds_equals_merge"] = same
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", default="1,2", help="local worker counts (default 1,2)")
    ap.add_argument("--dask", default="1,2", help="LocalCluster worker counts (default 1,2)")
    ap.add_argument("--shard-size", type=int, default=None)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    workers = [int(x) for x in args.workers.split(",") if x]
    dask_counts = [int(x) for x in args.dask.split(",") if x]
    cores = shards_mod._cpu_count()
    d = Path(tempfile.mkdtemp(prefix="emtwin-scaling-", dir=args.dir))
    try:
        recipe = make_recipe(d, args.size, args.n)
        shard_size = args.shard_size or shards_mod.default_shard_size(args.n)
        print(f"# SEM recipe {args.size}x{args.size}, n={args.n}, shard size {shard_size}, "
              f"{cores} cores, scratch {d}")

        ns = (args.n, 2 * args.n)
        local = local_scaling(recipe, d, ns, workers, args.shard_size)
        print(f"\n## local processes: end to end at n={ns[1]} (process start-up, generation, "
              f"shards, checksums, merge), and steady = {ns[1] - ns[0]}/(t({ns[1]}) - t({ns[0]})),"
              " the rate without fixed start-up costs; speed-ups on steady")
        print_table(local, ns, {"workers=1": str(workers[0]), "1 thread": "1 (1 thread)"})

        dsk = dask_scaling(recipe, d, ns, dask_counts, args.shard_size)
        print("\n## Dask LocalCluster, one core per worker process (1 Dask thread, "
              "NUMBA_NUM_THREADS=1, no MALLOC_TRIM_THRESHOLD_: see dask_scaling); cluster start "
              "excluded")
        print_table(dsk, ns, {f"{dask_counts[0]} worker": str(dask_counts[0])})

        j = join_bench(recipe, d, args.n, shard_size)
        n = args.n
        gen_rate = n / j["generate_s"]  # this process, all cores
        print("\n## joining the shards (merge vs HDF5 virtual dataset)")
        print(f"  shard files: {j['mb_per_sample']:.3f} MB/sample; one process writes "
              f"{j['write_samples_s']:.0f} samples/s ({j['write_mb_s']:.0f} MB/s) with lz4")
        print(f"  raw-chunk merge   {j['merge_raw_s'] * 1e3:8.1f} ms  {n / j['merge_raw_s']:8.0f} "
              f"samples/s  ({100 * j['merge_raw_s'] / j['generate_s']:.1f} % of generating them "
              "on this process)")
        print(f"  decode+re-encode  {j['merge_decoded_s'] * 1e3:8.1f} ms  "
              f"{n / j['merge_decoded_s']:8.0f} samples/s")
        print(f"  VDS build         {j['vds_build_s'] * 1e3:8.1f} ms  (variable-length params "
              f"as VDS: {j['vds_params']}; same images: {j['vds_equals_merge']})")
        print(f"  read merged file  {j['read_merged_seq']:8.0f} samples/s sequential, "
              f"{j['read_merged_rand']:6.0f} random")
        print(f"  read VDS          {j['read_vds_seq']:8.0f} samples/s sequential, "
              f"{j['read_vds_rand']:6.0f} random")

        ov = task_overhead()
        print("\n## limits beyond one machine")
        print(f"  per-task overhead: Dask scheduler {ov['dask'] * 1e3:.2f} ms, "
              f"local spawn pool {ov['local pool'] * 1e3:.2f} ms (trivial tasks)")
        t_s = 1.0 / gen_rate  # seconds per sample on this process (all cores)
        for k in sorted({1, 8, shard_size, 256}):
            eff = k * t_s / (k * t_s + ov["dask"])
            print(f"  shard of {k:3d} SEM samples: {k * t_s * 1e3:8.1f} ms of work, Dask "
                  f"efficiency {100 * eff:5.1f} %; multislice (~2 s/sample): "
                  f"{100 * k * 2.0 / (k * 2.0 + ov['dask']):.3f} %")
        print(f"  scheduler ceiling ~{1 / ov['dask']:.0f} tasks/s -> "
              f"{shard_size / ov['dask']:.0f} samples/s at shard size {shard_size}")
        merge_rate = n / j["merge_raw_s"]
        print(f"  merge ceiling (client, serial): {merge_rate:.0f} samples/s "
              f"= {merge_rate * j['mb_per_sample']:.0f} MB/s; a cluster faster than "
              "this (or than the shared filesystem's write bandwidth) waits on the merge")
        t1 = local["1 (1 thread)"]
        t_core = max(1e-9, t1[1] - t1[0]) / (ns[1] - ns[0])  # s per sample on one core (steady)
        for label, ts in (("SEM 512x512", t_core), ("multislice (~2 s/sample)", 2.0)):
            print(f"  {label}: the merge saturates at ~{merge_rate * ts:.0f} cores, the scheduler "
                  f"(shard size {shard_size}) at ~{shard_size / ov['dask'] * ts:.0f} cores")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
