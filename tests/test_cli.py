"""The ``twin`` command line: clear one-line errors, no half-written files, and the happy path.

Every user error must give exactly one line ``twin: error: ...`` on stderr, a non-zero exit
status, no traceback, and leave neither the output file nor a hidden temporary file (or a shard
directory) behind.  The CLI is run in-process (``twin.cli.main``) for speed and as a real
subprocess (``python -m twin.cli``) for the parts where the process boundary matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from twin.cli import main
from twin.dataset import open_dataset
from twin.generate import regenerate_sample
from twin.recipe import recipe_sha256

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RECIPE = ROOT / "recipes" / "sem_voronoi_grains.yaml"
INSTRUMENT_FILE = ROOT / "twin" / "instruments" / "generic-sem.yaml"

TINY = """\
# a tiny recipe for the CLI tests
name: tiny-cli
size: [64, 64]
samples: 6
specimens: 2
seed: 7
specimen:
  grains_per_field: [10, 20]
output:
  compression: lz4
"""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    # EMTWIN_DEBUG=1 re-raises errors (tracebacks on purpose): the tests check the user mode
    monkeypatch.delenv("EMTWIN_DEBUG", raising=False)


def write_recipe(directory: Path, text: str = TINY, name: str = "recipe.yaml") -> Path:
    p = directory / name
    p.write_text(text, encoding="utf-8")
    return p


def tiny_with(extra: str) -> str:
    """The tiny recipe with extra top-level YAML appended (later keys of a mapping win in YAML,
    but we only append keys the tiny recipe does not already set)."""
    return TINY + extra


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_subprocess(*argv: str, cwd: Path | None = None, env: dict | None = None,
                   ) -> tuple[int, str, str]:
    e = dict(os.environ)
    e.pop("EMTWIN_DEBUG", None)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "twin.cli", *map(str, argv)], capture_output=True,
                       text=True, cwd=cwd, env=e, timeout=120)
    return p.returncode, p.stdout, p.stderr


def assert_one_error_line(rc: int, out: str, err: str, *needles: str) -> str:
    """Non-zero exit, exactly one non-empty stderr line starting 'twin: error:', no traceback."""
    assert rc != 0, f"expected failure, got rc={rc}; stdout={out!r} stderr={err!r}"
    assert "Traceback" not in out and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    line = lines[0]
    assert line.startswith("twin: error:"), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


def assert_nothing_written(directory: Path, name: str) -> None:
    """No ``name``, no hidden temporary ``.name.tmp*``, no ``name.shards`` in ``directory``."""
    if not directory.is_dir():
        return
    assert not (directory / name).exists(), f"{name} was written"
    left = [p.name for p in directory.iterdir()
            if p.name.startswith(f".{name}.tmp") or p.name == f"{name}.shards"]
    assert not left, f"leftovers in {directory}: {left}"


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with open_dataset(path) as ds:
        out = {"images": np.stack([ds.image(i) for i in range(len(ds))])}
        for name in ds.label_names:
            out[f"labels/{name}"] = np.stack([ds.label(name, i) for i in range(len(ds))])
        out["specimen_id"] = np.asarray(ds.specimen_ids())
        out["index"] = np.asarray(ds.indices())
    return out


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, dataset) generated once for the read-only tests of this module."""
    d = tmp_path_factory.mktemp("tiny")
    recipe = write_recipe(d)
    out = d / "tiny.h5"
    assert main(["generate", str(recipe), "-o", str(out), "-q", "-j", "1"]) == 0
    assert out.is_file()
    return recipe, out


@pytest.fixture
def bad_files(tmp_path, tiny_dataset) -> dict[str, Path]:
    """A truncated HDF5 (half the bytes of a valid dataset), a text file and a missing file."""
    _, good = tiny_dataset
    data = good.read_bytes()
    trunc = tmp_path / "truncated.h5"
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp_path / "notes.h5"
    text.write_text("this is not an HDF5 file\n")
    return {"truncated": trunc, "text": text, "missing": tmp_path / "missing.h5"}


# --------------------------------------------------------------------------------------------
# bad recipes
# --------------------------------------------------------------------------------------------
BAD_RECIPES = {
    # id: (recipe text, substrings the error line must contain)
    "malformed-yaml": ("name: tiny\nsize: [64, 64\nsamples: 6\n", ("malformed YAML",)),
    "unknown-key": (tiny_with("colour: blue\n"), ("unknown key", "colour")),
    "unknown-nested-key": (tiny_with("scan: {drift_pixels: 2.0}\n"), ("scan.drift_pixels",)),
    "negative-dose": (tiny_with("detector: {dose: -5}\n"), ("detector.dose", "-5")),
    "depth-out-of-range": (tiny_with("contrast: {boundary: {depth: [0.2, 1.5]}}\n"),
                           ("contrast.boundary.depth", "1.5")),
    "unknown-instrument": (TINY.replace("seed: 7\n", "seed: 7\ninstrument: nosuch-sem\n"),
                           ("nosuch-sem", "generic-sem")),
    "not-a-mapping": ("- just\n- a list\n", ()),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
@pytest.mark.parametrize("command", ["generate", "validate"])
def test_bad_recipe_in_process(tmp_path, capsys, case, command):
    text, needles = BAD_RECIPES[case]
    recipe = write_recipe(tmp_path, text)
    out = tmp_path / "out.h5"
    argv = ["generate", recipe, "-o", out, "-q", "-j", "1"] if command == "generate" \
        else ["validate", recipe]
    rc, so, se = run_cli(capsys, *argv)
    assert_one_error_line(rc, so, se, *needles)
    assert_nothing_written(tmp_path, "out.h5")


def test_missing_recipe_file(tmp_path, capsys):
    rc, so, se = run_cli(capsys, "generate", tmp_path / "nope.yaml", "-o", tmp_path / "out.h5",
                         "-q", "-j", "1")
    assert_one_error_line(rc, so, se, "nope.yaml", "not found")
    assert_nothing_written(tmp_path, "out.h5")
    rc, so, se = run_cli(capsys, "validate", tmp_path / "nope.yaml")
    assert_one_error_line(rc, so, se, "nope.yaml")


def test_error_messages_name_the_value(tmp_path, capsys):
    """The negative-dose message names key and value; the instrument message lists profiles."""
    recipe = write_recipe(tmp_path, tiny_with("detector: {dose: -5}\n"))
    rc, so, se = run_cli(capsys, "validate", recipe)
    line = assert_one_error_line(rc, so, se)
    assert "detector.dose = -5" in line
    shipped = sorted(p.stem for p in INSTRUMENT_FILE.parent.glob("*.yaml"))
    recipe = write_recipe(tmp_path, TINY.replace("seed: 7\n", "seed: 7\ninstrument: nosuch\n"))
    rc, so, se = run_cli(capsys, "validate", recipe)
    line = assert_one_error_line(rc, so, se)
    for name in shipped:
        assert name in line


# --------------------------------------------------------------------------------------------
# unwritable outputs
# --------------------------------------------------------------------------------------------
def test_output_in_missing_directory(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "no" / "such" / "dir" / "out.h5"
    rc, so, se = run_cli(capsys, "generate", recipe, "-o", out, "-q", "-j", "1")
    assert_one_error_line(rc, so, se, "out.h5")
    assert not out.parent.exists()
    assert_nothing_written(tmp_path, "out.h5")


def test_output_parent_is_a_file(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file\n")
    out = blocker / "out.h5"
    rc, so, se = run_cli(capsys, "generate", recipe, "-o", out, "-q", "-j", "1")
    assert_one_error_line(rc, so, se, "out.h5")
    assert blocker.read_text() == "a regular file\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "recipe.yaml"]


def test_output_is_a_directory(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "outdir"
    out.mkdir()
    rc, so, se = run_cli(capsys, "generate", recipe, "-o", out, "-q", "-j", "1")
    assert_one_error_line(rc, so, se, "outdir")
    assert out.is_dir() and not any(out.iterdir())
    assert_nothing_written(tmp_path, "outdir.h5")


# --------------------------------------------------------------------------------------------
# bad dataset files: info and preview
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,needle", [("truncated", "truncated"), ("text", "not an HDF5"),
                                         ("missing", "no such file")])
def test_info_on_bad_file(bad_files, capsys, kind, needle):
    path = bad_files[kind]
    rc, so, se = run_cli(capsys, "info", path)
    assert_one_error_line(rc, so, se, path.name, needle)
    rc, so, se = run_cli(capsys, "info", "--json", path)
    assert_one_error_line(rc, so, se, path.name)
    assert so == ""  # no half JSON document on stdout


@pytest.mark.parametrize("kind,needle", [("truncated", "truncated"), ("text", "not an HDF5"),
                                         ("missing", "no such file")])
def test_preview_on_bad_file(bad_files, tmp_path, capsys, kind, needle):
    path = bad_files[kind]
    png = tmp_path / "preview.png"
    rc, so, se = run_cli(capsys, "preview", path, "-o", png)
    assert_one_error_line(rc, so, se, path.name, needle)
    assert_nothing_written(tmp_path, "preview.png")


# --------------------------------------------------------------------------------------------
# the same errors through a real process (exit status, stderr, no traceback)
# --------------------------------------------------------------------------------------------
def test_errors_as_subprocess(tmp_path, bad_files):
    recipe = write_recipe(tmp_path, BAD_RECIPES["malformed-yaml"][0], "broken.yaml")
    rc, so, se = run_subprocess("generate", recipe, "-o", tmp_path / "out.h5", "-q", "-j", "1")
    assert rc == 2
    assert_one_error_line(rc, so, se, "broken.yaml", "malformed YAML")
    assert_nothing_written(tmp_path, "out.h5")

    good = write_recipe(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    rc, so, se = run_subprocess("generate", good, "-o", blocker / "out.h5", "-q")
    assert rc == 2
    assert_one_error_line(rc, so, se, "out.h5")

    rc, so, se = run_subprocess("info", bad_files["truncated"])
    assert rc == 2
    assert_one_error_line(rc, so, se, "truncated")

    png = tmp_path / "p.png"
    rc, so, se = run_subprocess("preview", bad_files["text"], "-o", png)
    assert rc == 2
    assert_one_error_line(rc, so, se, "not an HDF5")
    assert_nothing_written(tmp_path, "p.png")


# --------------------------------------------------------------------------------------------
# the happy path
# --------------------------------------------------------------------------------------------
def test_validate_shipped_recipe(capsys):
    rc, so, se = run_cli(capsys, "validate", SHIPPED_RECIPE)
    assert rc == 0, se
    assert "valid recipe" in so and "sem-voronoi-grains" in so
    assert se == ""


def test_validate_shipped_recipe_subprocess():
    rc, so, se = run_subprocess("validate", SHIPPED_RECIPE)
    assert rc == 0, se
    assert "valid recipe" in so
    assert "Traceback" not in se


def test_info_text(tiny_dataset, capsys):
    _, out = tiny_dataset
    rc, so, se = run_cli(capsys, "info", out)
    assert rc == 0, se
    assert "samples" in so and "6 from 2 specimens" in so
    assert "grain_id" in so and "boundary" in so
    assert "root_seed" in so and "recipe_sha256" in so
    rc, so, se = run_cli(capsys, "info", "--recipe", out)
    assert rc == 0
    assert "name: tiny-cli" in so  # the stored recipe text


def test_info_json(tiny_dataset, capsys):
    _, out = tiny_dataset
    rc, so, se = run_cli(capsys, "info", "--json", out)
    assert rc == 0, se
    info = json.loads(so)
    assert info["samples"] == 6
    assert info["specimens"] == 2
    assert info["image"]["shape"] == [64, 64]
    assert info["image"]["dtype"] == "uint16"
    assert set(info["labels"]) == {"grain_id", "boundary"}
    assert info["labels"]["grain_id"]["kind"] == "instance"
    assert info["labels"]["boundary"]["classes"] == ["grain", "boundary"]
    assert info["attrs"]["root_seed"] == 7
    assert info["attrs"]["recipe"] == TINY


def test_preview_png(tiny_dataset, tmp_path, capsys):
    _, out = tiny_dataset
    png = tmp_path / "montage.png"
    n, tile = 3, 48
    rc, so, se = run_cli(capsys, "preview", out, "-o", png, "-n", n, "--tile", tile)
    assert rc == 0, se
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size == (n * tile + (n + 1) * 4, 2 * tile + 12)
    # -n larger than the dataset shows every sample
    rc, so, se = run_cli(capsys, "preview", out, "-o", png, "-n", 50, "--tile", 16)
    assert rc == 0, se
    with Image.open(png) as im:
        assert im.size == (6 * 16 + 7 * 4, 2 * 16 + 12)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_provenance_attrs(tiny_dataset):
    recipe, out = tiny_dataset
    text = recipe.read_text(encoding="utf-8")
    with open_dataset(out) as ds:
        attrs = dict(ds.attrs)
        sids = np.asarray(ds.specimen_ids())
        idx = np.asarray(ds.indices())
    assert attrs["recipe"] == text
    assert attrs["recipe_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert attrs["recipe_sha256"] == recipe_sha256(text)
    assert attrs["root_seed"] == 7
    assert attrs["instrument"] == INSTRUMENT_FILE.read_text(encoding="utf-8")
    assert attrs["instrument_name"] == "generic-sem"
    assert isinstance(attrs["emtwin_version"], str) and attrs["emtwin_version"]
    assert attrs["complete"] is True
    # several samples per specimen: samples 6, specimens 2 -> 3 consecutive samples each
    assert sids.tolist() == [0, 0, 0, 1, 1, 1]
    assert idx.tolist() == list(range(6))
    # the same through h5py directly (lz4 needs the hdf5plugin filter registered)
    import hdf5plugin  # noqa: F401

    with h5py.File(out, "r") as f:
        assert f["meta/specimen_id"][...].tolist() == [0, 0, 0, 1, 1, 1]
        assert f["images"].shape == (6, 64, 64) and f["images"].dtype == np.uint16
        assert f["labels/grain_id"].dtype == np.int32
        assert f["labels/boundary"].dtype == np.uint8


def test_samples_of_one_specimen_share_grains(tiny_dataset):
    """Fields of one specimen come from the same tessellation; another specimen differs."""
    _, out = tiny_dataset
    with open_dataset(out) as ds:
        params = [ds.params(i)["specimen"] for i in range(6)]
    assert params[0] == params[1] == params[2]
    assert params[3] == params[4] == params[5]
    # (the drawn counts of two specimens may coincide: compare the seed positions instead)
    from twin.generate import build_pipeline
    from twin.recipe import parse_recipe

    pipe, _ = build_pipeline(parse_recipe(TINY), None, 7)
    t0, t1 = pipe.specimen_of(0)[0], pipe.specimen_of(1)[0]
    assert t0.seeds.shape != t1.seeds.shape or not np.array_equal(t0.seeds, t1.seeds)


def test_n_and_seed_overrides(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "override.h5"
    rc, so, se = run_cli(capsys, "generate", recipe, "-o", out, "-n", 4, "--seed", 12345,
                         "-q", "-j", "1")
    assert rc == 0, se
    with open_dataset(out) as ds:
        assert len(ds) == 4
        assert ds.attrs["root_seed"] == 12345
        assert ds.attrs["n_samples"] == 4
        # grouping is the recipe's (ceil(6 / 2) = 3 per specimen), whatever -n
        assert np.asarray(ds.specimen_ids()).tolist() == [0, 0, 0, 1]
        img0 = ds.image(0)
    # and a different seed gives different images than the recipe's seed
    out7 = tmp_path / "seed7.h5"
    assert run_cli(capsys, "generate", recipe, "-o", out7, "-n", 1, "-q", "-j", "1")[0] == 0
    with open_dataset(out7) as ds:
        assert ds.attrs["root_seed"] == 7
        assert not np.array_equal(ds.image(0), img0)


def test_bad_n_is_a_usage_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(recipe), "-o", str(tmp_path / "o.h5"), "-n", "0"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "-n must be >= 1" in err and "Traceback" not in err
    assert_nothing_written(tmp_path, "o.h5")


def test_same_seed_bit_identical(tmp_path, capsys, tiny_dataset):
    recipe, first = tiny_dataset
    again = tmp_path / "again.h5"
    rc, so, se = run_cli(capsys, "generate", recipe, "-o", again, "-q", "-j", "1")
    assert rc == 0, se
    a, b = read_arrays(first), read_arrays(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].tobytes() == b[k].tobytes(), k
    with open_dataset(first) as da, open_dataset(again) as db:
        assert [da.params(i) for i in range(6)] == [db.params(i) for i in range(6)]


def test_regenerate_one_sample(tiny_dataset, tmp_path, capsys):
    _, out = tiny_dataset
    with open_dataset(out) as ds:
        text, seed = ds.attrs["recipe"], ds.attrs["root_seed"]
        for i in (0, 4):
            s = regenerate_sample(text, i, seed)
            assert s.index == i
            assert s.specimen_id == int(ds.specimen_ids()[i])
            assert s.image.dtype == ds.image(i).dtype
            assert s.image.tobytes() == ds.image(i).tobytes()
            for name in ds.label_names:
                assert s.labels[name].tobytes() == ds.label(name, i).tobytes(), name
            assert json.loads(json.dumps(s.params, default=float)) == ds.params(i)
    # with a --seed override the stored root_seed regenerates the stored bytes
    recipe = write_recipe(tmp_path)
    o2 = tmp_path / "seeded.h5"
    assert run_cli(capsys, "generate", recipe, "-o", o2, "-n", 3, "--seed", 99, "-q",
                   "-j", "1")[0] == 0
    with open_dataset(o2) as ds:
        s = regenerate_sample(ds.attrs["recipe"], 2, ds.attrs["root_seed"])
        assert s.image.tobytes() == ds.image(2).tobytes()


_THREAD_SCRIPT = r"""
import hashlib, sys
import numba
from twin.generate import regenerate_sample
text = open(sys.argv[1], encoding="utf-8").read()
h = hashlib.sha256()
for i in (0, 1, 4):
    s = regenerate_sample(text, i, 11)
    h.update(s.image.tobytes())
    for name in sorted(s.labels):
        h.update(name.encode())
        h.update(s.labels[name].tobytes())
print(numba.config.NUMBA_NUM_THREADS, h.hexdigest())
"""


def test_numba_thread_count_does_not_change_bytes(tmp_path):
    # a larger field, so that the parallel loops really split work between threads
    text = TINY.replace("size: [64, 64]", "size: [160, 128]")
    recipe = write_recipe(tmp_path, text)
    digests = {}
    for threads in ("1", "2"):
        env = dict(os.environ)
        env["NUMBA_NUM_THREADS"] = threads
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
        p = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT, str(recipe)], capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        n, digest = p.stdout.split()
        assert n == threads
        digests[threads] = digest
    assert digests["1"] == digests["2"]


def test_regenerate_with_a_profile_file_uses_the_stored_profile(tmp_path):
    """A recipe naming a profile by relative path regenerates from the dataset's stored profile."""
    import shutil

    from twin.dataset import open_dataset
    from twin.generate import regenerate_sample

    shutil.copy(Path(__file__).resolve().parents[1] / "twin/instruments/generic-sem.yaml",
                tmp_path / "my.yaml")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nsize: [48, 48]\nsamples: 3\nspecimens: 1\nseed: 2\n"
                      "instrument: my.yaml\nspecimen: {grains_per_field: [5, 9]}\n")
    out = tmp_path / "o.h5"
    assert main(["generate", str(recipe), "-o", str(out), "-q", "--workers", "1"]) == 0
    with open_dataset(out) as ds:
        s = regenerate_sample(ds.attrs["recipe"], 2, ds.attrs["root_seed"],
                              instrument_text=ds.attrs["instrument"])
        assert s.image.tobytes() == ds.image(2).tobytes()


def test_a_draw_the_generators_cannot_honour_is_one_line_and_leaves_nothing(
        tmp_path, capsys, monkeypatch):
    """A generator that refuses a drawn parameter (ValueError, e.g. hard-core seeds that jam)
    while a specimen is drawn: one error line naming the sample and the cause, and no output or
    shard directory in the way of the corrected recipe."""
    from twin.pipeline import SEMGrainPipeline

    recipe = write_recipe(tmp_path)
    real = SEMGrainPipeline.generate

    def refusing(self, i):
        if i == 0:
            raise ValueError("could place only 89 of 136 seeds with min_distance=22 px")
        return real(self, i)

    with monkeypatch.context() as m:
        m.setattr(SEMGrainPipeline, "generate", refusing)
        rc, so, se = run_cli(capsys, "generate", recipe, "-o", tmp_path / "out.h5", "-q",
                             "-j", "1")
    assert rc == 2
    msg = assert_one_error_line(rc, so, se, "sample 0", "could place only")
    assert "nothing was written" in msg
    assert_nothing_written(tmp_path, "out.h5")
    assert not (tmp_path / "out.h5.shards").exists()
    rc, so, se = run_cli(capsys, "generate", recipe, "-o", tmp_path / "out.h5", "-q", "-j", "1")
    assert rc == 0, se


def test_schema_limits_keep_seed_packings_and_weights_feasible(tmp_path, capsys):
    """Hard-core packings past jamming and lognormal weights that empty most cells are refused
    by validation, naming the key and the limit."""
    for spec, key, limit in (
            ("{seeds: hardcore, min_distance: 0.9}", "specimen.min_distance", "0.75"),
            ("{weights: lognormal, weight_sigma: 1.0}", "specimen.weight_sigma", "0.5"),
            ("{features: {subgrains: {enabled: true, subgrains_per_grain: 1000}}}",
             "subgrains_per_grain", "100")):
        recipe = write_recipe(tmp_path, "name: lim\nsize: [64, 64]\nsamples: 2\nspecimens: 1\n"
                              f"seed: 1\nspecimen: {spec}\n")
        rc, so, se = run_cli(capsys, "validate", recipe)
        assert_one_error_line(rc, so, se, key, limit)


def test_nan_and_generator_refusals_are_validation_errors(tmp_path, capsys):
    """NaN / inf anywhere (a single number for a [low, high] key included) and combinations
    the schema lets through but a generator refuses (particle placement weights summing to 0,
    duplicate class names): one line from `twin validate`, no traceback."""
    head = "name: v\nsize: [64, 64]\nsamples: 2\nspecimens: 1\nseed: 1\n"
    cases = [
        ("contrast: {boundary: {depth: .nan}}", "contrast.boundary.depth", "finite"),
        ("detector: {dose: .inf}", "detector.dose", "finite"),
        ("specimen: {min_distance: .nan}", "specimen.min_distance", "finite"),
        ("specimen: {features: {particles: {enabled: true, classes: [{name: p, placement: "
         "{interior: 0, boundary: 0, junction: 0}}]}}}", "placement", "positive sum"),
        ("specimen: {features: {particles: {enabled: true, classes: [{name: p}, {name: p}]}}}",
         "unique", "'p'"),
    ]
    for extra, *needles in cases:
        recipe = write_recipe(tmp_path, head + extra + "\n")
        rc, so, se = run_cli(capsys, "validate", recipe)
        assert rc == 2
        assert_one_error_line(rc, so, se, *needles)


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from twin.pipeline import SEMGrainPipeline

    def huge(self, i):
        raise MemoryError("Unable to allocate 303. GiB")

    monkeypatch.setattr(SEMGrainPipeline, "generate", huge)
    rc, so, se = run_cli(capsys, "generate", write_recipe(tmp_path), "-o", tmp_path / "o.h5",
                         "-q", "-j", "1")
    assert rc == 2
    assert_one_error_line(rc, so, se, "out of memory", "303. GiB")
    assert_nothing_written(tmp_path, "o.h5")
