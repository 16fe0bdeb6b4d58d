"""Slow end-to-end runs: pretrain -> fine-tune on 4 real crops -> evaluate; the transfer tutorial."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _sdk_helpers import ROOT, TBM  # noqa: E402
from twin.cli import main  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(not (TBM / "images").is_dir(), reason="../shared/data/real/tbm-grains not present")
def test_pretrain_finetune_on_4_tbm_crops_and_evaluate_heldout_micrographs(tmp_path, capsys):
    """Acceptance (issue 6): synthetic pretraining, fine-tuning on 4 crops of tbm-grains, boundary
    F1 on micrographs not used for fine-tuning, all from the CLI on the CPU in under 10 minutes."""
    t0 = time.monotonic()
    syn = tmp_path / "syn.h5"
    assert main(["generate", str(ROOT / "recipes" / "sem_voronoi_grains.yaml"), "-o", str(syn),
                 "-n", "48", "-q"]) == 0
    pre, tuned = tmp_path / "pre.pt", tmp_path / "tuned.pt"
    assert main(["train", str(syn), "-o", str(pre), "--crop", "128", "--width", "16", "--depth", "4",
                 "--epochs", "15", "--steps-per-epoch", "25", "--max-minutes", "3", "--seed", "0", "-q"]) == 0
    t_train = time.monotonic() - t0
    assert main(["finetune", str(pre), "--real", str(TBM), "--labels", "4", "-o", str(tuned),
                 "--max-minutes", "2", "--seed", "0", "-q"]) == 0
    t_tune = time.monotonic() - t0
    assert main(["evaluate", str(tuned), "--real", str(TBM), "-o", str(tmp_path / "ev")]) == 0
    took = time.monotonic() - t0
    # the synthetic-only model on the same held-out images, for comparison
    held = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    files = [r["image"] for r in held["per_image"]]
    assert main(["evaluate", str(pre), "--real", str(TBM), "-o", str(tmp_path / "ev_pre"), "--files", *files]) == 0
    base = json.loads((tmp_path / "ev_pre" / "metrics.json").read_text())

    meta = torch.load(tuned, map_location="cpu", weights_only=True)
    split = meta["split"]
    assert len(split["train_files"]) == 4 and len(set(split["train_groups"])) == 4
    assert set(held["per_group"]).isdisjoint(split["train_groups"])          # grouped by micrograph
    assert set(held["per_group"]) == set(split["heldout_groups"]) and held["n_images"] >= 30
    f1 = held["overall"]["boundary_f1"]
    assert 0.3 < f1 <= 1 and np.isfinite(held["overall"]["grain_size_error"])
    assert took < 600
    with capsys.disabled():
        print(f"\n[e2e] train {t_train:.0f} s, finetune {t_tune - t_train:.0f} s, evaluate "
              f"{took - t_tune:.0f} s, total {took:.0f} s; held-out micrographs {len(held['per_group'])} "
              f"({held['n_images']} crops): boundary F1 {f1:.3f} (P {held['overall']['boundary_precision']:.3f}, "
              f"R {held['overall']['boundary_recall']:.3f}), grain-size error "
              f"{held['overall']['grain_size_error']:.3f}; synthetic-only on the same crops: F1 "
              f"{base['overall']['boundary_f1']:.3f}, grain-size error {base['overall']['grain_size_error']:.3f}")


@pytest.mark.slow
def test_transfer_gap_tutorial_runs(tmp_path):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(ROOT / "recipes" / "tutorials" / "transfer_gap.py"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.monotonic() - t0 < 300
    out = json.loads((tmp_path / "results.json").read_text())
    assert [s["labels"] for s in out["summary"]] == [4, 16, 64]
    for run in out["runs"]:
        for name in ("scratch", "transfer"):
            assert 0 <= run[name]["accuracy"] <= 1 and len(run[name]["curves"]) == 8
    # the frozen pretrained backbone carries grain-density information: well above chance
    assert np.mean([s["transfer"] for s in out["summary"]]) > 0.6
    assert (tmp_path / "transfer_gap.png").stat().st_size > 10_000 and (tmp_path / "results.md").exists()
