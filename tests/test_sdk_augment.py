"""sdk.augment: the physics gate, alignment of image and labels, the instrument noise model.

Alignment is checked with coordinate images and masks: the image holds (y/H, x/W) as smooth
channels, the mask the integer id y*W + x + 1 of the same pixel, so after any geometric transform
the position decoded from the image and from the mask must agree to interpolation accuracy
(nearest neighbour vs bilinear: < 1 px) at every pixel.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

A = pytest.importorskip("albumentations")
cv2 = pytest.importorskip("cv2")

from sdk.augment import (  # noqa: E402
    ForbiddenTransform,
    NoiseModel,
    align_masks,
    Physics,
    PoissonGaussianNoise,
    build_pipeline,
    check_transform,
    iter_transforms,
)
from sdk.augment import _KNOWN, _SAFE_PIXEL, _INTENSITY, _COLOUR  # noqa: E402

S = 64

# albumentations' own advice (deprecated ShiftScaleRotate, slow PiecewiseAffine, Lambda pickling)
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*(special case of Affine|very slow|lambda is incompatible).*:UserWarning")


def coord_pair(size: int = S) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.dstack([yy / size, xx / size, np.full_like(yy, 0.5)]).astype(np.float32)
    mask = (yy * size + xx + 1).astype(np.int32)
    return image, mask


def decode_mask(mask: np.ndarray, size: int = S) -> tuple[np.ndarray, np.ndarray]:
    k = mask.astype(np.int64) - 1
    return k // size, k % size


# ------------------------------------------------------------------ the gate refuses, with reasons

REFUSED = [
    (dict(mirror=False), lambda: A.HorizontalFlip(), r"mirror=False: the structure is chiral"),
    (dict(mirror=False), lambda: A.VerticalFlip(), r"mirror=False"),
    (dict(mirror=False), lambda: A.SquareSymmetry(), r"mirror=False"),
    (dict(mirror=False), lambda: A.Transpose(), r"mirror=False"),
    (dict(polarity=True), lambda: A.VerticalFlip(), r"polarity=True: top and bottom differ"),
    (dict(polarity=True), lambda: A.RandomRotate90(), r"polarity=True"),
    (dict(polarity=True), lambda: A.Affine(rotate=(-10, 10)), r"polarity=True"),
    (dict(rotation="none"), lambda: A.RandomRotate90(), r"rotation='none': the orientation"),
    (dict(rotation="none"), lambda: A.Transpose(), r"rotation='none'"),
    (dict(rotation="90"), lambda: A.Rotate(limit=15), r"rotation='90': only quarter turns"),
    (dict(rotation="90"), lambda: A.ShiftScaleRotate(rotate_limit=10, scale_limit=0), r"rotation='90'"),
    (dict(metric=True), lambda: A.ElasticTransform(), r"metric=True: sizes and shapes are the answer"),
    (dict(metric=True), lambda: A.Affine(scale=(0.9, 1.1)), r"metric=True"),
    (dict(metric=True), lambda: A.Affine(shear=(-5, 5)), r"metric=True"),
    (dict(metric=True), lambda: A.GridDistortion(), r"metric=True"),
    (dict(metric=True), lambda: A.RandomResizedCrop(size=(32, 32)), r"metric=True"),
    (dict(metric=True, rotation="any"), lambda: A.SafeRotate(limit=20), r"metric=True"),
    (dict(metric=True), lambda: A.RandomGridShuffle(), r"seams"),
    (dict(intensity_calibrated=True), lambda: A.RandomBrightnessContrast(),
     r"intensity_calibrated=True: the label is read from calibrated intensity"),
    (dict(intensity_calibrated=True), lambda: A.RandomGamma(), r"intensity_calibrated=True"),
    (dict(intensity_calibrated=True), lambda: A.CLAHE(), r"intensity_calibrated=True"),
    (dict(intensity_calibrated=True), lambda: A.CoarseDropout(), r"intensity_calibrated=True"),
    (dict(intensity_calibrated=True), lambda: A.GaussNoise(mean_range=(0.1, 0.2)), r"intensity_calibrated"),
    (dict(orientation_colour=True), lambda: A.HueSaturationValue(), r"orientation_colour=True: colour encodes"),
    (dict(orientation_colour=True), lambda: A.ChannelShuffle(), r"orientation_colour=True"),
    (dict(orientation_colour=True), lambda: A.ToGray(), r"orientation_colour=True"),
    (dict(), lambda: A.GlassBlur(), r"moves image pixels without moving the labels"),
]


with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    REFUSED_IDS = [f"{type(m()).__name__}-{'-'.join(k for k in p) or 'default'}" for p, m, _ in REFUSED]


@pytest.mark.parametrize("physics, make, reason", REFUSED, ids=REFUSED_IDS)
def test_forbidden_transforms_are_refused_with_the_physical_reason(physics, make, reason):
    ph = Physics(**physics)
    with pytest.raises(ForbiddenTransform, match=reason):
        build_pipeline(ph, extra=[make()])
    # also when hidden inside a user's nested pipeline
    with pytest.raises(ForbiddenTransform, match=reason):
        check_transform(ph, A.Compose([A.NoOp(), A.OneOf([A.NoOp(), make()])]))
    # ... and accepted by physics that allow it (the refusal is due to the declared physics)
    if "moves image pixels" not in reason:
        check_transform(Physics(rotation="any"), make())


def test_allowed_variants_pass_the_gate():
    check_transform(Physics(metric=True), A.Affine(translate_px=(-4, 4), scale=1, rotate=0, shear=0))
    check_transform(Physics(rotation="90"), A.Rotate(limit=0))
    check_transform(Physics(intensity_calibrated=True), [A.GaussNoise(), A.GaussianBlur(), A.SquareSymmetry()])
    check_transform(Physics(polarity=True), A.HorizontalFlip())
    check_transform(Physics(metric=True), A.CropAndPad(px=4, keep_size=False))
    with pytest.raises(ForbiddenTransform, match="metric"):
        check_transform(Physics(metric=True), A.CropAndPad(px=4, keep_size=True))


def test_contradictory_physics_and_options():
    with pytest.raises(ForbiddenTransform, match="polarity=True, rotation='90'"):
        Physics(polarity=True, rotation="90")
    assert Physics(polarity=True).rotation == "none"
    assert Physics().rotation == "90"
    with pytest.raises(ValueError, match="rotation"):
        Physics(rotation="45")
    with pytest.raises(ForbiddenTransform, match=r"colour=True \(hue/saturation jitter\).*orientation_colour=True"):
        build_pipeline(Physics(orientation_colour=True), colour=True)
    assert any(type(t).__name__ == "HueSaturationValue" for t in iter_transforms(build_pipeline(colour=True)))
    with pytest.raises(ValueError, match="strength"):
        build_pipeline(strength="huge")
    assert list(iter_transforms(build_pipeline(strength="none"))) == []


def test_unknown_transforms_need_an_explicit_decision():
    class MyWarp(A.DualTransform):
        def apply(self, img, **params):
            return img

        def apply_to_mask(self, mask, **params):
            return mask

    class MyFilter(A.ImageOnlyTransform):
        def apply(self, img, **params):
            return img

    with pytest.raises(ForbiddenTransform, match="allow_unknown=True"):
        build_pipeline(Physics(), extra=MyWarp())
    build_pipeline(Physics(), extra=MyWarp(), allow_unknown=True)
    build_pipeline(Physics(), extra=MyFilter())  # image-only, no intensity/colour constraint
    with pytest.raises(ForbiddenTransform, match="calibrated intensities"):
        build_pipeline(Physics(intensity_calibrated=True), extra=MyFilter())
    with pytest.raises(ForbiddenTransform, match="allow_unknown"):
        check_transform(Physics(), A.Lambda(image=lambda x, **k: x, mask=lambda m, **k: m))


# ------------------------------------------------------------------ built pipelines, empirically


def all_physics():
    for mirror, rotation, polarity, metric in itertools.product(
            (True, False), ("none", "90", "any"), (False, True), (False, True)):
        if polarity and rotation != "none":
            continue
        yield Physics(mirror=mirror, rotation=rotation, polarity=polarity, metric=metric)


def linear_map(mask: np.ndarray) -> np.ndarray:
    """2x2 matrix of output (y', x') against source (y, x) near the centre (no borders there)."""
    yy, xx = np.mgrid[0:S, 0:S]
    c = (S - 1) / 2
    inner = ((yy - c) ** 2 + (xx - c) ** 2 < (0.22 * S) ** 2) & (mask > 0)
    sy, sx = decode_mask(mask[inner])
    src = np.column_stack([sy, sx, np.ones_like(sy)]).astype(float)
    dst = np.column_stack([yy[inner], xx[inner]]).astype(float)
    coef, *_ = np.linalg.lstsq(src, dst, rcond=None)
    return coef[:2].T  # dst = M @ src + b


@pytest.mark.parametrize("physics", list(all_physics()), ids=repr)
def test_built_pipeline_only_makes_allowed_geometry(physics):
    pipe = build_pipeline(physics, strength="strong", seed=7)
    check_transform(physics, pipe)
    image, mask = coord_pair()
    dets, angles, scales, flipped_y = [], [], [], []
    for _ in range(40):
        out = pipe(image=image, mask=mask)
        m = linear_map(out["mask"])
        det = np.linalg.det(m)
        dets.append(np.sign(det))
        scales.append(np.sqrt(abs(det)))
        angles.append(np.degrees(np.arctan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])))
        flipped_y.append(m[0, 0] < 0 or abs(m[0, 1]) > 0.2)
    dets, angles, scales = np.array(dets), np.array(angles), np.array(scales)
    if not physics.mirror:
        assert (dets > 0).all()
    else:
        assert (dets < 0).any()  # reflections are used when allowed
    if physics.metric:
        np.testing.assert_allclose(scales, 1.0, atol=0.03)
    elif physics.rotation != "none":
        assert scales.std() > 0.01  # scale jitter is used when allowed
    proper = angles[dets > 0]
    off_grid = np.abs(((proper + 45) % 90) - 45) > 3
    if physics.rotation == "none":
        assert (np.abs(((angles + 180) % 360) - 180)[dets > 0] < 3).all()  # no rotation at all
    elif physics.rotation == "90":
        assert not off_grid.any()
    else:
        assert off_grid.any()
    if physics.polarity:
        assert not any(flipped_y)


def _p1(t):
    t.p = 1.0
    return t


with warnings.catch_warnings():  # built at collection: albumentations' deprecation/speed advice
    warnings.simplefilter("ignore", UserWarning)
    ALLOWED_GEOMETRY = [
        A.HorizontalFlip(), A.VerticalFlip(), A.Transpose(), A.RandomRotate90(), A.SquareSymmetry(),
        A.Rotate(limit=(-180, 180), border_mode=cv2.BORDER_REFLECT_101),
        A.Rotate(limit=(-180, 180), border_mode=cv2.BORDER_CONSTANT),
        A.SafeRotate(limit=(-60, 60)),
        A.Affine(scale=(0.7, 1.4), rotate=(-30, 30), shear=(-10, 10), translate_percent=(-0.1, 0.1)),
        A.ShiftScaleRotate(),
        A.ElasticTransform(alpha=40, sigma=6), A.GridDistortion(), A.OpticalDistortion(),
        A.Perspective(), A.PiecewiseAffine(nb_rows=3, nb_cols=3), A.ThinPlateSpline(),
        A.RandomResizedCrop(size=(S, S)), A.RandomCrop(40, 40), A.CenterCrop(40, 40),
        A.CropAndPad(px=(-6, 6)), A.RandomScale(), A.Resize(50, 70),
    ]


@pytest.mark.parametrize("transform", ALLOWED_GEOMETRY, ids=lambda t: type(t).__name__)
def test_image_and_mask_stay_aligned(transform):
    pipe = build_pipeline(Physics(rotation="any"), strength="none", extra=[_p1(transform)])
    _check_alignment(pipe.transforms[0])


def test_resizing_transforms_get_centred_nearest_labels():
    # albumentations' default nearest resize of masks is off by up to a source pixel ...
    with pytest.raises(AssertionError, match="misaligned"):
        _check_alignment(A.Resize(50, 70))
    # ... which align_masks (applied by build_pipeline to extra transforms) corrects
    # (and the check itself sees a transform that moves image pixels without the labels)
    with pytest.raises(AssertionError, match="misaligned"):
        _check_alignment(A.GlassBlur(sigma=0.1, max_delta=2, iterations=1, p=1.0))
    t = align_masks(A.Resize(50, 70))
    assert t.mask_interpolation == cv2.INTER_NEAREST_EXACT
    _check_alignment(t)


def _check_alignment(transform, draws: int = 4) -> None:
    image, mask = coord_pair()
    pipe = A.Compose([transform], seed=3)
    for _ in range(draws):
        out = pipe(image=image, mask=mask)
        img, m = out["image"], out["mask"]
        assert img.shape[:2] == m.shape
        valid = m > 0
        filled = (img[..., 2] < 0.49)  # constant fill (image 0) or blended with it
        from scipy import ndimage

        ok = valid & ~ndimage.binary_dilation(filled | ~valid, iterations=2)
        assert ok.mean() > 0.3
        my, mx = decode_mask(m[ok], S)
        iy, ix = img[..., 0][ok] * S, img[..., 1][ok] * S
        # The image samples the linear coordinate ramp at the exact source position; a nearest
        # label is the source pixel nearest to that position: at most half a pixel per axis.
        err = np.maximum(np.abs(iy - my), np.abs(ix - mx))
        assert np.percentile(err, 99) < 0.55 and err.max() < 1.01, (
            f"{type(transform).__name__}: image and mask misaligned by up to {err.max():.2f} px")


@pytest.mark.parametrize("physics", [Physics(), Physics(rotation="any"), Physics(mirror=False, rotation="any"),
                                     Physics(polarity=True)], ids=repr)
def test_every_step_of_built_pipelines_keeps_alignment(physics):
    pipe = build_pipeline(physics, strength="strong")
    for t in iter_transforms(pipe):
        name = type(t).__name__
        if isinstance(t, A.DualTransform):
            _check_alignment(_p1(t), draws=2)
        else:  # pixel-level steps must not move pixels: they are all on the known list
            assert name in _SAFE_PIXEL or name in _INTENSITY or name in _COLOUR, name
            assert name != "GlassBlur"


def test_intensity_calibrated_pipeline_keeps_the_mean():
    pipe = build_pipeline(Physics(intensity_calibrated=True), strength="strong", seed=1,
                          noise_model=NoiseModel(dose_range=(2000, 4000)))
    flat = np.full((S, S), 0.5, np.float32)
    means = [pipe(image=flat, mask=np.zeros((S, S), np.int32))["image"].mean() for _ in range(30)]
    np.testing.assert_allclose(means, 0.5, atol=0.01)
    free = build_pipeline(Physics(), strength="strong", seed=1)
    means = [free(image=flat, mask=np.zeros((S, S), np.int32))["image"].mean() for _ in range(30)]
    assert np.ptp(means) > 0.05  # without the calibration, brightness jitter is used


def test_pipeline_seed_is_reproducible():
    image, mask = coord_pair()
    a = build_pipeline(Physics(rotation="any"), seed=5)
    b = build_pipeline(Physics(rotation="any"), seed=5)
    for _ in range(3):
        oa, ob = a(image=image, mask=mask), b(image=image, mask=mask)
        np.testing.assert_array_equal(oa["image"], ob["image"])
        np.testing.assert_array_equal(oa["mask"], ob["mask"])


# ------------------------------------------------------------------ instrument noise model


def test_poisson_gaussian_moments_match_the_detector_model():
    g, sr, off, dose = 4.0, 6.0, 200.0, 100.0
    t = PoissonGaussianNoise(gain=g, readout_sigma=sr, offset=off, bit_depth=16,
                             dose_range=(dose, dose), p=1.0)
    pipe = A.Compose([t], seed=0)
    for s in (0.1, 0.5, 0.9):
        out = pipe(image=np.full((256, 256), s, np.float32))["image"]
        assert out.dtype == np.float32
        var = (g * g * dose * s + sr * sr + 1 / 12) / (g * dose) ** 2
        assert abs(out.mean() - s) < 4 * np.sqrt(var / out.size)
        assert abs(out.var() / var - 1) < 0.03
    # the same moments as the instrument twin's own detector (generators.detector)
    detector = pytest.importorskip("generators.detector")
    counts = detector.detect(np.full((256, 256), 0.5), dose=dose, gain=g, readout_sigma=sr,
                             offset=off, bit_depth=16, noise_key=11)
    twin = (counts.astype(np.float64) - off) / (g * dose)
    ours = pipe(image=np.full((256, 256), 0.5, np.float32))["image"]
    assert abs(twin.var() / ours.var() - 1) < 0.04
    assert abs(twin.mean() - ours.mean()) < 0.003


def test_poisson_gaussian_draws_dose_and_handles_uint8():
    t = PoissonGaussianNoise(dose_range=(10, 1000), p=1.0)
    t.set_random_seed(0)
    doses = [t.get_params()["dose"] for _ in range(2000)]
    assert 10 <= min(doses) and max(doses) <= 1000
    assert np.median(doses) == pytest.approx(100, rel=0.15)  # log-uniform: median = geometric mean
    u8 = A.Compose([t], seed=1)(image=np.full((32, 32, 3), 128, np.uint8))["image"]
    assert u8.dtype == np.uint8 and 100 < u8.mean() < 156 and u8.std() > 1
    with pytest.raises(ValueError):
        PoissonGaussianNoise(dose_range=(0, 10))
    with pytest.raises(ValueError):
        PoissonGaussianNoise(gain=-1)


def test_noise_model_from_profiles(tmp_path):
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "twin" / "instruments" / "generic-sem.yaml"
    expect = dict(gain=4.0, readout_sigma=6.0, offset=200.0, bit_depth=16, psf_sigma_px=(0.6, 1.2))
    for ref in ("generic-sem", str(shipped)):
        m = NoiseModel.from_profile(ref)
        assert {k: getattr(m, k) for k in expect} == expect
    m = NoiseModel.from_profile({"gain": 2.0, "readout_sigma": 1.0, "offset": 0, "bit_depth": 12, "dose": [5, 50]})
    assert (m.gain, m.bit_depth, m.dose_range) == (2.0, 12, (5.0, 50.0))
    m = NoiseModel.from_profile({"detector": {"gain": 3.0}, "optics": {"psf_sigma_px": 0.8}}, dose_range=30)
    assert (m.gain, m.psf_sigma_px, m.dose_range) == (3.0, (0.8, 0.8), (30.0, 30.0))
    with pytest.raises(ValueError, match="unknown instrument"):
        NoiseModel.from_profile("no-such-microscope")
    with pytest.raises(ValueError, match="detector"):
        NoiseModel.from_profile({"optics": {}})
    pipe = build_pipeline(Physics(), noise_model="generic-sem", strength="medium")
    noise = [t for t in iter_transforms(pipe) if isinstance(t, PoissonGaussianNoise)]
    blur = [t for t in iter_transforms(pipe) if type(t).__name__ == "GaussianBlur"]
    assert len(noise) == 1 and noise[0].gain == 4.0 and noise[0].readout_sigma == 6.0
    assert len(blur) == 1 and tuple(blur[0].sigma_limit) == (0.6, 1.2)


def test_noise_model_from_a_dataset(tmp_path):
    from pathlib import Path

    from twin.dataset import DatasetWriter, LabelSpec

    inst = (Path(__file__).resolve().parents[1] / "twin" / "instruments" / "generic-sem.yaml").read_text()
    path = tmp_path / "d.h5"
    with DatasetWriter(path, n_samples=1, image_shape=(8, 8), image_dtype="uint16",
                       labels={"boundary": LabelSpec("uint8", "boundary")}, compression="none",
                       attrs={"instrument": inst,
                              "recipe": "detector: {dose: [50, 200]}\noptics: {psf_sigma_px: [0.7, 0.9]}\n"}) as w:
        w.write(0, np.zeros((8, 8), np.uint16), {"boundary": np.zeros((8, 8), np.uint8)},
                specimen_id=0, index=0, params={})
    m = NoiseModel.from_dataset(path)
    assert (m.gain, m.readout_sigma, m.dose_range, m.psf_sigma_px) == (4.0, 6.0, (50.0, 200.0), (0.7, 0.9))
    noise = [t for t in iter_transforms(build_pipeline(noise_model=str(path), strength="strong"))
             if isinstance(t, PoissonGaussianNoise)][0]
    assert noise.dose_range == (12.5, 200.0)  # strong: down to a quarter of the lowest dose


def test_known_table_names_exist_in_albumentations():
    # a typo in the gate's tables would silently let a transform through as "unknown"
    missing = sorted(n for n in _KNOWN - {"PoissonGaussianNoise"} if not hasattr(A, n))
    assert not missing, missing
