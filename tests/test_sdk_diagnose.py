"""sdk.diagnose: attribution maps and the shortcut report (borders, data bar, corners)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sdk.diagnose import (  # noqa: E402
    DiagnoseError,
    attribution_report,
    detect_databar,
    diagnose_classification,
    diagnose_segmentation,
    gradcam,
    input_gradient,
    region_masks,
    saliency_png,
)
from sdk.models import UNet, build_model  # noqa: E402
from sdk.trainer import TrainConfig, Trainer, seeded_build  # noqa: E402


def test_region_masks_areas():
    m = region_masks((100, 100), border=5, databar=8)
    assert m["border"].mean() == pytest.approx(1 - 0.9 ** 2)
    assert m["databar"].mean() == pytest.approx(0.08) and m["databar"][-1].all() and not m["databar"][0].any()
    assert m["corners"].mean() == pytest.approx(1 - np.pi / 4, abs=0.01)
    assert "databar" not in region_masks((50, 60))
    b = region_masks((200, 100), border=0.1)["border"]  # 10 % of the shorter side = 10 px
    assert b[:, 9].all() and not b[:, 10].all()


def test_attribution_report_fractions_and_enrichment():
    regions = region_masks((64, 64), border=4)
    uniform = attribution_report(np.ones((64, 64)), regions)
    assert uniform["border"]["enrichment"] == pytest.approx(1.0)
    assert uniform["corners"]["fraction"] == pytest.approx(uniform["corners"]["area"])
    only_border = attribution_report(regions["border"].astype(float), regions)
    assert only_border["border"]["fraction"] == pytest.approx(1.0)
    centre = np.zeros((64, 64)); centre[28:36, 28:36] = 1
    rep = attribution_report(centre, regions, structure=centre > 0)
    assert rep["border"]["fraction"] == 0 and rep["structure"]["fraction"] == pytest.approx(1.0)
    assert np.isnan(attribution_report(np.zeros((64, 64)), regions)["border"]["enrichment"])
    with pytest.raises(DiagnoseError):
        attribution_report(np.ones((10, 10)), regions)


def test_detect_databar():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(128, 128))
    assert detect_databar(img) == 0
    img[-12:] = img.min()
    img[-8:-4, 10:30] = img.max()  # "text" on the bar
    assert detect_databar(img) == 12
    assert detect_databar(np.stack([img] * 3)) == 12


class _Masked(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32))

    def forward(self, x):
        return torch.relu(self.conv(x)) * self.mask


class _LooksAt(nn.Module):
    """A classifier whose features exist only inside `mask` (a hard-wired shortcut)."""

    def __init__(self, mask):
        super().__init__()
        self.features = _Masked(mask)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(-2, -1)))


@pytest.mark.parametrize("method", ["gradcam", "gradient"])
def test_a_model_that_looks_at_the_border_is_flagged_and_one_that_does_not_is_not(method):
    torch.manual_seed(0)
    regions = region_masks((48, 48), border=4)
    imgs = [np.random.default_rng(i).normal(size=(1, 48, 48)).astype(np.float32) + 2 for i in range(3)]
    border_net = _LooksAt(regions["border"])
    rep = diagnose_classification(border_net, imgs, target_class=1, method=method, layer="features",
                                  border=4, databar=0)
    # (input gradients leak one pixel past the strip through the 3x3 convolution)
    assert rep["mean"]["border"]["fraction"] > 0.8 and any(f.startswith("border") for f in rep["flags"])
    centre = np.zeros((48, 48), bool); centre[16:32, 16:32] = True
    centre_net = _LooksAt(centre)
    rep = diagnose_classification(centre_net, imgs, target_class=1, method=method, layer="features",
                                  border=4, databar=0)
    assert rep["mean"]["border"]["fraction"] < 0.05 and not rep["flags"]


def _train_classifier(x, y):
    net = seeded_build(lambda: build_model({"arch": "classifier", "num_classes": 2,
                                            "encoder": {"source": "conv", "depth": 2, "width": 4}}), 0)
    data = torch.utils.data.TensorDataset(x, y)
    hist = Trainer(net, data, data, TrainConfig(task="classification", epochs=10, lr=2e-2, batch_size=16,
                                                progress=False)).fit()
    assert hist.best_value == 1.0
    return net


def test_a_trained_shortcut_on_the_data_bar_is_found_and_a_real_cue_is_not_flagged():
    """Classes that differ only by the data bar's grey level: the classifier learns the bar."""
    g = torch.Generator().manual_seed(0)
    n, s = 64, 24
    x = torch.rand(n, 1, s, s, generator=g)
    y = torch.arange(n) % 2
    bar = x.clone()
    bar[:, :, -5:, :] = y.float()[:, None, None, None]  # a uniform bar, 5 rows: black or white
    net = _train_classifier(bar, y)
    rep = diagnose_classification(net, [bar[i].numpy() for i in range(8)], target_class=[int(c) for c in y[:8]])
    m = rep["mean"]
    assert m["databar"]["area"] == pytest.approx(5 / 24)  # detected automatically
    assert m["databar"]["enrichment"] > 2 > max(m["border"]["enrichment"], m["corners"]["enrichment"])
    assert [f.split(":")[0] for f in rep["flags"]] == ["databar"]
    # control: the classes differ by a bright square in the centre, no bar: nothing is flagged
    blob = x.clone()
    blob[:, :, 8:16, 8:16] += y.float()[:, None, None, None]
    net = _train_classifier(blob, y)
    rep = diagnose_classification(net, [blob[i].numpy() for i in range(8)], target_class=[int(c) for c in y[:8]])
    assert "databar" not in rep["mean"] and not rep["flags"]
    assert rep["mean"]["corners"]["enrichment"] < 1


def test_segmentation_gradcam_shapes_and_png(tmp_path):
    net = seeded_build(lambda: UNet(1, 2, depth=3, width=4), 0)
    imgs = [np.random.default_rng(i).normal(size=(1, 40, 56)).astype(np.float32) for i in range(2)]
    maps = gradcam(net, np.stack(imgs), target_class=1)
    assert maps.shape == (2, 40, 56) and (maps >= 0).all()
    assert input_gradient(net, imgs[0]).shape == (1, 40, 56)
    rep = diagnose_segmentation(net, imgs, structures=[im[0] > 1 for im in imgs])
    assert len(rep["per_image"]) == 2 and "structure" in rep["mean"] and len(rep["maps"]) == 2
    # gradients flow even when every parameter is frozen (the input carries them)
    for p in net.parameters():
        p.requires_grad_(False)
    assert gradcam(net, imgs[0]).shape == (1, 40, 56)
    out = saliency_png(imgs, rep["maps"], tmp_path / "s.png")
    assert out.stat().st_size > 500
    with pytest.raises(DiagnoseError, match="no layer"):
        gradcam(net, imgs[0], layer="nope")
    with pytest.raises(DiagnoseError, match="method"):
        diagnose_segmentation(net, imgs, method="lime")
