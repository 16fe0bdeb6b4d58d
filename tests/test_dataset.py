"""Tests for twin.dataset: the HDF5 dataset writer and reader (DESIGN.md section 3)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from twin.dataset import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    FORMAT,
    FORMAT_VERSION,
    DatasetError,
    DatasetWriter,
    EmtwinDataset,
    LabelSpec,
    open_dataset,
)

H, W = 24, 40
N = 5

LABELS = {
    "grain_id": LabelSpec("int32", "instance", description="grain index"),
    "boundary": LabelSpec("uint8", "boundary", classes=("interior", "boundary")),
}


def make_sample(i: int, image_dtype: str = "uint16", channels: int | None = None):
    """Deterministic synthetic sample ``i`` (its own RNG, no global state)."""
    rng = np.random.default_rng(np.random.SeedSequence(1234, spawn_key=(i,)))
    shape = (H, W) if channels is None else (H, W, channels)
    if np.dtype(image_dtype).kind == "f":
        image = rng.normal(100.0, 10.0, shape).astype(image_dtype)
    else:
        image = rng.integers(0, 4000, shape).astype(image_dtype)
    grain = rng.integers(0, 7, (H, W)).astype(np.int32)
    boundary = (np.diff(grain, axis=1, prepend=grain[:, :1]) != 0).astype(np.uint8)
    labels = {"grain_id": grain, "boundary": boundary}
    params = {
        "dose": np.float32(0.5 + i),  # numpy scalar
        "gain": np.float64(2.5),
        "n_grains": np.int64(7 + i),
        "flip": np.bool_(i % 2 == 0),
        "drift": np.array([0.1 * i, -0.2]),  # numpy array
        "nested": {"b": 1, "a": [1, 2, np.int16(3)]},
        "name": "sample",
    }
    geometry = {"atoms": rng.normal(size=(3 + i, 3))}
    return image, labels, params, geometry


ATTRS = {
    "recipe": "name: test\nsize: [24, 40]\n",
    "recipe_sha256": "0" * 64,
    "root_seed": 1234,
    "instrument": "kind: sem\n",
    "pixel_size": 20.0,
    "pixel_size_unit": "nm",
    "flag": True,
    "extra": {"b": 2, "a": 1},  # dict -> JSON text
}


def write_file(path: Path, *, n: int = N, compression: str = DEFAULT_COMPRESSION,
               image_dtype: str = "uint16", channels: int | None = None,
               geometry: bool = True) -> None:
    shape = (H, W) if channels is None else (H, W, channels)
    with DatasetWriter(path, n_samples=n, image_shape=shape, image_dtype=image_dtype,
                       labels=LABELS, attrs=ATTRS, compression=compression) as w:
        for i in range(n):
            image, labels, params, geo = make_sample(i, image_dtype, channels)
            w.write(i, image, labels, specimen_id=i // 2, index=100 + i, params=params,
                    geometry=geo if geometry else None)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("image_dtype", ["uint16", "float32"])
def test_round_trip(tmp_path, compression, image_dtype):
    path = tmp_path / "out.h5"
    write_file(path, compression=compression, image_dtype=image_dtype)
    assert leftovers(tmp_path) == ["out.h5"]

    ds = open_dataset(path)
    assert isinstance(ds, EmtwinDataset)
    assert len(ds) == ds.n_samples == N
    assert ds.image_shape == (H, W)
    assert ds.image_dtype == np.dtype(image_dtype)
    assert ds.label_names == ["boundary", "grain_id"]
    assert ds.geometry_names == ["atoms"]

    a = ds.attrs
    assert a["format"] == FORMAT
    assert a["format_version"] == FORMAT_VERSION and type(a["format_version"]) is int
    assert a["complete"] is True
    assert a["n_samples"] == N
    assert isinstance(a["created"], str) and a["created"].endswith("+00:00")
    assert isinstance(a["emtwin_version"], str) and a["emtwin_version"]
    assert a["recipe"] == ATTRS["recipe"]
    assert a["root_seed"] == 1234 and a["pixel_size"] == 20.0 and a["pixel_size_unit"] == "nm"
    assert a["flag"] is True
    assert json.loads(a["extra"]) == {"a": 1, "b": 2}

    assert ds.label_attrs("grain_id")["kind"] == "instance"
    assert ds.label_attrs("grain_id")["classes"] == []
    assert ds.label_attrs("grain_id")["description"] == "grain index"
    assert ds.label_attrs("boundary")["classes"] == ["interior", "boundary"]
    assert ds.label_attrs("boundary")["kind"] == "boundary"

    np.testing.assert_array_equal(ds.specimen_ids(), [0, 0, 1, 1, 2])
    assert ds.specimen_ids().dtype == np.int64
    np.testing.assert_array_equal(ds.indices(), 100 + np.arange(N))

    for i in range(N):
        image, labels, params, geo = make_sample(i, image_dtype)
        got = ds.image(i)
        assert got.dtype == image.dtype
        np.testing.assert_array_equal(got, image)
        for name, arr in labels.items():
            lab = ds.label(name, i)
            assert lab.dtype == arr.dtype
            np.testing.assert_array_equal(lab, arr)
        expected = json.loads(json.dumps(params, default=lambda o: o.tolist() if hasattr(o, "tolist") else o))
        assert ds.params(i) == expected
        assert ds.params(i)["n_grains"] == 7 + i and ds.params(i)["flip"] == (i % 2 == 0)
        np.testing.assert_array_equal(ds.geometry("atoms", i), geo["atoms"])

        item = ds[i]
        np.testing.assert_array_equal(item["image"], image)
        assert set(item["labels"]) == {"grain_id", "boundary"}
        assert item["specimen_id"] == i // 2 and item["index"] == 100 + i
        assert item["params"] == expected
    np.testing.assert_array_equal(ds[-1]["image"], make_sample(N - 1, image_dtype)[0])
    with pytest.raises(IndexError):
        ds[N]
    ds.close()


def test_compression_filters_applied(tmp_path):
    for compression in COMPRESSIONS:
        path = tmp_path / f"{compression}.h5"
        write_file(path, compression=compression, n=1)
        with h5py.File(path, "r") as f:
            d = f["images"]
            assert d.chunks == (1, H, W)
            assert f["labels/grain_id"].chunks == (1, H, W)
            filters = d._filters
            if compression == "gzip":
                assert "gzip" in filters and filters["gzip"] == 1
            elif compression == "lz4":
                assert "32001" in filters or 32001 in filters  # Blosc filter id
            else:
                assert not filters


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_chunks_encoded_by_the_writer_are_the_filters_bytes(tmp_path, compression, monkeypatch):
    """The writer compresses whole-sample chunks itself (Blosc through hdf5plugin's library,
    raw bytes without filters) and writes them as stored: the chunks are byte for byte what
    HDF5's filter pipeline stores, including an incompressible chunk (stored unfiltered by
    the filter: the writer then hands it to HDF5) and multichannel/float images."""
    import twin.dataset as dsm

    def write(path, channels, image_dtype):
        shape = (H, W) if channels is None else (H, W, channels)
        with DatasetWriter(path, n_samples=3, image_shape=shape, image_dtype=image_dtype,
                           labels=LABELS, attrs={}, compression=compression) as w:
            for i in range(3):
                image, labels, params, _ = make_sample(i, image_dtype, channels)
                if i == 2:  # random bytes: Blosc cannot make them smaller
                    labels["boundary"] = np.random.default_rng(7).integers(
                        0, 256, (H, W)).astype(np.uint8)
                w.write(i, image, labels, specimen_id=0, index=i, params=params)

    for channels, image_dtype in ((None, "uint16"), (3, "float32")):
        direct, through = tmp_path / f"d{channels}.h5", tmp_path / f"t{channels}.h5"
        write(direct, channels, image_dtype)
        with monkeypatch.context() as m:  # every chunk through HDF5's filters
            m.setattr(dsm._ChunkEncoder, "encode", lambda self, arr: None)
            write(through, channels, image_dtype)
        with h5py.File(direct, "r") as f, h5py.File(through, "r") as g:
            for name in ("images", "labels/grain_id", "labels/boundary"):
                zeros = (0,) * (f[name].ndim - 1)
                for i in range(3):
                    assert (f[name].id.read_direct_chunk((i, *zeros))
                            == g[name].id.read_direct_chunk((i, *zeros))), (name, i)
                np.testing.assert_array_equal(f[name][...], g[name][...])
            assert dsm.data_sha256(f) == dsm.data_sha256(g)
    if compression == "lz4":
        assert dsm._blosc_compress_ctx() is not None  # the fast path is there to be tested


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_running_checksum_equals_the_checksum_of_the_file(tmp_path, compression):
    """``checksum=True`` keeps the images' and labels' digests while writing; whatever the
    order of the writes (in order, out of order, a position written twice: then computed
    from the file) it is the checksum of the file as stored."""
    from twin.dataset import data_sha256

    for order in ([0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [0, 1, 2, 2, 3, 4]):
        path = tmp_path / f"{compression}-{len(order)}-{order[0]}.h5"
        with DatasetWriter(path, n_samples=N, image_shape=(H, W), image_dtype="uint16",
                           labels=LABELS, attrs={}, compression=compression,
                           checksum=True) as w:
            for i in order:
                image, labels, params, geo = make_sample(i)
                w.write(i, image, labels, specimen_id=i // 2, index=i, params=params,
                        geometry=geo)
            digest = w.data_sha256()
        with h5py.File(path, "r") as f:
            assert data_sha256(f) == digest


def test_meta_rows_written_in_batches_keep_the_last_write(tmp_path):
    """``/meta`` rows are written in batches: more samples than a batch, in shuffled order,
    one position written twice (the last write wins), and ``writer.file`` read mid-way sees
    every row written so far."""
    import twin.dataset as dsm

    n = 2 * dsm._META_BATCH + 7
    order = list(np.random.default_rng(5).permutation(n)) + [3]
    spec = {"grain_id": LabelSpec("int32", "instance")}
    path = tmp_path / "meta.h5"
    with DatasetWriter(path, n_samples=n, image_shape=(4, 4), image_dtype="uint16",
                       labels=spec, attrs={}) as w:
        for k, i in enumerate(order):
            last = k == len(order) - 1
            w.write(int(i), np.full((4, 4), i, np.uint16), {"grain_id": np.zeros((4, 4), np.int32)},
                    specimen_id=int(i) // 3 + (100 if last else 0), index=int(i),
                    params={"i": int(i), "last": last})
            if k == 10:
                seen = w.file["meta/index"][...]
                assert all(seen[j] == j for j in order[:11])
                assert json.loads(w.file["meta/params"][int(order[10])])["i"] == order[10]
    with open_dataset(path) as ds:
        np.testing.assert_array_equal(ds.indices(), np.arange(n))
        expect = np.arange(n) // 3
        expect[3] += 100
        np.testing.assert_array_equal(ds.specimen_ids(), expect)
        assert ds.params(3) == {"i": 3, "last": True}
        assert ds.params(n - 1) == {"i": n - 1, "last": False}
        np.testing.assert_array_equal(ds.image(n - 1), np.full((4, 4), n - 1, np.uint16))


def test_multichannel_images(tmp_path):
    path = tmp_path / "rgb.h5"
    write_file(path, n=2, channels=3, geometry=False)
    with open_dataset(path) as ds:
        assert ds.image_shape == (H, W, 3)
        np.testing.assert_array_equal(ds.image(1), make_sample(1, "uint16", 3)[0])
        assert ds.label("grain_id", 1).shape == (H, W)
        assert ds.geometry_names == []


def test_geometry_missing_for_some_samples(tmp_path):
    path = tmp_path / "g.h5"
    with DatasetWriter(path, n_samples=3, image_shape=(H, W), image_dtype="uint16",
                       labels=LABELS, attrs={}) as w:
        for i in range(3):
            image, labels, params, _ = make_sample(i)
            geo = {"pts": np.arange(4.0).reshape(2, 2)} if i == 1 else None
            w.write(i, image, labels, specimen_id=0, index=i, params=params, geometry=geo)
    ds = open_dataset(path)
    assert ds.geometry("pts", 0).size == 0
    np.testing.assert_array_equal(ds.geometry("pts", 1), [[0.0, 1.0], [2.0, 3.0]])
    with pytest.raises(DatasetError, match="no geometry 'nope'"):
        ds.geometry("nope", 0)
    with pytest.raises(DatasetError, match="no label 'nope'"):
        ds.label("nope", 0)


def test_deterministic_contents(tmp_path):
    """Two writers fed identical data produce identical contents (apart from `created`)."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_file(a)
    write_file(b)

    def dump(path):
        out = {}
        with h5py.File(path, "r") as f:
            out["/"] = {k: v for k, v in f.attrs.items() if k != "created"}

            def visit(name, obj):
                attrs = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
                if isinstance(obj, h5py.Dataset):
                    data = obj[...]
                    if data.dtype == object:
                        data = [np.asarray(x).tolist() for x in data]
                    else:
                        data = data.tobytes()
                    out[name] = (attrs, str(obj.dtype), obj.shape, obj.chunks, data)
                else:
                    out[name] = (attrs,)

            f.visititems(visit)
        return out

    da, db = dump(a), dump(b)
    assert da.keys() == db.keys()
    for key in da:
        assert str(da[key]) == str(db[key]), key


# ---------------------------------------------------------------- atomicity


def test_exception_in_with_block_leaves_nothing(tmp_path):
    path = tmp_path / "out.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(path, n_samples=2, image_shape=(H, W), image_dtype="uint16",
                           labels=LABELS, attrs={}) as w:
            image, labels, params, _ = make_sample(0)
            w.write(0, image, labels, specimen_id=0, index=0, params=params)
            assert len(leftovers(tmp_path)) == 1  # the hidden temp file exists meanwhile
            assert not path.exists()
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []


def test_exception_keeps_existing_file_unchanged(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=2, geometry=False)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with DatasetWriter(path, n_samples=3, image_shape=(H, W), image_dtype="uint16",
                           labels=LABELS, attrs={}) as w:
            image, labels, params, _ = make_sample(0)
            w.write(0, image, labels, specimen_id=0, index=0, params=params)
            assert path.read_bytes() == before  # untouched until the final rename
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == ["out.h5"]
    assert len(open_dataset(path)) == 2


def test_successful_write_replaces_existing_file(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=2, geometry=False)
    write_file(path, n=3, geometry=False)
    assert len(open_dataset(path)) == 3
    assert leftovers(tmp_path) == ["out.h5"]


def test_incomplete_write_leaves_no_file(tmp_path):
    path = tmp_path / "out.h5"
    with pytest.raises(DatasetError, match=r"incomplete: 2 of 3 samples were not written"):
        with DatasetWriter(path, n_samples=3, image_shape=(H, W), image_dtype="uint16",
                           labels=LABELS, attrs={}) as w:
            image, labels, params, _ = make_sample(0)
            w.write(0, image, labels, specimen_id=0, index=0, params=params)
    assert leftovers(tmp_path) == []


def test_abandoned_writer_removes_temp_file(tmp_path):
    w = DatasetWriter(tmp_path / "out.h5", n_samples=1, image_shape=(H, W), image_dtype="uint16",
                      labels=LABELS, attrs={})
    assert len(leftovers(tmp_path)) == 1
    w.abort()
    assert leftovers(tmp_path) == []
    with pytest.raises(DatasetError, match="writer is closed"):
        image, labels, params, _ = make_sample(0)
        w.write(0, image, labels, specimen_id=0, index=0, params=params)


def test_nonexistent_directory(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        DatasetWriter(tmp_path / "missing" / "out.h5", n_samples=1, image_shape=(H, W),
                      image_dtype="uint16", labels=LABELS, attrs={})


def test_parent_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match="is not a directory"):
        DatasetWriter(tmp_path / "afile" / "out.h5", n_samples=1, image_shape=(H, W),
                      image_dtype="uint16", labels=LABELS, attrs={})


def test_unwritable_directory(tmp_path, monkeypatch):
    """Permission bits do not bind root (CI runs as root), so the permission check is simulated."""
    d = tmp_path / "ro"
    d.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == d else real_access(p, mode, **kw))
    with pytest.raises(DatasetError, match="not writable"):
        DatasetWriter(d / "out.h5", n_samples=1, image_shape=(H, W), image_dtype="uint16",
                      labels=LABELS, attrs={})
    assert list(d.iterdir()) == []


# ---------------------------------------------------------------- bad writes


@pytest.fixture
def writer(tmp_path):
    w = DatasetWriter(tmp_path / "out.h5", n_samples=2, image_shape=(H, W), image_dtype="uint16",
                      labels=LABELS, attrs={})
    yield w
    w.abort()


def test_wrong_image_shape(writer):
    image, labels, params, _ = make_sample(0)
    with pytest.raises(DatasetError, match=r"sample 0: image has shape \(24, 39\), expected \(24, 40\)"):
        writer.write(0, image[:, :-1], labels, specimen_id=0, index=0, params=params)


def test_wrong_image_dtype(writer):
    image, labels, params, _ = make_sample(0)
    with pytest.raises(DatasetError, match="image has dtype float64, expected uint16"):
        writer.write(0, image.astype(np.float64), labels, specimen_id=0, index=0, params=params)


def test_wrong_label_shape_and_dtype(writer):
    image, labels, params, _ = make_sample(0)
    bad = dict(labels, grain_id=labels["grain_id"][:-1])
    with pytest.raises(DatasetError, match="label 'grain_id' has shape"):
        writer.write(0, image, bad, specimen_id=0, index=0, params=params)
    bad = dict(labels, grain_id=labels["grain_id"].astype(np.int64))
    with pytest.raises(DatasetError, match="label 'grain_id' has dtype int64, expected int32"):
        writer.write(0, image, bad, specimen_id=0, index=0, params=params)


def test_missing_and_unknown_labels(writer):
    image, labels, params, _ = make_sample(0)
    with pytest.raises(DatasetError, match="missing label.*'boundary'"):
        writer.write(0, image, {"grain_id": labels["grain_id"]}, specimen_id=0, index=0, params=params)
    with pytest.raises(DatasetError, match="unknown label.*'twin'"):
        writer.write(0, image, dict(labels, twin=labels["boundary"]), specimen_id=0, index=0,
                     params=params)


def test_bad_index_and_params(writer):
    image, labels, params, _ = make_sample(0)
    with pytest.raises(DatasetError, match="out of range"):
        writer.write(2, image, labels, specimen_id=0, index=0, params=params)
    with pytest.raises(DatasetError, match="params cannot be stored as JSON"):
        writer.write(0, image, labels, specimen_id=0, index=0, params={"f": object()})


def test_bad_constructor_arguments(tmp_path):
    kw = dict(n_samples=1, image_shape=(H, W), image_dtype="uint16", labels=LABELS, attrs={})
    with pytest.raises(DatasetError, match="compression 'zstd' is not supported"):
        DatasetWriter(tmp_path / "a.h5", **{**kw, "compression": "zstd"})
    with pytest.raises(DatasetError, match="attrs may not set complete"):
        DatasetWriter(tmp_path / "a.h5", **{**kw, "attrs": {"complete": True}})
    with pytest.raises(DatasetError, match="attribute 'x' has type NoneType"):
        DatasetWriter(tmp_path / "a.h5", **{**kw, "attrs": {"x": None}})
    with pytest.raises(DatasetError, match="image_shape"):
        DatasetWriter(tmp_path / "a.h5", **{**kw, "image_shape": (H,)})
    assert leftovers(tmp_path) == []


def test_label_spec_validation():
    with pytest.raises(ValueError, match="kind 'mask' is not allowed"):
        LabelSpec("uint8", "mask")
    with pytest.raises(ValueError, match="dtype"):
        LabelSpec("<U4", "semantic")
    spec = LabelSpec(np.uint8, "semantic", classes=["a", "b"])  # type: ignore[arg-type]
    assert spec.dtype == "uint8" and spec.classes == ("a", "b")


# ---------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        open_dataset(tmp_path / "nope.h5")


def test_truncated_file(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"out\.h5: file is truncated or corrupt"):
        open_dataset(path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "out.h5"
    path.write_text("hello, not HDF5\n")
    with pytest.raises(DatasetError, match="not an HDF5 file"):
        open_dataset(path)


def test_other_format_version(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=1)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 7
    with pytest.raises(DatasetError, match=r"out\.h5: format_version 7 is not supported .*supports 1"):
        open_dataset(path)


def test_plain_hdf5_file(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(DatasetError, match=r"plain\.h5: not an emtwin dataset \(no 'format' attribute\)"):
        open_dataset(path)


def test_other_format(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(DatasetError, match="not an emtwin dataset"):
        open_dataset(path)


def test_incomplete_flag(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=2)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(DatasetError, match=r"dataset is incomplete \(complete=False\)"):
        open_dataset(path)
    ds = open_dataset(path, allow_incomplete=True)
    assert len(ds) == 2


def test_missing_group(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=1)
    with h5py.File(path, "r+") as f:
        del f["meta/params"]
    with pytest.raises(DatasetError, match="missing '/meta/params'"):
        open_dataset(path)


# ---------------------------------------------------------------- workers


def test_reader_closes_file_after_validation(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=2)
    ds = open_dataset(path)
    assert ds._file is None  # only metadata kept
    ds.image(0)
    assert ds._file is not None
    ds.close()
    assert ds._file is None
    np.testing.assert_array_equal(ds.image(1), make_sample(1)[0])  # re-opens lazily
    ds.close()


def test_pickle_round_trip(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=3)
    ds = open_dataset(path)
    ds.image(0)  # opens the handle: pickling must still work
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._file is None
    assert clone.label_names == ds.label_names and len(clone) == 3
    for i in range(3):
        np.testing.assert_array_equal(clone.image(i), make_sample(i)[0])
        assert clone.params(i) == ds.params(i)
    clone.close()
    ds.close()


def _child_read(ds, queue):
    try:
        out = [(ds.image(i), ds.label("grain_id", i), ds.params(i)["n_grains"]) for i in range(len(ds))]
        queue.put(("ok", out))
    except Exception as exc:  # pragma: no cover - reported to the parent
        queue.put(("error", repr(exc)))


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_read_in_forked_child(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=3, compression="lz4")
    ds = open_dataset(path)
    ds.image(0)  # parent holds an open handle that the child inherits
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_read, args=(ds, queue))
    proc.start()
    status, out = queue.get(timeout=30)
    proc.join(timeout=30)
    assert status == "ok", out
    assert proc.exitcode == 0
    for i, (image, grain, n_grains) in enumerate(out):
        sample = make_sample(i)
        np.testing.assert_array_equal(image, sample[0])
        np.testing.assert_array_equal(grain, sample[1]["grain_id"])
        assert n_grains == 7 + i
    # the parent's handle still works after the child used its own
    np.testing.assert_array_equal(ds.image(2), make_sample(2)[0])
    ds.close()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_read_in_fork_pool(tmp_path):
    path = tmp_path / "out.h5"
    write_file(path, n=4)
    ds = open_dataset(path)
    ds.image(0)
    with mp.get_context("fork").Pool(2) as pool:
        sums = pool.map(_image_sum, [(ds, i) for i in range(4)])
    assert sums == [int(make_sample(i)[0].sum()) for i in range(4)]
    ds.close()


def _image_sum(args):
    ds, i = args
    return int(ds.image(i).sum())
