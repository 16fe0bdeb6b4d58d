"""sdk.trainer: the loop, early stopping, time budget, checkpoints, logs, tiled prediction."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sdk.models import UNet, build_model, load_checkpoint  # noqa: E402
from sdk.trainer import (  # noqa: E402
    TrainConfig,
    TrainError,
    Trainer,
    evaluate_segmentation,
    plot_log,
    predict_tiled,
    seeded_build,
    select_device,
)


def _toy(n=16, size=24, seed=0):
    """Segment pixels brighter than a smooth background: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    x = nn.functional.avg_pool2d(x, 3, 1, 1) * 3
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0.5).long())


def _unet(seed=0):
    return seeded_build(lambda: UNet(1, 2, depth=2, width=4), seed)


def _cfg(**kw):
    base = dict(epochs=3, batch_size=4, progress=False, boundary_class=1)
    base.update(kw)
    return TrainConfig(**base)


def test_training_learns_a_toy_segmentation(tmp_path):
    train, val = _toy(32, seed=0), _toy(8, seed=1)
    net = _unet()
    before = evaluate_segmentation(net, val, boundary_class=1)
    hist = Trainer(net, train, val, _cfg(epochs=8, lr=1e-2, out_dir=str(tmp_path / "log"),
                                         checkpoint=str(tmp_path / "m.pt"))).fit()
    after = evaluate_segmentation(net, val, boundary_class=1)
    assert hist.rows[-1]["train_loss"] < hist.rows[0]["train_loss"]
    assert after["iou"] > 0.6 > before["iou"] + 0.2
    assert hist.monitor == "val_boundary_f1" and hist.stopped == "epochs done"
    best = max(r["val_boundary_f1"] for r in hist.rows)
    assert hist.best_value == pytest.approx(best)
    # the model ends with the best weights, and the checkpoint holds them with the log
    model, meta = load_checkpoint(tmp_path / "m.pt")
    assert evaluate_segmentation(model, val, boundary_class=1)["boundary_f1"] == pytest.approx(best, abs=1e-6)
    assert [r["epoch"] for r in meta["log"]] == list(range(1, 9))
    assert meta["train"]["best_epoch"] == hist.best_epoch
    # logs: CSV with one row per epoch, JSON, and the plot
    lines = (tmp_path / "log" / "log.csv").read_text().strip().splitlines()
    assert len(lines) == 9 and "val_boundary_f1" in lines[0]
    assert len(json.loads((tmp_path / "log" / "log.json").read_text())) == 8
    assert (tmp_path / "log" / "curves.png").stat().st_size > 1000


def test_early_stopping_on_the_monitored_metric():
    # monitoring val_loss as if larger were better: it improves only in epoch 1, so training
    # must stop after `patience` more epochs
    hist = Trainer(_unet(), _toy(16), _toy(8, seed=1),
                   _cfg(epochs=20, lr=1e-2, monitor="val_loss", mode="max", patience=2)).fit()
    assert len(hist.rows) == 3 and hist.best_epoch == 1
    assert hist.stopped.startswith("early stopping")


class _Slow(torch.utils.data.Dataset):
    def __init__(self, base, delay):
        self.base, self.delay = base, delay

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.base[i]


def test_time_budget_is_respected(tmp_path):
    budget_s = 2.5  # one epoch of this slow data would take 64 * 0.05 = 3.2 s
    t0 = time.monotonic()
    hist = Trainer(_unet(), _Slow(_toy(64), 0.05), _toy(4, seed=1),
                   _cfg(epochs=50, max_minutes=budget_s / 60, checkpoint=str(tmp_path / "m.pt"))).fit()
    took = time.monotonic() - t0
    assert hist.stopped == "time budget"
    assert took < budget_s + 3.0  # loose: a loaded CPU slows validation; the partial epoch below is the proof
    assert len(hist.rows) == 1 and 0 < hist.images_seen < 64  # a partial epoch, validated and saved
    assert (tmp_path / "m.pt").exists()
    with pytest.raises(TrainError, match="time budget"):
        Trainer(_unet(), _Slow(_toy(8), 0.05), config=_cfg(max_minutes=1e-4)).fit()


def test_seeded_runs_are_reproducible_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()

    def run(seed):
        net = _unet(seed)
        Trainer(net, _toy(16), config=_cfg(epochs=2, seed=seed, boundary_class=None)).fit()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())


def test_steps_per_epoch_draws_with_replacement_from_small_data():
    hist = Trainer(_unet(), _toy(3), config=_cfg(epochs=2, steps_per_epoch=5, batch_size=2,
                                                   boundary_class=None)).fit()
    assert [r["images"] for r in hist.rows] == [10, 20]


def test_classification_task_and_cpu_bfloat16_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 12, 12, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    x = x + (y.float() * 2 - 1)[:, None, None, None]  # separable classes
    data = torch.utils.data.TensorDataset(x, y)
    net = seeded_build(lambda: build_model({"arch": "classifier", "num_classes": 2,
                                            "encoder": {"source": "conv", "depth": 2, "width": 4}}), 0)
    hist = Trainer(net, data, data, TrainConfig(task="classification", epochs=4, lr=1e-2, batch_size=16,
                                                progress=False, amp="on")).fit()
    assert hist.monitor == "val_accuracy" and hist.best_value > 0.9
    assert "train_accuracy" in hist.rows[0]


def test_bad_settings_and_devices_are_refused():
    with pytest.raises(TrainError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(TrainError, match="loss"):
        TrainConfig(loss="focal")
    with pytest.raises(TrainError, match="empty"):
        Trainer(_unet(), torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, 8, 8).long()))
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="CUDA"):
            select_device("cuda")


def test_perfect_model_scores_one():
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight[:] = torch.tensor([-10.0, 10.0]).view(2, 1, 1, 1)
        conv.bias.zero_()
    x = torch.randn(4, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    res = evaluate_segmentation(conv, data, boundary_class=1, per_image=True)
    assert res["iou"] == 1.0 and res["boundary_f1"] == 1.0 and len(res["per_image"]) == 4
    flipped = torch.utils.data.TensorDataset(x, (x[:, 0] <= 0).long())
    assert evaluate_segmentation(conv, flipped, boundary_class=1)["iou"] == 0.0


def test_tiled_prediction_matches_whole_image():
    # a pointwise model: tiles must reproduce the whole-image result exactly
    conv = nn.Conv2d(1, 2, 1)
    img = np.random.default_rng(0).normal(size=(1, 300, 410)).astype(np.float32)
    whole = predict_tiled(conv, img, tile=512)
    tiled = predict_tiled(conv, img, tile=128, overlap=32)
    assert tiled.shape == (2, 300, 410)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    # a U-Net with context: interior agrees closely, probabilities sum to one everywhere
    net = _unet().eval()
    whole = predict_tiled(net, img, tile=1024)
    tiled = predict_tiled(net, img, tile=160, overlap=48)
    np.testing.assert_allclose(tiled.sum(0), 1.0, atol=1e-5)
    assert np.abs(tiled - whole)[:, 20:-20, 20:-20].mean() < 0.02
    with pytest.raises(TrainError, match="overlap"):
        predict_tiled(net, img, tile=64, overlap=32)


def test_dihedral_tta_is_invariant_to_rotating_and_mirroring_the_input():
    # a conv with an asymmetric 3x3 kernel is not rotation-equivariant: its plain prediction of a
    # rotated image differs from the rotated prediction; the D4 average does not
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    img = np.random.default_rng(1).normal(size=(1, 40, 56)).astype(np.float32)
    rot = np.ascontiguousarray(np.rot90(img, 1, axes=(1, 2)))
    mirror = np.ascontiguousarray(img[:, :, ::-1])
    plain, plain_rot = predict_tiled(conv, img), predict_tiled(conv, rot)
    assert np.abs(np.rot90(plain, 1, axes=(1, 2)) - plain_rot).max() > 1e-2
    tta = predict_tiled(conv, img, tta=True)
    assert tta.shape == (2, 40, 56) and tta.dtype == np.float32
    np.testing.assert_allclose(tta.sum(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.rot90(tta, 1, axes=(1, 2)), predict_tiled(conv, rot, tta=True), atol=1e-5)
    np.testing.assert_allclose(tta[:, :, ::-1], predict_tiled(conv, mirror, tta=True), atol=1e-5)
    # tiles and TTA combine: the pointwise model is D4-equivariant, so TTA changes nothing
    point = nn.Conv2d(1, 2, 1)
    np.testing.assert_allclose(predict_tiled(point, img, tile=32, overlap=8, tta=True),
                               predict_tiled(point, img), atol=1e-5)


def test_plot_falls_back_to_pillow_without_matplotlib(tmp_path, monkeypatch):
    rows = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_boundary_f1": 0.1 * e} for e in (1, 2, 3)]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = plot_log(rows, tmp_path / "c.png", title="t")
    from PIL import Image

    im = np.asarray(Image.open(out))
    assert im.shape[0] > 100 and (im != 255).any()
