"""sdk.transfer: freezing, BatchNorm policy, depth-graded rates, gradual unfreezing, AdaBN."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from sdk.models import UNet  # noqa: E402
from sdk.trainer import TrainConfig, Trainer  # noqa: E402
from sdk.transfer import (  # noqa: E402
    GradualUnfreezing,
    TransferError,
    bn_layers,
    freeze,
    freeze_backbone,
    model_blocks,
    param_groups,
    reestimate_bn,
    trainable_block_names,
    unfreeze,
)


def _net(seed=0, depth=3):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(in_channels=1, num_classes=2, depth=depth, width=4)


def _batch(seed=0, n=4, size=16, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) + shift
    return x, (x[:, 0] > shift).long()


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_frozen_backbone_gets_no_grad_and_does_not_move():
    net = _net()
    frozen = freeze_backbone(net)
    assert frozen == ["encoder.blocks.0", "encoder.blocks.1", "encoder.blocks.2"]
    before_enc, before_head = _params(net.encoder), _params(net.decoder)
    opt = torch.optim.AdamW(param_groups(net), weight_decay=0.1)  # decay must not touch frozen ones
    x, y = _batch()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert _same(before_enc, _params(net.encoder))
    assert not _same(before_head, _params(net.decoder))
    assert trainable_block_names(net) == ["decoder.blocks.0", "decoder.blocks.1", "head"]


def test_bn_train_mode_on_frozen_backbone_updates_running_stats():
    net = _net()
    freeze_backbone(net, bn="train")
    bn = bn_layers(net.encoder.blocks[0])[0]
    before = bn.running_mean.clone()
    net.train()
    net(_batch(shift=3.0)[0])
    assert not torch.equal(before, bn.running_mean)
    assert bn.weight.requires_grad is False  # affine parameters are frozen either way


def test_bn_eval_mode_pins_running_stats_even_under_model_train():
    net = _net()
    freeze_backbone(net, bn="eval")
    frozen_bn = bn_layers(net.encoder.blocks[0])[0]
    head_bn = bn_layers(net.decoder)[0]
    before, head_before = frozen_bn.running_mean.clone(), head_bn.running_mean.clone()
    net.train()
    x = _batch(shift=3.0)[0]
    net(x)
    assert torch.equal(before, frozen_bn.running_mean)      # pinned: no update
    assert not torch.equal(head_before, head_bn.running_mean)  # trainable head: normal BN
    # pinned BN uses running statistics, so in train mode an image's encoder features do not
    # depend on its batch mates (with batch statistics they would)
    net.train()
    alone = net.encoder(x[:1])[0]
    together = net.encoder(x)[0][:1]
    assert torch.allclose(alone, together, atol=1e-5)
    # unfreezing releases the pin
    unfreeze(net, "all")
    net.train()
    net(x)
    assert not torch.equal(before, frozen_bn.running_mean)


def test_param_groups_are_depth_graded():
    net = _net(depth=4)
    groups = param_groups(net, head_lr=1e-3, backbone_lr=1e-5)
    names = [g["name"] for g in groups]
    assert names[:4] == [f"encoder.blocks.{i}" for i in range(4)]
    lrs = [g["lr"] for g in groups if g["role"] == "backbone"]
    assert lrs[0] == pytest.approx(1e-5)
    assert all(b > a for a, b in zip(lrs, lrs[1:]))                       # rising towards the head
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([ratios[0]] * 3)                       # geometric
    assert lrs[-1] < 1e-3
    assert all(g["lr"] == 1e-3 for g in groups if g["role"] == "head")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}
    # ULMFiT-style factor
    dec = [g["lr"] for g in param_groups(net, head_lr=1e-3, decay=0.5) if g["role"] == "backbone"]
    assert dec == pytest.approx([1e-3 * 0.5 ** k for k in (4, 3, 2, 1)])
    # the optimizer accepts the groups as they are
    opt = torch.optim.AdamW(groups)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    with pytest.raises(TransferError):
        param_groups(net, decay=1.5)
    with pytest.raises(TransferError):
        param_groups(net, head_lr=0)


def test_gradual_unfreezing_goes_head_then_last_block_then_deeper():
    net = _net(depth=3)
    sched = GradualUnfreezing(net, epochs_per_stage=2)
    assert sched.n_stages == 4
    seen = []
    for epoch in range(10):
        newly = sched.step(epoch)
        seen.append((epoch, sched.stage, newly, trainable_block_names(net)))
    head = ["decoder.blocks.0", "decoder.blocks.1", "head"]
    assert seen[0][3] == head and seen[1][3] == head
    assert seen[2][2] == ["encoder.blocks.2"] and seen[2][3] == ["encoder.blocks.2"] + head
    assert seen[4][2] == ["encoder.blocks.1"]
    assert seen[6][2] == ["encoder.blocks.0"] and seen[6][3] == [b.name for b in model_blocks(net)]
    assert [s[1] for s in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert all(not s[2] for s in seen if s[0] not in (2, 4, 6))
    # per-stage lengths and a cap on the stage (linear probing)
    s2 = GradualUnfreezing(_net(), epochs_per_stage=[1, 3], max_stage=2)
    assert [s2.stage_at(e) for e in range(6)] == [0, 1, 1, 1, 2, 2]
    with pytest.raises(TransferError):
        GradualUnfreezing(_net(), epochs_per_stage=0)


def test_trainer_follows_the_unfreezing_schedule():
    net = _net(depth=2)
    x, y = _batch(n=8)
    data = torch.utils.data.TensorDataset(x, y)
    sched = GradualUnfreezing(net, epochs_per_stage=1, bn="eval")
    snaps = []
    trainer = Trainer(net, data, config=TrainConfig(epochs=3, batch_size=4, progress=False, scheduler="none"),
                      param_groups=param_groups(net, head_lr=1e-2, backbone_lr=1e-3), unfreezer=sched,
                      on_epoch_end=lambda row: snaps.append((_params(net.encoder.blocks[0]),
                                                             _params(net.encoder.blocks[1]))))
    start = (_params(net.encoder.blocks[0]), _params(net.encoder.blocks[1]))
    hist = trainer.fit()
    assert [r["stage"] for r in hist.rows] == [0, 1, 2]
    assert hist.rows[1]["unfrozen"] == ["encoder.blocks.1"] and hist.rows[2]["unfrozen"] == ["encoder.blocks.0"]
    assert _same(start[0], snaps[0][0]) and _same(start[1], snaps[0][1])   # epoch 1: head only
    assert _same(start[0], snaps[1][0]) and not _same(start[1], snaps[1][1])  # epoch 2: + last block
    assert not _same(snaps[1][0], snaps[2][0])                               # epoch 3: + first block


def test_reestimate_bn_matches_target_statistics():
    net = _net()
    bn = bn_layers(net)[0]
    momentum = bn.momentum
    conv = net.encoder.blocks[0][0]
    batches = [_batch(seed=s, shift=4.0)[0] for s in range(3)]
    n = reestimate_bn(net, [(b, None) for b in batches])
    assert n == 12 and bn.momentum == momentum and not net.training
    with torch.no_grad():
        feats = torch.cat([conv(b) for b in batches])
    # cumulative average of per-batch means = mean over all (equal batch sizes)
    assert torch.allclose(bn.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-4)
    per_batch_var = torch.stack([conv(b).var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0).detach()
    assert torch.allclose(bn.running_var, per_batch_var, rtol=1e-3, atol=1e-4)
    # pinned layers stay pinned afterwards
    freeze_backbone(net, bn="eval")
    reestimate_bn(net, batches[:1])
    before = bn.running_mean.clone()
    net.train()
    net(batches[1])
    assert torch.equal(before, bn.running_mean)
    with pytest.raises(TransferError):
        reestimate_bn(net, [])


def test_unknown_block_and_bn_mode_are_refused():
    net = _net()
    with pytest.raises(TransferError, match="no block named"):
        freeze(net, ["encoder.blocks.9"])
    with pytest.raises(TransferError, match="bn mode"):
        freeze(net, "backbone", bn="frozen")


def test_fallback_blocks_for_a_plain_model():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1))
    blocks = model_blocks(net)
    assert [(b.name, b.role) for b in blocks] == [("0", "backbone"), ("2", "backbone"), ("3", "head")]
    groups = param_groups(net, head_lr=1e-2, backbone_lr=1e-4)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert math.isclose(groups[1]["lr"], 1e-3)
