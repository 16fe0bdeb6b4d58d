"""sdk.models: U-Net, encoder adapter, classifier, local weights, checkpoints."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sdk.models import (  # noqa: E402
    Classifier,
    ConvEncoder,
    EncoderUNet,
    ModelError,
    UNet,
    build_encoder,
    build_model,
    count_parameters,
    load_checkpoint,
    load_encoder_weights,
    read_checkpoint,
    save_checkpoint,
    unet_config,
)


def _seeded(fn, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


@pytest.mark.parametrize("shape", [(32, 32), (50, 70), (17, 9)])
@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_unet_any_size_and_norm(shape, norm):
    net = UNet(in_channels=1, num_classes=3, depth=3, width=4, norm=norm)
    y = net(torch.randn(2, 1, *shape))
    assert y.shape == (2, 3, *shape)


def test_unet_depth_and_width_change_the_network():
    small = UNet(depth=2, width=4)
    deeper = UNet(depth=4, width=4)
    wider = UNet(depth=2, width=8)
    assert count_parameters(deeper) > count_parameters(small)
    assert count_parameters(wider) > 3 * count_parameters(small)
    assert len(deeper.encoder.blocks) == 4 and len(deeper.decoder.blocks) == 3
    assert deeper.encoder.channels == [4, 8, 16, 32]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in UNet(depth=2, width=4, norm="group").modules())


def test_unet_config_round_trip_gives_same_function():
    net = _seeded(lambda: UNet(in_channels=3, num_classes=2, depth=3, width=4, dropout=0.1,
                               upsample="bilinear"))
    again = build_model(net.config)
    again.load_state_dict(net.state_dict())
    net.eval(), again.eval()
    x = torch.randn(1, 3, 24, 24)
    assert torch.equal(net(x), again(x))
    assert net.config == unet_config(3, 2, 3, 4, "batch", 0.1, "bilinear")


@pytest.mark.parametrize("bad", [{"arch": "unet", "depth": 0}, {"arch": "unet", "norm": "layer"},
                                 {"arch": "unet", "colour": 1}, {"arch": "resnet"},
                                 {"arch": "unet", "upsample": "nearest"}, {"arch": "unet", "width": 2.5}])
def test_bad_configs_are_refused_with_a_message(bad):
    with pytest.raises(ModelError):
        build_model(bad)


def test_unet_transfer_blocks_cover_all_parameters_in_order():
    net = UNet(depth=3, width=4)
    blocks = net.transfer_blocks()
    assert [r for _, _, r in blocks] == ["backbone"] * 3 + ["head"] * 3
    assert [n for n, _, _ in blocks][0] == "encoder.blocks.0"
    ids = {id(p) for _, m, _ in blocks for p in m.parameters()}
    assert ids == {id(p) for p in net.parameters()}


class DictEncoder(nn.Module):
    """An external-style encoder: dict of maps at strides 2, 4, 8 (like torchvision's extractor)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 6, 3, stride=2, padding=1)
        self.layer1 = nn.Conv2d(6, 10, 3, stride=2, padding=1)
        self.layer2 = nn.Sequential(nn.Conv2d(10, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12))

    def forward(self, x):
        a = self.stem(x)
        b = self.layer1(a)
        return {"a": a, "b": b, "c": self.layer2(b)}


class SmpLikeEncoder(DictEncoder):
    """segmentation_models_pytorch encoders return the input itself as the first 'feature'."""

    def forward(self, x):
        return [x, *super().forward(x).values()]


@pytest.mark.parametrize("cls", [DictEncoder, SmpLikeEncoder])
def test_encoder_adapter_accepts_feature_lists_and_dicts(cls):
    enc = cls(in_channels=1)
    net = EncoderUNet(enc, num_classes=2, in_channels=1, decoder_width=4)
    assert net.encoder_channels == [6, 10, 12]  # the smp input "feature" was dropped
    for shape in [(64, 64), (45, 30)]:
        assert net(torch.randn(2, 1, *shape)).shape == (2, 2, *shape)
    roles = [(n, r) for n, _, r in net.transfer_blocks()]
    assert roles[:3] == [("encoder.stem", "backbone"), ("encoder.layer1", "backbone"), ("encoder.layer2", "backbone")]
    assert roles[-1] == ("head", "head")
    # a bare-module adapter cannot be rebuilt from a checkpoint, and says so
    with pytest.raises(ModelError, match="encoder_config"):
        save_checkpoint("/nonexistent/x.pt", net)


def test_encoder_adapter_reports_a_broken_encoder():
    class Broken(nn.Module):
        def forward(self, x):
            return x.sum()  # no 4-D maps

    with pytest.raises(ModelError, match="no 4-D feature maps"):
        EncoderUNet(Broken())


def test_python_factory_encoder_and_classifier_build_and_round_trip(tmp_path):
    cfg = {"arch": "encoder_unet", "in_channels": 1, "num_classes": 2, "decoder_width": 4,
           "encoder": {"source": "python", "factory": "sdk.models:ConvEncoder", "kwargs": {"depth": 3, "width": 4}}}
    net = _seeded(lambda: build_model(cfg))
    assert isinstance(net.encoder, ConvEncoder)
    path = save_checkpoint(tmp_path / "m.pt", net, data={"label": "boundary"})
    again, meta = load_checkpoint(path)
    x = torch.randn(1, 1, 32, 32)
    net.eval()
    assert torch.equal(net(x), again(x)) and meta["data"]["label"] == "boundary"

    clf = build_model({"arch": "classifier", "encoder": {"source": "conv", "depth": 2, "width": 4},
                       "num_classes": 5})
    assert isinstance(clf, Classifier) and clf(torch.randn(3, 1, 20, 20)).shape == (3, 5)
    with pytest.raises(ModelError, match="cannot be imported"):
        build_model({"arch": "classifier", "encoder": {"source": "python", "factory": "no_such_mod:f"}})


@pytest.mark.parametrize("pkg,source", [("timm", "timm"), ("torchvision", "torchvision"),
                                        ("segmentation_models_pytorch", "smp")])
def test_optional_encoder_packages_fail_cleanly_when_missing(pkg, source):
    try:
        importlib.import_module(pkg)
        pytest.skip(f"{pkg} imports here")
    except Exception:
        pass
    with pytest.raises(ModelError, match=pkg):
        build_encoder({"source": source, "name": "resnet18"}, in_channels=1)


def test_encoder_weights_come_from_a_local_file_only(tmp_path):
    src = _seeded(lambda: ConvEncoder(1, depth=2, width=4), 1)
    dst = _seeded(lambda: ConvEncoder(1, depth=2, width=4), 2)
    assert not torch.equal(src.blocks[0][0].weight, dst.blocks[0][0].weight)
    # a prefixed state dict inside a {"state_dict": ...} wrapper, as training scripts save them
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    res = load_encoder_weights(dst, tmp_path / "w.pth", strict=True)
    assert res == {"missing": [], "unexpected": []}
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))

    with pytest.raises(ModelError, match="URL"):
        load_encoder_weights(dst, "https://example.org/resnet18.pth")
    with pytest.raises(ModelError, match="does not exist"):
        load_encoder_weights(dst, tmp_path / "missing.pth")
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="match"):
        load_encoder_weights(dst, tmp_path / "bad.pth")
    wide = ConvEncoder(1, depth=2, width=8)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ModelError, match="shape"):
        load_encoder_weights(dst, tmp_path / "wide.pth")

    # the spec form used by configs: weights loaded at build time, then dropped from the config
    spec = {"source": "conv", "depth": 2, "width": 4, "weights": str(tmp_path / "w.pth")}
    net = build_model({"arch": "classifier", "encoder": spec, "num_classes": 2})
    assert torch.equal(net.encoder.blocks[0][0].weight, src.blocks[0][0].weight)


def test_checkpoint_is_plain_and_validated(tmp_path):
    net = _seeded(lambda: UNet(depth=2, width=4))
    path = save_checkpoint(tmp_path / "m.pt", net, data={"label": "boundary", "channels": 1},
                           log=[{"epoch": 1, "loss": 0.5}])
    blob = torch.load(path, map_location="cpu", weights_only=True)  # plain content only
    assert blob["format"] == "emtwin-model" and blob["model_config"]["arch"] == "unet"
    assert not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(ModelError, match="ndarray"):
        save_checkpoint(tmp_path / "x.pt", net, data={"mean": np.zeros(3)})
    with pytest.raises(ModelError, match="may not set"):
        save_checkpoint(tmp_path / "x.pt", net, state_dict={})
    assert not (tmp_path / "x.pt").exists()

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable model file"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "something-else"}, tmp_path / "foreign.pt")
    with pytest.raises(ModelError, match="not an emtwin model"):
        read_checkpoint(tmp_path / "foreign.pt")
    blob["format_version"] = 99
    torch.save(blob, tmp_path / "future.pt")
    with pytest.raises(ModelError, match="format_version 99"):
        read_checkpoint(tmp_path / "future.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError):
        load_checkpoint(tmp_path / "cut.pt")


def test_sdk_trains_without_numba_or_abtem(tmp_path):
    """The SDK's model/training modules import and run a step with numba and abtem blocked."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('numba', 'abtem'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import torch
        import sdk.models, sdk.transfer, sdk.trainer, sdk.diagnose, sdk.cli
        from sdk.trainer import Trainer, TrainConfig
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 1, 16, 16, generator=g)
        y = (x[:, 0] > 0).long()
        data = torch.utils.data.TensorDataset(x, y)
        net = sdk.models.UNet(depth=2, width=4)
        h = Trainer(net, data, config=TrainConfig(epochs=1, batch_size=2, progress=False)).fit()
        assert len(h.rows) == 1
        assert 'numba' not in sys.modules and 'abtem' not in sys.modules
        print('ok')
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")

