"""Score checkpoints on labelled tiles in the shape of the paper's Table II: accuracy with its 95%
interval, parameters and size, McNemar's test between checkpoints and seed summaries; the per-class
report, the predictions CSV and pictures; or another lab's labelled tiles (--external).

    python evaluate.py teacher.pt alone.pt vanilla.pt student.pt --plots plots
    python evaluate.py student.pt --predictions student_predictions.csv   # + per-class report
    python evaluate.py teacher.pt student.pt --benchmark                   # + latency and throughput
    python evaluate.py runs/seed*/{teacher,alone,vanilla,mpkd}.pt          # several seeds
    python evaluate.py teacher.pt student.pt --external crc-val-he-7k  # another lab's tiles, at their scale

Each checkpoint carries its network, classes, image size, split settings and data folder, so no
flag is needed; a checkpoint whose classes or training files do not match --data is refused. Every
accuracy comes with its 95% Wilson interval; checkpoints tested on the same tiles are compared
with McNemar's exact test; across seeds the paired difference gets a 95% t-interval. New tiles
without labels, large images and slides: predict.py; the deployable file: export.py.
"""

import argparse
import copy
import csv
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import mpkd

ROW_COLOURS = {"teacher": "#444444", "alone": "#1f77b4", "vanilla": "#ff7f0e", "multipart": "#2ca02c",
               "auto": "#9467bd", "ensemble": "#d62728"}  # per METHODS key
TABLE2_PAIRS = [("multipart", "vanilla"), ("vanilla", "alone"), ("multipart", "alone"), ("auto", "multipart"),
                ("ensemble", "multipart"), ("ensemble", "vanilla")]  # McNemar's test printed for these
NOT_IN_JSON = ("outcomes", "files", "labels", "predicted", "probs", "history", "groups", "folders", "method_key",
               "stain_augmented")  # per tile, or in the checkpoint already
MOVED = {"--images": "predict.py", "--tta": "predict.py", "--map": "predict.py", "--out-dir": "predict.py",
         "--stride": "predict.py", "--no-mask": "predict.py", "--overwrite": "predict.py", "--shard": "predict.py",
         "--export": "export.py", "--int8": "export.py"}  # flags of evaluate.py before predict.py and export.py


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    moved = next((a.split("=")[0] for a in argv if a.split("=")[0] in MOVED), None)
    if moved:  # a command of an earlier release: one line saying where its job went
        how = ("the same arguments" if MOVED[moved] == "predict.py" else
               "the checkpoint and --out PATH.onnx (with --int8 and --benchmark as before)")
        raise mpkd.UserError(f"{moved} is a job of {MOVED[moved]} now: python {MOVED[moved]} with {how}")
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),  # the first sentence, whole
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by train_teacher.py or distill.py")
    p.add_argument("--data", default=None, help="folder of class folders the checkpoints were trained on "
                                                "(unset: the folder each checkpoint records)")
    p.add_argument("--groups", default=None, metavar="FILE.csv",
                   help="the groups file of checkpoints split by group, where it is not found by "
                        "itself (at its recorded path, or by name in or beside --data)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="score in bf16 autocast (default fp32, so that a GPU and a CPU give the same "
                        "accuracies and probabilities as the exported file)")
    p.add_argument("--json", default=None, help="also write every number printed to this JSON file")
    p.add_argument("--predictions", default=None, metavar="FILE.csv",
                   help="CSV of one row per test tile and checkpoint: file, true and predicted class, "
                        "class probabilities")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write learning curves, confusion matrices, error grids and the Table II "
                        "plot as PNG files to this folder (needs matplotlib)")
    p.add_argument("--benchmark", action="store_true",
                   help="also measure each checkpoint's batch-1 latency, throughput and training step "
                        "with and without the KD term")
    p.add_argument("--external", default=None, metavar="DIR",
                   help="score the checkpoints on another lab's class folders, every image a test tile; "
                        f"or a named set, fetched into data/ on first use: {', '.join(EXTERNAL_SETS)}")
    p.add_argument("--class-map", default=None, metavar="FILE.csv",
                   help="--external: rows of (folder in DIR, checkpoint class), comma- or semicolon-separated; "
                        "several folders to one class allowed, an empty class leaves a folder out on purpose "
                        "(unset: folder names are classes)")
    p.add_argument("--skip-unmapped", action="store_true",
                   help="--external: score without the folders the class map does not name (else refused)")
    p.add_argument("--external-groups", default=None, metavar="FILE.csv",
                   help="--external: the slide or patient of every tile (columns file, relative to DIR, and "
                        "group), for intervals clustered by group; Kather 2016 names give their slides")
    mpkd.add_scale_and_stain_flags(p, "--external", "a named set's own; else the training tiles' scale, "
                                   "i.e. resized whole", "the folder")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Refuse flags that do not go together, or values out of range, before any work."""
    if args.image_mpp is not None and not args.image_mpp > 0:
        raise mpkd.UserError(f"--image-mpp {args.image_mpp} must be positive: microns per pixel (0.5 at 20x)")
    for flag, job in (("class_map", "external"), ("skip_unmapped", "external"), ("external_groups", "external"),
                      ("any_mpp", "image_mpp"), ("image_mpp", "external"), ("scale_rule", "external"),
                      ("stain_norm", "external"), ("tile_um", "external"), ("stain_ref", "stain_norm")):
        if getattr(args, flag) and not getattr(args, job):  # argparse dest names, as in predict.py
            raise mpkd.UserError(f"--{flag.replace('_', '-')} is for --{job.replace('_', '-')}")
    if args.benchmark and args.external:
        raise mpkd.UserError("--benchmark measures the checkpoints on their own test split: leave out --external")


# ----------------------------------------------------------------------------------------------
# Table II: each checkpoint scored on its own test split, then compared across checkpoints. A row
# holds the accuracy with its Wilson interval (mpkd.wilson_interval), the size, and per tile the
# outcome and class probabilities; rows tested on the same tiles are paired by McNemar's test, rows
# of several seeds summarised per method with a t-interval (the statistics follow this section).


def evaluate_checkpoint(path, data_dir: str | None, groups: str | None, device: torch.device, precision: str,
                        cache: dict, benchmark: bool = False) -> dict:
    """One row of the table: the checkpoint scored on the test tiles of the data it was made from."""
    ckpt = mpkd.load_checkpoint(path)
    data, part = mpkd.load_test_split(ckpt, path, data_dir, groups, device, cache, print)
    model = mpkd.to_device(mpkd.load_model(ckpt, path), device)
    labels = part["labels"].tolist()
    row = score_row(path, ckpt, model, mpkd.predict(model, part["images"], precision), labels, part["files"],
                    {"folder": data["root"], **ckpt["identity"]},
                    [data["root"], mpkd.tiles_fingerprint(part["files"], labels)],
                    *tile_groups(part["files"], part["groups"], ckpt["identity"]["split_by"]))
    row.update(precision=precision)
    if benchmark:
        row["benchmark"] = speed(model, ckpt["identity"]["img_size"], device, precision, ckpt["args"]["batch_size"])
    return row


def tile_groups(files: list[str], groups: list[str] | None, split_by: str | None) -> tuple:
    """Each tile's group and what the groups are: those a split or groups file gave (slides or
    groups), else the Kather 2016 slide in every file's name, else none: (None, None)."""
    if groups:
        return groups, "slide" if split_by == "slide" else "group"
    found = [mpkd.SLIDE_PATTERN.search(Path(f).name) for f in files]
    return ([m.group(0) for m in found], "slide") if found and all(found) else (None, None)


def score_row(path, ckpt, model, logits, labels: list[int], files: list[str], data: dict, test_key: list,
              groups: list[str] | None = None, group_by: str | None = None) -> dict:
    """The table row of a checkpoint's logits (N, C) on tiles of known classes: accuracy with its
    Wilson interval, the per-class report, its size, and per tile outcome and probabilities; where
    the tiles' groups are known (slides, patients), accuracy and balanced accuracy clustered by them.
    `data` says what the numbers were made on; rows with equal `test_key` were tested on the same
    tiles (McNemar)."""
    classes, predicted = ckpt["identity"]["classes"], logits.argmax(1).tolist()
    report = classification_report(labels, predicted, len(classes))
    outcomes = [p == t for p, t in zip(predicted, labels)]
    clustered = groups and {"by": group_by, "groups": len(set(groups)),
                            "accuracy": clustered_interval(outcomes, groups),
                            "balanced_accuracy": clustered_interval(outcomes, groups, labels)}
    stain_augment = ckpt["args"].get("stain_augment")
    return {"checkpoint": str(path), "method": mpkd.method_name(ckpt["method"], ckpt.get("ensemble"), stain_augment),
            "method_key": ckpt["method"], "stain_augmented": bool(stain_augment),
            "network": mpkd.network_name(ckpt["model"]),
            "seed": ckpt["args"]["seed"], "accuracy": report["accuracy"], "correct": sum(outcomes),
            "n_test": len(outcomes), "accuracy_ci95": list(mpkd.wilson_interval(sum(outcomes), len(outcomes))),
            "params_m": mpkd.count_params(model) / 1e6, "size_mb": mpkd.model_size_mb(model),
            "classes": classes, "report": report, "data": data, "groups": groups, "clustered": clustered or None,
            "pair_key": [ckpt["args"]["seed"], ckpt["identity"]["train_fingerprint"]], "test_key": test_key,
            "outcomes": outcomes, "files": files, "labels": labels, "predicted": predicted,
            "probs": torch.softmax(logits.float(), 1).cpu().tolist(), "history": ckpt["history"]}


def summarise(rows: list[dict]) -> list[dict]:
    """Group evaluated checkpoints by (method, network), in Table II's order: n, accuracy mean, sample
    std and 95% t-interval of the mean (std and interval only with several seeds)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["network"]), []).append(row)
    rank = {key: i for i, key in enumerate(mpkd.METHODS)}  # Table II's order
    out = []
    for (method, net), mine in sorted(groups.items(), key=lambda kv: (rank[kv[1][0]["method_key"]], *kv[0])):
        stats = mean_interval([r["accuracy"] for r in mine])
        out.append({"method": method, "network": net, "n": stats["n"], "accuracy_mean": stats["mean"],
                    "accuracy_std": stats["std"], "accuracy_ci95": stats["ci95"],
                    "params_m": mine[0]["params_m"], "size_mb": mine[0]["size_mb"]})
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
    return {"a": a, "b": b, "seeds": [k[0] for k in keys], "diffs": diffs, "mean": stats["mean"], "std": stats["std"],
            "ci95": stats["ci95"], "wins": int(sum(d > 0 for d in diffs)), "ties": int(sum(d == 0 for d in diffs))}


def mcnemar_pairs(rows: list[dict]) -> list[dict]:
    """McNemar's exact test for every pair of checkpoints tested on the same images (same split)."""
    out = []
    for x, y in itertools.combinations(rows, 2):
        if x["test_key"] != y["test_key"]:
            continue
        a, b = np.asarray(x["outcomes"], bool), np.asarray(y["outcomes"], bool)
        only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
        test = {"a": x["checkpoint"], "b": y["checkpoint"], "a_method": x["method"], "b_method": y["method"],
                "seed_a": x["seed"], "seed_b": y["seed"], "same_seed": x["pair_key"] == y["pair_key"], "only_a": only_a,
                "only_b": only_b, "p": mcnemar_exact(only_a, only_b), "difference": x["accuracy"] - y["accuracy"]}
        if x["groups"]:  # the same tiles, so the same groups: the difference clustered by them
            test["difference_clustered"] = clustered_interval(a.astype(int) - b, x["groups"], proportion=False)
        out.append(test)
    return out


def table2_pair(a: dict, b: dict) -> int | None:
    """The place of rows (a, b) among the Table II pairs McNemar's test is printed for: the same
    pair of methods, both trained with stain augmentation or both without; None for other pairs."""
    pair = (a["method_key"], b["method_key"])
    return TABLE2_PAIRS.index(pair) if pair in TABLE2_PAIRS and a["stain_augmented"] == b["stain_augmented"] else None


FEW_GROUPS = 20  # fewer groups: the clustered interval may cover less than 95% (docs/intervals.md)


def interval(ci: list[float] | None, signed: bool = False) -> str:
    """An interval for a table: [lo, hi] in points, or - where there is none."""
    return f"[{ci[0]:{'+' if signed else ''}.2f}, {ci[1]:{'+' if signed else ''}.2f}]" if ci else "-"


def table_lines(rows, summary, paired, tests):
    """Table II per checkpoint with 95% intervals (clustered by slide or group where the tiles'
    groups are known); McNemar's test of the Table II pairs per seed (of every pair on another lab's
    tiles); with several seeds the mean per row and the paired difference across seeds."""
    bench = all("benchmark" in r for r in rows)
    clustered = next((r["clustered"] for r in rows if r["clustered"]), None)
    w = max(15, *(len(r["method"]) + 2 for r in rows))  # the method column
    head = f"{'Method':<{w}}{'Network':<10}{'Acc (%)':>9}{'95% CI':>16}"
    head += f"{'by ' + clustered['by']:>17}" if clustered else ""
    head += f"{'Params (M)':>12}{'Size (MB)':>11}"
    head += f"{'Latency (ms)':>14}{'Img/s':>10}{'Train img/s':>13}{'KD/CE':>7}" if bench else ""
    lines = [head + "  Checkpoint"]
    for r in rows:
        line = f"{r['method']:<{w}}{r['network']:<10}{r['accuracy']:>9.2f}{interval(r['accuracy_ci95']):>16}"
        if clustered:
            line += f"{interval(r['clustered'] and (r['clustered']['accuracy'] or {}).get('ci95')):>17}"
        line += f"{r['params_m']:>12.2f}{r['size_mb']:>11.3f}"
        if bench:
            b = r["benchmark"]
            line += (f"{b['latency_ms']:>14.2f}{b['throughput']:>10.1f}{b['train_step_images_per_s']:>13.1f}"
                     f"{b['kd_step_images_per_s'] / b['train_step_images_per_s']:>7.3f}")
        lines.append(line + f"  {r['checkpoint']}")
    scored = " and ".join(dict.fromkeys(r["precision"] for r in rows))
    external = rows[0]["data"].get("external")
    tiles = f"tiles of {external['folder']}{denominator(external)}" if external else "test tiles"
    lines.append(f"(scored in {scored}; 95% Wilson score intervals over the {rows[0]['n_test']} {tiles})")
    if clustered:
        g, by = clustered["groups"], clustered["by"]
        lines.append(f"(by {by}: 95% intervals clustered by the {g} {by}s the tiles come from, cluster-robust; "
                     f"tiles of one {by} are not independent, so read these, not the Wilson intervals"
                     + (f"; with fewer than {FEW_GROUPS} {by}s, accuracy near 95% and {by}s that differ "
                        f"much, they covered 87-92% in simulation: docs/intervals.md)" if g < FEW_GROUPS else ")"))
    table_pairs, row_of = [], {r["checkpoint"]: r for r in rows}
    for t in (t for t in tests if t["same_seed"] or external):
        a, b, na, nb, diff = row_of[t["a"]], row_of[t["b"]], t["only_a"], t["only_b"], t.get("difference_clustered")
        if table2_pair(b, a) is not None:  # read the pair the way Table II does
            a, b, na, nb = b, a, nb, na
            diff = diff and {**diff, "estimate": -diff["estimate"], "ci95": [-diff["ci95"][1], -diff["ci95"][0]]}
        if table2_pair(a, b) is not None or external:  # on another lab's tiles every pair, by checkpoint
            by = (f"; difference {diff['estimate'] + 0.0:+.2f} points, clustered {interval(diff['ci95'], True)}"
                  if diff else "")
            name = (lambda r: f"{r['method']} ({r['checkpoint']})") if external else (lambda r: r["method"])
            table_pairs.append((t["seed_a"], table2_pair(a, b) or 0, name(a), name(b), na, nb, t["p"], by))
    if table_pairs:
        lines += ["", f"McNemar's exact test on the same {'tiles' if external else 'test tiles'} "
                      f"(A / B: tiles only A / only B gets right)"]
        lines += [f"  seed {seed}: {a} vs {b}: {na} / {nb}, two-sided p = {p:.3g}{by}"
                  for seed, _, a, b, na, nb, p, by in sorted(table_pairs, key=lambda x: x[:2])]
    if any(s["n"] > 1 for s in summary):
        lines += ["", f"{'Method':<{w}}{'Network':<10}{'Acc (%) mean +- std':>22}{'95% CI of mean':>20}"
                      f"{'n':>4}{'Params (M)':>12}{'Size (MB)':>11}"]
        for s in summary:
            spread = f" +- {s['accuracy_std']:<5.2f}" if s["n"] > 1 else " " * 9
            lines.append(f"{s['method']:<{w}}{s['network']:<10}{s['accuracy_mean']:>13.2f}{spread}"
                         f"{interval(s['accuracy_ci95']):>20}{s['n']:>4}{s['params_m']:>12.2f}{s['size_mb']:>11.3f}")
    if paired and len(paired["diffs"]) > 1:  # one seed has no spread: McNemar above says it
        lines += ["", f"{paired['a']} - {paired['b']}, paired by seed {paired['seeds']}: "
                      f"{' '.join(f'{d:+.2f}' for d in paired['diffs'])} points",
                  f"  mean {paired['mean']:+.2f}, std {paired['std']:.2f}, 95% t-interval of the mean "
                  f"{interval(paired['ci95'], True)}; {paired['a']} ahead on {paired['wins']} of "
                  f"{len(paired['diffs'])} seeds" + (f" (tied on {paired['ties']})" if paired["ties"] else "")]
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    student = next((r for r in rows if r["method"] != "teacher"), None)
    if bench and teacher and student:
        t, s = teacher["benchmark"], student["benchmark"]
        lines += ["", f"{student['network']} vs {teacher['network']}: {t['latency_ms'] / s['latency_ms']:.2f}x lower "
                      f"batch-1 latency, {s['throughput'] / t['throughput']:.2f}x throughput"]
    return lines


# ----------------------------------------------------------------------------------------------
# Statistics


def classification_report(y_true: list[int], y_pred: list[int], num_classes: int) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1 (all in %) and the
    confusion matrix (rows: true class, columns: predicted). An undefined ratio (0/0) counts as 0.
    Balanced accuracy and macro-F1 both average over the classes present in `y_true` (a class the
    tiles cannot have would count as a zero); `absent` lists the others."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"accuracy": float(100 * tp.sum() / max(cm.sum(), 1)),
            "balanced_accuracy": float(100 * recall[support > 0].mean()) if support.any() else 0.0,
            "macro_f1": float(100 * f1[support > 0].mean()) if support.any() else 0.0,
            "absent": np.flatnonzero(support == 0).tolist(),
            "precision": (100 * precision).tolist(), "recall": (100 * recall).tolist(), "f1": (100 * f1).tolist(),
            "support": support.tolist(), "confusion": cm.tolist()}


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


def clustered_interval(outcomes, groups: list[str], classes=None, proportion: bool = True) -> dict | None:
    """A 95% interval that respects tiles sharing a group (slide, patient, source tile), whose
    outcomes are correlated: of accuracy, from per-tile outcomes (1 right, 0 wrong); of balanced
    accuracy, given each tile's true class too; or of the paired difference of two checkpoints,
    from outcomes -1, 0, 1 (proportion=False). The cluster-robust (sandwich) standard error of the
    estimate, linearised, with the small-sample factor G / (G - 1) and Student's t with G - 1
    degrees of freedom, as Cameron and Miller (2015, J. Human Resources 50:317) recommend for few
    clusters; a proportion's interval is made on the logit scale, which keeps it inside 0-100% and
    covers better near 100% (docs/intervals.md: the coverage simulated). In percent, with the number
    of groups G; None with fewer than two groups (for balanced accuracy, in any class: one group's
    tiles tell nothing of how groups vary), or for a proportion of 0 or 100%."""
    x = np.asarray(outcomes, dtype=np.float64)
    cls = np.zeros(len(x), np.int64) if classes is None else np.asarray(classes)
    present, where = np.unique(cls, return_inverse=True)
    counts = np.bincount(where)
    means = np.bincount(where, weights=x) / counts  # per class (one class: the whole)
    estimate = float(means.mean())
    names, group_of = np.unique(np.asarray(groups), return_inverse=True)
    g = len(names)
    fewest = min(len(set(group_of[where == c])) for c in range(len(present)))  # groups in the class with fewest
    if fewest < 2 or (proportion and not 0 < estimate < 1):
        return None
    influence = (x - means[where]) / (counts[where] * len(present))  # each tile's part of the estimate
    se = math.sqrt(g / (g - 1) * (np.bincount(group_of, weights=influence, minlength=g) ** 2).sum())
    t = t_critical(g - 1)
    if proportion:
        logit, slope = math.log(estimate / (1 - estimate)), se / (estimate * (1 - estimate))
        lo, hi = (1 / (1 + math.exp(-v)) for v in (logit - t * slope, logit + t * slope))
    else:
        lo, hi = max(-1.0, estimate - t * se), min(1.0, estimate + t * se)
    return {"estimate": 100 * estimate, "ci95": [100 * lo, 100 * hi], "groups": g}


# ----------------------------------------------------------------------------------------------
# One checkpoint in detail, the predictions CSV, and speed (--benchmark)


def report_lines(row):
    """Per-class precision, recall and F1, and the confusion matrix with class names."""
    rep, classes = row["report"], row["classes"]
    width = max(12, max(len(c) for c in classes) + 2)
    lo, hi = row["accuracy_ci95"]
    lines = ["", f"{'class':<{width}}{'precision':>10}{'recall':>9}{'F1':>8}{'support':>9}"]
    lines += [f"{c:<{width}}{rep['precision'][i]:>10.2f}{rep['recall'][i]:>9.2f}{rep['f1'][i]:>8.2f}"
              f"{rep['support'][i]:>9}" for i, c in enumerate(classes)]
    clustered = row["clustered"] or {}
    by = lambda key: f" (by {clustered['by']}: {interval((clustered[key] or {}).get('ci95'))})" if clustered else ""
    lines += [f"accuracy {rep['accuracy']:.2f}% (95% CI {lo:.2f}-{hi:.2f}){by('accuracy')}  balanced accuracy "
              f"{rep['balanced_accuracy']:.2f}%{by('balanced_accuracy')}  macro-F1 {rep['macro_f1']:.2f}%"]
    if rep["absent"]:
        lines.append(f"balanced accuracy and macro-F1 average over the {len(classes) - len(rep['absent'])} classes "
                     f"the tiles have; absent: {', '.join(classes[c] for c in rep['absent'])}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    return lines + matrix_lines([f"{i} {c}" for i, c in enumerate(classes)], rep["confusion"], width)


def matrix_lines(names: list[str], counts: list[list[int]], width: int) -> list[str]:
    """A matrix of counts as text: the columns (classes) numbered, one named row per list of counts."""
    header = " " * width + "".join(f"{i:>6}" for i in range(len(counts[0])))
    return [header] + [f"{name:<{width}}" + "".join(f"{n:>6}" for n in row) for name, row in zip(names, counts)]


def write_predictions_csv(rows, path) -> None:
    """One row per test tile and checkpoint: file, true and predicted class, class probabilities,
    the tile's group (slide or patient) where it is known, and of another lab's tiles their folder
    and the scale rule."""
    classes, external = rows[0]["classes"], rows[0]["data"].get("external")
    grouped = any(r["groups"] for r in rows)
    extra = ["group"] * grouped + ["folder", "scale_rule"] * bool(external)

    def more(r, i):
        group = [r["groups"][i] if r["groups"] else ""] * grouped
        return group + ([r["folders"][i], external["rule"]] if external else [])

    mpkd.write_csv(["checkpoint", "file", *extra, "true", "predicted", *(f"p_{c}" for c in classes)],
                   [[r["checkpoint"], f, *more(r, i), classes[t], classes[p], *pr] for r in rows
                    for i, (f, t, p, pr) in enumerate(zip(r["files"], r["labels"], r["predicted"], r["probs"]))], path)


def speed(model, img_size: int, device: torch.device, precision: str, train_batch: int, repeats: int = 20) -> dict:
    """Batch-1 latency (median ms), inference images/s at mpkd.eval_batch(), and images/s of bare
    training steps (forward, backward, Adam) on a resident batch, with the cross-entropy alone and
    with the KD loss of random teacher logits, taking turns: the floor against which an epoch's
    data overhead is measured, and the cost of the KD term. Works on a copy of `model`."""
    model, big_batch = mpkd.to_device(copy.deepcopy(model), device).eval(), mpkd.eval_batch(device)
    one = mpkd.channels_last(torch.randn(1, 3, img_size, img_size, device=device))
    big = mpkd.channels_last(torch.randn(big_batch, 3, img_size, img_size, device=device))
    with torch.inference_mode(), mpkd.autocast(device, precision):
        latency, = mpkd.median_seconds([lambda: model(one)], device, repeats, warmup=5)
        batch_s, = mpkd.median_seconds([lambda: model(big)], device, max(3, repeats // 4), warmup=2)
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

    ce_s, kd_s = mpkd.median_seconds([lambda: step(0.0), lambda: step(0.5)], device, max(3, repeats // 2), warmup=3)
    return {"latency_ms": 1000 * latency, "throughput": big_batch / batch_s,
            "train_step_images_per_s": train_batch / ce_s, "kd_step_images_per_s": train_batch / kd_s}


# ----------------------------------------------------------------------------------------------
# Another lab's tiles (--external): its class folders, every image a test tile, its folder names
# mapped to the checkpoint's classes and its tiles brought to the checkpoint's scale

EXTERNAL_SETS = {  # test sets --external fetches by name, with the scale and class map they need
    "crc-val-he-7k": {
        "url": "https://zenodo.org/record/1214456/files/CRC-VAL-HE-7K.zip", "md5": "2fd1651b4f94ebd818ebf90ad2b6ce06",
        "page": "https://zenodo.org/record/1214456", "folder": "data/CRC-VAL-HE-7K", "mpp": 0.5,
        # NCT's 9 classes to Kather 2016's 8, why each: docs/generalisation.md; docs/crc-val-he-7k.csv as a file
        "class_map": {"ADI": "07_ADIPOSE", "BACK": "08_EMPTY", "DEB": "05_DEBRIS", "LYM": "04_LYMPHO",
                      "MUC": "05_DEBRIS", "MUS": "02_STROMA", "NORM": "06_MUCOSA", "STR": "02_STROMA",
                      "TUM": "01_TUMOR"}},
}


def find_class(name: str, classes: list[str]) -> int | None:
    """The index of `name` among a model's classes: the same name, else the same class_key
    ('TUMOR' is '01_TUMOR'); None when there is none."""
    if name in classes:
        return classes.index(name)
    keys = [mpkd.class_key(c) for c in classes]
    return keys.index(mpkd.class_key(name)) if keys.count(mpkd.class_key(name)) == 1 else None


def read_class_map(path: str | Path, folders: list[str], classes: list[str]) -> tuple[dict, list[str]]:
    """A class map CSV: rows of (folder of the external set, class of the model), several folders
    to one class allowed; an empty second column leaves a folder out on purpose; a first row naming
    the columns (neither a folder nor a class) is allowed; commas or, as spreadsheets in many
    languages write them, semicolons between the columns. Returns {folder: class or None} as written
    and warnings (rows naming no folder of the set). A class the model lacks, a row that differs
    from a folder only in letter case, and a map naming none of `folders` are errors."""
    path = Path(path)
    if not path.is_file():
        raise mpkd.UserError(f"--class-map {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
        delimiter = ";" if ";" in text and "," not in text else ","
        rows = [[cell.strip() for cell in r] + [""] * (2 - len(r))  # a missing second column: empty
                for r in csv.reader(text.splitlines(), delimiter=delimiter) if any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise mpkd.UserError(f"--class-map {path} is not a readable CSV ({err})") from None
    if rows and rows[0][0] not in folders and rows[0][1] and find_class(rows[0][1], classes) is None:
        rows = rows[1:]  # the header
    mapping, by_case = {}, {f.lower(): f for f in folders}
    for folder, name, *_ in rows:
        if name and find_class(name, classes) is None:
            raise mpkd.UserError(f"--class-map {path} maps {folder} to {name}, which is not a class of the "
                                 f"model; its classes are {', '.join(classes)}")
        if folder not in folders and folder.lower() in by_case:
            raise mpkd.UserError(f"--class-map {path} names {folder}, the folder is {by_case[folder.lower()]}: "
                                 f"folder names must match letter for letter, in upper and lower case too")
        mapping[folder] = classes[find_class(name, classes)] if name else None
    if not set(mapping) & set(folders):
        raise mpkd.UserError(f"--class-map {path} names none of the folders it is for ({', '.join(folders)}); "
                             f"its first column must hold folder names, its rows folder,class")
    return mapping, [f"warning: --class-map {path.name} names {f}, which is not a folder of the set: row ignored"
                     for f in mapping if f not in folders]


def external_folder(external: str) -> tuple[Path, str | None]:
    """The folder --external names, and the named set it is (fetched into data/ on first use)."""
    if external in EXTERNAL_SETS:
        known = EXTERNAL_SETS[external]
        if not Path(known["folder"]).is_dir():
            mpkd.fetch_zip(known["folder"], known["url"], known["md5"], known["page"])
        return Path(known["folder"]), external
    if not Path(external).is_dir():
        raise mpkd.UserError(f"--external {external} is neither a folder of class folders nor a named "
                             f"set ({', '.join(EXTERNAL_SETS)})")
    return Path(external), None


def external_set(external: str, class_map: str | None, image_mpp: float | None, rule: str | None,
                 classes: list[str], skip_unmapped: bool = False) -> dict:
    """The external tiles: files, the folder and mapped class of each, the class map, every folder's
    tiles and how many are scored (none where it is left out), the files passed over, the scale and
    the scale rule that brings the tiles to the checkpoint's scale. A folder the class map does not
    name is refused unless `skip_unmapped`: a note is easily missed, and every tile left out
    changes the denominator."""
    root, name = external_folder(external)
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not mpkd.ignored(d.name))
    if not folders:
        raise mpkd.UserError(f"--external {root} holds no class folders (<folder>/<image>)")
    known, warnings = EXTERNAL_SETS.get(name, {}), []
    as_named = {f: classes[i] for f in folders if (i := find_class(f, classes)) is not None}
    if class_map:
        (mapping, warnings), source = read_class_map(class_map, folders, classes), str(class_map)
    elif known and len(as_named) < len(folders):  # a model of other classes than the set's own
        mapping, source = dict(known["class_map"]), f"{name}'s map to Kather 2016 (docs/crc-val-he-7k.csv)"
        if lacking := sorted({c for c in mapping.values() if find_class(c, classes) is None}):
            raise mpkd.UserError(f"the checkpoint's classes ({', '.join(classes)}) are neither {name}'s nor "
                                 f"Kather 2016's ({', '.join(lacking)} missing): pass --class-map FILE.csv")
        mapping = {f: classes[find_class(c, classes)] for f, c in mapping.items()}
    else:
        if others := [f for f in folders if f not in as_named]:
            raise mpkd.UserError(f"folders {', '.join(others)} of {root} are not classes of the checkpoint "
                                 f"({', '.join(classes)}): pass --class-map FILE.csv, rows of folder,class")
        mapping, source = as_named, "folder names"
    unmapped = [f for f in folders if f not in mapping]
    if unmapped and not skip_unmapped:
        strays = [f for f in mapping if f not in folders]  # a typo, often: MUCUS for MUC
        which = "which is not a folder" if len(strays) == 1 else "which are not folders"
        raise mpkd.UserError(f"the class map ({source}) does not name the folders {', '.join(unmapped)} of {root}"
                             + (f" (it names {', '.join(strays)}, {which})" if strays else "")
                             + ": map them (an empty class leaves a folder out on purpose), or pass "
                               "--skip-unmapped to score without their tiles")
    held = {f: mpkd.list_images(root / f) for f in folders}
    used = [f for f in folders if mapping.get(f)]
    if not used:
        raise mpkd.UserError(f"nothing in {root} is mapped to a class of the checkpoint: its folders are "
                             f"{', '.join(folders)}, the classes {', '.join(classes)}; map some in --class-map")
    if empty := [f for f in used if not held[f]]:
        raise mpkd.UserError(f"class folder {root / empty[0]} holds no images ({' '.join(mpkd.IMAGE_SUFFIXES)})")
    files = [f"{f}/{x}" for f in used for x in held[f]]
    folder_of = [f for f in used for _ in held[f]]
    mpp = image_mpp or known.get("mpp")
    everything = [p for p in root.rglob("*") if not mpkd.ignored(p.relative_to(root))]
    return {"folder": str(root), "name": name, "files": files, "folders": folder_of,
            "labels": [classes.index(mapping[f]) for f in folder_of], "classes": classes,
            "class_map": {f: mapping.get(f) for f in folders}, "class_map_from": source,
            "skipped": [f for f in folders if not mapping.get(f)], "unmapped": unmapped,
            "tiles": {f: {"held": len(held[f]), "scored": len(held[f]) if mapping.get(f) else 0} for f in folders},
            "other_files": sum(p.is_file() and p.suffix.lower() not in mpkd.IMAGE_SUFFIXES for p in everything),
            "empty_folders": sum(p.is_dir() and not any(p.iterdir()) for p in everything),
            "image_mpp": mpp, "mpp_from": "--image-mpp" if image_mpp else f"{name}'s scale" if mpp else None,
            "rule": mpkd.scale_rule(rule, mpp), "warnings": warnings}


def denominator(ext: dict) -> str:
    """What the external tiles' figures are over, where folders were left out: ' (2 tiles of MUC
    left out)'."""
    out = [f"{t['held']} tile{'s' if t['held'] != 1 else ''} of {f}"
           for f, t in ext["tiles"].items() if not t["scored"]]
    return f" ({', '.join(out)} left out)" if out else ""


def external_views(ext: dict, ckpt: dict, path, tile_um: float | None, target: dict | None, cache: dict):
    """The external tiles as the checkpoint's inputs (grouped by shape, mpkd.decode_views), decoded
    once per image size and field of view (the checkpoint's, or `tile_um`), restained to `target`
    once per stain target; an unreadable tile stops the run before any scoring."""
    size, tile_um = ckpt["identity"]["img_size"], tile_um or ckpt["tile"]["um"]
    key = (size, tile_um if ext["rule"] != "resize" else None)
    if key not in cache:
        groups, bad = mpkd.decode_views(ext["folder"], ext["files"], size, ext["rule"], ext["image_mpp"], tile_um,
                                        mpkd.Progress(len(ext["files"]), "tiles", print, label="decoded "))
        if bad:
            raise mpkd.UserError(f"{len(bad)} of {len(ext['files'])} tiles under {ext['folder']} do not decode: "
                                 f"{mpkd.first_few([f'{f} ({why})' for f, why in bad.items()])}; remove or "
                                 f"replace them")
        cache[key] = groups
    if target is None:
        return cache[key], {"tile_um": tile_um}
    stained = (key, json.dumps(target))
    if stained not in cache:
        cache[stained] = mpkd.stain_normalised(cache[key], target, ext["stain_norm"])
    return cache[stained][0], {"tile_um": tile_um, **cache[stained][1]}


def evaluate_external(path, ext: dict, device: torch.device, precision: str, cache: dict) -> dict:
    """One row of the table on the external tiles (their mapped classes as the truth), with the
    confusion of the set's folders (rows) against the checkpoint's classes."""
    ckpt = mpkd.load_checkpoint(path)
    if ckpt["identity"]["classes"] != ext["classes"]:
        raise mpkd.UserError(f"{path} has other classes than {ext['first']}: score checkpoints of one class "
                             f"list at a time")
    target = mpkd.stain_target(ext["stain_norm"], ext["stain_ref"], ckpt["stain"], path)
    groups, how = external_views(ext, ckpt, path, ext["tile_um"], target, cache)
    model = mpkd.to_device(mpkd.load_model(ckpt, path), device)
    views = sum(len(o) for _, o in groups)
    logits = mpkd.view_logits(lambda x: mpkd.predict(model, x.to(device), precision).cpu(), groups, len(ext["files"]),
                              progress=mpkd.Progress(views, "views", print, label=f"{Path(str(path)).name}: "))
    settings = {k: ext[k] for k in ("folder", "name", "class_map", "class_map_from", "skipped", "unmapped", "tiles",
                                    "other_files", "empty_folders", "image_mpp", "mpp_from", "rule", "group_by")}
    settings.update(how, views=views, stain_norm=ext["stain_norm"])
    row = score_row(path, ckpt, model, logits, ext["labels"], ext["files"],
                    {"external": settings, **ckpt["identity"], "folder": ext["folder"]},
                    [ext["folder"], mpkd.tiles_fingerprint(ext["files"], ext["labels"]), ext["rule"], ext["stain_norm"],
                     ext["stain_ref"]], ext["groups"], ext["group_by"])
    folders = sorted(set(ext["folders"]))
    confusion = np.zeros((len(folders), len(ext["classes"])), np.int64)
    np.add.at(confusion, ([folders.index(f) for f in ext["folders"]], row["predicted"]), 1)
    row.update(precision=precision, folders=ext["folders"],
               folder_confusion={"folders": folders, "counts": confusion.tolist()})
    return row


def score_external(args, device: torch.device, precision: str) -> list[dict]:
    """--external: every checkpoint's row on the external tiles, all read the same way."""
    first, ckpt = args.checkpoints[0], mpkd.load_checkpoint(args.checkpoints[0])
    ext = external_set(args.external, args.class_map, args.image_mpp, args.scale_rule, ckpt["identity"]["classes"],
                       args.skip_unmapped)
    ext.update(first=first, stain_norm=args.stain_norm, stain_ref=args.stain_ref, tile_um=args.tile_um)
    if args.external_groups:  # the groups the tiles come from: clustered intervals
        groups, _, more = mpkd.read_groups(args.external_groups, ext["files"], "--external-groups")
        ext.update(groups=groups, group_by="group", warnings=ext["warnings"] + more)
    else:
        ext.update(zip(("groups", "group_by"), tile_groups(ext["files"], None, None)))
    for line in ext["warnings"]:
        print(line if line.startswith("warning") else f"warning: {line}", file=sys.stderr)
    views, words = mpkd.tile_plan(Path(ext["folder"]) / ext["files"][0], ckpt["identity"]["img_size"], ext["rule"],
                                  ext["image_mpp"], args.tile_um or ckpt["tile"]["um"])
    mpkd.check_scale(args.image_mpp, args.any_mpp, words)
    if views > mpkd.MANY_VIEWS:
        print(f"note: {words}: about {views * len(ext['files'])} views of {len(ext['files'])} tiles to read and score")
    cache = {}  # the tiles decoded once per image size and field of view
    return [evaluate_external(path, ext, device, precision, cache) for path in args.checkpoints]


def external_lines(rows) -> list[str]:
    """How the external tiles were read and mapped, and with one checkpoint its folders' confusion
    with the classes."""
    row = rows[0]
    ext = row["data"]["external"]
    scale = (f"{ext['image_mpp']:g} um/px ({ext['mpp_from']})" if ext["image_mpp"] else
             "unknown (no --image-mpp): each tile resized whole, as the training tiles were")
    lines = ["", f"external tiles: {ext['folder']}" + (f" (the named set {ext['name']})" if ext["name"] else ""),
             f"  scale {scale}; {mpkd.rule_line(ext['rule'], ext['views'], row['n_test'])}",
             f"  class map ({ext['class_map_from']}): " + ", ".join(f"{f} -> {c or 'skipped'}"
                                                                   for f, c in ext["class_map"].items())]
    if ext["stain_norm"]:
        lines.append(f"  stain normalised ({ext['stain_norm']}) to {ext['stain_target_from']}"
                     + (f"; {ext['stain_unchanged']} views with too little tissue left as they were"
                        if ext.get("stain_unchanged") else ""))
    width = max(12, *(len(f) + 2 for f in ext["tiles"]))
    lines += [f"  {'folder':<{width}}{'tiles':>7}{'scored':>8}  as"]
    lines += [f"  {f:<{width}}{t['held']:>7}{t['scored']:>8}  " + (ext["class_map"][f] or (
              "left out: not in the class map (--skip-unmapped)" if f in ext["unmapped"] else "left out: mapped to "
              "nothing")) for f, t in ext["tiles"].items()]
    held = sum(t["held"] for t in ext["tiles"].values())
    passed = [f"{n} {one if n == 1 else more}" for n, one, more in (
        (ext["other_files"], "file that is not an image", "files that are not images"),
        (ext["empty_folders"], "empty folder", "empty folders")) if n]
    lines.append(f"  scored {row['n_test']} of the {held} tiles in {len(ext['tiles'])} folders"
                 + (f"; passed over: {', '.join(passed)}" if passed else ""))
    if len(rows) > 1:
        return lines
    folders, counts = row["folder_confusion"]["folders"], row["folder_confusion"]["counts"]
    lines += ["", "external folders (rows) against the checkpoint's classes (columns)"]
    return lines + matrix_lines(folders, counts, max(12, max(len(f) for f in folders) + 2))


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


def plot_learning_curves(plt, rows, path) -> None:
    """Training loss, validation accuracy and the stored teacher epoch followed, per epoch: one
    colour per Table II row, thin lines per seed and a bold mean where a row has several."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    titles = ("training loss\n(with KD: (1-w) CE + w T² KL, not comparable with CE alone)",
              "validation accuracy (%)", "teacher epoch followed (KD target)")
    keys = ("loss", "val_acc", "teacher_epoch")
    groups = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    for method, mine in groups.items():
        colour = ROW_COLOURS[mine[0]["method_key"]]  # one method key per method name
        for ax, key in zip(axes, keys):
            curves = [c for c in ([(h["epoch"], h[key]) for h in r["history"] if key in h] for r in mine) if c]
            if not curves:
                continue
            if key == "teacher_epoch":
                ax.yaxis.get_major_locator().set_params(integer=True)
            draw, kw = (ax.step, {"where": "mid"}) if key == "teacher_epoch" else (ax.plot, {})
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
    for i, j in np.ndindex(cm.shape):  # (folders or true classes, predicted classes)
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


def error_caption(row: dict, i: int) -> str:
    """The caption of tile i in the error grid: its true class (and, of another lab's tiles, its
    own folder), the class predicted and its probability."""
    classes, predicted = row["classes"], row["predicted"][i]
    folder = f" ({row['folders'][i]})" if row.get("folders") else ""
    return f"true {classes[row['labels'][i]]}{folder}\npred {classes[predicted]} ({row['probs'][i][predicted]:.2f})"


def plot_errors(plt, row, root, path, most: int = 48) -> None:
    """The misclassified test tiles, most confident mistakes first, from the original image files."""
    wrong = sorted((i for i, ok in enumerate(row["outcomes"]) if not ok),
                   key=lambda i: -row["probs"][i][row["predicted"][i]])[:most]
    cols = 8
    nrows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(2.0 * cols, 2.35 * nrows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        with Image.open(Path(root) / row["files"][i]) as img:
            img = img.convert("RGB")
            img.thumbnail((256, 256))
            ax.imshow(np.asarray(img))
        ax.set_title(error_caption(row, i), fontsize=7)
    shown = f"{len(wrong)} most confident of {row['n_test'] - row['correct']}" if wrong else "none"
    fig.suptitle(f"misclassified test tiles, {row['method']} {row['checkpoint']}: {shown}", fontsize=10)
    _finish(plt, fig, path, dpi=100)


def plot_table2(plt, rows, summary, path) -> None:
    """Test accuracy per Table II row: one dot per seed, the mean and its 95% interval (t-interval
    across seeds; the Wilson interval over the test tiles where a row has one run)."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(summary), 4.2))
    for x, s in enumerate(summary):
        mine = [r for r in rows if (r["method"], r["network"]) == (s["method"], s["network"])]
        accs, colour = [r["accuracy"] for r in mine], ROW_COLOURS[mine[0]["method_key"]]
        jitter = np.linspace(-0.12, 0.12, len(accs)) if len(accs) > 1 else [0.0]
        ax.scatter(x + np.asarray(jitter), accs, color=colour, alpha=0.6, s=22, zorder=3)
        lo, hi = s["accuracy_ci95"] if s["n"] > 1 else mine[0]["accuracy_ci95"]
        below, above = max(0.0, s["accuracy_mean"] - lo), max(0.0, hi - s["accuracy_mean"])  # 100%: rounding
        ax.errorbar(x + 0.28, s["accuracy_mean"], yerr=[[below], [above]],
                    fmt="D", color=colour, capsize=4, ms=6, zorder=4)
    ax.set_xticks(range(len(summary)), [f"{s['method']}\n{s['network']} (n={s['n']})" for s in summary], fontsize=8)
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
        tag = f"{i + 1:02d}_{Path(r['checkpoint']).stem}"  # short and unique: 03_mpkd
        written += [folder / f"confusion_{tag}.png", folder / f"errors_{tag}.png"]
        plot_confusion(plt, r, written[-2])
        plot_errors(plt, r, r["data"]["folder"], written[-1])
        if any(h.get("route") for h in r["history"]):
            written.append(folder / f"route_{tag}.png")
            plot_route(plt, r, written[-1])
    return written


# ----------------------------------------------------------------------------------------------


def main(args):
    check_args(args)
    device = mpkd.pick_device(args.device)
    precision = mpkd.pick_precision(device, args.amp)
    plt = import_pyplot() if args.plots else None  # None: the report first, then the one-line error
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        mpkd.check_writable(Path(args.plots) / "table2.png")
    mpkd.check_writable(*(p for p in (args.json, args.predictions) if p))
    if args.external:
        rows = score_external(args, device, precision)
    else:
        cache = {}  # test tiles decoded once per data folder, split and image size
        rows = [evaluate_checkpoint(path, args.data, args.groups, device, precision, cache, args.benchmark)
                for path in args.checkpoints]
    summary, paired, tests = summarise(rows), paired_difference(rows), mcnemar_pairs(rows)
    lines = table_lines(rows, summary, paired, tests)
    if len(rows) == 1:
        lines += report_lines(rows[0])
    if args.external:
        lines += external_lines(rows)
    print("\n".join(lines))
    if args.json:
        report = {"checkpoints": [{k: v for k, v in r.items() if k not in NOT_IN_JSON} for r in rows],
                  "summary": summary, "paired": paired, "mcnemar": tests}
        mpkd.write_text_atomic(json.dumps(report, indent=1), args.json)
    if args.predictions:
        write_predictions_csv(rows, args.predictions)
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
