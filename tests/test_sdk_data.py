"""sdk.data: SyntheticDataset over emtwin HDF5, RealDataset over image/mask folders.

Most tests use a tiny hand-written HDF5 file whose image *is* its pixel coordinates
(value = y*W + x + 1), so any crop offset, flip or misalignment between image and labels shows
exactly. One test trains a model the ordinary PyTorch way on a file made by the real generator.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
A = pytest.importorskip("albumentations")

from torch.utils.data import DataLoader  # noqa: E402

from sdk.augment import Physics, build_pipeline  # noqa: E402
from sdk.data import (  # noqa: E402
    DataError,
    RealDataset,
    SyntheticDataset,
    boundary_from_instances,
    default_group,
)
from twin.dataset import DatasetWriter, LabelSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
H = W = 48
N = 6

LABELS = {
    "coord": LabelSpec("int32", "instance", description="y*W + x + 1"),
    "blocks": LabelSpec("int32", "instance", description="8x8 blocks"),
    "boundary": LabelSpec("uint8", "boundary", classes=("grain", "boundary")),
}


def coord_map(h: int = H, w: int = W) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) + 1).astype(np.int32)


def write_coord_file(path: Path, n: int = N, rgb: bool = False) -> Path:
    coord = coord_map()
    yy, xx = np.mgrid[0:H, 0:W]
    blocks = ((yy // 8) * 10 + xx // 8).astype(np.int32)
    shape = (H, W, 3) if rgb else (H, W)
    with DatasetWriter(path, n_samples=n, image_shape=shape, image_dtype="uint16", labels=LABELS,
                       attrs={"recipe": "name: test\ndetector: {dose: [40, 80]}\n",
                              "instrument": (ROOT / "twin" / "instruments" / "generic-sem.yaml").read_text()},
                       compression="none") as wr:
        for i in range(n):
            img = coord.astype(np.uint16)
            if rgb:
                img = np.stack([img, img // 2, img // 3], -1).astype(np.uint16)
            wr.write(i, img, {"coord": coord, "blocks": blocks + 1000 * i,
                              "boundary": boundary_from_instances(blocks)},
                     specimen_id=i // 2, index=i, params={})
    return path


@pytest.fixture(scope="module")
def coord_file(tmp_path_factory) -> Path:
    return write_coord_file(tmp_path_factory.mktemp("coord") / "coord.h5")


# ------------------------------------------------------------------ SyntheticDataset basics


def test_shapes_dtypes_and_normalisations(coord_file):
    for channels in (1, 3):
        ds = SyntheticDataset(coord_file, label="boundary", crop=32, channels=channels)
        x, y = ds[0]
        assert x.dtype == torch.float32 and x.shape == (channels, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (32, 32)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert set(y.unique().tolist()) <= {0, 1}
        if channels == 3:
            assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    z, _ = SyntheticDataset(coord_file, crop=None, normalize="zscore")[1]
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1) < 1e-4
    raw, _ = SyntheticDataset(coord_file, crop=None, normalize="none")[1]
    np.testing.assert_allclose(raw[0].numpy(), coord_map(), atol=1e-2)
    # percentile of the whole image: 0.5 % and 99.5 % of the coordinate ramp map to 0 and 1
    p, _ = SyntheticDataset(coord_file, crop=None, normalize="percentile")[1]
    lo, hi = np.percentile(coord_map().astype(np.float32), (0.5, 99.5))
    np.testing.assert_allclose(p[0].numpy(), np.clip((coord_map() - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_groups_length_and_centre_crop(coord_file):
    ds = SyntheticDataset(coord_file, crop=16, length=14, random_crop=False, normalize="none",
                          label="coord")
    assert len(ds) == 14 and ds.n_samples == N
    np.testing.assert_array_equal(ds.groups, (np.arange(14) % N) // 2)
    x, y = ds[13]
    assert int(round(float(x[0, 0, 0]))) == (H - 16) // 2 * W + (W - 16) // 2 + 1
    assert torch.equal(x[0].round().long(), y)
    with pytest.raises(IndexError):
        ds[14]


def test_tiles_cover_every_pixel_once(coord_file):
    ds = SyntheticDataset(coord_file, label="coord", crop=16, normalize="none", tiles=True)
    assert len(ds) == N * 9
    seen = np.concatenate([ds[i][1].numpy().ravel() for i in range(9)])
    np.testing.assert_array_equal(np.sort(seen), coord_map().ravel())
    np.testing.assert_array_equal(ds.groups, np.repeat(np.arange(N) // 2, 9))


def test_image_and_all_labels_go_through_one_call(coord_file):
    tf = A.Compose([A.SquareSymmetry(p=1.0)])
    ds = SyntheticDataset(coord_file, label=["coord", "blocks", "boundary"], crop=32,
                          normalize="none", transform=tf)
    seen = set()
    for i in range(12):
        x, t = ds[i % N]
        assert set(t) == {"coord", "blocks", "boundary"}
        # image == coordinate label at every pixel: the same flip/turn for image and mask
        assert torch.equal(x[0].round().long(), t["coord"])
        # boundary label still equals the boundary of the (transformed) blocks
        # (inside the crop: the crop cuts blocks, whose edges are no boundaries)
        np.testing.assert_array_equal(boundary_from_instances(t["blocks"]).numpy()[1:-1, 1:-1],
                                      t["boundary"].numpy()[1:-1, 1:-1])
        c = t["coord"].numpy()
        seen.add((int(np.sign(c[0, 1] - c[0, 0])), int(np.sign(c[1, 0] - c[0, 0]))))
    assert len(seen) >= 3  # several elements of D4 were drawn


def test_grain_id_target_and_rgb_file(tmp_path):
    path = write_coord_file(tmp_path / "rgb.h5", n=2, rgb=True)
    x1, y = SyntheticDataset(path, label="blocks", crop=None, channels=1, normalize="none")[1]
    assert y.dtype == torch.int64 and int(y.max()) > 255  # instance ids kept
    img = np.stack([coord_map(), coord_map() // 2, coord_map() // 3], -1).astype(np.float32)
    np.testing.assert_allclose(x1[0].numpy(), img.mean(-1), rtol=1e-5, atol=1e-2)
    x3, _ = SyntheticDataset(path, label="blocks", crop=None, channels=3, normalize="none")[0]
    np.testing.assert_allclose(x3.numpy(), np.moveaxis(img, -1, 0), atol=1e-2)


def test_boundary_from_instances_widths():
    ids = np.zeros((10, 12), np.int64)
    ids[:, 6:] = 1
    skimage_seg = pytest.importorskip("skimage.segmentation")
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 4, (20, 20))
    np.testing.assert_array_equal(boundary_from_instances(rand, 2).astype(bool),
                                  skimage_seg.find_boundaries(rand, connectivity=1, mode="thick"))
    for width in (1, 2, 3, 4, 5):
        cols = np.flatnonzero(boundary_from_instances(ids, width)[0])
        assert len(cols) == width and cols.min() <= 6 <= cols.max() + 1
    t = boundary_from_instances(torch.from_numpy(np.stack([ids, ids])))
    assert isinstance(t, torch.Tensor) and t.shape == (2, 10, 12)
    with pytest.raises(ValueError):
        boundary_from_instances(ids, 0)


def test_errors_are_clear(coord_file, tmp_path):
    with pytest.raises(DataError, match="no label 'phase'.*blocks, boundary, coord"):
        SyntheticDataset(coord_file, label="phase")
    with pytest.raises(DataError, match="crop 64 px is larger"):
        SyntheticDataset(coord_file, crop=64)
    with pytest.raises(ValueError, match="normalize"):
        SyntheticDataset(coord_file, normalize="minmax")
    with pytest.raises(ValueError, match="channels"):
        SyntheticDataset(coord_file, channels=2)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="not an HDF5"):
        SyntheticDataset(bad)
    assert issubclass(DataError, ValueError)


# ------------------------------------------------------------------ workers and seeding


def _offsets(loader) -> list[int]:
    return [int(round(float(x[0, 0, 0, 0]))) for x, _ in loader]


def test_per_worker_seeding_with_a_real_multiworker_loader(coord_file):
    ds = SyntheticDataset(coord_file, label="coord", crop=8, normalize="none", length=16)

    def loader(seed: int) -> DataLoader:
        return DataLoader(ds, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(seed))

    a = loader(1)
    first, second = _offsets(a), _offsets(a)  # two epochs of one loader
    again = _offsets(loader(1))
    other = _offsets(loader(2))
    assert first == again  # reproducible from the DataLoader seed
    assert first != second  # a new epoch draws new crops
    assert first != other
    # worker 0 serves items 0, 2, 4...; worker 1 items 1, 3, 5...: identical worker RNGs would
    # give identical sequences
    assert first[0::2] != first[1::2]
    assert len(set(first)) > 8

    # the transform is reseeded per worker too
    tf = A.Compose([A.SquareSymmetry(p=1.0)])
    ds_t = SyntheticDataset(coord_file, label="coord", crop=None, normalize="none", length=16, transform=tf)
    corners = [int(round(float(x[0, 0, 0, 0]))) for x, _ in
               DataLoader(ds_t, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(3))]
    assert corners[0::2] != corners[1::2]


def test_pickles_for_spawned_workers(coord_file):
    import pickle

    ds = SyntheticDataset(coord_file, crop=16, transform=build_pipeline(Physics()))
    ds[0]  # opens the file in this process
    clone = pickle.loads(pickle.dumps(ds))
    x, y = clone[1]
    assert x.shape == (1, 16, 16) and y.shape == (16, 16)


# ------------------------------------------------------------------ the plain PyTorch loop


def _small_recipe(tmp: Path) -> Path:
    text = (ROOT / "recipes" / "sem_voronoi_grains.yaml").read_text()
    for key, value in (("size", "[96, 96]"), ("samples", "8"), ("specimens", "4")):
        text = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
    text = re.sub(r"^  grains_per_field: .*$", "  grains_per_field: [15, 40]", text, flags=re.M)
    out = tmp / "small.yaml"
    out.write_text(text)
    return out


def test_standard_training_loop_on_a_generated_file(tmp_path):
    from twin.generate import generate_dataset

    path = generate_dataset(_small_recipe(tmp_path), tmp_path / "grains.h5", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: intra-op threads fight the workers
    try:
        losses = _train(path)
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


def _train(path: Path) -> list[float]:
    """The README's loop: plain PyTorch, nothing emtwin-specific but the dataset line."""
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    train = SyntheticDataset(path, label="boundary", crop=64, length=32,
                             transform=build_pipeline(Physics(metric=True), strength="light"))
    loader = DataLoader(train, batch_size=8, shuffle=True, num_workers=2, persistent_workers=True)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 2, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    weight = torch.tensor([1.0, 3.0])
    losses = []
    for epoch in range(6):
        for image, target in loader:
            loss = F.cross_entropy(model(image), target, weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


# ------------------------------------------------------------------ no Numba, no abTEM


def test_sdk_imports_and_reads_without_numba_or_abtem(coord_file):
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('numba', 'abtem'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import sdk.data, sdk.augment, sdk.splits, sdk.metrics
        ds = sdk.data.SyntheticDataset({str(coord_file)!r}, crop=16,
            transform=sdk.augment.build_pipeline(sdk.augment.Physics(), noise_model='generic-sem'))
        x, y = ds[0]
        sdk.augment.NoiseModel.from_dataset({str(coord_file)!r})
        sdk.metrics.boundary_f1(y.numpy(), y.numpy())
        sdk.splits.group_kfold(ds.groups, 3)
        import torch
        model = torch.nn.Conv2d(1, 2, 3, padding=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for image, target in torch.utils.data.DataLoader(ds, batch_size=3):
            loss = torch.nn.functional.cross_entropy(model(image), target)
            opt.zero_grad(); loss.backward(); opt.step()
        bad = [m for m in sys.modules if m.split('.')[0] in ('numba', 'abtem', 'generators')]
        assert not bad, bad
        print('ok')
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ------------------------------------------------------------------ RealDataset


def _png(path: Path, a: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(a).save(path)


@pytest.fixture
def real_folder(tmp_path) -> Path:
    import tifffile

    root = tmp_path / "real"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20, 5:30] = 255
    _png(root / "images" / "a-0-0.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))  # RGB 8 bit
    _png(root / "masks" / "a-0-0.png", mask)
    _png(root / "images" / "a-0-40.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    _png(root / "masks" / "a-0-40.png", np.stack([mask] * 3, -1))  # RGB mask: first channel
    tifffile.imwrite(root / "images" / "b-0-0.tif", rng.integers(0, 4096, (40, 50), dtype=np.uint16))
    tifffile.imwrite(root / "masks" / "b-0-0.tif", (mask > 0).astype(np.uint8))  # 0/1 mask
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    _png(root / "images" / "c.png", np.dstack([grey, grey, grey, np.full_like(grey, 255)]))  # RGBA grey
    _png(root / "masks" / "c.png", mask)
    (root / "images" / ".DS_Store").write_bytes(b"x")
    (root / "images" / "notes.txt").write_text("ignored")
    return root


def test_real_folder_formats_groups_and_channels(real_folder):
    ds = RealDataset(real_folder, normalize="none")
    assert ds.names == ["a-0-0.png", "a-0-40.png", "b-0-0.tif", "c.png"]
    assert ds.groups.tolist() == ["a", "a", "b", "c"]
    expect = np.zeros((40, 50), np.int64)
    expect[10:20, 5:30] = 1
    for i in range(4):
        x, y = ds[i]
        assert x.shape == (1, 40, 50) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        np.testing.assert_array_equal(y.numpy(), expect)
    from PIL import Image

    rgb = np.asarray(Image.open(real_folder / "images" / "a-0-0.png")).astype(np.float32)
    np.testing.assert_allclose(ds[0][0][0].numpy(), rgb.mean(-1), atol=1e-3)
    x3, _ = RealDataset(real_folder, channels=3, normalize="none")[0]
    np.testing.assert_allclose(x3.numpy(), np.moveaxis(rgb, -1, 0), atol=1e-3)
    g3, _ = RealDataset(real_folder, channels=3)[3]  # RGBA grey: one channel repeated
    assert torch.equal(g3[0], g3[1]) and torch.equal(g3[0], g3[2])
    # the same preparation for a lone image (inference on new files)
    from sdk.data import prepare_image, read_image_file

    for i, name in enumerate(ds.names):
        lone = prepare_image(read_image_file(real_folder / "images" / name), channels=3)
        assert torch.equal(lone, RealDataset(real_folder, channels=3)[i][0])
    t16, _ = RealDataset(real_folder, normalize="none")[2]  # 16-bit TIFF values kept
    import tifffile

    np.testing.assert_allclose(t16[0].numpy(), tifffile.imread(real_folder / "images" / "b-0-0.tif"), atol=1e-2)
    ds_g = RealDataset(real_folder, group_fn=lambda n: n[0].upper())
    assert ds_g.groups.tolist() == ["A", "A", "B", "C"]
    assert default_group("10-256-512.png") == "10" and default_group("image_3.png") == "image_3"


def test_real_subset_crop_and_mask_values(real_folder):
    sub = RealDataset(real_folder, files=["a-0-40.png", "b-0-0"], crop=16)
    assert sub.names == ["a-0-40.png", "b-0-0.tif"]
    x, y = sub[1]
    assert x.shape == (1, 16, 16) and y.shape == (16, 16)
    with pytest.raises(DataError, match="zz.png"):
        RealDataset(real_folder, files=["zz.png"])
    multi = np.array([[0, 1], [2, 3]], np.uint8).repeat(20, 0).repeat(25, 1)
    _png(real_folder / "masks" / "c.png", multi)
    _, y = RealDataset(real_folder, mask_threshold=None)[3]
    assert sorted(y.unique().tolist()) == [0, 1, 2, 3]


def test_real_unpaired_and_mismatched_files_are_named(real_folder):
    (real_folder / "masks" / "a-0-40.png").rename(real_folder / "masks" / "a-0-41.png")
    with pytest.raises(DataError, match=r"image\(s\) without a mask.*a-0-40\.png.*mask\(s\) without an image.*a-0-41\.png"):
        RealDataset(real_folder)
    (real_folder / "masks" / "a-0-41.png").rename(real_folder / "masks" / "a-0-40.png")
    _png(real_folder / "masks" / "c.png", np.zeros((40, 51), np.uint8))
    with pytest.raises(DataError, match=r"mismatched pair c\.png: image is 40x50 px but mask c\.png is 40x51"):
        RealDataset(real_folder)
    (real_folder / "masks" / "c.png").unlink()
    _png(real_folder / "masks" / "c.jpg", np.zeros((40, 50), np.uint8))
    with pytest.raises(DataError, match="JPEG masks"):
        RealDataset(real_folder)
    (real_folder / "masks" / "c.jpg").unlink()
    _png(real_folder / "masks" / "c.png", np.zeros((40, 50), np.uint8))
    _png(real_folder / "images" / "c.bmp", np.zeros((40, 50), np.uint8))
    with pytest.raises(DataError, match="two image files with the stem 'c'"):
        RealDataset(real_folder)
    with pytest.raises(DataError, match="images/ and masks/"):
        RealDataset(real_folder / "images")


def test_real_vendor_format(tmp_path):
    pytest.importorskip("ncempy")
    src = REAL / "native-em" / "STEM HAADF Diffraction Micro.emd"
    if not src.is_file():
        pytest.skip("shared native-em data not present")
    root = tmp_path / "vendor"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    os.symlink(src, root / "images" / "haadf-1.emd")
    mask = np.zeros((128, 128), np.uint8)
    mask[:64] = 1
    np.save(root / "masks" / "haadf-1.npy", mask)
    x, y = RealDataset(root, crop=64)[0]
    assert x.shape == (1, 64, 64) and float(x.max()) <= 1.0
    assert y.shape == (64, 64)


@pytest.mark.skipif(not (REAL / "tbm-grains" / "images").is_dir(), reason="shared real data not present")
def test_shared_real_sets_load_as_documented():
    from sdk.splits import group_kfold

    tbm = RealDataset(REAL / "tbm-grains", channels=3)
    assert len(tbm) == 59
    assert len(set(tbm.groups.tolist())) < len(tbm)  # several crops per micrograph
    for i in (0, 30):
        x, y = tbm[i]
        assert x.shape == (3, 256, 256)
        assert 0.08 < float(y.float().mean()) < 0.26  # boundary pixels 10-24 % (README)
    for tr, va in group_kfold(tbm.groups, 5):
        assert not set(tbm.groups[tr]) & set(tbm.groups[va])
    tem = RealDataset(REAL / "tem-nanoparticles", channels=3, files=["image_0.png"])
    x, y = tem[0]
    assert torch.equal(x[0], x[2]) and 0.1 < float(y.float().mean()) < 0.3


def test_synthetic_dataset_reads_a_shard_directory(tmp_path):
    """A --keep-shards run can be read in place: same items as the merged file (issue 8, item 5)."""
    from twin.generate import generate_dataset

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsize: [48, 48]\nsamples: 6\nspecimens: 2\nseed: 4\n"
                      "specimen: {grains_per_field: [5, 9]}\n")
    out = tmp_path / "o.h5"
    generate_dataset(recipe, out, workers=1, shard_size=2, keep_shards=True, progress=False)
    shards = tmp_path / "o.h5.shards"
    assert shards.is_dir()
    a = SyntheticDataset(out, crop=None)
    b = SyntheticDataset(shards, crop=None)
    assert len(a) == len(b) == 6
    assert np.array_equal(a.groups, b.groups)
    for i in range(6):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
