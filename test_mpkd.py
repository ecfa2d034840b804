"""Tests of the method, the core (mpkd.py) and the card's three scripts (train_teacher.py,
distill.py, evaluate.py): CPU only, tiny synthetic image folders, no downloads. The shared data and
models are in conftest.py; predict.py and export.py have test files of their own.

    python -m pytest -q test_mpkd.py
"""

import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import distill
import evaluate
import export
import mpkd
import predict
import train_teacher
from conftest import (CRC_SAMPLES, FAST, HERE, LAYOUT, SAMPLES, external_folder, layout_pixels, make_dataset, parser_of,
                      read_csv, run_script, standin_tile, student_argv, teacher_argv, without_timing)


# ----------------------------------------------------------------------------------------------
# Losses


@pytest.mark.parametrize("temperature,weight", [(1.0, 0.5), (5.0, 0.5), (5.0, 0.9), (2.5, 1.0)])
def test_kd_loss_matches_the_explicit_formula(temperature, weight):
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 8), torch.randn(6, 8), torch.randint(0, 8, (6,))
    ps, pt = mpkd.soften(s, temperature), mpkd.soften(t, temperature)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()  # KL(teacher || student), averaged over the batch
    ce = -F.log_softmax(s, 1)[torch.arange(6), y].mean()
    expected = (1 - weight) * ce + weight * temperature**2 * kl
    assert torch.allclose(mpkd.kd_loss(s, t, y, temperature, weight), expected, atol=1e-5)


def test_kd_loss_special_cases():
    torch.manual_seed(1)
    s, t, y = torch.randn(5, 8), torch.randn(5, 8), torch.randint(0, 8, (5,))
    ce = F.cross_entropy(s, y)
    assert torch.equal(mpkd.kd_loss(s, t, y, 5.0, 0.0), ce)  # w = 0 is plain cross-entropy
    assert torch.allclose(mpkd.kd_loss(s, s.clone(), y, 5.0, 0.5), 0.5 * ce, atol=1e-6)  # equal logits: KL = 0
    kl_only = [mpkd.kd_loss(s * T, t * T, y, T, 1.0) for T in (1.0, 3.0)]  # same soft targets, T^2 apart
    assert torch.allclose(kl_only[1], 9 * kl_only[0], rtol=1e-4)


def test_soften_is_a_distribution_and_uniform_at_high_temperature():
    logits = torch.tensor([[10.0, -3.0, 0.5, 2.0]])
    assert torch.allclose(mpkd.soften(logits, 1.0).sum(1), torch.ones(1))
    assert torch.allclose(mpkd.soften(logits, 1e6), torch.full((1, 4), 0.25), atol=1e-5)
    assert mpkd.soften(logits, 1.0)[0, 0] > 0.99


# ----------------------------------------------------------------------------------------------
# Schedule


def test_schedule_paper_case():
    assert mpkd.teacher_schedule(50, list(range(5, 51, 5))) == [e for e in range(5, 51, 5) for _ in range(5)]


@pytest.mark.parametrize("epochs,stored,expected", [
    (100, [5, 10], [5] * 50 + [10] * 50),  # stretched: equal halves
    (7, [1, 2, 3], [1, 1, 2, 2, 3, 3, 3]),  # uneven: ceil((e + 1) * 3 / 7) - 1
    (3, [10, 20, 30, 40, 50, 60], [20, 40, 60]),  # fewer student epochs than checkpoints
    (4, [50], [50] * 4),  # vanilla KD
    (1, [5, 10], [10]),  # the last epoch always learns from the final teacher
    (5, [30, 10, 20, 10], [10, 20, 20, 30, 30]),  # order and duplicates do not matter
])
def test_schedule_cases(epochs, stored, expected):
    assert mpkd.teacher_schedule(epochs, stored) == expected


def test_schedule_properties():
    for epochs in range(1, 40):
        for k in range(1, 12):
            stored = [3 * (i + 1) for i in range(k)]
            sched = mpkd.teacher_schedule(epochs, stored)
            assert len(sched) == epochs and sched[-1] == stored[-1]
            assert sched == sorted(sched) and set(sched) <= set(stored)
            counts = [sched.count(s) for s in set(sched)]
            assert max(counts) - min(counts) <= 1 if epochs >= k else len(set(sched)) == epochs


def test_schedule_refuses_empty():
    with pytest.raises(ValueError):
        mpkd.teacher_schedule(0, [5])
    with pytest.raises(ValueError):
        mpkd.teacher_schedule(5, [])


def test_stored_epochs_are_parsed_and_unknown_ones_refused():
    assert distill.parse_epochs("50, 5,15,30", [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]) == [5, 15, 30, 50]
    with pytest.raises(mpkd.UserError, match=r"\[7\].*stored epochs are \[5, 10\]"):
        distill.parse_epochs("5,7", [5, 10])
    with pytest.raises(mpkd.UserError):
        distill.parse_epochs("five", [5])


# ----------------------------------------------------------------------------------------------
# Split


def test_split_is_stratified_disjoint_covering_and_reproducible():
    labels = [c for c in range(8) for _ in range(625)]  # Kather: 625 tiles per class
    split = mpkd.split_indices(labels, 0.2, 0.2, seed=3)
    parts = [set(split[p]) for p in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(labels) and set().union(*parts) == set(range(len(labels)))
    for c in range(8):
        assert [sum(labels[i] == c for i in split[p]) for p in ("train", "val", "test")] == [400, 100, 125]
    assert split == mpkd.split_indices(labels, 0.2, 0.2, seed=3)
    assert split["test"] != mpkd.split_indices(labels, 0.2, 0.2, seed=4)["test"]


def test_split_of_tiny_classes_keeps_a_tile_on_every_side():
    split = mpkd.split_indices([0, 0, 0, 1, 1, 1], 0.2, 0.2, seed=0)
    assert [len(split[p]) for p in ("train", "val", "test")] == [2, 2, 2]


def test_grouped_split_keeps_every_slide_on_one_side():
    rng = random.Random(0)
    labels = [rng.randrange(4) for _ in range(600)]
    groups = [f"CRC-Prim-HE-{rng.randrange(10):02d}" for _ in range(600)]
    split = mpkd.split_indices(labels, 0.2, 0.2, seed=1, groups=groups)
    sides = [{groups[i] for i in split[p]} for p in ("train", "val", "test")]
    assert all(not (a & b) for a, b in [(sides[0], sides[1]), (sides[0], sides[2]), (sides[1], sides[2])])
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(600))
    assert all(sides)
    assert split == mpkd.split_indices(labels, 0.2, 0.2, seed=1, groups=groups)
    assert 0.1 < len(split["test"]) / 600 < 0.3  # roughly the asked fraction with 10 slides


def test_slide_ids_and_refusal():
    assert mpkd.slide_ids(["01_TUMOR/1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151.tif"]) == ["CRC-Prim-HE-07"]
    with pytest.raises(mpkd.UserError, match="CRC-Prim-HE"):
        mpkd.slide_ids(["a/img001.png"])


# ----------------------------------------------------------------------------------------------
# Models and data


@pytest.mark.parametrize("name,params,size_mb", [("mixnet_s", "2.61", 10.44), ("mixnet_l", "5.80", 23.218)])
def test_parameter_counts_and_sizes_match_the_paper(name, params, size_mb):
    model = mpkd.build_mixnet(name, 8, pretrained=False)
    assert f"{mpkd.count_params(model) / 1e6:.2f}" == params
    assert round(mpkd.model_size_mb(model), 3 if name == "mixnet_l" else 2) == size_mb


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="the 24 real Kather tiles are not on this machine")
def test_real_kather_tiles_load_with_their_labels():
    files, labels, classes = mpkd.find_images(SAMPLES)
    assert classes == ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA",
                       "07_ADIPOSE", "08_EMPTY"]
    assert len(files) == 24 and labels == [c for c in range(8) for _ in range(3)]
    assert all(f.split("/")[0] == classes[label] for f, label in zip(files, labels))
    images = mpkd.load_images(SAMPLES, files, 112)
    assert images.shape == (24, 3, 112, 112) and images.dtype == torch.uint8
    with Image.open(SAMPLES / files[0]) as img:  # resizing is PIL's bilinear, exactly
        expected = np.asarray(img.convert("RGB").resize((112, 112), Image.BILINEAR))
    assert torch.equal(images[0], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    assert len(set(mpkd.slide_ids(files))) > 1


def test_mixed_modes_and_sizes_become_rgb_of_the_training_size(tmp_path):
    root = make_dataset(tmp_path / "d", classes=2, per_class=2)
    Image.new("RGBA", (50, 30), (10, 20, 30, 128)).save(root / "01_CLASS0" / "rgba.png")
    Image.new("L", (20, 20), 77).save(root / "02_CLASS1" / "grey.tif")
    files, _, _ = mpkd.find_images(root)
    images = mpkd.load_images(root, files, 32)
    assert images.shape == (6, 3, 32, 32)
    assert images[files.index("01_CLASS0/rgba.png")].flatten(1).float().mean(1).tolist() == [10, 20, 30]
    assert (images[files.index("02_CLASS1/grey.tif")] == 77).all()


def test_network_input_flips_and_normalises_on_the_input_device():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).view(2, 3, 2, 4)
    out = mpkd.network_input(x, torch.tensor([False, True]))
    mean = torch.tensor(mpkd.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(mpkd.IMAGENET_STD).view(1, 3, 1, 1)
    plain = (x.float() / 255 - mean) / std
    assert torch.allclose(out[0], plain[0]) and torch.allclose(out[1], plain[1].flip(2))
    assert out.device == x.device and out.dtype == torch.float32


def test_classification_report_against_hand_computed_values():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    rep = evaluate.classification_report(y_true, y_pred, 4)
    assert rep["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert rep["precision"] == pytest.approx([100, 50, 50, 0])
    assert rep["recall"] == pytest.approx([200 / 3, 50, 100, 0])
    assert rep["f1"] == pytest.approx([80, 50, 200 / 3, 0])
    assert rep["accuracy"] == pytest.approx(400 / 6)
    assert rep["balanced_accuracy"] == pytest.approx((200 / 3 + 50 + 100) / 3)  # class 3 is absent
    assert rep["macro_f1"] == pytest.approx((80 + 50 + 200 / 3) / 3)  # class 3 is absent here too
    assert rep["absent"] == [3]
    assert rep["support"] == [3, 2, 1, 0]


def test_seed_aggregation_and_paired_difference():
    rows = [{"method": mpkd.METHODS[m], "method_key": m, "network": "MixNet-S", "accuracy": a, "params_m": 2.61,
             "size_mb": 10.44, "pair_key": [s, "f"]}
            for m, accs in [("multipart", [90.0, 92.0, 94.0]), ("vanilla", [89.0, 92.5, 91.0])]
            for s, a in enumerate(accs)]
    rows.append({"method": "teacher", "method_key": "teacher", "network": "MixNet-L", "accuracy": 95.0,
                 "params_m": 5.8, "size_mb": 23.2, "pair_key": [0, "f"]})
    summary = evaluate.summarise(rows)
    assert [(s["method"], s["n"]) for s in summary] == [("teacher", 1), ("vanilla KD", 3), ("Multi-Part KD", 3)]
    assert summary[2]["accuracy_mean"] == pytest.approx(92.0) and summary[2]["accuracy_std"] == pytest.approx(2.0)
    assert summary[0]["accuracy_std"] is None and summary[0]["accuracy_ci95"] is None  # one run: no spread
    assert summary[2]["accuracy_ci95"] == pytest.approx([92 - 4.302652729911275 * 2 / 3**0.5,
                                                         92 + 4.302652729911275 * 2 / 3**0.5])
    paired = evaluate.paired_difference(rows)
    assert paired["diffs"] == pytest.approx([1.0, -0.5, 3.0])
    assert paired["mean"] == pytest.approx(3.5 / 3)
    assert paired["std"] == pytest.approx(np.std([1.0, -0.5, 3.0], ddof=1))
    half = 4.302652729911275 * paired["std"] / 3**0.5  # t(0.975, df=2) from a printed t table
    assert paired["ci95"] == pytest.approx([3.5 / 3 - half, 3.5 / 3 + half])
    assert paired["wins"] == 2 and paired["ties"] == 0


def test_seed_summary_and_paired_difference_are_printed_with_their_values():
    rows = [{"method": mpkd.METHODS[m], "method_key": m, "network": "MixNet-S", "accuracy": a, "params_m": 2.61,
             "size_mb": 10.44, "pair_key": [s, "f"], "accuracy_ci95": [a - 1, a + 1], "clustered": None,
             "precision": "fp32", "data": {}, "n_test": 1000, "checkpoint": f"{m}{s}.pt"}
            for m, accs in [("multipart", [90.0, 92.0, 94.0]), ("vanilla", [89.0, 92.5, 91.0])]
            for s, a in enumerate(accs)]
    rows.append({**rows[0], "method": "teacher", "method_key": "teacher", "network": "MixNet-L", "accuracy": 95.0,
                 "params_m": 5.8, "size_mb": 23.2, "checkpoint": "teacher.pt"})
    lines = evaluate.table_lines(rows, evaluate.summarise(rows), evaluate.paired_difference(rows), [])
    start = next(i for i, line in enumerate(lines) if "mean +- std" in line) + 1
    teacher, vanilla, multipart = (line.split() for line in lines[start:start + 3])
    half = 4.302652729911275 * 2 / 3**0.5  # t(0.975, df=2) x std 2 / sqrt(3)
    assert multipart == ["Multi-Part", "KD", "MixNet-S", "92.00", "+-", "2.00",
                         f"[{92 - half:.2f},", f"{92 + half:.2f}]", "3", "2.61", "10.440"]
    assert vanilla[:6] == ["vanilla", "KD", "MixNet-S", "90.83", "+-", "1.76"]
    assert teacher == ["teacher", "MixNet-L", "95.00", "-", "1", "5.80", "23.200"]  # one run: no spread, no interval
    paired = [line for line in lines if "paired by seed" in line or "t-interval" in line]
    std = float(np.std([1.0, -0.5, 3.0], ddof=1))
    lo, hi = 3.5 / 3 - 4.302652729911275 * std / 3**0.5, 3.5 / 3 + 4.302652729911275 * std / 3**0.5
    assert paired == ["Multi-Part KD - vanilla KD, paired by seed [0, 1, 2]: +1.00 -0.50 +3.00 points",
                      f"  mean +1.17, std {std:.2f}, 95% t-interval of the mean [{lo:+.2f}, {hi:+.2f}]; "
                      f"Multi-Part KD ahead on 2 of 3 seeds"]
    speed = lambda ms, per_s: {"latency_ms": ms, "throughput": per_s, "train_step_images_per_s": 1.0,
                               "kd_step_images_per_s": 1.0}
    rows = [{**r, "benchmark": speed(10.0, 100.0) if r["method"] == "teacher" else speed(4.0, 500.0)} for r in rows]
    lines = evaluate.table_lines(rows, evaluate.summarise(rows), None, [])
    assert lines[-1] == "MixNet-S vs MixNet-L: 2.50x lower batch-1 latency, 5.00x throughput"


def test_wilson_interval_against_hand_computed_values():
    # 8 of 10 right, z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10), half-width
    # z * sqrt(0.8 * 0.2 / 10 + z^2 / 400) / (1 + z^2/10)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.016 + z * z / 400) / (1 + z * z / 10)
    assert mpkd.wilson_interval(8, 10) == pytest.approx((100 * (centre - half), 100 * (centre + half)))
    assert mpkd.wilson_interval(8, 10) == pytest.approx((49.02, 94.33), abs=0.01)  # published table
    assert mpkd.wilson_interval(10, 10)[1] == pytest.approx(100) and mpkd.wilson_interval(0, 10)[0] == 0
    assert mpkd.wilson_interval(0, 0) == (0.0, 100.0)


def test_mcnemar_exact_against_hand_computed_values():
    # 12 tiles only A gets right, 7 only B: p = 2 * sum_{k<=7} C(19, k) / 2^19
    c19 = [1, 19, 171, 969, 3876, 11628, 27132, 50388]  # C(19, 0..7), written out
    assert evaluate.mcnemar_exact(12, 7) == pytest.approx(2 * sum(c19) / 2**19)
    assert evaluate.mcnemar_exact(7, 12) == evaluate.mcnemar_exact(12, 7)
    assert evaluate.mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all six discordant tiles favour B
    assert evaluate.mcnemar_exact(5, 5) == 1.0 and evaluate.mcnemar_exact(0, 0) == 1.0
    assert 0 < evaluate.mcnemar_exact(400, 330) < 1  # large counts stay exact integers until the end


@pytest.mark.parametrize("df,critical", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_critical_values_match_a_printed_t_table(df, critical):
    assert evaluate.t_critical(df) == pytest.approx(critical, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Stored teacher logits and the whole pipeline


def test_stored_teacher_logits_have_the_right_keys_shapes_and_mirror_view(trained, data_dir):
    stored = mpkd.load_file(trained / "teacher_logits.pt", mpkd.LOGITS_FORMAT)
    ckpt = mpkd.load_file(trained / "teacher.pt", mpkd.CHECKPOINT_FORMAT)
    data = mpkd.load_dataset(data_dir, 32, "tile", 0, 0.2, 0.2)
    assert sorted(stored["logits"]) == [1, 2, 3]
    assert stored["identity"] == data["identity"] == ckpt["identity"]
    assert all(v.shape == (24, 2, 4) and v.dtype == torch.float32 for v in stored["logits"].values())
    train = mpkd.load_part(data, "train", torch.device("cpu"))
    model = mpkd.load_model(ckpt, "teacher.pt")
    final = stored["logits"][3]
    assert torch.allclose(final[:, 0], mpkd.predict(model, train["images"], "fp32"), atol=1e-5)
    assert torch.allclose(final[:, 1], mpkd.predict(model, train["images"].flip(3), "fp32"), atol=1e-5)
    assert not torch.allclose(final[:, 0], final[:, 1])
    assert not torch.equal(stored["logits"][1], final)  # each epoch's teacher is its own
    log = [json.loads(line) for line in (trained / "teacher.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and all("logits_seconds" in r and "val_acc" in r for r in log)
    assert without_timing(log) == without_timing(ckpt["history"])
    assert not mpkd.state_path(trained / "teacher.pt").exists()


def test_teacher_to_multipart_student_to_evaluate(trained, data_dir, tmp_path, capsys):
    out = tmp_path / "student.pt"
    distill.main(distill.get_args(student_argv(data_dir, trained, out, "--multipart", "--epochs", "6")))
    ckpt = mpkd.load_file(out, mpkd.CHECKPOINT_FORMAT)
    assert ckpt["method"] == "multipart" and ckpt["model"] == "mixnet_s"  # a key; Multi-Part KD on display
    assert [r["teacher_epoch"] for r in ckpt["history"]] == [1, 1, 2, 2, 3, 3]
    json_path, csv_path = tmp_path / "table.json", tmp_path / "pred.csv"
    rows = evaluate.main(evaluate.get_args([str(trained / "teacher.pt"), str(out), "--data", str(data_dir),
                                            "--device", "cpu", "--json", str(json_path)]))
    printed = capsys.readouterr().out
    assert [(r["method"], r["network"]) for r in rows] == [("teacher", "MixNet-L"), ("Multi-Part KD", "MixNet-S")]
    # the reported accuracy is the checkpoint's on the 8 test images, recomputed here by hand
    data = mpkd.load_dataset(data_dir, 32, "tile", 0, 0.2, 0.2)
    test = mpkd.load_part(data, "test", torch.device("cpu"))
    expected = mpkd.accuracy(mpkd.predict(mpkd.load_model(ckpt, out), test["images"], "fp32"), test["labels"])
    assert rows[1]["accuracy"] == pytest.approx(expected)
    assert rows[1]["size_mb"] == mpkd.count_params(mpkd.load_model(ckpt, out)) * 4 / 1e6
    assert f"{expected:.2f}" in printed and f"{rows[1]['size_mb']:.3f}" in printed
    saved = json.loads(json_path.read_text())
    assert saved["checkpoints"][1]["accuracy"] == pytest.approx(expected)
    evaluate.main(evaluate.get_args([str(out), "--data", str(data_dir), "--device", "cpu",
                                     "--predictions", str(csv_path)]))
    single = capsys.readouterr().out
    assert "confusion matrix" in single and "macro-F1" in single
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 9 and lines[0].startswith("checkpoint,file,group,true,predicted,p_01_CLASS0")  # the slide
    assert sum(line.split(",")[3] == line.split(",")[4] for line in lines[1:]) == round(expected * 8 / 100)


def test_report_intervals_and_mcnemar_agree_with_the_predictions_csv(trained, student, data_dir, tmp_path):
    ckpts = [str(trained / "teacher.pt"), str(student)]
    evaluate.main(evaluate.get_args([*ckpts, "--data", str(data_dir), "--device", "cpu",
                                     "--json", str(tmp_path / "r.json"), "--predictions", str(tmp_path / "p.csv")]))
    report, rows = json.loads((tmp_path / "r.json").read_text()), read_csv(tmp_path / "p.csv")
    right = {c: {r["file"]: r["true"] == r["predicted"] for r in rows if r["checkpoint"] == c} for c in ckpts}
    for entry in report["checkpoints"]:  # recomputed from the CSV alone
        n, k = len(right[entry["checkpoint"]]), sum(right[entry["checkpoint"]].values())
        assert (entry["n_test"], entry["correct"]) == (n, k)
        assert entry["accuracy_ci95"] == pytest.approx(mpkd.wilson_interval(k, n))
        assert entry["data"]["folder"] == str(data_dir) and entry["data"]["img_size"] == 32
    [test] = report["mcnemar"]
    a, b = right[ckpts[0]], right[ckpts[1]]
    only_a, only_b = sum(a[f] and not b[f] for f in a), sum(b[f] and not a[f] for f in a)
    assert (test["only_a"], test["only_b"]) == (only_a, only_b)
    assert test["p"] == pytest.approx(evaluate.mcnemar_exact(only_a, only_b))


def test_plots_write_every_picture(trained, student, data_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    evaluate.main(evaluate.get_args([str(trained / "teacher.pt"), str(student), "--data", str(data_dir),
                                     "--device", "cpu", "--plots", str(tmp_path / "plots")]))
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["confusion_01_teacher.png", "confusion_02_student.png", "errors_01_teacher.png",
                     "errors_02_student.png", "learning_curves.png", "route_02_student.png", "table2.png"]
    for name in names:
        blob = (tmp_path / "plots" / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000  # a real picture, not an empty canvas
    assert "wrote 7 pictures" in capsys.readouterr().out


def test_plots_without_matplotlib_is_one_clear_line_after_the_report(trained, data_dir, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what a missing package looks like to import
    with pytest.raises(mpkd.UserError, match="pip install matplotlib"):
        evaluate.main(evaluate.get_args([str(trained / "teacher.pt"), "--data", str(data_dir), "--device", "cpu",
                                         "--plots", str(tmp_path / "plots"), "--json", str(tmp_path / "r.json")]))
    assert "teacher        MixNet-L" in capsys.readouterr().out  # the whole report came first
    assert json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]["method"] == "teacher"


def test_evaluate_and_distill_take_the_data_folder_the_run_recorded(trained, data_dir, tmp_path, capsys):
    distill.main(distill.get_args(["--teacher-logits", str(trained / "teacher_logits.pt"), "--out",
                                   str(tmp_path / "s.pt"), "--epochs", "1", "--batch-size", "8", "--device", "cpu"]))
    assert f"data: {data_dir}, the folder {trained / 'teacher_logits.pt'} was made from" in capsys.readouterr().out
    rows = evaluate.main(evaluate.get_args([str(tmp_path / "s.pt"), "--device", "cpu"]))
    assert rows[0]["data"]["folder"] == str(data_dir) and "data: " in capsys.readouterr().out
    ckpt = mpkd.load_file(tmp_path / "s.pt", mpkd.CHECKPOINT_FORMAT)
    ckpt["args"]["data"] = str(tmp_path / "gone")
    mpkd.save_atomic(ckpt, tmp_path / "moved.pt")
    with pytest.raises(mpkd.UserError, match=f"no --data given, and {tmp_path / 'gone'}, the data folder"):
        evaluate.main(evaluate.get_args([str(tmp_path / "moved.pt"), "--device", "cpu"]))


def test_a_wrong_data_folder_is_named_before_its_groups(tmp_path):
    root = make_dataset(tmp_path / "d", classes=3, per_class=12)
    _groups_csv(root, tmp_path / "groups.csv")
    train_teacher.main(train_teacher.get_args(teacher_argv(root, tmp_path, "--groups", tmp_path / "groups.csv",
                                                           "--epochs", "1")))
    other = make_dataset(tmp_path / "other", classes=2, per_class=12)
    with pytest.raises(mpkd.UserError, match="teacher.pt does not belong to the data folder .*other: its classes"):
        evaluate.main(evaluate.get_args([str(tmp_path / "teacher.pt"), "--data", str(other), "--device", "cpu"]))
    with pytest.raises(mpkd.UserError, match="teacher_logits.pt does not belong to the data folder"):
        distill.main(distill.get_args(["--data", str(other), "--teacher-logits", str(tmp_path / "teacher_logits.pt"),
                                       "--out", str(tmp_path / "s.pt"), "--device", "cpu"]))
    with pytest.raises(mpkd.UserError, match="does not exist: train_teacher.py writes it"):
        distill.main(distill.get_args(["--data", str(root), "--teacher-logits", str(tmp_path / "none.pt"),
                                       "--out", str(tmp_path / "s.pt"), "--device", "cpu"]))
    rows = evaluate.main(evaluate.get_args([str(tmp_path / "teacher.pt"), "--device", "cpu",
                                            "--predictions", str(tmp_path / "p.csv")]))
    table = read_csv(tmp_path / "p.csv")
    group = {line.split(",")[0]: line.split(",")[1] for line in (tmp_path / "groups.csv").read_text().splitlines()[1:]}
    assert [r["group"] for r in table] == [group[f] for f in rows[0]["files"]]  # the leakage check needs no join


def test_standin_is_idempotent_and_leaves_other_folders_alone(tmp_path):
    first = mpkd.make_standin(tmp_path / "s", classes=2, per_class=3, size=32)
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    mpkd.make_standin(tmp_path / "s", classes=2, per_class=3, size=32)  # again: nothing to do
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamp
    with pytest.raises(mpkd.UserError, match="is not a stand-in made with these settings"):
        mpkd.make_standin(tmp_path / "s", classes=2, per_class=4, size=32)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a lab's own folder")
    with pytest.raises(mpkd.UserError, match="remove it or choose another folder"):
        mpkd.make_standin(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_vanilla_alone_and_anchored_students(trained, data_dir, tmp_path):
    runs = {"vanilla.pt": [], "alone.pt": ["--distill-weight", "0", "--teacher-logits", "missing.pt"],
            "anchors.pt": ["--anchors", "1,3"]}
    for name, extra in runs.items():
        distill.main(distill.get_args(student_argv(data_dir, trained, tmp_path / name, *extra)))
    ckpts = {n: mpkd.load_file(tmp_path / n, mpkd.CHECKPOINT_FORMAT) for n in runs}
    assert ckpts["vanilla.pt"]["method"] == "vanilla"
    assert [r["teacher_epoch"] for r in ckpts["vanilla.pt"]["history"]] == [3, 3, 3]
    assert ckpts["alone.pt"]["method"] == "alone" and "teacher_epoch" not in ckpts["alone.pt"]["history"][0]
    assert [r["teacher_epoch"] for r in ckpts["anchors.pt"]["history"]] == [1, 3, 3]


def test_files_of_an_earlier_version_ask_to_be_made_again(trained, student, data_dir, tmp_path):
    new = torch.load(trained / "teacher_logits.pt", weights_only=True)
    old = {k: v for k, v in new.items() if k != "logits"}
    old.update({"format": "mpkd-teacher-outputs/1", "outputs": new["logits"]})  # the earliest names
    torch.save(old, tmp_path / "old_logits.pt")
    ckpt = torch.load(student, weights_only=True)
    ckpt.update(format="mpkd-checkpoint/1", method="Multi-Part KD")  # methods were display names then
    torch.save(ckpt, tmp_path / "old.pt")
    again = r"written by an earlier version of this code \(mpkd-{}\): re-run the command that made it"
    with pytest.raises(mpkd.UserError, match=again.format("teacher-outputs/1")):
        distill.main(distill.get_args(student_argv(data_dir, trained, tmp_path / "s.pt", "--teacher-logits",
                                                   str(tmp_path / "old_logits.pt"))))
    for script, extra in ((evaluate, []), (predict, ["--images", str(data_dir)]), (export, [])):
        with pytest.raises(mpkd.UserError, match=again.format("checkpoint/1")):
            script.main(script.get_args([str(tmp_path / "old.pt"), *extra]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt", "old_logits.pt"]


def test_shared_flags_agree_between_the_training_scripts(monkeypatch):
    # Most shared flags come from mpkd.add_training_flags; --data and --epochs are spelled out in
    # each script. Only these differ on purpose: each script's own output file and network, and the
    # ImageNet start (the paper's teacher is pretrained, its student is not).
    on_purpose = {"--out", "--model", "--pretrained"}
    flags = [{a.option_strings[0]: a for a in parser_of(m, monkeypatch)._actions if a.option_strings}
             for m in (train_teacher, distill)]
    shared = (set(flags[0]) & set(flags[1])) - on_purpose - {"-h"}
    assert {"--data", "--img-size", "--batch-size", "--lr", "--seed", "--split-seed", "--split-by",
            "--test-frac", "--val-frac", "--device", "--amp", "--resume", "--epochs"} <= shared
    for flag in sorted(shared):
        a, b = flags[0][flag], flags[1][flag]
        assert (type(a), a.default, a.help, a.type, a.choices) == (type(b), b.default, b.help, b.type, b.choices), flag


def test_multipart_with_a_single_stored_epoch_warns_and_runs_vanilla_kd(data_dir, tmp_path, capsys):
    train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path, "--save-every", "2")))
    assert list(torch.load(tmp_path / "teacher_logits.pt", weights_only=True)["logits"]) == [2]
    distill.main(distill.get_args(student_argv(data_dir, tmp_path, tmp_path / "s.pt", "--multipart", "--epochs", "1")))
    assert "vanilla KD" in capsys.readouterr().err
    assert mpkd.load_file(tmp_path / "s.pt", mpkd.CHECKPOINT_FORMAT)["method"] == "vanilla"


def test_slide_split_end_to_end_and_mixing_modes_is_refused(trained, data_dir, tmp_path, capsys):
    train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path, "--split-by", "slide", "--epochs", "1")))
    assert "slides: train" in capsys.readouterr().out
    stored = mpkd.load_file(tmp_path / "teacher_logits.pt", mpkd.LOGITS_FORMAT)
    assert stored["identity"]["split_by"] == "slide"
    with pytest.raises(mpkd.UserError, match="--split-by tile differs.*pass --split-by slide"):
        distill.main(distill.get_args(student_argv(data_dir, tmp_path, tmp_path / "s.pt", "--split-by", "tile")))
    distill.main(distill.get_args(student_argv(data_dir, tmp_path, tmp_path / "s.pt")))  # follows the teacher
    assert mpkd.load_file(tmp_path / "s.pt", mpkd.CHECKPOINT_FORMAT)["identity"] == stored["identity"]


# ----------------------------------------------------------------------------------------------
# Interrupted runs


def _interrupt_epoch(monkeypatch, n):
    """Make the n-th call of train_one_epoch a Ctrl-C; returns the real function to put back."""
    real, calls = mpkd.train_one_epoch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mpkd, "train_one_epoch", interrupted)
    return real


@pytest.mark.parametrize("method", [["--multipart"], ["--ensemble", "all"]], ids=["multipart", "ensemble"])
def test_ctrl_c_keeps_the_last_epoch_and_resume_is_bit_identical(trained, data_dir, tmp_path, monkeypatch, method):
    argv = student_argv(data_dir, trained, tmp_path / "a.pt", *method, "--epochs", "4")
    distill.main(distill.get_args(argv))
    reference = mpkd.load_file(tmp_path / "a.pt", mpkd.CHECKPOINT_FORMAT)
    argv = student_argv(data_dir, trained, tmp_path / "b.pt", *method, "--epochs", "4")
    real = _interrupt_epoch(monkeypatch, 3)
    with pytest.raises(mpkd.Interrupted, match="epoch 2 is saved.*--resume"):
        distill.main(distill.get_args(argv))
    assert mpkd.load_file(mpkd.state_path(tmp_path / "b.pt"), mpkd.STATE_FORMAT)["epoch"] == 2
    assert not (tmp_path / "b.pt").exists()
    with pytest.raises(mpkd.UserError, match="--resume"):  # a fresh start would throw the state away
        distill.main(distill.get_args(argv))
    monkeypatch.setattr(mpkd, "train_one_epoch", real)
    distill.main(distill.get_args(argv + ["--resume"]))
    resumed = mpkd.load_file(tmp_path / "b.pt", mpkd.CHECKPOINT_FORMAT)
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in reference["state_dict"].items())
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    assert not mpkd.state_path(tmp_path / "b.pt").exists()
    with pytest.raises(mpkd.UserError, match="nothing to resume"):  # complete: not trained again
        distill.main(distill.get_args(argv + ["--resume"]))


def test_resume_with_other_settings_is_refused(trained, data_dir, tmp_path, monkeypatch):
    argv = student_argv(data_dir, trained, tmp_path / "s.pt")
    monkeypatch.setattr(mpkd, "train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(mpkd.Interrupted, match="no epoch is saved"):
        distill.main(distill.get_args(argv))
    # no state was written, so the run can only start over; now leave a state behind on purpose
    mpkd.save_atomic({"format": mpkd.STATE_FORMAT, "args": vars(distill.get_args(argv + ["--resume"])),
                      "identity": mpkd.load_dataset(data_dir, 32, "tile", 0, 0.2, 0.2)["identity"]},
                     mpkd.state_path(tmp_path / "s.pt"))
    with pytest.raises(mpkd.UserError, match="seed: found 1, expected 0"):
        distill.main(distill.get_args(argv + ["--resume", "--seed", "1"]))
    with pytest.raises(mpkd.UserError, match="--img-size 48 differs"):
        distill.main(distill.get_args(argv + ["--resume", "--img-size", "48"]))


def _wait_for_new_state(proc, path):
    """Wait until `proc` has saved a new epoch state; False if it exited first."""
    before = path.stat().st_mtime_ns if path.exists() else None
    while proc.poll() is None:
        if path.exists() and path.stat().st_mtime_ns != before:
            return True
        time.sleep(0.02)
    return False


def test_teacher_killed_at_random_moments_resumes_to_identical_results(data_dir, tmp_path):
    # with stain augmentation: its random draws continue from the saved generator like the flips
    argv = ["--data", data_dir, "--no-pretrained", "--epochs", "6", "--save-every", "2", "--stain-augment", *FAST]
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ref = run_script("train_teacher.py", *argv, cwd=tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    rng, kills = random.Random(7), 0
    first = run_script("train_teacher.py", *argv, cwd=tmp_path / "run")
    deadline = time.time() + 120
    while not (tmp_path / "run" / "teacher.state.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)  # Ctrl-C in training: keeps the last completed epoch, says how to resume
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "--resume" in err and "Traceback" not in err, err[-3000:]
    state = tmp_path / "run" / "teacher.state.pt"
    done = lambda: (tmp_path / "run" / "teacher.pt").exists() and not state.exists()
    while not done():  # (a kill can land after the run completed and before the process exited)
        proc = run_script("train_teacher.py", *argv, "--resume", cwd=tmp_path / "run")
        if kills < 5 and _wait_for_new_state(proc, state):
            time.sleep(rng.uniform(0, 0.4))  # somewhere in the next epoch, its save, or the final writes
            if proc.poll() is None:
                proc.kill()  # SIGKILL: no handler runs, only the last atomic save survives
                proc.wait()
                kills += 1
                continue
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert kills >= 1
    a = {n: torch.load(tmp_path / "ref" / n, weights_only=True) for n in ("teacher.pt", "teacher_logits.pt")}
    b = {n: torch.load(tmp_path / "run" / n, weights_only=True) for n in ("teacher.pt", "teacher_logits.pt")}
    assert all(torch.equal(b["teacher.pt"]["state_dict"][k], v) for k, v in a["teacher.pt"]["state_dict"].items())
    assert sorted(b["teacher_logits.pt"]["logits"]) == [2, 4, 6]
    assert all(torch.equal(b["teacher_logits.pt"]["logits"][e], v) for e, v in a["teacher_logits.pt"]["logits"].items())
    logs = [[json.loads(x) for x in (tmp_path / d / "teacher.log.jsonl").read_text().splitlines()]
            for d in ("ref", "run")]
    assert without_timing(logs[0]) == without_timing(logs[1]) and len(logs[1]) == 6
    assert not list((tmp_path / "run").glob("*.tmp")) and not (tmp_path / "run" / "teacher.state.pt").exists()
    assert b["teacher.pt"]["args"]["stain_augment"] == mpkd.STAIN_AUGMENT


def test_atomic_save_leaves_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    mpkd.save_atomic({"format": "a", "v": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        mpkd.save_atomic({"format": "b"}, path)
    assert torch.load(path, weights_only=True)["format"] == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


# ----------------------------------------------------------------------------------------------
# The GPU path on the CPU: every branch only CUDA takes has a twin here (CUDA mocked where needed)


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device, cuda:0 (compute capability 8.0), as far as mpkd can tell."""
    fake = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
            "set_device": lambda d: None, "get_device_capability": lambda d=None: (8, 0),
            "get_device_name": lambda d=None: "Tesla V100-SXM2-16GB"}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)
    return monkeypatch


def test_cuda_devices_get_their_index_and_a_missing_one_is_refused(one_gpu):
    assert mpkd.pick_device("auto") == torch.device("cuda", 0)
    assert mpkd.pick_device("cuda").index == 0  # torch < 2.5's mem_get_info refuses a bare "cuda"
    assert mpkd.pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(mpkd.UserError, match="--device cuda:7: this machine has 1 CUDA device"):
        mpkd.pick_device("cuda:7")
    assert mpkd.pick_device("cpu") == torch.device("cpu")
    one_gpu.setattr(torch.cuda, "is_available", lambda: False)
    assert mpkd.pick_device("auto") == torch.device("cpu")
    with pytest.raises(mpkd.UserError, match="CUDA is not available"):
        mpkd.pick_device("cuda")


def test_precision_is_bf16_only_where_it_is_native_or_asked_for(one_gpu):
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [mpkd.pick_precision(gpu, amp) for amp in (None, True, False)] == ["bf16", "bf16", "fp32"]
    assert [mpkd.pick_precision(cpu, amp) for amp in (None, True, False)] == ["fp32", "bf16", "fp32"]
    one_gpu.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))  # V100: bf16 emulated
    assert mpkd.pick_precision(gpu, None) == "fp32"
    with pytest.raises(mpkd.UserError, match="V100.*compute capability 7.0.*no native bf16"):
        mpkd.pick_precision(gpu, True)
    with mpkd.autocast(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with mpkd.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_memory_check_counts_what_the_allocator_caches(monkeypatch):
    gb = 10 ** 9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * gb)  # an earlier model's, freed
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 * gb)
    monkeypatch.setattr(mpkd, "_available_host_bytes", lambda: 100 * gb)
    gpu = torch.device("cuda", 0)
    assert mpkd.free_device_bytes(gpu) == 3 * gb
    data = {"identity": {"img_size": 1000}, "split": {"test": list(range(700))}}  # 2.1 GB as uint8
    mpkd.check_memory(data, ("test",), gpu)  # fits in 0.8 x 3 GB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 1 * gb)  # nothing cached
    with pytest.raises(mpkd.UserError, match=r"cuda:0's free memory \(1.0 GB\)"):
        mpkd.check_memory(data, ("test",), gpu)


def test_peak_memory_is_logged_for_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 1_234_000_000)
    assert mpkd.peak_memory(torch.device("cuda", 0)) == {"peak_memory_mb": 1234.0}
    assert mpkd.peak_memory(torch.device("cpu")) == {}  # the CPU's is the operating system's to count
    record = {"epoch": 1, "loss": 1.0, "train_acc": 50.0, "images_per_s": None, "seconds": 2.0,
              "compile_seconds": 1.5, "peak_memory_mb": 1234.0}
    assert "compiling 1.5s" in mpkd.format_record(record) and "      - img/s" in mpkd.format_record(record)


def test_rng_states_save_and_restore_the_cuda_generator(monkeypatch):
    saved, restored = torch.tensor([1, 2, 3], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, d: restored.append((state, d)))
    gpu = torch.device("cuda", 0)
    states = mpkd.rng_states(gpu)
    assert torch.equal(states["cuda_rng"], saved) and torch.equal(states["torch_rng"], torch.get_rng_state())
    mpkd.set_rng_states(states, gpu)
    assert restored == [(saved, gpu)]
    mpkd.set_rng_states(states, torch.device("cpu"))  # resumed on the CPU: the CUDA state is not for it
    assert "cuda_rng" not in mpkd.rng_states(torch.device("cpu")) and len(restored) == 1


def test_bf16_on_the_cpu_trains_stores_logits_and_records_its_precision(data_dir, tmp_path, capsys):
    train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path, "--amp")))
    teacher = mpkd.load_file(tmp_path / "teacher.pt", mpkd.CHECKPOINT_FORMAT)
    stored = mpkd.load_file(tmp_path / "teacher_logits.pt", mpkd.LOGITS_FORMAT)
    assert teacher["precision"] == stored["precision"] == "bf16"
    assert [r["precision"] for r in teacher["history"]] == ["bf16", "bf16"]
    logits = stored["logits"][2]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # the stored logits are the bf16 pass: close to, and not the same as, an fp32 pass of the weights
    data = mpkd.load_dataset(data_dir, 32, "tile", 0, 0.2, 0.2)
    model = mpkd.to_device(mpkd.load_model(teacher, "teacher.pt"), torch.device("cpu"))
    fp32 = mpkd.both_views_logits(model, mpkd.load_part(data, "train", torch.device("cpu"))["images"], "fp32")
    assert torch.allclose(logits, fp32, atol=0.5, rtol=0.1) and not torch.equal(logits, fp32)
    distill.main(distill.get_args(student_argv(data_dir, tmp_path, tmp_path / "s.pt", "--multipart", "--amp")))
    student = mpkd.load_file(tmp_path / "s.pt", mpkd.CHECKPOINT_FORMAT)
    assert student["precision"] == "bf16" and all(math.isfinite(r["loss"]) for r in student["history"])
    assert all(math.isfinite(d["kl"]) for r in student["history"] for d in r["route"])
    capsys.readouterr()
    rows = evaluate.main(evaluate.get_args([str(tmp_path / "s.pt"), "--data", str(data_dir), "--device", "cpu"]))
    assert rows[0]["precision"] == "fp32" and "scored in fp32" in capsys.readouterr().out  # the default
    test = mpkd.load_part(data, "test", torch.device("cpu"))
    model = mpkd.to_device(mpkd.load_model(student, "s.pt"), torch.device("cpu"))
    assert rows[0]["probs"] == torch.softmax(mpkd.predict(model, test["images"], "fp32"), 1).tolist()
    bf16 = evaluate.main(evaluate.get_args([str(tmp_path / "s.pt"), "--data", str(data_dir), "--device", "cpu",
                                            "--amp"]))
    assert bf16[0]["precision"] == "bf16" and bf16[0]["probs"] != rows[0]["probs"]


def test_fused_adam_on_the_cpu_and_a_resume_that_changes_it(trained, data_dir, tmp_path, monkeypatch):
    argv = student_argv(data_dir, trained, tmp_path / "s.pt", "--multipart", "--epochs", "3")
    monkeypatch.setattr(mpkd, "fused_adam", lambda device: True)  # what a GPU run does
    real = _interrupt_epoch(monkeypatch, 3)
    with pytest.raises(mpkd.Interrupted, match="epoch 2 is saved"):
        distill.main(distill.get_args(argv))
    state = mpkd.load_file(mpkd.state_path(tmp_path / "s.pt"), mpkd.STATE_FORMAT)
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    monkeypatch.setattr(mpkd, "train_one_epoch", real)
    monkeypatch.setattr(mpkd, "fused_adam", lambda device: False)  # resumed where Adam is not fused
    loaded, load = [], mpkd.load_optimizer_state

    def spy(opt, saved):
        load(opt, saved)
        loaded.append(opt)

    monkeypatch.setattr(mpkd, "load_optimizer_state", spy)
    distill.main(distill.get_args(argv + ["--resume"]))
    group = loaded[0].param_groups[0]
    assert not group["fused"] and all(loaded[0].state[p]["step"].device.type == "cpu" for p in group["params"])
    assert len(mpkd.load_file(tmp_path / "s.pt", mpkd.CHECKPOINT_FORMAT)["history"]) == 3


def test_a_state_written_on_a_gpu_resumes_bit_identically_on_the_cpu(trained, data_dir, tmp_path, monkeypatch):
    distill.main(distill.get_args(student_argv(data_dir, trained, tmp_path / "a.pt", "--multipart", "--epochs", "4")))
    reference = mpkd.load_file(tmp_path / "a.pt", mpkd.CHECKPOINT_FORMAT)
    argv = student_argv(data_dir, trained, tmp_path / "b.pt", "--multipart", "--epochs", "4")
    real = _interrupt_epoch(monkeypatch, 3)
    with pytest.raises(mpkd.Interrupted):
        distill.main(distill.get_args(argv))
    monkeypatch.setattr(mpkd, "train_one_epoch", real)
    path = mpkd.state_path(tmp_path / "b.pt")
    state = mpkd.load_file(path, mpkd.STATE_FORMAT)  # as a GPU run writes it: fused Adam, a CUDA generator
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=True, foreach=None)
    state["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)
    mpkd.save_atomic(state, path)
    distill.main(distill.get_args(argv + ["--resume", "--device", "cpu"]))
    resumed = mpkd.load_file(tmp_path / "b.pt", mpkd.CHECKPOINT_FORMAT)
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in reference["state_dict"].items())
    assert without_timing(resumed["history"]) == without_timing(reference["history"])


def test_compile_with_a_cheap_backend_compiles_in_epoch_1_only(data_dir, tmp_path, monkeypatch):
    from torch._dynamo.backends.debugging import aot_eager
    graphs, per_epoch, real = [], [], mpkd.train_one_epoch

    def backend(gm, example_inputs):  # counts every (re)compilation
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def counted(*a, **k):
        out = real(*a, **k)
        per_epoch.append(len(graphs))
        return out

    monkeypatch.setattr(mpkd, "COMPILE_BACKEND", backend)
    monkeypatch.setattr(mpkd, "train_one_epoch", counted)
    argv = ["--data", str(data_dir), "--distill-weight", "0", "--teacher-logits", str(tmp_path / "none.pt"),
            "--out", str(tmp_path / "c.pt"), "--epochs", "2", "--img-size", "32", "--batch-size", "10",
            "--device", "cpu", "--compile"]  # 24 images: batches of 10, 10 and 4, two shapes
    distill.main(distill.get_args(argv))
    assert per_epoch[0] >= 1 and per_epoch[1] == per_epoch[0]  # no recompilation after epoch 1
    ckpt = mpkd.load_file(tmp_path / "c.pt", mpkd.CHECKPOINT_FORMAT)
    assert not any(k.startswith("_orig_mod") for k in ckpt["state_dict"])
    assert ckpt["state_dict"].keys() == mpkd.build_mixnet("mixnet_s", 4, False).state_dict().keys()
    first, second = ckpt["history"]
    assert first["compile_seconds"] > 0 and second["compile_seconds"] == 0
    assert first["images_per_s"] > 0 and "compiling" in mpkd.format_record(first)  # the third step is timed


def test_ctrl_c_during_the_state_save_names_the_epoch_on_disk(trained, data_dir, tmp_path, monkeypatch):
    real, saves = mpkd.save_atomic, []

    def interrupted_save(obj, path):
        saves.append(path)
        if len(saves) == 2:  # the state of epoch 2: Ctrl-C before it replaced epoch 1's
            raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(mpkd, "save_atomic", interrupted_save)
    with pytest.raises(mpkd.Interrupted, match="interrupted in epoch 2; epoch 1 is saved"):
        distill.main(distill.get_args(student_argv(data_dir, trained, tmp_path / "s.pt")))
    assert mpkd.load_file(mpkd.state_path(tmp_path / "s.pt"), mpkd.STATE_FORMAT)["epoch"] == 1


# ----------------------------------------------------------------------------------------------
# The README: every block runs as pasted


def _readme_blocks():
    """(heading, code) of every ```bash block in the README."""
    text, heading, blocks = (HERE / "README.md").read_text(), "", []
    for part in text.split("```"):
        if part.startswith("bash\n"):
            blocks.append((heading, part[len("bash\n"):]))
        else:
            heading = next((line for line in reversed(part.splitlines()) if line.startswith("#")), heading)
    return blocks


def test_readme_blocks_name_only_flags_the_scripts_have():
    # blocks that need the real data set or hours of training are checked flag by flag; the
    # five-minute block runs for real below, and CI runs the test command
    scripts = {"train_teacher.py": train_teacher, "distill.py": distill, "evaluate.py": evaluate,
               "predict.py": predict, "export.py": export}
    variables = {"$S": "--batch-size 16 --epochs 5 --device cpu".split(), "$s": ["0"], "$f": ["--multipart"]}
    checked = 0
    for _, code in _readme_blocks():
        for line in code.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|\(|;", line.split("#")[0]):
                words = command.split()
                if len(words) >= 2 and words[0] == "python" and words[1] in scripts:
                    scripts[words[1]].get_args([x for w in words[2:] for x in variables.get(w, [w])])
                    checked += 1
    assert checked >= 15


def test_readme_five_minute_block_runs_as_pasted_twice(tmp_path):
    (code,) = [code for heading, code in _readme_blocks() if heading.startswith("## Five minutes")]
    for name in ("mpkd.py", "train_teacher.py", "distill.py", "evaluate.py"):
        (tmp_path / name).write_bytes((HERE / name).read_bytes())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    outputs = []
    for _ in range(2):  # the second run is what a user does after fixing something
        proc = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    table = [[line for line in out.splitlines() if line.endswith(".pt") and "%" not in line and "[" in line]
             for out in outputs]
    assert len(table[0]) == 4 and table[0] == table[1]  # four Table II rows, the same both times
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"learning_curves.png", "table2.png"}


@pytest.mark.skipif(not (SAMPLES.is_dir() and CRC_SAMPLES.is_dir()), reason="the real sample tiles are not here")
def test_readme_real_tissue_block_runs_on_the_sample_tiles(tmp_path):
    (code,) = [code for heading, code in _readme_blocks() if heading.startswith("## Real tissue")]
    code = (code.replace("K=data/Kather_texture_2016_image_tiles_5000", f"K={SAMPLES}")  # the samples for the sets
            .replace("--external crc-val-he-7k", f"--external {CRC_SAMPLES} --image-mpp 0.5 "
                                                 f"--class-map {HERE / 'docs' / 'crc-val-he-7k.csv'}")
            .replace("data/CRC-VAL-HE-7K", str(CRC_SAMPLES)).replace("python docs/", f"python {HERE / 'docs'}/"))
    for name in ("mpkd.py", "distill.py", "evaluate.py"):
        (tmp_path / name).write_bytes((HERE / name).read_bytes())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 16 of the 16 tiles in 8 folders" in proc.stdout  # another lab's tiles, every one counted
    with Image.open(tmp_path / "tissue-map" / "maps" / "mosaic_overlay.png") as overlay:
        assert overlay.width > 1000  # the mosaic and its map side by side, with the legend


# ----------------------------------------------------------------------------------------------
# Bad inputs: one clear line, exit status 2, nothing overwritten


def test_jobs_that_left_evaluate_py_name_their_script_in_one_line(tmp_path):
    for flags, script in ((["--map", "slide.svs"], "predict.py"), (["--images", "tiles/"], "predict.py"),
                          (["--export", "s.onnx", "--int8"], "export.py")):
        proc = run_script("evaluate.py", "student.pt", *flags, cwd=tmp_path)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and err.count("\n") == 1 and f"is a job of {script} now: python {script}" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_input_from_the_command_line_is_one_line_and_exit_status_2(tmp_path):
    proc = run_script("train_teacher.py", "--data", tmp_path / "nowhere", cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "does not exist" in err
    proc = run_script("evaluate.py", tmp_path / "nothing.pt", "--data", tmp_path, cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "file.txt").write_text("x") and d / "file.txt", "not a folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "at least two class folders"),
    (lambda d: make_dataset(d / "one", classes=1), "at least two class folders"),
])
def test_bad_data_folders(tmp_path, make, match):
    with pytest.raises(mpkd.UserError, match=match):
        train_teacher.main(train_teacher.get_args(teacher_argv(make(tmp_path), tmp_path)))


def test_class_folder_without_images_and_undecodable_image(tmp_path):
    root = make_dataset(tmp_path / "d", classes=2, per_class=3)
    (root / "03_NOTHING").mkdir()
    (root / "03_NOTHING" / "notes.txt").write_text("no images here")
    with pytest.raises(mpkd.UserError, match="03_NOTHING holds no images"):
        train_teacher.main(train_teacher.get_args(teacher_argv(root, tmp_path)))
    (root / "03_NOTHING").joinpath("notes.txt").unlink()
    (root / "03_NOTHING").rmdir()
    data = mpkd.load_dataset(root, 32, "tile", 0, 0.2, 0.2)
    broken = data["files"][data["split"]["train"][0]]
    (root / broken).write_bytes(b"II*\x00 not really a tiff")
    with pytest.raises(mpkd.UserError, match=f"1 of 6 images .* do not open: .*{Path(broken).name}"):
        train_teacher.main(train_teacher.get_args(teacher_argv(root, tmp_path)))


@pytest.mark.parametrize("extra,match", [
    (["--save-every", "0"], "--save-every 0"),
    (["--epochs", "0"], "--epochs 0"), (["--batch-size", "-1"], "--batch-size -1"),
    (["--lr", "0"], "--lr 0"), (["--img-size", "16"], "--img-size 16"),
])
def test_bad_teacher_settings(data_dir, tmp_path, extra, match):
    with pytest.raises(mpkd.UserError, match=match):
        train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path, *extra)))


@pytest.mark.parametrize("extra,match", [
    (["--temperature", "0"], "--temperature 0"), (["--distill-weight", "1.5"], "--distill-weight 1.5"),
    (["--distill-weight", "-0.1"], "--distill-weight -0.1"), (["--anchors", "2,9"], r"\[9\]"),
])
def test_bad_student_settings(trained, data_dir, tmp_path, extra, match):
    with pytest.raises(mpkd.UserError, match=match):
        distill.main(distill.get_args(student_argv(data_dir, trained, tmp_path / "s.pt", *extra)))


def test_missing_truncated_and_foreign_teacher_files(trained, data_dir, tmp_path):
    argv = lambda name: student_argv(data_dir, trained, tmp_path / "s.pt", "--teacher-logits", str(name))
    with pytest.raises(mpkd.UserError, match="does not exist"):
        distill.main(distill.get_args(argv(tmp_path / "none.pt")))
    blob = (trained / "teacher_logits.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(mpkd.UserError, match="corrupt"):
        distill.main(distill.get_args(argv(tmp_path / "cut.pt")))
    with pytest.raises(mpkd.UserError, match=r"not a mpkd-teacher-logits/2 file: it is a checkpoint .*; pass the "
                                             r"stored teacher logits \(train_teacher.py's teacher_logits.pt\)"):
        distill.main(distill.get_args(argv(trained / "teacher.pt")))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(mpkd.UserError, match=r"it is something else \(list\); pass the stored teacher logits"):
        distill.main(distill.get_args(argv(tmp_path / "list.pt")))
    for extra, match in [(["--split-seed", "1"], "--split-seed 1 differs.*pass --split-seed 0"),
                         (["--img-size", "48"], "--img-size 48 differs.*pass --img-size 32")]:
        with pytest.raises(mpkd.UserError, match=match):
            distill.main(distill.get_args(student_argv(data_dir, trained, tmp_path / "s.pt", *extra)))
    assert not (tmp_path / "s.pt").exists()


def test_evaluate_refuses_other_classes_networks_and_non_checkpoints(trained, data_dir, tmp_path):
    other = make_dataset(tmp_path / "other", classes=3)
    with pytest.raises(mpkd.UserError, match="classes"):
        evaluate.main(evaluate.get_args([str(trained / "teacher.pt"), "--data", str(other), "--device", "cpu"]))
    ckpt = torch.load(trained / "teacher.pt", weights_only=True)
    ckpt["model"] = "mixnet_s"
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(mpkd.UserError, match="do not fit mixnet_s"):
        evaluate.main(evaluate.get_args([str(tmp_path / "wrong.pt"), "--data", str(data_dir), "--device", "cpu"]))
    with pytest.raises(mpkd.UserError, match="not a mpkd-checkpoint"):
        evaluate.main(evaluate.get_args([str(trained / "teacher_logits.pt"), "--data", str(data_dir),
                                         "--device", "cpu"]))


def test_unwritable_output_is_refused_before_training(data_dir, tmp_path):
    with pytest.raises(mpkd.UserError, match="does not exist"):
        train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path, "--out", tmp_path / "no" / "t.pt")))
    (tmp_path / "adir.pt").mkdir()
    with pytest.raises(mpkd.UserError, match="it is a folder"):
        argv = teacher_argv(data_dir, tmp_path, "--logits-out", tmp_path / "adir.pt")
        train_teacher.main(train_teacher.get_args(argv))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.pt"]
    if Path("/proc").is_dir():  # a folder nobody can create files in, even root (tests run as root in CI)
        with pytest.raises(mpkd.UserError, match="folder /proc is not writable"):
            train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path) + ["--out", "/proc/t.pt"]))


def test_non_finite_loss_stops_naming_epoch_and_batch_and_keeps_the_last_good_state(data_dir, tmp_path, monkeypatch):
    good = tmp_path / "teacher.pt"
    good.write_bytes(b"an earlier good teacher")
    real, calls = mpkd.kd_loss, []

    def nan_on_fifth(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(mpkd, "kd_loss", nan_on_fifth)  # 3 batches per epoch: call 5 is epoch 2, batch 2
    with pytest.raises(mpkd.UserError, match="epoch 2, batch 2; epoch 1 is kept"):
        train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path, "--epochs", "3")))
    assert mpkd.load_file(mpkd.state_path(good), mpkd.STATE_FORMAT)["epoch"] == 1
    assert good.read_bytes() == b"an earlier good teacher"


def test_missing_default_data_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mpkd, "KATHER_URL", "http://127.0.0.1:9/Kather_texture_2016_image_tiles_5000.zip")
    with pytest.raises(mpkd.UserError, match="zenodo.org/record/53169.*--data"):
        train_teacher.main(train_teacher.get_args(["--no-pretrained", "--device", "cpu"]))


def test_pretrained_weights_offline_suggest_no_pretrained(data_dir, tmp_path):
    # HF_HUB_OFFLINE makes the hub fail at once, as it does (after retries) on a machine with no network.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "train_teacher.py"), "--data", str(data_dir), "--pretrained",
                           *FAST],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "ImageNet weights for mixnet_l are not cached" in proc.stderr
    assert "--weights FILE" in proc.stderr and "--no-pretrained" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(mpkd.UserError, match="not a timm model"):
        mpkd.build_mixnet("no_such_net", 8, pretrained=False)


def test_benchmark_reports_every_figure_and_leaves_the_model_alone():
    model = mpkd.build_mixnet("mixnet_s", 3, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate.speed(model, 32, torch.device("cpu"), "fp32", train_batch=4, repeats=2)
    assert set(result) == {"latency_ms", "throughput", "train_step_images_per_s", "kd_step_images_per_s"}
    assert all(v > 0 and math.isfinite(v) for v in result.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_timed_turns_alternate_so_that_drift_cancels():
    order = []
    mpkd.median_seconds([lambda: order.append("A"), lambda: order.append("B")], torch.device("cpu"), 4, 0)
    assert "".join(order) == "ABBAABBA"


# ----------------------------------------------------------------------------------------------
# A lab's own data on its own server


def _imagenet_weights(tmp_path, name, suffix):
    """A fake ImageNet weights file as timm publishes them: a 1000-class state dict."""
    import timm
    model = timm.create_model(name, num_classes=1000)
    path = tmp_path / f"{name}_imagenet{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return model.state_dict(), path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_starts_the_network_and_replaces_the_imagenet_head(data_dir, tmp_path, suffix):
    state, path = _imagenet_weights(tmp_path, "mixnet_s", suffix)
    model = mpkd.build_mixnet("mixnet_s", 4, pretrained=True, weights=path)
    assert model.classifier.weight.shape == (4, 1536)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if not k.startswith("classifier"))
    argv = student_argv(data_dir, tmp_path, tmp_path / "s.pt", "--distill-weight", "0", "--epochs", "1",
                        "--weights", str(path), "--teacher-logits", str(tmp_path / "none.pt"))
    distill.main(distill.get_args(argv))  # the whole run starts from the file, no network involved


def test_weights_of_another_network_or_with_pickled_code_are_refused(tmp_path):
    _, path = _imagenet_weights(tmp_path, "mixnet_s", ".pth")
    with pytest.raises(mpkd.UserError, match="does not fit mixnet_l.*another network"):
        mpkd.build_mixnet("mixnet_l", 4, pretrained=True, weights=path)
    torch.save({"conv_stem.weight": Path("/")}, tmp_path / "pickled.pth")  # not loadable weights_only
    with pytest.raises(mpkd.UserError, match="not a state dict"):
        mpkd.build_mixnet("mixnet_s", 4, pretrained=True, weights=tmp_path / "pickled.pth")
    with pytest.raises(mpkd.UserError, match="does not exist"):
        mpkd.build_mixnet("mixnet_s", 4, pretrained=True, weights=tmp_path / "none.pth")


def test_pretrained_offline_fails_at_once_and_a_cached_copy_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(mpkd, "_hub_reachable", lambda seconds=3.0: False)
    monkeypatch.setattr(mpkd, "_cached_weights", lambda name: None)
    with pytest.raises(mpkd.UserError, match="cannot be reached; pass --weights FILE.*--no-pretrained"):
        mpkd.build_mixnet("mixnet_s", 4, pretrained=True)
    state, path = _imagenet_weights(tmp_path, "mixnet_s", ".safetensors")
    monkeypatch.setattr(mpkd, "_cached_weights", lambda name: str(path))  # as the Hugging Face cache has it
    model = mpkd.build_mixnet("mixnet_s", 4, pretrained=True)
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])


def test_hidden_folders_and_macos_debris_are_ignored(tmp_path):
    root = make_dataset(tmp_path / "d", classes=2, per_class=3)
    for folder in (root / "01_CLASS0" / ".ipynb_checkpoints", root / "__MACOSX" / "01_CLASS0", root / ".cache"):
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "copy.png")
    files, labels, classes = mpkd.find_images(root)
    assert classes == ["01_CLASS0", "02_CLASS1"] and len(files) == 6
    assert not any("ipynb" in f or "MACOSX" in f for f in files)
    (root / "03_ONLY_HIDDEN" / ".ipynb_checkpoints").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "03_ONLY_HIDDEN" / ".ipynb_checkpoints" / "a.png")
    with pytest.raises(mpkd.UserError, match="03_ONLY_HIDDEN holds only hidden or __MACOSX images"):
        mpkd.find_images(root)


def _groups_csv(root, path, patients=6):
    files, _, _ = mpkd.find_images(root)
    lines = ["file,group"] + [f"{f},patient{i % patients}" for i, f in enumerate(files)]
    path.write_text("\n".join(lines) + "\n")
    return files


def test_group_split_from_a_csv_travels_with_the_teacher_logits(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", classes=3, per_class=12)
    files = _groups_csv(root, tmp_path / "groups.csv")
    group = {f: f"patient{i % 6}" for i, f in enumerate(files)}
    train_teacher.main(train_teacher.get_args(teacher_argv(root, tmp_path, "--groups", tmp_path / "groups.csv",
                                                           "--epochs", "1")))
    stored = mpkd.load_file(tmp_path / "teacher_logits.pt", mpkd.LOGITS_FORMAT)
    ident = stored["identity"]
    assert ident["split_by"] == "group" and ident["groups_file"] == str((tmp_path / "groups.csv").resolve())
    assert ident["groups_fingerprint"] == mpkd.file_sha256(tmp_path / "groups.csv")
    data = mpkd.load_dataset(root, 32, "group", 0, 0.2, 0.2, tmp_path / "groups.csv")
    sides = [{group[data["files"][i]] for i in data["split"][p]} for p in ("train", "val", "test")]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert "groups: train" in capsys.readouterr().out
    # the student names no split flag at all: it takes them, groups file included, from the logits
    distill.main(distill.get_args(["--data", str(root), "--teacher-logits", str(tmp_path / "teacher_logits.pt"),
                                   "--out", str(tmp_path / "s.pt"), "--epochs", "1", "--batch-size", "8",
                                   "--device", "cpu"]))
    assert mpkd.load_file(tmp_path / "s.pt", mpkd.CHECKPOINT_FORMAT)["identity"] == ident
    rows = evaluate.main(evaluate.get_args([str(tmp_path / "s.pt"), "--data", str(root), "--device", "cpu"]))
    assert rows[0]["data"]["groups_fingerprint"] == ident["groups_fingerprint"]
    (tmp_path / "groups.csv").write_text((tmp_path / "groups.csv").read_text().replace("patient1", "patient2"))
    with pytest.raises(mpkd.UserError, match="groups.csv, is neither at"):  # a changed file is refused
        evaluate.main(evaluate.get_args([str(tmp_path / "s.pt"), "--data", str(root), "--device", "cpu"]))


def test_groups_file_is_found_by_its_content_on_another_machine(tmp_path):
    made = tmp_path / "server"
    root = make_dataset(made / "tiles", classes=3, per_class=12)
    _groups_csv(root, made / "patients.csv")
    train_teacher.main(train_teacher.get_args(teacher_argv(root, made, "--groups", made / "patients.csv",
                                                           "--epochs", "1")))
    distill.main(distill.get_args(["--data", str(root), "--teacher-logits", str(made / "teacher_logits.pt"),
                                   "--out", str(made / "s.pt"), "--epochs", "1", "--batch-size", "8",
                                   "--device", "cpu"]))
    laptop = tmp_path / "laptop"  # the whole folder moved: the recorded absolute path is gone
    made.rename(laptop)
    tiles, student = laptop / "tiles", laptop / "s.pt"
    rows = evaluate.main(evaluate.get_args([str(student), "--data", str(tiles), "--device", "cpu"]))
    assert rows[0]["data"]["groups_file"] == str((tmp_path / "server" / "patients.csv").resolve())  # as recorded
    (laptop / "patients.csv").rename(tmp_path / "elsewhere.csv")  # neither in nor beside the data folder
    with pytest.raises(mpkd.UserError, match="pass --groups PATH"):
        evaluate.main(evaluate.get_args([str(student), "--data", str(tiles), "--device", "cpu"]))
    again = evaluate.main(evaluate.get_args([str(student), "--data", str(tiles), "--device", "cpu",
                                             "--groups", str(tmp_path / "elsewhere.csv")]))
    assert again[0]["outcomes"] == rows[0]["outcomes"] and again[0]["files"] == rows[0]["files"]
    (tmp_path / "elsewhere.csv").rename(tiles / "patients.csv")  # in the data folder: found by name
    distill.main(distill.get_args(["--data", str(tiles), "--teacher-logits", str(laptop / "teacher_logits.pt"),
                                   "--out", str(laptop / "s2.pt"), "--epochs", "1", "--batch-size", "8",
                                   "--device", "cpu"]))
    other = tmp_path / "other.csv"
    other.write_text((tiles / "patients.csv").read_text().replace("patient1", "patient2"))
    with pytest.raises(mpkd.UserError, match="its content differs"):
        evaluate.main(evaluate.get_args([str(student), "--data", str(tiles), "--device", "cpu",
                                         "--groups", str(other)]))


def test_groups_file_missing_a_tile_or_without_header_is_refused(tmp_path):
    root = make_dataset(tmp_path / "d", classes=2, per_class=4)
    _groups_csv(root, tmp_path / "g.csv")
    lines = (tmp_path / "g.csv").read_text().splitlines()
    (tmp_path / "g.csv").write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(mpkd.UserError, match="no group for 2 of 8 images"):
        mpkd.load_dataset(root, 32, "group", 0, 0.2, 0.2, tmp_path / "g.csv")
    (tmp_path / "g.csv").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(mpkd.UserError, match="needs a header naming a file column"):
        mpkd.load_dataset(root, 32, "group", 0, 0.2, 0.2, tmp_path / "g.csv")


def test_a_labs_groups_sheet_as_it_comes(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", classes=2, per_class=6)
    files, _, _ = mpkd.find_images(root)
    rows = [f"{f},s{i % 3}" for i, f in enumerate(files)] + ["01_CLASS0/gone.png,s9", "02_CLASS1/old.tif,s9"]
    for header in ("path,slide", "Filename,Patient", "image,case", "Tile ID,Slide ID"):
        (tmp_path / "g.csv").write_text("\ufeff" + header + "\n" + "\n".join(rows) + "\n")  # with Excel's BOM
        data = mpkd.load_dataset(root, 32, "group", 0, 0.2, 0.2, tmp_path / "g.csv")
        assert data["groups"] == [f"s{i % 3}" for i in range(len(files))]
        first, second = header.split(",")
        assert data["notes"] == [f"groups from g.csv: file column '{first}', group column '{second}'"]
        assert data["warnings"][0].startswith("2 rows of g.csv name files that are not in the data")
    (tmp_path / "g.csv").write_text("path,slide,scanner\n" + "\n".join(r + ",x" for r in rows) + "\n")
    assert mpkd.load_dataset(root, 32, "group", 0, 0.2, 0.2, tmp_path / "g.csv")["groups"][0] == "s0"
    (tmp_path / "g.csv").write_text("name,who,scanner\n" + "\n".join(r + ",x" for r in rows) + "\n")
    with pytest.raises(mpkd.UserError, match="its header is name,who,scanner"):
        mpkd.load_dataset(root, 32, "group", 0, 0.2, 0.2, tmp_path / "g.csv")


def test_lab_folders_as_they_come(tmp_path):
    for cls in ("stroma", "tumour"):
        (tmp_path / cls).mkdir()
        for i, suffix in enumerate((".JPG", ".jpeg", ".Tif")):
            Image.new("RGB", (40, 40), (i * 80, 30, 90)).save(tmp_path / cls / f"t{i}{suffix}",
                                                            format="TIFF" if suffix == ".Tif" else "JPEG")
        (tmp_path / cls / "Thumbs.db").write_bytes(b"\0" * 64)
    files, labels, classes = mpkd.find_images(tmp_path)
    assert classes == ["stroma", "tumour"] and len(files) == 6 and not any("Thumbs" in f for f in files)


def test_a_class_without_test_tiles_is_a_warning(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", classes=3, per_class=12)
    files, labels, _ = mpkd.find_images(root)
    # class 0 entirely in one patient, which the seeded split puts on the training side
    lines = ["file,group"] + [f"{f},{'p0' if c == 0 else f'p{1 + i % 5}'}"
                              for i, (f, c) in enumerate(zip(files, labels))]
    (tmp_path / "g.csv").write_text("\n".join(lines) + "\n")
    data = mpkd.load_dataset(root, 32, "group", 0, 0.2, 0.2, tmp_path / "g.csv")
    side = next(p for p in ("train", "val", "test") if any(data["labels"][i] == 0 for i in data["split"][p]))
    missing = {"train", "test"} - {side}
    assert sorted(data["warnings"]) == sorted(f"class 01_CLASS0 has no {p} tile in this split" for p in missing)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        mpkd.save_atomic({"format": "x"}, tmp_path / "a.pt")
        mpkd.write_text_atomic("{}", tmp_path / "a.json")
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.pt", "a.json")] == [mode, mode]


def test_a_corrupt_test_image_is_caught_before_training(tmp_path):
    root = make_dataset(tmp_path / "d", classes=2, per_class=5)
    data = mpkd.load_dataset(root, 32, "tile", 0, 0.2, 0.2)
    bad = [data["files"][i] for i in (data["split"]["test"][0], data["split"]["val"][0])]
    for name in bad:
        (root / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(mpkd.UserError, match="2 of 10 images .* do not open") as err:
        train_teacher.main(train_teacher.get_args(teacher_argv(root, tmp_path)))
    assert all(name in str(err.value) for name in bad)  # every bad file named at once
    assert not mpkd.state_path(tmp_path / "teacher.pt").exists()  # no epoch was started


def test_parallel_decode_equals_decoding_one_by_one(tmp_path):
    root = make_dataset(tmp_path / "d", classes=2, per_class=200, size=20)  # several chunks of 128
    files, _, _ = mpkd.find_images(root)
    (root / files[150]).write_bytes(b"not an image")
    assert (os.cpu_count() or 1) == 1 or mpkd._shm_room() > 0  # on this machine the workers do run
    images, bad = mpkd.decode_images(root, files, 16)
    assert list(bad) == [files[150]]
    serial = [torch.zeros(3, 16, 16, dtype=torch.uint8) if i == 150 else mpkd.decode_image(root / f, 16)
              for i, f in enumerate(files)]
    assert torch.equal(images, torch.stack(serial))


def test_fewer_epochs_than_save_every_stores_the_last_and_tiny_data_is_explained(data_dir, tmp_path, capsys):
    train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path, "--save-every", "5")))
    assert list(mpkd.load_file(tmp_path / "teacher_logits.pt", mpkd.LOGITS_FORMAT)["logits"]) == [2]
    err = capsys.readouterr().err
    assert "--save-every 5 is more than --epochs 2" in err
    assert err.count("batch(es) per epoch") == 1 and "--batch-size" in err  # said once, with what to change
    # 24 training images make no 16 batches of 2; the issue's lab (115 training images) gets the flag
    assert "24 images cannot make 16 batches" in err
    note = mpkd.few_batches_note(115, 16)
    assert "only 8 batch(es)" in note and "--batch-size 7 gives 17 batches per epoch here" in note
    assert mpkd.batches_per_epoch(115, 7) == 17 and mpkd.few_batches_note(256, 16) is None


def test_data_that_cannot_fit_is_refused_with_the_numbers(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(mpkd, "_available_host_bytes", lambda: 10_000)
    numbers = r"32 images at 32 px need 98.3 kB as uint8, .* \(10.0 kB\); lower --img-size"
    with pytest.raises(mpkd.UserError, match=numbers):
        train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path)))


# ----------------------------------------------------------------------------------------------
# The teacher's route and anchors the student chooses


def test_teacher_stores_validation_logits_of_every_stored_epoch(trained, data_dir):
    stored = mpkd.load_file(trained / "teacher_logits.pt", mpkd.LOGITS_FORMAT)
    assert sorted(stored["val_logits"]) == [1, 2, 3]
    data = mpkd.load_dataset(data_dir, 32, "tile", 0, 0.2, 0.2)
    val = mpkd.load_part(data, "val", torch.device("cpu"))
    model = mpkd.load_model(mpkd.load_file(trained / "teacher.pt", mpkd.CHECKPOINT_FORMAT), "teacher.pt")
    assert stored["val_logits"][3].shape == (8, 4)
    assert torch.allclose(stored["val_logits"][3], mpkd.predict(model, val["images"], "fp32"), atol=1e-5)


def test_route_in_the_log_equals_a_direct_computation(trained, student, data_dir):
    ckpt = mpkd.load_file(student, mpkd.CHECKPOINT_FORMAT)
    teacher = mpkd.load_file(trained / "teacher_logits.pt", mpkd.LOGITS_FORMAT)["val_logits"]
    val = mpkd.load_part(mpkd.load_dataset(data_dir, 32, "tile", 0, 0.2, 0.2), "val", torch.device("cpu"))
    s = mpkd.predict(mpkd.load_model(ckpt, student), val["images"], "fp32")  # the final student, eval mode
    logged = ckpt["history"][-1]["route"]
    assert [d["teacher_epoch"] for d in logged] == [1, 2, 3]
    for d in logged:
        t = teacher[d["teacher_epoch"]]
        ps, pt = torch.softmax(s / 5.0, 1), torch.softmax(t / 5.0, 1)  # T = 5, the run's temperature
        kl = (pt * (pt.log() - ps.log())).sum(1).mean()  # KL(teacher || student), batch mean
        assert d["kl"] == pytest.approx(kl.item(), abs=1e-5)
        assert d["agreement"] == pytest.approx(100 * (t.argmax(1) == s.argmax(1)).float().mean().item())
    log = [json.loads(x) for x in mpkd.log_path(student).read_text().splitlines()]
    assert [r["route"] for r in log] == [r["route"] for r in ckpt["history"]]


def test_next_auto_anchor_on_a_crafted_route():
    stored = [5, 10, 15, 20]
    step = lambda current, now, threshold=0.2, left=20: distill.next_auto_anchor(stored, current, now, 1.0,
                                                                             threshold, left, final_epochs=5)
    assert step(5, {5: 0.5, 10: 0.8, 15: 0.9, 20: 1.0}) == 5  # not close to anything yet
    assert step(5, {5: 0.15, 10: 0.8, 15: 0.9, 20: 1.0}) == 10  # close to its anchor: on to the next
    assert step(5, {5: 0.15, 10: 0.3, 15: 0.18, 20: 1.0}) == 15  # already close to a later one: the latest
    assert step(5, {5: 0.5, 10: 0.1, 15: 0.9, 20: 1.0}) == 10  # close to a later one, not to its own
    assert step(15, {5: 0.0, 10: 0.0, 15: 0.5, 20: 1.0}) == 15  # never backwards
    assert step(20, {5: 0.0, 10: 0.0, 15: 0.0, 20: 0.0}) == 20  # the final teacher is the end
    assert step(5, {5: 0.5, 10: 0.8, 15: 0.9, 20: 1.0}, left=5) == 20  # the final teacher's share is left
    # a route walked by hand over 8 epochs: the student catches up with 5, then 10; 15 takes longer
    walk = [{5: 0.3, 10: 0.6, 15: 0.9, 20: 1.0}, {5: 0.1, 10: 0.5, 15: 0.8, 20: 0.9},
            {5: 0.4, 10: 0.15, 15: 0.6, 20: 0.8}, {5: 0.5, 10: 0.3, 15: 0.4, 20: 0.7},
            {5: 0.5, 10: 0.3, 15: 0.3, 20: 0.6}, {5: 0.5, 10: 0.3, 15: 0.1, 20: 0.5}]
    current, chosen = 5, []
    for epoch, now in enumerate(walk):
        current = distill.next_auto_anchor(stored, current, now, 1.0, 0.2, epochs_left=8 - epoch - 1, final_epochs=2)
        chosen.append(current)
    assert chosen == [5, 10, 15, 15, 15, 20]


def test_auto_anchors_explain_their_choice_and_resume_bit_identically(trained, data_dir, tmp_path, monkeypatch,
                                                                      capsys):
    argv = lambda out: student_argv(data_dir, trained, tmp_path / out, "--anchors", "auto", "--epochs", "5",
                                    "--auto-threshold", "0.5")
    distill.main(distill.get_args(argv("a.pt")))
    printed = capsys.readouterr().out
    reference = mpkd.load_file(tmp_path / "a.pt", mpkd.CHECKPOINT_FORMAT)
    assert reference["method"] == "auto" and "auto anchors: starting from teacher@1" in printed
    schedule = reference["schedule"]
    assert schedule == [r["teacher_epoch"] for r in reference["history"]] and schedule[-1] == 3
    assert schedule == sorted(schedule) and schedule[0] == 1  # starts at the earliest, never goes back
    assert all(f"following teacher@{b}" in printed for a, b in zip(schedule, schedule[1:]) if b != a)
    real = _interrupt_epoch(monkeypatch, 4)
    with pytest.raises(mpkd.Interrupted):
        distill.main(distill.get_args(argv("b.pt")))
    monkeypatch.setattr(mpkd, "train_one_epoch", real)
    distill.main(distill.get_args(argv("b.pt") + ["--resume"]))
    resumed = mpkd.load_file(tmp_path / "b.pt", mpkd.CHECKPOINT_FORMAT)
    assert resumed["schedule"] == schedule
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in reference["state_dict"].items())
    assert without_timing(resumed["history"]) == without_timing(reference["history"])
    rows = evaluate.main(evaluate.get_args([str(tmp_path / "a.pt"), "--data", str(data_dir), "--device", "cpu"]))
    assert rows[0]["method"] == "Multi-Part KD, auto anchors"


def test_auto_anchors_need_a_validation_part_and_other_methods_run_without_one(data_dir, tmp_path, capsys):
    train_teacher.main(train_teacher.get_args(teacher_argv(data_dir, tmp_path, "--val-frac", "0")))
    assert "val_logits" not in torch.load(tmp_path / "teacher_logits.pt", weights_only=True)
    argv = student_argv(data_dir, tmp_path, tmp_path / "s.pt")
    with pytest.raises(mpkd.UserError, match="--anchors auto .* validation images: it needs a validation part"):
        distill.main(distill.get_args(argv + ["--anchors", "auto"]))
    distill.main(distill.get_args(argv + ["--multipart"]))  # everything else works, without a route
    assert "route" not in mpkd.load_file(tmp_path / "s.pt", mpkd.CHECKPOINT_FORMAT)["history"][0]


# ----------------------------------------------------------------------------------------------
# Another lab's tissue: external test sets, scale rules, stain augmentation and normalisation


def test_class_map_header_several_to_one_unmapped_and_refusals(tmp_path):
    classes, folders = ["01_TUMOR", "02_STROMA", "05_DEBRIS"], ["DEB", "MUC", "MUS", "STR", "TUM", "X"]
    path = tmp_path / "map.csv"
    path.write_text("folder,class\nTUM,01_TUMOR\nSTR,STROMA\nMUS,02_STROMA\nDEB,05_DEBRIS\nMUC,\nBACK,\n")
    mapping, warnings = evaluate.read_class_map(path, folders, classes)
    assert mapping == {"TUM": "01_TUMOR", "STR": "02_STROMA", "MUS": "02_STROMA", "DEB": "05_DEBRIS",
                       "MUC": None, "BACK": None}  # 'STROMA' is 02_STROMA; X is not listed: unmapped too
    assert len(warnings) == 1 and "BACK" in warnings[0]  # a row naming no folder of the set
    path.write_text("TUM,01_TUMOR\nSTR,02_STROMA\n")  # no header: the first row is data
    assert evaluate.read_class_map(path, folders, classes) == ({"TUM": "01_TUMOR", "STR": "02_STROMA"}, [])
    path.write_text("folder,class\nTUM,TUMOUR\n")
    with pytest.raises(mpkd.UserError, match="TUM to TUMOUR, which is not a class.*01_TUMOR, 02_STROMA, 05_DEBRIS"):
        evaluate.read_class_map(path, folders, classes)
    path.write_text("folder,class\nADI,01_TUMOR\n")
    with pytest.raises(mpkd.UserError, match="names none of the folders"):
        evaluate.read_class_map(path, folders, classes)
    with pytest.raises(mpkd.UserError, match="does not exist"):
        evaluate.read_class_map(tmp_path / "none.csv", folders, classes)


def test_the_shipped_crc_map_is_the_one_the_named_set_uses():
    rows = read_csv(HERE / "docs" / "crc-val-he-7k.csv")
    assert {r["folder"]: r["class"] for r in rows} == evaluate.EXTERNAL_SETS["crc-val-he-7k"]["class_map"]
    kather = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY"]
    assert set(evaluate.EXTERNAL_SETS["crc-val-he-7k"]["class_map"].values()) == set(kather) - {"03_COMPLEX"}


@pytest.mark.parametrize("width,mpp,rule,expected", [
    # CRC-VAL-HE-7K (224 px at 0.5 um/px) for a Kather 2016 model (150 px x 0.495 = 74.25 um, at 112 px):
    # the training field is 148.5 of its pixels
    (224, 0.5, "crop", [((37.75, 37.75, 186.25, 186.25), (112, 112))]),
    (224, 0.5, "cover", [((x, y, x + 148.5, y + 148.5), (112, 112)) for y in (0, 75.5) for x in (0, 75.5)]),
    (224, 0.5, "whole", [((0, 0, 224, 224), (169, 169))]),  # 224 * 0.5 / (74.25 / 112) = 168.96
    (224, 0.5, "resize", [((0, 0, 224, 224), (112, 112))]),
    (150, 0.495, "crop", [((0, 0, 150, 150), (112, 112))]),  # Kather's own tiles: as in training
    (150, 0.495, "cover", [((0, 0, 150, 150), (112, 112))]),
    (600, 0.2475, "crop", [((150, 150, 450, 450), (112, 112))]),  # 40x: a 300 px field
    (600, 0.2475, "cover", [((x, y, x + 300, y + 300), (112, 112)) for y in (0, 300) for x in (0, 300)]),
    (620, 0.2475, "cover", [((x, y, x + 300, y + 300), (112, 112)) for y in (0, 160, 320) for x in (0, 160, 320)]),
    (300, 0.99, "whole", [((0, 0, 300, 300), (448, 448))]),  # 10x: 300 px show 297 um, 4 fields wide
])
def test_view_boxes_bring_a_tile_to_the_training_scale(width, mpp, rule, expected):
    got = mpkd.view_boxes(width, width, 112, rule, mpp, 74.25)
    assert len(got) == len(expected)
    for (box, out), (want_box, want_out) in zip(got, expected):
        assert out == want_out and box == pytest.approx(want_box)


def test_a_tile_smaller_than_the_training_field_is_refused_for_crop_and_cover():
    with pytest.raises(mpkd.UserError, match="less than the 74.25 um field.*whole or resize"):
        mpkd.view_boxes(224, 224, 112, "crop", 0.25, 74.25)  # 56 um
    assert mpkd.view_boxes(224, 224, 112, "whole", 0.25, 74.25)[0][1] == (84, 84)  # 224 * 0.25 / (74.25 / 112) = 84.5


def test_tile_views_resize_is_the_training_decode_and_crop_is_one_resampling(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 90, 3), dtype=np.uint8))
    (resized,) = mpkd.tile_views(img, 32, "resize")
    assert np.array_equal(resized, mpkd.model_input(img, 32))  # no scale: exactly what training does
    (cropped,) = mpkd.tile_views(img.convert("RGBA"), 32, "crop", 0.5, 30.0)  # a 60 px field in the centre
    cut_first = np.asarray(img.crop((15, 15, 75, 75)).resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
    # one resampling from the tile: inside, what cutting the field out first gives; on the outer
    # pixels the filter also reads the tile just outside the field, as a window of a larger image would
    assert np.array_equal(cropped[:, 1:-1, 1:-1], cut_first[:, 1:-1, 1:-1])
    assert not np.array_equal(cropped, cut_first)


def test_hed_jitter_round_trip_and_what_a_shift_does():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (2, 3, 16, 16))).float()
    same = mpkd.hed_jitter(x, torch.ones(2, 3), torch.zeros(2, 3))
    assert (same - x).abs().max() < 1e-3  # float rounding only
    darker = mpkd.hed_jitter(torch.full((1, 3, 4, 4), 200.0), torch.ones(1, 3), torch.tensor([[0.2, 0.0, 0.0]]))
    od_added = mpkd.optical_density(darker[0, :, 0, 0]) - mpkd.optical_density(torch.full((3,), 200.0))
    hematoxylin = torch.nn.functional.normalize(torch.tensor(mpkd.RUIFROK_HED), dim=1)[0]
    assert torch.allclose(od_added, 0.2 * hematoxylin, atol=1e-5)  # 0.2 OD more haematoxylin, nothing else
    gen = torch.Generator().manual_seed(3)
    draws = mpkd.stain_draws(1000, 0.05, gen)
    assert draws.shape == (1000, 2, 3) and (draws[:, 0] - 1).abs().max() <= 0.05 and draws[:, 1].abs().max() <= 0.05
    assert torch.equal(draws, mpkd.stain_draws(1000, 0.05, torch.Generator().manual_seed(3)))


def _stained_tile(stains, seed=0, size=64):
    """A uint8 tile (3, size, size) mixed from two known stains: pure haematoxylin, pure eosin and
    mixtures, on glass; and its concentrations (size * size, 2)."""
    rng = np.random.default_rng(seed)
    conc = rng.uniform(0.6, 1.6, (size * size, 2))
    kind = rng.integers(0, 4, size * size)
    conc[kind == 0, 1] = 0  # haematoxylin only
    conc[kind == 1, 0] = 0  # eosin only
    conc[kind == 2] = 0  # glass
    od = torch.from_numpy(conc) @ torch.tensor(stains, dtype=torch.float64)
    tile = mpkd.intensity(od).clamp(0, 255).round().to(torch.uint8)
    return tile.T.reshape(3, size, size), conc


def test_macenko_finds_known_stains_and_restains_a_tile_to_another_labs():
    # torchstain's reference stains, and another lab's; every pixel of stain has OD >= MACENKO_BETA
    # in every channel (Macenko's glass test), so pure haematoxylin and pure eosin pixels count
    h, e = np.array([0.5626, 0.7201, 0.4062]), np.array([0.2159, 0.8012, 0.5581])
    h2, e2 = np.array([0.65, 0.70, 0.29]), np.array([0.30, 0.85, 0.43])
    stains = [list(h / np.linalg.norm(h)), list(e / np.linalg.norm(e))]
    other = [list(h2 / np.linalg.norm(h2)), list(e2 / np.linalg.norm(e2))]
    tile, _ = _stained_tile(stains)
    fit = mpkd.macenko_fit(tile.permute(1, 2, 0).reshape(-1, 3))
    cosines = (np.asarray(fit["stains"]) * np.asarray(stains)).sum(1)
    assert cosines.min() > 0.999  # the haematoxylin and eosin vectors, in that order
    elsewhere, _ = _stained_tile(other, seed=1)  # the same tissue statistics stained by another lab
    target = mpkd.macenko_fit(elsewhere.permute(1, 2, 0).reshape(-1, 3))
    restained = mpkd.macenko_apply(tile[None], fit, target)[0]
    again = mpkd.macenko_fit(restained.permute(1, 2, 0).reshape(-1, 3))
    assert (np.asarray(again["stains"]) * np.asarray(other)).sum(1).min() > 0.999
    assert np.allclose(again["max_conc"], target["max_conc"], rtol=0.02)
    with pytest.raises(ValueError, match="tissue pixels"):
        mpkd.macenko_fit(torch.full((5000, 3), 238, dtype=torch.uint8))  # glass
    _, unchanged = mpkd.normalise_stain(torch.full((2, 3, 8, 8), 238, dtype=torch.uint8), None, target)
    assert unchanged == 2  # per tile: glass has no stain to estimate and is left as it is


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="the 24 real Kather tiles are not on this machine")
def test_macenko_equals_torchstain_on_real_tiles():
    ts = pytest.importorskip("torchstain")
    tiles = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1)
             for f in sorted(SAMPLES.glob("0[1-6]_*/*.tif"))[::4]]
    reference = ts.normalizers.MacenkoNormalizer(backend="torch")
    reference.fit(tiles[0])
    ours = mpkd.macenko_fit(tiles[0].permute(1, 2, 0).reshape(-1, 3))
    assert np.allclose(ours["stains"], reference.HERef.T.numpy(), atol=1e-4)  # torchstain: (channels, stains)
    assert np.allclose(ours["max_conc"], reference.maxCRef.numpy(), rtol=1e-3)  # percentiles: another rounding
    for tile in tiles[1:]:
        expected, _, _ = reference.normalize(tile, stains=False)  # (H, W, 3); torchstain: I0 e^-od, truncated
        got = mpkd.macenko_apply(tile[None], mpkd.macenko_fit(tile.permute(1, 2, 0).reshape(-1, 3)), ours)[0]
        diff = (got.permute(1, 2, 0).int() - expected.int()).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 3


def test_stain_augmentation_is_seeded_recorded_and_changes_training(data_dir, tmp_path):
    argv = ["--data", str(data_dir), "--distill-weight", "0", "--teacher-logits", str(tmp_path / "none.pt"),
            "--epochs", "2", *FAST]
    for name, extra in (("a", ["--stain-augment"]), ("b", ["--stain-augment"]), ("c", []),
                        ("d", ["--stain-augment", "0.2"])):
        distill.main(distill.get_args(argv + ["--out", str(tmp_path / f"{name}.pt"), *extra]))
    a, b, c, d = (mpkd.load_file(tmp_path / f"{n}.pt", mpkd.CHECKPOINT_FORMAT) for n in "abcd")
    same = lambda x, y: all(torch.equal(x["state_dict"][k], v) for k, v in y["state_dict"].items())
    assert same(a, b) and not same(a, c) and not same(a, d)
    strengths = [ckpt["args"]["stain_augment"] for ckpt in (a, c, d)]
    assert strengths == [mpkd.STAIN_AUGMENT, None, 0.2]
    name = lambda ckpt: mpkd.method_name(ckpt["method"], ckpt.get("ensemble"), ckpt["args"]["stain_augment"])
    assert name(a) == "student alone, stain-augmented" and name(c) == "student alone"
    assert set(a["stain"]) == {"stains", "max_conc", "pixels", "tiles"}  # the training tiles' stain, for --stain-norm
    with pytest.raises(mpkd.UserError, match="--stain-augment 1.5 must be in"):
        distill.main(distill.get_args(argv + ["--out", str(tmp_path / "e.pt"), "--stain-augment", "1.5"]))


def test_external_set_at_its_scale_with_a_class_map_and_its_report_recomputed(map_model, tmp_path, capsys):
    root = external_folder(tmp_path / "ext", np.random.default_rng(0))
    (root / "unused").mkdir()
    Image.fromarray(standin_tile(0, 160, np.random.default_rng(1))).save(root / "unused" / "x.png")
    cmap = tmp_path / "map.csv"
    cmap.write_text("folder,class\nzero,01_CLASS0\none,CLASS1\ntwo,03_CLASS2\nthree,04_CLASS3\nunused,\n")
    run = lambda *extra: evaluate.main(evaluate.get_args([str(map_model), "--external", str(root), "--class-map",
                                                          str(cmap), "--device", "cpu", *map(str, extra)]))
    # the training field, 19.8 um (40 px x 0.495), is the centre 80 px of these tiles at 0.2475 um/px
    [row] = run("--image-mpp", 0.2475, "--scale-rule", "crop", "--json", tmp_path / "r.json", "--predictions",
                tmp_path / "p.csv")
    out = capsys.readouterr().out
    assert row["accuracy"] == 100 and row["n_test"] == 12 and "left out: mapped to nothing" in out
    assert "scale rule crop" in out and "zero -> 01_CLASS0" in out and "unused -> skipped" in out
    [squeezed] = run()  # no scale: resized whole, the border (three quarters of the tile) mostly wins
    assert squeezed["accuracy"] <= 50 and "resized whole" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]
    ext = report["data"]["external"]
    assert (ext["rule"], ext["image_mpp"], ext["skipped"], ext["views"]) == ("crop", 0.2475, ["unused"], 12)
    assert ext["class_map"]["one"] == "02_CLASS1" and report["data"]["folder"] == str(root)
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == 12 and {r["scale_rule"] for r in rows} == {"crop"}
    correct = sum(r["true"] == r["predicted"] for r in rows)
    assert correct == report["correct"] and report["accuracy_ci95"] == pytest.approx(mpkd.wilson_interval(correct, 12))
    folders = report["folder_confusion"]["folders"]
    counts = np.zeros((len(folders), len(report["classes"])), int)
    for r in rows:
        counts[folders.index(r["folder"]), report["classes"].index(r["predicted"])] += 1
    assert counts.tolist() == report["folder_confusion"]["counts"]
    assert all(ext["class_map"][r["folder"]] == r["true"] for r in rows)


def test_external_bad_inputs_are_one_line_before_any_scoring(map_model, tmp_path):
    root = external_folder(tmp_path / "ext", np.random.default_rng(0))
    run = lambda *extra: evaluate.main(evaluate.get_args([str(map_model), "--external", str(root), "--device", "cpu",
                                                          *map(str, extra)]))
    with pytest.raises(mpkd.UserError, match="folders one, three, two, zero of .* are not classes.*--class-map"):
        run()
    cmap = tmp_path / "map.csv"
    cmap.write_text("zero,TUMOUR\n")
    with pytest.raises(mpkd.UserError, match="not a class of the model; its classes are 01_CLASS0"):
        run("--class-map", cmap)
    cmap.write_text("folder,class\nzero,\none,\ntwo,\nthree,\n")
    with pytest.raises(mpkd.UserError, match="nothing in .* is mapped"):
        run("--class-map", cmap)
    cmap.write_text("folder,class\nzero,01_CLASS0\n")
    for bad in ("0", "-0.5"):
        with pytest.raises(mpkd.UserError, match=f"--image-mpp {float(bad)} must be positive"):
            run("--class-map", cmap, "--image-mpp", bad)
    with pytest.raises(mpkd.UserError, match="--scale-rule cover needs the tiles' scale"):
        run("--class-map", cmap, "--scale-rule", "cover", "--skip-unmapped")
    with pytest.raises(mpkd.UserError, match="--class-map is for --external"):
        evaluate.main(evaluate.get_args([str(map_model), "--class-map", str(cmap)]))
    (root / "four").mkdir()  # a mapped folder with no images in it
    (root / "four" / "notes.txt").write_text("not a tile")
    cmap.write_text("folder,class\nzero,01_CLASS0\nfour,02_CLASS1\n")
    with pytest.raises(mpkd.UserError, match=r"class folder .*four holds no images \(\.tif"):
        run("--class-map", cmap, "--skip-unmapped")
    shutil.rmtree(root / "four")
    cmap.write_text("folder,class\nzero,01_CLASS0\n")
    (root / "zero" / "broken.png").write_bytes(b"not a png")
    proc = run_script("evaluate.py", map_model, "--external", root, "--class-map", cmap, "--skip-unmapped",
                      "--device", "cpu", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.count("\n") == 1 and "zero/broken.png" in err and "Method" not in out


def test_every_external_tile_is_accounted_for(map_model, tmp_path, capsys):
    root = external_folder(tmp_path / "ext", np.random.default_rng(0))
    (root / "notes.txt").write_text("not a tile")
    (root / "zero" / "empty").mkdir()
    cmap = tmp_path / "map.csv"  # semicolons, as spreadsheets in many languages write them, and a typo: THRE
    cmap.write_text("folder;class\nzero;01_CLASS0\none;02_CLASS1\ntwo;03_CLASS2\nTHRE;04_CLASS3\n")
    argv = [map_model, "--external", root, "--class-map", cmap, "--device", "cpu"]
    proc = run_script("evaluate.py", *argv, cwd=tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.splitlines()[-1].startswith("error: the class map")
    assert re.search(r"does not name the folders three of .* \(it names THRE, which is not a folder\): .* "
                     r"--skip-unmapped", err) and "Traceback" not in err
    [row] = evaluate.main(evaluate.get_args([*map(str, argv), "--skip-unmapped", "--json", str(tmp_path / "r.json")]))
    out, err = capsys.readouterr()
    assert "warning: --class-map map.csv names THRE, which is not a folder of the set" in err
    ext = json.loads((tmp_path / "r.json").read_text())["checkpoints"][0]["data"]["external"]
    assert ext["tiles"] == {"one": {"held": 3, "scored": 3}, "three": {"held": 3, "scored": 0},
                            "two": {"held": 3, "scored": 3}, "zero": {"held": 3, "scored": 3}}
    assert (ext["unmapped"], ext["other_files"], ext["empty_folders"]) == (["three"], 1, 1)
    assert row["n_test"] == 9 and f"over the 9 tiles of {root} (3 tiles of three left out)" in out
    assert re.search(r"\n  three +3 +0  left out: not in the class map \(--skip-unmapped\)\n", out)
    assert "scored 9 of the 12 tiles in 4 folders; passed over: 1 file that is not an image, 1 empty folder" in out
    cmap.write_text("folder,class\nZERO,01_CLASS0\n")
    with pytest.raises(mpkd.UserError, match="names ZERO, the folder is zero: folder names must match letter for"):
        evaluate.main(evaluate.get_args([*map(str, argv), "--skip-unmapped"]))


def test_an_implausible_image_scale_is_refused_before_any_work(map_model, tmp_path, capsys):
    root = external_folder(tmp_path / "ext", np.random.default_rng(0))  # 160 px tiles; the field is 19.8 um
    views = len(mpkd.view_boxes(160, 160, 32, "cover", 5.0, 19.8))
    refused = (rf"--image-mpp 5 is outside 0.05-2 um/px, the scales scanners write: a 160 x 160 px tile at 5 um/px "
               rf"\(800 x 800 um\) gives {views} views of the 19.8 um training field; pass --any-mpp")
    cmap = tmp_path / "map.csv"
    cmap.write_text("zero,01_CLASS0\none,02_CLASS1\ntwo,03_CLASS2\nthree,04_CLASS3\n")
    with pytest.raises(mpkd.UserError, match=refused):
        evaluate.main(evaluate.get_args([str(map_model), "--external", str(root), "--class-map", str(cmap),
                                         "--image-mpp", "5", "--device", "cpu"]))
    with pytest.raises(mpkd.UserError, match=refused):
        predict.main(predict.get_args([str(map_model), "--images", str(root), "--image-mpp", "5"]))
    Image.fromarray(layout_pixels(LAYOUT[:2, :3], 40)).save(tmp_path / "a.png")
    with pytest.raises(mpkd.UserError, match="outside 0.05-2 um/px.*: a window of the 19.8 um training field would be "
                                             "4 px of the image; pass --any-mpp"):
        predict.main(predict.get_args([str(map_model), "--map", str(tmp_path / "a.png"), "--image-mpp", "5"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "ext", "map.csv"]  # no maps folder either
    one = tmp_path / "one"
    one.mkdir()
    (one / "t.png").write_bytes((root / "zero" / "zero_0.png").read_bytes())
    predict.main(predict.get_args([str(map_model), "--images", str(one), "--image-mpp", "3", "--any-mpp",
                                   "--scale-rule", "crop", "--predictions", str(tmp_path / "p.csv")]))  # on purpose
    predict.main(predict.get_args([str(map_model), "--images", str(one), "--image-mpp", "0.6",
                                   "--predictions", str(tmp_path / "p.csv")]))
    assert ("note: a 160 x 160 px tile at 0.6 um/px (96 x 96 um) gives 25 views of the 19.8 um training field: "
            "about 25 views of 1 tiles to read and predict") in capsys.readouterr().out
    predict.main(predict.get_args([str(map_model), "--map", str(tmp_path / "a.png"), "--image-mpp", "1.5",
                                   "--out-dir", str(tmp_path / "maps")]))  # in range, but coarser than training
    assert "note: a.png: its windows are 13 px, enlarged to the network's 32 px" in capsys.readouterr().out


def test_clustered_interval_by_hand_and_its_coverage_in_simulation():
    # two slides of 4 tiles, 4 and 1 right: accuracy 5/8; each slide's share of the estimate
    # (sum of (x - 5/8) / 8) is +-0.1875, so the cluster-robust variance is 2 / 1 * 2 * 0.1875^2
    got = evaluate.clustered_interval([1, 1, 1, 1, 1, 0, 0, 0], ["a"] * 4 + ["b"] * 4)
    se, t, logit = math.sqrt(2 * 2 * 0.1875 ** 2), evaluate.t_critical(1), math.log(5 / 3)
    expit = lambda v: 100 / (1 + math.exp(-v))
    slope = se / (5 / 8 * 3 / 8)
    assert got == {"estimate": 62.5, "ci95": pytest.approx([expit(logit - t * slope), expit(logit + t * slope)]),
                   "groups": 2}
    assert evaluate.clustered_interval([1, 0, 1], ["a"] * 3) is None  # one slide: no spread between slides
    assert evaluate.clustered_interval([1, 1, 1, 1], ["a", "a", "b", "b"]) is None  # 100%: no logit
    assert evaluate.clustered_interval([1, 0, 1, 0], ["a", "a", "b", "b"], [0, 0, 1, 1]) is None  # a class, one slide
    diff = evaluate.clustered_interval([1, 0, -1, 0, 1, 1], list("aabbcc"), proportion=False)
    assert diff["estimate"] == pytest.approx(100 / 3) and diff["ci95"][0] < 0 < diff["ci95"][1]
    spec = importlib.util.spec_from_file_location("intervals", HERE / "docs" / "intervals.py")
    intervals = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(intervals)
    covered = intervals.coverage(0.7, 0.2, 20, 50, sims=300)  # 20 slides whose accuracies differ much
    assert covered["clustered"] >= 0.9 and covered["difference"] >= 0.9 and covered["wilson"] <= 0.6


def test_the_report_clusters_by_slide_and_recomputes_from_the_predictions_csv(trained, student, data_dir, tmp_path,
                                                                               capsys):
    rows = evaluate.main(evaluate.get_args([str(trained / "teacher.pt"), str(student), "--data", str(data_dir),
                                            "--device", "cpu", "--json", str(tmp_path / "r.json"),
                                            "--predictions", str(tmp_path / "p.csv")]))
    out = capsys.readouterr().out
    assert "by slide" in out and "(by slide: 95% intervals clustered by the 5 slides the tiles come from" in out
    table = read_csv(tmp_path / "p.csv")
    for row in rows:  # the clustered interval again, from the CSV alone: its outcomes and slides
        mine = [r for r in table if r["checkpoint"] == row["checkpoint"]]
        again = evaluate.clustered_interval([r["true"] == r["predicted"] for r in mine], [r["group"] for r in mine])
        assert row["clustered"]["by"] == "slide" and row["clustered"]["accuracy"] == again
    [test] = json.loads((tmp_path / "r.json").read_text())["mcnemar"]
    assert test["difference"] == pytest.approx(rows[0]["accuracy"] - rows[1]["accuracy"])
    assert test["difference_clustered"]["groups"] == 5


def test_a_file_that_is_no_model_names_what_a_model_is(data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("a text file, not a model")
    with pytest.raises(mpkd.UserError, match=r"notes.txt is corrupt or not a torch file \(\w+\); pass a checkpoint "
                                             r"\(a model, written by train_teacher.py or distill.py"):
        evaluate.main(evaluate.get_args([str(tmp_path / "notes.txt"), "--device", "cpu"]))
    with pytest.raises(mpkd.UserError, match=r"not a torch file .*train_teacher.py or distill.py.*, or an .onnx file "
                                             r"written by export.py"):
        predict.main(predict.get_args([str(tmp_path / "notes.txt"), "--images", str(data_dir)]))


def test_external_comparisons_are_printed_and_the_error_grid_names_the_folder(map_model, tmp_path, capsys):
    root = external_folder(tmp_path / "ext", np.random.default_rng(0))
    cmap = tmp_path / "map.csv"
    cmap.write_text("zero,01_CLASS0\none,02_CLASS1\ntwo,03_CLASS2\nthree,04_CLASS3\n")
    other = tmp_path / "other.pt"  # another student of the same data: a pair to compare, not a Table II pair
    distill.main(distill.get_args(["--data", str(map_model.parent / "d"), "--distill-weight", "0", "--teacher-logits",
                                   str(tmp_path / "none.pt"), "--out", str(other), "--epochs", "1",
                                   "--img-size", "32", "--batch-size", "32", "--device", "cpu"]))
    capsys.readouterr()
    rows = evaluate.main(evaluate.get_args([str(map_model), str(other), "--external", str(root), "--class-map",
                                            str(cmap), "--device", "cpu"]))
    a, b = (np.asarray(r["outcomes"]) for r in rows)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    assert (f"seed 0: student alone ({map_model}) vs student alone ({other}): {only_a} / {only_b}, two-sided p = "
            f"{evaluate.mcnemar_exact(only_a, only_b):.3g}") in capsys.readouterr().out
    wrong = next(i for i, ok in enumerate(rows[1]["outcomes"]) if not ok)
    truth, folder = rows[1]["classes"][rows[1]["labels"][wrong]], rows[1]["folders"][wrong]
    assert evaluate.error_caption(rows[1], wrong).startswith(f"true {truth} ({folder})\npred")


def test_docs_scripts_answer_help_and_start_nothing(tmp_path):
    for script in sorted((HERE / "docs").glob("*.py")):
        proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("usage:"), (script.name, proc.stderr[-500:])
    assert list(tmp_path.iterdir()) == []


def test_progress_is_a_bar_on_a_terminal_and_a_few_clean_lines_in_a_log(monkeypatch):
    clock = iter([0.0, 1.0, 6.0, 7.0, 13.0])
    monkeypatch.setattr(mpkd.time, "perf_counter", lambda: next(clock, 13.0))  # the bar's own clock reads go on
    said = []
    progress = mpkd.Progress(100, "tiles", said.append, label="decoded ")  # stderr is no terminal under pytest
    for _ in range(4):
        progress.update(20)
    assert said == ["  decoded 40 / 100 tiles, 7 tiles/s, 9 s left", "  decoded 80 / 100 tiles, 6 tiles/s, 3 s left"]
    pytest.importorskip("tqdm")
    monkeypatch.setattr(mpkd.sys.stderr, "isatty", lambda: True, raising=False)
    said.clear()
    progress = mpkd.Progress(10, "windows", said.append)
    progress.update(10)
    assert said == [] and progress.bar is not None and progress.bar.n == 10


def test_named_external_set_is_fetched_md5_checked_and_refused_offline(map_model, tmp_path, monkeypatch):
    import http.server
    import threading
    import zipfile
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    served = tmp_path / "served"
    external_folder(served / "SET" / "tiles", rng, names=("TUM", "STR"), size=80, inner=80)  # one class each
    with zipfile.ZipFile(tmp_path / "SET.zip", "w") as z:
        for f in sorted((served / "SET").rglob("*.png")):
            z.write(f, f.relative_to(served).as_posix().replace("SET/tiles", "SET"))
    md5 = __import__("hashlib").md5((tmp_path / "SET.zip").read_bytes()).hexdigest()
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.handle_error = lambda *a: None  # a client that hangs up early (torchvision's first request) is no error
    threading.Thread(target=server.serve_forever, daemon=True).start()
    known = {"url": f"http://127.0.0.1:{server.server_address[1]}/SET.zip", "md5": "0" * 32, "page": "its page",
             "folder": "data/SET", "mpp": 0.2475, "class_map": {"TUM": "01_CLASS0", "STR": "02_CLASS1"}}
    monkeypatch.setitem(evaluate.EXTERNAL_SETS, "the-set", known)
    args = [str(map_model), "--external", "the-set", "--device", "cpu"]
    try:
        with pytest.raises(mpkd.UserError, match="download failed.*get SET.zip from its page and unpack it into data"):
            evaluate.main(evaluate.get_args(args))  # a wrong md5: nothing unpacked
        assert not (tmp_path / "data" / "SET").exists()
        known["md5"] = md5
        [row] = evaluate.main(evaluate.get_args(args))
    finally:
        server.shutdown()
    assert row["n_test"] == 6 and row["data"]["external"]["image_mpp"] == 0.2475 and row["accuracy"] == 100
    assert row["data"]["external"]["class_map"] == {"STR": "02_CLASS1", "TUM": "01_CLASS0"}
    known["url"] = "http://127.0.0.1:9/SET.zip"  # nothing answers there: offline
    known["folder"] = "data/OTHER"
    with pytest.raises(mpkd.UserError, match="data/OTHER is missing and 127.0.0.1:9 cannot be reached; get SET.zip"):
        evaluate.main(evaluate.get_args(args))


def test_a_folders_stain_is_the_median_of_its_tiles_and_odd_tiles_do_not_decide_it():
    unit = lambda rows: [list(np.asarray(r) / np.linalg.norm(r)) for r in rows]
    stains = unit([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
    odd = unit([[0.45, 0.45, 0.77], [0.30, 0.93, 0.22]])  # two tiles of another stain (ink, say)
    images = torch.stack([_stained_tile(stains, seed=i)[0] for i in range(7)] + [_stained_tile(odd, seed=9 + i)[0]
                                                                                  for i in range(2)])
    folder = mpkd.median_stain(mpkd.tile_stains(images))
    assert folder["tiles"] == 9 and (np.asarray(folder["stains"]) * np.asarray(stains)).sum(1).min() > 0.999
    pooled = mpkd.macenko_fit(images.permute(0, 2, 3, 1).reshape(-1, 3))  # all pixels as one estimate
    assert (np.asarray(pooled["stains"]) * np.asarray(stains)).sum(1).min() < 0.99  # pulled by the 2 odd tiles
    assert len(mpkd.tile_stains(images, most=3)) == 3  # every 3rd tile
    with pytest.raises(ValueError, match="no tile"):
        mpkd.median_stain([])


# ----------------------------------------------------------------------------------------------
# The method in anyone's own loop (docs/own-loop.md)


def test_own_loop_recipe_runs_as_pasted(tmp_path):
    text = (HERE / "docs" / "own-loop.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(code.splitlines()) <= 60
    (tmp_path / "recipe.py").write_text(code)
    proc = subprocess.run([sys.executable, "recipe.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(HERE)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = dict(re.findall(r"^(.*): (\d+) of 256 training images right$", proc.stdout, re.M))
    assert set(found) == {"Multi-Part KD", "vanilla KD"} and all(int(n) > 3 * 256 // 4 for n in found.values())


def test_stored_logits_find_each_images_own_row_under_a_shuffling_loader():
    n, classes = 50, 3
    stored = torch.randn(n, 2, classes)  # (N, views, C)
    data = torch.utils.data.TensorDataset(torch.arange(n) * 10)  # an "image" that says which it is
    seen = 0
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    for (values,) in loader:
        index, view = values // 10, (values // 10) % 2  # what a dataset returning its index gives back
        expected = torch.stack([stored[i, i % 2] for i in index.tolist()])
        assert torch.equal(mpkd.stored_logits(stored, index, view), expected)
        assert torch.equal(mpkd.stored_logits(stored[:, 0], index), stored[index, 0])
        seen += len(index)
    assert seen == n


def test_eval_logits_and_predict_restore_the_models_mode_and_uint8_is_required():
    model = mpkd.build_mixnet("mixnet_s", 4, pretrained=False)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for mode in (True, False):
        model.train(mode)
        logits = mpkd.eval_logits(model, mpkd.network_input(x))
        assert model.training is mode and not logits.requires_grad
        mpkd.predict(model, x, "fp32")
        assert model.training is mode
    model.eval()
    # predict is eval_logits in batches, channels_last: the same up to float rounding
    assert torch.allclose(mpkd.eval_logits(model, mpkd.network_input(x)), mpkd.predict(model, x, "fp32"), atol=1e-5)
    for wrong in (x.float() / 255, x.float(), x.long()):
        with pytest.raises(TypeError, match="uint8 images .* not torch"):
            mpkd.predict(model, wrong, "fp32")
        with pytest.raises(TypeError, match="uint8"):
            mpkd.both_views_logits(model, wrong, "fp32")


def test_import_mpkd_loads_little_more_than_torch():
    def modules(imports):
        code = f"import sys, {imports}; print('timm' in sys.modules, len(sys.modules))"
        proc = subprocess.run([sys.executable, "-c", code],
                              cwd=HERE, capture_output=True, text=True, timeout=120)
        loaded, count = proc.stdout.split()
        return loaded == "True", int(count)
    timm_loaded, count = modules("mpkd")
    assert not timm_loaded and count <= modules("torch, numpy, PIL.Image")[1] + 20  # timm: when a network is built


# ----------------------------------------------------------------------------------------------
# Snapshot-ensemble teacher (distill.py --ensemble)


def test_ensemble_target_is_the_mean_softened_distribution_and_one_member_is_the_paper():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 3, 5) * 3, torch.randint(0, 5, (6,))
    T, w = 4.0, 0.5
    target = torch.stack([F.softmax(t[:, m] / T, 1) for m in range(3)]).mean(0)  # by hand: (B, C)
    ps = F.softmax(s / T, 1)
    kl = (target * (target.log() - ps.log())).sum(1).mean()
    expected = (1 - w) * F.cross_entropy(s, y) + w * T ** 2 * kl
    assert torch.allclose(mpkd.kd_loss(s, t, y, T, w), expected, atol=1e-6)
    logit_mean = mpkd.kd_loss(s, t.mean(1), y, T, w)  # averaging logits is another target
    assert not torch.allclose(logit_mean, expected, atol=1e-3)
    assert torch.equal(mpkd.kd_loss(s, t[:, :1], y, T, w), mpkd.kd_loss(s, t[:, 0], y, T, w))  # exactly


def test_ensemble_weights_weigh_the_members_distributions():
    torch.manual_seed(2)
    s, t, y = torch.randn(6, 5), torch.randn(6, 3, 5) * 3, torch.randint(0, 5, (6,))
    equal = mpkd.kd_loss(s, t, y, 4.0, 0.5)
    assert torch.allclose(mpkd.kd_loss(s, t, y, 4.0, 0.5, torch.tensor([2.0, 2.0, 2.0])), equal, atol=1e-6)
    only_last = mpkd.kd_loss(s, t, y, 4.0, 0.5, torch.tensor([0.0, 0.0, 1.0]))  # a weight of 0 leaves one out
    assert torch.allclose(only_last, mpkd.kd_loss(s, t[:, 2], y, 4.0, 0.5), atol=1e-6)
    target = 0.25 * F.softmax(t[:, 0] / 4, 1) + 0.75 * F.softmax(t[:, 1] / 4, 1)  # by hand: (B, C)
    kl = (target * (target.log() - F.log_softmax(s / 4, 1))).sum(1).mean()
    weighted = mpkd.kd_loss(s, t[:, :2], y, 4.0, 0.5, torch.tensor([1.0, 3.0]))
    assert torch.allclose(weighted, 0.5 * F.cross_entropy(s, y) + 0.5 * 16 * kl, atol=1e-5)


def test_ensemble_of_one_epoch_trains_like_that_anchor_and_all_is_every_stored_epoch(trained, data_dir, tmp_path,
                                                                                     capsys):
    run = lambda out, *flags: distill.main(distill.get_args(student_argv(data_dir, trained, tmp_path / out, *flags)))
    run("anchor.pt", "--anchors", "2")
    run("one.pt", "--ensemble", "2")
    run("all.pt", "--ensemble", "all")
    anchor, one, everything = (mpkd.load_checkpoint(tmp_path / n) for n in ("anchor.pt", "one.pt", "all.pt"))
    assert all(torch.equal(one["state_dict"][k], v) for k, v in anchor["state_dict"].items())
    assert (one["method"], one["ensemble"], anchor["method"]) == ("ensemble", [2], "vanilla")
    assert everything["ensemble"] == [1, 2, 3] and everything["method"] == "ensemble"
    assert "schedule" not in everything
    assert all("route" in r and "teacher_epoch" not in r for r in everything["history"])
    capsys.readouterr()
    rows = evaluate.main(evaluate.get_args([str(tmp_path / n) for n in ("anchor.pt", "all.pt")] + ["--device", "cpu"]))
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["vanilla KD", "snapshot ensemble KD (epochs 1, 2, 3)"]
    assert "seed 0: snapshot ensemble KD (epochs 1, 2, 3) vs vanilla KD:" in out


@pytest.mark.parametrize("flags,match", [
    (["--ensemble", "all", "--multipart"], "--ensemble and --multipart are two methods"),
    (["--ensemble", "1,2", "--anchors", "1,2"], "--ensemble and --anchors are two methods"),
    (["--ensemble", "1,7"], r"--ensemble 1,7: epochs \[7\] are not stored; stored epochs are \[1, 2, 3\]"),
    (["--ensemble", "one"], "--ensemble 'one' must be comma-separated"),
])
def test_ensemble_conflicts_and_unknown_epochs_are_one_line(trained, data_dir, tmp_path, flags, match):
    with pytest.raises(mpkd.UserError, match=match):
        distill.main(distill.get_args(student_argv(data_dir, trained, tmp_path / "s.pt", *flags)))
    assert not list(tmp_path.iterdir())


def test_near_uniform_early_targets_are_named_with_the_anchors_that_leave_them_out(trained, data_dir, tmp_path,
                                                                                  capsys):
    stored = mpkd.load_file(trained / "teacher_logits.pt", mpkd.LOGITS_FORMAT)
    stored["logits"][1] = torch.zeros_like(stored["logits"][1])  # a teacher that has learnt nothing yet
    for epoch in (2, 3):  # and confident ones
        stored["logits"][epoch] = stored["logits"][epoch] * 100
    mpkd.save_atomic(stored, tmp_path / "teacher_logits.pt")
    assert mpkd.target_uniformity(stored["logits"][1], 5.0) == pytest.approx(1.0)
    assert mpkd.target_uniformity(stored["logits"][3], 5.0) < 0.5
    distill.main(distill.get_args(["--data", str(data_dir), "--teacher-logits", str(tmp_path / "teacher_logits.pt"),
                                   "--out", str(tmp_path / "s.pt"), "--epochs", "2", "--multipart", *FAST]))
    err = capsys.readouterr().err
    assert "targets of teacher epochs 1 are near uniform (entropy 1.00" in err
    assert "--anchors 2,3 leaves them out" in err
    distill.main(distill.get_args(["--data", str(data_dir), "--teacher-logits", str(tmp_path / "teacher_logits.pt"),
                                   "--out", str(tmp_path / "e.pt"), "--epochs", "2", "--ensemble", "all", *FAST]))
    assert "--ensemble 2,3 leaves them out" in capsys.readouterr().err  # the flag that keeps the method


def test_every_script_opens_its_help_with_a_whole_sentence(monkeypatch):
    for script in (train_teacher, distill, evaluate, predict, export):
        help_text = parser_of(script, monkeypatch).description
        assert help_text.endswith(".") and help_text[0].isupper() and "\n" not in help_text
