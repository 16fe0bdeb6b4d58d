"""``twin train | finetune | evaluate | predict``: the SDK's commands, added to the ``twin`` CLI.

:func:`register` adds the parsers and imports nothing heavy; torch and the SDK modules are
imported inside the command functions. Errors a user can cause are :class:`CLIError`
(an :class:`twin.errors.EmtwinError`): one line, exit status 2.

Channels: synthetic SEM data are grey. A model is trained on ``--channels 1`` (default; real RGB
micrographs are converted to grey by ``sdk.data``) or ``--channels 3`` (grey repeated; real RGB
kept). The checkpoint stores which, with the label, normalisation and crop, and every later
command reads them from there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from twin.errors import EmtwinError

__all__ = ["register", "CLIError"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class CLIError(EmtwinError):
    """A bad command-line request (missing file, bad value, incompatible model)."""


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, training: bool = True) -> None:
    p.add_argument("--label", default=None,
                   help="synthetic label the model learns / learned (default: boundary, or the model's)")
    if training:
        p.add_argument("--max-minutes", type=float, default=60.0,
                       help="wall-clock budget of the whole command in minutes (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, crops, batches, splits")
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="mixed precision (auto: float16 on CUDA, off on the CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _training(p: argparse.ArgumentParser, epochs: int, steps: int, batch: int, patience: int | None) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help=f"maximum epochs (default {epochs})")
    p.add_argument("--steps-per-epoch", type=int, default=steps, help=f"batches per epoch (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch, help=f"(default {batch})")
    p.add_argument("--patience", type=int, default=patience,
                   help="early stopping: epochs without improvement of the validation metric")
    p.add_argument("--augment", choices=("none", "light", "medium", "strong"), default="medium",
                   help="augmentation strength (sdk.augment, physics-checked; default medium)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--log-dir", default=None,
                   help="folder for log.csv, log.json, curves.png (default: OUTPUT stem + '_log')")


def register(subparsers: Any) -> None:
    """Add ``train``, ``finetune``, ``evaluate`` and ``predict`` to the ``twin`` sub-parsers."""
    t = subparsers.add_parser("train", help="train a segmentation model on a synthetic dataset",
                              description="Train a U-Net on an emtwin HDF5 dataset; the validation "
                              "split is grouped by specimen.")
    t.add_argument("dataset", help="emtwin .h5 dataset")
    t.add_argument("-o", "--output", required=True, help="output model file (.pt)")
    _common(t)
    _training(t, epochs=30, steps=50, batch=8, patience=6)
    t.add_argument("--crop", type=int, default=128, help="training crop size in px (default 128)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=1,
                   help="model input channels: 1 grey (default) or 3 (grey repeated; real RGB kept)")
    t.add_argument("--normalize", default="percentile", help="image normalisation (sdk.data; default percentile)")
    t.add_argument("--depth", type=int, default=4, help="U-Net levels (default 4)")
    t.add_argument("--width", type=int, default=16, help="U-Net channels at full resolution (default 16)")
    t.add_argument("--norm", choices=("batch", "group", "instance", "none"), default="batch")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    t.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of specimens held out for validation (default 0.2; 0: none)")
    t.set_defaults(func=_cmd_train)

    f = subparsers.add_parser("finetune", help="fine-tune a model on a few labelled real images",
                              description="Freeze the backbone, train the head, then unfreeze the "
                              "backbone block by block (deepest first) with depth-graded learning "
                              "rates. Training crops come from distinct micrographs; all other "
                              "micrographs stay held out (recorded in the model for `twin evaluate`).")
    f.add_argument("model", help="model file from `twin train`")
    f.add_argument("--real", required=True, help="folder with images/ and masks/ (same file names)")
    f.add_argument("--labels", type=int, required=True, help="number of labelled real images to train on")
    f.add_argument("-o", "--output", required=True, help="output model file (.pt)")
    _common(f)
    _training(f, epochs=12, steps=20, batch=4, patience=None)
    f.add_argument("--val-labels", type=int, default=0,
                   help="extra labelled images (other micrographs) for validation/early stopping "
                        "(default 0: fixed schedule, last epoch kept)")
    f.add_argument("--crop", type=int, default=None, help="crop size (default: the model's training crop)")
    f.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the head (default 1e-3)")
    f.add_argument("--backbone-lr", type=float, default=1e-5,
                   help="learning rate of the first backbone block; deeper ones graded up to --head-lr")
    f.add_argument("--epochs-per-stage", type=int, default=2,
                   help="epochs before the next backbone block unfreezes (default 2)")
    f.add_argument("--bn", choices=("train", "eval", "reestimate"), default="train",
                   help="BatchNorm of frozen blocks: train mode (default), eval (fixed), or "
                        "reestimate running statistics on the training images first (AdaBN)")
    f.add_argument("--group-regex", default=None,
                   help="regex whose group 1 is the micrograph id in a file name (default: the part of "
                        "the name before the first '-', as sdk.data.default_group)")
    f.add_argument("--train-files", nargs="+", default=None,
                   help="use these image file names for training instead of a seeded choice")
    f.add_argument("--tune-threshold", choices=("metric", "grain_size"), default=None,
                   help="after training, tune the decision threshold on the training images for the main "
                        "metric (boundary F1 / IoU) or for the Heyn grain size (boundary labels); stored in "
                        "the model and used by `twin predict` (default: none, 0.5)")
    f.set_defaults(func=_cmd_finetune)

    e = subparsers.add_parser("evaluate", help="metrics of a model on labelled real images",
                              description="Boundary F1 (tolerance in px), IoU, Dice and Heyn grain-size "
                              "error per image and per micrograph; JSON, Markdown and a PNG of predictions.")
    e.add_argument("model")
    e.add_argument("--real", required=True, help="folder with images/ and masks/")
    e.add_argument("-o", "--output", default=None, help="output folder (default: MODEL stem + '_eval')")
    _common(e, training=False)
    e.add_argument("--all", action="store_true",
                   help="also evaluate micrographs the model was fine-tuned on (default: held out only)")
    e.add_argument("--files", nargs="+", default=None, help="evaluate only these image file names")
    e.add_argument("--tolerance", type=int, default=2, help="boundary F1 tolerance in px (default 2)")
    e.add_argument("--group-regex", default=None,
                   help="micrograph id regex (default: the fine-tuning one, else sdk.data.default_group)")
    e.add_argument("--tile", type=int, default=512, help="tile size for large images (default 512)")
    e.add_argument("--overlap", type=int, default=64, help="tile overlap in px (default 64)")
    e.add_argument("--show", type=int, default=8, help="images in predictions.png (default 8)")
    e.add_argument("--saliency", action="store_true",
                   help="Grad-CAM shortcut report: attribution on borders, data bar, corners vs structure")
    e.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser("predict", help="probability maps and masks for images of any size",
                              description="For each input image write OUTDIR/probs/<name>.png (8-bit "
                              "probability of the foreground class) and OUTDIR/masks/<name>.png (0/255), "
                              "at the input's size; large images are tiled with overlap.")
    p.add_argument("model")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=None,
                   help="mask threshold on the probability (default: the model's tuned threshold from "
                        "`twin finetune --tune-threshold`, else 0.5)")
    p.add_argument("--tile", type=int, default=512, help="tile size (default 512)")
    p.add_argument("--overlap", type=int, default=64, help="tile overlap in px (default 64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: mean probability over the 8 flips/quarter turns (8x slower)")
    p.set_defaults(func=_cmd_predict)

    s = subparsers.add_parser("study", help="sim-to-real study: conditions x label counts, grouped CV on real data",
                              description="Run a study file (recipes/studies/*.yaml): grouped cross-validation "
                              "over real micrographs for every condition and label count k; writes results.csv, "
                              "summary.md, metric_vs_k.png and study.json.")
    s.add_argument("study", help="study YAML file")
    s.add_argument("-o", "--output", default=None, help="output folder (default out/study-<name>)")
    s.add_argument("--quick", action="store_true",
                   help="2 folds, one k, a tiny model and seconds per model (a smoke run; numbers not meaningful)")
    s.add_argument("--conditions", default=None, help="comma-separated subset of the study's conditions")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_study)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


class _Clock:
    def __init__(self, minutes: float | None) -> None:
        if minutes is not None and minutes <= 0:
            raise CLIError(f"--max-minutes must be > 0, got {minutes}")
        self.start = time.monotonic()
        self.minutes = minutes

    def left(self) -> float | None:
        if self.minutes is None:
            return None
        left = self.minutes - (time.monotonic() - self.start) / 60
        if left <= 0.02:
            raise CLIError(f"the --max-minutes budget ({self.minutes:g}) ran out before training could start")
        return left


def _positive(name: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise CLIError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _out_file(path: str) -> Path:
    out = Path(path)
    if not out.parent.exists():
        raise CLIError(f"cannot write {out}: folder {out.parent} does not exist")
    return out


def _log_dir(args: argparse.Namespace) -> Path:
    if args.log_dir:
        return Path(args.log_dir)
    out = Path(args.output)
    return out.with_name(out.stem + "_log")


def _group_fn(regex: str | None):
    if regex is None:
        from sdk.data import default_group

        return default_group
    try:
        pat = re.compile(regex)
    except re.error as exc:
        raise CLIError(f"--group-regex {regex!r} is not a valid regex: {exc}") from exc

    def fn(name: Any) -> str:
        stem = Path(str(name)).stem
        m = pat.search(stem)
        return m.group(1) if (m and m.groups()) else stem

    return fn


def _augment(strength: str, crop: int | None):
    if strength == "none":
        return None
    from sdk.augment import Physics, build_pipeline

    # grain boundaries: sizes are the answer (Heyn grain size), so no scaling or elastic warps
    return build_pipeline(Physics(metric=True), strength=strength)


def _load_model(path: str, device: Any):
    from sdk.models import ModelError, load_checkpoint

    try:
        return load_checkpoint(path, device=device)
    except ModelError as exc:
        raise CLIError(str(exc)) from exc


def _check_label(args: argparse.Namespace, meta: dict[str, Any]) -> str:
    trained = meta.get("data", {}).get("label")
    if args.label is not None and trained is not None and args.label != trained:
        raise CLIError(f"--label {args.label!r} does not match the model, which learned {trained!r}")
    return args.label or trained or "boundary"


def _real_dataset(root: str, **kw: Any):
    from sdk import data

    path = Path(root)
    if not (path / "images").is_dir() or not (path / "masks").is_dir():
        raise CLIError(f"--real {root}: expected a folder with images/ and masks/ (same file names)")
    try:
        return data.RealDataset(path, **kw)
    except data.DataError as exc:
        raise CLIError(str(exc)) from exc


def _quiet_print(args: argparse.Namespace, *msg: Any) -> None:
    print(*msg, file=sys.stderr if getattr(args, "quiet", False) else sys.stdout)


# --------------------------------------------------------------------------------------------
# twin train
# --------------------------------------------------------------------------------------------


def _label_info(dataset_path: str, label: str) -> dict[str, Any]:
    from twin.dataset import DatasetError, open_dataset

    try:
        with open_dataset(dataset_path) as ds:
            if label not in ds.label_names:
                raise CLIError(f"{dataset_path} has no label {label!r} (labels: {', '.join(ds.label_names)})")
            attrs = ds.label_attrs(label)
            kind = attrs.get("kind")
            classes = [str(c) for c in attrs.get("classes", [])]
            n_max = 0
            if not classes:
                for i in range(min(len(ds), 8)):
                    n_max = max(n_max, int(ds.label(label, i).max()))
            root = dict(ds.attrs)
    except DatasetError as exc:
        raise CLIError(str(exc)) from exc
    if kind == "instance":
        raise CLIError(f"label {label!r} is an instance label (ids, not classes); train on a boundary or "
                       "semantic label, e.g. --label boundary")
    if not classes:
        classes = [f"class_{k}" for k in range(max(n_max + 1, 2))]
    boundary_class = None
    if kind == "boundary":
        boundary_class = classes.index("boundary") if "boundary" in classes else 1
    return {"label": label, "kind": kind, "classes": classes, "boundary_class": boundary_class,
            "recipe_sha256": str(root.get("recipe_sha256", "")),
            "recipe_name": str(root.get("recipe_name", ""))}


def _cmd_train(args: argparse.Namespace) -> int:
    clock = _Clock(args.max_minutes)
    for name in ("epochs", "steps_per_epoch", "batch_size", "crop", "depth", "width", "lr"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if not 0 <= args.val_fraction < 1:
        raise CLIError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    out = _out_file(args.output)
    label = args.label or "boundary"
    info = _label_info(args.dataset, label)

    import numpy as np
    from torch.utils.data import Subset

    from sdk import data
    from sdk.models import count_parameters, unet_config, build_model
    from sdk.splits import group_kfold
    from sdk.trainer import TrainConfig, Trainer, seeded_build

    common = dict(label=label, crop=args.crop, channels=args.channels, normalize=args.normalize)
    try:
        train_full = data.SyntheticDataset(args.dataset, transform=_augment(args.augment, args.crop),
                                           random_crop=True, **common)
        val_full = data.SyntheticDataset(args.dataset, transform=None, random_crop=False, **common)
    except data.DataError as exc:
        raise CLIError(str(exc)) from exc
    groups = np.asarray(train_full.groups)
    n_groups = len(np.unique(groups))
    split: dict[str, Any] = {"groups": "specimen_id"}
    if args.val_fraction > 0 and n_groups >= 2:
        n_splits = int(min(max(2, round(1 / args.val_fraction)), n_groups))
        folds = list(group_kfold(groups, n_splits))
        tr, va = folds[args.seed % len(folds)]
        tr, va = np.asarray(tr, dtype=int), np.asarray(va, dtype=int)
        train_ds, val_ds = Subset(train_full, tr.tolist()), Subset(val_full, va.tolist())
        split.update(val_specimens=sorted(int(g) for g in np.unique(groups[va])), n_train=len(tr), n_val=len(va))
    else:
        train_ds, val_ds = train_full, None
        split.update(val_specimens=[], n_train=len(train_full), n_val=0)
    cfg = unet_config(in_channels=args.channels, num_classes=len(info["classes"]), depth=args.depth,
                      width=args.width, norm=args.norm)
    model = seeded_build(lambda: build_model(cfg), args.seed)
    meta = {"data": {"label": label, "kind": info["kind"], "classes": info["classes"],
                     "boundary_class": info["boundary_class"], "channels": args.channels,
                     "normalize": args.normalize, "crop": args.crop,
                     "colour": ("grey; RGB inputs become the mean of R, G, B (sdk.data)" if args.channels == 1
                                else "grey repeated to 3 channels; RGB inputs kept"),
                     "source": "synthetic", "dataset": str(Path(args.dataset).resolve()),
                     "recipe_sha256": info["recipe_sha256"], "recipe_name": info["recipe_name"]},
            "split": split, "stage": "train", "seed": args.seed}
    log_dir = _log_dir(args)
    config = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                         lr=args.lr, max_minutes=clock.left(), seed=args.seed, device=args.device,
                         amp=args.amp, patience=args.patience, boundary_class=info["boundary_class"],
                         num_workers=args.workers, out_dir=str(log_dir), checkpoint=str(out),
                         progress=not args.quiet)
    trainer = Trainer(model, train_ds, val_ds, config, checkpoint_meta=meta,
                      on_epoch_end=None if args.quiet else _epoch_printer())
    _quiet_print(args, f"training a U-Net ({count_parameters(model):,} parameters) on {split['n_train']} "
                       f"samples, validating on {split['n_val']} (specimens {split['val_specimens']}), "
                       f"label {label!r}, device {trainer.device.type}")
    hist = trainer.fit()
    best = f"{hist.monitor}={hist.best_value:.4f} at epoch {hist.best_epoch}" if hist.best_value is not None else ""
    _quiet_print(args, f"wrote {out} ({len(hist.rows)} epochs, {hist.seconds:.0f} s, {hist.stopped}; {best}); "
                       f"log in {log_dir}")
    return 0


def _epoch_printer():
    def show(row: dict[str, Any]) -> None:
        keys = [k for k in ("train_loss", "val_loss", "val_boundary_f1", "val_iou", "val_accuracy") if k in row]
        extra = f" stage {row['stage']}" if "stage" in row else ""
        print(f"epoch {row['epoch']}{extra}: " + "  ".join(f"{k}={row[k]:.4f}" for k in keys)
              + f"  ({row['seconds']:.0f} s)", flush=True)
    return show


# --------------------------------------------------------------------------------------------
# twin finetune
# --------------------------------------------------------------------------------------------


def choose_crops(names: list[str], groups: list[str], k: int, v: int, seed: int
                 ) -> tuple[list[str], list[str]]:
    """Pick ``k`` training and ``v`` validation images, spread over distinct micrographs.

    Micrographs are shuffled with ``seed``; training takes one image per micrograph in turn
    (round robin) until it has ``k``; validation then takes images from micrographs not used
    for training. Everything else stays held out.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    uniq = sorted(set(groups))
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    by_group = {g: [n for n, gg in zip(names, groups) if gg == g] for g in uniq}
    for g in by_group:
        by_group[g] = [by_group[g][i] for i in rng.permutation(len(by_group[g]))]
    train: list[str] = []
    used: list[str] = []
    rnd = 0
    while len(train) < k:
        added = False
        for g in (order if rnd == 0 else list(used)):
            if len(train) >= k:
                break
            if rnd < len(by_group[g]):
                train.append(by_group[g][rnd])
                added = True
                if rnd == 0:
                    used.append(g)
        if not added:
            break
        rnd += 1
    rest = [g for g in sorted(set(groups)) if g not in used]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    val = []
    for g in rest:
        if len(val) >= v:
            break
        val.append(by_group[g][0])
    return train, val


def _cmd_finetune(args: argparse.Namespace) -> int:
    clock = _Clock(args.max_minutes)
    for name in ("labels", "epochs", "steps_per_epoch", "batch_size", "head_lr", "backbone_lr",
                 "epochs_per_stage", "crop"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _positive("--val-labels", args.val_labels, allow_zero=True)
    out = _out_file(args.output)

    import torch

    from sdk.trainer import TrainConfig, Trainer, select_device
    from sdk.transfer import GradualUnfreezing, freeze_backbone, param_groups, reestimate_bn

    device = select_device(args.device)
    model, meta = _load_model(args.model, device)
    _check_label(args, meta)
    dmeta = dict(meta.get("data", {}))
    if args.tune_threshold == "grain_size" and dmeta.get("boundary_class") is None:
        raise CLIError("--tune-threshold grain_size needs a boundary model (its label has no boundary class)")
    channels = int(dmeta.get("channels", 1))
    normalize = dmeta.get("normalize", "percentile")
    crop = args.crop or dmeta.get("crop")
    group_fn = _group_fn(args.group_regex)

    everything = _real_dataset(args.real, crop=None, channels=channels, normalize=normalize,
                               group_fn=group_fn)
    names = [str(n) for n in everything.names]
    groups = [str(g) for g in everything.groups]
    if args.train_files:
        wanted = [Path(f).name for f in args.train_files]
        missing = [w for w in wanted if w not in names]
        if missing:
            raise CLIError(f"--train-files not in {args.real}/images: {', '.join(missing)}")
        train_files = wanted[: args.labels]
        if len(wanted) < args.labels:
            raise CLIError(f"--train-files names {len(wanted)} files but --labels is {args.labels}")
        g_train = {groups[names.index(f)] for f in train_files}
        rest = [n for n, g in zip(names, groups) if g not in g_train]
        val_files = rest[: args.val_labels]
    else:
        if args.labels > len(names):
            raise CLIError(f"--labels {args.labels} but {args.real} has only {len(names)} images")
        train_files, val_files = choose_crops(names, groups, args.labels, args.val_labels, args.seed)
    if len(train_files) < args.labels:
        raise CLIError(f"could only choose {len(train_files)} training images for --labels {args.labels}")
    g_train = sorted({groups[names.index(f)] for f in train_files})
    g_val = sorted({groups[names.index(f)] for f in val_files})
    held = sorted(set(groups) - set(g_train) - set(g_val))
    if not held:
        raise CLIError("no micrograph is left for evaluation: lower --labels or --val-labels")

    train_crop = crop
    sizes = {tuple(everything[names.index(f)][1].shape) for f in train_files}
    if train_crop is not None and any(min(s) < train_crop for s in sizes):
        train_crop = None  # images smaller than the crop: use them whole
    train_ds = _real_dataset(args.real, crop=train_crop, channels=channels, normalize=normalize,
                             transform=_augment(args.augment, train_crop), group_fn=group_fn,
                             files=train_files)
    val_ds = (_real_dataset(args.real, crop=None, channels=channels, normalize=normalize,
                            group_fn=group_fn, files=val_files) if val_files else None)

    if args.bn == "reestimate":
        plain = _real_dataset(args.real, crop=None, channels=channels, normalize=normalize,
                              group_fn=group_fn, files=train_files)
        reestimate_bn(model, torch.utils.data.DataLoader(plain, batch_size=1), device=device)
    bn_mode = "eval" if args.bn in ("eval", "reestimate") else "train"
    freeze_backbone(model, bn=bn_mode)
    unfreezer = GradualUnfreezing(model, epochs_per_stage=args.epochs_per_stage, bn=bn_mode)
    groups_opt = param_groups(model, head_lr=args.head_lr, backbone_lr=args.backbone_lr)
    boundary_class = dmeta.get("boundary_class")
    new_meta = {k: v for k, v in meta.items() if k not in ("format", "format_version", "model_config",
                                                             "log", "train")}
    new_meta["data"] = dmeta
    new_meta["stage"] = "finetune"
    new_meta["seed"] = args.seed
    new_meta["pretrain"] = {"model": str(Path(args.model).resolve()), "log": meta.get("log", []),
                            "train": meta.get("train", {})}
    new_meta["split"] = {"real_root": str(Path(args.real).resolve()), "group_regex": args.group_regex,
                         "train_files": train_files, "val_files": val_files, "train_groups": g_train,
                         "val_groups": g_val, "heldout_groups": held}
    new_meta["finetune"] = {"labels": args.labels, "bn": args.bn, "head_lr": args.head_lr,
                            "backbone_lr": args.backbone_lr, "epochs_per_stage": args.epochs_per_stage,
                            "lrs": {g["name"]: g["lr"] for g in groups_opt}, "crop": train_crop}
    log_dir = _log_dir(args)
    config = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                         lr=args.head_lr, max_minutes=clock.left(), seed=args.seed, device=str(device),
                         amp=args.amp, patience=args.patience, boundary_class=boundary_class,
                         num_workers=args.workers, out_dir=str(log_dir), checkpoint=str(out),
                         progress=not args.quiet)
    trainer = Trainer(model, train_ds, val_ds, config, param_groups=groups_opt, unfreezer=unfreezer,
                      checkpoint_meta=new_meta, on_epoch_end=None if args.quiet else _epoch_printer())
    _quiet_print(args, f"fine-tuning on {len(train_files)} images from micrographs {g_train}"
                       f"{f', validating on {len(val_files)}' if val_files else ''}; "
                       f"{len(held)} micrographs held out; {unfreezer.n_stages} stages "
                       f"(head, then {len(unfreezer.backbone)} backbone blocks deepest first)")
    hist = trainer.fit()
    _quiet_print(args, f"wrote {out} ({len(hist.rows)} epochs, {hist.seconds:.0f} s, {hist.stopped}); "
                       f"log in {log_dir}")
    if args.tune_threshold:
        _store_tuned_threshold(args, out, everything, [names.index(f) for f in train_files], device)
    return 0


def _store_tuned_threshold(args: argparse.Namespace, path: Path, images: Any, train_idx: list[int],
                           device: Any) -> None:
    """Tune the decision threshold of the written model on its training images; store it in the file."""
    import torch

    from sdk.models import save_checkpoint
    from sdk.threshold import tune_threshold
    from sdk.trainer import predict_tiled

    model, meta = _load_model(str(path), device)
    bclass = meta.get("data", {}).get("boundary_class")
    task = "boundary" if bclass is not None else "particle"
    fg = int(bclass) if bclass is not None else 1
    probs, masks = [], []
    for i in train_idx:
        x, y = images[i]
        with torch.no_grad():
            p = predict_tiled(model, x.numpy(), tile=max(x.shape[-2:]), overlap=0, device=device, amp="off")
        probs.append(p[fg] if p.shape[0] > 1 else p[0])
        masks.append(y.numpy() == fg)
    th = tune_threshold(probs, masks, objective=args.tune_threshold, task=task)
    keep = {k: v for k, v in meta.items() if k not in ("format", "format_version", "model_config")}
    keep["decision_threshold"] = {"value": th, "objective": args.tune_threshold,
                                  "tuned_on": [str(images.names[i]) for i in train_idx]}
    save_checkpoint(path, model, **keep)
    _quiet_print(args, f"decision threshold {th:g} ({args.tune_threshold}, tuned on the {len(train_idx)} "
                       f"training images) stored in {path}")


# --------------------------------------------------------------------------------------------
# twin evaluate
# --------------------------------------------------------------------------------------------


def _per_image_metrics(pred_b, true_b, tolerance: int) -> dict[str, float]:
    from sdk import metrics

    bf = metrics.boundary_f1(pred_b, true_b, tolerance=tolerance)
    row = {"boundary_f1": float(bf["f1"]), "boundary_precision": float(bf["precision"]),
           "boundary_recall": float(bf["recall"]), "iou": float(metrics.iou(pred_b, true_b)),
           "dice": float(metrics.dice(pred_b, true_b))}
    try:
        row["heyn_pred_px"] = float(metrics.heyn_intercept(pred_b))
        row["heyn_true_px"] = float(metrics.heyn_intercept(true_b))
        row["grain_size_error"] = float(metrics.grain_size_error(pred_b, true_b))
    except (ValueError, ZeroDivisionError):
        row["grain_size_error"] = float("nan")
    return row


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    import numpy as np

    vals = [r[key] for r in rows if key in r and r[key] is not None and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


_MD_COLS = [("boundary_f1", "boundary F1"), ("boundary_precision", "precision"),
            ("boundary_recall", "recall"), ("iou", "IoU"), ("grain_size_error", "grain-size error")]


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"Data: `{report['real']}` — {report['n_images']} images from {len(report['per_group'])} "
             f"micrographs ({report['selection']}); boundary tolerance {report['tolerance']} px; "
             f"label `{report['label']}`.", "",
             "| micrograph | images | " + " | ".join(c for _, c in _MD_COLS) + " |",
             "|---|---|" + "---|" * len(_MD_COLS)]
    for g, row in report["per_group"].items():
        lines.append(f"| {g} | {row['n_images']} | " + " | ".join(f"{row[k]:.3f}" for k, _ in _MD_COLS) + " |")
    o = report["overall"]
    lines.append(f"| **mean of micrographs** | {report['n_images']} | "
                 + " | ".join(f"**{o[k]:.3f}**" for k, _ in _MD_COLS) + " |")
    oi = report["overall_images"]
    lines.append(f"| mean of images | {report['n_images']} | " + " | ".join(f"{oi[k]:.3f}" for k, _ in _MD_COLS) + " |")
    if "saliency" in report:
        s = report["saliency"]["mean"]
        lines += ["", "## Shortcut diagnostics (Grad-CAM)", "",
                  "| region | attribution | area | enrichment |", "|---|---|---|---|"]
        for region in ("structure", "border", "databar", "corners"):
            if region in s:
                r = s[region]
                lines.append(f"| {region} | {r['fraction']:.3f} | {r['area']:.3f} | {r['enrichment']:.2f} |")
        flags = report["saliency"].get("flags", [])
        lines += ["", ("Flags: " + "; ".join(flags)) if flags else "No shortcut flagged."]
    return "\n".join(lines) + "\n"


def _to_uint8(a):
    import numpy as np

    a = np.asarray(a, dtype=np.float32)
    lo, hi = np.percentile(a, (1, 99)) if a.size else (0, 1)
    return (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _predictions_png(items: list[tuple[str, Any, Any, Any, Any]], path: Path, tile: int = 192) -> None:
    """Rows: image | truth | probability | overlay (green hit, red false positive, blue missed)."""
    import numpy as np
    from PIL import Image, ImageDraw

    cols = 4
    canvas = Image.new("RGB", (cols * tile, len(items) * (tile + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, img, true_b, prob, pred_b) in enumerate(items):
        grey = _to_uint8(img.mean(0))
        over = np.stack([grey] * 3, -1).astype(np.float32) * 0.6
        over[pred_b & true_b] = (0, 220, 0)
        over[pred_b & ~true_b] = (230, 0, 0)
        over[~pred_b & true_b] = (40, 90, 255)
        panels = [np.stack([grey] * 3, -1), np.stack([true_b.astype(np.uint8) * 255] * 3, -1),
                  np.stack([(np.clip(prob, 0, 1) * 255).astype(np.uint8)] * 3, -1), over.astype(np.uint8)]
        y = r * (tile + 14)
        draw.text((2, y), name, fill="black")
        for c, pnl in enumerate(panels):
            im = Image.fromarray(pnl).resize((tile, tile), Image.NEAREST)
            canvas.paste(im, (c * tile, y + 14))
    canvas.save(path)


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON), NumPy scalars -> Python numbers."""
    import math

    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from sdk.trainer import predict_tiled, select_device

    if args.tolerance < 0:
        raise CLIError(f"--tolerance must be >= 0, got {args.tolerance}")
    device = select_device(args.device)
    model, meta = _load_model(args.model, device)
    label = _check_label(args, meta)
    dmeta = meta.get("data", {})
    channels = int(dmeta.get("channels", 1))
    bclass = dmeta.get("boundary_class")
    fg = int(bclass) if bclass is not None else 1
    split = meta.get("split", {})
    regex = args.group_regex or split.get("group_regex")
    group_fn = _group_fn(regex)
    ds = _real_dataset(args.real, crop=None, channels=channels, normalize=dmeta.get("normalize", "percentile"),
                       group_fn=group_fn, files=args.files)
    names = [str(n) for n in ds.names]
    groups = [str(g) for g in ds.groups]
    used = set()
    same_root = split.get("real_root") and Path(split["real_root"]) == Path(args.real).resolve()
    if same_root and not args.all:
        used = set(split.get("train_groups", [])) | set(split.get("val_groups", []))
    idx = [i for i, g in enumerate(groups) if g not in used]
    if not idx:
        raise CLIError("no held-out image left to evaluate (use --all to include training micrographs)")
    selection = (f"held out: excluded micrographs {sorted(used)} used in fine-tuning" if used
                 else "all images")
    out_dir = Path(args.output) if args.output else Path(args.model).with_name(Path(args.model).stem + "_eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, shown = [], []
    sal_items = []
    t0 = time.monotonic()
    for i in idx:
        x, y = ds[i]
        x = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
        y = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
        probs = predict_tiled(model, x, tile=args.tile, overlap=args.overlap, device=device, amp=args.amp)
        pred = probs.argmax(0)
        pred_b, true_b = pred == fg, y == fg
        row = {"image": names[i], "group": groups[i], **_per_image_metrics(pred_b, true_b, args.tolerance)}
        rows.append(row)
        if len(shown) < args.show:
            shown.append((names[i], x, true_b, probs[fg], pred_b))
        if args.saliency:
            sal_items.append((x, true_b))
    per_group: dict[str, Any] = {}
    for g in sorted(set(r["group"] for r in rows), key=lambda s: (len(s), s)):
        gr = [r for r in rows if r["group"] == g]
        per_group[g] = {"n_images": len(gr), **{k: _mean(gr, k) for k, _ in _MD_COLS + [("dice", "")]}}
    keys = [k for k, _ in _MD_COLS] + ["dice"]
    overall = {k: _mean(list(per_group.values()), k) for k in keys}
    report: dict[str, Any] = {
        "model": str(args.model), "real": str(args.real), "label": label, "tolerance": args.tolerance,
        "selection": selection, "n_images": len(rows), "channels": channels,
        "overall": overall, "overall_images": {k: _mean(rows, k) for k in keys},
        "per_group": per_group, "per_image": rows, "seconds": round(time.monotonic() - t0, 2),
    }
    if args.saliency:
        from sdk.diagnose import diagnose_segmentation, saliency_png

        sal = diagnose_segmentation(model, [s[0] for s in sal_items], structures=[s[1] for s in sal_items],
                                    target_class=fg, device=device)
        report["saliency"] = {k: v for k, v in sal.items() if k != "maps"}
        saliency_png([s[0] for s in sal_items[:args.show]], sal["maps"][:args.show], out_dir / "saliency.png")
    (out_dir / "metrics.json").write_text(json.dumps(_json_safe(report), indent=1))
    (out_dir / "metrics.md").write_text(_markdown(report))
    _predictions_png(shown, out_dir / "predictions.png")
    o = report["overall"]
    print(f"{len(rows)} images, {len(per_group)} micrographs ({selection}): boundary F1 {o['boundary_f1']:.3f} "
          f"(P {o['boundary_precision']:.3f}, R {o['boundary_recall']:.3f}), IoU {o['iou']:.3f}, "
          f"grain-size error {o['grain_size_error']:.3f} (means over micrographs)")
    print(f"wrote {out_dir}/metrics.json, metrics.md, predictions.png"
          + (", saliency.png" if args.saliency else ""))
    return 0


# --------------------------------------------------------------------------------------------
# twin predict
# --------------------------------------------------------------------------------------------


def _collect_inputs(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                raise CLIError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise CLIError(f"input {p} does not exist")
    stems = [f.stem for f in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise CLIError(f"several inputs are named {', '.join(dup)}: outputs would overwrite each other")
    return files


def load_image(path: Path, channels: int, normalize: str = "percentile"):
    """Read an image file as ``(channels, H, W)`` float32, prepared exactly as ``sdk.data`` does.

    The same steps as :class:`sdk.data.RealDataset` without a mask: read (PNG, TIFF, vendor
    formats), colour handling (RGB -> mean of R, G, B for 1 channel; grey repeated for 3), and the
    per-image normalisation the model was trained with.
    """
    from sdk import data

    try:
        image = data.prepare_image(data.read_image_file(path), channels, normalize)
    except (data.DataError, ValueError) as exc:
        raise CLIError(f"{path}: {exc}") from exc
    return image.numpy()


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from sdk.trainer import predict_tiled, select_device

    if args.threshold is not None and not 0 < args.threshold < 1:
        raise CLIError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.tile < 16 or not 0 <= args.overlap < args.tile // 2:
        raise CLIError(f"--tile must be >= 16 and 0 <= --overlap < tile/2 (got {args.tile}, {args.overlap})")
    files = _collect_inputs(args.inputs)
    device = select_device(args.device)
    model, meta = _load_model(args.model, device)
    dmeta = meta.get("data", {})
    channels = int(dmeta.get("channels", 1))
    bclass = dmeta.get("boundary_class")
    fg = int(bclass) if bclass is not None else 1
    threshold = args.threshold
    if threshold is None:
        threshold = float(meta.get("decision_threshold", {}).get("value", 0.5))
    out = Path(args.output)
    (out / "probs").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for f in files:
        img = load_image(f, channels, dmeta.get("normalize", "percentile"))
        probs = predict_tiled(model, img, tile=args.tile, overlap=args.overlap, device=device, amp=args.amp,
                              tta=args.tta)
        p = probs[fg] if probs.shape[0] > 1 else probs[0]
        Image.fromarray((np.clip(p, 0, 1) * 255 + 0.5).astype(np.uint8)).save(out / "probs" / f"{f.stem}.png")
        Image.fromarray(((p >= threshold) * 255).astype(np.uint8)).save(out / "masks" / f"{f.stem}.png")
    print(f"wrote {len(files)} probability maps to {out / 'probs'} and masks (probability >= {threshold:g}) "
          f"to {out / 'masks'}")
    return 0


# --------------------------------------------------------------------------------------------
# twin study
# --------------------------------------------------------------------------------------------


def _cmd_study(args: argparse.Namespace) -> int:
    from sdk.study import StudyError, load_study, quick, run_study

    spec, base = load_study(args.study)
    if args.conditions:
        wanted = [c.strip() for c in args.conditions.split(",") if c.strip()]
        bad = [c for c in wanted if c not in spec.conditions]
        if bad:
            raise StudyError(f"--conditions {bad} are not in the study's conditions {spec.conditions}")
        spec = spec.model_copy(update={"conditions": wanted})
    if args.quick:
        spec = quick(spec)
    out = Path(args.output or f"out/study-{spec.name}")
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    res = run_study(spec, base, out, log=log)
    print((out / "summary.md").read_text())
    print(f"wrote {out}/results.csv, summary.md, metric_vs_k.png, study.json ({res['minutes']:.1f} min)")
    if res["skipped"]:
        print(f"budget: {len(res['skipped'])} runs skipped (see study.json)")
    return 0
