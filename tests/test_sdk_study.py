"""sdk.study: study files, classical baselines against known geometry, a grouped mini study."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdk.study import (StudyError, classical_boundary, classical_particles, grid_boundary, load_study,
                       parse_study, quick, run_study, score)

ROOT = Path(__file__).resolve().parents[1]
TBM = ROOT.parent / "shared" / "data" / "real" / "tbm-grains"

BASE = """name: t
task: boundary
real: {root: real, channels: 3}
"""


def test_study_file_errors_name_the_problem():
    with pytest.raises(StudyError, match="unknown condition"):
        parse_study(BASE + "conditions: [classical, magic]\n")
    with pytest.raises(StudyError, match="need a 'synthetic' section"):
        parse_study(BASE + "conditions: [classical, finetune]\n")
    with pytest.raises(StudyError, match="unknown key 'budget.minutes'"):
        parse_study(BASE + "budget: {minutes: 3}\n")
    with pytest.raises(StudyError, match="grid"):
        parse_study(BASE.replace("boundary", "particle") + "conditions: [grid]\n")
    with pytest.raises(StudyError, match="malformed YAML"):
        parse_study("name: [\n")


@pytest.mark.parametrize("name", ["tbm_grains.yaml", "tbm_grains_ablation.yaml", "tbm_grains_active.yaml",
                                  "tbm_grains_zero_label.yaml",
                                  "bf_tem_nanoparticles.yaml"])
def test_shipped_studies_validate(name):
    spec, base = load_study(ROOT / "recipes" / "studies" / name)
    assert (base / spec.real.root).resolve().is_dir()
    q = quick(spec)
    assert q.folds == 2 and q.budget.total_minutes <= 5


def _voronoi_rgb(rng, n=256, seeds=30):
    """An RGB image of flat-coloured Voronoi cells and its exact 1-px boundary map."""
    pts = rng.uniform(0, n, (seeds, 2))
    yy, xx = np.mgrid[0:n, 0:n]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    lab = d.argmin(-1)
    col = rng.uniform(40, 215, (seeds, 3))
    img = col[lab].astype(np.uint8)
    b = np.zeros((n, n), bool)
    b[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    b[1:, :] |= lab[1:, :] != lab[:-1, :]
    return img, b, lab


def test_canny_on_lab_finds_colour_boundaries():
    img, b, _ = _voronoi_rgb(np.random.default_rng(0))
    pred = classical_boundary(img, sigma=1.0, low=0.6, high=0.85, radius=1)
    assert score(pred, b, "boundary", 2)["boundary_f1"] > 0.85
    # an image-blind grid on the same truth scores far lower
    assert score(grid_boundary(b.shape, 24, 1), b, "boundary", 2)["boundary_f1"] < 0.5


def test_otsu_particles_recovers_dark_discs():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:128, 0:128]
    mask = np.zeros((128, 128), bool)
    for cy, cx, r in ((30, 30, 12), (80, 90, 18), (100, 30, 9)):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img = np.where(mask, 60.0, 180.0) + rng.normal(0, 25, mask.shape)
    pred = classical_particles(img, sigma=2.0, dark=True)
    assert score(pred, mask, "particle", 2)["iou"] > 0.9
    assert score(classical_particles(img, sigma=2.0, dark=False), mask, "particle", 2)["iou"] < 0.2


def _real_folder(tmp: Path, n_groups=4, per_group=2) -> Path:
    rng = np.random.default_rng(5)
    (tmp / "real" / "images").mkdir(parents=True)
    (tmp / "real" / "masks").mkdir(parents=True)
    for g in range(n_groups):
        for c in range(per_group):
            img, b, _ = _voronoi_rgb(rng, 64, 8)
            Image.fromarray(img).save(tmp / "real" / "images" / f"{g}-{c}.png")
            Image.fromarray((b * 255).astype(np.uint8)).save(tmp / "real" / "masks" / f"{g}-{c}.png")
    return tmp / "real"


def test_mini_study_is_grouped_and_writes_tables(tmp_path):
    _real_folder(tmp_path)
    spec = parse_study(BASE + """folds: 2
k: [2]
conditions: [classical, grid, scratch]
model: {depth: 2, width: 4, crop: 32, batch_size: 2, steps_per_epoch: 2}
budget: {model_minutes: 0.05, max_epochs: 2, total_minutes: 2}
""")
    res = run_study(spec, tmp_path, tmp_path / "out", log=lambda m: None)
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert {r["condition"] for r in rows} == {"classical", "grid", "scratch"}
    assert {r["fold"] for r in rows} == {"0", "1"}
    # each fold tests on 2 of the 4 micrographs (4 images); the classical detector is near-perfect here
    assert all(int(r["n_test"]) == 4 for r in rows)
    classical = [float(r["boundary_f1"]) for r in rows if r["condition"] == "classical"]
    assert min(classical) > 0.7
    assert (tmp_path / "out" / "metric_vs_k.png").stat().st_size > 1000
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| classical | 0 |" in md and "| scratch | 2 |" in md
    assert res["summary"] and not res["skipped"]


@pytest.mark.slow
@pytest.mark.skipif(not TBM.is_dir(), reason="needs ../shared/data/real/tbm-grains")
def test_quick_tbm_study_cli(tmp_path):
    from twin.cli import main

    assert main(["study", str(ROOT / "recipes" / "studies" / "tbm_grains.yaml"), "--quick", "-o",
                 str(tmp_path / "s"), "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    cl = [float(r["boundary_f1"]) for r in rows if r["condition"] == "classical"]
    assert cl and min(cl) > 0.5  # the tuned Canny baseline on real crops (measured ~0.65)


def test_ablation_condition_tables_every_variant(tmp_path):
    """The ablation condition runs `twin ablate` and reports a Δ per switched-off feature."""
    _real_folder(tmp_path)
    (tmp_path / "r.yaml").write_text(
        "name: tiny\nsize: [48, 48]\nsamples: 4\nspecimens: 2\nseed: 3\n"
        "specimen:\n  grains_per_field: [6, 10]\n  features:\n"
        "    twins: {enabled: true, probability: 0.5, spacing_px: [10, 20], width_px: [3, 6]}\n"
        "    gradients: {enabled: true}\n")
    spec = parse_study(BASE + """synthetic: {recipe: r.yaml, samples: 4, ablation_samples: 4}
folds: 2
k: [2]
conditions: [ablation]
model: {depth: 2, width: 4, crop: 32, batch_size: 2, steps_per_epoch: 1}
budget: {pretrain_minutes: 0.01, model_minutes: 0.01, max_epochs: 1, total_minutes: 3}
""")
    res = run_study(spec, tmp_path, tmp_path / "out", log=lambda m: None)
    variants = {r["variant"] for r in res["rows"]}
    assert variants == {"all_on", "all_off", "no_twins", "no_gradients"}
    assert {r["k"] for r in res["rows"]} == {0, 2}
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "Δ vs all on" in md and "| no_twins | 0 |" in md
    # only the variants are pretrained (no separate model on the main recipe)
    assert sorted(p.name for p in (tmp_path / "out" / "models").glob("*.pt")) == [
        "ablate-all_off.pt", "ablate-all_on.pt", "ablate-no_gradients.pt", "ablate-no_twins.pt"]


def test_active_condition_compares_with_random_from_one_seed_batch(tmp_path):
    _real_folder(tmp_path, n_groups=4, per_group=3)
    (tmp_path / "r.yaml").write_text("name: tiny\nsize: [48, 48]\nsamples: 4\nspecimens: 2\nseed: 3\n"
                                     "specimen: {grains_per_field: [6, 10]}\n")
    spec = parse_study(BASE + """synthetic: {recipe: r.yaml, samples: 4}
folds: 2
k: [4]
conditions: [active]
model: {depth: 2, width: 4, crop: 32, batch_size: 2, steps_per_epoch: 1}
budget: {pretrain_minutes: 0.01, model_minutes: 0.01, max_epochs: 1, total_minutes: 3}
""")
    res = run_study(spec, tmp_path, tmp_path / "out", log=lambda m: None)
    rows = [r for r in res["rows"] if r["condition"] == "active"]
    assert {r["variant"] for r in rows} == {"entropy+kcentre", "random"}
    for fold in (0, 1):
        for v in ("entropy+kcentre", "random"):
            ks = [r["k"] for r in rows if r["fold"] == fold and r["variant"] == v]
            assert ks == [2, 4]
    # the seed round is the same random batch for both strategies: identical first scores
    first = {(r["fold"], r["variant"]): r["boundary_f1"] for r in rows if r["k"] == 2}
    assert first[(0, "random")] == first[(0, "entropy+kcentre")]


def test_synthetic_threshold_tunes_the_cut_on_dev_labels_only(tmp_path):
    """A 'model' that draws every particle 3 px too fat: the dev-tuned cut shrinks it back."""
    import torch
    from scipy import ndimage

    from sdk import study

    rng = np.random.default_rng(3)
    ys, xs = [], []
    for _ in range(6):
        y = np.zeros((64, 64), bool)
        for cy, cx in rng.uniform(12, 52, size=(3, 2)):
            yy, xx = np.mgrid[:64, :64]
            y |= (yy - cy) ** 2 + (xx - cx) ** 2 < 7 ** 2
        ys.append(y)
        # input = signed distance to the particle edge, px (> 0 inside)
        sd = ndimage.distance_transform_edt(y) - ndimage.distance_transform_edt(~y)
        xs.append(sd[None].astype(np.float32))

    class Fat(torch.nn.Module):
        def forward(self, x):  # p = sigmoid(sd + 3): p = 0.5 three px outside every particle
            return torch.cat([torch.zeros_like(x), x + 3.0], 1)

    spec = parse_study("name: t\ntask: particle\nreal: {root: real, channels: 1}\n"
                       "conditions: [classical]\n")
    real = study._Real(names=[str(i) for i in range(6)], groups=[str(i) for i in range(6)], raw=[],
                       x=xs, y=ys)
    ctx = study._Ctx(spec=spec, base=tmp_path, out=tmp_path, real=real, log=lambda m: None)
    dev, test = np.arange(4), np.arange(4, 6)
    study._run_threshold(ctx, 0, dev, test, Fat())
    row = ctx.rows[-1]
    best = float(row["variant"].split("=")[1])
    assert best >= 0.9                     # sigmoid(3 - d) >= 0.9 cuts ~1 px outside the edge instead of 3
    plain = np.mean([score(study._probability(Fat(), xs[i]) > 0.5, ys[i], "particle", 2)["iou"] for i in test])
    assert row["iou"] > plain + 0.1
    # the cut came from dev labels: corrupting the test labels does not change it
    ctx.real.y[4] = ~ctx.real.y[4]
    study._run_threshold(ctx, 0, dev, test, Fat())
    assert ctx.rows[-1]["variant"] == row["variant"]


def test_study_tta_predicts_the_dihedral_mean():
    import torch

    from sdk import study
    from sdk.trainer import predict_tiled

    spec = parse_study(BASE + "conditions: [scratch]\nmodel: {tta: true}\n")
    assert spec.model.tta and not parse_study(BASE + "conditions: [scratch]\n").model.tta
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    x = np.random.default_rng(0).normal(size=(3, 24, 32)).astype(np.float32)
    pred = study._predict(conv, x, tta=True)
    np.testing.assert_array_equal(pred, predict_tiled(conv, x, tta=True)[1] > 0.5)
    rot = np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_array_equal(study._predict(conv, rot, tta=True), np.rot90(pred, 1))
    # without TTA the asymmetric kernel's prediction is not rotation-invariant
    assert (study._predict(conv, rot) != np.rot90(study._predict(conv, x), 1)).any()


def test_threshold_rule_tunes_each_trained_model_on_its_own_crops(tmp_path, monkeypatch):
    with pytest.raises(StudyError, match="grain_size"):
        parse_study(BASE.replace("boundary", "particle") + "conditions: [scratch]\nmodel: {threshold: grain_size}\n")
    assert parse_study(BASE + "conditions: [scratch]\n").model.threshold == "argmax"
    _real_folder(tmp_path)
    from sdk import study
    from sdk import threshold as thr

    seen: list[int] = []
    real_tune = thr.tune_threshold

    def spy(probs, masks, **kw):
        seen.append(len(probs))
        assert kw["objective"] == "grain_size"
        return real_tune(probs, masks, **kw)

    monkeypatch.setattr(thr, "tune_threshold", spy)
    spec = parse_study(BASE + """folds: 2
k: [2]
conditions: [classical, scratch]
model: {depth: 2, width: 4, crop: 32, batch_size: 2, steps_per_epoch: 2, threshold: grain_size}
budget: {model_minutes: 0.05, max_epochs: 2, total_minutes: 2}
""")
    run_study(spec, tmp_path, tmp_path / "out", log=lambda m: None)
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    # tuned on the 2 training crops of each fold's scratch model, never for the zero-label rows
    assert seen == [2, 2]
    tuned = [r for r in rows if r["condition"] == "scratch"]
    assert len(tuned) == 2 and all(0 < float(r["threshold"]) < 1 for r in tuned)
    assert all(r["threshold"] == "" for r in rows if r["condition"] == "classical")
    assert study.ModelSpec().threshold == "argmax"
