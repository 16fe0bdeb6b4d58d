"""``twin train | finetune | evaluate | predict`` end to end on tiny data (fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _sdk_helpers import ROOT, make_real_folder, make_synthetic  # noqa: E402
from twin.cli import main  # noqa: E402

TINY = ["--crop", "48", "--depth", "3", "--width", "4", "--batch-size", "4", "--augment", "none"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    syn = make_synthetic(tmp, size=96, samples=8, specimens=4)
    real = make_real_folder(tmp, syn)
    model = tmp / "m.pt"
    rc = main(["train", str(syn), "-o", str(model), *TINY, "--epochs", "2", "--steps-per-epoch", "3",
               "--max-minutes", "2", "--seed", "1", "-q"])
    assert rc == 0
    return {"tmp": tmp, "syn": syn, "real": real, "model": model}


def test_register_does_not_import_torch_and_commands_are_listed():
    code = ("import sys, argparse, sdk.cli; p = argparse.ArgumentParser(); "
            "sdk.cli.register(p.add_subparsers()); assert 'torch' not in sys.modules, 'torch imported'; "
            "from twin.cli import build_parser; h = build_parser().format_help(); "
            "assert all(c in h for c in ('train', 'finetune', 'evaluate', 'predict')), h; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_train_writes_model_log_and_grouped_split(work):
    meta = torch.load(work["model"], map_location="cpu", weights_only=True)
    assert meta["data"]["label"] == "boundary" and meta["data"]["channels"] == 1
    assert meta["data"]["boundary_class"] == 1 and meta["data"]["classes"] == ["grain", "boundary"]
    assert meta["model_config"]["depth"] == 3 and meta["model_config"]["width"] == 4
    assert len(meta["log"]) == 2 and meta["train"]["monitor"] == "val_boundary_f1"
    val_specimens = set(meta["split"]["val_specimens"])
    assert val_specimens and meta["split"]["n_train"] + meta["split"]["n_val"] == 8
    log = work["tmp"] / "m_log"
    assert (log / "log.csv").exists() and (log / "log.json").exists() and (log / "curves.png").exists()


@pytest.mark.parametrize("argv,match", [
    (["--label", "grain_id"], "instance label"),
    (["--label", "twin"], "no label 'twin'"),
    (["--max-minutes", "0"], "max-minutes"),
    (["--crop", "0"], "--crop"),
])
def test_train_user_errors_are_one_line_exit_2(work, capsys, argv, match):
    rc = main(["train", str(work["syn"]), "-o", str(work["tmp"] / "x.pt"), *TINY, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.startswith("twin: error:") and err.count("\n") == 1
    assert not (work["tmp"] / "x.pt").exists()


def test_missing_inputs_are_user_errors(work, capsys):
    assert main(["train", str(work["tmp"] / "nope.h5"), "-o", str(work["tmp"] / "x.pt")]) == 2
    assert main(["train", str(work["syn"]), "-o", str(work["tmp"] / "no" / "x.pt")]) == 2
    assert main(["finetune", str(work["tmp"] / "nope.pt"), "--real", str(work["real"]), "--labels", "2",
                 "-o", str(work["tmp"] / "x.pt")]) == 2
    assert main(["evaluate", str(work["model"]), "--real", str(work["tmp"])]) == 2  # no images/ masks/
    assert main(["finetune", str(work["model"]), "--real", str(work["real"]), "--labels", "2",
                 "--label", "phase", "-o", str(work["tmp"] / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "images/ and masks/" in err and "does not match the model" in err


def test_finetune_evaluate_predict(work, capsys):
    tuned = work["tmp"] / "tuned.pt"
    rc = main(["finetune", str(work["model"]), "--real", str(work["real"]), "--labels", "2", "-o", str(tuned),
               "--epochs", "3", "--steps-per-epoch", "2", "--epochs-per-stage", "1", "--batch-size", "2",
               "--augment", "none", "--max-minutes", "2", "--seed", "3", "-q"])
    assert rc == 0
    meta = torch.load(tuned, map_location="cpu", weights_only=True)
    split = meta["split"]
    assert len(split["train_files"]) == 2 and len(split["train_groups"]) == 2  # distinct micrographs
    assert set(split["heldout_groups"]) == {"a", "b", "c", "d"} - set(split["train_groups"])
    assert [r["stage"] for r in meta["log"]] == [0, 1, 2]
    lrs = meta["finetune"]["lrs"]
    assert lrs["encoder.blocks.0"] == pytest.approx(1e-5)
    assert lrs["encoder.blocks.0"] < lrs["encoder.blocks.1"] < lrs["encoder.blocks.2"] < lrs["head"] == 1e-3
    assert meta["pretrain"]["log"] and meta["stage"] == "finetune"

    out = work["tmp"] / "eval"
    capsys.readouterr()
    assert main(["evaluate", str(tuned), "--real", str(work["real"]), "-o", str(out), "--saliency"]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep["per_group"]) == set(split["heldout_groups"])
    assert rep["n_images"] == 4 and all(r["group"] not in split["train_groups"] for r in rep["per_image"])
    for r in rep["per_image"]:
        assert 0 <= r["boundary_f1"] <= 1 and 0 <= r["iou"] <= 1
    assert np.isclose(rep["overall"]["boundary_f1"], np.mean([g["boundary_f1"] for g in rep["per_group"].values()]))
    assert "saliency" in rep and {"border", "corners", "structure"} <= set(rep["saliency"]["mean"])
    md = (out / "metrics.md").read_text()
    assert "| micrograph |" in md and "mean of micrographs" in md and "Grad-CAM" in md
    for png in ("predictions.png", "saliency.png"):
        assert (out / png).stat().st_size > 1000
    assert "boundary F1" in capsys.readouterr().out

    out_all = work["tmp"] / "eval_all"
    assert main(["evaluate", str(tuned), "--real", str(work["real"]), "-o", str(out_all), "--all"]) == 0
    assert json.loads((out_all / "metrics.json").read_text())["n_images"] == 8

    # predict: one image larger than the tile (tiled), one folder; outputs at the input size
    from PIL import Image

    big = work["tmp"] / "inputs"
    big.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, size=(150, 230, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(big / "large.png")
    pred = work["tmp"] / "pred"
    assert main(["predict", str(tuned), str(big / "large.png"), str(work["real"] / "images"), "-o", str(pred),
                 "--tile", "64", "--overlap", "16"]) == 0
    prob = np.asarray(Image.open(pred / "probs" / "large.png"))
    mask = np.asarray(Image.open(pred / "masks" / "large.png"))
    assert prob.shape == mask.shape == (150, 230) and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, prob >= 128)
    assert len(list((pred / "masks").glob("*.png"))) == 9
    # --tta: the 8-fold mean; a mirrored input gives the mirrored probability map
    Image.fromarray(np.ascontiguousarray(rgb[:, ::-1])).save(big / "mirrored.png")
    tta = work["tmp"] / "pred_tta"
    assert main(["predict", str(tuned), str(big / "large.png"), str(big / "mirrored.png"), "-o", str(tta),
                 "--tile", "64", "--overlap", "16", "--tta"]) == 0
    p1 = np.asarray(Image.open(tta / "probs" / "large.png")).astype(int)
    p2 = np.asarray(Image.open(tta / "probs" / "mirrored.png")).astype(int)
    assert np.abs(p1 - p2[:, ::-1]).max() <= 1          # 8-bit rounding
    (big / "mirrored.png").unlink()
    # two inputs with one name would overwrite each other: refused
    (big / "sub").mkdir()
    Image.fromarray(rgb).save(big / "sub" / "large.png")
    assert main(["predict", str(tuned), str(big / "large.png"), str(big / "sub"), "-o", str(pred)]) == 2


def test_evaluate_refuses_when_nothing_is_held_out(work, capsys):
    tuned = work["tmp"] / "all4.pt"
    rc = main(["finetune", str(work["model"]), "--real", str(work["real"]), "--labels", "4", "-o", str(tuned),
               "--epochs", "1", "--steps-per-epoch", "1", "--augment", "none", "-q"])
    assert rc == 2 and "no micrograph is left" in capsys.readouterr().err
    assert not tuned.exists()


def test_choose_crops_spreads_over_micrographs():
    from sdk.cli import choose_crops

    names = [f"{g}-{i}.png" for g in "abcdef" for i in range(3)]
    groups = [n[0] for n in names]
    tr, va = choose_crops(names, groups, k=4, v=2, seed=0)
    assert len({n[0] for n in tr}) == 4 and len(va) == 2
    assert not {n[0] for n in va} & {n[0] for n in tr}
    assert choose_crops(names, groups, 4, 2, 0) == (tr, va) and choose_crops(names, groups, 4, 2, 1) != (tr, va)
    tr8, _ = choose_crops(names, groups, k=8, v=0, seed=0)  # more crops than micrographs: round robin
    assert len(tr8) == 8 and len(set(tr8)) == 8 and len({n[0] for n in tr8}) == 6


def test_finetune_tunes_a_stored_threshold_that_predict_uses(work, monkeypatch):
    from PIL import Image

    from sdk import threshold as thr

    calls = []
    real_tune = thr.tune_threshold

    def spy(probs, masks, **kw):  # the tuning sees the training images only
        calls.append((len(probs), kw["objective"], kw["task"]))
        return real_tune(probs, masks, **kw)

    monkeypatch.setattr(thr, "tune_threshold", spy)
    tuned = work["tmp"] / "tuned_th.pt"
    assert main(["finetune", str(work["model"]), "--real", str(work["real"]), "--labels", "2", "-o", str(tuned),
                 "--epochs", "2", "--steps-per-epoch", "2", "--epochs-per-stage", "1", "--batch-size", "2",
                 "--augment", "none", "--max-minutes", "2", "--seed", "3", "-q",
                 "--tune-threshold", "grain_size"]) == 0
    assert calls == [(2, "grain_size", "boundary")]
    meta = torch.load(tuned, map_location="cpu", weights_only=True)
    dt = meta["decision_threshold"]
    assert 0 < dt["value"] < 1 and dt["tuned_on"] == meta["split"]["train_files"]
    assert meta["stage"] == "finetune" and meta["log"]  # the rest of the metadata survives the rewrite
    # predict uses the stored threshold unless --threshold overrides it
    src = work["real"] / "images" / meta["split"]["train_files"][0]
    for extra, th in (([], dt["value"]), (["--threshold", "0.5"], 0.5)):
        out = work["tmp"] / f"pred_th{len(extra)}"
        assert main(["predict", str(tuned), str(src), "-o", str(out), *extra]) == 0
        prob = np.asarray(Image.open(out / "probs" / src.name)).astype(float) / 255
        mask = np.asarray(Image.open(out / "masks" / src.name)) == 255
        near = np.abs(prob - th) < 1 / 255  # 8-bit rounding of the stored probability
        assert np.array_equal(mask[~near], (prob >= th)[~near])
