"""sdk.adapt: AdaBN, gradient reversal / DANN, Fourier domain adaptation, and the trainer hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sdk.adapt import (  # noqa: E402
    DANN,
    FDA,
    AdaBN,
    AdaptError,
    FDATransform,
    adabn,
    fda,
    fda_beta_size,
    ganin_lambda,
    grad_reverse,
)
from sdk.models import UNet  # noqa: E402
from sdk.trainer import TrainConfig, Trainer, seeded_build  # noqa: E402


def _unet(seed=0, norm="batch", dropout=0.0):
    return seeded_build(lambda: UNet(1, 2, depth=2, width=4, norm=norm, dropout=dropout), seed)


def _toy(n=16, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = nn.functional.avg_pool2d(torch.randn(n, 1, size, size, generator=g), 3, 1, 1) * 3
    return x, (x[:, 0] > 0.5).long()


# ---- AdaBN --------------------------------------------------------------------------------


def _bn_inputs(model, x):
    """Hook every BatchNorm input during one forward pass."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=n: seen.setdefault(name, []).append(a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("batches", [1, 3])
def test_adabn_running_stats_are_the_target_batch_statistics(batches):
    net = _unet(0, dropout=0.3)
    # trained-looking stats first: a few forward passes on source data in train mode
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(_toy(8, seed=5)[0])
    target = _toy(4 * batches, seed=1)[0] * 0.4 + 2.0  # shifted, rescaled domain
    net.train()
    net.encoder.blocks[0][0].train(False)  # an arbitrary mix of modes to be restored
    modes = {n: m.training for n, m in net.named_modules()}
    adabn(net, target, batch_size=4)
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    # reference: with the adapted stats in eval mode... compute each BN's input batch by batch in a
    # copy whose BN layers use batch statistics (what they saw during re-estimation), dropout off
    ref = _unet(0, dropout=0.3)
    ref.load_state_dict(net.state_dict())
    ref.eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.momentum = 0.0  # use batch stats, leave buffers alone
    per_batch = [_bn_inputs(ref, xb) for xb in target.split(4)]
    for name, bn in net.named_modules():
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        feats = [pb[name][0] for pb in per_batch]
        mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
        var = torch.stack([f.transpose(0, 1).reshape(f.shape[1], -1).var(1, unbiased=True) for f in feats]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    with pytest.raises(AdaptError, match="no target"):
        adabn(net, torch.zeros(0, 1, 8, 8))


def test_adabn_accepts_datasets_loaders_and_max_batches():
    x = _toy(8, seed=2)[0] + 1.0
    a, b, c = _unet(), _unet(), _unet()
    adabn(a, x[:4])
    adabn(b, torch.utils.data.TensorDataset(x[:4], torch.zeros(4)), batch_size=4)
    adabn(c, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4), max_batches=1)
    for m in (b, c):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(m.state_dict()[k], v)


# ---- DANN ---------------------------------------------------------------------------------


def test_gradient_reversal_negates_and_scales_gradients():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    (grad_reverse(x, 0.7) * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * w)  # d/dx of sum(w*x) is w; reversed and scaled
    y = torch.randn(4, requires_grad=True)
    out = grad_reverse(y, 2.0)
    assert torch.equal(out, y)  # identity forward
    (out ** 2).sum().backward()
    torch.testing.assert_close(y.grad, -2.0 * 2 * y.detach())


def test_ganin_schedule():
    assert ganin_lambda(0.0) == 0.0
    for p in (0.1, 0.5, 1.0):
        assert ganin_lambda(p) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)
    assert ganin_lambda(2.0) == ganin_lambda(1.0)


class _MLP(nn.Module):
    """A tiny vector model with an ``encoder`` (what DANN hooks) and a head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))


def _shifted(n, seed, shift):
    """Label = sign of x0; the target domain is shifted by +2 along three task-irrelevant axes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long()
    if shift:
        x[:, 1:4] += 2.0
    return x, y


def test_dann_confuses_the_domain_classifier_on_a_toy_shift():
    # Same model, data, seed and domain classifier; lambda_max = 0 lets the classifier watch
    # plain training (no gradient reaches the encoder), lambda_max = 1 is DANN.
    xs, ys = _shifted(256, 0, False)
    xt, yt = _shifted(256, 1, True)
    acc = {}
    for lam in (0.0, 1.0):
        net = seeded_build(_MLP, 0)
        dann = DANN(net, xt, hidden=16, lambda_max=lam)
        hist = Trainer(net, torch.utils.data.TensorDataset(xs, ys), adaptation=dann,
                       config=TrainConfig(task="classification", epochs=3, steps_per_epoch=80, batch_size=32,
                                          lr=3e-3, progress=False, seed=0, scheduler="none")).fit()
        acc[lam] = np.mean([r["dann_accuracy"] for r in hist.rows[-2:]])
        assert hist.rows[-1]["dann_lambda"] == pytest.approx(lam * ganin_lambda(1.0))
        with torch.no_grad():
            assert float((net(xt).argmax(1) == yt).float().mean()) > 0.8  # the task is still learnt
    assert acc[0.0] > 0.8  # the shifted domain is easy to tell apart in plain features
    assert acc[1.0] < 0.65  # DANN features leave the domain classifier near chance


def test_dann_plain_pytorch_step_trains_classifier_and_reverses_encoder_gradient():
    net = _unet(norm="none")
    x, xt = _toy(4)[0], _toy(4, seed=3)[0] + 1
    dann = DANN(net, xt, hidden=8)
    lam = ganin_lambda(0.5)

    def grads(lambda_max):
        net.zero_grad()
        dann.classifier.zero_grad()
        dann.lambda_max = lambda_max
        net(x)  # features captured by the hook
        dann.domain_loss(target=xt, progress=0.5).backward()
        return (net.encoder.blocks[-1][0].weight.grad.clone(),
                [p.grad.clone() for p in dann.parameters()])

    enc_rev, cls_rev = grads(1.0)  # DANN: encoder gradient reversed and scaled by lambda
    enc_id, cls_id = grads(-1.0 / lam)  # effective lambda -1: the plain gradient
    # threaded conv backward sums in varying order: compare at float32 round-off of the largest entry
    torch.testing.assert_close(enc_rev, -lam * enc_id, rtol=1e-4, atol=1e-5 * float(enc_id.abs().max()))
    for a, b in zip(cls_rev, cls_id):  # the domain classifier itself is never reversed
        torch.testing.assert_close(a, b)
    assert enc_id.abs().sum() > 0
    # images instead of a captured forward pass give the same loss
    net(x)
    captured = dann.domain_loss(target=xt, progress=0.5)
    torch.testing.assert_close(dann.domain_loss(x, target=xt, progress=0.5), captured)
    with pytest.raises(AdaptError, match="no source"):
        dann.domain_loss(target=xt)


# ---- FDA ----------------------------------------------------------------------------------


def _centre_box(shape, beta):
    b = fda_beta_size(shape, beta)
    ch, cw = shape[-2] // 2, shape[-1] // 2
    return (slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1))


@pytest.mark.parametrize("shape", [(32, 32), (30, 37)])
def test_fda_swaps_low_frequency_amplitude_and_keeps_phase(shape):
    rng = np.random.default_rng(0)
    src = rng.normal(size=shape) + 1.0  # an intensity image: positive mean, so DC phase 0
    trg = rng.normal(size=shape) * 3 + 5 + np.linspace(0, 4, shape[1])[None]
    beta = 0.1
    out = fda(src, trg, beta)
    assert out.shape == shape and out.dtype == np.float64
    F_o, F_s, F_t = (np.fft.fftshift(np.fft.fft2(a)) for a in (out, src, trg))
    box = _centre_box(shape, beta)
    inside = np.zeros(shape, bool)
    inside[box] = True
    np.testing.assert_allclose(np.abs(F_o)[inside], np.abs(F_t)[inside], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.abs(F_o)[~inside], np.abs(F_s)[~inside], rtol=1e-9, atol=1e-9)
    # phase of the source everywhere (compare unit phasors to avoid the 2*pi wrap)
    np.testing.assert_allclose(F_o / np.abs(F_o), F_s / np.abs(F_s), atol=1e-9)
    assert out.mean() == pytest.approx(trg.mean())  # DC amplitude swapped: mean follows target
    # (with the source phase kept, a negative-mean source keeps its sign: |mean| follows)
    assert fda(src - 2.0, trg, beta).mean() == pytest.approx(-trg.mean())
    np.testing.assert_array_equal(fda(src, trg, 0.0), src)  # beta = 0: identity


def test_fda_channels_torch_and_errors():
    rng = np.random.default_rng(1)
    src = rng.random((3, 24, 24)).astype(np.float32)
    trg = rng.random((3, 24, 24)).astype(np.float32) + 2
    chw = fda(src, trg, 0.05)
    assert chw.dtype == np.float32
    hwc = fda(np.moveaxis(src, 0, -1), np.moveaxis(trg, 0, -1), 0.05)
    np.testing.assert_allclose(np.moveaxis(hwc, -1, 0), chw, atol=1e-6)
    for c in range(3):
        np.testing.assert_allclose(chw[c], fda(src[c], trg[c], 0.05), atol=1e-6)
    t = fda(torch.from_numpy(src)[None], torch.from_numpy(trg)[None], 0.05)
    assert isinstance(t, torch.Tensor) and t.shape == (1, 3, 24, 24)
    np.testing.assert_allclose(t[0].numpy(), chw, atol=1e-5)
    np.testing.assert_allclose(chw.mean(axis=(1, 2)), trg.mean(axis=(1, 2)), atol=1e-5)
    with pytest.raises(AdaptError, match="beta"):
        fda(src, trg, 0.5)
    with pytest.raises(AdaptError, match="shapes differ"):
        fda(src, trg[:, :20], 0.1)


def test_fda_transform_is_seeded_and_uses_target_styles():
    rng = np.random.default_rng(2)
    targets = [rng.random((40, 40)) * 100 + 1000 * k for k in range(3)]  # percentile-scaled to [0, 1]
    img = rng.random((32, 32)).astype(np.float32) * 0.2
    mask = (img > 0.1).astype(np.int32)
    t1 = FDATransform(targets, beta=0.05, seed=7)
    t2 = FDATransform(targets, beta=0.05, seed=7)
    outs1 = [t1(image=img, mask=mask) for _ in range(4)]
    outs2 = [t2(image=img, mask=mask) for _ in range(4)]
    for a, b in zip(outs1, outs2):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], mask)  # labels untouched
    out = outs1[0]["image"]
    assert out.dtype == np.float32 and out.shape == img.shape
    assert abs(out.mean() - 0.5) < 0.1  # mean follows the [0, 1]-scaled uniform targets
    # identical to fda with the drawn target crop
    p = t1.get_params()
    trg = t1._target_like(img, p["index"], p["u"], p["v"])
    np.testing.assert_allclose(t1.apply(img, **p), np.clip(fda(img, trg, 0.05), 0, 1), atol=1e-6)
    # the output stays on the [0, 1] working scale although the raw FDA result leaves it
    binary = (np.indices((32, 32)).sum(0) % 2).astype(np.float32)  # 0/1 checkerboard, mean 0.5
    bright = [np.full((32, 32), 0.9) + 0.01 * rng.random((32, 32)), np.zeros((32, 32))]
    raw = fda(binary, bright[0].astype(np.float32), 0.05)
    assert raw.max() > 1.2                                  # the mean moves to 0.9: values reach 1.4
    unclipped = FDATransform(bright, beta=0.05, scale="none", seed=0)
    unclipped.targets_ = [bright[0].astype(np.float32)]
    assert unclipped(image=binary)["image"].max() > 1.2       # "none": values as FDA gives them
    kept = FDATransform(bright, beta=0.05, seed=0)
    kept.targets_ = [bright[0].astype(np.float32)]
    out01 = kept(image=binary)["image"]
    assert out01.min() >= 0.0 and out01.max() == 1.0        # percentile: clipped to the working scale
    rgb = FDATransform(targets, beta=0.05, seed=0)(image=np.stack([img] * 3, -1))["image"]
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_array_equal(FDATransform(targets, beta=0.0, seed=0)(image=img)["image"], img)
    with pytest.raises(AdaptError, match="smaller"):
        FDATransform([np.ones((8, 8))], beta=0.1, seed=0)(image=img)


# ---- trainer integration -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["adabn", "dann", "fda", "all"])
def test_trainer_runs_one_epoch_with_each_adaptation(kind):
    x, y = _toy(8)
    xt = _toy(8, seed=4)[0] * 0.5 + 1.0
    net = _unet()
    ad = {"adabn": lambda: AdaBN(xt, when="both"), "dann": lambda: DANN(net, xt, hidden=8),
          "fda": lambda: FDA(xt, beta=0.05),
          "all": lambda: [AdaBN(xt), DANN(net, xt, hidden=8), FDA(xt, beta=0.05, p=0.5)]}[kind]()
    n_groups = 1
    tr = Trainer(net, torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x, y),
                 config=TrainConfig(epochs=1, batch_size=4, progress=False, boundary_class=1), adaptation=ad)
    hist = tr.fit()
    assert len(hist.rows) == 1 and np.isfinite(hist.rows[0]["train_loss"])
    if kind in ("dann", "all"):
        n_groups += 1
        assert hist.rows[0]["dann_accuracy"] >= 0
    assert len(tr.optimizer.param_groups) == n_groups
    if kind in ("adabn", "all"):
        # the kept model has the target's BatchNorm statistics
        ref = _unet()
        ref.load_state_dict(net.state_dict())
        adabn(ref, xt)
        for k, v in net.state_dict().items():
            if "running" in k:
                torch.testing.assert_close(v, ref.state_dict()[k], rtol=1e-4, atol=1e-5)
