"""The int8 figures of docs/deploy.md: for each checkpoint given, what `evaluate.py CKPT --export
X.int8.onnx --int8` measures before it writes (or refuses) the file: top-1 agreement with the fp32
network and both accuracies on the checkpoint's test tiles, the largest probability difference,
the fp32 network's own agreement when pixels move by one grey level, and the int8 file's size;
with --external DIR also the top-1 agreement on another lab's tiles (every image under DIR, resized
whole to the network's input), unseen in training and calibration. Nothing is written.

    python docs/int8-students.py five/*.pt generalisation/plain-seed*/*.pt \\
        --external ../shared/data/crc_val_he_7k_samples
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
import mpkd  # noqa: E402


def measure(path: str, external: str | None) -> dict:
    import onnxruntime as ort
    args = evaluate.get_args([path, "--device", "cpu"])
    ckpt = evaluate.load_checkpoint(path)
    data, part = evaluate.test_part(ckpt, path, args, torch.device("cpu"), {})
    fp32 = evaluate.checked_onnx(ckpt, path, mpkd.load_model(ckpt, path).eval(), part)
    size = fp32["size"]
    calibration, _ = evaluate.calibration_tiles(data, size)
    blob = evaluate.quantise(evaluate.int8_network(fp32["wrapper"].model, size), size, calibration).SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    row = {"checkpoint": path, "method": ckpt["method"], "bytes": len(blob), "fp32_bytes": fp32["bytes"],
           **evaluate.int8_figures(session, fp32["wrapper"], fp32["expected"], part["labels"].numpy(),
                                   evaluate.tiles_nhwc(part["images"]))}
    row["passes"] = (row["agreement"] >= evaluate.INT8_AGREEMENT
                     and abs(row["accuracy_int8"] - row["accuracy_fp32"]) <= evaluate.INT8_ACCURACY_POINTS)
    if external:
        files = mpkd.list_images(Path(external))
        tiles = evaluate.tiles_nhwc(mpkd.load_images(external, files, size))
        a = evaluate.session_probabilities(session, tiles).argmax(1)
        b = evaluate.reference_probabilities(fp32["wrapper"], tiles).argmax(1)
        row["external"] = f"{int((a == b).sum())} of {len(files)}"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--external", default=None)
    args = p.parse_args()
    print("| checkpoint | method | test tiles | fp32 accuracy | int8 accuracy | top-1 agreement | largest "
          "difference | fp32 under one grey level | another lab's tiles, same class | int8 MB | gate |")
    print("| --- " * 11 + "|")
    for path in args.checkpoints:
        r = measure(path, args.external)
        print(f"| {path} | {r['method']} | {r['tiles']} | {r['accuracy_fp32']:.2f}% | {r['accuracy_int8']:.2f}% | "
              f"{100 * r['agreement']:.2f}% | {r['max_abs_diff']:.3f} | {100 * r['fp32_one_grey_level']:.2f}% | "
              f"{r.get('external', '-')} | {r['bytes'] / 1e6:.2f} | {'written' if r['passes'] else 'refused'} |",
              flush=True)


if __name__ == "__main__":
    main()
