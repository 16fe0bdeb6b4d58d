"""sdk.splits: group K-fold, the leakage guard, augmentation attached after the split."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
A = pytest.importorskip("albumentations")

from sdk.splits import LeakageError, assert_disjoint, group_kfold, train_val, with_transform  # noqa: E402


def test_group_kfold_partitions_by_group():
    rng = np.random.default_rng(4)
    groups = rng.integers(0, 13, 200)
    folds = group_kfold(groups, 5)
    assert len(folds) == 5
    seen = np.concatenate([va for _, va in folds])
    np.testing.assert_array_equal(np.sort(seen), np.arange(200))  # every item validated once
    for tr, va in folds:
        assert not set(groups[tr]) & set(groups[va])
        np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(200))
        assert tr.dtype == np.int64 and va.dtype == np.int64
    sizes = [len(va) for _, va in folds]
    assert max(sizes) - min(sizes) <= np.bincount(groups).max()  # greedy balance
    # deterministic, and the same for any group labels with the same pattern
    again = group_kfold(groups, 5)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    names = np.array([f"micrograph-{g:02d}" for g in groups])
    by_name = group_kfold(names, 5)
    assert sorted(len(va) for _, va in by_name) == sorted(sizes)


def test_group_kfold_hand_case_and_errors():
    groups = ["a", "a", "a", "b", "b", "c"]
    folds = group_kfold(groups, 3)
    vals = sorted(tuple(va.tolist()) for _, va in folds)
    assert vals == [(0, 1, 2), (3, 4), (5,)]  # largest group first, to the emptiest fold
    with pytest.raises(ValueError, match="3 groups"):
        group_kfold(groups, 4)
    with pytest.raises(ValueError, match="n_splits"):
        group_kfold(groups, 1)
    with pytest.raises(ValueError, match="one-dimensional"):
        group_kfold(np.zeros((3, 2)), 2)


def test_leakage_guard_names_the_shared_groups():
    groups = np.array([1, 1, 2, 2, 3, 3])
    assert_disjoint(groups, [0, 1, 2, 3], [4, 5])
    with pytest.raises(LeakageError, match=r"1 group\(s\) on both sides.*\b2\b.*1 training and 1 validation"):
        assert_disjoint(groups, [0, 1, 2], [3, 4, 5])
    assert issubclass(LeakageError, ValueError)
    # a random (crop-level) split of a grouped set leaks
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(10), 6)
    perm = rng.permutation(60)
    with pytest.raises(LeakageError):
        assert_disjoint(g, perm[:48], perm[48:])


class ToyDataset(torch.utils.data.Dataset):
    """A dataset with the sdk.data conventions: .groups, .transform, with_transform."""

    def __init__(self, transform=None):
        self.transform = transform
        self.groups = np.repeat(np.arange(4), 3)

    def with_transform(self, transform):
        return ToyDataset(transform)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        image = np.full((8, 8), float(i), np.float32)
        mask = np.zeros((8, 8), np.int32)
        mask[0, 0] = 1
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(np.asarray(mask, np.int64))


class PlainDataset(torch.utils.data.Dataset):
    """Any map-style dataset returning (C, H, W) image and (H, W) target tensors."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        mask = torch.zeros(8, 8, dtype=torch.int64)
        mask[0, 0] = 1
        return torch.full((1, 8, 8), float(i)), mask


def test_augmentation_is_attached_only_after_the_split():
    flip = A.Compose([A.HorizontalFlip(p=1.0)])
    base = ToyDataset()
    (tr, va), *_ = group_kfold(base.groups, 4)
    train, val = train_val(base, tr, va, train_transform=flip)
    assert base.transform is None  # the base dataset is left un-augmented
    assert train.dataset.transform is flip and val.dataset.transform is None
    np.testing.assert_array_equal(train.groups, base.groups[tr])
    x, y = train[0]
    assert int(y[0, -1]) == 1 and int(y[0, 0]) == 0  # flipped
    x, y = val[0]
    assert int(y[0, 0]) == 1  # not flipped
    assert float(x[0, 0, 0]) == float(va[0])
    with pytest.raises(LeakageError):
        train_val(base, [0, 1, 2, 3], [3, 4, 5], train_transform=flip)
    with pytest.raises(ValueError, match="already has a transform"):
        with_transform(ToyDataset(transform=flip), tr, flip)
    # any other dataset: the transform wraps its (image, target) output, in one call
    wrapped = with_transform(PlainDataset(), [2, 3], flip)
    x, y = wrapped[1]
    assert x.shape == (1, 8, 8) and float(x[0, 0, 0]) == 3.0 and int(y[0, -1]) == 1
    with pytest.raises(ValueError, match="groups"):
        train_val(PlainDataset(), [0], [1])


def test_splits_of_sdk_datasets(tmp_path):
    from sdk.augment import Physics, build_pipeline
    from sdk.data import SyntheticDataset
    from test_sdk_data import write_coord_file

    path = write_coord_file(tmp_path / "c.h5", n=8)
    ds = SyntheticDataset(path, label="coord", crop=16, normalize="none")
    folds = group_kfold(ds, 4)  # a dataset with .groups is accepted directly
    for tr, va in folds:
        assert_disjoint(ds, tr, va)
    train, val = train_val(ds, *folds[0], train_transform=build_pipeline(Physics(), strength="light"))
    assert ds.transform is None and train.dataset.transform is not None
    assert train.dataset._ds is ds._ds  # the lazy file handle is shared, not re-opened
    x, y = train[0]
    assert x.shape == (1, 16, 16) and y.shape == (16, 16)
    loader = torch.utils.data.DataLoader(val, batch_size=2)
    assert sum(len(b[0]) for b in loader) == len(folds[0][1])
