"""Artefacts against references: brute-force distances, PCA line fits, analytic profiles."""

import dataclasses
import json
import math

import numpy as np
import pytest

from generators.artefacts import (
    ArtefactParams, Artefacts, ChargingStreaks, DataBar, Scratches, Spots, data_bar_pattern,
)

FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))
ALL_ON = Artefacts(scratches=Scratches(probability=1.0), pits=Spots(probability=1.0),
                   dust=Spots(probability=1.0, sigma_px=(1.0, 3.0), bright_fraction=0.5),
                   contamination=Spots(probability=1.0, density=(0.2, 0.4), sigma_px=(5.0, 9.0)),
                   charging=ChargingStreaks(probability=1.0), data_bar=DataBar(probability=1.0))


def one_scratch(**kw):
    s = Scratches(probability=1.0, count=(1, 1), angle_spread_deg=0.0,
                  curvature_per_px=(0.0, 0.0), **kw)
    return Artefacts(scratches=s)


def segment_distance(h, w, y0, x0, y1, x1):
    """Brute-force distance of every pixel centre to the segment (y0, x0)–(y1, x1)."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx), 0, 1)
    return np.hypot(yy - y0 - t * dy, xx - x0 - t * dx)


# ------------------------------------------------------------------------------ off = no-op

@pytest.mark.parametrize("shape", [(40, 50), (40, 50, 3)])
def test_all_off_returns_input_unchanged(rng, shape):
    art = Artefacts()
    assert not art.active
    p = art.sample(rng, (40, 50))
    assert not p.changes_signal and p.data_bar is None
    sig = rng.random(shape).astype(np.float32)
    out = art.apply_signal(sig, p)
    assert out.tobytes() == sig.tobytes() and out.dtype == sig.dtype and out is not sig
    img = rng.integers(0, 4096, shape).astype(np.uint16)
    rec = art.apply_recorded(img, p, 4095)
    assert rec.tobytes() == img.tobytes() and rec.dtype == np.uint16
    assert ALL_ON.active and Artefacts(data_bar=DataBar(probability=0.5)).active


# -------------------------------------------------------------------------------- scratches

def test_straight_scratch_profile_matches_brute_force():
    art = one_scratch(strength=(0.4, 0.4), bright_fraction=0.0, width_px=(2.0, 2.0),
                      length_frac=(0.5, 0.5))
    h, w = 60, 80
    p = art.sample(np.random.default_rng(3), (h, w))
    y, x, ang, length, kappa, width, s = p.scratches[0]
    assert kappa == 0 and s == -0.4 and width == 2.0
    assert length == pytest.approx(0.5 * math.hypot(h, w))
    half = 0.5 * length * np.array([math.sin(ang), math.cos(ang)])
    d = segment_distance(h, w, y - half[0], x - half[1], y + half[0], x + half[1])
    sigma = 2.0 / FWHM
    ref = np.where(d < 4 * sigma, 1 + s * np.exp(-d**2 / (2 * sigma**2)), 1.0)
    out = art.apply_signal(np.ones((h, w)), p)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scratch_changed_pixels_lie_on_a_line_with_the_drawn_angle(seed):
    art = one_scratch(length_frac=(0.6, 0.9))
    h, w = 96, 128
    p = art.sample(np.random.default_rng(seed), (h, w))
    changed = np.abs(art.apply_signal(np.ones((h, w), np.float32), p) - 1) > 1e-3
    yy, xx = np.nonzero(changed)
    assert len(yy) > 50
    pts = np.c_[xx, yy].astype(float)
    pts -= pts.mean(0)
    evals, evecs = np.linalg.eigh(pts.T @ pts)
    major = evecs[:, 1]
    fitted = math.atan2(major[1], major[0]) % math.pi
    drawn = p.scratches[0, 2]
    diff = abs((fitted - drawn + math.pi / 2) % math.pi - math.pi / 2)
    assert math.degrees(diff) < 1.0, (math.degrees(fitted), math.degrees(drawn))
    assert evals[0] / evals[1] < 0.01                       # thin: a line, not a blob


def test_curved_scratch_follows_the_arc():
    s = Scratches(probability=1.0, count=(1, 1), curvature_per_px=(0.01, 0.01),
                  length_frac=(0.8, 0.8), width_px=(1.5, 1.5), strength=(0.5, 0.5))
    art = Artefacts(scratches=s)
    h, w = 80, 100
    p = art.sample(np.random.default_rng(7), (h, w))
    y, x, ang, length, kappa, width, st = p.scratches[0]
    assert abs(kappa) == pytest.approx(0.01)
    # the exact arc, densely sampled: tangent T at the midpoint, normal N = (−sin, cos)
    t = np.linspace(-length / 2, length / 2, 20001)
    along, across = np.sin(kappa * t) / kappa, (1 - np.cos(kappa * t)) / kappa
    ay = y + along * math.sin(ang) + across * math.cos(ang)
    ax = x + along * math.cos(ang) - across * math.sin(ang)
    yy, xx = np.mgrid[:h, :w].astype(float)
    d = np.full((h, w), np.inf)
    for i in range(0, t.size, 2000):
        d = np.minimum(d, np.hypot(yy[..., None] - ay[None, None, i:i + 2000],
                                   xx[..., None] - ax[None, None, i:i + 2000]).min(-1))
    sigma = width / FWHM
    ref = np.where(d < 4 * sigma, 1 + st * np.exp(-d**2 / (2 * sigma**2)), 1.0)
    out = art.apply_signal(np.ones((h, w)), p)
    # chords stray ≤ 0.02 px from the arc: profile error ≤ 0.02 · max slope (s e^-½ / σ) ≈ 0.01
    inside = d < 3 * sigma
    assert np.abs(out - ref)[inside].max() < 0.012
    assert np.abs(out - 1)[d > 4 * sigma + 0.03].max() == 0
    assert inside.sum() > 100                          # a long stretch of the arc is in view


def test_scratch_angles_scatter_about_one_direction():
    s = Scratches(probability=1.0, count=(400, 400), angle_spread_deg=5.0)
    p = Artefacts(scratches=s).sample(np.random.default_rng(1), (64, 64))
    a = p.scratches[:, 2]
    doubled = np.exp(2j * a)                                # axial statistics (mod π)
    spread = math.degrees(math.sqrt(-math.log(abs(doubled.mean()))) / 2) * math.sqrt(2)
    assert spread == pytest.approx(5.0, rel=0.15)
    frac_bright = (p.scratches[:, 6] > 0).mean()
    assert frac_bright == pytest.approx(0.5, abs=0.08)


# ---------------------------------------------------------------------------- spots, streaks

def test_spot_profile_and_poisson_count():
    art = Artefacts(pits=Spots(probability=1.0, density=(2.0, 2.0), sigma_px=(1.2, 1.2),
                               strength=(0.6, 0.6)))
    h, w = 200, 200                                  # mean 8 spots per frame
    counts = [len(art.sample(np.random.default_rng(i), (h, w)).pits) for i in range(1000)]
    # standard errors: mean 1.1 %, variance 4.6 % (Poisson, λ = 8, 1000 frames)
    assert np.mean(counts) == pytest.approx(2.0 * h * w / 1e4, rel=0.045)
    assert np.var(counts) == pytest.approx(2.0 * h * w / 1e4, rel=0.2)
    p = ArtefactParams(shape=(30, 30), pits=np.array([[10.3, 14.6, 1.2, -0.6]]))
    out = art.apply_signal(np.full((30, 30), 0.5), p)
    yy, xx = np.mgrid[:30, :30]
    r2 = (yy - 10.3) ** 2 + (xx - 14.6) ** 2
    ref = 0.5 * np.where(r2 < (4 * 1.2) ** 2, 1 - 0.6 * np.exp(-r2 / (2 * 1.2**2)), 1)
    np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_charging_streak_runs_along_the_fast_scan_direction():
    p = ArtefactParams(shape=(20, 200), streaks=np.array([[8.0, 50.3, 1.0, 30.0, 0.4]]))
    out = Artefacts().apply_signal(np.zeros((20, 200), np.float32), p)
    x = np.arange(200)
    ref_row = np.where((x >= 50.3) & (x <= 50.3 + 9 * 30), 0.4 * np.exp(-(x - 50.3) / 30), 0)
    np.testing.assert_allclose(out[8], ref_row, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[9], ref_row * math.exp(-0.5), rtol=1e-6, atol=1e-7)
    assert (out[:, :51] == 0).all() and (out[:4] == 0).all() and (out[13:] == 0).all()


def test_signal_artefacts_act_alike_on_every_channel(rng):
    p = ALL_ON.sample(rng, (48, 64))
    grey = rng.random((48, 64)).astype(np.float32)
    rgb = np.stack([grey, 0.5 * grey, grey], -1)
    a = ALL_ON.apply_signal(grey, p)
    b = ALL_ON.apply_signal(rgb, p)
    assert b.shape == rgb.shape and b.dtype == np.float32
    factor_plus = ALL_ON.signal_factor(p)
    np.testing.assert_allclose(b[..., 0], a, rtol=1e-6)
    np.testing.assert_allclose(
        b[..., 1], (0.5 * grey.astype(float) * factor_plus + ALL_ON.signal_offset(p)),
        rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- data bar

@pytest.mark.parametrize("dtype,max_value,shape", [(np.uint16, 4095, (120, 160)),
                                                   (np.uint8, 255, (64, 96, 3))])
def test_data_bar_occupies_exactly_the_drawn_rows(dtype, max_value, shape):
    art = Artefacts(data_bar=DataBar(probability=1.0, height_frac=(0.08, 0.12)))
    p = art.sample(np.random.default_rng(5), shape[:2])
    r0, r1 = p.data_bar_rows
    assert r1 == shape[0] and 0.08 * shape[0] - 1 <= r1 - r0 <= 0.12 * shape[0] + 1
    img = np.full(shape, 7, dtype=dtype)           # neither the bar's background nor foreground
    out = art.apply_recorded(img, p, max_value)
    assert out.dtype == dtype and out.shape == img.shape
    changed_rows = np.nonzero((out != img).reshape(shape[0], -1).any(1))[0]
    assert changed_rows.tolist() == list(range(r0, r1))
    bar = out[r0:r1]
    fg = round(p.data_bar.foreground * max_value)
    bg = round(p.data_bar.background * max_value)
    assert set(np.unique(bar).tolist()) == {fg, bg} and out.max() <= max_value
    # the scale bar is drawn where the params say, at the foreground level
    y0, y1, x0, x1 = p.data_bar.scale_bar
    assert (bar[y0:y1, x0:x1] == fg).all() and x1 - x0 >= 2
    assert len(p.data_bar.glyphs) > 0
    np.testing.assert_array_equal(bar[..., 0] if bar.ndim == 3 else bar,
                                  np.where(data_bar_pattern(shape[1], p.data_bar), fg, bg))


def test_data_bar_leaves_the_signal_alone(rng):
    art = Artefacts(data_bar=DataBar(probability=1.0))
    p = art.sample(rng, (50, 50))
    sig = rng.random((50, 50)).astype(np.float32)
    assert art.apply_signal(sig, p).tobytes() == sig.tobytes()


# ------------------------------------------------------------------------------ determinism

def test_same_seed_same_params_and_bytes_any_threads(thread_runs):
    shape = (90, 110)
    a = ALL_ON.sample(np.random.default_rng(42), shape)
    b = ALL_ON.sample(np.random.default_rng(42), shape)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    sig = np.random.default_rng(0).random(shape).astype(np.float32)
    x = ALL_ON.apply_signal(sig, a)
    assert all(y.tobytes() == x.tobytes() for y in thread_runs(lambda: ALL_ON.apply_signal(sig, b)))
    c = ALL_ON.sample(np.random.default_rng(43), shape)
    assert json.dumps(a.to_dict()) != json.dumps(c.to_dict())


def test_switching_one_type_off_keeps_the_others():
    shape = (80, 80)
    a = ALL_ON.sample(np.random.default_rng(8), shape)
    no_scr = dataclasses.replace(ALL_ON, scratches=Scratches(probability=0.0))
    b = no_scr.sample(np.random.default_rng(8), shape)
    assert len(b.scratches) == 0 and len(a.scratches) > 0
    for name in ("pits", "dust", "contamination", "streaks"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes()
    assert a.data_bar == b.data_bar


def test_params_are_json_ready_and_read_only(rng):
    p = ALL_ON.sample(rng, (64, 64))
    d = json.loads(json.dumps(p.to_dict()))
    assert len(d["scratches"]["angle_rad"]) == len(p.scratches)
    assert d["data_bar"]["rows"] == p.data_bar.rows
    with pytest.raises(ValueError):
        p.scratches[0, 0] = 1.0


# ---------------------------------------------------------------------------------- bad input

def test_bad_input_raises(rng):
    with pytest.raises(ValueError):
        Scratches(probability=1.5)
    with pytest.raises(ValueError):
        Scratches(width_px=(2.0, 1.0))
    with pytest.raises(ValueError):
        Spots(strength=(0.2, 1.5))
    with pytest.raises(ValueError):
        ChargingStreaks(decay_px=(0.0, 5.0))
    with pytest.raises(ValueError):
        DataBar(height_frac=(0.1, 0.95))
    with pytest.raises(ValueError):
        ALL_ON.sample(rng, (0, 10))
    with pytest.raises(ValueError):
        Artefacts(data_bar=DataBar(probability=1.0)).sample(rng, (4, 10))
    p = ALL_ON.sample(rng, (32, 32))
    with pytest.raises(ValueError):
        ALL_ON.apply_signal(np.ones((32, 32), np.uint16), p)          # signal must be float
    with pytest.raises(ValueError):
        ALL_ON.apply_signal(np.ones((32, 31), np.float32), p)         # wrong shape
    with pytest.raises(ValueError):
        ALL_ON.apply_recorded(np.ones((32, 32), np.float32), p, 255)  # counts must be integer
    with pytest.raises(ValueError):
        ALL_ON.apply_recorded(np.ones((32, 32), np.uint8), p, 4095)   # beyond the dtype
    with pytest.raises(ValueError):
        ALL_ON.apply_recorded(np.ones((32, 32, 3, 1), np.uint8), p, 255)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts", ["all", "mult", "streaks"])
def test_fused_apply_signal_bitwise_equals_numpy_passes(thread_runs, dtype, parts):
    """The one-pass grey ``apply_signal`` gives the bits of ``astype(float64)``, ``*= factor``,
    ``+= offset``, ``astype(dtype)`` (the RGB path's passes), under 1 and 2 threads."""
    arts = ALL_ON
    if parts == "mult":
        arts = dataclasses.replace(ALL_ON, charging=ChargingStreaks(probability=0.0))
    elif parts == "streaks":
        arts = Artefacts(charging=ChargingStreaks(probability=1.0))
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        shape = (int(rng.integers(20, 120)), int(rng.integers(20, 140)))
        p = arts.sample(rng, shape)
        sig = (rng.random(shape) * 3.0).astype(dtype)
        ref = sig.astype(np.float64)
        if len(p.scratches) + len(p.pits) + len(p.dust) + len(p.contamination):
            ref *= arts.signal_factor(p)
        if len(p.streaks):
            ref += arts.signal_offset(p)
        ref = ref.astype(dtype)
        for got in thread_runs(lambda: arts.apply_signal(sig, p)):
            assert got.dtype == dtype and got.tobytes() == ref.tobytes()


def test_preview_stretch_ignores_the_data_bar(tmp_path):
    """The bar is drawn at fractions of the full count range; a generic-sem micrograph uses a
    few hundred counts of 65,535: `twin preview` stretches on the rows above the bar, so the
    micrograph is not shown black (it was)."""
    from twin.dataset import open_dataset
    from twin.generate import generate_dataset
    from twin.preview import _micrograph_rows, stretch

    recipe = tmp_path / "bar.yaml"
    recipe.write_text("name: bar\nsize: [96, 96]\nsamples: 2\nspecimens: 1\nseed: 1\n"
                      "artefacts: {data_bar: {enabled: true}}\n")
    out = generate_dataset(recipe, tmp_path / "bar.h5", workers=1, progress=False)
    with open_dataset(out) as ds:
        s = ds[0]
    rows = _micrograph_rows(s["params"], 96)
    assert rows is not None and 80 <= rows < 96
    plain = stretch(s["image"])[:rows]
    aware = stretch(s["image"], rows=rows)[:rows]
    assert plain.std() < 10 < aware.std()  # black before, a micrograph now
