"""Group-aware splits: by specimen (synthetic) or micrograph (real), never by crop.

Crops, fields of view or sessions of one specimen are correlated; a model validated on a crop of a
micrograph it trained on reports a score it will not reach on a new specimen. Every split here keeps
each group on one side, :func:`assert_disjoint` guards any split made elsewhere, and augmentation is
attached only after splitting (:func:`with_transform`, :func:`train_val`), so the validation side
never sees augmented copies and no augmented copy of a training image lands on the validation side.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["LeakageError", "group_kfold", "assert_disjoint", "with_transform", "train_val",
           "TransformedSubset"]


class LeakageError(ValueError):
    """The same group (specimen / micrograph) is on both sides of a split."""


def _groups(groups: Any) -> np.ndarray:
    g = getattr(groups, "groups", groups)  # a dataset with a .groups attribute works too
    if hasattr(g, "detach"):
        g = g.detach().cpu().numpy()
    g = np.asarray(g)
    if g.ndim != 1:
        raise ValueError(f"groups must be one-dimensional (one group per item), got shape {g.shape}")
    return g


def group_kfold(groups: Any, n_splits: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold cross-validation folds that never split a group.

    Groups are assigned, largest first, to the fold with the fewest items so far (ties: the
    lowest fold), as scikit-learn's ``GroupKFold`` does; the result is deterministic.

    Parameters
    ----------
    groups : array-like (N,) or a dataset with ``.groups``
        Group of every item (specimen id, micrograph name...).
    n_splits : int
        Number of folds, 2 <= n_splits <= number of distinct groups.

    Returns
    -------
    list of (train_idx, val_idx)
        ``n_splits`` pairs of sorted int64 index arrays. Every item is in exactly one
        ``val_idx``; no group is on both sides of any pair.

    Raises
    ------
    ValueError
        Too few groups for ``n_splits``, or ``n_splits`` < 2.
    """
    g = _groups(groups)
    if isinstance(n_splits, bool) or int(n_splits) != n_splits or n_splits < 2:
        raise ValueError(f"n_splits must be an int >= 2, got {n_splits!r}")
    uniq, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    if n_splits > len(uniq):
        raise ValueError(f"cannot make {n_splits} group folds from {len(uniq)} groups "
                         f"({_short(uniq)}): use n_splits <= {len(uniq)}")
    order = np.argsort(-counts, kind="stable")
    fold_of_group = np.empty(len(uniq), dtype=np.int64)
    sizes = np.zeros(n_splits, dtype=np.int64)
    for gi in order:
        f = int(np.argmin(sizes))
        fold_of_group[gi] = f
        sizes[f] += counts[gi]
    fold = fold_of_group[inverse.reshape(-1)]
    idx = np.arange(len(g), dtype=np.int64)
    out = []
    for f in range(n_splits):
        tr, va = idx[fold != f], idx[fold == f]
        assert_disjoint(g, tr, va)
        out.append((tr, va))
    return out


def _short(values: Any, limit: int = 8) -> str:
    vals = [str(v) for v in values]
    return ", ".join(vals[:limit]) + (f", ... ({len(vals) - limit} more)" if len(vals) > limit else "")


def assert_disjoint(groups: Any, train_idx: Sequence[int], val_idx: Sequence[int]) -> None:
    """Raise if any group has items on both sides of a split.

    Parameters
    ----------
    groups : array-like (N,) or a dataset with ``.groups``
    train_idx, val_idx : sequences of int
        Item indices of the two sides.

    Raises
    ------
    LeakageError
        Naming the shared groups and how many items of each side they hold.
    """
    g = _groups(groups)
    tr = np.asarray(train_idx, dtype=np.int64).reshape(-1)
    va = np.asarray(val_idx, dtype=np.int64).reshape(-1)
    shared = np.intersect1d(g[tr], g[va]) if tr.size and va.size else np.array([])
    if shared.size:
        n_tr = int(np.isin(g[tr], shared).sum())
        n_va = int(np.isin(g[va], shared).sum())
        raise LeakageError(
            f"{shared.size} group(s) on both sides of the split ({_short(shared)}): {n_tr} training "
            f"and {n_va} validation items come from the same specimens/micrographs, so validation "
            "would overestimate performance on new ones; split by group (sdk.splits.group_kfold)")


class TransformedSubset(Dataset):
    """Items ``indices`` of a dataset, with a transform attached after the split.

    Datasets with a ``transform`` attribute (``sdk.data``) are shallow-copied with the new
    transform (``with_transform``), so the transform is applied by the dataset in its one call on
    image and labels. For other datasets the transform is applied to the returned
    ``(image (C, H, W) tensor, target (H, W) tensor)`` pair, also in one call.

    Attributes
    ----------
    dataset : Dataset
        The (copied) base dataset.
    indices : ndarray (M,) int64
    groups : ndarray (M,) or None
        Groups of the selected items when the base dataset has ``.groups``.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable[..., Any] | None):
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        base_groups = getattr(dataset, "groups", None)
        self.groups = None if base_groups is None else np.asarray(base_groups)[self.indices]
        self._wrap = None
        if hasattr(dataset, "with_transform"):
            dataset = dataset.with_transform(transform)
        elif hasattr(dataset, "transform"):
            dataset = copy.copy(dataset)
            dataset.transform = transform
        else:
            self._wrap = transform
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item = self.dataset[int(self.indices[i])]
        if self._wrap is None:
            return item
        import torch

        image, target = item
        x = image.detach().cpu().numpy()
        x = np.moveaxis(x, 0, -1) if x.ndim == 3 else x
        out = self._wrap(image=np.ascontiguousarray(x), mask=np.asarray(target).astype(np.int32))
        xo = np.asarray(out["image"], dtype=np.float32)
        xo = np.moveaxis(xo, -1, 0) if xo.ndim == 3 else xo[None]
        return (torch.from_numpy(np.ascontiguousarray(xo)),
                torch.from_numpy(np.asarray(out["mask"], dtype=np.int64)))


def with_transform(dataset: Dataset, indices: Sequence[int], transform: Callable[..., Any] | None
                   ) -> TransformedSubset:
    """The items ``indices`` of an un-augmented dataset, augmented by ``transform``.

    Parameters
    ----------
    dataset : Dataset
        Built with ``transform=None``: augmentation belongs after the split.
    indices : sequence of int
    transform : callable or None

    Raises
    ------
    ValueError
        If ``dataset`` already carries a transform (augmentation before the split).
    """
    if getattr(dataset, "transform", None) is not None:
        raise ValueError("the dataset already has a transform: build it with transform=None and "
                         "attach augmentation after the split (sdk.splits.with_transform), so that "
                         "validation items are never augmented")
    return TransformedSubset(dataset, indices, transform)


def train_val(dataset: Dataset, train_idx: Sequence[int], val_idx: Sequence[int], *,
              train_transform: Callable[..., Any] | None = None,
              val_transform: Callable[..., Any] | None = None,
              groups: Any = None) -> tuple[TransformedSubset, TransformedSubset]:
    """Training and validation subsets, checked for group leakage, augmented after the split.

    Parameters
    ----------
    dataset : Dataset
        Un-augmented dataset (``transform=None``) with ``.groups`` (or pass ``groups``).
    train_idx, val_idx : sequences of int
        E.g. one pair from :func:`group_kfold`.
    train_transform, val_transform : callable, optional
        Augmentation for the training side; usually nothing for validation.
    groups : array-like, optional
        Groups of the items when the dataset has no ``.groups``.

    Raises
    ------
    LeakageError
        A group on both sides.
    ValueError
        No groups known, or the dataset already has a transform.
    """
    g = groups if groups is not None else getattr(dataset, "groups", None)
    if g is None:
        raise ValueError("train_val needs the group of every item: a dataset with .groups or groups=")
    assert_disjoint(g, train_idx, val_idx)
    return (with_transform(dataset, train_idx, train_transform),
            with_transform(dataset, val_idx, val_transform))
