"""Tests of export.py: the ONNX file, checked against PyTorch and in other runtimes, and the gated
int8 file with its benchmark. CPU only; the shared models are in conftest.py.

    python -m pytest -q test_export.py
"""

import contextlib
import hashlib
import io
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import distill
import export
import mpkd
import predict
from conftest import HERE, read_csv


@pytest.mark.parametrize("name,ckpt_of", [("student.onnx", lambda t, s: s),
                                          ("teacher.onnx", lambda t, s: t / "teacher.pt")])
def test_exported_onnx_is_one_file_with_its_contract_and_agrees_with_pytorch(exported, trained, student, data_dir,
                                                                           name, ckpt_of):
    import onnxruntime as ort
    path, ckpt_path = exported / name, ckpt_of(trained, student)
    assert sorted(p.name for p in exported.iterdir()) == ["student.onnx", "teacher.onnx"]  # no side .data files
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert isinstance(inp.shape[0], str)  # a dynamic batch dimension
    assert [(o.name, o.shape[1]) for o in session.get_outputs()] == [("probabilities", 4), ("logits", 4)]
    ckpt = mpkd.load_file(ckpt_path, mpkd.CHECKPOINT_FORMAT)
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == ckpt["identity"]["classes"] and meta["img_size"] == "32"
    assert json.loads(meta["identity"]) == ckpt["identity"] and meta["checkpoint"] == str(ckpt_path)
    test = mpkd.load_part(mpkd.load_dataset(data_dir, 32, "tile", 0, 0.2, 0.2), "test", torch.device("cpu"))
    probs, logits = session.run(["probabilities", "logits"], {"images": test["images"].permute(0, 2, 3, 1).numpy()})
    expected = mpkd.predict(mpkd.load_model(ckpt, ckpt_path), test["images"], "fp32")
    assert export.onnx_agrees(logits, expected.numpy())["ok"]  # the export's own check, on the checkpoint's logits
    assert np.abs(probs - torch.softmax(expected, 1).numpy()).max() < 1e-4  # these students' logits are small
    assert (probs.argmax(1) == expected.argmax(1).numpy()).all() and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("runtime", ["openvino", "cv2"])
def test_the_exported_student_agrees_in_openvino_and_opencv(exported, student, data_dir, runtime):
    lib = pytest.importorskip(runtime)
    path = str(exported / "student.onnx")
    test = mpkd.load_part(mpkd.load_dataset(data_dir, 32, "tile", 0, 0.2, 0.2), "test", torch.device("cpu"))
    tiles = test["images"].permute(0, 2, 3, 1).contiguous().numpy()  # uint8 (N, S, S, 3), as the file takes
    if runtime == "openvino":  # the lines of docs/deploy.md: f32 asked for (bf16 is its default on some CPUs)
        model = lib.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        out = model(tiles)
        probs, logits = (out[model.output(name)] for name in ("probabilities", "logits"))
    else:  # OpenCV DNN, outputs fetched by name (getUnconnectedOutLayersNames has its own order)
        net = lib.dnn.readNetFromONNX(path)
        net.setInput(tiles)
        probs, logits = net.forward(["probabilities", "logits"])
    ckpt = mpkd.load_file(student, mpkd.CHECKPOINT_FORMAT)
    expected = mpkd.predict(mpkd.load_model(ckpt, student), test["images"], "fp32")
    assert export.onnx_agrees(logits, expected.numpy())["ok"]  # what the export checks in ONNX Runtime
    assert probs.shape == expected.shape and np.abs(probs - torch.softmax(expected, 1).numpy()).max() < 1e-4


def test_the_export_check_allows_float_rounding_at_the_logits_scale_and_nothing_more():
    """Logits of hundreds (a student trained briefly from scratch) round to a few thousandths in
    float32; where two classes are close that moves probabilities by more than 1e-4, and the check
    must not refuse a right file for it. An error of one hundredth of the logits' scale, or another
    class, is refused."""
    rng = np.random.default_rng(0)
    expected = (rng.normal(0, 100, (80, 8)) + 300 * np.eye(8)[np.arange(80) % 8]).astype(np.float32)
    expected[0, :2] = [330.0, 329.99]  # two classes 0.01 apart: a rounding of 0.002 moves p by ~5e-4
    rounded = expected + np.float32(0.002) * rng.choice([-1, 1], expected.shape).astype(np.float32)
    rounded[0, :2] = [330.002, 329.988]
    p = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    assert np.abs(p(rounded) - p(expected)).max() > 1e-4  # what the probability bound refused
    check = export.onnx_agrees(rounded, expected)
    assert check["ok"] and check["same"] and check["scale"] == pytest.approx(np.abs(expected).max())
    off = np.float32(1.01) * expected  # a real error, 1% of every logit: the same classes, refused
    assert export.onnx_agrees(off, expected) == {"ok": False, "same": True, "scale": check["scale"],
                                                   "worst": pytest.approx(0.01 * check["scale"], rel=1e-3)}
    swapped = expected.copy()
    swapped[0, :2] = [329.99, 330.0]  # within the tolerance, but the other class wins
    assert not export.onnx_agrees(swapped, expected)["ok"] and not export.onnx_agrees(swapped, expected)["same"]
    small = expected / (2 * np.abs(expected).max())  # logits within 0.5: the tolerance never drops below 1e-4
    assert export.onnx_agrees(small + np.float32(5e-5), small)["ok"]
    assert not export.onnx_agrees(small + np.float32(5e-4), small)["ok"]


def test_a_disagreeing_export_is_an_error_and_writes_nothing(student, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)  # no difference, not even zero, is allowed
    refused = "disagrees with PyTorch .* the checkpoint is unaffected .* please report it .* was not written"
    with pytest.raises(mpkd.UserError, match=refused):
        export.main(export.get_args([str(student), "--data", str(data_dir), "--out", str(tmp_path / "s.onnx")]))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def steady_model(map_model):
    """map_model's student trained again in batches of 32: 100% on its 80 test tiles, and it keeps
    its class when pixels move by one grey level (map_model, in batches of 8, does not: 93.75%)."""
    out = map_model.parent / "steady.pt"
    distill.main(distill.get_args(["--data", str(map_model.parent / "d"), "--distill-weight", "0", "--teacher-logits",
                                   str(map_model.parent / "none.pt"), "--out", str(out), "--epochs", "10",
                                   "--step-size", "3", "--img-size", "32", "--batch-size", "32", "--device", "cpu"]))
    return out


@pytest.fixture(scope="module")
def int8(steady_model, tmp_path_factory):
    """steady_model written as an int8 file by export.py --int8 --benchmark, and what the command
    printed."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("int8") / "student.int8.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export.main(export.get_args([str(steady_model), "--out", str(out), "--int8", "--benchmark"]))
    return out, printed.getvalue()


def _test_tiles(model):
    """The test part of a checkpoint trained with the default split at 32 px, in the folder it records."""
    data = mpkd.load_dataset(mpkd.load_file(model, mpkd.CHECKPOINT_FORMAT)["args"]["data"], 32, "tile", 0, 0.2, 0.2)
    return mpkd.load_part(data, "test", torch.device("cpu"))


def test_int8_file_agrees_with_the_fp32_network_and_records_its_check(int8, steady_model):
    import onnxruntime as ort
    path, printed = int8
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert [(o.name, o.shape[1]) for o in session.get_outputs()] == [("probabilities", 4), ("logits", 4)]
    student, test = steady_model, _test_tiles(steady_model)
    probs = session.run(["probabilities"], {"images": test["images"].permute(0, 2, 3, 1).numpy()})[0]
    ckpt = mpkd.load_file(student, mpkd.CHECKPOINT_FORMAT)
    expected = torch.softmax(mpkd.predict(mpkd.load_model(ckpt, student), test["images"], "fp32"), 1).numpy()
    labels = test["labels"].numpy()
    agreement = (probs.argmax(1) == expected.argmax(1)).mean()
    accuracy, accuracy32 = 100 * (probs.argmax(1) == labels).mean(), 100 * (expected.argmax(1) == labels).mean()
    assert agreement >= export.INT8_AGREEMENT and abs(accuracy - accuracy32) <= export.INT8_ACCURACY_POINTS
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["precision"] == "int8" and json.loads(meta["quantisation"]) == export.INT8_SETTINGS
    assert json.loads(meta["classes"]) == ckpt["identity"]["classes"] and meta["img_size"] == "32"
    assert meta["mpkd_format"] == mpkd.ONNX_FORMAT and meta["checkpoint_sha256"] == mpkd.file_sha256(student)
    check = json.loads(meta["int8_check"])  # the gate's figures, recorded: they are those computed here
    assert len(labels) == 80 and 95 < accuracy32  # a trained model, not one at chance
    assert check["tiles"] == len(labels) and check["agreement"] == pytest.approx(agreement)
    assert check["accuracy_int8"] == pytest.approx(accuracy) and check["accuracy_fp32"] == pytest.approx(accuracy32)
    assert check["max_abs_diff"] == pytest.approx(np.abs(probs - expected).max(), abs=1e-4)
    assert f"top-1 agreement with the fp32 network {100 * agreement:.2f}% of {len(labels)} test tiles" in printed
    fp32 = export.checked_onnx(ckpt, student, mpkd.load_model(ckpt, student).eval(), test)["bytes"]
    assert path.stat().st_size < fp32 / 3  # int8 weights, and the merged convolutions' zeros left out


def test_int8_kernels_compute_what_the_file_says_on_this_cpu(int8, steady_model):
    """ONNX Runtime's fused int8 kernels against the file's own QDQ graph computed operator by
    operator in float (no graph optimisation): the same classes, 20 dB apart at least. On x86 CPUs
    without VNNI the u8s8 kernels add pairs of products in int16, and full-range int8 weights
    saturate them (docs/deploy.md: 7 dB and 91% of tiles on a 112 px student); weights within
    -64..64 cannot."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    path, _ = int8
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64
    tiles = export.tiles_nhwc(_test_tiles(steady_model)["images"])
    logits = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        logits.append(session.run(["logits"], {"images": tiles})[0])
    kernels, graph = logits
    assert (kernels.argmax(1) == graph.argmax(1)).all()
    assert 10 * np.log10((graph ** 2).sum() / ((kernels - graph) ** 2).sum()) > 20


def test_cpu_features_name_vnni_or_its_absence(tmp_path):
    """The benchmark's CPU line: the instruction sets int8 speed and, without VNNI, int8 arithmetic
    depend on (INT8_SETTINGS), read from cpuinfo as x86 Linux writes it."""
    info = tmp_path / "cpuinfo"
    for flags, expected in (("fpu sse avx avx2 fma", "AMD EPYC: avx2, no VNNI"),
                            ("avx2 avx512f avx512_vnni avx512_bf16",
                             "AMD EPYC: avx2, avx512f, avx512_vnni, avx512_bf16"),
                            ("avx2 avx_vnni", "AMD EPYC: avx2, avx_vnni")):
        info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert export.cpu_features(info) == expected
    info.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # aarch64: no x86 flags to name
    assert export.cpu_features(info) == "CPU"
    assert export.cpu_features(tmp_path / "gone") == "not known"


def test_int8_calibration_is_training_tiles_never_test_tiles(int8, steady_model):
    import onnxruntime as ort
    data = mpkd.load_dataset(steady_model.parent / "d", 32, "tile", 0, 0.2, 0.2)
    tiles, calibrated = export.calibration_tiles(data, 32)
    train, test = ({data["files"][i] for i in data["split"][part]} for part in ("train", "test"))
    assert set(calibrated["files"]) <= train and not set(calibrated["files"]) & test
    n = calibrated["tiles"]
    assert len(tiles) == 2 * n and (tiles[n:] == tiles[:n, :, ::-1]).all()
    recorded = json.loads(ort.InferenceSession(str(int8[0]), providers=["CPUExecutionProvider"])
                          .get_modelmeta().custom_metadata_map["calibration"])
    assert recorded == {k: v for k, v in calibrated.items() if k != "files"}  # the fingerprints of these tiles
    test_tiles = export.tiles_nhwc(mpkd.load_part(data, "test", torch.device("cpu"))["images"])
    assert hashlib.sha256(test_tiles.tobytes()).hexdigest()[:16] != recorded["pixels_sha256"]


def test_int8_network_compaction_and_padding_change_nothing_but_rounding(map_model):
    """The network the int8 file is quantised from equals the checkpoint's; leaving the merged
    convolutions' zeros out of the file, and growing the blocks whose depthwise convolutions have 72
    and 360 channels to 80 and 368, change not one output."""
    import onnxruntime as ort
    for name in ("mixnet_s", "mixnet_l"):
        torch.manual_seed(0)
        model = mpkd.build_mixnet(name, 8, pretrained=False).eval()
        with torch.no_grad():  # BatchNorm away from (0, 1), so a wrong fold shows
            for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_()
        tiles = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
        quantised = export.Deployable(export.for_export(model)).eval()
        got, expected = (export.probabilities(m, tiles) for m in (quantised, export.Deployable(model).eval()))
        assert np.abs(got - expected).max() < 1e-4
    ckpt = mpkd.load_file(map_model, mpkd.CHECKPOINT_FORMAT)
    network = export.Deployable(export.for_export(mpkd.load_model(ckpt, map_model).eval())).eval()
    tiles = export.tiles_nhwc(_test_tiles(map_model)["images"])
    compact = export.quantise(network, 32, tiles)
    made = {}
    for step in ("compact_weights", "pad_depthwise"):
        kept = getattr(export, step)
        setattr(export, step, lambda proto, *rest: None)
        try:
            made[step] = export.quantise(network, 32, tiles)
        finally:
            setattr(export, step, kept)
    whole, unpadded = made["compact_weights"], made["pad_depthwise"]
    run = lambda proto: ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": tiles})
    outputs = [run(p) for p in (compact, whole, unpadded)]
    assert all((a == b).all() and (a == c).all() for a, b, c in zip(*outputs))
    assert compact.ByteSize() < whole.ByteSize() - 100_000  # MixNet-S's zeros: 0.66 million int8 weights
    assert {"Pad", "Concat"} <= {n.op_type for n in compact.graph.node}

    def depthwise(proto):  # (channels, kernel) of each depthwise convolution
        attributes = ({a.name: a for a in n.attribute} for n in proto.graph.node if n.op_type == "Conv")
        return sorted((a["group"].i, max(a["kernel_shape"].ints)) for a in attributes
                      if "group" in a and a["group"].i > 1)
    assert depthwise(unpadded).count((360, 9)) == 2 and (72, 3) in depthwise(unpadded)
    assert depthwise(compact) == sorted((c + -c % 16, k) for c, k in depthwise(unpadded))


def _int8_block(channels: int, gate=None):
    """A hand-made QDQ graph of one inverted-residual block on uint8 (1, 8, 5, 5) inputs: 1x1
    convolution to `channels`, 3x3 depthwise, 1x1 back to 8, each output quantised; with `gate`
    (an array) its depthwise output multiplied by that constant first."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def constant(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def dq(x, name):
        nodes.append(helper.make_node("DequantizeLinear", [x, constant(name + "_s", np.float32(0.05)),
                                                          constant(name + "_z", np.uint8(128))], [name]))
        return name

    def q(x, name):
        nodes.append(helper.make_node("QuantizeLinear", [x, name + "_s", name + "_z"], [name + "_q"]))
        return name + "_q"

    def conv(x, name, shape, group=1):
        w = constant(name + "_w", rng.integers(-64, 65, shape).astype(np.int8))
        scale = constant(name + "_ws", np.full(shape[0], 0.01, np.float32))
        zero = constant(name + "_wz", np.zeros(shape[0], np.int8))
        b = constant(name + "_b", rng.integers(-500, 500, shape[0]).astype(np.int32))
        bscale = constant(name + "_bs", np.full(shape[0], 0.0005, np.float32))
        bzero = constant(name + "_bz", np.zeros(shape[0], np.int32))
        nodes.extend([helper.make_node("DequantizeLinear", [w, scale, zero], [w + "_f"], axis=0),
                      helper.make_node("DequantizeLinear", [b, bscale, bzero], [b + "_f"], axis=0),
                      helper.make_node("Conv", [x, w + "_f", b + "_f"], [name], group=group,
                                       pads=[shape[-1] // 2] * 4, name=name)])
        constant(name + "_s", np.float32(0.05)), constant(name + "_z", np.uint8(128))
        return q(name, name)

    x = conv(dq("images", "x"), "expand", (channels, 8, 1, 1))
    x = conv(dq(x, "x1"), "depthwise", (channels, 1, 3, 3), group=channels)
    if gate is not None:
        nodes.append(helper.make_node("Mul", [dq(x, "x2"), constant("gate", gate)], ["gated"]))
        constant("gated_s", np.float32(0.05)), constant("gated_z", np.uint8(128))
        x = q("gated", "gated")
    y = conv(dq(x, "x3"), "project", (8, channels, 1, 1))
    images = helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 8, 5, 5])
    graph = helper.make_graph(nodes, "block", [images],
                              [helper.make_tensor_value_info(y, TensorProto.UINT8, [1, 8, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_depthwise_padding_grows_a_whole_block_and_leaves_one_it_cannot_follow():
    """pad_depthwise on a block of 24 channels: every convolution grows to 32 (the first's outputs,
    the depthwise kernels, the last's inputs, zeros all), the output is the same to the bit; a
    block whose channels meet a constant (a Mul by one, here) is left exactly as it was."""
    import onnxruntime as ort
    from onnx import numpy_helper
    images = np.random.default_rng(1).integers(0, 256, (1, 8, 5, 5), dtype=np.uint8)
    run = lambda proto: ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": images})[0]
    block = _int8_block(24)
    before = run(block)
    export.pad_depthwise(block)
    weights = {t.name: numpy_helper.to_array(t) for t in block.graph.initializer}
    shapes = [weights[k].shape for k in ("expand_w", "depthwise_w", "project_w")]
    assert shapes == [(32, 8, 1, 1), (32, 1, 3, 3), (8, 32, 1, 1)]
    assert not weights["expand_w"][24:].any() and not weights["depthwise_w"][24:].any()
    assert not weights["project_w"][:, 24:].any()
    assert (weights["expand_ws"][24:] == 1).all() and not weights["expand_b"][24:].any()
    assert next(a.i for n in block.graph.node if n.name == "depthwise" for a in n.attribute if a.name == "group") == 32
    assert len(np.unique(before)) > 10 and (run(block) == before).all()
    gated = _int8_block(24, gate=np.ones((1, 24, 1, 1), np.float32))
    unchanged = gated.SerializeToString()
    export.pad_depthwise(gated)
    assert gated.SerializeToString() == unchanged


def test_int8_gate_refuses_a_file_that_disagrees_and_writes_nothing(steady_model, tmp_path, monkeypatch):
    """The steady student (whose int8 file passes) calibrated on grey tiles instead of its training
    tiles: every range comes from one colour, the file keeps few classes, and the gate refuses it."""
    pytest.importorskip("onnxruntime")
    training = export.calibration_tiles

    def grey(data, size):
        tiles, calibrated = training(data, size)
        return np.full_like(tiles, 128), calibrated

    monkeypatch.setattr(export, "calibration_tiles", grey)
    out = tmp_path / "s.int8.onnx"
    with pytest.raises(mpkd.UserError) as err:
        export.main(export.get_args([str(steady_model), "--out", str(out), "--int8"]))
    message = str(err.value)
    assert "too far from the fp32 one: top-1 agreement with the fp32 network" in message
    assert "settings: format QDQ" in message and f"{out} was not written (the fp32 file, export.py without" in message
    figures = re.search(r"network ([\d.]+)% of 80 .* on ([\d.]+)% of them", message).groups()
    agreement, kept = (float(x) for x in figures)
    assert agreement < 100 * export.INT8_AGREEMENT and kept == 100  # the calibration, not the network
    assert list(tmp_path.iterdir()) == []


def test_export_bad_inputs_are_one_line_errors(student, trained, data_dir, tmp_path):
    with pytest.raises(mpkd.UserError, match="--out .*s.txt must be a .onnx path"):
        export.main(export.get_args([str(student), "--data", str(data_dir), "--int8",
                                     "--out", str(tmp_path / "s.txt")]))
    with pytest.raises(mpkd.UserError, match="writes one checkpoint's file, 2 given"):
        export.main(export.get_args([str(student), str(trained / "teacher.pt")]))
    ckpt = torch.load(student, weights_only=False)
    ckpt["args"]["data"] = str(tmp_path / "gone")  # the training tiles' folder is not on this machine
    torch.save(ckpt, tmp_path / "moved.pt")
    with pytest.raises(mpkd.UserError, match="is not here .*; pass --data DIR"):
        export.main(export.get_args([str(tmp_path / "moved.pt"), "--int8"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved.pt"]  # no moved.int8.onnx


def test_images_with_the_int8_file(int8, steady_model, tmp_path):
    import onnxruntime as ort
    folder = tmp_path / "tiles"
    folder.mkdir()
    files = sorted((steady_model.parent / "d").rglob("*.png"))[::40]
    names = [f"{f.parent.name}_{f.name}" for f in files]
    for f, name in zip(files, names):
        (folder / name).write_bytes(f.read_bytes())
    predict.main(predict.get_args([str(int8[0]), "--images", str(folder), "--predictions", str(tmp_path / "p.csv")]))
    rows = read_csv(tmp_path / "p.csv")
    tiles = export.tiles_nhwc(mpkd.load_images(folder, names, 32))
    session = ort.InferenceSession(str(int8[0]), providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"images": tiles})[0]
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    assert [r["file"] for r in rows] == names and len(rows) == 10
    assert [r["predicted"] for r in rows] == [classes[i] for i in probs.argmax(1)]
    assert all(float(r[f"p_{c}"]) == pytest.approx(float(p[j]), abs=1e-5) for r, p in zip(rows, probs)
               for j, c in enumerate(classes))


def test_int8_lines_name_the_fastest_run_only_among_those_that_keep_the_classes():
    """A faster run that moves more than 1% of the classes (here the int8 file in OpenVINO) is not
    named fastest; the fastest run that keeps them is, with its ratio to the fp32 file."""
    run = lambda throughput, agreement: {"latency_ms": 1.0, "throughput": throughput, "agreement": agreement}
    exported = {"path": "s.int8.onnx", "bytes": 3_000_000, "fp32": {"bytes": 13_000_000},
                "calibration": {"tiles": 256, "pixels_sha256": "0" * 16},
                "figures": {"tiles": 80, "agreement": 1.0, "accuracy_int8": 100.0, "accuracy_fp32": 100.0,
                            "max_abs_diff": 0.01, "fp32_one_grey_level": 1.0},
                "benchmark": {"ONNX Runtime fp32 file": run(500.0, 1.0), "ONNX Runtime int8 file": run(650.0, 0.9875),
                              "OpenVINO int8 file": run(900.0, 0.975),
                              "OpenVINO fp32 file, default precision (bf16)": run(800.0, 0.99)}}
    lines = export.int8_lines("MixNet-S", exported)
    assert lines[-1] == ("  fastest at batch 64 among those keeping 99% of the classes: "
                         "OpenVINO fp32 file, default precision (bf16) (1.60x ONNX Runtime fp32)")
    exported["benchmark"]["OpenVINO fp32 file, default precision (bf16)"]["agreement"] = 0.98
    assert export.int8_lines("MixNet-S", exported)[-1].endswith(": ONNX Runtime fp32 file (1.00x ONNX Runtime fp32)")


def test_int8_benchmark_and_openvino_parity(int8, steady_model):
    path, printed = int8
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"  (ONNX Runtime \w+ file|OpenVINO [\w ,()]+?) +batch-1 +([\d.]+) ms, +([\d.]+) img/s at batch 64 \(([\d.]+)x "
        r"ONNX Runtime fp32\), top-1 agreement ([\d.]+)%", printed)}
    fp32, int8 = rows["ONNX Runtime fp32 file"], rows["ONNX Runtime int8 file"]
    assert fp32[2] == "1.00" and float(int8[2]) == pytest.approx(float(int8[1]) / float(fp32[1]), abs=0.01)
    gate = re.search(r"top-1 agreement with the fp32 network ([\d.]+)%", printed).group(1)
    assert int8[3] == gate and fp32[3] == "100.00"  # the same file on the same tiles as the gate
    assert f"on the CPU ({export.cpu_features()}), taking turns" in printed  # int8 speed depends on it
    kept = {name: float(r[1]) for name, r in rows.items() if float(r[3]) >= 100 * export.INT8_AGREEMENT}
    fastest = max(kept, key=kept.get)
    assert f"among those keeping 99% of the classes: {fastest} ({rows[fastest][2]}x ONNX Runtime fp32)" in printed
    ov = pytest.importorskip("openvino")
    model = ov.Core().compile_model(str(path), "CPU")  # the int8 file as it is: OpenVINO's int8 kernels
    student, test = steady_model, _test_tiles(steady_model)
    probs = model(test["images"].permute(0, 2, 3, 1).contiguous().numpy())[model.output("probabilities")]
    ckpt = mpkd.load_file(student, mpkd.CHECKPOINT_FORMAT)
    expected = torch.softmax(mpkd.predict(mpkd.load_model(ckpt, student), test["images"], "fp32"), 1).numpy()
    assert (probs.argmax(1) == expected.argmax(1)).mean() >= export.INT8_AGREEMENT
    assert {"OpenVINO int8 file", "OpenVINO fp32 file, f32"} <= set(rows)
    assert any(re.fullmatch(r"OpenVINO fp32 file, default precision \((f32|bf16|f16)\)", row) for row in rows)


@pytest.mark.parametrize("name", ["mixnet_s", "mixnet_l"])
def test_merged_mixed_convs_compute_what_the_network_computes(name):
    torch.manual_seed(0)
    model = mpkd.build_mixnet(name, 8, pretrained=False).eval()
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), so a wrong channel order shows
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_()
    merged = export.merge_mixed_convs(model).eval()
    kinds = lambda m: {type(x).__name__ for x in m.modules()}
    assert "MixedConv2d" in kinds(model) and "MixedConv2d" not in kinds(merged)  # all merged, original kept
    x = torch.randn(3, 3, 48, 48)
    with torch.inference_mode():
        want, got = model(x), merged(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    strides = [torch.nn.Conv2d(4, 4, k, stride, k // 2, groups=4, bias=False) for k, stride in ((3, 1), (5, 2))]
    assert export._one_conv(strides) is None  # different strides: no single convolution computes both
    unequal = [torch.nn.Conv2d(c, o, 1, bias=False) for c, o in ((3, 6), (5, 2))]  # pointwise parts
    dense, x = export._one_conv(unequal), torch.randn(2, 8, 5, 5)
    assert (dense.kernel_size, dense.groups) == ((1, 1), 1)  # one dense 1x1 conv, block-diagonal weight
    assert not dense.weight[:6, 3:].any() and not dense.weight[6:, :3].any()  # zeros off the blocks
    with torch.no_grad():
        assert torch.allclose(dense(x), torch.cat([unequal[0](x[:, :3]), unequal[1](x[:, 3:])], 1), atol=1e-6)
    depthwise = export._one_conv([torch.nn.Conv2d(2, 2, k, 1, k // 2, groups=2, bias=False) for k in (3, 5)])
    assert (depthwise.kernel_size, depthwise.groups, depthwise.padding) == ((5, 5), 4, (2, 2))


def test_onnx_benchmark_times_both_runtimes_and_leaves_the_model_alone(exported, student):
    import onnxruntime as ort
    ckpt = mpkd.load_file(student, mpkd.CHECKPOINT_FORMAT)
    model = mpkd.load_model(ckpt, student)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    session = ort.InferenceSession(str(exported / "student.onnx"), providers=["CPUExecutionProvider"])
    result = export.onnx_benchmark(session, model, 32, repeats=2)
    assert {k: set(v) for k, v in result.items()} == {r: {"latency_ms", "throughput"} for r in ("onnx", "eager")}
    assert all(x > 0 and math.isfinite(x) for v in result.values() for x in v.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    line = export.export_lines("MixNet-S", {"path": "s.onnx", "bytes": 1, "size": 32, "tiles_checked": 8,
                                              "max_abs_diff": 0.0, "max_logit_diff": 0.0, "benchmark": result})[-1]
    ratio = result["onnx"]["throughput"] / result["eager"]["throughput"]
    assert line.startswith("MixNet-S on the CPU, ONNX Runtime") and line.endswith(f"({ratio:.2f}x throughput)")


def test_the_exported_graph_has_no_split_or_concat(exported):
    onnx = pytest.importorskip("onnx")
    ops = {n.op_type for n in onnx.load(exported / "student.onnx").graph.node}
    assert "Conv" in ops and not ops & {"Split", "Concat"}


def test_export_without_the_onnx_packages_is_one_clear_line(student, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(mpkd.UserError, match="pip install onnx onnxscript onnxruntime"):
        export.main(export.get_args([str(student), "--data", str(data_dir), "--out", str(tmp_path / "s.onnx")]))


def test_deploy_doc_code_runs_as_pasted(exported, data_dir, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("cv2")
    (code,) = re.findall(r"```python\n(.*?)```", (HERE / "docs" / "deploy.md").read_text(), re.S)
    (tmp_path / "student.onnx").write_bytes((exported / "student.onnx").read_bytes())
    (tmp_path / "new_tiles").mkdir()
    files = sorted(data_dir.rglob("*.png"))[::7][:6]
    for f in files:
        (tmp_path / "new_tiles" / f.name).write_bytes(f.read_bytes())
    # the doc's code, then what its last runtime (OpenCV) predicted, to compare
    (tmp_path / "deploy.py").write_text(code + "\nprint(json.dumps([classes[i] for i in probabilities.argmax(1)]))\n")
    proc = subprocess.run([sys.executable, "deploy.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    onnxruntime, opencv = json.loads(lines[0].replace("'", '"')), json.loads(lines[-1])
    predict.main(predict.get_args([str(exported / "student.onnx"), "--images", str(tmp_path / "new_tiles"),
                                   "--predictions", str(tmp_path / "p.csv")]))
    expected = {f"new_tiles/{r['file']}": r["predicted"] for r in read_csv(tmp_path / "p.csv")}
    assert onnxruntime == expected and opencv == list(expected.values()) and len(expected) == len(files)
