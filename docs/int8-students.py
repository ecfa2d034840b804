"""The int8 figures of docs/deploy.md: for each checkpoint given, what `export.py CKPT --int8`
measures before it writes (or refuses) the file: top-1 agreement with the fp32
network and both accuracies on the checkpoint's test tiles, the largest probability difference,
the fp32 network's own agreement when pixels move by one grey level, and the int8 file's size;
also the same file's agreement computed operator by operator in float (graph optimisation off:
no fused int8 kernels), which tells the 8-bit arithmetic apart from the kernels that run it; and
the fp32 file's agreement in OpenVINO at its default precision (bf16 on CPUs that have it; named)
and the int8 file's in OpenCV DNN (with how many classes it predicts);
with --external DIR also the top-1 agreement on another lab's tiles (every image under DIR, resized
whole to the network's input), unseen in training and calibration. Nothing is written.
With --speed instead: the sizes of MixNet-S and MixNet-L files at 112 px and the int8 benchmark
of `export.py --int8 --benchmark` (int8_benchmark), on untrained networks whose BatchNorm
statistics are drawn at random (speed and size do not depend on the weights).

    python docs/int8-students.py five/{teacher,alone,student}.pt \\
        generalisation/{plain,augmented}-seed*/{teacher,alone,vanilla,mpkd}.pt \\
        --external ../shared/data/crc_val_he_7k_samples
    python docs/int8-students.py --speed 2
"""

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import export  # noqa: E402
import mpkd  # noqa: E402


def measure(path: str, external: str | None) -> dict:
    import onnxruntime as ort
    ckpt = mpkd.load_checkpoint(path)
    data, part = mpkd.load_test_split(ckpt, path, None, None, torch.device("cpu"), {})
    fp32 = export.checked_onnx(ckpt, path, mpkd.load_model(ckpt, path).eval(), part)
    size, test = fp32["size"], export.tiles_nhwc(part["images"])
    calibration, _ = export.calibration_tiles(data, size)
    network = export.Deployable(export.for_export(fp32["wrapper"].model)).eval()
    blob = export.quantise(network, size, calibration).SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    method = mpkd.method_name(ckpt["method"], ckpt.get("ensemble"), ckpt["args"].get("stain_augment"))
    row = {"checkpoint": path, "method": method, "bytes": len(blob), "fp32_bytes": fp32["bytes"],
           **export.int8_figures(session, fp32["wrapper"], fp32["expected"], part["labels"].numpy(), test)}
    options = ort.SessionOptions()  # the same file, each operator computed in float: what it specifies
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    graph = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    row["graph_agreement"] = float((export.probabilities(graph, test).argmax(1)
                                    == fp32["expected"].argmax(1)).mean())
    row["passes"] = (row["agreement"] >= export.INT8_AGREEMENT
                     and abs(row["accuracy_int8"] - row["accuracy_fp32"]) <= export.INT8_ACCURACY_POINTS)
    for name, compiled in export.openvino_models({"fp32": fp32["blob"]}).items():  # {} without OpenVINO
        if "default precision" in name:  # named "... default precision (bf16)": the precision it chose
            got = export.probabilities(compiled, test, 64).argmax(1)
            row["openvino"] = f"{100 * (got == fp32['expected'].argmax(1)).mean():.2f}% {name[name.index('('):]}"
    with contextlib.suppress(ImportError), tempfile.TemporaryDirectory() as tmp:
        import cv2
        (Path(tmp) / "int8.onnx").write_bytes(blob)
        net = cv2.dnn.readNetFromONNX(str(Path(tmp) / "int8.onnx"))
        net.setInput(test)
        got = net.forward("probabilities").argmax(1)
        n = len(set(got.tolist()))
        row["opencv"] = f"{100 * (got == fp32['expected'].argmax(1)).mean():.2f}% ({n} class{'es' * (n > 1)})"
    if external:
        files = mpkd.list_images(Path(external))
        tiles = export.tiles_nhwc(mpkd.load_images(external, files, size))
        a = export.probabilities(session, tiles).argmax(1)
        b = export.probabilities(fp32["wrapper"], tiles).argmax(1)
        row["external"] = f"{int((a == b).sum())} of {len(files)}"
    return row


def untrained(name: str) -> torch.nn.Module:
    """An untrained network whose BatchNorm statistics are drawn away from (0, 1), so that biases
    are stored as a trained network's are (size and speed do not depend on the weights)."""
    torch.manual_seed(0)
    model = mpkd.build_mixnet(name, 8, pretrained=False).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_(), bn.bias.normal_()
    return model


def speed(rounds: int, size: int = 112) -> None:
    import onnxruntime as ort
    tiles = np.random.default_rng(0).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    for name in ("mixnet_s", "mixnet_l"):
        model = untrained(name)
        fp32 = export._onnx_bytes(export.Deployable(export.for_export(model)).eval(), size)
        int8 = export.quantise(export.Deployable(export.for_export(model)).eval(), size, tiles).SerializeToString()
        print(f"{name}, {size} px: fp32 file {len(fp32) / 1e6:.3f} MB, int8 file {len(int8) / 1e6:.3f} MB", flush=True)
        if name != "mixnet_s":
            continue
        session = lambda blob: ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        exported = {"fp32": {"session": session(fp32), "blob": fp32, "expected": export.probabilities(
            export.Deployable(model).eval(), tiles)}, "session": session(int8), "blob": int8, "size": size}
        for r in range(rounds):
            b = export.int8_benchmark(exported, {"images": torch.from_numpy(tiles).permute(0, 3, 1, 2)})
            base = b["ONNX Runtime fp32 file"]["throughput"]
            for run, f in b.items():
                print(f"round {r + 1}: {run:<44} batch-1 {f['latency_ms']:6.2f} ms, {f['throughput']:7.1f} img/s "
                      f"at batch 64 ({f['throughput'] / base:.2f}x)", flush=True)


def passes(rounds: int, size: int = 112) -> None:
    """What each of the int8 file's graph passes buys: the untrained MixNet-S's int8 file made with
    every pass and with each one left out, its size and its throughput at batch 64 against the fp32
    file in ONNX Runtime, all files taking turns (blocks_taking_turns, `rounds` rounds)."""
    import onnxruntime as ort
    tiles = np.random.default_rng(0).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    model = untrained("mixnet_s")
    left_out = {"every pass": {}, "without GlobalAveragePool": {"global_pools": lambda proto: proto},
                "without depthwise channels in sixteens": {"pad_depthwise": lambda proto: None},
                "without leaving out zeros": {"compact_weights": lambda proto: None}}
    files = {"fp32 file": export._onnx_bytes(export.Deployable(export.for_export(model)).eval(), size)}
    for label, patch in left_out.items():
        kept = {k: getattr(export, k) for k in patch}
        for k, v in patch.items():
            setattr(export, k, v)
        try:
            network = export.Deployable(export.for_export(model)).eval()
            files[label] = export.quantise(network, size, tiles).SerializeToString()
        finally:
            for k, v in kept.items():
                setattr(export, k, v)
    sessions = {label: ort.InferenceSession(blob, providers=["CPUExecutionProvider"]) for label, blob in files.items()}
    runs = {label: (lambda s=s: s.run(["probabilities"], {"images": tiles})) for label, s in sessions.items()}
    seconds = export.blocks_taking_turns(runs, 64, 20, rounds)
    outputs = {label: s.run(["logits"], {"images": tiles})[0] for label, s in sessions.items()}
    print(f"CPU: {export.cpu_features()}; MixNet-S, {size} px, batch 64, {rounds} rounds taking turns\n")
    print("| file | MB | img/s | against the fp32 file | logits the same as with every pass |")
    print("| --- | --- | --- | --- | --- |")
    for label in files:
        same = "-" if label == "fp32 file" else "yes" if np.array_equal(outputs[label], outputs["every pass"]) else \
            f"largest difference {np.abs(outputs[label] - outputs['every pass']).max():.3g}"
        print(f"| {label} | {len(files[label]) / 1e6:.3f} | {64 / seconds[label]:.1f} | "
              f"{seconds['fp32 file'] / seconds[label]:.2f}x | {same} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--external", default=None)
    p.add_argument("--speed", type=int, default=0, metavar="ROUNDS",
                   help="sizes and the int8 benchmark on untrained networks, this many rounds")
    p.add_argument("--passes", type=int, default=0, metavar="ROUNDS",
                   help="the int8 file with each graph pass left out: sizes and speed, this many rounds")
    args = p.parse_args()
    if args.speed or args.passes:
        speed(args.speed) if args.speed else passes(args.passes)
        return
    print(f"CPU: {export.cpu_features()}\n")
    print("| checkpoint | method | test tiles | fp32 accuracy (95% Wilson interval) | int8 accuracy (interval) | "
          "top-1 agreement | the file in float: agreement | the fp32 file in OpenVINO, default precision: "
          "agreement | the int8 file in OpenCV DNN: agreement | largest difference | fp32 under one grey level | another lab's tiles, same class | "
          "int8 MB | gate |")
    print("| --- " * 14 + "|")
    for path in args.checkpoints:
        r = measure(path, args.external)
        ci = {k: "{:.1f}-{:.1f}".format(*mpkd.wilson_interval(round(r[k] * r["tiles"] / 100), r["tiles"]))
              for k in ("accuracy_fp32", "accuracy_int8")}
        print(f"| {path} | {r['method']} | {r['tiles']} | {r['accuracy_fp32']:.2f}% ({ci['accuracy_fp32']}) | "
              f"{r['accuracy_int8']:.2f}% ({ci['accuracy_int8']}) | "
              f"{100 * r['agreement']:.2f}% | {100 * r['graph_agreement']:.2f}% | {r.get('openvino', '-')} | {r.get('opencv', '-')} | "
              f"{r['max_abs_diff']:.3f} | {100 * r['fp32_one_grey_level']:.2f}% | "
              f"{r.get('external', '-')} | {r['bytes'] / 1e6:.2f} | {'written' if r['passes'] else 'refused'} |",
              flush=True)


if __name__ == "__main__":
    main()
