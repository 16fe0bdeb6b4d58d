"""STEM HAADF via abTEM: equality with a direct abTEM scan, scan distortion, exact labels."""

import numpy as np

from generators.scan import ScanParams, scan_coordinates
from generators.tem.atoms import rasterize_footprints
from twin.instrument import parse_instrument
from twin.pipeline_tem import AtomicTEMPipeline
from twin.recipe import parse_recipe

from tests.test_tem_atomic import _distance_to_hull_brute

RECIPE = """
name: stem-tiny
size: [12, 12]
pixel_size: {value: 0.8, unit: Å}
instrument: generic-stem-haadf
samples: 2
specimens: 1
seed: 7
specimen:
  kind: atomic-nanoparticles
  element: Pt
  diameter_nm: [0.5, 0.6]
  particles_per_field: [1, 1]
  support: {thickness_nm: [0.3, 0.3]}
imaging:
  mode: stem-haadf
  voltage_kv: 200
  sampling_a: 0.1
  stem: {semiangle_mrad: 20, inner_mrad: 40, outer_mrad: 60}
detector: {dose_e_per_a2: [100, 100]}
"""

INSTRUMENT = """
name: stem-test
kind: stem
detector: {gain: 20.0, readout_sigma: 1.0, offset: 1000.0, bit_depth: 16}
scan: {drift_px: %s, line_jitter_px: %s}
"""


def make_pipe(drift=0.0, jitter=0.0, text=RECIPE):
    r = parse_recipe(text)
    return AtomicTEMPipeline(r, parse_instrument(INSTRUMENT % (drift, jitter)))


def _direct(atoms, positions, pipe):
    import abtem

    st = pipe.stem
    pot = abtem.Potential(atoms, sampling=0.1, slice_thickness=2.0, projection="infinite",
                          parametrization="lobato")
    probe = abtem.Probe(energy=200e3, semiangle_cutoff=20.0, defocus=0.0, Cs=0.0)
    det = abtem.AnnularDetector(inner=40.0, outer=60.0)
    assert (st.inner_mrad, st.outer_mrad, st.semiangle_mrad) == (40.0, 60.0, 20.0)
    return probe, pot, det


def test_undistorted_scan_equals_abtem_grid_scan():
    import abtem

    pipe = make_pipe()
    signal, labels, geo, params, _ = pipe.render(0)
    atoms = pipe.specimen_of(0).atoms.to_ase()
    probe, pot, det = _direct(atoms, None, pipe)
    scan = abtem.GridScan(start=(0, 0), end=(12 * 0.8, 12 * 0.8), gpts=(12, 12), endpoint=False)
    direct = np.asarray(probe.scan(pot, scan=scan, detectors=det).compute().array).T  # (y, x)
    np.testing.assert_allclose(signal, direct, rtol=1e-4, atol=1e-6)
    assert signal.max() > 5 * np.median(signal)  # the particle scatters to the HAADF


def test_distorted_scan_probe_and_labels_at_the_same_positions():
    import abtem

    pipe = make_pipe(drift=2.0, jitter=0.5)
    signal, labels, geo, params, _ = pipe.render(1)
    sp = params["scan"]
    sp_obj = ScanParams(offset=tuple(sp["offset_px"]), drift=tuple(sp["drift_px_per_frame"]),
                        line_jitter=np.array(sp["line_jitter_px"]))
    X, Y = scan_coordinates((12, 12), sp_obj)
    assert np.abs(X - np.arange(12)[None, :]).max() > 0.3  # the frame is distorted
    x_a, y_a = np.mod(X * 0.8, 9.6), np.mod(Y * 0.8, 9.6)
    spec = pipe.specimen_of(0)
    probe, pot, det = _direct(spec.atoms.to_ase(), None, pipe)
    pos = np.stack([x_a, y_a], -1).reshape(-1, 2)
    direct = np.asarray(probe.scan(pot, scan=abtem.CustomScan(pos), detectors=det)
                        .compute().array).reshape(12, 12)
    np.testing.assert_allclose(signal, direct, rtol=1e-4, atol=1e-6)
    assert np.array_equal(labels["instance"], rasterize_footprints(spec.footprints, x_a, y_a))
    # and by brute force: within radius_a (1.4 Å) of the particle's projected convex hull
    d = _distance_to_hull_brute(x_a, y_a, spec.atoms.particle_xy(1))
    sure = np.abs(d - 1.4) > 1e-3
    assert np.array_equal(labels["particle"][sure], (d <= 1.4)[sure].astype(np.uint8))
    assert labels["particle"].sum() > 0


def test_stem_image_counts():
    pipe = make_pipe()
    s = pipe.generate(0)
    signal, *_ = pipe.render(0)
    assert s.image.dtype == np.uint16 and s.image.shape == (12, 12)
    e = (s.image.astype(float) - 1000.0) / 20.0
    dose_px = 100 * 0.8 ** 2
    expect = dose_px * signal.mean()
    assert abs(e.mean() - expect) < 5 * np.sqrt(expect / 144) + 0.1
