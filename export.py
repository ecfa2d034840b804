"""Write a checkpoint's network as one deployable ONNX file, checked against PyTorch on the
checkpoint's test tiles; or as an int8 file, written only if it keeps the fp32 network's classes;
and measure how fast the file runs.

    python export.py student.pt                         # student.onnx beside the checkpoint
    python export.py student.pt --benchmark             # + latency and throughput against PyTorch eager
    python export.py student.pt --int8 --benchmark      # student.int8.onnx, gated; int8 against fp32

The file takes uint8 RGB tiles (N, S, S, 3) and returns `probabilities` and `logits` (N, C), the
normalisation and the softmax inside; its metadata carries the checkpoint's classes, image size,
field of view and stain, so predict.py takes it like the checkpoint. Needs the optional packages
onnx, onnxscript and onnxruntime (OpenVINO, where installed, is measured too).
"""

import argparse
import contextlib
import copy
import hashlib
import io
import json
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

import mpkd

# Largest |logit difference| allowed between ONNX Runtime and PyTorch, as a share of the largest
# |logit| (at least 1): float32 rounding grows with the logits, which reach hundreds in students
# trained briefly from scratch, where an absolute bound on probabilities refused right files
ONNX_TOLERANCE = 1e-4
INT8_AGREEMENT = 0.99  # the least share of test tiles whose top-1 class the int8 file keeps
INT8_ACCURACY_POINTS = 0.5  # the most its test accuracy may differ from the fp32 network's
INT8_CALIBRATION_TILES = 256  # training tiles calibrated on (each in both views; docs/deploy.md)
# Weights within -64..64, not -127..127: x86 CPUs without VNNI (AVX2; AVX-512 before VNNI) add the
# uint8 x int8 products in pairs in int16, which full-range weights overflow, saturating silently
# (docs/deploy.md).
INT8_SETTINGS = {"format": "QDQ", "weights": "int8 within -64..64 (reduce_range), symmetric, per output channel",
                 "activations": "uint8, per tensor", "calibration": "Percentile 99.999",
                 "float": "the stem convolution, the classifier (Gemm), the softmax"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),  # the first sentence, whole
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="+", help="the checkpoint to export, written by train_teacher.py or distill.py")
    p.add_argument("--out", default=None, metavar="PATH.onnx",
                   help="the file written (unset: the checkpoint's name with .onnx, or .int8.onnx with --int8)")
    p.add_argument("--int8", action="store_true",
                   help="an int8 file (static quantisation calibrated on training tiles), written only if it "
                        "agrees with the fp32 network on the test tiles")
    p.add_argument("--benchmark", action="store_true",
                   help="measure batch-1 latency and throughput at batch 64: the file in ONNX Runtime against "
                        "PyTorch eager; with --int8 the int8 and fp32 files in ONNX Runtime and OpenVINO")
    p.add_argument("--data", default=None,
                   help="folder of class folders the checkpoint was trained on, for its test and calibration "
                        "tiles (unset: the folder the checkpoint records)")
    p.add_argument("--groups", default=None, metavar="FILE.csv",
                   help="the groups file of a checkpoint split by group, where it is not found by itself")
    return p.parse_args(argv)


def onnx_packages():
    """onnx and onnxruntime, or a one-line error saying how to get them."""
    return mpkd.require("onnx", "onnxruntime", feature="ONNX export", install="onnx onnxscript onnxruntime")


# ----------------------------------------------------------------------------------------------
# The fp32 file


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
    with the smaller kernels zero-padded (centred) to the largest; 1x1 parts become one dense 1x1
    conv with a block-diagonal weight. Same products and sums, so the outputs agree to float rounding."""
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
    layout across it (what that buys: docs/deploy.md)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "MixedConv2d" and (conv := _one_conv(list(module.values()))) is not None:
            model.set_submodule(name, conv)
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
            torch.onnx.export(wrapper, (example,), str(out), dynamo=True, external_data=False, verbose=False, **names,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
        except TypeError:  # older torch: the TorchScript exporter, which embeds weights below 2 GB
            torch.onnx.export(wrapper, (example,), str(out), opset_version=17, **names,
                              dynamic_axes={name: {0: "batch"} for name in ("images", "probabilities", "logits")})
        onnx, _ = onnx_packages()
        proto = onnx.load(str(out))  # reads any side .data file back in
    for node in proto.graph.node:  # the exporter's notes on each node: stack traces with this
        del node.metadata_props[:]  # machine's paths, a fifth of an int8 file
    return proto.SerializeToString()


def onnx_metadata(ckpt: dict, path, size: int) -> dict[str, str]:
    """The metadata every exported file carries: what predict.py needs, and where it came from."""
    return {"mpkd_format": mpkd.ONNX_FORMAT, "classes": json.dumps(ckpt["identity"]["classes"]),
            "img_size": str(size), "input": f"images: uint8 RGB tiles (N, {size}, {size}, 3)",
            "outputs": "probabilities (N, C) float32 (softmax inside); logits (N, C)",
            "method": ckpt["method"], "network": ckpt["model"], "checkpoint": str(path),
            "checkpoint_sha256": mpkd.file_sha256(path), "identity": json.dumps(ckpt["identity"]),
            "tile_um": str(ckpt["tile"]["um"]),  # the field of view, for predict.py
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


def outputs(model, tiles: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and logits (N, C) of uint8 (N, S, S, 3) tiles, `chunk` at a time, from a
    Deployable in PyTorch, an ONNX Runtime session or an OpenVINO compiled model."""
    def run(x):
        if isinstance(model, torch.nn.Module):
            with torch.inference_mode():
                return [y.numpy() for y in model(torch.from_numpy(x))]
        if hasattr(model, "run"):
            return model.run(["probabilities", "logits"], {"images": x})
        results = model(x)
        return [results[model.output(name)] for name in ("probabilities", "logits")]
    return tuple(np.concatenate(x) for x in zip(*(run(tiles[i:i + chunk]) for i in range(0, len(tiles), chunk))))


def probabilities(model, tiles: np.ndarray, chunk: int = 256) -> np.ndarray:
    return outputs(model, tiles, chunk)[0]


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
    onnx, ort = onnx_packages()
    size = ckpt["identity"]["img_size"]
    wrapper = Deployable(model.to("cpu", memory_format=torch.contiguous_format).float()).eval()
    proto = onnx.load_from_string(_onnx_bytes(Deployable(for_export(wrapper.model)).eval(), size))
    blob = with_metadata(proto, onnx_metadata(ckpt, path, size))
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    tiles = tiles_nhwc(part["images"])
    (expected, logits), (got, got_logits) = outputs(wrapper, tiles), outputs(session, tiles)
    check, worst = onnx_agrees(got_logits, logits), float(np.abs(got - expected).max())
    if not check["ok"]:
        raise mpkd.UserError(f"the exported model disagrees with PyTorch on the {len(tiles)} test tiles "
                             f"(largest logit difference {check['worst']:.2e}, tolerance {ONNX_TOLERANCE:.0e} x "
                             f"{check['scale']:.3g}, the largest logit; same classes: {check['same']}): "
                             f"float rounding stays far below that, so the runtime or the exporter computes "
                             f"something else; the checkpoint is unaffected (predict.py CKPT --images runs it "
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


def blocks_taking_turns(runs: dict, n: int, repeats: int, rounds: int) -> dict[str, float]:
    """Seconds per call of each of `runs` (name: function of a batch of n), in whole blocks taking
    turns (A B ... B A, `rounds` times), the median of each one's blocks: drift on a shared machine
    falls on all alike; whole blocks rather than single calls, because each runtime's threads keep
    spinning for a while after a call and would slow the other's next one."""
    cpu, times = torch.device("cpu"), {name: [] for name in runs}
    for name in (list(runs) + list(runs)[::-1]) * rounds:
        times[name] += mpkd.median_seconds([runs[name]], cpu, repeats if n == 1 else max(3, repeats // 4), warmup=3)
    return {name: float(np.median(seconds)) for name, seconds in times.items()}


def speeds(runs: dict, size: int, repeats: int, rounds: int) -> dict:
    """Batch-1 latency (ms) and images/s at batch 64 of each of `runs` (name: function of uint8
    (N, S, S, 3) tiles) on the same random tiles, in blocks taking turns (blocks_taking_turns)."""
    out = {name: {} for name in runs}
    for n, key in ((1, "latency_ms"), (64, "throughput")):
        tiles = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        calls = {name: lambda run=run: run(tiles) for name, run in runs.items()}
        for name, seconds in blocks_taking_turns(calls, n, repeats, rounds).items():
            out[name][key] = float(1000 * seconds if n == 1 else n / seconds)
    return out


def onnx_benchmark(session, model: torch.nn.Module, size: int, repeats: int = 20) -> dict:
    """Batch-1 latency (median ms) and images/s at batch 64 of the exported file in ONNX Runtime and
    of the checkpoint's network in PyTorch eager as predict.py runs it (mpkd.predict: normalise,
    channels_last, inference mode), in blocks ONNX, eager, eager, ONNX."""
    model = mpkd.to_device(copy.deepcopy(model), torch.device("cpu")).eval()

    def eager(tiles):
        with torch.inference_mode():
            return torch.softmax(mpkd.predict(model, torch.from_numpy(tiles).permute(0, 3, 1, 2), "fp32"), 1)

    return speeds({"onnx": lambda tiles: session.run(["probabilities"], {"images": tiles}), "eager": eager},
                  size, repeats, rounds=1)


def export_lines(network: str, exported) -> list[str]:
    """What export.py wrote, and with --benchmark how the file runs against PyTorch eager."""
    lines = [f"wrote {exported['path']} ({exported['bytes'] / 1e6:.3f} MB, weights embedded): uint8 "
                 f"(N, {exported['size']}, {exported['size']}, 3) -> probabilities; on the {exported['tiles_checked']} "
                 f"test tiles ONNX Runtime agrees with PyTorch (largest probability difference "
                 f"{exported['max_abs_diff']:.1e}, logit difference {exported['max_logit_diff']:.1e}, same classes)"]
    if "benchmark" in exported:
        onnx_b, eager_b = exported["benchmark"]["onnx"], exported["benchmark"]["eager"]
        lines.append(f"{network} on the CPU, ONNX Runtime: batch-1 latency {onnx_b['latency_ms']:.2f} ms, "
                     f"{onnx_b['throughput']:.1f} img/s at batch 64; PyTorch eager, taking turns with it: "
                     f"{eager_b['latency_ms']:.2f} ms, {eager_b['throughput']:.1f} img/s "
                     f"({onnx_b['throughput'] / eager_b['throughput']:.2f}x throughput)")
    return lines


# ----------------------------------------------------------------------------------------------
# The int8 file (onnxruntime.quantization): made from the fp32 network, checked against it (the
# gate) and measured against the fp32 file


def global_pools(proto):
    """Every mean over height and width (ReduceMean) as GlobalAveragePool, with a Flatten where the
    mean drops those axes: the same numbers, and an operator the quantiser keeps in int8, where
    around a ReduceMean it dequantises the whole activation to float first (docs/deploy.md)."""
    from onnx import helper, numpy_helper
    constants = {t.name: numpy_helper.to_array(t).tolist() for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        spatial = len(node.input) > 1 and constants.get(node.input[1]) in ([2, 3], [-2, -1])
        if node.op_type != "ReduceMean" or not spatial:
            nodes.append(node)
            continue
        pooled = list(node.output) if keep else [node.output[0] + "_pooled"]
        nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], pooled, name=node.name))
        if not keep:
            nodes.append(helper.make_node("Flatten", pooled, list(node.output), name=node.name + "_flatten", axis=1))
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
    seen, depthwise, writers, ends, todo = set(), {dw.name: dw}, {}, {}, [dw.input[0]]
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
        found = [made.get(name) for name in conv.input[1:]]
        ok = all(dq is not None and dq.op_type == "DequantizeLinear" and len(readers[dq.output[0]]) == 1
                 and all(n in tensors and len(readers[n]) == 1 for n in dq.input) for dq in found)
        return found if ok else None

    def grow(name, axis, extra, value):
        a = numpy_helper.to_array(tensors[name])
        if a.ndim > axis:  # per-channel (or a weight); a single per-tensor scale stays as it is
            grown = np.pad(a, [(0, extra if i == axis else 0) for i in range(a.ndim)], constant_values=value)
            tensors[name].CopyFrom(numpy_helper.from_array(grown, name))

    stale, visited = set(), set()
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        if (g := group(conv)) is None or conv.name in visited or g.i == 1 or g.i % multiple == 0:
            continue
        if (closure := _channel_closure(conv, made, readers, tensors, outputs)) is None:
            continue
        names, depthwise, writers, ends = closure
        visited |= set(depthwise)
        channels, extra = g.i, -g.i % multiple
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
            x_scale = float(numpy_helper.to_array(tensors[made[conv_.input[0]].input[1]]))
            # the bias is stored at the weight's scale times the input's
            for dq, values in zip(found[conv_.name], ((0, 1, 0), (0, x_scale, 0))):
                for name, value in zip(dq.input, values):
                    grow(name, 0, extra, value)
            if conv_.name in depthwise:
                group(conv_).i = channels + extra
        stale |= names
    kept = [v for v in graph.value_info if v.name not in stale]  # their recorded shapes no longer hold
    del graph.value_info[:]
    graph.value_info.extend(kept)


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
    """The int8 ONNX model (a proto) of a Deployable `network` (the fp32 file's): exported with its
    pools as GlobalAveragePool, then ONNX Runtime's static quantisation as INT8_SETTINGS say,
    calibrated on `calibration` (uint8 tiles), the zeros of merged convolutions left out of the file."""
    onnx, ort = onnx_packages()
    from onnxruntime import quantization
    ort.set_default_logger_severity(3)  # not its notes on initializers the quantiser leaves unused
    proto = global_pools(onnx.load_from_string(_onnx_bytes(network, size)))
    batch = max(b for b in range(1, 65) if len(calibration) % b == 0)  # Percentile needs equal batches

    class Batches(quantization.CalibrationDataReader):
        batches = iter({"images": calibration[i:i + batch]} for i in range(0, len(calibration), batch))

        def get_next(self):
            return next(self.batches, None)

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
                reduce_range=True, calibrate_method=quantization.CalibrationMethod.Percentile, nodes_to_exclude=floats)
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
    got = probabilities(session, tiles)
    step = np.random.default_rng(0).integers(-1, 2, tiles.shape)
    nudged = probabilities(wrapper, np.clip(tiles.astype(np.int16) + step, 0, 255).astype(np.uint8))
    return {"tiles": len(tiles), "agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
            "accuracy_int8": float(100 * (got.argmax(1) == labels).mean()),
            "accuracy_fp32": float(100 * (reference.argmax(1) == labels).mean()),
            "max_abs_diff": float(np.abs(got - reference).max()),
            "fp32_one_grey_level": float((nudged.argmax(1) == reference.argmax(1)).mean())}


def figures_line(f: dict) -> str:
    ci = lambda accuracy: "{:.1f}-{:.1f}".format(*mpkd.wilson_interval(round(accuracy * f["tiles"] / 100), f["tiles"]))
    return (f"top-1 agreement with the fp32 network {100 * f['agreement']:.2f}% of {f['tiles']} test tiles, "
            f"accuracy {f['accuracy_int8']:.2f}% ({ci(f['accuracy_int8'])}) against {f['accuracy_fp32']:.2f}% "
            f"({ci(f['accuracy_fp32'])}; 95% Wilson intervals), largest probability "
            f"difference {f['max_abs_diff']:.3f} (the fp32 network keeps its own class on "
            f"{100 * f['fp32_one_grey_level']:.2f}% of them when pixels move by one grey level)")


def int8_file(ckpt: dict, path, model: torch.nn.Module, data: dict, part: dict) -> dict:
    """The checkpoint's network quantised to int8 (bytes, with its metadata and the gate's figures
    on the test tiles), whether or not it passes the gate. The fp32 file is built and checked first
    (checked_onnx): the reference, and the benchmark's other file."""
    _, ort = onnx_packages()
    fp32 = checked_onnx(ckpt, path, model, part)
    size, tiles = fp32["size"], tiles_nhwc(part["images"])
    calibration, calibrated = calibration_tiles(data, size)
    proto = quantise(Deployable(for_export(fp32["wrapper"].model)).eval(), size, calibration)
    meta = {**onnx_metadata(ckpt, path, size), "precision": "int8", "quantisation": json.dumps(INT8_SETTINGS),
            "calibration": json.dumps({k: v for k, v in calibrated.items() if k != "files"})}
    session = ort.InferenceSession(with_metadata(proto, meta), providers=["CPUExecutionProvider"])
    figures = int8_figures(session, fp32["wrapper"], fp32["expected"], part["labels"].cpu().numpy(), tiles)
    blob = with_metadata(proto, {"int8_check": json.dumps(figures)})
    return {"blob": blob, "bytes": len(blob), "size": size, "figures": figures, "calibration": calibrated,
            "fp32": fp32, "session": session}


def export_int8(ckpt: dict, path, model: torch.nn.Module, data: dict, part: dict, out) -> dict:
    """--int8: `int8_file`, written to `out` only if on the test tiles it keeps the fp32
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
                             f"tiles, both views); {out} was not written (the fp32 file, export.py without "
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


def int8_benchmark(exported: dict, part: dict, repeats: int = 20) -> dict:
    """--int8 --benchmark: batch-1 latency (ms) and images/s at batch 64 of the int8 and
    fp32 files in ONNX Runtime and OpenVINO, in whole blocks taking turns (A B C ... C B A, three
    times; the median of each one's six blocks, as a shared machine's load comes and goes), on the
    same random uint8 tiles; and each one's top-1 agreement with the fp32 network on the test tiles."""
    runs = {"ONNX Runtime fp32 file": exported["fp32"]["session"], "ONNX Runtime int8 file": exported["session"]}
    runs |= openvino_models({"fp32": exported["fp32"]["blob"], "int8": exported["blob"]})
    test, reference = tiles_nhwc(part["images"]), exported["fp32"]["expected"]
    agreement = {name: float((probabilities(m, test, 64).argmax(1) == reference.argmax(1)).mean())
                 for name, m in runs.items()}
    timed = speeds({name: lambda tiles, m=m: probabilities(m, tiles, 64) for name, m in runs.items()},
                   exported["size"], repeats, rounds=3)
    return {name: {"agreement": agreement[name], **timed[name]} for name in runs}


def int8_lines(network: str, exported: dict) -> list[str]:
    """What --int8 wrote, and with --benchmark how the int8 and fp32 files run."""
    c = exported["calibration"]
    lines = [f"wrote {exported['path']} ({exported['bytes'] / 1e6:.3f} MB, int8; the fp32 file "
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


def main(args):
    onnx_packages()  # before any work: the packages, one checkpoint, a writable .onnx path
    if len(args.checkpoint) != 1:
        raise mpkd.UserError(f"export.py writes one checkpoint's file, {len(args.checkpoint)} given")
    path = args.checkpoint[0]
    out = args.out or str(Path(path).with_suffix(".int8.onnx" if args.int8 else ".onnx"))
    if not out.endswith(".onnx"):
        raise mpkd.UserError(f"--out {out} must be a .onnx path")
    mpkd.check_writable(out)
    ckpt = mpkd.load_checkpoint(path)
    # the file is checked and calibrated on the CPU, where ONNX Runtime runs
    data, part = mpkd.load_test_split(ckpt, path, args.data, args.groups, torch.device("cpu"), {}, print)
    model, network = mpkd.load_model(ckpt, path).eval(), mpkd.network_name(ckpt["model"])
    exported = (export_int8(ckpt, path, model, data, part, out) if args.int8
                else export_onnx(ckpt, path, model, part, out))
    if args.benchmark:
        exported["benchmark"] = (int8_benchmark(exported, part) if args.int8
                                 else onnx_benchmark(exported["session"], model, exported["size"]))
    print("\n".join(int8_lines(network, exported) if args.int8 else export_lines(network, exported)))
    return exported


if __name__ == "__main__":
    try:
        main(get_args())
    except mpkd.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
