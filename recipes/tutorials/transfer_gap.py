"""Tutorial: how much does pretraining on synthetic grains help when labels are few?

Run it (about 2-4 minutes on a 2-core CPU)::

    python recipes/tutorials/transfer_gap.py --out out/transfer_gap

What it does, step by step:

1. **Data.** Generates one small synthetic SEM data set with the shipped grain recipe (96x96 px,
   grain density drawn per specimen). Specimens are split in two disjoint pools: pool A for
   pretraining, pool B for the downstream task (its own train and test specimens).
2. **Task A (abundant labels): boundary segmentation.** A tiny U-Net (depth 3, width 8) learns the
   exact ``boundary`` label on pool A. Its encoder is the "backbone" we transfer.
3. **Task B (few labels): a different task** — classify a micrograph as *fine* or *coarse*
   grained (grain density above or below the median). For each label count N, two classifiers
   with the same architecture (encoder + global average pooling + linear layer) are trained on
   N labelled images of pool B:

   - **scratch**: every weight starts random and is trained;
   - **transfer**: the encoder is the pretrained task-A encoder, frozen (BatchNorm pinned, see
     ``sdk.transfer.freeze``); only the linear head is trained.

   Both are tested on held-out specimens of pool B, for a few seeds.
4. **Plot.** ``transfer_gap.png``: accuracy and loss curves per epoch (scratch dashed, transfer
   solid) and the final test accuracy of both against N with the *transfer gap* (transfer minus
   scratch), which shrinks as labels grow. ``results.json`` and ``results.md`` hold the numbers.

Everything is seeded; no global random state is touched (``torch.random.fork_rng``).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from sdk.models import Classifier, UNet  # noqa: E402
from sdk.trainer import TrainConfig, Trainer, evaluate_classification, seeded_build  # noqa: E402
from sdk.transfer import freeze  # noqa: E402


def make_data(workdir: Path, n: int, size: int, seed: int) -> Path:
    """Generate the synthetic set with the shipped recipe, resized and with more specimens."""
    from twin.generate import generate_dataset

    text = (ROOT / "recipes" / "sem_voronoi_grains.yaml").read_text()
    text = re.sub(r"^size: .*$", f"size: [{size}, {size}]", text, flags=re.M)
    text = re.sub(r"^samples: .*$", f"samples: {n}", text, flags=re.M)
    text = re.sub(r"^specimens: .*$", f"specimens: {n // 2}", text, flags=re.M)
    text = re.sub(r"^  grains_per_field: .*$", "  grains_per_field: [8, 60]", text, flags=re.M)
    recipe = workdir / "tutorial.yaml"
    recipe.write_text(text)
    return generate_dataset(recipe, workdir / "grains.h5", n=n, seed=seed, progress=False)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Images (percentile-normalised), boundary labels, specimen ids, grain density."""
    from twin.dataset import open_dataset

    with open_dataset(path) as ds:
        imgs, bnd, dens = [], [], []
        for i in range(len(ds)):
            im = ds.image(i).astype(np.float32)
            lo, hi = np.percentile(im, (1, 99))
            imgs.append(((im - lo) / max(hi - lo, 1e-6)).astype(np.float32))
            bnd.append(ds.label("boundary", i).astype(np.int64))
            dens.append(ds.params(i)["specimen"]["grains_per_field"])
        spec = ds.specimen_ids()
    return {"x": np.stack(imgs)[:, None], "boundary": np.stack(bnd), "specimen": spec,
            "density": np.asarray(dens, dtype=np.float64)}


def pretrain_task_a(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, norm: str) -> tuple[UNet, list[dict]]:
    net = seeded_build(lambda: UNet(1, 2, depth=3, width=8, norm=norm), seed)
    data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    hist = Trainer(net, data, config=TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, seed=seed,
                                                 progress=False, scheduler="cosine")).fit()
    return net, hist.rows


def classifier_from(encoder: torch.nn.Module | None, seed: int, norm: str) -> Classifier:
    def build() -> Classifier:
        enc = copy.deepcopy(encoder) if encoder is not None else UNet(1, 2, depth=3, width=8, norm=norm).encoder
        return Classifier(enc, num_classes=2,
                          encoder_config={"source": "conv", "depth": 3, "width": 8, "norm": norm})
    return seeded_build(build, seed)


def train_task_b(model: Classifier, train: TensorDataset, test: TensorDataset, epochs: int, steps: int,
                 lr: float, seed: int) -> tuple[list[dict], dict]:
    curves: list[dict] = []

    def record(row: dict) -> None:
        res = evaluate_classification(model, test)
        curves.append({"epoch": row["epoch"], "train_loss": row["train_loss"],
                       "test_loss": res["loss"], "test_accuracy": res["accuracy"]})

    # the same number of optimiser steps whatever N: small sets are seen many times
    cfg = TrainConfig(task="classification", epochs=epochs, batch_size=min(16, len(train)), lr=lr,
                      steps_per_epoch=steps, seed=seed, progress=False, scheduler="cosine")
    Trainer(model, train, config=cfg, on_epoch_end=record).fit()
    return curves, evaluate_classification(model, test)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/transfer_gap", help="output folder")
    p.add_argument("--labels", type=int, nargs="+", default=[4, 16, 64, 192],
                   help="label counts N for task B")
    p.add_argument("--seeds", type=int, default=3, help="repetitions per N")
    p.add_argument("--samples", type=int, default=640, help="synthetic images generated")
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=15, help="task-B epochs (test accuracy after each)")
    p.add_argument("--steps", type=int, default=20, help="task-B optimiser steps per epoch")
    p.add_argument("--norm", default="batch", choices=("batch", "group"),
                   help="normalisation in every network (default batch; the frozen backbone's BatchNorm is pinned)")
    p.add_argument("--quick", action="store_true", help="fewer samples, seeds and epochs (for tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.seeds, args.pretrain_epochs, args.epochs, args.steps = 400, 2, 4, 8, 8
        args.labels = [4, 16, 64]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        arrays = load_arrays(make_data(Path(tmp), args.samples, 96, args.seed))
    spec = arrays["specimen"]
    rng = np.random.default_rng(args.seed)
    specimens = rng.permutation(np.unique(spec))
    half = len(specimens) // 2
    pool_a = np.isin(spec, specimens[:half])
    pool_b_specs = specimens[half:]
    b_test_specs = pool_b_specs[: len(pool_b_specs) // 3]
    b_test = np.isin(spec, b_test_specs)
    b_train = np.isin(spec, pool_b_specs) & ~b_test
    threshold = float(np.median(arrays["density"][~pool_a]))
    label_b = (arrays["density"] > threshold).astype(np.int64)  # 1 = fine grains
    print(f"{len(spec)} images: pool A {pool_a.sum()} (task A), pool B train {b_train.sum()} / "
          f"test {b_test.sum()} (task B, disjoint specimens); fine/coarse split at "
          f"{threshold:.0f} grains per field ({time.monotonic() - t0:.0f} s)", flush=True)

    net, a_log = pretrain_task_a(arrays["x"][pool_a], arrays["boundary"][pool_a], args.pretrain_epochs, args.seed,
                                 args.norm)
    print(f"task A pretrained: train loss {a_log[0]['train_loss']:.3f} -> {a_log[-1]['train_loss']:.3f} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)

    x_t, y_t = torch.from_numpy(arrays["x"]), torch.from_numpy(label_b)
    test = TensorDataset(x_t[b_test], y_t[b_test])
    train_idx = np.flatnonzero(b_train)
    results: list[dict] = []
    for n in args.labels:
        for s in range(args.seeds):
            r = np.random.default_rng([args.seed, n, s])
            # balanced draw of n labelled images
            pos, neg = train_idx[label_b[train_idx] == 1], train_idx[label_b[train_idx] == 0]
            pick = np.concatenate([r.choice(pos, n // 2, replace=False), r.choice(neg, n - n // 2, replace=False)])
            train = TensorDataset(x_t[pick], y_t[pick])
            row = {"labels": n, "seed": s}
            for name in ("scratch", "transfer"):
                if name == "scratch":
                    model = classifier_from(None, 100 + s, args.norm)
                    lr = 1e-3
                else:
                    model = classifier_from(net.encoder, 100 + s, args.norm)
                    freeze(model, "backbone", bn="eval")
                    lr = 1e-2
                curves, final = train_task_b(model, train, test, args.epochs, args.steps, lr, seed=s)
                row[name] = {"accuracy": final["accuracy"], "loss": final["loss"], "curves": curves}
            row["gap"] = row["transfer"]["accuracy"] - row["scratch"]["accuracy"]
            results.append(row)
            print(f"N={n:4d} seed {s}: scratch {row['scratch']['accuracy']:.3f}  transfer "
                  f"{row['transfer']['accuracy']:.3f}  gap {row['gap']:+.3f} ({time.monotonic() - t0:.0f} s)",
                  flush=True)

    summary = []
    for n in args.labels:
        rows = [r for r in results if r["labels"] == n]
        summary.append({"labels": n,
                        "scratch": float(np.mean([r["scratch"]["accuracy"] for r in rows])),
                        "transfer": float(np.mean([r["transfer"]["accuracy"] for r in rows])),
                        "gap": float(np.mean([r["gap"] for r in rows])),
                        "gap_sd": float(np.std([r["gap"] for r in rows]))})
    seconds = round(time.monotonic() - t0, 1)
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": results, "task_a_log": a_log,
                                                  "seconds": seconds, "args": vars(args)}, indent=1))
    md = ["| labels N | scratch accuracy | transfer accuracy | gap (transfer - scratch) |", "|---|---|---|---|"]
    md += [f"| {s['labels']} | {s['scratch']:.3f} | {s['transfer']:.3f} | {s['gap']:+.3f} ± {s['gap_sd']:.3f} |"
           for s in summary]
    (out / "results.md").write_text("\n".join(md) + f"\n\n{args.seeds} seeds per N; {seconds:.0f} s in all.\n")
    plot(results, summary, out / "transfer_gap.png")
    print("\n".join(md))
    print(f"wrote {out}/transfer_gap.png, results.json, results.md ({seconds:.0f} s)")
    return 0


def plot(results: list[dict], summary: list[dict], path: Path) -> None:
    """Accuracy and loss curves per N (scratch dashed, transfer solid) and the gap against N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the numbers are in results.json/results.md anyway
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(summary)))
    for c, s in zip(colours, summary):
        rows = [r for r in results if r["labels"] == s["labels"]]
        for name, style in (("scratch", "--"), ("transfer", "-")):
            acc = np.mean([[e["test_accuracy"] for e in r[name]["curves"]] for r in rows], axis=0)
            loss = np.mean([[e["test_loss"] for e in r[name]["curves"]] for r in rows], axis=0)
            ep = np.arange(1, len(acc) + 1)
            ax[0].plot(ep, acc, style, color=c, label=f"N={s['labels']} {name}")
            ax[1].plot(ep, loss, style, color=c)
    ax[0].set(xlabel="epoch", ylabel="test accuracy", title="task B accuracy (dashed: scratch)")
    ax[0].legend(fontsize=7, ncol=2)
    ax[1].set(xlabel="epoch", ylabel="test loss", title="task B loss", yscale="log")
    n = [s["labels"] for s in summary]
    ax[2].plot(n, [s["scratch"] for s in summary], "o--", label="scratch")
    ax[2].plot(n, [s["transfer"] for s in summary], "o-", label="frozen pretrained backbone")
    ax[2].bar(n, [s["gap"] for s in summary], width=[0.25 * v for v in n], alpha=0.3, label="gap")
    ax[2].set(xscale="log", xlabel="labelled images N", ylabel="test accuracy",
              title="transfer gap against labels")
    ax[2].axhline(0.5, color="grey", lw=0.5)
    ax[2].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
