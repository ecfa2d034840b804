"""Evaluate checkpoints on their test split and print them in the shape of the paper's Table II.

    python evaluate.py teacher.pt alone.pt vanilla.pt student.pt
    python evaluate.py student.pt --predictions student_predictions.csv   # + per-class report
    python evaluate.py teacher.pt student.pt --benchmark                   # + latency and throughput
    python evaluate.py runs/seed*/{teacher,alone,vanilla,mpkd}.pt          # several seeds: mean +- std

Each checkpoint carries its network, classes, image size and split settings, so only --data is
needed; a checkpoint whose classes or training files do not match --data is refused.
"""

import argparse
import copy
import csv
import io
import json
import sys
import time

import numpy as np
import torch

import mpkd


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoints written by train_teacher.py or distill.py")
    p.add_argument("--data", default=mpkd.DEFAULT_DATA,
                   help="folder of class folders the checkpoints were trained on")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (no-op on CPU)")
    p.add_argument("--json", default=None, help="also write every number printed to this JSON file")
    p.add_argument("--predictions", default=None,
                   help="write one CSV row per test image and checkpoint to this file")
    p.add_argument("--benchmark", action="store_true",
                   help="measure batch-1 latency and large-batch throughput")
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
        "accuracy": 100 * tp.sum() / max(cm.sum(), 1),
        "balanced_accuracy": 100 * recall[support > 0].mean() if support.any() else 0.0,
        "macro_f1": 100 * f1.mean(),
        "precision": (100 * precision).tolist(), "recall": (100 * recall).tolist(), "f1": (100 * f1).tolist(),
        "support": support.tolist(), "confusion": cm.tolist(),
    }



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


def benchmark(model, img_size: int, device: torch.device, amp: bool, train_batch: int,
              repeats: int = 20) -> dict:
    """Batch-1 latency (median ms), inference images/s at mpkd.eval_batch(), and images/s of bare
    training steps (forward, backward, Adam) on a resident batch, with the cross-entropy alone and
    with the KD loss of random teacher logits, taking turns: the floor against which an epoch's
    data overhead is measured, and the cost of the KD term. Works on a copy of `model`."""
    model, big_batch = mpkd.to_device(copy.deepcopy(model), device).eval(), mpkd.eval_batch(device)
    one = mpkd.channels_last(torch.randn(1, 3, img_size, img_size, device=device))
    big = mpkd.channels_last(torch.randn(big_batch, 3, img_size, img_size, device=device))
    with torch.inference_mode(), mpkd.autocast(device, amp):
        latency, = _median_seconds([lambda: model(one)], device, repeats, warmup=5)
        batch_s, = _median_seconds([lambda: model(big)], device, max(3, repeats // 4), warmup=2)
        num_classes = model(one).shape[1]
    x = mpkd.channels_last(torch.randn(train_batch, 3, img_size, img_size, device=device))
    y = torch.randint(0, num_classes, (train_batch,), device=device)
    teacher = torch.randn(train_batch, num_classes, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    model.train()

    def step(distill_weight):
        with mpkd.autocast(device, amp):
            logits = model(x)
        loss = mpkd.kd_loss(logits, teacher, y, 5.0, distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ce_s, kd_s = _median_seconds([lambda: step(0.0), lambda: step(0.5)], device, max(3, repeats // 2),
                                 warmup=3)
    return {"latency_ms": 1000 * latency, "throughput": big_batch / batch_s,
            "train_step_images_per_s": train_batch / ce_s, "kd_step_images_per_s": train_batch / kd_s}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Group evaluated checkpoints by (method, network): n, mean and std of accuracy, in Table II order."""
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["network"]), []).append(row)
    rank = {method: i for i, method in enumerate(mpkd.METHODS)}  # Table II's order, others after
    order = sorted(groups, key=lambda k: (rank.get(k[0], len(rank)), k[1]))
    out = []
    for method, net in order:
        accs = [r["accuracy"] for r in groups[(method, net)]]
        mean, std = _mean_std(accs)
        first = groups[(method, net)][0]
        out.append({"method": method, "network": net, "n": len(accs), "accuracy_mean": mean,
                    "accuracy_std": std, "params_m": first["params_m"], "size_mb": first["size_mb"]})
    return out


def paired_difference(rows: list[dict], a: str = "Multi-Part KD", b: str = "vanilla KD") -> dict | None:
    """Per-seed accuracy difference a - b, paired on (seed, split): the diffs, their mean and std."""
    def by_key(method):
        found = {}
        for r in rows:
            if r["method"] == method:
                found.setdefault(tuple(r["pair_key"]), []).append(r["accuracy"])
        return {k: v[0] for k, v in found.items() if len(v) == 1}

    left, right = by_key(a), by_key(b)
    keys = sorted(set(left) & set(right))
    if not keys:
        return None
    diffs = [left[k] - right[k] for k in keys]
    mean, std = _mean_std(diffs)
    return {"a": a, "b": b, "seeds": [k[0] for k in keys], "diffs": diffs, "mean": mean, "std": std}


# ----------------------------------------------------------------------------------------------
# Evaluation


def test_part(ckpt, path, args, device, cache):
    """The checkpoint's test images, decoded once per split and image size."""
    ident = ckpt["identity"]
    key = tuple(ident[k] for k in ("img_size", "split_by", "split_seed", "test_frac", "val_frac"))
    if key not in cache:
        data = mpkd.load_dataset(args.data, *key)
        cache[key] = (data, mpkd.load_part(data, "test", device))
    data, part = cache[key]
    differ = mpkd.mismatches(ident, data["identity"])
    if differ:
        raise mpkd.UserError(f"{path} does not belong to --data {args.data} ({'; '.join(differ)})")
    return part


def evaluate_checkpoint(path, args, device, cache):
    """One row of the table: method, network, test accuracy, size, per-class report, probabilities."""
    ckpt = mpkd.load_file(path, mpkd.CHECKPOINT_FORMAT)
    if ckpt["method"] == "student":  # checkpoints written before Table II's row name was used
        ckpt["method"] = "student alone"
    part = test_part(ckpt, path, args, device, cache)
    model = mpkd.to_device(mpkd.load_model(ckpt, path), device)
    logits = mpkd.predict(model, part["images"], args.amp)
    classes = ckpt["identity"]["classes"]
    report = classification_report(part["labels"].tolist(), logits.argmax(1).tolist(), len(classes))
    row = {"checkpoint": str(path), "method": ckpt["method"], "network": mpkd.network_name(ckpt["model"]),
           "seed": ckpt["args"]["seed"], "accuracy": report["accuracy"],
           "params_m": mpkd.count_params(model) / 1e6, "size_mb": mpkd.model_size_mb(model),
           "classes": classes, "report": report,
           "pair_key": [ckpt["args"]["seed"], ckpt["identity"]["train_fingerprint"]]}
    if args.benchmark:
        row["benchmark"] = benchmark(model, ckpt["identity"]["img_size"], device, args.amp,
                                     ckpt["args"]["batch_size"])
    probs = torch.softmax(logits, 1).cpu().tolist()
    return row, [[str(path), f, classes[t], classes[p], *pr]
                 for f, t, p, pr in zip(part["files"], part["labels"].tolist(), logits.argmax(1).tolist(),
                                        probs)]


def table_lines(rows, summary, paired):
    """Table II, per checkpoint; then mean +- std per method where there are several seeds."""
    bench = all("benchmark" in r for r in rows)
    head = f"{'Method':<15}{'Network':<10}{'Acc (%)':>9}{'Params (M)':>12}{'Size (MB)':>11}"
    head += f"{'Latency (ms)':>14}{'Img/s':>10}{'Train img/s':>13}{'KD/CE':>7}" if bench else ""
    lines = [head + "  Checkpoint"]
    for r in rows:
        line = (f"{r['method']:<15}{r['network']:<10}{r['accuracy']:>9.2f}{r['params_m']:>12.2f}"
                f"{r['size_mb']:>11.3f}")
        if bench:
            b = r["benchmark"]
            line += (f"{b['latency_ms']:>14.2f}{b['throughput']:>10.1f}{b['train_step_images_per_s']:>13.1f}"
                     f"{b['kd_step_images_per_s'] / b['train_step_images_per_s']:>7.3f}")
        lines.append(line + f"  {r['checkpoint']}")
    if any(s["n"] > 1 for s in summary):
        lines += ["", f"{'Method':<15}{'Network':<10}{'Acc (%) mean +- std':>22}{'n':>4}{'Params (M)':>12}"
                      f"{'Size (MB)':>11}"]
        lines += [f"{s['method']:<15}{s['network']:<10}{s['accuracy_mean']:>13.2f} +- {s['accuracy_std']:<5.2f}"
                  f"{s['n']:>4}{s['params_m']:>12.2f}{s['size_mb']:>11.3f}" for s in summary]
    if paired:
        lines += ["", f"{paired['a']} - {paired['b']}, paired by seed {paired['seeds']}: "
                      f"{' '.join(f'{d:+.2f}' for d in paired['diffs'])} -> mean {paired['mean']:+.2f} "
                      f"+- {paired['std']:.2f} points"]
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
    lines = ["", f"{'class':<{width}}{'precision':>10}{'recall':>9}{'F1':>8}{'support':>9}"]
    lines += [f"{c:<{width}}{rep['precision'][i]:>10.2f}{rep['recall'][i]:>9.2f}{rep['f1'][i]:>8.2f}"
              f"{rep['support'][i]:>9}" for i, c in enumerate(classes)]
    lines += [f"accuracy {rep['accuracy']:.2f}%  balanced accuracy {rep['balanced_accuracy']:.2f}%  "
              f"macro-F1 {rep['macro_f1']:.2f}%", "", "confusion matrix (rows: true, columns: predicted)"]
    lines.append(" " * width + "".join(f"{i:>6}" for i in range(len(classes))))
    lines += [f"{f'{i} {c}':<{width}}" + "".join(f"{n:>6}" for n in counts)
              for i, (c, counts) in enumerate(zip(classes, rep["confusion"]))]
    return lines


def main(args):
    device = mpkd.pick_device(args.device)
    for path in (p for p in (args.json, args.predictions) if p):
        mpkd.check_writable(path)
    cache, rows, predictions = {}, [], []
    for path in args.checkpoints:
        row, preds = evaluate_checkpoint(path, args, device, cache)
        rows.append(row)
        predictions += preds
    summary, paired = summarise(rows), paired_difference(rows)
    lines = table_lines(rows, summary, paired)
    if len(rows) == 1:
        lines += report_lines(rows[0])
    print("\n".join(lines))
    if args.json:
        report = {"checkpoints": rows, "summary": summary, "paired": paired}
        mpkd.write_text_atomic(json.dumps(report, indent=1), args.json)
    if args.predictions:
        buf = io.StringIO()
        writer = csv.writer(buf)
        classes = rows[0]["classes"]
        writer.writerow(["checkpoint", "file", "true", "predicted", *(f"p_{c}" for c in classes)])
        writer.writerows(predictions)
        mpkd.write_text_atomic(buf.getvalue(), args.predictions)
    return rows


if __name__ == "__main__":
    try:
        main(get_args())
    except mpkd.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
