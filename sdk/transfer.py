"""Transfer learning: freeze/unfreeze by block, depth-graded learning rates, gradual unfreezing,
and BatchNorm policy on frozen backbones.

A model is seen as an ordered list of *blocks* from the input to the output, each with a role,
``"backbone"`` or ``"head"`` (:func:`model_blocks`; models of :mod:`sdk.models` define them in
``transfer_blocks()``, any other model falls back to its top-level children, the last one being
the head). On that list:

- :func:`freeze` / :func:`unfreeze` switch ``requires_grad`` per block and set how the BatchNorm
  layers of frozen blocks behave: ``bn="train"`` keeps them in train mode (batch statistics in the
  forward pass, running statistics follow the new data: an implicit adaptation to the target
  domain), ``bn="eval"`` fixes them (running statistics used and never updated, whatever
  ``model.train()`` says). The affine BN parameters of a frozen block are frozen either way.
- :func:`param_groups` gives one optimizer group per block with depth-graded learning rates:
  the head gets ``head_lr`` (~1e-3), the backbone block nearest the input ``backbone_lr``
  (~1e-5), and the blocks in between a geometric progression (ULMFiT's discriminative rates).
  Frozen blocks are included, so one optimizer serves every stage of gradual unfreezing.
- :class:`GradualUnfreezing` trains the head first, then also the last backbone block, then the
  next deeper one, ... (head -> last block -> deeper).
- :func:`reestimate_bn` re-estimates BatchNorm running statistics on target images (AdaBN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from twin.errors import EmtwinError

__all__ = [
    "TransferError",
    "Block",
    "BN_MODES",
    "model_blocks",
    "select_blocks",
    "freeze",
    "unfreeze",
    "freeze_backbone",
    "trainable_block_names",
    "param_groups",
    "GradualUnfreezing",
    "reestimate_bn",
    "bn_layers",
]

BN_MODES = ("train", "eval")
_HOOK_ATTR = "_emtwin_bn_eval_hook"


class TransferError(EmtwinError):
    """A transfer-learning request that cannot be met (unknown block name, bad schedule)."""


@dataclass(frozen=True)
class Block:
    """One block of a model: its dotted name, the module, and its role (backbone or head)."""

    name: str
    module: nn.Module
    role: str


def model_blocks(model: nn.Module) -> list[Block]:
    """The blocks of ``model`` from input to output.

    Uses ``model.transfer_blocks()`` when defined (all :mod:`sdk.models` models); otherwise the
    top-level children that own parameters, the last of them as the head.

    Raises
    ------
    TransferError
        If the model has no parameterised children.
    """
    if hasattr(model, "transfer_blocks"):
        blocks = [Block(n, m, r) for n, m, r in model.transfer_blocks()]
    else:
        children = [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
        if not children:
            raise TransferError(f"{type(model).__name__} has no parameterised children to split into blocks")
        blocks = [Block(n, m, "backbone") for n, m in children[:-1]]
        blocks.append(Block(children[-1][0], children[-1][1], "head"))
    for b in blocks:
        if b.role not in ("backbone", "head"):
            raise TransferError(f"block {b.name!r} has role {b.role!r} (expected backbone or head)")
    return blocks


def select_blocks(model: nn.Module, which: str | Sequence[str] | None = "backbone") -> list[Block]:
    """Blocks chosen by role (``"backbone"``, ``"head"``, ``"all"``/None) or by a list of names.

    Raises
    ------
    TransferError
        If a name is not a block of the model.
    """
    blocks = model_blocks(model)
    if which is None or which == "all":
        return blocks
    if isinstance(which, str) and which in ("backbone", "head"):
        return [b for b in blocks if b.role == which]
    names = [which] if isinstance(which, str) else list(which)
    by_name = {b.name: b for b in blocks}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise TransferError(f"no block named {', '.join(map(repr, missing))} "
                            f"(blocks: {', '.join(by_name)})")
    return [by_name[n] for n in names]


def bn_layers(module: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers (1-d/2-d/3-d/sync) inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def _force_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def _set_bn_eval(module: nn.Module, on: bool) -> None:
    for bn in bn_layers(module):
        handle = getattr(bn, _HOOK_ATTR, None)
        if on and handle is None:
            setattr(bn, _HOOK_ATTR, bn.register_forward_pre_hook(_force_eval))
            bn.eval()
        elif not on and handle is not None:
            handle.remove()
            delattr(bn, _HOOK_ATTR)
            bn.train(True)


def _set_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def freeze(model: nn.Module, which: str | Sequence[str] | None = "backbone", bn: str = "train") -> list[str]:
    """Freeze blocks: no gradients for their parameters, and a BatchNorm policy.

    Parameters
    ----------
    model : nn.Module
    which : {"backbone", "head", "all"} or list of block names
        Blocks to freeze.
    bn : {"train", "eval"}
        ``"train"``: their BatchNorm layers stay in train mode (batch statistics; running
        statistics keep updating on the data the model now sees). ``"eval"``: they are pinned in
        eval mode (running statistics used and not updated), even under ``model.train()``.

    Returns
    -------
    list of str
        Names of the frozen blocks.
    """
    if bn not in BN_MODES:
        raise TransferError(f"bn mode {bn!r} is not allowed (choose one of {', '.join(BN_MODES)})")
    blocks = select_blocks(model, which)
    for b in blocks:
        _set_grad(b.module, False)
        _set_bn_eval(b.module, bn == "eval")
    return [b.name for b in blocks]


def unfreeze(model: nn.Module, which: str | Sequence[str] | None = "all") -> list[str]:
    """Make blocks trainable again and release any pinned BatchNorm layers in them."""
    blocks = select_blocks(model, which)
    for b in blocks:
        _set_grad(b.module, True)
        _set_bn_eval(b.module, False)
    return [b.name for b in blocks]


def freeze_backbone(model: nn.Module, bn: str = "train") -> list[str]:
    """Freeze every backbone block and make every head block trainable."""
    unfreeze(model, "head")
    return freeze(model, "backbone", bn=bn)


def trainable_block_names(model: nn.Module) -> list[str]:
    """Names of the blocks with at least one parameter that requires a gradient."""
    return [b.name for b in model_blocks(model) if any(p.requires_grad for p in b.module.parameters())]


def param_groups(model: nn.Module, head_lr: float = 1e-3, backbone_lr: float = 1e-5,
                 decay: float | None = None, weight_decay: float = 0.0,
                 include_frozen: bool = True) -> list[dict[str, Any]]:
    """Optimizer parameter groups, one per block, with depth-graded learning rates.

    Head blocks get ``head_lr``. Backbone block ``i`` of ``n`` (``i = 0`` at the input) gets
    ``backbone_lr * (head_lr / backbone_lr) ** (i / n)`` — ``backbone_lr`` at the input, rising
    geometrically towards the head — or, when ``decay`` is given, ``head_lr * decay ** (n - i)``
    (ULMFiT's factor, e.g. ``decay = 1 / 2.6``).

    Parameters
    ----------
    model : nn.Module
    head_lr, backbone_lr : float
        Rates at the head and at the input end of the backbone.
    decay : float, optional
        Per-block factor (0 < decay <= 1) instead of the ``backbone_lr`` interpolation.
    weight_decay : float
        Weight decay for every group.
    include_frozen : bool
        Keep groups of frozen parameters (they get no gradient, so the optimizer skips them
        until they are unfrozen; this is what gradual unfreezing needs).

    Returns
    -------
    list of dict
        ``{"params", "lr", "weight_decay", "name", "role"}``; parameters outside every block are
        put in a last group ``"other"`` at ``head_lr``.

    Raises
    ------
    TransferError
        For non-positive rates or a decay outside (0, 1].
    """
    if not (head_lr > 0 and backbone_lr > 0):
        raise TransferError(f"learning rates must be > 0 (head_lr={head_lr}, backbone_lr={backbone_lr})")
    if decay is not None and not (0 < decay <= 1):
        raise TransferError(f"decay must be in (0, 1], got {decay}")
    blocks = model_blocks(model)
    backbone = [b for b in blocks if b.role == "backbone"]
    n = len(backbone)
    seen: set[int] = set()
    groups: list[dict[str, Any]] = []

    def add(name: str, role: str, params: Iterable[nn.Parameter], lr: float) -> None:
        ps = [p for p in params if id(p) not in seen and (include_frozen or p.requires_grad)]
        seen.update(id(p) for p in ps)
        if ps:
            groups.append({"params": ps, "lr": float(lr), "weight_decay": weight_decay,
                           "name": name, "role": role})

    for i, b in enumerate(backbone):
        if decay is not None:
            lr = head_lr * decay ** (n - i)
        else:
            lr = backbone_lr * (head_lr / backbone_lr) ** (i / n)
        add(b.name, "backbone", b.module.parameters(), lr)
    for b in blocks:
        if b.role == "head":
            add(b.name, "head", b.module.parameters(), head_lr)
    add("other", "head", model.parameters(), head_lr)
    return groups


class GradualUnfreezing:
    """Head first, then the last backbone block, then deeper ones (ULMFiT's gradual unfreezing).

    Stage 0 trains the head blocks only (the whole backbone frozen); stage ``k`` also trains the
    ``k * blocks_per_stage`` backbone blocks nearest the head. The last stage trains everything.

    Parameters
    ----------
    model : nn.Module
    epochs_per_stage : int or sequence of int
        Epochs spent in each stage before the next unfreezes (a sequence gives each stage its
        own length; the last stage lasts until training ends).
    blocks_per_stage : int
        Backbone blocks unfrozen at each stage.
    bn : {"train", "eval"}
        BatchNorm policy of the still-frozen blocks (see :func:`freeze`).
    max_stage : int, optional
        Stop unfreezing after this stage (e.g. 0 keeps the backbone frozen: linear probing).

    Examples
    --------
    >>> sched = GradualUnfreezing(model, epochs_per_stage=2)           # doctest: +SKIP
    >>> for epoch in range(10):
    ...     newly = sched.step(epoch)   # call at the start of each epoch
    """

    def __init__(self, model: nn.Module, epochs_per_stage: int | Sequence[int] = 1,
                 blocks_per_stage: int = 1, bn: str = "train", max_stage: int | None = None) -> None:
        if bn not in BN_MODES:
            raise TransferError(f"bn mode {bn!r} is not allowed (choose one of {', '.join(BN_MODES)})")
        if blocks_per_stage < 1:
            raise TransferError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.model = model
        self.bn = bn
        self.backbone = [b.name for b in model_blocks(model) if b.role == "backbone"]
        self.head = [b.name for b in model_blocks(model) if b.role == "head"]
        self.blocks_per_stage = blocks_per_stage
        self.n_stages = 1 + math.ceil(len(self.backbone) / blocks_per_stage)
        if max_stage is not None:
            self.n_stages = min(self.n_stages, max_stage + 1)
        if isinstance(epochs_per_stage, int):
            lengths = [epochs_per_stage] * (self.n_stages - 1)
        else:
            lengths = [int(e) for e in epochs_per_stage]
        if any(e < 1 for e in lengths):
            raise TransferError(f"epochs_per_stage must be >= 1, got {epochs_per_stage}")
        self.boundaries = [sum(lengths[:k]) for k in range(1, len(lengths) + 1)]
        self.stage = -1

    def stage_at(self, epoch: int) -> int:
        """The stage that epoch ``epoch`` (0-based) trains in."""
        k = sum(1 for b in self.boundaries if epoch >= b)
        return min(k, self.n_stages - 1)

    def trainable_at(self, stage: int) -> list[str]:
        """Block names trained in ``stage``: the head and the last unfrozen backbone blocks."""
        k = min(stage * self.blocks_per_stage, len(self.backbone))
        return self.backbone[len(self.backbone) - k:] + self.head

    def apply(self, stage: int) -> list[str]:
        """Set the model to ``stage``; returns the backbone blocks unfrozen by this call."""
        stage = max(0, min(stage, self.n_stages - 1))
        before = set(trainable_block_names(self.model)) if self.stage >= 0 else set()
        train = self.trainable_at(stage)
        frozen = [n for n in self.backbone if n not in train]
        unfreeze(self.model, train)
        if frozen:
            freeze(self.model, frozen, bn=self.bn)
        self.stage = stage
        return [n for n in self.backbone if n in train and n not in before]

    def step(self, epoch: int) -> list[str]:
        """Call at the start of each epoch; applies the stage if it changed.

        Returns
        -------
        list of str
            Backbone blocks newly unfrozen at this epoch (empty if none).
        """
        stage = self.stage_at(epoch)
        if stage != self.stage:
            return self.apply(stage)
        return []

    def state(self) -> dict[str, Any]:
        """Plain description for logs: stage and trainable blocks."""
        return {"stage": self.stage, "trainable": trainable_block_names(self.model)}


@torch.no_grad()
def reestimate_bn(model: nn.Module, images: Iterable[Any], device: str | torch.device | None = None,
                  max_batches: int | None = None) -> int:
    """Re-estimate every BatchNorm layer's running statistics on target images (AdaBN).

    Running means/variances are reset and replaced by the cumulative average over the given
    batches (momentum ``None``); weights are not touched and no labels are needed. The model is
    left in eval mode.

    Parameters
    ----------
    model : nn.Module
    images : iterable
        Batches of images ``(B, C, H, W)``, or ``(images, targets)`` pairs (a DataLoader).
    device : str or torch.device, optional
        Where to run (default: the model's device).
    max_batches : int, optional
        Stop after this many batches.

    Returns
    -------
    int
        Number of images seen.

    Raises
    ------
    TransferError
        If no image was given.
    """
    layers = bn_layers(model)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    saved = [(bn.momentum, getattr(bn, _HOOK_ATTR, None)) for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        handle = getattr(bn, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
    model.train()
    seen = 0
    try:
        for k, batch in enumerate(images):
            if max_batches is not None and k >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if x.dim() == 3:
                x = x.unsqueeze(0)
            model(x.to(device))
            seen += int(x.shape[0])
    finally:
        for bn, (momentum, handle) in zip(layers, saved):
            bn.momentum = momentum
            if handle is not None:  # re-pin layers that were pinned in eval mode
                delattr(bn, _HOOK_ATTR)
                setattr(bn, _HOOK_ATTR, bn.register_forward_pre_hook(_force_eval))
        model.eval()
    if seen == 0:
        raise TransferError("reestimate_bn got no images")
    return seen
