"""Optical colour contrast against references: colorsys, analytic profiles, real tbm-grains colours."""

import colorsys
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, stats

from generators.optical import OpticalColourContrast, OpticalParams, hsv_to_rgb, smooth_noise

TBM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "tbm-grains"
FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


def params(**kw) -> OpticalParams:
    base = dict(boundary_depth=0.0, boundary_width_px=2.0, shading_amplitude=0.0,
                shading_angle_deg=0.0, mottle_amplitude=0.0, mottle_chroma=0.0,
                mottle_length_px=2.0, mottle_seed=1)
    return OpticalParams(**{**base, **kw})


def stripes(h=48, w=96, n=3):
    """Vertical stripes of width w/n: grain ids and the exact distance to the nearest stripe edge."""
    x = np.arange(w, dtype=np.float64)
    width = w / n
    gid = np.broadcast_to((x // width).astype(np.int32), (h, w)).copy()
    edges = np.arange(1, n) * width - 0.5          # boundaries between pixel columns
    dist = np.abs(x[:, None] - edges[None]).min(1)
    return gid, np.broadcast_to(dist.astype(np.float32), (h, w)).copy()


# ---------------------------------------------------------------------------------- helpers

def test_hsv_to_rgb_matches_colorsys(rng):
    h, s, v = rng.random((3, 2000))
    h[:10] = [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 0.999999, 1.0, 1.5, -0.25]
    ref = np.array([colorsys.hsv_to_rgb(a % 1.0, b, c) for a, b, c in zip(h, s, v)])
    np.testing.assert_allclose(hsv_to_rgb(h, s, v), ref, atol=1e-12)


def test_smooth_noise_unit_variance_and_gaussian_correlation():
    ell = 2.0
    f = np.concatenate([smooth_noise((24, 40), ell, seed, 8) for seed in range(200)]).astype(float)
    var = f.var(axis=0)                       # 1600 realisations per pixel, edges included
    assert np.abs(var - 1.0).max() < 0.2, (var.min(), var.max())
    assert abs(f.mean()) < 0.02
    for tau in (1, 2, 4):
        cx = (f[:, :, :-tau] * f[:, :, tau:]).mean()
        cy = (f[:, :-tau] * f[:, tau:]).mean()
        ref = math.exp(-tau**2 / (4 * ell**2))
        assert abs(cx - ref) < 0.03 and abs(cy - ref) < 0.03, (tau, cx, cy, ref)


def test_smooth_noise_is_gaussian():
    f = smooth_noise((256, 256), 1.0, 3, 1).ravel()[::7]        # sparse: nearly independent
    assert stats.kstest(f, "norm").pvalue > 1e-3


def test_smooth_noise_thread_count_and_seed(thread_runs):
    runs = thread_runs(lambda: smooth_noise((70, 90), 3.0, 11, 2))
    a = runs[0]
    assert all(b.tobytes() == a.tobytes() for b in runs)
    assert not np.array_equal(a, smooth_noise((70, 90), 3.0, 12, 2))
    with pytest.raises(ValueError):
        smooth_noise((10, 10), 0.0, 1)


# ----------------------------------------------------------------------------- grain colours

def test_grain_colours_follow_requested_ranges(rng):
    oc = OpticalColourContrast(hue_bands_deg=((100.0, 140.0),), saturation=(0.2, 0.5),
                               value=(0.4, 0.9), specimen_hue_shift_deg=0.0,
                               specimen_value_shift=0.0)
    rgb = oc.sample_grains(rng, 4000)
    assert rgb.shape == (4000, 3) and rgb.dtype == np.float64
    hsv = np.array([colorsys.rgb_to_hsv(*c) for c in rgb])
    hue = hsv[:, 0] * 360
    for x, (lo, hi) in ((hue, (100, 140)), (hsv[:, 1], (0.2, 0.5)), (hsv[:, 2], (0.4, 0.9))):
        assert x.min() >= lo - 1e-9 and x.max() <= hi + 1e-9
        assert stats.kstest(x, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3


def test_band_weights_vary_between_specimens(rng):
    """Low concentration: specimens dominated by one band; high: every specimen half-half."""
    warm = lambda rgb: np.array([colorsys.rgb_to_hsv(*c)[0] < 0.5 for c in rgb]).mean()  # noqa: E731
    kw = dict(hue_bands_deg=((30.0, 60.0), (210.0, 240.0)), specimen_hue_shift_deg=0.0)
    low = [warm(OpticalColourContrast(band_concentration=0.2, **kw).sample_grains(rng, 200))
           for _ in range(60)]
    high = [warm(OpticalColourContrast(band_concentration=1e4, **kw).sample_grains(rng, 200))
            for _ in range(60)]
    # Dirichlet(0.2, 0.2): P(weight < 0.1 or > 0.9) ≈ 0.6; Dirichlet(1e4, 1e4): binomial(200, ½)
    assert np.mean((np.array(low) < 0.1) | (np.array(low) > 0.9)) > 0.4
    assert abs(np.mean(high) - 0.5) < 0.02 and np.std(high) < 0.06


def test_contrast_scales_deviation_from_specimen_mean():
    a = OpticalColourContrast(contrast=1.0).sample_grains(np.random.default_rng(5), 50)
    b = OpticalColourContrast(contrast=0.4).sample_grains(np.random.default_rng(5), 50)
    np.testing.assert_allclose(b, a.mean(0) + 0.4 * (a - a.mean(0)), atol=1e-12)


def _srgb_lab(rgb):
    skc = pytest.importorskip("skimage.color")
    return skc.rgb2lab(np.asarray(rgb, dtype=np.float64)[None])[0]


def _colour_stats(groups):
    """Grain-colour statistics in CIELAB: medians/IQRs and the within-group pair ΔE76 median."""
    labs = [_srgb_lab(g) for g in groups]
    lab = np.concatenate(labs)
    pair = np.concatenate([np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(len(x), 1)]
                           for x in labs])
    iqr = lambda v: np.subtract(*np.percentile(v, [75, 25]))  # noqa: E731
    return {"L_median": np.median(lab[:, 0]), "L_iqr": iqr(lab[:, 0]),
            "chroma_median": np.median(np.hypot(lab[:, 1], lab[:, 2])),
            "abs_a_median": np.median(np.abs(lab[:, 1])), "b_iqr": iqr(lab[:, 2]),
            "pair_dE_median": np.median(pair)}


def _real_grain_colours(name):
    from PIL import Image
    rgb = np.asarray(Image.open(TBM / "images" / f"{name}.png").convert("RGB")) / 255.0
    boundary = np.asarray(Image.open(TBM / "masks" / f"{name}.png").convert("L")) >= 128
    lbl, n = ndimage.label(~boundary)
    interior = np.where(ndimage.distance_transform_edt(~boundary) >= 2, lbl, 0)
    idx = np.arange(1, n + 1)
    count = ndimage.sum_labels(np.ones(lbl.shape), interior, idx)
    sums = np.stack([ndimage.sum_labels(rgb[..., c], interior, idx) for c in range(3)], 1)
    keep = count >= 40
    return sums[keep] / count[keep, None]


@pytest.mark.skipif(not (TBM / "images").is_dir(), reason="shared real data not present")
def test_default_colours_match_tbm_grains():
    """Reference computed here from one crop of each real micrograph (14 crops, ~650 grains).

    Tolerances ≈ 3 bootstrap standard deviations of each statistic over resampled micrographs
    (sd: L median 1.8, L IQR 1.5, chroma 1.5, |a*| 0.5, b* IQR 3.9, pair ΔE 1.2).
    """
    first = {}
    for p in sorted((TBM / "images").glob("*.png")):
        first.setdefault(p.stem.split("-")[0], p.stem)
    real = _colour_stats([_real_grain_colours(n) for n in first.values()])
    rng = np.random.default_rng(2024)
    oc = OpticalColourContrast()
    syn = _colour_stats([oc.sample_grains(rng, 45) for _ in range(300)])
    tol = {"L_median": 5.5, "L_iqr": 4.5, "chroma_median": 4.5, "abs_a_median": 1.5,
           "b_iqr": 12.0, "pair_dE_median": 3.6}
    for k, t in tol.items():
        assert abs(syn[k] - real[k]) < t, (k, syn[k], real[k])


# ------------------------------------------------------------------------------------ apply

def test_far_from_boundaries_colour_is_grain_colour_times_shading():
    gid, dist = stripes()
    colours = np.array([[0.2, 0.4, 0.6], [0.7, 0.5, 0.3], [0.5, 0.5, 0.1]])
    p = params(boundary_depth=0.3, boundary_width_px=2.0, shading_amplitude=0.2,
               shading_angle_deg=30.0)
    out = OpticalColourContrast().apply(gid, dist, colours, p)
    assert out.shape == gid.shape + (3,) and out.dtype == np.float32
    h, w = gid.shape
    yy, xx = np.mgrid[:h, :w]
    half_diag = 0.5 * math.hypot(h - 1, w - 1)
    u = ((xx - (w - 1) / 2) * math.cos(math.radians(30)) + (yy - (h - 1) / 2)
         * math.sin(math.radians(30))) / half_diag
    expect = colours[gid] * (1 + 0.2 * u)[..., None]
    far = dist > 5 * 2.0 / FWHM                     # > 5 σ: darkening < 4e-6
    np.testing.assert_allclose(out[far], expect[far], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth,width", [(0.4, 2.0), (0.1, 5.0), (1.0, 1.0)])
def test_boundary_darkening_follows_gaussian_profile(depth, width):
    d = np.linspace(0, 10, 401, dtype=np.float32)[None, :].repeat(2, 0)
    gid = np.zeros(d.shape, dtype=np.int32)
    colours = np.array([[0.8, 0.6, 0.4]])
    out = OpticalColourContrast().apply(gid, d, colours,
                                        params(boundary_depth=depth, boundary_width_px=width))
    sigma = width / FWHM
    ref = colours[0] * (1 - depth * np.exp(-d[0].astype(float) ** 2 / (2 * sigma**2)))[:, None]
    np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-7)
    # half-depth point at d = FWHM / 2
    loss = 1 - out[0, :, 0] / 0.8
    d_half = np.interp(depth / 2, loss[::-1], d[0, ::-1])
    assert d_half == pytest.approx(width / 2, abs=0.02)


def test_reach_bounds_the_darkening():
    oc = OpticalColourContrast(boundary_depth=(0.5, 0.5), boundary_width_px=(3.0, 3.0))
    r = oc.reach_px()
    out = oc.apply(np.zeros((1, 2), np.int32), np.array([[r, 1e6]], np.float32),
                   np.ones((1, 3)) * 0.5, params(boundary_depth=0.5, boundary_width_px=3.0))
    assert abs(out[0, 0, 0] / out[0, 1, 0] - 1) < 1.01e-4


def test_mottling_amplitude_and_yellow_blue_direction():
    h = w = 192
    gid = np.zeros((h, w), np.int32)
    dist = np.full((h, w), 100, np.float32)
    c = np.array([[0.5, 0.5, 0.5]])
    oc = OpticalColourContrast()
    lum = oc.apply(gid, dist, c, params(mottle_amplitude=0.05, mottle_length_px=2.0)) / 0.5 - 1
    # luminance mottling: the same relative change in every channel, std = amplitude
    np.testing.assert_allclose(lum[..., 0], lum[..., 2], atol=1e-6)
    assert lum[..., 0].std() == pytest.approx(0.05, rel=0.12)
    chroma = oc.apply(gid, dist, c, params(mottle_chroma=0.04, mottle_length_px=2.0)) / 0.5 - 1
    # chroma mottling along (½, ½, −1): R = G = −B / 2 pixel by pixel, std of B = amplitude
    np.testing.assert_allclose(chroma[..., 0], chroma[..., 1], atol=1e-6)
    np.testing.assert_allclose(chroma[..., 0], -0.5 * chroma[..., 2], atol=1e-6)
    assert chroma[..., 2].std() == pytest.approx(0.04, rel=0.12)
    # the grain mean is unchanged by mottling (zero-mean fields)
    assert abs(lum.mean()) < 0.01


def test_output_clipped_to_unit_range():
    gid, dist = stripes(16, 30, 3)
    colours = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.9, 0.1, 0.5]])
    out = OpticalColourContrast().apply(gid, dist, colours,
                                        params(shading_amplitude=0.9, mottle_amplitude=0.5))
    assert out.min() >= 0 and out.max() <= 1 and (out == 1).any()


def test_determinism_and_draws_within_ranges(rng, thread_runs):
    oc = OpticalColourContrast()
    a = oc.sample(np.random.default_rng(9))
    assert a == oc.sample(np.random.default_rng(9))
    assert oc.sample_grains(np.random.default_rng(4), 30).tobytes() == \
        oc.sample_grains(np.random.default_rng(4), 30).tobytes()
    gid, dist = stripes(40, 60, 4)
    cols = oc.sample_grains(rng, 4)
    runs = thread_runs(lambda: oc.apply(gid, dist, cols, a))
    assert all(y.tobytes() == runs[0].tobytes() for y in runs)
    ps = [oc.sample(rng) for _ in range(300)]
    for name, r in (("boundary_depth", oc.boundary_depth), ("shading_amplitude", oc.shading),
                    ("mottle_amplitude", oc.mottle_amplitude),
                    ("mottle_length_px", oc.mottle_length_px)):
        v = np.array([getattr(p, name) for p in ps])
        assert v.min() >= r[0] and v.max() <= r[1] and v.max() > v.min()
    import json
    json.dumps(a.to_dict())


def test_bad_input_raises():
    with pytest.raises(ValueError):
        OpticalColourContrast(saturation=(0.5, 0.2))
    with pytest.raises(ValueError):
        OpticalColourContrast(value=(0.2, 1.5))
    with pytest.raises(ValueError):
        OpticalColourContrast(hue_bands_deg=())
    with pytest.raises(ValueError):
        OpticalColourContrast(band_concentration=0.0)
    with pytest.raises(ValueError):
        OpticalColourContrast(contrast=1.5)
    with pytest.raises(ValueError):
        OpticalColourContrast(mottle_length_px=(0.0, 2.0))
    oc = OpticalColourContrast()
    gid, dist = stripes(8, 9, 3)
    cols = np.full((3, 3), 0.5)
    with pytest.raises(ValueError):
        oc.sample_grains(np.random.default_rng(0), -1)
    with pytest.raises(ValueError):
        oc.apply(gid, dist[:, :-1], cols, params())
    with pytest.raises(ValueError):
        oc.apply(gid, dist, cols[:2], params())           # grain id 2 has no colour
    with pytest.raises(ValueError):
        oc.apply(gid, dist, cols[:, :2], params())
    with pytest.raises(ValueError):
        oc.apply(gid.astype(float), dist, cols, params())


def test_dose_defaults_to_the_instruments_usual_exposure():
    """A recipe without detector.dose: the instrument profile's dose (generic-optical: a camera's
    8,000-12,000 photoelectrons; the SEM default 50-200 gave a 12-bit colour image a few counts
    of contrast), else the schema default; a recipe's own dose wins."""
    from twin.generate import build_pipeline
    from twin.recipe import DEFAULT_DOSE, parse_recipe

    head = "name: d\nsize: [64, 64]\nsamples: 2\nspecimens: 1\nseed: 1\n"
    optical = head + "instrument: generic-optical\ncontrast: {mode: optical-colour}\n"
    p = build_pipeline(parse_recipe(optical), None)[0]
    assert p.dose_range == (8000.0, 12000.0)
    img = p.generate(0).image.astype(np.float64)
    assert img.std() > 50  # counts of contrast, not noise around a constant
    assert build_pipeline(parse_recipe(optical + "detector: {dose: 500}\n"),
                          None)[0].dose_range == (500.0, 500.0)
    assert build_pipeline(parse_recipe(head), None)[0].dose_range == DEFAULT_DOSE
