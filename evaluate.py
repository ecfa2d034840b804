"""Evaluate checkpoints on their test split in the shape of the paper's Table II, with intervals,
significance tests and pictures; or predict a folder of new tiles, or map large images and slides.

    python evaluate.py teacher.pt alone.pt vanilla.pt student.pt --plots plots
    python evaluate.py student.pt --predictions student_predictions.csv   # + per-class report
    python evaluate.py teacher.pt student.pt --benchmark                   # + latency and throughput
    python evaluate.py runs/seed*/{teacher,alone,vanilla,mpkd}.pt          # several seeds
    python evaluate.py student.pt --images new_tiles/ --predictions new_tiles.csv  # no labels needed
    python evaluate.py student.pt --export student.onnx --benchmark    # one deployable file, measured
    python evaluate.py student.pt --export student.int8.onnx --int8  # int8, checked against fp32
    python evaluate.py student.onnx --images new_tiles/                # the exported file on new tiles
    python evaluate.py student.onnx --map slides/ --out-dir maps      # tissue maps of slides or large images
    python evaluate.py teacher.pt student.pt --external crc-val-he-7k  # another lab's tiles, at their scale

Each checkpoint carries its network, classes, image size, split settings and data folder, so no
flag is needed; a checkpoint whose classes or training files do not match --data is refused. Every
accuracy comes with its 95% Wilson interval; checkpoints tested on the same tiles are compared
with McNemar's exact test; across seeds the paired difference gets a 95% t-interval.
"""

import argparse
import contextlib
import copy
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import mpkd

ROW_COLOURS = {"teacher": "#444444", "student alone": "#1f77b4", "vanilla KD": "#ff7f0e",
               "Multi-Part KD": "#2ca02c", "Multi-Part KD, auto anchors": "#9467bd", "snapshot ensemble KD": "#d62728"}
TABLE2_PAIRS = [("Multi-Part KD", "vanilla KD"), ("vanilla KD", "student alone"),
                ("Multi-Part KD", "student alone"), ("Multi-Part KD, auto anchors", "Multi-Part KD"),
                ("snapshot ensemble KD", "Multi-Part KD"), ("snapshot ensemble KD", "vanilla KD")]
STAIN_AUGMENTED = ", stain-augmented"  # appended to the row of a checkpoint trained with --stain-augment
IMAGES_CHUNK = 1024  # tiles decoded and predicted at a time by --images: memory stays flat


def get_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),  # the first sentence, whole
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by train_teacher.py or distill.py")
    p.add_argument("--data", default=None,
                   help="folder of class folders the checkpoints were trained on (unset: the folder "
                        "each checkpoint records)")
    p.add_argument("--groups", default=None, metavar="FILE.csv",
                   help="the groups file of checkpoints split by group, where it is not found by "
                        "itself (at its recorded path, or by name in or beside --data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="score in bf16 autocast (default fp32, so that a GPU and a CPU give the same "
                        "accuracies and probabilities as the exported file)")
    p.add_argument("--json", default=None, help="also write every number printed to this JSON file")
    p.add_argument("--predictions", default=None,
                   help="CSV of one row per image and checkpoint (with --images: default "
                        "<folder name>_predictions.csv)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write learning curves, confusion matrices, error grids and the Table II "
                        "plot as PNG files to this folder (needs matplotlib)")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="predict every image under DIR (no labels needed) with one checkpoint")
    p.add_argument("--tta", action="store_true",
                   help="with --images: average the logits of each tile and its mirror")
    p.add_argument("--map", default=None, metavar="IMAGE_OR_FOLDER",
                   help="tissue map of a large image or whole slide (or of every one in a folder) with "
                        "one model: PNG map and overlay, tiles CSV, QuPath GeoJSON, summary JSON")
    p.add_argument("--out-dir", default="maps", help="--map: folder of the outputs")
    p.add_argument("--stride", type=float, default=None, metavar="UM",
                   help="--map: step between windows in micrometres (unset: the window, no overlap; "
                        "Kather 2016 used a third of it); overlapping windows are averaged per cell")
    p.add_argument("--external", default=None, metavar="DIR",
                   help="score the checkpoints on another lab's class folders, every image a test tile; "
                        f"or a named set, fetched into data/ on first use: {', '.join(mpkd.EXTERNAL_SETS)}")
    p.add_argument("--class-map", default=None, metavar="FILE.csv",
                   help="--external: rows of (folder in DIR, checkpoint class); several folders to one "
                        "class allowed, a folder left unmapped is skipped (unset: folder names are classes)")
    p.add_argument("--image-mpp", type=float, default=None,
                   help="microns per pixel of the --external, --images or --map images (unset: for --map "
                        "their metadata; for tiles the training tiles' scale, i.e. resized whole)")
    p.add_argument("--scale-rule", choices=mpkd.SCALE_RULES, default=None,
                   help="--external and --images with a known scale: crop (the training field of view at "
                        "the training scale, centred), cover (the fewest such fields covering the tile, "
                        "logits averaged), whole (the tile at the training scale, one larger input), or "
                        "resize (squeezed whole; what runs without a scale) (unset: cover)")
    p.add_argument("--stain-norm", choices=("macenko", "macenko-tile"), default=None,
                   help="--external, --images, --map: restain to the training tiles' stain (recorded in "
                        "the checkpoint) or --stain-ref's, Macenko's method with the stain estimated over "
                        "the folder or large image (macenko) or per tile (macenko-tile)")
    p.add_argument("--stain-ref", default=None, metavar="IMAGE",
                   help="--stain-norm: the image whose stain is the target (unset: the checkpoint's)")
    p.add_argument("--tile-um", type=float, default=None,
                   help="--map, --external, --images: the training tiles' width in micrometres (unset: as "
                        "the model records it)")
    p.add_argument("--no-mask", action="store_true",
                   help="--map: classify every window, background too (else only tissue windows)")
    p.add_argument("--overwrite", action="store_true", help="--map: redo images that are done")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="--map: only every N-th image from the K-th (0-based), for cluster array jobs")
    p.add_argument("--benchmark", action="store_true",
                   help="measure batch-1 latency and large-batch throughput (with --export: of the "
                        "ONNX file in ONNX Runtime too)")
    p.add_argument("--export", default=None, metavar="PATH.onnx",
                   help="write the checkpoint's network as one ONNX file: uint8 RGB tiles (N, S, S, 3) "
                        "in, class probabilities out; checked against PyTorch on the test tiles "
                        "(needs onnx, onnxscript, onnxruntime)")
    p.add_argument("--int8", action="store_true",
                   help="with --export: an int8 file (static quantisation calibrated on training tiles), "
                        "written only if it agrees with the fp32 network on the test tiles; with "
                        "--benchmark, measured against the fp32 file in ONNX Runtime and OpenVINO")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Report statistics


def classification_report(y_true: list[int], y_pred: list[int], num_classes: int) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1 (all in %) and the
    confusion matrix (rows: true class, columns: predicted). An undefined ratio (0/0) counts as 0.
    Balanced accuracy averages recall over classes present in `y_true`; macro-F1 averages F1 over
    all classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": float(100 * tp.sum() / max(cm.sum(), 1)),
        "balanced_accuracy": float(100 * recall[support > 0].mean()) if support.any() else 0.0,
        "macro_f1": float(100 * f1.mean()),
        "precision": (100 * precision).tolist(), "recall": (100 * recall).tolist(), "f1": (100 * f1).tolist(),
        "support": support.tolist(), "confusion": cm.tolist(),
    }



Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct / n, in percent; (0, 100) for n = 0."""
    if n == 0:
        return 0.0, 100.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (tiles only A gets right, only B
    gets right): twice the Binomial(only_a + only_b, 1/2) tail at the smaller count, capped at 1."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integer arithmetic until this one division


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer df (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term = total = 1.0
    if df % 2:  # odd: 2/pi * (theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...))
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0))
    for k in range(1, df // 2):  # even: sin * (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...)
        term *= (2 * k - 1) / (2 * k) * c2
        total += term
    return math.sin(theta) * total


def t_critical(df: int, level: float = 0.95) -> float:
    """The two-sided Student t critical value: t with P(|T| <= t) = level (bisection)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: list[float]) -> dict:
    """Mean, sample std and the 95% t-interval of the mean; no spread and no interval for one value."""
    arr = np.asarray(values, dtype=np.float64)
    if len(arr) < 2:
        return {"n": len(arr), "mean": float(arr.mean()), "std": None, "ci95": None}
    std = float(arr.std(ddof=1))
    half = t_critical(len(arr) - 1) * std / math.sqrt(len(arr))
    return {"n": len(arr), "mean": float(arr.mean()), "std": std,
            "ci95": [float(arr.mean()) - half, float(arr.mean()) + half]}


def _median_seconds(fns: list, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Median wall time of each function, the functions taking turns (A B B A ...) so drift cancels."""
    times = [[] for _ in fns]
    for i in range(warmup + repeats * len(fns)):
        k = i % len(fns) if (i // len(fns)) % 2 == 0 else len(fns) - 1 - i % len(fns)
        mpkd.sync(device)
        start = time.perf_counter()
        fns[k]()
        mpkd.sync(device)
        if i >= warmup:
            times[k].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def benchmark(model, img_size: int, device: torch.device, precision: str, train_batch: int,
              repeats: int = 20) -> dict:
    """Batch-1 latency (median ms), inference images/s at mpkd.eval_batch(), and images/s of bare
    training steps (forward, backward, Adam) on a resident batch, with the cross-entropy alone and
    with the KD loss of random teacher logits, taking turns: the floor against which an epoch's
    data overhead is measured, and the cost of the KD term. Works on a copy of `model`."""
    model, big_batch = mpkd.to_device(copy.deepcopy(model), device).eval(), mpkd.eval_batch(device)
    one = mpkd.channels_last(torch.randn(1, 3, img_size, img_size, device=device))
    big = mpkd.channels_last(torch.randn(big_batch, 3, img_size, img_size, device=device))
    with torch.inference_mode(), mpkd.autocast(device, precision):
        latency, = _median_seconds([lambda: model(one)], device, repeats, warmup=5)
        batch_s, = _median_seconds([lambda: model(big)], device, max(3, repeats // 4), warmup=2)
        num_classes = model(one).shape[1]
    x = mpkd.channels_last(torch.randn(train_batch, 3, img_size, img_size, device=device))
    y = torch.randint(0, num_classes, (train_batch,), device=device)
    teacher = torch.randn(train_batch, num_classes, device=device)
    opt = mpkd.make_optimizer(model, 1e-3, device)
    model.train()

    def step(distill_weight):
        with mpkd.autocast(device, precision):
            logits = model(x)
        loss = mpkd.kd_loss(logits, teacher, y, 5.0, distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ce_s, kd_s = _median_seconds([lambda: step(0.0), lambda: step(0.5)], device, max(3, repeats // 2),
                                 warmup=3)
    return {"latency_ms": 1000 * latency, "throughput": big_batch / batch_s,
            "train_step_images_per_s": train_batch / ce_s, "kd_step_images_per_s": train_batch / kd_s}


def summarise(rows: list[dict]) -> list[dict]:
    """Group evaluated checkpoints by (method, network), in Table II's order: n, accuracy mean, sample
    std and 95% t-interval of the mean (std and interval only with several seeds)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["network"]), []).append(row)
    rank = {method: i for i, method in enumerate(mpkd.METHODS)}  # Table II's order, others after
    out = []
    for method, net in sorted(groups, key=lambda k: (rank.get(base_method(k[0]), len(rank)), k[0], k[1])):
        stats = mean_interval([r["accuracy"] for r in groups[(method, net)]])
        first = groups[(method, net)][0]
        out.append({"method": method, "network": net, "n": stats["n"], "accuracy_mean": stats["mean"],
                    "accuracy_std": stats["std"], "accuracy_ci95": stats["ci95"],
                    "params_m": first["params_m"], "size_mb": first["size_mb"]})
    return out


def _one_per_seed(rows: list[dict], method: str) -> dict:
    """{pair key (seed, training split): row} for `method`, where that key has exactly one row."""
    found = {}
    for r in rows:
        if r["method"] == method:
            found.setdefault(tuple(r["pair_key"]), []).append(r)
    return {k: v[0] for k, v in found.items() if len(v) == 1}


def paired_difference(rows: list[dict], a: str = "Multi-Part KD", b: str = "vanilla KD") -> dict | None:
    """Per-seed accuracy difference a - b, paired on (seed, split): the differences, their mean,
    sample std, 95% t-interval of the mean, and on how many seeds a was ahead."""
    left, right = _one_per_seed(rows, a), _one_per_seed(rows, b)
    keys = sorted(set(left) & set(right))
    if not keys:
        return None
    diffs = [left[k]["accuracy"] - right[k]["accuracy"] for k in keys]
    stats = mean_interval(diffs)
    return {"a": a, "b": b, "seeds": [k[0] for k in keys], "diffs": diffs, "mean": stats["mean"],
            "std": stats["std"], "ci95": stats["ci95"], "wins": int(sum(d > 0 for d in diffs)),
            "ties": int(sum(d == 0 for d in diffs))}


def mcnemar_pairs(rows: list[dict]) -> list[dict]:
    """McNemar's exact test for every pair of checkpoints tested on the same images (same split)."""
    out = []
    for x, y in itertools.combinations(rows, 2):
        if x["test_key"] != y["test_key"]:
            continue
        a, b = np.asarray(x["outcomes"], bool), np.asarray(y["outcomes"], bool)
        only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
        out.append({"a": x["checkpoint"], "b": y["checkpoint"], "a_method": x["method"],
                    "b_method": y["method"], "seed_a": x["seed"], "seed_b": y["seed"],
                    "same_seed": x["pair_key"] == y["pair_key"], "only_a": only_a, "only_b": only_b,
                    "p": mcnemar_exact(only_a, only_b)})
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation on the test split


def load_checkpoint(path) -> dict:
    """A checkpoint, with the Table II row name of checkpoints written before it was used."""
    ckpt = mpkd.load_file(path, mpkd.CHECKPOINT_FORMAT, mpkd.FILE_KINDS[mpkd.CHECKPOINT_FORMAT]
                          + ", or for --images and --map an .onnx file written by --export")
    if ckpt["method"] == "student":
        ckpt["method"] = "student alone"
    return ckpt


def test_part(ckpt, path, args, device, cache):
    """The checkpoint's data and test images, decoded once per data folder, split and image size."""
    ident = ckpt["identity"]
    root, note = mpkd.resolve_data_folder(args.data, ckpt["args"].get("data"), path)
    key = (root, *(ident.get(k) for k in ("img_size", "split_by", "split_seed", "test_frac", "val_frac")),
           mpkd.locate_groups(ident, root, args.groups))  # found by content, on any machine
    if key not in cache:
        if note:
            print(note)
        data = mpkd.load_dataset(*key, classes_of=(ident["classes"], path))  # the folder first
        mpkd.check_memory(data, ("test",), device)
        progress = lambda done, total: print(f"  decoded {done} / {total} test images")
        cache[key] = (data, mpkd.load_part(data, "test", device, progress))
    data, part = cache[key]
    differ = mpkd.mismatches(ident, data["identity"])
    if differ:
        raise mpkd.UserError(f"{path} does not belong to the data folder {root} ({'; '.join(differ)})")
    return data, part


def evaluate_checkpoint(path, args, device, cache) -> dict:
    """One row of the table: method, network, test accuracy with its interval, size, per-class
    report, and per tile: outcome and class probabilities (for the tests, the CSV and the plots)."""
    ckpt = load_checkpoint(path)
    data, part = test_part(ckpt, path, args, device, cache)
    model = mpkd.to_device(mpkd.load_model(ckpt, path), device)
    precision = mpkd.pick_precision(device, args.amp)
    labels = part["labels"].tolist()
    row = score_row(path, ckpt, model, mpkd.predict(model, part["images"], precision), labels, part["files"],
                    {"folder": data["root"], **ckpt["identity"]}, [data["root"], mpkd.fingerprint(part["files"], labels)])
    row.update(precision=precision, groups=part.get("groups"))
    if args.benchmark:
        row["benchmark"] = benchmark(model, ckpt["identity"]["img_size"], device, precision,
                                     ckpt["args"]["batch_size"])
    return row


def method_name(ckpt: dict) -> str:
    """A checkpoint's row: its Table II method, marked where it trained with stain augmentation (so
    that it is never averaged with the paper's rows)."""
    return ckpt["method"] + (STAIN_AUGMENTED if ckpt["args"].get("stain_augment") else "")


def score_row(path, ckpt, model, logits, labels: list[int], files: list[str], data: dict, test_key: list) -> dict:
    """The table row of a checkpoint's logits (N, C) on tiles of known classes: accuracy with its
    Wilson interval, the per-class report, its size, and per tile outcome and probabilities.
    `data` says what the numbers were made on; rows with equal `test_key` were tested on the same
    tiles (McNemar)."""
    classes, predicted = ckpt["identity"]["classes"], logits.argmax(1).tolist()
    report = classification_report(labels, predicted, len(classes))
    outcomes = [p == t for p, t in zip(predicted, labels)]
    return {"checkpoint": str(path), "method": method_name(ckpt), "network": mpkd.network_name(ckpt["model"]),
            "seed": ckpt["args"]["seed"], "accuracy": report["accuracy"], "correct": sum(outcomes),
            "n_test": len(outcomes), "accuracy_ci95": list(wilson_interval(sum(outcomes), len(outcomes))),
            "params_m": mpkd.count_params(model) / 1e6, "size_mb": mpkd.model_size_mb(model),
            "classes": classes, "report": report, "data": data, "groups": None,
            "pair_key": [ckpt["args"]["seed"], ckpt["identity"]["train_fingerprint"]], "test_key": test_key,
            "outcomes": outcomes, "files": files, "labels": labels, "predicted": predicted,
            "probs": torch.softmax(logits.float(), 1).cpu().tolist(), "history": ckpt["history"]}


PER_TILE = ("outcomes", "files", "labels", "predicted", "probs", "history", "groups", "folders")  # not in the JSON


def export_checkpoint(path, args, device, cache) -> dict:
    """--export: the checkpoint's network as one ONNX file, checked on its test tiles."""
    ckpt = load_checkpoint(path)
    data, part = test_part(ckpt, path, args, device, cache)
    model = mpkd.load_model(ckpt, path).eval()
    if args.int8:
        exported = export_int8(ckpt, path, model, data, part, args.export)
        if args.benchmark:
            exported["benchmark"] = int8_benchmark(exported, part)
        return exported
    exported = export_onnx(ckpt, path, model, part, args.export)
    if args.benchmark:
        exported["benchmark"] = onnx_benchmark(exported["session"], model, exported["size"])
    return exported


def base_method(method: str) -> str:
    """A row's Table II method, without the mark of stain augmentation and an ensemble's epochs."""
    return re.sub(r" \(epochs [\d, ]+\)", "", method.removesuffix(STAIN_AUGMENTED))


def table2_pair(a: str, b: str) -> int | None:
    """The place of rows (a, b) among the Table II pairs McNemar's test is printed for: the same
    pair of methods, both trained with stain augmentation or both without; None for other pairs."""
    same_kind = a.endswith(STAIN_AUGMENTED) == b.endswith(STAIN_AUGMENTED)
    pair = (base_method(a), base_method(b))
    return TABLE2_PAIRS.index(pair) if same_kind and pair in TABLE2_PAIRS else None


def table_lines(rows, summary, paired, tests):
    """Table II per checkpoint with 95% intervals; per seed McNemar's test of the Table II pairs;
    with several seeds the mean per row and the paired difference across seeds."""
    bench = all("benchmark" in r for r in rows)
    w = max(15, *(len(r["method"]) + 2 for r in rows))  # the method column
    head = f"{'Method':<{w}}{'Network':<10}{'Acc (%)':>9}{'95% CI':>16}{'Params (M)':>12}{'Size (MB)':>11}"
    head += f"{'Latency (ms)':>14}{'Img/s':>10}{'Train img/s':>13}{'KD/CE':>7}" if bench else ""
    lines = [head + "  Checkpoint"]
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        line = (f"{r['method']:<{w}}{r['network']:<10}{r['accuracy']:>9.2f}{f'[{lo:.2f}, {hi:.2f}]':>16}"
                f"{r['params_m']:>12.2f}{r['size_mb']:>11.3f}")
        if bench:
            b = r["benchmark"]
            line += (f"{b['latency_ms']:>14.2f}{b['throughput']:>10.1f}{b['train_step_images_per_s']:>13.1f}"
                     f"{b['kd_step_images_per_s'] / b['train_step_images_per_s']:>7.3f}")
        lines.append(line + f"  {r['checkpoint']}")
    scored = " and ".join(dict.fromkeys(r["precision"] for r in rows))
    external = rows[0]["data"].get("external")
    tiles = f"tiles of {external['folder']}" if external else "test tiles"
    lines.append(f"(scored in {scored}; 95% Wilson score intervals over the {rows[0]['n_test']} {tiles})")
    table_pairs = []
    for t in (t for t in tests if t["same_seed"]):
        a, b, na, nb = t["a_method"], t["b_method"], t["only_a"], t["only_b"]
        if table2_pair(b, a) is not None:  # read the pair the way Table II does
            a, b, na, nb = b, a, nb, na
        if table2_pair(a, b) is not None:
            table_pairs.append((t["seed_a"], table2_pair(a, b), a, b, na, nb, t["p"]))
    if table_pairs:
        lines += ["", "McNemar's exact test on the same test tiles (A / B: tiles only A / only B gets right)"]
        lines += [f"  seed {seed}: {a} vs {b}: {na} / {nb}, two-sided p = {p:.3g}"
                  for seed, _, a, b, na, nb, p in sorted(table_pairs, key=lambda x: x[:2])]
    if any(s["n"] > 1 for s in summary):
        lines += ["", f"{'Method':<{w}}{'Network':<10}{'Acc (%) mean +- std':>22}{'95% CI of mean':>20}"
                      f"{'n':>4}{'Params (M)':>12}{'Size (MB)':>11}"]
        for s in summary:
            spread = (f"{s['accuracy_mean']:>13.2f} +- {s['accuracy_std']:<5.2f}" if s["n"] > 1
                      else f"{s['accuracy_mean']:>13.2f}         ")
            ci = f"[{s['accuracy_ci95'][0]:.2f}, {s['accuracy_ci95'][1]:.2f}]" if s["n"] > 1 else "-"
            lines.append(f"{s['method']:<{w}}{s['network']:<10}{spread}{ci:>20}{s['n']:>4}"
                         f"{s['params_m']:>12.2f}{s['size_mb']:>11.3f}")
    if paired and len(paired["diffs"]) > 1:  # one seed has no spread: McNemar above says it
        lo, hi = paired["ci95"]
        lines += ["", f"{paired['a']} - {paired['b']}, paired by seed {paired['seeds']}: "
                      f"{' '.join(f'{d:+.2f}' for d in paired['diffs'])} points",
                  f"  mean {paired['mean']:+.2f}, std {paired['std']:.2f}, 95% t-interval of the mean "
                  f"[{lo:+.2f}, {hi:+.2f}]; {paired['a']} ahead on {paired['wins']} of "
                  f"{len(paired['diffs'])} seeds" + (f" (tied on {paired['ties']})" if paired["ties"] else "")]
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    student = next((r for r in rows if r["method"] != "teacher"), None)
    if bench and teacher and student:
        t, s = teacher["benchmark"], student["benchmark"]
        lines += ["", f"{student['network']} vs {teacher['network']}: "
                      f"{t['latency_ms'] / s['latency_ms']:.2f}x lower "
                      f"batch-1 latency, {s['throughput'] / t['throughput']:.2f}x throughput"]
    return lines


def report_lines(row):
    """Per-class precision, recall and F1, and the confusion matrix with class names."""
    rep, classes = row["report"], row["classes"]
    width = max(12, max(len(c) for c in classes) + 2)
    lo, hi = row["accuracy_ci95"]
    lines = ["", f"{'class':<{width}}{'precision':>10}{'recall':>9}{'F1':>8}{'support':>9}"]
    lines += [f"{c:<{width}}{rep['precision'][i]:>10.2f}{rep['recall'][i]:>9.2f}{rep['f1'][i]:>8.2f}"
              f"{rep['support'][i]:>9}" for i, c in enumerate(classes)]
    lines += [f"accuracy {rep['accuracy']:.2f}% (95% CI {lo:.2f}-{hi:.2f})  balanced accuracy "
              f"{rep['balanced_accuracy']:.2f}%  macro-F1 {rep['macro_f1']:.2f}%", "",
              "confusion matrix (rows: true, columns: predicted)"]
    lines.append(" " * width + "".join(f"{i:>6}" for i in range(len(classes))))
    lines += [f"{f'{i} {c}':<{width}}" + "".join(f"{n:>6}" for n in counts)
              for i, (c, counts) in enumerate(zip(classes, rep["confusion"]))]
    return lines


def write_csv(header: list[str], rows: list[list], path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    mpkd.write_text_atomic(buf.getvalue(), path)


def test_predictions_csv(rows, path) -> None:
    """One row per test tile and checkpoint: file, true and predicted class, class probabilities,
    and the tile's group (slide or patient) where the split is by group or slide."""
    classes = rows[0]["classes"]
    grouped = any(r["groups"] for r in rows)
    external = rows[0]["data"].get("external")  # and of external tiles: their folder, the scale rule
    extra = ["group"] if grouped else ["folder", "scale_rule"] if external else []
    def more(r, i):
        return [r["groups"][i]] if grouped else [r["folders"][i], external["rule"]] if external else []

    write_csv(["checkpoint", "file", *extra, "true", "predicted", *(f"p_{c}" for c in classes)],
              [[r["checkpoint"], f, *more(r, i), classes[t], classes[p], *pr]
               for r in rows for i, (f, t, p, pr) in enumerate(zip(r["files"], r["labels"], r["predicted"], r["probs"]))],
              path)


# ----------------------------------------------------------------------------------------------
# Stain normalisation at prediction (--stain-norm, for --external, --images and --map): Macenko's
# method (mpkd's stain section), to the stain the checkpoint recorded of its training tiles


def stain_target(args, recorded: dict | None, model_path) -> dict | None:
    """The stain --stain-norm restains to, with where it comes from: --stain-ref IMAGE's, else the
    stain of the model's training tiles, recorded at training. None without --stain-norm."""
    if not args.stain_norm:
        return None
    if args.stain_ref:
        try:
            with Image.open(args.stain_ref) as img:
                pixels = torch.from_numpy(np.asarray(img.convert("RGB")).reshape(-1, 3).copy())
            return {**mpkd.macenko_fit(pixels), "from": f"--stain-ref {args.stain_ref}"}
        except mpkd.UNREADABLE as err:
            raise mpkd.UserError(f"--stain-ref {args.stain_ref} does not open as an image ({err})") from None
        except ValueError as err:
            raise mpkd.UserError(f"--stain-ref {args.stain_ref}: {err}; choose an image of stained tissue") from None
    if not recorded:
        raise mpkd.UserError(f"{model_path} records no stain of its training tiles (trained before "
                             f"--stain-norm existed, or on tiles too pale to estimate): pass --stain-ref "
                             f"IMAGE, e.g. a training tile")
    return {**recorded, "from": f"the training tiles of {Path(str(model_path)).name}"}


def folder_stain(views: list[torch.Tensor]) -> dict:
    """The stain of a folder of tiles: the median of its tiles' own estimates (mpkd.median_stain),
    from uint8 (N, 3, H, W) views, at most mpkd.STAIN_TILES of them."""
    n = sum(len(v) for v in views)
    try:
        return mpkd.median_stain([f for v in views for f in mpkd.tile_stains(v, max(1, mpkd.STAIN_TILES * len(v) // n))])
    except ValueError as err:
        raise mpkd.UserError(f"--stain-norm macenko: {err} in this folder; leave --stain-norm out") from None


def stain_normalised(groups, target: dict, mode: str, source: dict | None = None):
    """Views grouped by shape (decode_views), restained to `target`: from the stain estimated over
    all of them, or given as `source` (macenko: one folder, one lab), or per view (macenko-tile);
    and what was done."""
    if mode == "macenko" and source is None:
        source = folder_stain([views for views, _ in groups])
    out, unchanged = [], 0
    for views, owner in groups:
        views, left = mpkd.normalise_stain(views, source, target)
        out.append((views, owner))
        unchanged += left
    return out, {"stain_target_from": target["from"], "stain_target": target, "stain_source": source,
                 "stain_unchanged": unchanged}


# ----------------------------------------------------------------------------------------------
# External test sets (--external): another lab's class folders, every image a test tile, its
# folder names mapped to the checkpoint's classes and its tiles brought to the checkpoint's scale


def external_folder(args) -> tuple[Path, str | None]:
    """The folder --external names, and the named set it is (fetched into data/ on first use)."""
    if args.external in mpkd.EXTERNAL_SETS:
        known = mpkd.EXTERNAL_SETS[args.external]
        if not Path(known["folder"]).is_dir():
            mpkd.fetch_zip(known["folder"], known["url"], known["md5"], known["page"])
        return Path(known["folder"]), args.external
    if not Path(args.external).is_dir():
        raise mpkd.UserError(f"--external {args.external} is neither a folder of class folders nor a named "
                             f"set ({', '.join(mpkd.EXTERNAL_SETS)})")
    return Path(args.external), None


def external_set(args, classes: list[str]) -> dict:
    """The external tiles: files, the folder and mapped class of each, the class map and the
    folders it skips, and the scale rule that brings them to the checkpoint's scale."""
    root, name = external_folder(args)
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not mpkd.ignored(d.name))
    if not folders:
        raise mpkd.UserError(f"--external {root} holds no class folders (<folder>/<image>)")
    known = mpkd.EXTERNAL_SETS.get(name, {})
    as_named = {f: classes[i] for f in folders if (i := mpkd.find_class(f, classes)) is not None}
    if args.class_map:
        mapping, source = mpkd.read_class_map(args.class_map, folders, classes), str(args.class_map)
    elif known and len(as_named) < len(folders):  # a model of other classes than the set's own
        mapping, source = dict(known["class_map"]), f"{name}'s map to Kather 2016 (docs/crc-val-he-7k.csv)"
        lacking = sorted({c for c in mapping.values() if mpkd.find_class(c, classes) is None})
        if lacking:
            raise mpkd.UserError(f"the checkpoint's classes ({', '.join(classes)}) are neither {name}'s nor "
                                 f"Kather 2016's ({', '.join(lacking)} missing): pass --class-map FILE.csv")
        mapping = {f: classes[mpkd.find_class(c, classes)] for f, c in mapping.items()}
    else:
        others = [f for f in folders if f not in as_named]
        if others:
            raise mpkd.UserError(f"folders {', '.join(others)} of {root} are not classes of the checkpoint "
                                 f"({', '.join(classes)}): pass --class-map FILE.csv, rows of folder,class")
        mapping, source = as_named, "folder names"
    used = [f for f in folders if mapping.get(f)]
    if not used:
        raise mpkd.UserError(f"nothing in {root} is mapped to a class of the checkpoint: its folders are "
                             f"{', '.join(folders)}, the classes {', '.join(classes)}; map some in --class-map")
    files, folder_of = [], []
    for f in used:
        found = mpkd.list_images(root / f)
        if not found:
            raise mpkd.UserError(f"class folder {root / f} holds no images ({' '.join(mpkd.IMAGE_SUFFIXES)})")
        files += [f"{f}/{x}" for x in found]
        folder_of += [f] * len(found)
    mpp = args.image_mpp or known.get("mpp")
    return {"folder": str(root), "name": name, "files": files, "folders": folder_of,
            "labels": [classes.index(mapping[f]) for f in folder_of], "classes": classes,
            "class_map": {f: mapping.get(f) for f in folders}, "class_map_from": source,
            "skipped": [f for f in folders if not mapping.get(f)], "image_mpp": mpp,
            "mpp_from": "--image-mpp" if args.image_mpp else f"{name}'s scale" if mpp else None,
            "rule": scale_rule(args, mpp)}


DEFAULT_SCALE_RULE = "cover"  # measured on the real tiles against crop, whole and resize: docs/generalisation.md


def scale_rule(args, mpp: float | None) -> str:
    """The scale rule tiles are brought to the model with: --scale-rule, DEFAULT_SCALE_RULE where
    the tiles' scale is known and resize (the whole-tile squeeze of old) where it is not."""
    if mpp is None and args.scale_rule not in (None, "resize"):
        raise mpkd.UserError(f"--scale-rule {args.scale_rule} needs the tiles' scale: pass --image-mpp")
    return args.scale_rule or (DEFAULT_SCALE_RULE if mpp else "resize")


def rule_line(rule: str, views: int, tiles: int) -> str:
    """The scale rule that ran, in words."""
    seen = {"crop": "the centred training field of view", "cover": "the mean over the fewest training fields "
            "that cover it", "whole": "all of it at the training scale", "resize": "all of it squeezed into the "
            "training size"}[rule]
    return f"scale rule {rule}: the network saw of each tile {seen} ({views} views of {tiles} tiles)"


def decode_views(root, files: list[str], size: int, rule: str, mpp: float | None, tile_um: float | None):
    """Every file's views (mpkd.tile_views), grouped by shape: [(uint8 (m, 3, h, w), owner (m,))]
    where owner is the index of each view's file; and {file: reason} of files that do not decode."""
    def views(name):
        try:
            with Image.open(Path(root) / name) as img:
                return mpkd.tile_views(img, size, rule, mpp, tile_um)
        except mpkd.UNREADABLE as err:
            return str(err) or type(err).__name__

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL resizes without the GIL
        decoded = list(pool.map(views, files))
    groups, bad = {}, {}
    for i, (name, got) in enumerate(zip(files, decoded)):
        if isinstance(got, str):
            bad[name] = got
            continue
        for view in got:
            group = groups.setdefault(view.shape, ([], []))
            group[0].append(view)
            group[1].append(i)
    return [(torch.from_numpy(np.stack(v)), torch.tensor(o)) for v, o in groups.values()], bad


def view_logits(logits_of, groups, n: int, tta: bool = False) -> torch.Tensor:
    """Logits (n, C) of n tiles: the mean over each tile's views (and, with `tta`, their mirrors)."""
    sums, counts = None, torch.zeros(n)
    for views, owner in groups:
        logits = logits_of(views).float()
        if tta:  # the two views the teacher logits cover: the tile and its mirror
            logits = (logits + logits_of(views.flip(3)).float()) / 2
        sums = torch.zeros(n, logits.shape[1]) if sums is None else sums
        sums.index_add_(0, owner, logits)
        counts.index_add_(0, owner, torch.ones(len(owner)))
    return sums / counts[:, None]


def external_views(ext: dict, ckpt: dict, path, args, cache: dict):
    """The external tiles as the checkpoint's inputs, decoded once per image size, field of view
    and stain target; an unreadable tile stops the run before any scoring."""
    size, tile_um = ckpt["identity"]["img_size"], args.tile_um or ckpt.get("tile", {}).get("um")
    if ext["rule"] != "resize" and not tile_um:
        raise mpkd.UserError(f"{path} records no training tile size (made before --mpp): pass --tile-um, "
                             f"the training tiles' width in micrometres (Kather 2016: 74.25)")
    target = stain_target(args, ckpt.get("stain"), path)
    key = (size, tile_um if ext["rule"] != "resize" else None)
    if key not in cache:
        groups, bad = decode_views(ext["folder"], ext["files"], size, ext["rule"], ext["image_mpp"], tile_um)
        if bad:
            named = "; ".join(f"{f} ({why})" for f, why in list(bad.items())[:10])
            raise mpkd.UserError(f"{len(bad)} of {len(ext['files'])} tiles under {ext['folder']} do not "
                                 f"decode: {named}; remove or replace them")
        cache[key] = groups
    if target is None:
        return cache[key], {"tile_um": tile_um}
    stained = (key, json.dumps(target))
    if stained not in cache:
        cache[stained] = stain_normalised(cache[key], target, args.stain_norm)
    return cache[stained][0], {"tile_um": tile_um, **cache[stained][1]}


def evaluate_external(path, ext: dict, args, device, cache) -> dict:
    """One row of the table on the external tiles (their mapped classes as the truth), with the
    confusion of the set's folders (rows) against the checkpoint's classes."""
    ckpt = load_checkpoint(path)
    if ckpt["identity"]["classes"] != ext["classes"]:
        raise mpkd.UserError(f"{path} has other classes than {args.checkpoints[0]}: score checkpoints of "
                             f"one class list at a time")
    groups, how = external_views(ext, ckpt, path, args, cache)
    model = mpkd.to_device(mpkd.load_model(ckpt, path), device)
    precision = mpkd.pick_precision(device, args.amp)
    logits = view_logits(lambda x: mpkd.predict(model, x.to(device), precision).cpu(), groups, len(ext["files"]))
    settings = {k: ext[k] for k in ("folder", "name", "class_map", "class_map_from", "skipped", "image_mpp",
                                    "mpp_from", "rule")}
    settings.update(how, views=sum(len(o) for _, o in groups), stain_norm=args.stain_norm)
    labels = ext["labels"]
    row = score_row(path, ckpt, model, logits, labels, ext["files"], {"external": settings, **ckpt["identity"],
                    "folder": ext["folder"]}, [ext["folder"], mpkd.fingerprint(ext["files"], labels),
                                               ext["rule"], args.stain_norm, args.stain_ref])
    folders = sorted(set(ext["folders"]))
    confusion = np.zeros((len(folders), len(ext["classes"])), np.int64)
    np.add.at(confusion, ([folders.index(f) for f in ext["folders"]], row["predicted"]), 1)
    row.update(precision=precision, folders=ext["folders"],
               folder_confusion={"folders": folders, "counts": confusion.tolist()})
    return row


def score_external(args, device) -> list[dict]:
    """--external: every checkpoint's row on the external tiles, all read the same way."""
    ext, cache = external_set(args, load_checkpoint(args.checkpoints[0])["identity"]["classes"]), {}
    for folder in ext["skipped"]:
        print(f"note: {Path(ext['folder']) / folder} is not mapped to a class of the checkpoint: skipped")
    return [evaluate_external(path, ext, args, device, cache) for path in args.checkpoints]


def external_lines(rows) -> list[str]:
    """How the external tiles were read and mapped, and with one checkpoint its folders' confusion
    with the classes."""
    row = rows[0]
    ext, classes = row["data"]["external"], row["classes"]
    scale = (f"{ext['image_mpp']:g} um/px ({ext['mpp_from']})" if ext["image_mpp"] else
             "unknown (no --image-mpp): each tile resized whole, as the training tiles were")
    lines = ["", f"external tiles: {ext['folder']}" + (f" (the named set {ext['name']})" if ext["name"] else ""),
             f"  scale {scale}; {rule_line(ext['rule'], ext['views'], row['n_test'])}",
             f"  class map ({ext['class_map_from']}): " + ", ".join(f"{f} -> {c or 'skipped'}"
                                                                   for f, c in ext["class_map"].items())]
    if ext["stain_norm"]:
        lines.append(f"  stain normalised ({ext['stain_norm']}) to {ext['stain_target_from']}"
                     + (f"; {ext['stain_unchanged']} views with too little tissue left as they were"
                        if ext.get("stain_unchanged") else ""))
    if len(rows) > 1:
        return lines
    width = max(12, max(len(f) for f in row["folder_confusion"]["folders"]) + 2)
    lines += ["", "external folders (rows) against the checkpoint's classes (columns)",
              " " * width + "".join(f"{i:>6}" for i in range(len(classes)))]
    lines += [f"{f:<{width}}" + "".join(f"{n:>6}" for n in counts)
              for f, counts in zip(row["folder_confusion"]["folders"], row["folder_confusion"]["counts"])]
    return lines


# ----------------------------------------------------------------------------------------------
# Pictures (matplotlib, imported only for --plots)


def import_pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finish(plt, fig, path, dpi: int = 110) -> None:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _tag(i: int, path: str) -> str:
    """A short unique file-name part for the i-th checkpoint: 03_mpkd."""
    return f"{i + 1:02d}_{Path(path).stem}"


def plot_learning_curves(plt, rows, path) -> None:
    """Training loss, validation accuracy and the stored teacher epoch followed, per epoch: one
    colour per Table II row, thin lines per seed and a bold mean where a row has several."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    titles = ("training loss\n(with KD: (1-w) CE + w T² KL, not comparable with CE alone)",
              "validation accuracy (%)", "teacher epoch followed (KD target)")
    keys = ("loss", "val_acc", "teacher_epoch")
    groups = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r["history"])
    for method, histories in groups.items():
        colour = ROW_COLOURS.get(base_method(method), None)
        for ax, key in zip(axes, keys):
            curves = [[(h["epoch"], h[key]) for h in hist if key in h] for hist in histories]
            curves = [c for c in curves if c]
            if not curves:
                continue
            if key == "teacher_epoch":
                ax.yaxis.get_major_locator().set_params(integer=True)
            draw = ax.step if key == "teacher_epoch" else ax.plot
            kw = {"where": "mid"} if key == "teacher_epoch" else {}
            for c in curves:
                draw(*zip(*c), color=colour, lw=0.8 if len(curves) > 1 else 2, alpha=0.45 if len(curves) > 1
                     else 1, label=None if len(curves) > 1 else method, **kw)
            if len(curves) > 1:
                n = min(len(c) for c in curves)
                mean = np.mean([[v for _, v in c[:n]] for c in curves], axis=0)
                draw([e for e, _ in curves[0][:n]], mean, color=colour, lw=2.4,
                     label=f"{method} (mean of {len(curves)})", **kw)
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _finish(plt, fig, path)


def plot_confusion(plt, row, path) -> None:
    """Row-normalised confusion matrix as a heatmap, counts in the cells, class names on both axes."""
    classes, k = row["classes"], len(row["classes"])
    external = row.get("folder_confusion")  # external tiles: rows are the set's folders
    cm = np.asarray(external["counts"] if external else row["report"]["confusion"])
    names = external["folders"] if external else classes
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 + 0.75 * k), max(4.5, 1.2 + 0.7 * len(names))))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("folder of the external set" if external else "true")
    lo, hi = row["accuracy_ci95"]
    ax.set_title(f"{row['method']}, {row['checkpoint']}\naccuracy {row['accuracy']:.2f}% "
                 f"(95% CI {lo:.1f}-{hi:.1f})\ncounts; colour: share of the true class", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _finish(plt, fig, path)


def plot_errors(plt, row, root, path, most: int = 48) -> None:
    """The misclassified test tiles, most confident mistakes first, from the original image files."""
    wrong = [i for i, ok in enumerate(row["outcomes"]) if not ok]
    wrong.sort(key=lambda i: -row["probs"][i][row["predicted"][i]])
    wrong = wrong[:most]
    cols = 8
    nrows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.0 * cols, 2.35 * nrows + 0.5), squeeze=False)
    classes = row["classes"]
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        with Image.open(Path(root) / row["files"][i]) as img:
            img = img.convert("RGB")
            img.thumbnail((256, 256))
            ax.imshow(np.asarray(img))
        p = row["probs"][i][row["predicted"][i]]
        ax.set_title(f"true {classes[row['labels'][i]]}\npred {classes[row['predicted'][i]]} ({p:.2f})",
                     fontsize=7)
    shown = f"{len(wrong)} most confident of {row['n_test'] - row['correct']}" if wrong else "none"
    fig.suptitle(f"misclassified test tiles, {row['method']} {row['checkpoint']}: {shown}", fontsize=10)
    _finish(plt, fig, path, dpi=100)


def plot_table2(plt, rows, summary, path) -> None:
    """Test accuracy per Table II row: one dot per seed, the mean and its 95% interval (t-interval
    across seeds; the Wilson interval over the test tiles where a row has one run)."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(summary), 4.2))
    for x, s in enumerate(summary):
        accs = [r["accuracy"] for r in rows if (r["method"], r["network"]) == (s["method"], s["network"])]
        colour = ROW_COLOURS.get(base_method(s["method"]))
        jitter = np.linspace(-0.12, 0.12, len(accs)) if len(accs) > 1 else [0.0]
        ax.scatter(x + np.asarray(jitter), accs, color=colour, alpha=0.6, s=22, zorder=3)
        if s["n"] > 1:
            lo, hi = s["accuracy_ci95"]
        else:
            lo, hi = next(r for r in rows if (r["method"], r["network"]) == (s["method"], s["network"]))[
                "accuracy_ci95"]
        below, above = max(0.0, s["accuracy_mean"] - lo), max(0.0, hi - s["accuracy_mean"])  # 100%: rounding
        ax.errorbar(x + 0.28, s["accuracy_mean"], yerr=[[below], [above]],
                    fmt="D", color=colour, capsize=4, ms=6, zorder=4)
    ax.set_xticks(range(len(summary)), [f"{s['method']}\n{s['network']} (n={s['n']})" for s in summary],
                  fontsize=8)
    ax.set_xlim(-0.5, len(summary) - 0.3)
    ax.set_ylabel("test accuracy (%)")
    bar = ("95% t-interval of the mean across seeds" if all(s["n"] > 1 for s in summary) else
           f"95% Wilson interval over the {rows[0]['n_test']} test tiles" if all(s["n"] == 1 for s in summary)
           else "95% interval: t across seeds, Wilson over test tiles where n=1")
    ax.set_title(f"Table II: dots are seeds; diamond: mean with its {bar}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _finish(plt, fig, path)


def plot_route(plt, row, path) -> None:
    """The student's route: KL(teacher@e || student) on the validation images for every student
    epoch (rows) and stored teacher epoch (columns), the stored epoch it followed marked per row."""
    history = [h for h in row["history"] if h.get("route")]
    stored = [d["teacher_epoch"] for d in history[0]["route"]]
    kl = np.array([[d["kl"] for d in h["route"]] for h in history])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.6 * len(stored)), max(3.5, 1.2 + 0.28 * len(history))))
    im = ax.imshow(kl, cmap="viridis_r", aspect="auto")
    followed = [(i, stored.index(h["teacher_epoch"])) for i, h in enumerate(history) if "teacher_epoch" in h]
    if followed:
        ax.scatter([c for _, c in followed], [r for r, _ in followed], marker="s", s=60, facecolors="none",
                   edgecolors="red", linewidths=1.5, label="followed (KD target)")
    nearest = kl.argmin(1)  # black-rimmed white dots: visible on the bright and the dark end of the map
    ax.scatter(nearest, range(len(history)), marker="o", s=22, facecolors="white", edgecolors="black",
               linewidths=0.8, label="nearest")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=7)  # below: no cell hidden
    ax.set_xticks(range(len(stored)), [str(e) for e in stored], fontsize=8)
    ax.set_yticks(range(len(history)), [str(h["epoch"]) for h in history], fontsize=7)
    ax.set_xlabel("stored teacher epoch")
    ax.set_ylabel("student epoch")
    ax.set_title(f"route of {row['method']}, {row['checkpoint']}\nKL(teacher || student) on validation "
                 f"images", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    _finish(plt, fig, path)


def write_plots(plt, rows, summary, folder) -> list[Path]:
    """Every picture for these checkpoints, into `folder`; returns the files written."""
    folder = Path(folder)
    written = [folder / "learning_curves.png", folder / "table2.png"]
    plot_learning_curves(plt, rows, written[0])
    plot_table2(plt, rows, summary, written[1])
    for i, r in enumerate(rows):
        written += [folder / f"confusion_{_tag(i, r['checkpoint'])}.png",
                    folder / f"errors_{_tag(i, r['checkpoint'])}.png"]
        plot_confusion(plt, r, written[-2])
        plot_errors(plt, r, r["data"]["folder"], written[-1])
        if any(h.get("route") for h in r["history"]):
            written.append(folder / f"route_{_tag(i, r['checkpoint'])}.png")
            plot_route(plt, r, written[-1])
    return written


# ----------------------------------------------------------------------------------------------
# Predictions on new tiles (--images): no labels, the checkpoint's own preprocessing


def load_predictor(path, args, device) -> dict:
    """What --images and --map classify with, from a checkpoint or an ONNX file written by --export
    (so that a lab checks the deployed file with the same command): classes, image size, the
    training tiles' field of view in micrometres (None where not recorded), identity, and
    `logits`, a function of uint8 (N, 3, S, S) CPU images returning (N, C) CPU logits."""
    if str(path).endswith(".onnx"):
        session, meta = open_onnx(path)
        return {"classes": json.loads(meta["classes"]), "size": int(meta["img_size"]),
                "tile_um": float(meta["tile_um"]) if meta.get("tile_um") else None,
                "stain": json.loads(meta.get("stain") or "null"),
                "identity": json.loads(meta["identity"]), "logits": lambda x: onnx_logits(session, x)}
    ckpt = load_checkpoint(path)
    model = mpkd.to_device(mpkd.load_model(ckpt, path), device)
    precision = mpkd.pick_precision(device, args.amp)
    return {"classes": ckpt["identity"]["classes"], "size": ckpt["identity"]["img_size"],
            "tile_um": ckpt.get("tile", {}).get("um"), "identity": ckpt["identity"], "stain": ckpt.get("stain"),
            "logits": lambda x: mpkd.predict(model, x.to(device), precision).cpu()}


def predict_folder(args, device) -> dict:
    """Predict every image under args.images, in chunks (memory stays flat for any folder size),
    each brought to the model's scale by the scale rule (and restained with --stain-norm, the stain
    estimated over the whole folder first); an unreadable file is listed with its reason and the
    rest are predicted."""
    if len(args.checkpoints) != 1:
        raise mpkd.UserError(f"--images predicts with one checkpoint, {len(args.checkpoints)} given")
    folder = Path(args.images)
    if not folder.is_dir():
        raise mpkd.UserError(f"--images {folder} is not a folder")
    files = mpkd.list_images(folder)
    if not files:
        raise mpkd.UserError(f"--images {folder} holds no images ({' '.join(mpkd.IMAGE_SUFFIXES)}; "
                             f"hidden files are ignored)")
    predictor = load_predictor(args.checkpoints[0], args, device)
    classes, size, rule = predictor["classes"], predictor["size"], scale_rule(args, args.image_mpp)
    tile_um = args.tile_um or predictor["tile_um"]
    if rule != "resize" and not tile_um:
        raise mpkd.UserError(f"{args.checkpoints[0]} records no training tile size: pass --tile-um")
    if rule == "whole" and str(args.checkpoints[0]).endswith(".onnx"):
        raise mpkd.UserError(f"--scale-rule whole makes inputs of another size than the {size} px "
                             f"{args.checkpoints[0]} takes: use crop or cover, or the checkpoint")
    read = lambda chunk: decode_views(folder, chunk, size, rule, args.image_mpp, tile_um)
    chunks = [files[i:i + IMAGES_CHUNK] for i in range(0, len(files), IMAGES_CHUNK)]
    target = stain_target(args, predictor["stain"], args.checkpoints[0])
    source = None
    if args.stain_norm == "macenko":  # one estimate for the folder, from a sample of its tiles first
        sample = files[::-(-len(files) // mpkd.STAIN_TILES)]  # the tiles whose estimates give the median
        source = folder_stain([views for views, _ in read(sample)[0]])
    results, bad, views, unchanged = [], {}, 0, 0
    for i, chunk in enumerate(chunks):
        groups, errors = read(chunk)
        bad.update(errors)
        if target is not None:
            groups, how = stain_normalised(groups, target, args.stain_norm, source)
            unchanged += how["stain_unchanged"]
        views += sum(len(o) for _, o in groups)
        if groups:
            probs = torch.softmax(view_logits(predictor["logits"], groups, len(chunk), args.tta), 1)
            results += [(f, probs[j]) for j, f in enumerate(chunk) if f not in errors]
        if len(files) > IMAGES_CHUNK:
            print(f"  {min((i + 1) * IMAGES_CHUNK, len(files))} / {len(files)} images", flush=True)
    return {"checkpoint": str(args.checkpoints[0]), "classes": classes, "results": results, "bad": bad,
            "files": files, "scale": rule_line(rule, views, len(results)), "stain": target and
            f"stain normalised ({args.stain_norm}) to {target['from']}"
            + (f"; {unchanged} views with too little tissue left as they were" if unchanged else "")}


def images_report(pred, out) -> list[str]:
    """Write the predictions CSV (unreadable files as rows with an error) and the lines to print."""
    classes = pred["classes"]
    by_file = dict(pred["results"])
    rows = []
    for f in pred["files"]:
        if f in by_file:
            p = by_file[f].tolist()
            best = int(np.argmax(p))
            rows.append([f, classes[best], p[best], *p, ""])
        else:
            rows.append([f, "", "", *[""] * len(classes), pred["bad"][f]])
    write_csv(["file", "predicted", "probability", *(f"p_{c}" for c in classes), "error"], rows, out)
    counts = {c: 0 for c in classes}
    for r in rows:
        if r[1]:
            counts[r[1]] += 1
    lines = [f"{len(pred['results'])} of {len(pred['files'])} images predicted with {pred['checkpoint']}; "
             f"wrote {out}", pred["scale"], *([pred["stain"]] if pred["stain"] else []), "",
             f"{'predicted class':<24}{'images':>8}"]
    lines += [f"{c:<24}{n:>8}" for c, n in counts.items()]
    if pred["bad"]:
        lines += ["", f"{len(pred['bad'])} unreadable (listed in {out} with the reason): "
                      + "; ".join(f"{f} ({why})" for f, why in list(pred["bad"].items())[:10])
                      + (" ..." if len(pred["bad"]) > 10 else "")]
    return lines


# ----------------------------------------------------------------------------------------------
# Tissue maps (--map): a large image or a whole slide, window by window (openslide imported only
# for slide formats); the pure arithmetic lives in mpkd's tissue-map section

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
MAP_BATCH = 256  # windows read and classified at a time (an image's first: a quarter); reading runs one batch ahead
SLIDE_CACHE = 256 * 2 ** 20  # bytes of decoded slide tiles OpenSlide keeps (its default is 32 MiB)
OVERLAY_WIDTH = 1600  # width of NAME_overlay.png (thumbnail and map side by side)


def import_openslide():
    """openslide, or a one-line error saying how to get it."""
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the Python package without its library
        raise mpkd.UserError("whole-slide images need the optional packages: "
                             "pip install openslide-python openslide-bin") from None
    return openslide


class PlainImage:
    """A large image PIL can hold whole (TIFF, PNG, JPEG; Kather 2016's 5000 x 5000 px images are 75
    MB as RGB): one level, microns per pixel from TIFF resolution tags in cm or inch (PNG and JPEG
    carry none that can be trusted: their dpi are screen values)."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:  # our file, so that closing it keeps the decoded image
                img = Image.open(f)
                img.load()  # decoded once, before the reading threads start
        except Image.DecompressionBombError:  # PIL's limit: 179 million pixels, 0.5 GB as RGB
            raise mpkd.UserError(f"{path.name} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
                                 f"in one piece, too many to hold whole: save it as a tiled, pyramidal TIFF (e.g. "
                                 f"vips tiffsave --tile --pyramid) and map that through OpenSlide (pip install "
                                 f"openslide-python openslide-bin), region by region") from None
        self.image = img if img.mode == "RGB" else img.convert("RGB")
        tags = getattr(img, "tag_v2", {})
        unit, resolution = tags.get(296), tags.get(282)  # ResolutionUnit, XResolution (pixels per unit)
        per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # micrometres per inch, per centimetre
        self.mpp = per_unit / float(resolution) if per_unit and resolution and float(resolution) > 0 else None
        self.dimensions, self.downsamples = [self.image.size], [1.0]

    def read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        return self.image.crop((x, y, x + width, y + height))

    def thumbnail(self, side: int) -> Image.Image:
        """At least `side` px long: box averages over a whole number of pixels (1.8x faster than a resize)."""
        return self.image.reduce(max(1, max(self.image.size) // side))


class Slide:
    """A whole-slide image through OpenSlide (SVS, NDPI, MRXS, pyramidal generic TIFF, ...): its
    pyramid levels and microns per pixel from its metadata; OpenSlide reads regions thread-safely."""

    def __init__(self, path: Path, openslide):
        self.slide = openslide.OpenSlide(str(path))
        if hasattr(openslide, "OpenSlideCache"):  # OpenSlide 4: room for a few rows of decoded tiles,
            self.slide.set_cache(openslide.OpenSlideCache(SLIDE_CACHE))  # so each is decoded once
        mpp = self.slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.mpp = float(mpp) if mpp else None
        self.dimensions, self.downsamples = self.slide.level_dimensions, self.slide.level_downsamples

    def read(self, x: int, y: int, level: int, width: int, height: int) -> Image.Image:
        region = self.slide.read_region((x, y), level, (width, height))  # (x, y) in level-0 pixels, RGBA
        if region.getchannel("A").getextrema()[0] == 255:  # all scanned, the usual case
            return region.convert("RGB")
        white = Image.new("RGB", region.size, (255, 255, 255))
        white.paste(region, mask=region.getchannel("A"))  # outside the scanned area: glass, not black
        return white

    def thumbnail(self, side: int) -> Image.Image:
        return self.slide.get_thumbnail((side, side)).convert("RGB")


def tiled_tiff(path: Path) -> bool:
    """Whether a TIFF's first image is stored in tiles, as every slide format in a TIFF is (OpenSlide
    refuses one in strips), from its header alone; True where PIL cannot parse it, for OpenSlide to try."""
    try:
        with Image.open(path) as img:
            return 322 in getattr(img, "tag_v2", {})  # TileWidth
    except mpkd.UNREADABLE:
        return True


def open_map_image(path: Path):
    """A Slide for slide formats and for TIFFs OpenSlide recognises (tiled, pyramidal), else a
    PlainImage (a TIFF in strips is one without importing OpenSlide: 0.04 s of each run)."""
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return Slide(path, import_openslide())
    if suffix in (".tif", ".tiff") and tiled_tiff(path):
        try:
            openslide = import_openslide()
        except mpkd.UserError:
            openslide = None  # a plain TIFF needs no OpenSlide
        if openslide is not None and openslide.OpenSlide.detect_format(str(path)):
            return Slide(path, openslide)
    return PlainImage(path)


def map_inputs(target: Path) -> list[Path]:
    """The images --map works on: the file, or every image in the folder (any nesting), sorted."""
    suffixes = mpkd.IMAGE_SUFFIXES + SLIDE_SUFFIXES
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise mpkd.UserError(f"--map {target} does not exist")
    found = sorted(p for p in target.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                   and not mpkd.ignored(p.relative_to(target)))
    if not found:
        raise mpkd.UserError(f"--map {target} holds no images ({' '.join(suffixes)})")
    return found


def window_runs(origins: np.ndarray, stride: int, longest: int = 16) -> list[np.ndarray]:
    """Split window origins (row by row) into runs of neighbours on one row, at most `longest` long:
    each run is read as one region, so a slide's tiles are decoded once per run, not per window."""
    breaks = np.flatnonzero((np.diff(origins[:, 1]) != 0) | (np.diff(origins[:, 0]) != stride)) + 1
    runs = np.split(np.arange(len(origins)), breaks) if len(origins) else []
    return [run[i:i + longest] for run in runs for i in range(0, len(run), longest)]


def window_batches(reader, origins: np.ndarray, plan: dict, size: int, pool):
    """uint8 (n, 3, S, S) batches of the windows at `origins`, read at the plan's level and resized
    as in training; the next batch is read by `pool`'s threads while the caller classifies this one."""
    level, read_px, stride = plan["level"], plan["read_px"], plan["stride"]
    down = reader.downsamples[level]

    def read(run):  # one region for a run of neighbouring windows, cut into the windows
        (x, y), offsets, span = mpkd.run_region(run, down, read_px)
        region = reader.read(x, y, level, span, read_px)
        return [mpkd.model_input(region.crop((o, 0, o + read_px, read_px)), size) for o in offsets]

    n = len(origins)  # a small first batch: classifying starts a few windows after opening, not MAP_BATCH
    edges = sorted({0, n, *range(min(MAP_BATCH // 4, n), n, MAP_BATCH)})
    spans = list(zip(edges, edges[1:]))
    def submit(span):
        batch = origins[span[0]:span[1]]
        return pool.map(read, [batch[run] for run in window_runs(batch, stride)])

    pending = [submit(s) for s in spans[:2]]
    for i in range(len(spans)):
        batch = torch.from_numpy(np.stack([w for run in pending[i] for w in run]))
        if i + 2 < len(spans):
            pending.append(submit(spans[i + 2]))
        pending[i] = None  # its windows are in `batch` now
        yield batch


def plan_map(path: Path, predictor: dict, args) -> dict:
    """Everything before the windows of one image: open it, its scale, the level, window and stride,
    the thumbnail, the tissue mask and the windows to classify (`todo`, level-0 origins)."""
    start = time.perf_counter()  # an image's seconds: opening, thumbnail and mask count too
    reader = open_map_image(path)
    mpp = args.image_mpp or reader.mpp
    if not mpp:
        raise mpkd.UserError(f"{path.name} records no microns per pixel: pass --image-mpp (e.g. 0.25 "
                             f"for a 40x scan, 0.5 for 20x)")
    tile_um = args.tile_um or predictor["tile_um"]
    window, stride = round(tile_um / mpp), round((args.stride or tile_um) / mpp)
    if stride < 1 or stride > window:
        raise mpkd.UserError(f"--stride {args.stride} must be between {mpp:.3g} um and the window, "
                             f"{tile_um:.4g} um")
    level = mpkd.pick_level(list(reader.downsamples), mpp, tile_um / predictor["size"])
    width, height = reader.dimensions[0]
    origins = mpkd.window_origins(width, height, window, stride)
    thumb = reader.thumbnail(mpkd.thumbnail_side(width, height, window))
    coarse = thumb.reduce(max(1, int(thumb.width / width * window / mpkd.MASK_PX)))  # the overlay needs more
    mask, threshold = mpkd.tissue_mask(np.asarray(coarse))
    share = mpkd.tissue_share(mask, coarse.width / width, origins, window)
    stain = None  # --stain-norm macenko: the image's stain, estimated once from its tissue
    if predictor["stain_target"] is not None and args.stain_norm == "macenko":
        try:
            stain = mpkd.macenko_fit(torch.from_numpy(np.asarray(coarse)[mask]))
        except ValueError as err:
            raise mpkd.UserError(f"{path.name} holds too little stained tissue to estimate its stain ({err})") from None
    return {"reader": reader, "thumbnail": np.asarray(thumb), "mpp": mpp, "mpp_from": "--image-mpp" if args.image_mpp
            else "metadata", "level": level, "level_mpp": mpp * reader.downsamples[level], "window": window,
            "stride": stride, "read_px": max(1, round(window / reader.downsamples[level])), "tile_um": tile_um,
            "todo": origins if args.no_mask else origins[share >= mpkd.MIN_TISSUE], "n_windows": len(origins),
            "n_tissue": int((share >= mpkd.MIN_TISSUE).sum()), "threshold": threshold, "size": (width, height),
            "stain": stain, "tint": tuple(int(v) for v in np.median(np.asarray(coarse)[mask], 0)) if mask.any()
            else (255, 255, 255),  # the typical tissue colour, under the overlay's legend swatches
            "setup_seconds": time.perf_counter() - start}


def classify_windows(path: Path, plan: dict, predictor: dict, say) -> dict:
    """Read and classify the plan's windows: the plan with, per classified window, its level-0
    origin and class probabilities, and the image's seconds (setup and windows, not the time it
    waited for the image before it); the image is let go."""
    todo, reader = plan.pop("todo"), plan.pop("reader")
    probs, start = [], time.perf_counter()
    last = start
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for batch in window_batches(reader, todo, plan, predictor["size"], pool):
            if predictor["stain_target"] is not None:  # from the image's stain, or each window's own
                batch = mpkd.normalise_stain(batch, plan["stain"], predictor["stain_target"])[0]
            probs.append(torch.softmax(predictor["logits"](batch).float(), 1).numpy())
            done, now = sum(len(p) for p in probs), time.perf_counter()
            if now - last > 5 and done < len(todo):
                rate = done / (now - start)
                say(f"  {path.name}: {done} / {len(todo)} windows, {rate:.0f} windows/s, "
                    f"ETA {(len(todo) - done) / rate:.0f} s")
                last = now
    return {**plan, "origins": todo, "seconds": plan["setup_seconds"] + time.perf_counter() - start,
            "probs": np.concatenate(probs) if probs else np.zeros((0, len(predictor["classes"])), np.float32)}


def cell_map(plan: dict, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean class probabilities per cell (R, K, C) and the class of each cell (R, K), -1 where no
    window was classified."""
    rows, cols = mpkd.cell_grid(*plan["size"], plan["stride"])
    sums, counts = np.zeros((rows, cols, len(classes)), np.float32), np.zeros((rows, cols), np.int32)
    cells = mpkd.window_cells(plan["origins"], plan["window"], plan["stride"])
    mpkd.accumulate(sums, counts, cells, plan["probs"])
    mean = sums / np.maximum(counts, 1)[..., None]
    return mean, np.where(counts > 0, mean.argmax(-1), -1)


LEGEND_WIDTH = 260  # pixels of the legend beside a map or an overlay
OVERLAY_ALPHA = 150  # opacity (of 255) of the class colours laid over the tissue


def legend(draw, x: int, y: int, classes: list[str], shares: dict[str, float], tint=None) -> None:
    """Class swatches and names with their share of the classified area, from (x, y); with `tint`
    (the tissue colour under the overlay) each swatch has two halves: the class colour (the map's,
    QuPath's) and that colour as the overlay shows it on tissue."""
    palette = mpkd.class_palette(classes)
    for i, (name, colour) in enumerate([*zip(classes, palette), ("not classified", mpkd.UNCLASSIFIED)]):
        top = y + 22 * i
        share = f"  {shares[name]:.0%}" if name in shares else ""
        draw.rectangle((x, top, x + 18, top + 16), fill=colour, outline="black")
        if tint is not None and name in shares:
            a = OVERLAY_ALPHA / 255
            draw.rectangle((x + 19, top, x + 36, top + 16), outline="black",
                           fill=tuple(round(a * c + (1 - a) * t) for c, t in zip(colour, tint)))
        draw.text((x + 44, top + 2), name + share, fill="black")


def titled(picture: Image.Image, title: list[str], classes: list[str], shares: dict[str, float], tint=None):
    """`picture` under its title lines, with the legend on its right."""
    head = 8 + 16 * len(title)
    height = max(picture.height, 22 * (len(classes) + 1)) + head + 6
    out = Image.new("RGB", (picture.width + LEGEND_WIDTH, height), "white")
    out.paste(picture, (0, head))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(title):
        draw.text((4, 4 + 16 * i), line, fill="black")
    legend(draw, picture.width + 12, head, classes, shares, tint)
    return out


def map_picture(cells: np.ndarray, classes: list[str], title: list[str], shares: dict[str, float]) -> Image.Image:
    """The map at cell resolution, enlarged to a readable size, titled, with a legend of class colours."""
    rows, cols = cells.shape
    palette = np.array(mpkd.class_palette(classes) + [mpkd.UNCLASSIFIED], np.uint8)
    grid = Image.fromarray(palette[cells])  # -1: the last colour, not classified
    k = max(1, min(24, 1000 // max(rows, cols)))
    return titled(grid.resize((cols * k, rows * k), Image.NEAREST), title, classes, shares)


def overlay_picture(plan: dict, cells: np.ndarray, classes: list[str], title: list[str],
                    shares: dict[str, float]) -> Image.Image:
    """The thumbnail beside the thumbnail with the map laid over it (classified cells only), at most
    OVERLAY_WIDTH wide and high, titled, with a legend whose swatches show each class colour as the
    overlay tints the image's typical tissue: a picture a pathologist reads without another file."""
    thumb = Image.fromarray(plan["thumbnail"])
    fit = min(1.0, (OVERLAY_WIDTH - 10) / 2 / thumb.width, OVERLAY_WIDTH / thumb.height)
    thumb = thumb.resize((max(1, round(thumb.width * fit)), max(1, round(thumb.height * fit))), Image.BILINEAR)
    scale = thumb.width / plan["size"][0]
    rows, cols = cells.shape
    palette = np.array([c + (OVERLAY_ALPHA,) for c in mpkd.class_palette(classes)] + [(0, 0, 0, 0)], np.uint8)
    side = plan["stride"] * scale  # a cell on the thumbnail
    layer = Image.fromarray(palette[cells]).resize((max(1, round(cols * side)), max(1, round(rows * side))),
                                                   Image.NEAREST)
    over = thumb.convert("RGBA")
    over.alpha_composite(layer.crop((0, 0, thumb.width, thumb.height)))
    out = Image.new("RGB", (thumb.width * 2 + 10, thumb.height), "white")
    out.paste(thumb, (0, 0))
    out.paste(over.convert("RGB"), (thumb.width + 10, 0))
    return titled(out, title, classes, shares, plan["tint"])


def windows_line(windows: dict) -> str:
    """How many windows were classified, in the words of the console, the map's title and the summary."""
    return f"{windows['classified']} of {windows['total']} windows classified ({windows['tissue']} on tissue)"


def write_map(path: Path, plan: dict, predictor: dict, model_path: str, out_dir: Path) -> dict:
    """The five outputs of one image; the summary last, so that a complete summary means done."""
    classes, name, w, start = predictor["classes"], path.stem, plan["window"], time.perf_counter()
    mean, cells = cell_map(plan, classes)
    classified, window_class = cells >= 0, plan["probs"].argmax(1)
    summary = {
        "image": str(path), "size_px": list(plan["size"]), "mpp": plan["mpp"], "mpp_from": plan["mpp_from"],
        "level": plan["level"], "level_mpp": plan["level_mpp"],
        "window": {"um": plan["tile_um"], "level0_px": w, "read_px": plan["read_px"]},
        "stride": {"um": plan["stride"] * plan["mpp"], "level0_px": plan["stride"]},
        "windows": {"total": plan["n_windows"], "tissue": plan["n_tissue"], "classified": len(window_class)},
        "tissue_threshold": plan["threshold"],
        "cells": {"rows": cells.shape[0], "columns": cells.shape[1], "classified": int(classified.sum())},
        # by area: each classified cell (stride x stride) its averaged class; by windows: each window its own
        "class_fractions_by_area": {c: float((cells == i).sum() / max(classified.sum(), 1)) for i, c in enumerate(classes)},
        "class_fractions_by_windows": {c: float((window_class == i).sum() / max(len(window_class), 1))
                                       for i, c in enumerate(classes)},
        "settings": predictor["settings"], "overlay_tint": list(plan["tint"]),  # the tissue under the legend's tints
        "model": {"path": str(model_path), "identity": predictor["identity"], "sha256": predictor["sha256"]},
        "stain_norm": predictor["stain_target"] and {"mode": predictor["stain_norm"], "target": predictor["stain_target"],
                                                     "source": plan["stain"]},  # source None: per window
        "seconds": plan["seconds"], "windows_per_s": len(window_class) / max(plan["seconds"], 1e-9),
        "setup_seconds": plan["setup_seconds"]}
    title = [f"{path.name}, mapped by {Path(model_path).name} ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''})",
             f"{plan['mpp']:.3g} um/px ({plan['mpp_from']}); windows of {plan['tile_um']:.4g} um every "
             f"{summary['stride']['um']:.4g} um: {windows_line(summary['windows'])}; shares of the classified area"]
    shares = summary["class_fractions_by_area"]
    for picture, suffix, level in ((map_picture(cells, classes, title, shares), "map", 6),
                                   (overlay_picture(plan, cells, classes, title, shares), "overlay", 1)):
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", compress_level=level)  # the photographic overlay: 1, 7x faster than 6, +17%
        mpkd.write_bytes_atomic(buffer.getvalue(), out_dir / f"{name}_{suffix}.png")
    write_csv(["x", "y", "size", "class", "probability", *(f"p_{c}" for c in classes)],  # every window
              [[int(x), int(y), w, classes[int(p.argmax())], float(p.max()), *map(float, p)]
               for (x, y), p in zip(plan["origins"], plan["probs"])], out_dir / f"{name}_tiles.csv")
    colours, s = mpkd.class_palette(classes), plan["stride"]
    features = [{"type": "Feature",  # QuPath: File > Import objects; level-0 pixels, what the map shows:
                 "geometry": {"type": "Polygon",  # one square per classified cell (= window without --stride)
                              "coordinates": [[[c * s, r * s], [c * s + s, r * s], [c * s + s, r * s + s],
                                               [c * s, r * s + s], [c * s, r * s]]]},
                 "properties": {"objectType": "tile", "measurements": {"probability": float(mean[r, c, k])},
                                "classification": {"name": classes[k], "color": list(colours[k])}}}
                for r, c in zip(*map(np.ndarray.tolist, np.nonzero(classified))) for k in [int(cells[r, c])]]
    mpkd.write_text_atomic(json.dumps({"type": "FeatureCollection", "features": features}),
                           out_dir / f"{name}.geojson")
    summary.update(output_seconds=time.perf_counter() - start, complete=True)
    mpkd.write_text_atomic(json.dumps(summary, indent=1), out_dir / f"{name}_summary.json")
    return summary


def map_settings(args, predictor: dict) -> dict:
    """What a map depends on besides the image and the model: window and stride in micrometres,
    the tissue mask, the scale given, the stain normalisation."""
    tile_um = args.tile_um or predictor["tile_um"]
    return {"window_um": tile_um, "stride_um": args.stride or tile_um, "mask": not args.no_mask,
            "stain_norm": args.stain_norm, "stain_ref": args.stain_ref}


def done_by_another(summary: dict, predictor: dict, image_mpp: float | None) -> str | None:
    """What differs between a done image's summary and this run: another model (by its file's
    fingerprint, or its identity in summaries written before fingerprints), other settings, or
    another scale (--image-mpp against what the image was mapped at)."""
    model = summary.get("model", {})
    if model.get("sha256", predictor["sha256"]) != predictor["sha256"] or model.get("identity") != predictor["identity"]:
        return f"model ({model.get('path')}, not {predictor['path']})"
    differ = [f"{k} {v}, not {predictor['settings'][k]}" for k, v in summary.get("settings", predictor["settings"]).items()
              if predictor["settings"].get(k) != v]
    if image_mpp is not None and not math.isclose(summary["mpp"], image_mpp):
        differ.append(f"scale {summary['mpp']:g} um/px, not --image-mpp {image_mpp:g}")
    elif image_mpp is None and summary.get("mpp_from") == "--image-mpp":
        differ.append(f"scale --image-mpp {summary['mpp']:g}, not the image's own")
    return f"setting ({'; '.join(differ)})" if differ else None


def map_images(args, device) -> list[str]:
    """--map, leaving no output folder behind where it wrote nothing (a wrong model, no scale)."""
    out_dir = Path(args.out_dir)
    made = not out_dir.exists()
    try:
        return map_folder(args, device, out_dir)
    finally:
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def map_folder(args, device, out_dir: Path) -> list[str]:
    """Every image of the --map file or folder (of this --shard), each into its five outputs; an
    image whose complete summary exists is skipped, an unreadable one is named and the rest go on."""
    if len(args.checkpoints) != 1:
        raise mpkd.UserError(f"--map classifies with one model, {len(args.checkpoints)} given")
    everything = map_inputs(Path(args.map))
    images = mpkd.shard(everything, args.shard) if args.shard else everything
    if not images:  # more shards than images: this job of the array has nothing to do
        print(f"shard {args.shard} holds no images: {args.map} has {len(everything)}, fewer than the shards")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    mpkd.check_writable(out_dir / "x_summary.json")
    predictor = load_predictor(args.checkpoints[0], args, device)
    predictor.update(stain_target=stain_target(args, predictor["stain"], args.checkpoints[0]), stain_norm=args.stain_norm)
    if not (args.tile_um or predictor["tile_um"]):
        raise mpkd.UserError(f"{args.checkpoints[0]} records no training tile size (made before --mpp): "
                             f"pass --tile-um, the tiles' width in micrometres (Kather 2016: 150 px x 0.495 = 74.25)")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # large is what a map is for
    predictor.update(path=str(args.checkpoints[0]), sha256=mpkd.file_fingerprint(args.checkpoints[0]),
                     settings=map_settings(args, predictor))
    lines, failed, todo, mapped = [], {}, [], []  # mapped: windows classified per image whose outputs are written

    def fail(path, err):  # unreadable, truncated, no scale, a format OpenSlide refuses: named, the rest go on
        failed[path.name] = str(err) if isinstance(err, mpkd.UserError) else f"{type(err).__name__}: {err}"
        print(f"{path.name}: failed (why: in the error at the end)", flush=True)

    for path in images:
        done = out_dir / f"{path.stem}_summary.json"
        summary = json.loads(done.read_text()) if done.exists() and not args.overwrite else {}
        differ = done_by_another(summary, predictor, args.image_mpp) if summary.get("complete") else None
        if differ:  # never two models' (or settings') maps in one folder without being asked
            fail(path, mpkd.UserError(f"{done} was made by another {differ}: --overwrite replaces it, "
                                      f"--out-dir DIR keeps both"))
        elif summary.get("complete"):
            lines.append(f"{path.name}: done before ({done}) by this model and settings; --overwrite redoes it")
            print(lines[-1], flush=True)
        else:
            todo.append(path)

    def finish(path, writing):
        try:
            summary = writing.result()
        except Exception as err:
            return fail(path, err)
        mapped.append(summary["windows"]["classified"])
        top = sorted(summary["class_fractions_by_area"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"{path.name}: {windows_line(summary['windows'])} in {summary['seconds']:.1f} s "
                     f"({summary['windows_per_s']:.0f}/s); by area " + ", ".join(f"{c} {f:.0%}" for c, f in top))
        print(lines[-1], flush=True)

    # While one image's windows are classified, the next image is opened and masked and the last
    # one's outputs are written, beside it: a folder's images follow each other without a gap
    start, writing = time.perf_counter(), None
    with ThreadPoolExecutor(max_workers=2) as side:
        planned = side.submit(plan_map, todo[0], predictor, args) if todo else None
        for i, path in enumerate(todo):
            plan, planned = planned, side.submit(plan_map, todo[i + 1], predictor, args) if i + 1 < len(todo) else None
            try:
                plan = classify_windows(path, plan.result(), predictor, print)
            except Exception as err:
                fail(path, err)
                continue
            if writing:
                finish(*writing)
            writing = path, side.submit(write_map, path, plan, predictor, args.checkpoints[0], out_dir)
        if writing:
            finish(*writing)
    if len(todo) > 1:
        seconds = time.perf_counter() - start
        lines.append(f"{len(mapped)} of {len(todo)} images mapped in {seconds:.1f} s, outputs included: "
                     f"{sum(mapped)} windows, {sum(mapped) / seconds:.0f} windows/s")
        print(lines[-1], flush=True)
    if failed:
        raise mpkd.UserError(f"{len(failed)} of {len(images)} images failed: "
                             + "; ".join(f"{n} ({why})" for n, why in list(failed.items())[:5]))
    return lines


# ----------------------------------------------------------------------------------------------
# Deployment: one ONNX file (onnx, onnxscript and onnxruntime imported only for it)

ONNX_FORMAT = "mpkd-onnx/1"
# Largest |logit difference| allowed between ONNX Runtime and PyTorch, as a share of the largest
# |logit| (at least 1): float32 rounding grows with the logits, which reach hundreds in students
# trained briefly from scratch (a five-minute student: logits to 334, rounding 0.0017, probabilities
# then 2.3e-4 apart where two classes are close), so an absolute probability bound refused them
ONNX_TOLERANCE = 1e-4
# Images per ONNX Runtime call in --images and --map: as fast as 64 once warm, and a process's
# first calls cost less (2-core EPYC, the student: its first 256 windows 446 ms against 484 at 64)
ONNX_CHUNK = 32


def import_onnx():
    """onnx and onnxruntime, or a one-line error saying how to get them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise mpkd.UserError("ONNX export and .onnx models need the optional packages: "
                             "pip install onnx onnxscript onnxruntime") from None
    return onnx, onnxruntime


class Deployable(torch.nn.Module):
    """The network as a tool calls it: uint8 RGB tiles (N, S, S, 3), the layout image libraries hold
    them in, to class probabilities (N, C) and logits (N, C); the ImageNet normalisation and the
    softmax are inside, so no caller can get the preprocessing wrong."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", 255 * torch.tensor(mpkd.IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", 255 * torch.tensor(mpkd.IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, tiles: torch.Tensor):
        x = (tiles.permute(0, 3, 1, 2).float() - self.mean) / self.std  # (N, 3, S, S), as in training
        logits = self.model(x)
        return torch.softmax(logits, dim=1), logits


def _one_conv(parts: list) -> torch.nn.Conv2d | None:
    """One Conv2d computing what a MixedConv2d's parts compute on their channel splits, or None
    where no single convolution does: depthwise parts of mixed kernel sizes become one depthwise conv
    with the smaller kernels zero-padded (centred) to the largest; equal 1x1 parts become one grouped
    conv. Same products and sums, so the outputs agree to float rounding."""
    first = parts[0]
    alike = all(type(c) is torch.nn.Conv2d and c.padding_mode == "zeros" and c.bias is None
                       and c.kernel_size[0] == c.kernel_size[1] and c.kernel_size[0] % 2 == 1
                       and c.stride == first.stride and c.dilation == first.dilation
                       and c.padding == (c.dilation[0] * (c.kernel_size[0] // 2),) * 2 for c in parts)
    if not alike:  # a kind of part, or a stride or padding, that one convolution cannot carry
        return None
    channels_in, channels_out = sum(c.in_channels for c in parts), sum(c.out_channels for c in parts)
    if all(c.groups == c.in_channels == c.out_channels for c in parts):  # mixed depthwise kernels
        k, groups = max(c.kernel_size[0] for c in parts), channels_in
        weight = torch.cat([torch.nn.functional.pad(c.weight, [(k - c.kernel_size[0]) // 2] * 4) for c in parts])
    elif all(c.groups == 1 and c.kernel_size == (1, 1) for c in parts):  # pointwise parts
        # one dense 1x1 conv whose weight is block-diagonal (zeros join the parts): as fast in ONNX
        # Runtime as a grouped conv, and computed right by OpenCV 5, which gets grouped 1x1 convs
        # wrong inside MixNet (docs/deploy.md)
        k, groups = 1, 1
        weight = torch.block_diag(*(c.weight[:, :, 0, 0] for c in parts))[:, :, None, None]
    else:
        return None
    conv = torch.nn.Conv2d(channels_in, channels_out, k, first.stride, first.dilation[0] * (k // 2),
                           first.dilation, groups, bias=False)
    conv.weight = torch.nn.Parameter(weight.detach().clone())
    return conv


def merge_mixed_convs(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every MixNet MixedConv2d (split channels, one conv per split, concat)
    replaced by one Conv2d where `_one_conv` can. ONNX Runtime then runs one convolution instead of
    Split, several Convs and Concat, fuses the BatchNorm that follows into it, and keeps its blocked
    layout across it: the exported MixNet-S runs about twice as fast (docs/deploy.md)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "MixedConv2d" and (conv := _one_conv(list(module.values()))) is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, conv)
    return model


class GlobalMean(torch.nn.Module):
    """Global average pooling as one mean over height and width, (N, C, H, W) -> (N, C): what timm's
    average pool computes. torch.export writes AdaptiveAvgPool2d(1) as a mean and an as_strided
    whose index arithmetic mixes integer types, which OpenCV 4 refuses to load; this is a ReduceMean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


def for_export(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` that every runtime computes right and ONNX Runtime runs fast: MixNet's mixed
    convolutions merged (merge_mixed_convs) and timm's average pool written as GlobalMean."""
    model = merge_mixed_convs(model)
    pool = getattr(model, "global_pool", None)
    if (type(pool).__name__ == "SelectAdaptivePool2d" and pool.pool_type == "avg"
            and isinstance(pool.flatten, torch.nn.Flatten)):
        model.global_pool = GlobalMean()
    return model


def _onnx_bytes(wrapper: torch.nn.Module, size: int) -> bytes:
    """Export `wrapper` with a dynamic batch dimension and its weights embedded (one file)."""
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    names = {"input_names": ["images"], "output_names": ["probabilities", "logits"]}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        try:  # torch >= 2.5: the torch.export-based exporter; external_data=False embeds the weights
            torch.onnx.export(wrapper, (example,), str(out), dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                              verbose=False, **names)
        except TypeError:  # older torch: the TorchScript exporter, which embeds weights below 2 GB
            torch.onnx.export(wrapper, (example,), str(out), opset_version=17, **names,
                              dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"},
                                            "logits": {0: "batch"}})
        onnx, _ = import_onnx()
        proto = onnx.load(str(out))  # reads any side .data file back in
    for node in proto.graph.node:  # the exporter's notes on each node: stack traces with this
        del node.metadata_props[:]  # machine's paths, a fifth of an int8 file
    return proto.SerializeToString()


def onnx_metadata(ckpt: dict, path, size: int) -> dict[str, str]:
    """The metadata every exported file carries: what --images and --map need, and where it came from."""
    return {"mpkd_format": ONNX_FORMAT, "classes": json.dumps(ckpt["identity"]["classes"]),
            "img_size": str(size), "input": f"images: uint8 RGB tiles (N, {size}, {size}, 3)",
            "outputs": "probabilities (N, C) float32 (softmax inside); logits (N, C)",
            "method": ckpt["method"], "network": ckpt["model"], "checkpoint": str(path),
            "checkpoint_sha256": mpkd.file_fingerprint(path), "identity": json.dumps(ckpt["identity"]),
            "tile_um": str(ckpt.get("tile", {}).get("um", "")),  # the field of view, for --map
            "stain": json.dumps(ckpt.get("stain"))}  # the training tiles' stain, for --stain-norm


def with_metadata(proto, meta: dict[str, str]) -> bytes:
    """Add `meta` to the metadata of `proto` (in place: a second call adds to the first) and return
    the file's bytes."""
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def tiles_nhwc(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, 3, S, S) CPU images as the exported file takes them: (N, S, S, 3)."""
    return images.cpu().permute(0, 2, 3, 1).contiguous().numpy()


def reference_outputs(wrapper: torch.nn.Module, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and logits (N, C) of the checkpoint's own network (in a Deployable) on uint8
    (N, S, S, 3) tiles, 256 at a time."""
    with torch.inference_mode():
        outputs = [wrapper(torch.from_numpy(tiles[i:i + 256])) for i in range(0, len(tiles), 256)]
    return tuple(torch.cat(x).numpy() for x in zip(*outputs))


def reference_probabilities(wrapper: torch.nn.Module, tiles: np.ndarray) -> np.ndarray:
    return reference_outputs(wrapper, tiles)[0]


def session_outputs(session, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and logits (N, C) of an exported file, 256 tiles at a time."""
    outputs = [session.run(["probabilities", "logits"], {"images": tiles[i:i + 256]}) for i in range(0, len(tiles), 256)]
    return tuple(np.concatenate(x) for x in zip(*outputs))


def session_probabilities(session, tiles: np.ndarray) -> np.ndarray:
    return session_outputs(session, tiles)[0]


def onnx_agrees(got: np.ndarray, expected: np.ndarray) -> dict:
    """Whether logits (N, C) an exported file computed are PyTorch's `expected` up to float32
    rounding: the same class for every tile, and no logit further off than ONNX_TOLERANCE of the
    largest |logit| (at least 1)."""
    worst, scale = float(np.abs(got - expected).max()), max(1.0, float(np.abs(expected).max()))
    same = bool((got.argmax(1) == expected.argmax(1)).all())
    return {"ok": same and worst <= ONNX_TOLERANCE * scale, "same": same, "worst": worst, "scale": scale}


def checked_onnx(ckpt: dict, path, model: torch.nn.Module, part: dict) -> dict:
    """The checkpoint's network, its mixed convolutions merged, as one ONNX file (bytes) with its
    metadata, after checking on the test tiles that ONNX Runtime computes the logits of the
    checkpoint's own (unmerged) PyTorch network up to float32 rounding (onnx_agrees; a mismatch is
    an error)."""
    onnx, ort = import_onnx()
    size = ckpt["identity"]["img_size"]
    wrapper = Deployable(model.to("cpu", memory_format=torch.contiguous_format).float()).eval()
    proto = onnx.load_from_string(_onnx_bytes(Deployable(for_export(wrapper.model)).eval(), size))
    blob = with_metadata(proto, onnx_metadata(ckpt, path, size))
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    tiles = tiles_nhwc(part["images"])
    (expected, logits), (got, got_logits) = reference_outputs(wrapper, tiles), session_outputs(session, tiles)
    check, worst = onnx_agrees(got_logits, logits), float(np.abs(got - expected).max())
    if not check["ok"]:
        raise mpkd.UserError(f"the exported model disagrees with PyTorch on the {len(tiles)} test tiles "
                             f"(largest logit difference {check['worst']:.2e}, tolerance {ONNX_TOLERANCE:.0e} x "
                             f"{check['scale']:.3g}, the largest logit; same classes: {check['same']}): "
                             f"float rounding stays far below that, so the runtime or the exporter computes "
                             f"something else; the checkpoint is unaffected (evaluate.py CKPT --images runs it "
                             f"in PyTorch); please report it with the versions of torch and onnxruntime")
    return {"blob": blob, "bytes": len(blob), "tiles_checked": len(tiles), "max_abs_diff": worst,
            "max_logit_diff": check["worst"], "session": session, "size": size, "wrapper": wrapper,
            "expected": expected}


def export_onnx(ckpt: dict, path, model: torch.nn.Module, part: dict, out) -> dict:
    """Write `checked_onnx`'s file to `out`; nothing is written where its check fails."""
    try:
        exported = checked_onnx(ckpt, path, model, part)
    except mpkd.UserError as err:
        raise mpkd.UserError(f"{err}; {out} was not written") from None
    mpkd.write_bytes_atomic(exported["blob"], out)
    return {**exported, "path": str(out)}


def open_onnx(path):
    """An ONNX Runtime session for a file written by --export, and its metadata; anything else is
    a clear error."""
    _, ort = import_onnx()
    if not Path(path).is_file():
        raise mpkd.UserError(f"{path} does not exist")
    try:
        options = ort.SessionOptions()  # idle threads sleep rather than spin: window reading needs the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # truncated, not ONNX, an operator this runtime lacks
        raise mpkd.UserError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("mpkd_format") != ONNX_FORMAT:
        raise mpkd.UserError(f"{path} is an ONNX model but not one written by evaluate.py --export "
                             f"(no {ONNX_FORMAT} metadata: classes and image size are unknown)")
    return session, meta


def onnx_logits(session, images: torch.Tensor) -> torch.Tensor:
    """Logits (N, C) of uint8 (N, 3, S, S) CPU images from an exported model, ONNX_CHUNK at a time."""
    tiles = images.permute(0, 2, 3, 1).contiguous().numpy()  # the exported input: (N, S, S, 3)
    return torch.cat([torch.from_numpy(session.run(["logits"], {"images": tiles[i:i + ONNX_CHUNK]})[0])
                      for i in range(0, len(tiles), ONNX_CHUNK)])


def blocks_taking_turns(runs: dict, n: int, repeats: int, rounds: int) -> dict[str, float]:
    """Seconds per call of each of `runs` (name: function of a batch of n), in whole blocks taking
    turns (A B ... B A, `rounds` times), the median of each one's blocks: drift on a shared machine
    falls on all alike; whole blocks rather than single calls, because each runtime's threads keep
    spinning for a while after a call and would slow the other's next one."""
    cpu, times = torch.device("cpu"), {name: [] for name in runs}
    for name in (list(runs) + list(runs)[::-1]) * rounds:
        times[name] += _median_seconds([runs[name]], cpu, repeats if n == 1 else max(3, repeats // 4), warmup=3)
    return {name: float(np.median(seconds)) for name, seconds in times.items()}


def onnx_benchmark(session, model: torch.nn.Module, size: int, repeats: int = 20) -> dict:
    """Batch-1 latency (median ms) and images/s at batch 64 of the exported file in ONNX Runtime and
    of the checkpoint's network in PyTorch eager as evaluate.py runs it (mpkd.predict: normalise,
    channels_last, inference mode), on the same uint8 tiles, in blocks ONNX, eager, eager, ONNX."""
    model = mpkd.to_device(copy.deepcopy(model), torch.device("cpu")).eval()
    out = {"onnx": {}, "eager": {}}
    for n, key in ((1, "latency_ms"), (64, "throughput")):
        tiles = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        nhwc, nchw = tiles.numpy(), tiles.permute(0, 3, 1, 2)  # the file's input; what predict takes

        def eager():
            with torch.inference_mode():
                torch.softmax(mpkd.predict(model, nchw, "fp32"), 1)

        runs = {"onnx": lambda: session.run(["probabilities"], {"images": nhwc}), "eager": eager}
        for name, seconds in blocks_taking_turns(runs, n, repeats, rounds=1).items():
            out[name][key] = float(1000 * seconds if n == 1 else n / seconds)
    return out


def export_lines(network: str, exported) -> list[str]:
    """What --export did, and with --benchmark how the file runs against PyTorch eager."""
    lines = ["", f"wrote {exported['path']} ({exported['bytes'] / 1e6:.3f} MB, weights embedded): uint8 "
                 f"(N, {exported['size']}, {exported['size']}, 3) -> probabilities; on the "
                 f"{exported['tiles_checked']} test tiles ONNX Runtime agrees with PyTorch (largest "
                 f"probability difference {exported['max_abs_diff']:.1e}, logit difference "
                 f"{exported['max_logit_diff']:.1e}, same classes)"]
    if "benchmark" in exported:
        onnx_b, eager_b = exported["benchmark"]["onnx"], exported["benchmark"]["eager"]
        lines.append(f"{network} on the CPU, ONNX Runtime: batch-1 latency {onnx_b['latency_ms']:.2f} ms, "
                     f"{onnx_b['throughput']:.1f} img/s at batch 64; PyTorch eager, taking turns with it: "
                     f"{eager_b['latency_ms']:.2f} ms, {eager_b['throughput']:.1f} img/s "
                     f"({onnx_b['throughput'] / eager_b['throughput']:.2f}x throughput)")
    return lines


# ----------------------------------------------------------------------------------------------
# Deployment: an int8 file (--export --int8; onnxruntime.quantization imported only for it)

INT8_AGREEMENT = 0.99  # the least share of test tiles whose top-1 class the int8 file keeps
INT8_ACCURACY_POINTS = 0.5  # the most its test accuracy may differ from the fp32 network's
INT8_CALIBRATION_TILES = 256  # training tiles calibrated on (each in both views; docs/deploy.md)
# Weights within -64..64, not -127..127: x86 CPUs without VNNI (AVX2; AVX-512 before VNNI) add the
# uint8 x int8 products in pairs in int16, which full-range weights overflow, saturating silently
# (a 112 px student: 91% of tiles kept against 100% for the same file computed in float).
INT8_SETTINGS = {"format": "QDQ", "weights": "int8 within -64..64 (reduce_range), symmetric, per output channel",
                 "activations": "uint8, per tensor", "calibration": "Percentile 99.999",
                 "float": "the stem convolution (on the pixels as they are), the classifier (Gemm), the softmax"}


class RawStem(torch.nn.Module):
    """The stem convolution and its BatchNorm on 0-255 pixels: bn(conv(normalise(x))) computed as
    one convolution of x, with the normalisation and the BatchNorm folded into its weights, plus a
    constant map that carries their offsets and, at the borders, the zero padding of normalised
    pixels (the mean, in 0-255 pixels). The same sums, so exact up to float rounding; the int8 file
    then casts the pixels and convolves them, where normalising every pixel in float took a seventh
    of its time (docs/deploy.md)."""

    def __init__(self, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, size: int):
        super().__init__()
        mean = 255 * torch.tensor(mpkd.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = 255 * torch.tensor(mpkd.IMAGENET_STD).view(1, 3, 1, 1)
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        self.conv = torch.nn.Conv2d(3, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                    conv.dilation)
        with torch.no_grad():  # what conv and BatchNorm (its activation apart) make of zero pixels
            blank = conv((torch.zeros(1, 3, size, size) - mean) / std)
            offset = torch.nn.functional.batch_norm(blank, bn.running_mean, bn.running_var, bn.weight,
                                                    bn.bias, False, 0.0, bn.eps)
            inner = offset[0, :, offset.shape[2] // 2, offset.shape[3] // 2]  # no padding in its view
            self.conv.weight.copy_(conv.weight * gain.view(-1, 1, 1, 1) / std)
            self.conv.bias.copy_(inner)  # the bias: the convolution's output keeps its usual range
            self.register_buffer("border", offset - inner.view(1, -1, 1, 1))  # zero inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.border


class RawDeployable(torch.nn.Module):
    """Deployable for a network whose stem is a RawStem: the same file interface, no normalisation."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tiles: torch.Tensor):
        logits = self.model(tiles.permute(0, 3, 1, 2).float())
        return torch.softmax(logits, dim=1), logits


def int8_network(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """What the int8 file is made from: for_export's network, as a RawDeployable where the network
    has timm's plain stem (a Conv2d, then BatchNormAct2d), else as a Deployable."""
    model = for_export(model).eval()
    stem, bn = getattr(model, "conv_stem", None), getattr(model, "bn1", None)
    if not (type(stem) is torch.nn.Conv2d and stem.groups == 1 and stem.padding_mode == "zeros"
            and type(bn).__name__ == "BatchNormAct2d" and isinstance(bn.drop, torch.nn.Identity)):
        return Deployable(model).eval()
    model.conv_stem, model.bn1 = RawStem(stem, bn, size), bn.act
    return RawDeployable(model).eval()


def global_pools(proto):
    """Every mean over height and width (ReduceMean) as GlobalAveragePool, with a Flatten where the
    mean drops those axes: the same numbers, and an operator the quantiser keeps in int8, where
    around a ReduceMean it dequantises the whole activation to float first (docs/deploy.md)."""
    from onnx import helper, numpy_helper
    constants = {t.name: numpy_helper.to_array(t).tolist() for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if node.op_type != "ReduceMean" or len(node.input) < 2 or constants.get(node.input[1]) not in ([2, 3], [-2, -1]):
            nodes.append(node)
        elif keep:
            nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
        else:
            pooled = node.output[0] + "_pooled"
            nodes += [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=node.name),
                      helper.make_node("Flatten", [pooled], list(node.output), name=node.name + "_flatten", axis=1)]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def _blocks(nonzero: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(row, row end, column, column end) of the diagonal blocks outside which a 2-D mask is False:
    a cut after row r at column c wherever rows before r use only columns before c and rows from r
    on only columns from c on."""
    rows, cols = nonzero.shape
    lo = np.where(nonzero.any(1), nonzero.argmax(1), cols)
    hi = np.where(nonzero.any(1), cols - 1 - nonzero[:, ::-1].argmax(1), -1)
    first = np.minimum.accumulate(lo[::-1])[::-1]  # the first column any row from r on uses
    last = np.maximum.accumulate(hi)  # the last column any row up to r uses
    cuts = [(r, int(first[r])) for r in range(1, rows) if last[r - 1] < first[r] < cols]
    edges = [(0, 0)] + cuts + [(rows, cols)]
    return [(r0, r1, c0, c1) for (r0, c0), (r1, c1) in zip(edges, edges[1:])]


def _rings(weight: np.ndarray) -> list[tuple[int, int, int]]:
    """(channel, channel end, kernel) of runs of depthwise channels whose nonzero weights lie in a
    centred kernel of that size: MixNet's mixed kernels, zero-padded to the largest by the merge."""
    k = weight.shape[-1]
    centre = np.abs(np.arange(k) - k // 2)
    reach = np.maximum(centre[:, None], centre[None, :])  # ring of each kernel position
    used = np.array([2 * int(reach[w != 0].max(initial=0)) + 1 for w in weight[:, 0]])
    starts = [0] + [c for c in range(1, len(used)) if used[c] != used[c - 1]]
    return [(c0, c1, int(used[c0])) for c0, c1 in zip(starts, starts[1:] + [len(used)])]


def compact_weights(proto) -> None:
    """Store each int8 convolution weight that is mostly zeros by construction (merge_mixed_convs:
    block-diagonal 1x1 weights, depthwise kernels padded to the largest) as its nonzero blocks plus
    Pad and Concat nodes that rebuild it. Lossless; a runtime folds the constant back when it
    loads the file; the file is smaller by the zeros (MixNet-S: 0.66 million)."""
    from onnx import helper, numpy_helper
    weights = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    kept, nodes = [], []
    for tensor in proto.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if tensor.name not in weights or w.dtype != np.int8 or w.ndim != 4:
            kept.append(tensor)
            continue
        k = w.shape[2]
        if w.shape[1] == 1 and w.shape[3] == k > 1:  # depthwise: centred kernels, padded by m
            parts = [(w[c0:c1, :, m:k - m, m:k - m], [0, 0, m, m, 0, 0, m, m])
                     for c0, c1, m in ((c0, c1, (k - used) // 2) for c0, c1, used in _rings(w))]
        elif w.shape[2:] == (1, 1):  # pointwise: diagonal blocks, padded on the input channels
            parts = [(w[r0:r1, c0:c1], [0, c0, 0, 0, 0, w.shape[1] - c1, 0, 0])
                     for r0, r1, c0, c1 in _blocks(w[:, :, 0, 0] != 0)]
        else:
            parts = []
        if not parts or sum(block.size for block, _ in parts) > 0.9 * w.size:  # little to gain
            kept.append(tensor)
            continue
        pieces = []
        for i, (block, pads) in enumerate(parts):
            name = f"{tensor.name}_block{i}"
            kept += [numpy_helper.from_array(np.ascontiguousarray(block), name),
                     numpy_helper.from_array(np.array(pads, dtype=np.int64), name + "_pads")]
            nodes.append(helper.make_node("Pad", [name, name + "_pads"], [name + "_full"], name=name + "_pad"))
            pieces.append(name + "_full")
        nodes.append(helper.make_node("Concat", pieces, [tensor.name], name=tensor.name + "_concat", axis=0))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    nodes += proto.graph.node  # the rebuilt constants first: the graph stays in topological order
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


DEPTHWISE_CHANNELS = 16  # ONNX Runtime's int8 depthwise kernel ran 3x slower on other counts (docs/deploy.md)
CHANNELWISE = ("QuantizeLinear", "DequantizeLinear", "Sigmoid", "Mul", "Relu", "GlobalAveragePool")


def _channel_closure(dw, made: dict, readers: dict, tensors: dict, outputs: set):
    """The tensors that share a depthwise convolution's channels (through its block's quantisation,
    Swish, ReLU, squeeze-excite pool and gate, and other depthwise convolutions) and the convolutions
    at their edges: (tensors, depthwise, writers: the convolutions that make them, ends: those that
    read them), or None where anything else (a graph input or output, a constant, an Add, a Concat,
    a per-channel activation scale) touches them."""
    seen, depthwise, writers, ends = set(), {dw.name: dw}, {}, {}
    todo = [dw.input[0]]
    is_depthwise = lambda node: any(a.name == "group" and a.i > 1 for a in node.attribute)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = made.get(name)
        if name in outputs or node is None:  # a graph input or a constant
            return None
        if node.op_type == "Conv" and is_depthwise(node):
            depthwise[node.name] = node
            todo.append(node.input[0])
        elif node.op_type == "Conv":
            writers[node.name] = node
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if tensors.get(node.input[1]) is None or np.prod(tensors[node.input[1]].dims) != 1:
                return None
            todo.append(node.input[0])
        elif node.op_type in CHANNELWISE:
            todo += list(node.input)
        else:
            return None
        for reader in readers.get(name, []):
            if reader.op_type == "Conv" and reader.input[0] != name:
                return None
            if reader.op_type == "Conv" and not is_depthwise(reader):
                ends[reader.name] = reader
            elif reader.op_type in CHANNELWISE or reader.op_type == "Conv":
                if reader.op_type == "Conv":
                    depthwise[reader.name] = reader
                todo += list(reader.output)
            else:
                return None
    return seen, depthwise, writers, ends


def pad_depthwise(proto, multiple: int = DEPTHWISE_CHANNELS) -> None:
    """Give every int8 depthwise convolution whose channel count is not a multiple of `multiple`
    (MixNet-S: 72 and 360) channels of zeros up to one, and with it the whole block those channels
    run through (_channel_closure): the convolution that makes them gets output channels of zero
    weights and bias, the depthwise ones zero kernels, the one that reads them zero input weights.
    The new channels hold a real zero everywhere (the activations' zero point; Swish and ReLU keep
    0, the gate multiplies it), the other channels' integer sums, scales and roundings are untouched,
    so every output of the file stays the same; only ONNX Runtime's depthwise kernel runs faster."""
    from onnx import numpy_helper
    graph = proto.graph
    made = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    tensors = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    group = lambda node: next((a for a in node.attribute if a.name == "group"), None)
    widths = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in graph.value_info  # 0: not known
              if len(v.type.tensor_type.shape.dim) > 1}

    def constants(conv):  # the initializers behind a convolution's weight and bias DequantizeLinear
        found = []
        for name in conv.input[1:]:
            dq = made.get(name)
            if (dq is None or dq.op_type != "DequantizeLinear" or len(readers[name]) != 1
                    or not all(n in tensors and len(readers[n]) == 1 for n in dq.input)):
                return None
            found.append(dq)
        return found

    def grow(name, axis, extra, value):
        a = numpy_helper.to_array(tensors[name])
        if a.ndim > axis:  # per-channel (or a weight); a single per-tensor scale stays as it is
            shape = list(a.shape)
            shape[axis] = extra
            tensors[name].CopyFrom(numpy_helper.from_array(np.concatenate([a, np.full(shape, value, a.dtype)], axis), name))

    stale, visited = set(), set()
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        g = group(conv)
        if conv.name in visited or g is None or g.i == 1 or g.i % multiple == 0:
            continue
        closure = _channel_closure(conv, made, readers, tensors, outputs)
        if closure is None:
            continue
        names, depthwise, writers, ends = closure
        visited |= set(depthwise)
        channels = g.i
        extra = -channels % multiple
        makers = [*depthwise.values(), *writers.values()]
        found = {c.name: constants(c) for c in [*makers, *ends.values()]}
        if (any(f is None for f in found.values()) or any(group(c).i != channels for c in depthwise.values())
                or any(getattr(made.get(c.input[0]), "op_type", None) != "DequantizeLinear" for c in makers)
                or any(widths.get(name, 0) not in (0, channels) for name in names)  # a gate over space, say
                or any(group(c) is not None and group(c).i != 1 for c in [*writers.values(), *ends.values()])):
            continue
        for conv_ in ends.values():  # reads the channels: zero input weights
            grow(found[conv_.name][0].input[0], 1, extra, 0)
        for conv_ in makers:  # makes them: zero weights (scale 1, zero point 0) and bias
            weight, *bias = found[conv_.name]
            for name, value in zip(weight.input, (0, 1, 0)):
                grow(name, 0, extra, value)
            x_scale = float(numpy_helper.to_array(tensors[made[conv_.input[0]].input[1]]))
            for name, value in zip(bias[0].input if bias else [], (0, x_scale, 0)):  # at the weight's scale times the input's
                grow(name, 0, extra, value)
            if conv_.name in depthwise:
                group(conv_).i = channels + extra
        stale |= names
    kept = [v for v in graph.value_info if v.name not in stale]  # their recorded shapes no longer hold
    del graph.value_info[:]
    graph.value_info.extend(kept)


def import_quantisation():
    """onnxruntime.quantization, or the one-line error of import_onnx."""
    import_onnx()
    from onnxruntime import quantization
    return quantization


def calibration_tiles(data: dict, size: int) -> tuple[np.ndarray, dict]:
    """What the int8 file is calibrated on: up to INT8_CALIBRATION_TILES tiles of the training
    split, evenly spaced over it, each as stored and mirrored (the two views training shows), as
    uint8 (N, S, S, 3); and what the metadata records of them, with fingerprints (SHA-256 prefixes)
    of their file names and pixels. Never a test tile."""
    train = data["split"]["train"]
    picked = sorted({train[int(i)] for i in np.linspace(0, len(train) - 1, min(len(train), INT8_CALIBRATION_TILES))})
    files = [data["files"][i] for i in picked]
    tiles = tiles_nhwc(mpkd.load_images(data["root"], files, size))
    tiles = np.concatenate([tiles, tiles[:, :, ::-1]])  # width is axis 2: the horizontal flip
    return tiles, {"split": "train", "tiles": len(files), "views": "each as stored and mirrored",
                   "files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest()[:16],
                   "pixels_sha256": hashlib.sha256(tiles.tobytes()).hexdigest()[:16], "files": files}


def quantise(network: torch.nn.Module, size: int, calibration: np.ndarray):
    """The int8 ONNX model (a proto) of a RawDeployable or Deployable `network`: exported with its
    pools as GlobalAveragePool, then ONNX Runtime's static quantisation as INT8_SETTINGS say,
    calibrated on `calibration` (uint8 tiles), the zeros of merged convolutions left out of the file."""
    onnx, ort = import_onnx()
    quantization = import_quantisation()
    ort.set_default_logger_severity(3)  # not its notes on initializers the quantiser leaves unused
    proto = global_pools(onnx.load_from_string(_onnx_bytes(network, size)))
    batch = max(b for b in range(1, 65) if len(calibration) % b == 0)  # Percentile needs equal batches

    class Batches(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + batch] for i in range(0, len(calibration), batch))

        def get_next(self):
            chunk = next(self.batches, None)
            return None if chunk is None else {"images": chunk}

    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, out = (str(Path(tmp) / name) for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, fp32)
        quantization.shape_inference.quant_pre_process(fp32, pre)
        nodes = onnx.load(pre).graph.node
        floats = [next(n.name for n in nodes if n.op_type == "Conv")]  # the stem, classifier, softmax
        floats += [n.name for n in nodes if n.op_type in ("Gemm", "Softmax")]
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress notes
            warnings.simplefilter("ignore")
            quantization.quantize_static(
                pre, out, Batches(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                reduce_range=True, calibrate_method=quantization.CalibrationMethod.Percentile,
                nodes_to_exclude=floats)
        proto = onnx.load(out)
    pad_depthwise(proto)
    compact_weights(proto)
    return proto


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name and the instruction sets int8 speed depends on (and, without VNNI, int8
    arithmetic: INT8_SETTINGS), from Linux's cpuinfo; "not known" where there is none."""
    try:
        info = cpuinfo.read_text()
    except OSError:
        return "not known"
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    name = name.group(1).strip() if name else "CPU"
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)  # x86 only
    if not flags:
        return name
    flags = set(flags.group(1).split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    have = [f for f in wanted if f in flags] + ([] if flags & {"avx512_vnni", "avx_vnni"} else ["no VNNI"])
    return f"{name}: {', '.join(have)}"


def int8_figures(session, wrapper: torch.nn.Module, reference: np.ndarray, labels: np.ndarray,
                 tiles: np.ndarray) -> dict:
    """The gate's figures on the test tiles: top-1 agreement with the fp32 network, both accuracies,
    largest probability difference; and, to tell the quantiser's error from the network's own
    fragility, the fp32 network's agreement with itself when each pixel moves by one grey level at
    random (-1, 0 or +1: less than any scanner's noise)."""
    got = session_probabilities(session, tiles)
    step = np.random.default_rng(0).integers(-1, 2, tiles.shape)
    nudged = reference_probabilities(wrapper, np.clip(tiles.astype(np.int16) + step, 0, 255).astype(np.uint8))
    return {"tiles": len(tiles), "agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
            "accuracy_int8": float(100 * (got.argmax(1) == labels).mean()),
            "accuracy_fp32": float(100 * (reference.argmax(1) == labels).mean()),
            "max_abs_diff": float(np.abs(got - reference).max()),
            "fp32_one_grey_level": float((nudged.argmax(1) == reference.argmax(1)).mean())}


def figures_line(f: dict) -> str:
    ci = lambda accuracy: "{:.1f}-{:.1f}".format(*wilson_interval(round(accuracy * f["tiles"] / 100), f["tiles"]))
    return (f"top-1 agreement with the fp32 network {100 * f['agreement']:.2f}% of {f['tiles']} test tiles, "
            f"accuracy {f['accuracy_int8']:.2f}% ({ci(f['accuracy_int8'])}) against {f['accuracy_fp32']:.2f}% "
            f"({ci(f['accuracy_fp32'])}; 95% Wilson intervals), largest probability "
            f"difference {f['max_abs_diff']:.3f} (the fp32 network keeps its own class on "
            f"{100 * f['fp32_one_grey_level']:.2f}% of them when pixels move by one grey level)")


def int8_file(ckpt: dict, path, model: torch.nn.Module, data: dict, part: dict) -> dict:
    """The checkpoint's network quantised to int8 (bytes, with its metadata and the gate's figures
    on the test tiles), whether or not it passes the gate. The fp32 file is built and checked first
    (checked_onnx): the reference, and the benchmark's other file."""
    _, ort = import_onnx()
    fp32 = checked_onnx(ckpt, path, model, part)
    size, tiles = fp32["size"], tiles_nhwc(part["images"])
    calibration, calibrated = calibration_tiles(data, size)
    proto = quantise(int8_network(fp32["wrapper"].model, size), size, calibration)
    meta = {**onnx_metadata(ckpt, path, size), "precision": "int8", "quantisation": json.dumps(INT8_SETTINGS),
            "calibration": json.dumps({k: v for k, v in calibrated.items() if k != "files"})}
    session = ort.InferenceSession(with_metadata(proto, meta), providers=["CPUExecutionProvider"])
    figures = int8_figures(session, fp32["wrapper"], fp32["expected"], part["labels"].cpu().numpy(), tiles)
    blob = with_metadata(proto, {"int8_check": json.dumps(figures)})
    return {"blob": blob, "bytes": len(blob), "size": size, "figures": figures, "calibration": calibrated,
            "fp32": fp32, "session": session}


def export_int8(ckpt: dict, path, model: torch.nn.Module, data: dict, part: dict, out) -> dict:
    """--export --int8: `int8_file`, written to `out` only if on the test tiles it keeps the fp32
    network's top-1 class on at least INT8_AGREEMENT of them and its accuracy within
    INT8_ACCURACY_POINTS; else an error naming the figures and the settings."""
    made = int8_file(ckpt, path, model, data, part)
    figures = made["figures"]
    if (figures["agreement"] < INT8_AGREEMENT
            or abs(figures["accuracy_int8"] - figures["accuracy_fp32"]) > INT8_ACCURACY_POINTS):
        settings = "; ".join(f"{k} {v}" for k, v in INT8_SETTINGS.items())
        raise mpkd.UserError(f"the int8 network is too far from the fp32 one: {figures_line(figures)} (at "
                             f"least {INT8_AGREEMENT:.0%} agreement and {INT8_ACCURACY_POINTS} points needed; "
                             f"settings: {settings}; calibrated on {made['calibration']['tiles']} training "
                             f"tiles, both views); {out} was not written (the fp32 file, --export without "
                             f"--int8, keeps every class; docs/deploy.md)")
    mpkd.write_bytes_atomic(made["blob"], out)
    return {**made, "path": str(out)}


def openvino_models(blobs: dict[str, bytes]) -> dict:
    """OpenVINO compiled models of the files in `blobs` (name: ONNX bytes): the fp32 file asked for
    f32 and at OpenVINO's default precision (bf16 on CPUs that have it; named), the int8 file as it is;
    {} where OpenVINO is not installed."""
    try:
        import openvino
    except ImportError:
        return {}
    core, models = openvino.Core(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, blob in blobs.items():
            (Path(tmp) / f"{name}.onnx").write_bytes(blob)
            read = core.read_model(str(Path(tmp) / f"{name}.onnx"))
            if name == "fp32":
                models["OpenVINO fp32 file, f32"] = core.compile_model(read, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                compiled = core.compile_model(read, "CPU")  # its precision named: bf16 only where the CPU has it
                hint = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
                models[f"OpenVINO fp32 file, default precision ({hint})"] = compiled
            else:
                models[f"OpenVINO {name} file"] = core.compile_model(read, "CPU")
    return models


def runtime_probabilities(model, tiles: np.ndarray) -> np.ndarray:
    """Probabilities (N, C) of uint8 (N, S, S, 3) tiles from an ONNX Runtime session or an OpenVINO
    compiled model, 64 tiles at a time."""
    if hasattr(model, "run"):
        run = lambda chunk: model.run(["probabilities"], {"images": chunk})[0]
    else:
        run = lambda chunk: model(chunk)[model.output("probabilities")]
    return np.concatenate([run(tiles[i:i + 64]) for i in range(0, len(tiles), 64)])


def int8_benchmark(exported: dict, part: dict, repeats: int = 20) -> dict:
    """--export --int8 --benchmark: batch-1 latency (ms) and images/s at batch 64 of the int8 and
    fp32 files in ONNX Runtime and OpenVINO, in whole blocks taking turns (A B C ... C B A, three
    times; the median of each one's six blocks, as a shared machine's load comes and goes), on the
    same random uint8 tiles; and each one's top-1 agreement with the fp32 network on the test tiles."""
    runs = {"ONNX Runtime fp32 file": exported["fp32"]["session"], "ONNX Runtime int8 file": exported["session"]}
    runs |= openvino_models({"fp32": exported["fp32"]["blob"], "int8": exported["blob"]})
    test, reference = tiles_nhwc(part["images"]), exported["fp32"]["expected"]
    out = {name: {"agreement": float((runtime_probabilities(m, test).argmax(1) == reference.argmax(1)).mean())}
           for name, m in runs.items()}
    for n, key in ((1, "latency_ms"), (64, "throughput")):
        tiles = np.random.default_rng(0).integers(0, 256, (n, exported["size"], exported["size"], 3), dtype=np.uint8)
        calls = {name: lambda m=m: runtime_probabilities(m, tiles) for name, m in runs.items()}
        for name, seconds in blocks_taking_turns(calls, n, repeats, rounds=3).items():
            out[name][key] = float(1000 * seconds if n == 1 else n / seconds)
    return out


def int8_lines(network: str, exported: dict) -> list[str]:
    """What --export --int8 did, and with --benchmark how the int8 and fp32 files run."""
    c = exported["calibration"]
    lines = ["", f"wrote {exported['path']} ({exported['bytes'] / 1e6:.3f} MB, int8; the fp32 file "
                 f"{exported['fp32']['bytes'] / 1e6:.3f} MB), calibrated on {c['tiles']} training tiles in both "
                 f"views (pixels {c['pixels_sha256']}): {figures_line(exported['figures'])}"]
    if "benchmark" in exported:
        b = exported["benchmark"]
        base = b["ONNX Runtime fp32 file"]["throughput"]
        lines += [f"{network} on the CPU ({cpu_features()}), taking turns ({len(b)} runs):"]
        lines += [f"  {name:<44} batch-1 {r['latency_ms']:6.2f} ms, {r['throughput']:7.1f} img/s at batch 64 "
                  f"({r['throughput'] / base:.2f}x ONNX Runtime fp32), top-1 agreement {100 * r['agreement']:.2f}%"
                  for name, r in b.items()]
        kept = {name: r["throughput"] for name, r in b.items() if r["agreement"] >= INT8_AGREEMENT}
        fastest = max(kept, key=kept.get)  # the fp32 file in ONNX Runtime at least: the reference's own
        lines.append(f"  fastest at batch 64 among those keeping {INT8_AGREEMENT:.0%} of the classes: {fastest} "
                     f"({kept[fastest] / base:.2f}x ONNX Runtime fp32)")
        if not any(name.startswith("OpenVINO") for name in b):
            lines.append("  OpenVINO is not installed (pip install openvino): measured in ONNX Runtime only")
    return lines


# ----------------------------------------------------------------------------------------------


def check_args(args) -> None:
    """Refuse flags that do not go together, or values out of range, before any work."""
    jobs = [flag for flag, on in (("--external", args.external), ("--images", args.images), ("--map", args.map),
                                  ("--export", args.export)) if on]
    if args.external and len(jobs) > 1:
        raise mpkd.UserError(f"{jobs[0]} and {jobs[1]} are separate jobs: run one at a time")
    if args.int8 and not args.export:
        raise mpkd.UserError("--int8 quantises the file --export writes: pass --export PATH.int8.onnx too")
    if args.image_mpp is not None and not args.image_mpp > 0:
        raise mpkd.UserError(f"--image-mpp {args.image_mpp} must be positive: microns per pixel (0.5 at 20x)")
    for flag, value, needs, jobs_of in (("--class-map", args.class_map, args.external, "--external"),
                                        ("--scale-rule", args.scale_rule, args.external or args.images,
                                         "--external or --images"),
                                        ("--stain-norm", args.stain_norm, args.external or args.images or args.map,
                                         "--external, --images or --map"),
                                        ("--stain-ref", args.stain_ref, args.stain_norm, "--stain-norm")):
        if value and not needs:
            raise mpkd.UserError(f"{flag} is for {jobs_of}")


def main(args):
    check_args(args)
    device = mpkd.pick_device(args.device)
    if args.map:
        map_images(args, device)
        return None
    if args.images:
        out = args.predictions or f"{Path(args.images).resolve().name}_predictions.csv"
        mpkd.check_writable(out)
        print("\n".join(images_report(predict_folder(args, device), out)))
        return None
    if args.export:  # before any work: the packages, one checkpoint, a writable .onnx path
        import_onnx()
        if len(args.checkpoints) != 1 or not args.export.endswith(".onnx"):
            raise mpkd.UserError("--export PATH.onnx writes one checkpoint: give exactly one and a .onnx path")
        mpkd.check_writable(args.export)
    plt = import_pyplot() if args.plots else None  # None: the report first, then the one-line error
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        mpkd.check_writable(Path(args.plots) / "table2.png")
    for path in (p for p in (args.json, args.predictions) if p):
        mpkd.check_writable(path)
    cache = {}
    rows = (score_external(args, device) if args.external
            else [evaluate_checkpoint(path, args, device, cache) for path in args.checkpoints])
    summary, paired, tests = summarise(rows), paired_difference(rows), mcnemar_pairs(rows)
    lines = table_lines(rows, summary, paired, tests)
    if len(rows) == 1:
        lines += report_lines(rows[0])
    if args.external:
        lines += external_lines(rows)
    if args.export:
        lines += (int8_lines if args.int8 else export_lines)(
            rows[0]["network"], export_checkpoint(args.checkpoints[0], args, device, cache))
    print("\n".join(lines))
    if args.json:
        report = {"checkpoints": [{k: v for k, v in r.items() if k not in PER_TILE} for r in rows],
                  "summary": summary, "paired": paired, "mcnemar": tests}
        mpkd.write_text_atomic(json.dumps(report, indent=1), args.json)
    if args.predictions:
        test_predictions_csv(rows, args.predictions)
    if args.plots and plt is None:  # after the report: a missing package costs no result
        raise mpkd.UserError("--plots needs matplotlib: pip install matplotlib (the report above is "
                             "complete; only the pictures were not written)")
    if args.plots:
        written = write_plots(plt, rows, summary, args.plots)
        print(f"\nwrote {len(written)} pictures to {args.plots}")
    return rows


if __name__ == "__main__":
    try:
        main(get_args())
    except mpkd.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
