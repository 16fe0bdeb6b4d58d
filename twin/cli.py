"""The ``twin`` command line: generate, preview, info, ablate, validate.

Errors a user can cause are printed as one line ``twin: error: ...`` with exit status 2; no
traceback.  Set ``EMTWIN_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from twin.errors import EmtwinError

__all__ = ["main", "EXTENSION_COMMANDS"]

# Modules that add subcommands: each defines ``register(subparsers)``, which adds its parsers and
# sets ``func`` (a callable taking the parsed args and returning an exit code).  ``register`` must
# not import heavy dependencies (torch, abTEM): import them inside ``func``.
EXTENSION_COMMANDS: tuple[str, ...] = ("sdk.cli", "twin.calibrate_cmd")


def _cmd_generate(args: argparse.Namespace) -> int:
    from twin.generate import generate_dataset
    from twin.shards import shard_dir_for

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"twin: {msg}", file=sys.stderr)

    try:
        out = generate_dataset(args.recipe, args.output, n=args.n, seed=args.seed,
                               compression=args.compression,
                               progress=False if args.quiet else None,
                               workers=args.workers, overwrite=args.overwrite,
                               scheduler=args.scheduler, shard_size=args.shard_size,
                               keep_shards=args.keep_shards, return_shards=args.return_shards,
                               log=log)
    except KeyboardInterrupt:
        shards = shard_dir_for(args.output)
        kept = (f"finished shards are kept in {shards}; rerun the same command to resume"
                if shards.is_dir() else "nothing was written")
        print(f"twin: interrupted ({kept})", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from twin.preview import preview_montage

    out = preview_montage(args.dataset, args.output, n=args.n, tile=args.tile)
    print(f"wrote {out}")
    return 0


def _summary(ds, n_stats: int) -> dict:
    k = min(n_stats, len(ds))
    imgs = np.stack([ds.image(i) for i in range(k)]).astype(np.float64)
    out = {
        "file": str(ds.path),
        "samples": len(ds),
        "specimens": int(np.unique(ds.specimen_ids()).size),
        "image": {"shape": list(ds.image_shape), "dtype": str(ds.image_dtype),
                  f"mean_first_{k}": float(imgs.mean()), f"std_first_{k}": float(imgs.std()),
                  "min": float(imgs.min()), "max": float(imgs.max())},
        "labels": {},
    }
    for name in ds.label_names:
        la = ds.label_attrs(name)
        arrs = [ds.label(name, i) for i in range(k)]
        entry = {"kind": la.get("kind"), "classes": list(la.get("classes", [])),
                 "description": la.get("description", "")}
        if la.get("kind") == "instance":
            entry[f"instances_per_image_first_{k}"] = float(np.mean([np.unique(a).size for a in arrs]))
        else:
            entry[f"fraction_nonzero_first_{k}"] = float(np.mean([np.mean(a > 0) for a in arrs]))
        out["labels"][name] = entry
    return out


def _cmd_info(args: argparse.Namespace) -> int:
    from twin.dataset import open_dataset

    with open_dataset(args.dataset) as ds:
        summary = _summary(ds, args.stats)
        attrs = dict(ds.attrs)
    if args.json:
        summary["attrs"] = {k: (v if isinstance(v, (str, int, float, bool)) else str(v))
                            for k, v in attrs.items()}
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"{summary['file']}: emtwin dataset, format_version {attrs.get('format_version')}")
    for key in ("recipe_name", "generator", "created", "emtwin_version", "root_seed",
                "recipe_sha256", "instrument_name"):
        if key in attrs:
            print(f"  {key:16s} {attrs[key]}")
    if "pixel_size" in attrs:
        print(f"  {'pixel_size':16s} {attrs['pixel_size']} {attrs.get('pixel_size_unit', '')}")
    print(f"  {'samples':16s} {summary['samples']} from {summary['specimens']} specimens")
    im = summary["image"]
    stats = {k: v for k, v in im.items() if k not in ("shape", "dtype")}
    print(f"  images           {tuple(im['shape'])} {im['dtype']}  "
          + "  ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    for name, e in summary["labels"].items():
        extra = "  ".join(f"{k}={v:.4g}" for k, v in e.items() if isinstance(v, float))
        classes = f" classes={e['classes']}" if e["classes"] else ""
        print(f"  label {name:10s} kind={e['kind']}{classes}  {extra}")
    if args.recipe:
        print("--- recipe ---")
        print(attrs.get("recipe", ""))
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from twin.ablate import ablate

    feats = None
    if args.features is not None:
        feats = [f.strip() for f in args.features.split(",") if f.strip()]
    manifest = ablate(args.recipe, args.output, features=feats, n=args.n, seed=args.seed,
                      compression=args.compression, workers=args.workers,
                      overwrite=args.overwrite,
                      log=None if args.quiet else (lambda m: print(f"twin: {m}", file=sys.stderr)))
    print(f"wrote {manifest}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from twin.generate import build_pipeline
    from twin.recipe import load_recipe

    recipe, _ = load_recipe(args.recipe)
    pipe, _ = build_pipeline(recipe, Path(args.recipe).parent)
    shape = "x".join(str(x) for x in pipe.image_shape)
    print(f"{args.recipe}: valid recipe '{recipe.name}': {recipe.samples} samples of {shape} px "
          f"from {recipe.specimens} specimens, instrument {pipe.instrument.name}, "
          f"labels {', '.join(pipe.label_specs)}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from twin import __version__

    p = argparse.ArgumentParser(prog="twin", description="emtwin: synthetic EM datasets with exact labels")
    p.add_argument("--version", action="version", version=f"emtwin {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a dataset from a recipe")
    g.add_argument("recipe", help="YAML recipe")
    g.add_argument("-o", "--output", required=True, help="output .h5 file")
    g.add_argument("-n", type=int, default=None, help="number of samples (default: the recipe's)")
    g.add_argument("--seed", type=int, default=None, help="root seed (default: the recipe's)")
    g.add_argument("--compression", choices=("lz4", "gzip", "none"), default=None,
                   help="HDF5 compression (default: the recipe's; gzip opens in any HDF5 tool)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    g.add_argument("-j", "--workers", type=_positive_int, default=None, metavar="N",
                   help="worker processes (default: the number of cores, or this process "
                        "alone for runs of a few seconds; 1 = this process)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over: discard an unfinished run and replace an existing output "
                        "(default: resume an unfinished run, keep finished shards)")
    g.add_argument("--shard-size", type=_positive_int, default=None, metavar="K",
                   help="samples per shard (default: clip(n/256, 16, 256), or the unfinished run's)")
    g.add_argument("--keep-shards", action="store_true",
                   help="keep OUTPUT.shards/ after the final file is written")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run the shards on a Dask cluster (tcp://host:8786); its workers write "
                        "OUTPUT.shards/, so it must be on a filesystem they share")
    g.add_argument("--return-shards", action="store_true",
                   help="with --scheduler: workers send shards back instead of writing them")
    g.set_defaults(func=_cmd_generate)

    v = sub.add_parser("preview", help="write a PNG montage of images with label overlays")
    v.add_argument("dataset")
    v.add_argument("-o", "--output", required=True, help="output .png")
    v.add_argument("-n", type=int, default=4, help="samples to show (default 4)")
    v.add_argument("--tile", type=int, default=256, help="tile size in px (default 256)")
    v.set_defaults(func=_cmd_preview)

    i = sub.add_parser("info", help="provenance, shapes, label classes and statistics of a dataset")
    i.add_argument("dataset")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--recipe", action="store_true", help="also print the recipe text")
    i.add_argument("--stats", type=int, default=16, help="samples used for statistics (default 16)")
    i.set_defaults(func=_cmd_info)

    a = sub.add_parser("ablate", help="one dataset per feature variant (all on, all off, "
                                      "each feature off alone) and a manifest")
    a.add_argument("recipe", help="YAML recipe")
    a.add_argument("-o", "--output", required=True, help="output folder")
    a.add_argument("--features", default=None, metavar="F1,F2,...",
                   help="features to ablate (default: every one the recipe switches on)")
    a.add_argument("-n", type=int, default=None, help="samples per variant (default: the recipe's)")
    a.add_argument("--seed", type=int, default=None, help="root seed for all variants")
    a.add_argument("--compression", choices=("lz4", "gzip", "none"), default=None)
    a.add_argument("-j", "--workers", type=_positive_int, default=None, metavar="N")
    a.add_argument("--overwrite", action="store_true", help="replace existing variant datasets")
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(func=_cmd_ablate)

    c = sub.add_parser("validate", help="check a recipe (and its instrument profile)")
    c.add_argument("recipe")
    c.set_defaults(func=_cmd_validate)

    for module in EXTENSION_COMMANDS:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``twin`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "n", 1) is not None and getattr(args, "n", 1) < 1:
        parser.error(f"-n must be >= 1, got {args.n}")
    try:
        return int(args.func(args) or 0)
    except EmtwinError as exc:
        if os.environ.get("EMTWIN_DEBUG"):
            raise
        print(f"twin: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `twin info --json x.h5 | head`: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 141
    except OSError as exc:
        if os.environ.get("EMTWIN_DEBUG"):
            raise
        name = f" '{exc.filename}'" if exc.filename else ""
        print(f"twin: error: {exc.strerror or exc}{name}", file=sys.stderr)
        return 2
    except MemoryError as exc:  # e.g. a raster or polygon set sized by extreme recipe values
        if os.environ.get("EMTWIN_DEBUG"):
            raise
        print(f"twin: error: out of memory ({exc or 'allocation failed'}): lower the image size, "
              "specimen_scale, resolution or feature counts of the recipe", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("twin: interrupted (no partial output was kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
