"""Sharded generation (twin.shards): parallel, resumable, distributed, crash-safe (issue 8)."""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from twin import shards as shards_mod
from twin.cli import main as cli_main
from twin.dataset import DatasetError, DatasetWriter, _dumps, open_dataset
from twin.generate import generate_dataset, pipeline_from_text, run_spec
from twin.shards import (
    GenerationError,
    THREAD_ENV_VARS,
    default_shard_size,
    open_sharded,
    shard_dir_for,
    verify_shard,
)

SMALL = """
name: small
size: [64, 64]
samples: 24
specimens: 6
seed: 3
specimen: {grains_per_field: [10, 20]}
"""

# big enough that a run takes ~1 s on 2 cores: time to kill it half-way
MEDIUM = """
name: medium
size: [256, 256]
samples: 96
specimens: 24
seed: 11
specimen: {grains_per_field: [30, 60]}
"""

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tmp_path: Path) -> Path:
    p = tmp_path / "small.yaml"
    p.write_text(SMALL)
    return p


@pytest.fixture
def shard_log(tmp_path: Path, monkeypatch) -> Path:
    log = tmp_path / "shards.log"
    monkeypatch.setenv("EMTWIN_SHARD_LOG", str(log))
    return log


def logged(log: Path) -> list[int]:
    """Shard indices generated so far (one line per generated shard)."""
    if not log.exists():
        return []
    return [int(line.split()[0]) for line in log.read_text().splitlines() if line.strip()]


def read_all(path: Path) -> dict:
    """Every array and attribute of a dataset file (except the creation time)."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: f.attrs[k] for k in f.attrs if k != "created"}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[...]
                out[name + ".attrs"] = {k: obj.attrs[k] for k in obj.attrs}

        f.visititems(visit)
    return out


def assert_same(a: Path, b: Path) -> None:
    da, db = read_all(a), read_all(b)
    assert sorted(da) == sorted(db)
    for key in da:
        if key.endswith("attrs"):
            assert set(da[key]) == set(db[key]), key
            for k in da[key]:
                assert np.array_equal(np.asarray(da[key][k]), np.asarray(db[key][k])), (key, k)
        else:
            assert da[key].dtype == db[key].dtype, key
            assert np.array_equal(da[key], db[key]), key


def no_temporaries(directory: Path) -> bool:
    return not [p for p in directory.rglob(".*") if ".tmp-" in p.name]


@pytest.fixture
def reference(small: Path, tmp_path_factory) -> Path:
    """An uninterrupted in-process run of SMALL (shard size 5: layout must not matter)."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    generate_dataset(small, out, workers=1, shard_size=5)
    return out


# --------------------------------------------------------------------------------------------
# Bit-identical whatever the workers
# --------------------------------------------------------------------------------------------


def test_sharded_file_equals_the_pipeline_sample_by_sample(small, reference):
    spec = run_spec(small)
    pipe = pipeline_from_text(spec.recipe_text, spec.instrument_text, spec.seed)
    with open_dataset(reference) as ds:
        assert len(ds) == 24 and ds.attrs["complete"] is True
        assert ds.attrs["root_seed"] == 3 and ds.attrs["recipe"] == SMALL
        assert not any(k.startswith("shard_") for k in ds.attrs)  # schema of DESIGN §3 only
        for i in (23, 0, 7, 5):  # across shard borders, out of order
            s = pipe.generate(i)
            got = ds[i]
            assert got["image"].tobytes() == s.image.tobytes()
            for name, arr in s.labels.items():
                assert got["labels"][name].tobytes() == arr.tobytes()
            assert got["index"] == i and got["specimen_id"] == s.specimen_id
            assert got["params"] == json.loads(_dumps(s.params))
    assert not shard_dir_for(reference).exists()  # merged, then the shards were deleted


def test_workers_1_2_and_a_dask_cluster_give_identical_files(small, reference, tmp_path, shard_log):
    distributed = pytest.importorskip("distributed")
    two = tmp_path / "two.h5"
    written: list[int] = []
    generate_dataset(small, two, workers=2, shard_size=4, on_sample=written.append)
    assert_same(reference, two)
    assert sorted(written) == list(range(24))
    assert sorted(logged(shard_log)) == list(range(6))
    # each worker process ran its shards with Numba capped at cores // workers threads
    assert {line.split()[5] for line in shard_log.read_text().splitlines()} == {
        str(max(1, shards_mod._cpu_count() // 2))}

    with distributed.LocalCluster(n_workers=3, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        dask_out = tmp_path / "dask.h5"
        generate_dataset(small, dask_out, client=client, shard_size=3)
        assert_same(reference, dask_out)
        # workers that cannot reach the output directory: shards come back to the client
        returned = tmp_path / "returned.h5"
        generate_dataset(small, returned, client=client, shard_size=8, return_shards=True)
        assert_same(reference, returned)
        # 3 single-thread workers on one host: Numba gets cores // 3 threads per task
        by_host = shards_mod._threads_by_host(client)
        assert list(by_host.values()) == [max(1, shards_mod._cpu_count() // 3)]
        # the CLI's --scheduler connects to the same cluster
        cli_out = tmp_path / "cli.h5"
        assert cli_main(["generate", str(small), "-o", str(cli_out), "-q",
                         "--scheduler", cluster.scheduler_address]) == 0
        assert_same(reference, cli_out)
    assert no_temporaries(tmp_path)


def test_worker_processes_do_not_oversubscribe_the_cores():
    numba = pytest.importorskip("numba")
    parent_env = {v: os.environ.get(v) for v in THREAD_ENV_VARS}
    ex, threads = shards_mod._new_pool(2)
    try:
        with shards_mod._child_env(threads):
            envs = [ex.submit(os.getenv, var) for var in THREAD_ENV_VARS]
            numba_threads = ex.submit(numba.get_num_threads)
        assert threads == max(1, shards_mod._cpu_count() // 2)
        assert [f.result(60) for f in envs] == [str(threads)] * len(THREAD_ENV_VARS)
        assert numba_threads.result(60) == threads
    finally:
        ex.shutdown(wait=True)
    assert {v: os.environ.get(v) for v in THREAD_ENV_VARS} == parent_env  # parent untouched


def test_default_workers_stay_in_process_for_short_runs_and_use_a_pool_otherwise(
        small, reference, tmp_path, shard_log, monkeypatch):
    short = tmp_path / "short.h5"
    generate_dataset(small, short, shard_size=4)  # workers=None: ~0.1 s of work stays here
    assert_same(reference, short)
    assert {line.split()[3] for line in shard_log.read_text().splitlines()} == {str(os.getpid())}
    if shards_mod._cpu_count() < 2:
        return
    monkeypatch.setattr(shards_mod, "AUTO_POOL_MIN_S", 0.0)  # as if the run were long
    shard_log.unlink()
    pooled = tmp_path / "pooled.h5"
    generate_dataset(small, pooled, shard_size=4)
    assert_same(reference, pooled)
    pids = [line.split()[3] for line in shard_log.read_text().splitlines()]
    assert pids[0] == str(os.getpid()) and str(os.getpid()) not in pids[1:]  # timed here, rest in the pool


def test_default_shard_size_depends_on_n_only():
    assert default_shard_size(1) == 16 and default_shard_size(64) == 16
    assert default_shard_size(4096) == 16 and default_shard_size(4097) == 17
    assert default_shard_size(10_000) == 40
    assert default_shard_size(10**6) == 256


# --------------------------------------------------------------------------------------------
# Crash safety: SIGKILL, Ctrl-C, a reader during the run
# --------------------------------------------------------------------------------------------


def _twin(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "twin.cli", "generate", *args], cwd=REPO,
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )


def _wait_gone(pids: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pids.discard(pid)
        time.sleep(0.05)
    assert not pids, f"worker processes {pids} outlived their killed parent"


def test_sigkill_then_rerun_resumes_without_regenerating_finished_shards(tmp_path):
    recipe = tmp_path / "medium.yaml"
    recipe.write_text(MEDIUM)
    out = tmp_path / "out.h5"
    log = tmp_path / "shards.log"
    args = (str(recipe), "-o", str(out), "-q", "--workers", "2", "--shard-size", "2")
    proc = _twin(*args, env={"EMTWIN_SHARD_LOG": str(log)})
    seen = set()
    try:
        while len(logged(log)) < 6:  # a reader during the run: never a crash, never garbage
            assert proc.poll() is None, f"run ended early: {proc.communicate()}"
            try:
                open_dataset(out)
                seen.add("opened")
            except DatasetError as exc:
                msg = str(exc)
                seen.add("incomplete" if "incomplete" in msg else
                         "missing" if "no such file" in msg else msg)
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert seen <= {"incomplete", "missing"} and "incomplete" in seen, seen
    assert not out.exists(), "the run finished before it could be killed"
    # the pool's workers notice that their parent died and exit
    _wait_gone({int(line.split()[3]) for line in log.read_text().splitlines()})
    first = logged(log)
    on_disk = {int(p.stem.split("-")[1]) for p in shard_dir_for(out).glob("shard-*.h5")}
    assert set(first) == on_disk and len(first) == len(on_disk)
    with pytest.raises(DatasetError, match="incomplete"):
        open_dataset(out)

    proc = _twin(*args, env={"EMTWIN_SHARD_LOG": str(log)})
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    everything = logged(log)
    rerun = everything[len(first):]
    assert sorted(everything) == list(range(48)), "a shard was generated twice or never"
    assert len(rerun) == 48 - len(on_disk) and not set(rerun) & on_disk
    assert not shard_dir_for(out).exists() and no_temporaries(tmp_path)

    ref = tmp_path / "ref.h5"
    generate_dataset(recipe, ref, workers=1, shard_size=16)
    assert_same(ref, out)


def test_ctrl_c_stops_the_workers_keeps_finished_shards_and_exits_130(tmp_path):
    recipe = tmp_path / "medium.yaml"
    recipe.write_text(MEDIUM)
    out = tmp_path / "out.h5"
    log = tmp_path / "shards.log"
    proc = _twin(str(recipe), "-o", str(out), "-q", "-j", "2", "--shard-size", "2",
                 env={"EMTWIN_SHARD_LOG": str(log)})
    while len(logged(log)) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C goes to the process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "rerun" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()
    kept = list(shard_dir_for(out).glob("shard-*.h5"))
    assert len(kept) >= 3
    spec = run_spec(recipe, shard_size=2)
    for p in kept:
        assert verify_shard(p, spec, int(p.stem.split("-")[1])) is None


def test_a_reader_sees_the_previous_complete_file_during_an_overwrite(small, tmp_path):
    out = tmp_path / "out.h5"
    generate_dataset(small, out, workers=1, seed=1)
    old = open_dataset(out).attrs["root_seed"]
    recipe = tmp_path / "medium.yaml"
    recipe.write_text(MEDIUM)
    proc = _twin(str(recipe), "-o", str(out), "-q", "-j", "2", "--overwrite")
    seeds = []
    while proc.poll() is None:
        with open_dataset(out) as ds:  # always a complete file: the old one or the new one
            seeds.append(ds.attrs["root_seed"])
            assert ds.attrs["complete"] is True
        time.sleep(0.01)
    assert proc.returncode == 0, proc.communicate()
    assert seeds and seeds[0] == old
    assert open_dataset(out).attrs["root_seed"] == 11


# --------------------------------------------------------------------------------------------
# Disk full, unwritable paths, corrupt shards, other runs in the way
# --------------------------------------------------------------------------------------------


def _fail_on_call(monkeypatch, k: int, exc: Exception, method: str = "write") -> None:
    """Make the k-th call (0-based) of DatasetWriter.<method> raise ``exc``."""
    real = getattr(DatasetWriter, method)
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k + 1:
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DatasetWriter, method, failing)


def test_disk_full_gives_a_clear_error_keeps_finished_shards_and_resumes(
        small, reference, tmp_path, shard_log, monkeypatch, capsys):
    out = tmp_path / "out.h5"
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        _fail_on_call(m, 9, enospc)  # sample 9: the 3rd shard of 4
        rc = cli_main(["generate", str(small), "-o", str(out), "-q", "-j", "1",
                       "--shard-size", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("twin: error: ")
    assert "No space left on device" in err and "2 of 6 shards are finished" in err
    assert "rerun" in err and "Traceback" not in err
    assert not out.exists() and no_temporaries(tmp_path)
    spec = run_spec(small, shard_size=4)
    d = shard_dir_for(out)
    assert sorted(p.name for p in d.glob("shard-*.h5")) == ["shard-000000.h5", "shard-000001.h5"]
    assert all(verify_shard(d / f"shard-00000{k}.h5", spec, k) is None for k in (0, 1))
    with pytest.raises(DatasetError, match="incomplete"):
        open_dataset(out)

    # rerun (no --shard-size: the unfinished run's is adopted) resumes at shard 2
    assert cli_main(["generate", str(small), "-o", str(out), "-q", "-j", "1"]) == 0
    assert logged(shard_log) == [0, 1, 2, 3, 4, 5]
    assert_same(reference, out)


def test_disk_full_while_merging_keeps_every_shard_and_the_rerun_only_merges(
        small, reference, tmp_path, shard_log, monkeypatch):
    out = tmp_path / "out.h5"
    with monkeypatch.context() as m:
        _fail_on_call(m, 2, DatasetError("out.h5: cannot copy samples: [Errno 28] No space left"),
                      method="copy_from")
        with pytest.raises(GenerationError, match="all 3 shards are finished"):
            generate_dataset(small, out, workers=1, shard_size=8)
    assert not out.exists() and no_temporaries(tmp_path)
    assert logged(shard_log) == [0, 1, 2]
    generate_dataset(small, out, workers=1)
    assert logged(shard_log) == [0, 1, 2]  # nothing regenerated
    assert_same(reference, out)


def test_unwritable_shard_path_and_output_directory_are_clear_errors(small, tmp_path):
    out = tmp_path / "out.h5"
    shard_dir_for(out).write_text("not a directory")
    with pytest.raises(GenerationError, match="is not a directory|cannot create the shard"):
        generate_dataset(small, out, workers=1)
    assert not out.exists()
    with pytest.raises(GenerationError, match="does not exist"):
        generate_dataset(small, tmp_path / "missing" / "out.h5", workers=1)


def test_a_worker_failure_in_a_pool_keeps_finished_shards(small, reference, tmp_path, shard_log):
    out = tmp_path / "out.h5"
    d = shard_dir_for(out)
    d.mkdir()
    spec = run_spec(small, shard_size=4)
    shards_mod._write_atomic(d / "manifest.json", json.dumps(shards_mod._manifest(spec)).encode())
    # a directory where shard 3's file must go: the worker cannot write it
    (d / "shard-000003.h5").mkdir()
    with pytest.raises(GenerationError) as info:
        generate_dataset(small, out, workers=2, shard_size=4)
    msg = str(info.value)
    assert "shard 3 (samples 12..15)" in msg and "kept in" in msg and "rerun" in msg
    assert "\n" not in msg
    assert 3 not in logged(shard_log) and not out.exists()
    (d / "shard-000003.h5").rmdir()
    before = set(logged(shard_log))
    generate_dataset(small, out, workers=2)
    assert sorted(logged(shard_log)) == sorted(set(range(6)) | before)
    assert len(logged(shard_log)) == 6  # nothing twice
    assert_same(reference, out)


def test_a_corrupt_or_foreign_shard_is_regenerated(small, reference, tmp_path, shard_log):
    out = tmp_path / "out.h5"
    generate_dataset(small, out, workers=1, shard_size=4, keep_shards=True)
    out.unlink()  # as if the run had stopped before the merge
    d = shard_dir_for(out)
    # change one image of shard 1 behind the checksum's back, truncate shard 4
    p1 = d / "shard-000001.h5"
    with h5py.File(p1, "r+") as f:
        f["images"][2] = f["images"][2] + 1
    p4 = d / "shard-000004.h5"
    p4.write_bytes(p4.read_bytes()[:1000])
    spec = run_spec(small, shard_size=4)
    assert verify_shard(p1, spec, 1) is not None and verify_shard(p4, spec, 4) is not None
    messages = []
    generate_dataset(small, out, workers=1, log=messages.append)
    assert logged(shard_log)[6:] == [1, 4]
    assert any("shard-000001.h5 is bad" in m for m in messages)
    assert_same(reference, out)


def test_a_changed_stored_chunk_or_another_checksum_scheme_is_caught(small, tmp_path,
                                                                     shard_log):
    """The checksum, computed while the shard was written, covers the stored (compressed)
    bytes: one byte changed inside a chunk (same length, no HDF5 error on reading it back raw)
    fails verification, and so does a shard whose checksum is of another scheme; both are
    regenerated on resume."""
    out = tmp_path / "out.h5"
    generate_dataset(small, out, workers=1, shard_size=8, keep_shards=True)
    reference = tmp_path / "reference.h5"
    out.rename(reference)
    d = shard_dir_for(out)
    spec = run_spec(small, shard_size=8)
    p0, p2 = d / "shard-000000.h5", d / "shard-000002.h5"
    with h5py.File(p0, "r+") as f:
        ds = f["labels/grain_id"]
        mask, data = ds.id.read_direct_chunk((3, 0, 0))
        changed = bytearray(data)
        changed[len(changed) // 2] ^= 0x01
        ds.id.write_direct_chunk((3, 0, 0), bytes(changed), filter_mask=mask)
    assert "checksum mismatch" in verify_shard(p0, spec, 0)
    assert verify_shard(p0, spec, 0, full=False) is None  # only the full check reads the data
    with h5py.File(p2, "r+") as f:
        f.attrs["shard_checksum"] = "sha256-v1"
    assert "another scheme" in verify_shard(p2, spec, 2)
    assert verify_shard(d / "shard-000001.h5", spec, 1) is None
    messages = []
    n_before = len(logged(shard_log))
    generate_dataset(small, out, workers=1, log=messages.append)
    assert logged(shard_log)[n_before:] == [0, 2]
    assert any("shard-000002.h5 is bad" in m and "another scheme" in m for m in messages)
    assert_same(reference, out)


def test_resume_with_other_settings_is_refused_unless_overwrite(small, tmp_path, shard_log,
                                                                 monkeypatch):
    out = tmp_path / "out.h5"
    with monkeypatch.context() as m:
        _fail_on_call(m, 10, OSError(errno.EIO, "I/O error"))
        with pytest.raises(GenerationError):
            generate_dataset(small, out, workers=1, shard_size=4)
    with pytest.raises(GenerationError, match="unfinished run with another seed.*--overwrite"):
        generate_dataset(small, out, workers=1, seed=99)
    with pytest.raises(GenerationError, match="shard_size"):
        generate_dataset(small, out, workers=1, shard_size=6)
    n_before = len(logged(shard_log))
    generate_dataset(small, out, workers=1, seed=99, overwrite=True)
    assert len(logged(shard_log)) - n_before == 2  # started over: every default shard (16)
    assert open_dataset(out).attrs["root_seed"] == 99


def test_an_existing_output_is_kept_replaced_only_with_overwrite(small, tmp_path, shard_log):
    out = tmp_path / "out.h5"
    generate_dataset(small, out, workers=1)
    mtime = out.stat().st_mtime_ns
    messages = []
    generate_dataset(small, out, workers=2, log=messages.append)  # same run: nothing to do
    assert out.stat().st_mtime_ns == mtime and "already complete" in messages[0]
    assert len(logged(shard_log)) == 2  # the default shards of 16
    with pytest.raises(GenerationError, match="already exists.*root_seed.*--overwrite"):
        generate_dataset(small, out, workers=1, seed=5)
    with pytest.raises(GenerationError, match="compression"):
        generate_dataset(small, out, workers=1, compression="gzip")
    generate_dataset(small, out, workers=1, compression="gzip", overwrite=True)
    with h5py.File(out, "r") as f:
        assert f["images"].compression == "gzip"


def test_a_second_run_on_the_same_output_is_refused_while_one_holds_the_lock(small, tmp_path):
    import fcntl

    out = tmp_path / "out.h5"
    d = shard_dir_for(out)
    d.mkdir()
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(GenerationError, match="another 'twin generate'"):
            generate_dataset(small, out, workers=1)
    finally:
        os.close(fd)
    generate_dataset(small, out, workers=1)
    assert open_dataset(out).n_samples == 24


# --------------------------------------------------------------------------------------------
# Reading a shard directory directly
# --------------------------------------------------------------------------------------------


def test_open_sharded_reads_a_shard_directory_like_the_merged_file(small, tmp_path):
    import pickle

    out = tmp_path / "out.h5"
    generate_dataset(small, out, workers=1, shard_size=5, keep_shards=True)
    merged = open_dataset(out)
    sh = open_sharded(shard_dir_for(out), max_open=2)
    assert len(sh) == 24 and sh.n_shards == 5
    assert sh.label_names == merged.label_names
    assert np.array_equal(sh.specimen_ids(), merged.specimen_ids())
    assert np.array_equal(sh.indices(), np.arange(24))
    assert sh.attrs["root_seed"] == merged.attrs["root_seed"]
    for i in (0, 4, 5, 23, -1, 12):
        a, b = sh[i], merged[i]
        assert np.array_equal(a["image"], b["image"]) and a["params"] == b["params"]
        assert np.array_equal(a["labels"]["grain_id"], b["labels"]["grain_id"])
    assert len(sh._open) <= 2
    # the merge copied the compressed chunks as they are (no decode/re-encode)
    with h5py.File(out, "r") as f, h5py.File(shard_dir_for(out) / "shard-000001.h5", "r") as g:
        for name in ("images", "labels/grain_id", "labels/boundary"):
            assert f[name].id.read_direct_chunk((6, 0, 0)) == g[name].id.read_direct_chunk((1, 0, 0))
    clone = pickle.loads(pickle.dumps(sh))
    assert np.array_equal(clone.image(7), merged.image(7))
    with pytest.raises(IndexError):
        sh.image(24)
    (shard_dir_for(out) / "shard-000002.h5").unlink()
    with pytest.raises(DatasetError, match="incomplete: 1 of 5 shards are missing"):
        open_sharded(out)


def test_copy_from_decodes_when_filters_differ_and_refuses_other_layouts(small, tmp_path):
    out = tmp_path / "out.h5"
    generate_dataset(small, out, workers=1, shard_size=8, keep_shards=True)
    spec = run_spec(small, shard_size=8)
    shard = shard_dir_for(out) / "shard-000001.h5"
    with DatasetWriter(tmp_path / "g.h5", n_samples=8, image_shape=spec.image_shape,
                       image_dtype="uint16", labels=spec.labels, attrs={},
                       compression="gzip") as w:
        assert w.copy_from(shard, 0) == 8
        w.set_attrs({"note": "joined"})
        with pytest.raises(DatasetError, match="reserved|may not set"):
            w.set_attrs({"complete": False})
    with h5py.File(tmp_path / "g.h5", "r") as f, h5py.File(shard, "r") as g:
        assert f["images"].compression == "gzip" and f.attrs["note"] == "joined"
        for name in ("images", "labels/grain_id", "meta/params", "meta/index"):
            assert np.array_equal(f[name][...], g[name][...])
    with DatasetWriter(tmp_path / "x.h5", n_samples=8, image_shape=spec.image_shape,
                       image_dtype="uint16", labels={"grain_id": spec.labels["grain_id"]},
                       attrs={}) as w:
        with pytest.raises(DatasetError, match="labels"):
            w.copy_from(shard, 0)
        with pytest.raises(DatasetError, match="do not fit"):
            w.copy_from(shard, 4)
        w.abort()
    assert not (tmp_path / "x.h5").exists()


def test_readers_split_across_ranks_with_distributed_sampler(small, tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, Dataset
    from torch.utils.data.distributed import DistributedSampler

    out = tmp_path / "out.h5"
    generate_dataset(small, out, workers=1, shard_size=5, keep_shards=True)

    class Images(Dataset):  # what an SDK dataset does: image tensor + sample index
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return torch.from_numpy(self.ds.image(i).astype(np.int32)), int(self.ds.indices()[i])

    for reader in (open_dataset(out), open_sharded(out)):
        seen = []
        for rank in (0, 1):  # what torchrun's two processes would each see
            sampler = DistributedSampler(Images(reader), num_replicas=2, rank=rank, shuffle=True,
                                         seed=0, drop_last=False)
            sampler.set_epoch(1)
            loader = DataLoader(Images(reader), batch_size=4, sampler=sampler, num_workers=2)
            idx = torch.cat([b[1] for b in loader]).tolist()
            assert len(idx) == 12
            seen.append(set(idx))
        assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(24))


def test_tune_allocator_respects_opt_out_and_glibc_variables(monkeypatch):
    """The allocator tuning runs once per process and stays off when the user (or a Dask nanny)
    set glibc's MALLOC_*_ variables or EMTWIN_NO_MALLOC_TUNING=1; generation bytes never
    depend on it (only where memory comes from)."""
    import twin.shards as sh

    for env in ({"EMTWIN_NO_MALLOC_TUNING": "1"}, {"MALLOC_TRIM_THRESHOLD_": "65536"}):
        monkeypatch.setattr(sh, "_malloc_tuned", None)
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert sh.tune_allocator() is False
            assert sh.tune_allocator() is False  # decided once
    monkeypatch.setattr(sh, "_malloc_tuned", None)
    for k in ("EMTWIN_NO_MALLOC_TUNING",) + sh._MALLOC_ENV_VARS:
        monkeypatch.delenv(k, raising=False)
    got = sh.tune_allocator()
    assert isinstance(got, bool)
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert got is True
