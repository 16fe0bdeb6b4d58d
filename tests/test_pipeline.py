"""The SEM grain pipeline: labels evaluated at the image's own (distorted) coordinates."""

import numpy as np
import pytest

from generators.sem import boundary_label
from twin.instrument import load_instrument
from twin.pipeline import SEMGrainPipeline
from twin.recipe import parse_recipe
from twin.seeding import sample_rng

RECIPE = """
name: t
size: [96, 128]
samples: 8
specimens: 2
seed: 5
specimen: {grains_per_field: [20, 40]}
scan: {drift_px: 4.0, line_jitter_px: 1.0}
"""


@pytest.fixture
def pipe():
    r = parse_recipe(RECIPE)
    inst, _ = load_instrument(r.instrument)
    return SEMGrainPipeline(r, inst)


def test_labels_are_evaluated_at_the_scan_coordinates(pipe):
    s = pipe.generate(3)
    tess, _, _ = pipe.specimen_of(s.specimen_id)
    rng = sample_rng(pipe.root_seed, 3)
    scan_p = pipe.scan.sample(rng)  # the first draw of the sample, as in generate()
    x, y = pipe.scan.apply(scan_p)
    assert np.allclose(s.params["scan"]["line_jitter_px"], scan_p.line_jitter)
    gid, dist = tess.label(x, y)  # exact, uncapped reference
    assert np.array_equal(s.labels["grain_id"], gid)
    assert np.array_equal(s.labels["boundary"], boundary_label(dist, 2.0))
    # the distortion is real: an undistorted grid would give other labels
    yy, xx = np.mgrid[:96, :128].astype(float)
    g0, _ = tess.label(xx + scan_p.offset[0], yy + scan_p.offset[1])
    assert not np.array_equal(g0, gid)


def test_samples_share_specimens_and_differ(pipe):
    a, b, c = pipe.generate(0), pipe.generate(1), pipe.generate(4)
    assert a.specimen_id == b.specimen_id == 0 and c.specimen_id == 1
    assert a.params["specimen"] == b.params["specimen"]
    assert not np.array_equal(a.image, b.image)


def test_regeneration_is_bit_identical(pipe):
    r = parse_recipe(RECIPE)
    inst, _ = load_instrument(r.instrument)
    fresh = SEMGrainPipeline(r, inst)
    for i in (6, 2, 6):
        s1, s2 = pipe.generate(i), fresh.generate(i)
        assert s1.image.tobytes() == s2.image.tobytes()
        for k in s1.labels:
            assert s1.labels[k].tobytes() == s2.labels[k].tobytes()
        assert s1.params == s2.params


def test_image_follows_the_detector_model(pipe):
    s = pipe.generate(0)
    det = pipe.instrument.detector
    assert s.image.dtype == np.uint16
    dose = s.params["detector"]["dose_e_per_px"]
    # mean counts = offset + gain·dose·<signal>, with <signal> within the grain intensity range
    m = (s.image.mean() - det.offset) / (det.gain * dose)
    assert 0.1 < m < 1.0


@pytest.mark.parametrize("kind", ["voronoi", "potts", "section3d"])
def test_a_bounded_specimen_keeps_every_field_inside_it(kind):
    """``periodic: false``: the field offsets are drawn so that the frame lies inside the
    specimen (a periodic one wraps); before, frames reached past its edge, where the outer
    cells stretch into the margin (5-15 grains per frame instead of ~50)."""
    text = ("name: b\nsize: [64, 96]\nsamples: 12\nspecimens: 3\nseed: 4\n"
            f"specimen: {{kind: {kind}, periodic: false, grains_per_field: [30, 40]}}\n")
    p = SEMGrainPipeline(parse_recipe(text), load_instrument("generic-sem")[0])
    lx, ly = p.specimen.extent
    counts = []
    for i in range(12):
        s = p.generate(i)
        ox, oy = s.params["scan"]["offset_px"]
        assert 0 <= ox <= lx - 96 and 0 <= oy <= ly - 64
        counts.append(len(np.unique(s.labels["grain_id"])))
    assert min(counts) >= 15  # ~30-40 grains per field, a few cut by the frame edge
