"""``twin ablate``: one dataset per feature variant, to measure what each omission costs.

Variants: ``all_on`` (every ablated feature on), ``all_off`` (every ablated feature off) and
``no_<feature>`` (that feature alone off).  All use the same root seed and sample count; the
pipeline draws each feature from its own child generator (see :mod:`twin.pipeline`), so two
variants differ only in the switched feature.  Each variant's recipe is written next to its
dataset, and ``manifest.json`` names every variant, its files and the recipe keys that differ
from ``all_on``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import yaml

from twin.errors import RecipeError
from twin.recipe import load_recipe, recipe_sha256

__all__ = ["FEATURE_KEYS", "enabled_features", "plan_variants", "ablate"]

#: feature name → path of its switch section in the recipe (``<path>.enabled``)
FEATURE_KEYS: dict[str, tuple[str, ...]] = {
    "sizes": ("specimen", "features", "sizes"),
    "twins": ("specimen", "features", "twins"),
    "roughness": ("specimen", "features", "roughness"),
    "elongation": ("specimen", "features", "elongation"),
    "subgrains": ("specimen", "features", "subgrains"),
    "gradients": ("specimen", "features", "gradients"),
    "phases": ("specimen", "features", "phases"),
    "particles": ("specimen", "features", "particles"),
    "scratches": ("artefacts", "scratches"),
    "pits": ("artefacts", "pits"),
    "dust": ("artefacts", "dust"),
    "contamination": ("artefacts", "contamination"),
    "charging": ("artefacts", "charging"),
    "data_bar": ("artefacts", "data_bar"),
}


def _get(data: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def _set_enabled(data: dict, path: tuple[str, ...], on: bool) -> None:
    node = data
    for k in path:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node["enabled"] = bool(on)


def enabled_features(data: dict) -> list[str]:
    """Features a recipe mapping switches on, in :data:`FEATURE_KEYS` order."""
    return [name for name, path in FEATURE_KEYS.items()
            if (_get(data, path) or {}).get("enabled") is True]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _differences(base: dict, other: dict) -> list[str]:
    a, b = _flatten(base), _flatten(other)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def plan_variants(data: dict, features: list[str] | None = None) -> list[dict]:
    """Variant recipe mappings: ``[{name, off, data, differs}]``, ``all_on`` first.

    Parameters
    ----------
    data : recipe mapping (parsed YAML)
    features : feature names to ablate (default: every feature the recipe switches on)

    Raises
    ------
    RecipeError
        An unknown feature name, or no feature to ablate.
    """
    if features is None:
        features = enabled_features(data)
        if not features:
            raise RecipeError("the recipe switches no feature on: name the features to ablate "
                              f"with --features (known: {', '.join(FEATURE_KEYS)})")
    unknown = [f for f in features if f not in FEATURE_KEYS]
    if unknown:
        raise RecipeError(f"unknown feature(s) {', '.join(map(repr, unknown))} for --features; "
                          f"known: {', '.join(FEATURE_KEYS)}")
    if not features:
        raise RecipeError("--features names no feature")
    features = list(dict.fromkeys(features))
    on = copy.deepcopy(data)
    for f in features:
        _set_enabled(on, FEATURE_KEYS[f], True)
    variants = [{"name": "all_on", "off": [], "data": on}]
    off_all = copy.deepcopy(on)
    for f in features:
        _set_enabled(off_all, FEATURE_KEYS[f], False)
    variants.append({"name": "all_off", "off": list(features), "data": off_all})
    if len(features) > 1:  # with one feature, "no_<f>" is "all_off"
        for f in features:
            d = copy.deepcopy(on)
            _set_enabled(d, FEATURE_KEYS[f], False)
            variants.append({"name": f"no_{f}", "off": [f], "data": d})
    for v in variants:
        v["differs"] = _differences(on, v["data"])
    return variants


def _absolute_instrument(data: dict, recipe_dir: Path) -> None:
    inst = data.get("instrument")
    if isinstance(inst, str) and (inst.endswith((".yaml", ".yml")) or "/" in inst):
        p = Path(inst)
        if not p.is_absolute():
            data["instrument"] = str((recipe_dir / p).resolve())


def ablate(recipe_path: str | os.PathLike, out_dir: str | os.PathLike, *,
           features: list[str] | None = None, n: int | None = None, seed: int | None = None,
           compression: str | None = None, workers: int | None = None,
           overwrite: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Write one dataset per variant into ``out_dir`` and a ``manifest.json``; returns its path.

    Parameters
    ----------
    recipe_path : path of the YAML recipe
    out_dir : output folder (created)
    features : features to ablate (default: every one the recipe switches on)
    n : samples per variant (default: the recipe's ``samples``)
    seed : root seed for every variant (default: the recipe's ``seed``)
    compression, workers, overwrite : passed to :func:`twin.generate.generate_dataset`
    log : receives one line per variant written
    """
    from twin.generate import generate_dataset

    recipe, text = load_recipe(recipe_path)
    data = yaml.safe_load(text)
    root_seed = int(recipe.seed if seed is None else seed)
    n_samples = int(recipe.samples if n is None else n)
    variants = plan_variants(data, features)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for v in variants:
        d = v["data"]
        _absolute_instrument(d, Path(recipe_path).resolve().parent)
        if n is not None:  # keep the specimen grouping valid for fewer samples
            d["samples"] = n_samples
            d["specimens"] = min(int(d.get("specimens", recipe.specimens)), n_samples)
        vtext = (f"# twin ablate variant {v['name']} of {Path(recipe_path).name}\n"
                 + yaml.safe_dump(d, sort_keys=False, allow_unicode=True))
        rpath = out / f"{v['name']}.yaml"
        rpath.write_text(vtext, encoding="utf-8")
        dpath = out / f"{v['name']}.h5"
        generate_dataset(rpath, dpath, n=n_samples, seed=root_seed, compression=compression,
                         progress=False, workers=workers, overwrite=overwrite)
        if log is not None:
            log(f"wrote {dpath}")
        entries.append({"name": v["name"], "recipe": rpath.name, "dataset": dpath.name,
                        "features_off": v["off"], "differs_from_all_on": v["differs"]})
    manifest = {
        "source_recipe": str(Path(recipe_path).resolve()),
        "source_recipe_sha256": recipe_sha256(text),
        "seed": root_seed,
        "samples_per_variant": n_samples,
        "features": variants[1]["off"],  # all_off switches off every ablated feature
        "variants": entries,
    }
    mpath = out / "manifest.json"
    tmp = mpath.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(mpath)
    return mpath
