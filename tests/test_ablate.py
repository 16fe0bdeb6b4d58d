"""`twin ablate`: variants that differ only in the switched feature, with a manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from twin.ablate import plan_variants
from twin.cli import main
from twin.dataset import open_dataset
from twin.errors import RecipeError

RECIPE = """name: ab
size: [48, 64]
samples: 4
specimens: 2
seed: 3
specimen:
  grains_per_field: [10, 20]
  features:
    twins: {enabled: true, probability: 1.0}
    gradients: {enabled: true}
artefacts:
  data_bar: {enabled: true}
labels: {names: [grain_id, boundary, twin]}
"""


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    return p


def test_ablate_writes_variants_that_differ_only_in_the_feature(recipe, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", str(recipe), "-o", str(out), "-n", "2", "--seed", "11", "-q",
                 "-j", "1"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    names = [v["name"] for v in man["variants"]]
    assert names == ["all_on", "all_off", "no_twins", "no_gradients", "no_data_bar"]
    assert man["features"] == ["twins", "gradients", "data_bar"] and man["seed"] == 11
    by = {v["name"]: v for v in man["variants"]}
    assert by["no_twins"]["differs_from_all_on"] == [
        "specimen.features.twins.enabled: True -> False"]
    assert len(by["all_off"]["differs_from_all_on"]) == 3

    def load(name):
        with open_dataset(out / f"{name}.h5") as ds:
            assert len(ds) == 2 and ds.attrs["root_seed"] == 11
            return [ds[i] for i in range(2)]

    on, no_tw, no_pits, off = load("all_on"), load("no_twins"), load("no_data_bar"), load("all_off")
    for a, b, c, d in zip(on, no_tw, no_pits, off):
        # grains are the same in every variant: only the switched feature differs
        for s in (b, c, d):
            assert np.array_equal(a["labels"]["grain_id"], s["labels"]["grain_id"])
            assert np.array_equal(a["labels"]["boundary"], s["labels"]["boundary"])
        assert a["labels"]["twin"].any() and not b["labels"]["twin"].any()
        # the data bar changes the image only: no_data_bar has the twin labels of all_on
        assert np.array_equal(a["labels"]["twin"], c["labels"]["twin"])
        assert not np.array_equal(a["image"], c["image"])
        assert not np.array_equal(a["image"], b["image"])


def test_unknown_feature_is_a_clear_error(recipe, tmp_path, capsys):
    assert main(["ablate", str(recipe), "-o", str(tmp_path / "x"), "--features",
                 "twins,wobble"]) == 2
    err = capsys.readouterr().err
    assert "unknown feature(s) 'wobble'" in err and "known:" in err


def test_default_features_are_the_ones_switched_on_and_none_is_an_error():
    import yaml

    data = yaml.safe_load(RECIPE)
    assert [v["name"] for v in plan_variants(data, ["twins"])] == ["all_on", "all_off"]
    data["specimen"]["features"] = {}
    data.pop("artefacts")
    with pytest.raises(RecipeError, match="switches no feature on"):
        plan_variants(data)
    # a feature the recipe leaves off is switched on in all_on
    v = plan_variants(data, ["roughness"])
    assert v[0]["data"]["specimen"]["features"]["roughness"]["enabled"] is True
