"""Recipe schema: shipped recipes validate; bad input names the key, the value and what is allowed."""

from pathlib import Path

import pytest

from twin.errors import RecipeError
from twin.instrument import load_instrument, shipped_instruments
from twin.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]
BASE = "name: t\nsize: [64, 64]\n"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(path):
    r, text = load_recipe(path)
    load_instrument(r.instrument, base_dir=path.parent)
    assert text.strip()


def test_shipped_instruments_validate():
    assert "generic-sem" in shipped_instruments()
    for name in shipped_instruments():
        inst, _ = load_instrument(name)
        assert inst.name == name


@pytest.mark.parametrize("extra,needles", [
    ("foo: 1\n", ["unknown key 'foo'"]),
    ("specimen: {grains: 3}\n", ["unknown key 'specimen.grains'"]),
    ("detector: {dose: -5}\n", ["detector.dose", "-5", "> 0"]),
    ("contrast: {boundary: {depth: [0.2, 1.5]}}\n", ["contrast.boundary.depth", "1.5", "<= 1"]),
    ("contrast: {boundary: {width_px: [3, 1]}}\n", ["width_px", "low <= high"]),
    ("specimen: {seeds: grid}\n", ["specimen.seeds", "'grid'", "poisson", "hardcore"]),
    ("samples: 0\n", ["samples", "0", "greater than or equal to 1"]),
    ("samples: 4\nspecimens: 8\n", ["specimens (8) must be <= samples (4)"]),
])
def test_bad_values_are_named(extra, needles):
    with pytest.raises(RecipeError) as e:
        parse_recipe(BASE + extra, "r.yaml")
    msg = str(e.value)
    assert msg.startswith("r.yaml: invalid recipe")
    for n in needles:
        assert n in msg, msg


def test_malformed_yaml_and_non_mapping():
    with pytest.raises(RecipeError, match="malformed YAML at line"):
        parse_recipe("name: [a\n", "r.yaml")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        parse_recipe("- a\n- b\n", "r.yaml")


def test_fast_yaml_loader_parses_like_safe_load():
    """Recipes and profiles are parsed by libyaml where PyYAML has it: the same objects as
    ``yaml.safe_load`` for every shipped file and for YAML's tricky scalars, and malformed
    text gives safe_load's own error (message, line, column)."""
    import yaml

    from twin.recipe import safe_load_yaml

    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "recipes").glob("*.yaml"))]
    texts += [p.read_text(encoding="utf-8")
              for p in sorted((ROOT / "twin" / "instruments").glob("*.yaml"))]
    texts.append("a: yes\nb: 1e3\nc: 1.0e3\nd: 0x1f\ne: ~\nf: 2024-01-02\ng: '012'\nh: .inf\n"
                 "i: [1, 2.5, -3]\nj: {k: on, l: null}\nm: 'ümlaut'\nn: 0o17\no: 1_000\n")
    for text in texts:
        assert safe_load_yaml(text) == yaml.safe_load(text)
    for bad in ("name: [a\n", "a: b: c\n", "a:\n\t- x\n"):
        with pytest.raises(yaml.YAMLError) as fast:
            safe_load_yaml(bad)
        with pytest.raises(yaml.YAMLError) as slow:
            yaml.safe_load(bad)
        assert str(fast.value) == str(slow.value)


def test_unknown_instrument_lists_shipped():
    with pytest.raises(RecipeError, match="unknown instrument 'nope'.*generic-sem"):
        load_instrument("nope")


def test_samples_per_specimen():
    assert parse_recipe(BASE + "samples: 10\nspecimens: 4\n").samples_per_specimen == 3
