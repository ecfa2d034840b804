"""Tests of predict.py: new tiles (--images) and tissue maps of large images and slides (--map),
from a checkpoint or an exported file. CPU only; the shared models are in conftest.py.

    python -m pytest -q test_predict.py
"""

import json
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import mpkd
import predict
from conftest import LAYOUT, external_folder, layout_pixels, read_csv, run_script


def test_images_predicts_a_messy_folder_like_the_test_report(student, data_dir, tmp_path):
    evaluate.main(evaluate.get_args([str(student), "--data", str(data_dir), "--device", "cpu",
                                     "--predictions", str(tmp_path / "test.csv")]))
    reported = {Path(r["file"]).name: r for r in read_csv(tmp_path / "test.csv")}
    new = tmp_path / "new"
    for i, name in enumerate(sorted(reported)):  # copies of the test tiles, nested at any depth
        folder = new / "slide_a" / "deeper" if i % 2 else new / "slide_b"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((data_dir / reported[name]["file"]).read_bytes())
    first = sorted(reported)[0]
    (new / ".hidden.png").write_bytes((new / "slide_b" / first).read_bytes())
    (new / ".ipynb_checkpoints").mkdir()
    (new / ".ipynb_checkpoints" / first).write_bytes((new / "slide_b" / first).read_bytes())
    Image.open(new / "slide_b" / first).convert("RGBA").save(new / "odd_rgba.png")
    Image.open(new / "slide_b" / first).convert("P").save(new / "odd_palette.bmp")
    (new / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    (new / "notes.txt").write_text("not an image")
    out = tmp_path / "new.csv"
    predict.main(predict.get_args([str(student), "--images", str(new), "--device", "cpu",
                                     "--predictions", str(out)]))
    rows = {r["file"]: r for r in read_csv(out)}
    assert len(rows) == len(reported) + 3 and not any(".hidden" in f or "ipynb" in f for f in rows)
    assert rows["broken.tif"]["predicted"] == "" and rows["broken.tif"]["error"]
    assert rows["odd_rgba.png"]["predicted"] and rows["odd_palette.bmp"]["predicted"]
    classes = [k[2:] for k in read_csv(tmp_path / "test.csv")[0] if k.startswith("p_")]
    for f, r in rows.items():
        if Path(f).name in reported and "/" in f:
            expected = reported[Path(f).name]
            assert r["predicted"] == expected["predicted"] and r["error"] == ""
            assert [float(r[f"p_{c}"]) for c in classes] == pytest.approx(
                [float(expected[f"p_{c}"]) for c in classes], abs=1e-5)
            assert float(r["probability"]) == max(float(r[f"p_{c}"]) for c in classes)


def test_images_tta_averages_the_logits_of_both_views(student, data_dir, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    tile = sorted(data_dir.rglob("*.png"))[0]
    (folder / "tile.png").write_bytes(tile.read_bytes())
    predict.main(predict.get_args([str(student), "--images", str(folder), "--tta", "--device", "cpu",
                                     "--predictions", str(tmp_path / "tta.csv")]))
    [row] = read_csv(tmp_path / "tta.csv")
    ckpt = mpkd.load_file(student, mpkd.CHECKPOINT_FORMAT)
    model = mpkd.load_model(ckpt, student)
    image = mpkd.load_images(folder, ["tile.png"], 32)
    logits = (mpkd.predict(model, image, "fp32") + mpkd.predict(model, image.flip(3), "fp32")) / 2
    probs = torch.softmax(logits, 1)[0].tolist()
    assert [float(row[f"p_{c}"]) for c in ckpt["identity"]["classes"]] == pytest.approx(probs, abs=1e-6)


def test_images_refuses_an_empty_folder_and_several_checkpoints(student, trained, tmp_path):
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "x.png").write_bytes(b"")
    proc = run_script("predict.py", student, "--images", tmp_path / "empty", "--device", "cpu", cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "holds no images" in err and err.strip().count("\n") == 0
    with pytest.raises(mpkd.UserError, match="--images predicts with one model, 2 given"):
        predict.main(predict.get_args([str(student), str(trained / "teacher.pt"), "--images", str(tmp_path)]))


def test_images_with_the_onnx_file_equals_the_checkpoint(exported, student, data_dir, tmp_path):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for f in sorted(data_dir.rglob("*.png"))[:12]:
        (folder / f.name).write_bytes(f.read_bytes())
    for model, out in ((student, "ckpt.csv"), (exported / "student.onnx", "onnx.csv")):
        predict.main(predict.get_args([str(model), "--images", str(folder), "--tta", "--device", "cpu",
                                         "--predictions", str(tmp_path / out)]))
    a, b = read_csv(tmp_path / "ckpt.csv"), read_csv(tmp_path / "onnx.csv")
    assert [r["predicted"] for r in a] == [r["predicted"] for r in b] and len(a) == 12
    cols = [k for k in a[0] if k.startswith("p_")]
    assert all(float(x[c]) == pytest.approx(float(y[c]), abs=1e-5) for x, y in zip(a, b) for c in cols)


def test_onnx_logits_classify_every_image_once_in_order_across_chunks(exported):
    session, meta = predict.open_onnx(exported / "student.onnx")
    n, size = 2 * predict.ONNX_CHUNK + 3, int(meta["img_size"])  # two whole calls and a short one
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    one_by_one = [session.run(["logits"], {"images": img.permute(1, 2, 0)[None].numpy()})[0][0] for img in images]
    got = predict.onnx_logits(session, images)
    assert got.shape == (n, len(json.loads(meta["classes"])))
    assert np.allclose(got.numpy(), np.stack(one_by_one), atol=1e-4)


def test_corrupt_or_foreign_onnx_files_are_clear_errors(exported, tmp_path):
    onnx = pytest.importorskip("onnx")
    blob = (exported / "student.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(blob[: len(blob) // 3])
    (tmp_path / "tiles").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "tiles" / "a.png")
    proc = run_script("predict.py", tmp_path / "cut.onnx", "--images", tmp_path / "tiles", cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "not a readable ONNX model" in err and err.strip().count("\n") == 0
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    with pytest.raises(mpkd.UserError, match="not one written by export.py"):
        predict.main(predict.get_args([str(tmp_path / "f.onnx"), "--images", str(tmp_path / "tiles")]))


def _layout_found(model, rows, window):
    """(classes, {(column, row): class index} from a tiles CSV with windows of `window` pixels,
    {(column, row): class index} of LAYOUT's tissue tiles)."""
    classes = sorted(p.name for p in (model.parent / "d").iterdir() if p.is_dir())
    got = {(int(r["x"]) // window, int(r["y"]) // window): classes.index(r["class"]) for r in rows}
    truth = {(x, y): LAYOUT[y, x] for y in range(LAYOUT.shape[0]) for x in range(LAYOUT.shape[1]) if LAYOUT[y, x] >= 0}
    return classes, got, truth


def _map(model, target, out, *extra):
    return predict.main(predict.get_args([str(model), "--map", str(target), "--out-dir", str(out),
                                          "--device", "cpu", *map(str, extra)]))


def test_window_and_level_arithmetic():
    # a 40x slide (0.25 um/px, downsamples 1, 4, 16) for a model of 150 px at 0.495 um/px shown at 112 px
    assert predict.pick_level([1, 4, 16], 0.25, 150 * 0.495 / 112) == 0  # level 1 (1.0 um/px) is too coarse
    assert predict.pick_level([1, 2, 4, 8], 0.25, 150 * 0.495 / 112) == 1  # 0.5 um/px: the coarsest fine enough
    assert predict.pick_level([1, 2], 0.5, 0.5) == 0 and predict.pick_level([1, 2], 0.2495, 0.495) == 1  # 1% slack
    assert predict.pick_level([1, 4], 1.0, 0.5) == 0  # coarser than needed already: the finest there is
    origins = predict.window_origins(100, 70, 30, 10)
    assert len(origins) == 8 * 5 and origins[0].tolist() == [0, 0] and origins[-1].tolist() == [70, 40]
    assert predict.cell_grid(100, 70, 10) == (7, 10) and predict.cell_grid(101, 70, 10) == (7, 11)
    cells = predict.window_cells(np.array([[0, 0], [70, 40]]), 30, 10)
    assert cells.tolist() == [[0, 3, 0, 3], [4, 7, 7, 10]]  # a third of a window: 3 x 3 cells
    assert predict.window_cells(np.array([[150, 300]]), 150, 150).tolist() == [[2, 3, 1, 2]]
    # a run of windows at odd level-0 positions, read from a level at half the resolution
    (x, y), offsets, span = predict.run_region(np.array([[33, 51], [94, 51], [155, 51]]), 2.0, 30)
    assert (x, y) == (32, 52) and offsets == [0, 31, 62] and span == 92  # whole level pixels, nearest


def test_overlapping_windows_are_averaged_per_cell():
    sums, counts = np.zeros((2, 3, 2), np.float32), np.zeros((2, 3), np.int32)
    cells = predict.window_cells(np.array([[0, 0], [1, 0]]), 2, 1)  # two 2 x 2 windows, one cell apart
    predict.accumulate(sums, counts, cells, np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))
    assert counts.tolist() == [[1, 2, 1], [1, 2, 1]]
    mean = sums / counts[..., None]
    assert mean[0, 0].tolist() == [1, 0] and mean[0, 1].tolist() == [0.5, 0.5] and mean[1, 2].tolist() == [0, 1]


def test_tissue_threshold_and_mask():
    values = np.concatenate([np.full(300, 5), np.full(100, 120)]).astype(np.uint8)
    assert 5 <= predict.otsu_threshold(values) < 120
    glass = np.full((4, 4, 3), 240, np.uint8)
    pink = np.tile(np.array([230, 120, 200], np.uint8), (4, 4, 1))
    assert predict.saturation(pink[:1, :1])[0, 0] == (230 - 120) * 255 // 230 and predict.saturation(glass).max() == 0
    high, low = np.meshgrid(np.arange(256), np.arange(256))  # every (max, min) pair: PIL's HSV is the formula
    pairs = np.stack([high, low, low], -1)[low <= high][None].astype(np.uint8)
    formula = np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0)[low <= high]
    assert predict.saturation(pairs)[0].tolist() == formula.tolist()
    mask, threshold = predict.tissue_mask(np.concatenate([glass, pink], 1))
    assert mask[:, :4].sum() == 0 and mask[:, 4:].all()
    assert threshold == predict.TISSUE_SATURATION[0]  # Otsu's 0 (glass at 0, pink at 133) clipped up to 15
    all_tissue, _ = predict.tissue_mask(np.concatenate([pink, pink // 2 + 60], 1))  # two stains, no glass
    assert all_tissue.all()  # Otsu alone would split the tissue in two
    share = predict.tissue_share(np.concatenate([np.zeros((4, 4), bool), np.ones((4, 4), bool)], 1), 0.5,
                              np.array([[0, 0], [8, 0], [4, 0]]), 8)
    assert share.tolist() == [0.0, 1.0, 0.5]


def test_shards_cover_every_image_once_and_colours_are_fixed():
    items = list(range(7))
    parts = [predict.shard(items, f"{k}/3") for k in range(3)]
    assert sorted(sum(parts, [])) == items and all(parts)
    for bad in ("3/3", "1", "a/b"):
        with pytest.raises(mpkd.UserError, match="must be K/N"):
            predict.shard(items, bad)
    assert predict.class_palette(["01_TUMOR", "TUM", "02_STROMA"])[:2] == [predict.CLASS_COLOURS["TUMOR"]] * 2


@pytest.mark.parametrize("classes", [
    [f"class {i}" for i in range(12)], [f"class {i}" for i in range(20)],
    ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY",
     "necrosis", "mucin", "nerve", "vessel"],  # Kather's fixed colours and four derived ones
])
def test_derived_class_colours_are_distinct_from_every_colour_on_the_map(classes):
    # The threshold, CIE76 delta E 25: 2.3 is just noticeable side by side; the three greens a user
    # could not tell apart on a map were 14 to 29 apart. A derived colour is that far from every other
    # colour of the map (fixed ones, and the grey of unclassified cells, included).
    palette = predict.class_palette(classes)
    assert palette == predict.class_palette(classes)  # the same map, the same colours
    derived = [i for i, c in enumerate(classes) if mpkd.class_key(c) not in predict.CLASS_COLOURS]
    every = predict.lab(np.array(palette + [predict.UNCLASSIFIED]))
    nearest = min(np.linalg.norm(every[i] - every[j]) for i in derived for j in range(len(every)) if j != i)
    assert nearest >= predict.MIN_COLOUR_DISTANCE
    assert np.allclose(predict.lab([255, 255, 255]), [100, 0, 0], atol=0.02)  # D65 white
    assert np.allclose(predict.lab([255, 0, 0]), [53.24, 80.09, 67.20], atol=0.05)  # sRGB red, as tabulated


def test_a_large_image_comes_back_as_its_layout(map_model, tmp_path, capsys):
    Image.fromarray(layout_pixels(LAYOUT, 40)).save(tmp_path / "big.tif", resolution_unit=3,
                                                      resolution=1e4 / 0.495)  # pixels per cm
    _map(map_model, tmp_path / "big.tif", tmp_path / "maps")
    out = tmp_path / "maps"
    assert {p.name for p in out.iterdir()} == {"big_map.png", "big_overlay.png", "big_tiles.csv", "big.geojson",
                                                "big_summary.json"}
    summary = json.loads((out / "big_summary.json").read_text())
    assert summary["mpp"] == pytest.approx(0.495) and summary["window"]["level0_px"] == 40
    assert summary["cells"] == {"rows": 6, "columns": 8, "classified": int((LAYOUT >= 0).sum())}  # glass skipped
    rows = read_csv(out / "big_tiles.csv")
    classes, got, truth = _layout_found(map_model, rows, 40)
    assert set(got) == set(truth)  # every tissue window where it is, no glass window
    assert sum(got[k] == truth[k] for k in truth) >= 0.9 * len(truth)
    ckpt = mpkd.load_file(map_model, mpkd.CHECKPOINT_FORMAT)  # and each exactly what the model says of its tile
    pixels = layout_pixels(LAYOUT, 40)
    order = sorted(truth, key=lambda k: (k[1], k[0]))  # row by row, as the windows
    tiles = torch.from_numpy(np.stack([mpkd.model_input(Image.fromarray(pixels[y * 40:y * 40 + 40,
                                                                                x * 40:x * 40 + 40]), 32)
                                       for x, y in order]))
    direct = mpkd.predict(mpkd.load_model(ckpt, map_model), tiles, "fp32").softmax(1)
    assert [got[k] for k in order] == direct.argmax(1).tolist()
    assert np.allclose([[float(r[f"p_{c}"]) for c in classes] for r in rows], direct.numpy(), atol=1e-4)
    geo = json.loads((out / "big.geojson").read_text())
    assert len(geo["features"]) == len(rows) == summary["windows"]["classified"]
    first = geo["features"][0]
    assert first["geometry"]["coordinates"][0][:3] == [[0, 0], [40, 0], [40, 40]]
    assert first["properties"]["classification"]["name"] == rows[0]["class"]
    assert sum(summary["class_fractions_by_area"].values()) == pytest.approx(1)
    with Image.open(out / "big_map.png") as img:
        assert img.width > 8 and img.height > 6
    # a third of the window: each window covers 3 x 3 cells, averaged; the layout comes back per cell
    _map(map_model, tmp_path / "big.tif", tmp_path / "third", "--stride", 0.495 * 40 / 4, "--no-mask")
    third = json.loads((tmp_path / "third" / "big_summary.json").read_text())
    assert third["cells"]["rows"] == 24 and third["windows"]["total"] == (24 - 3) * (32 - 3)
    capsys.readouterr()
    _map(map_model, tmp_path / "big.tif", tmp_path / "maps")  # done: skipped
    assert "done before" in capsys.readouterr().out
    stamp = (out / "big_summary.json").stat().st_mtime_ns
    _map(map_model, tmp_path / "big.tif", tmp_path / "maps", "--overwrite")
    assert (out / "big_summary.json").stat().st_mtime_ns != stamp


def test_missing_mpp_is_named_and_the_other_images_go_on(map_model, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(layout_pixels(LAYOUT[:2, :3], 40)).save(folder / "a.png")  # PNG: no scale
    Image.fromarray(layout_pixels(LAYOUT[:2, :3], 40)).save(folder / "b.tif", resolution_unit=3,
                                                              resolution=1e4 / 0.495)
    with pytest.raises(mpkd.UserError, match=r"1 of 2 images failed: a.png \(a.png records no microns per pixel: "
                                             r"pass --image-mpp"):
        _map(map_model, folder, tmp_path / "maps")
    assert (tmp_path / "maps" / "b_summary.json").exists() and not (tmp_path / "maps" / "a_summary.json").exists()
    b = json.loads((tmp_path / "maps" / "b_summary.json").read_text())
    out = capsys.readouterr().out  # the run's own last line counts b's windows
    assert re.search(rf"1 of 2 images mapped in [\d.]+ s, outputs included: {b['windows']['classified']} windows", out)
    assert b["seconds"] >= b["setup_seconds"] > 0 and b["output_seconds"] > 0
    _map(map_model, folder, tmp_path / "maps", "--image-mpp", 0.495)
    assert "done before" in capsys.readouterr().out  # b was done already; a is done now
    assert (tmp_path / "maps" / "a_summary.json").exists()


def test_a_plain_image_too_large_to_hold_is_one_clear_line(map_model, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80 * 80)  # PIL's limit (89 million pixels), scaled down
    folder = tmp_path / "in"
    folder.mkdir()
    for name, layout in (("large.tif", LAYOUT[:2, :3]), ("huge.tif", LAYOUT[:4, :4])):  # 9600 and 25,600 px
        Image.fromarray(layout_pixels(layout, 40)).save(folder / name, resolution_unit=3, resolution=1e4 / 0.495)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(
            mpkd.UserError, match=r"1 of 2 images failed: huge.tif \(huge.tif has more than 12,800 pixels in one "
                                  r"piece, too many to hold whole: save it as a tiled, pyramidal TIFF"):
        warnings.simplefilter("always")
        _map(map_model, folder, tmp_path / "maps")
    assert (tmp_path / "maps" / "large_summary.json").exists()  # above the warning's limit: mapped, no warning
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_windows_are_a_levels_own_pixels_not_interpolated(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    openslide = pytest.importorskip("openslide")
    rng = np.random.default_rng(0)
    base, half = (rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for side in (512, 256))
    with tifffile.TiffWriter(tmp_path / "noise.tif") as tif:  # noise: any interpolation shows
        tif.write(base, tile=(128, 128), photometric="rgb", resolution=(1e4 / 0.25,) * 2, resolutionunit="CENTIMETER")
        tif.write(half, tile=(128, 128), photometric="rgb", subfiletype=1)
    reader = predict.Slide(tmp_path / "noise.tif", openslide)
    origins = np.array([[33, 51], [94, 51], [155, 51], [401, 301]])  # odd: between two level-1 pixels
    with ThreadPoolExecutor(2) as pool:
        got = torch.cat(list(predict.window_batches(reader, origins, {"level": 1, "read_px": 30, "stride_px": 61},
                                                     24, pool)))
    want = [mpkd.model_input(Image.fromarray(half[y:y + 30, x:x + 30]), 24)
            for x, y in np.rint(origins / 2).astype(int)]
    assert np.array_equal(got.numpy(), np.stack(want))


def test_an_images_windows_come_in_order_the_first_few_in_a_small_batch():
    class Columns:  # each pixel holds its column, so a window shows where it was read
        downsamples = [1.0]

        def read(self, x, y, level, width, height):
            row = (np.arange(x, x + width) % 256).astype(np.uint8)
            return Image.fromarray(np.repeat(np.repeat(row[None, :, None], height, 0), 3, 2))

    origins = np.array([[x, 0] for x in range(0, 400 * 4, 4)])
    plan = {"level": 0, "read_px": 4, "stride_px": 4}
    with ThreadPoolExecutor(2) as pool:
        batches = list(predict.window_batches(Columns(), origins, plan, 4, pool))
        assert list(predict.window_batches(Columns(), origins[:0], plan, 4, pool)) == []
    first, full = predict.MAP_BATCH // 4, predict.MAP_BATCH
    assert [len(b) for b in batches] == [first, full, 400 - first - full]
    assert torch.cat(batches)[:, 0, 0, 0].tolist() == [x % 256 for x in origins[:, 0]]


def test_a_tiff_in_strips_is_a_plain_image_without_openslide(tmp_path, monkeypatch):
    Image.new("RGB", (300, 200), (200, 40, 90)).save(tmp_path / "strips.tif", resolution_unit=3, resolution=1e4 / 0.5)
    monkeypatch.setattr(predict, "import_openslide", lambda: pytest.fail("OpenSlide imported for a TIFF in strips"))
    reader = predict.open_map_image(tmp_path / "strips.tif")
    assert isinstance(reader, predict.PlainImage) and reader.mpp == pytest.approx(0.5)
    assert reader.thumbnail(100).size == (100, 67) and reader.thumbnail(1024).size == (300, 200)  # never enlarged
    (tmp_path / "broken.tif").write_bytes(b"II*\0")  # a header, nothing more
    assert predict.tiled_tiff(tmp_path / "broken.tif")  # PIL cannot tell: OpenSlide is asked
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "tiles.tif", np.zeros((256, 256, 3), np.uint8), tile=(128, 128), photometric="rgb")
    assert predict.tiled_tiff(tmp_path / "tiles.tif") and not predict.tiled_tiff(tmp_path / "strips.tif")


def test_unscanned_slide_area_is_read_as_glass():
    class Scan:  # what OpenSlide gives where a slide has no scanned tiles (MIRAX, ...): transparent
        def read_region(self, location, level, size):
            region = np.zeros((*size[::-1], 4), np.uint8)
            region[:, : size[0] // 2] = (200, 40, 90, 255)
            return Image.fromarray(region, "RGBA")
    reader = predict.Slide.__new__(predict.Slide)
    reader.slide = Scan()
    pixels = np.asarray(reader.read(0, 0, 0, 4, 2))
    assert pixels[:, :2].tolist() == [[[200, 40, 90]] * 2] * 2 and (pixels[:, 2:] == 255).all()
    reader.slide.read_region = lambda *a: Image.new("RGBA", (3, 3), (10, 20, 30, 255))  # all scanned
    assert np.asarray(reader.read(0, 0, 0, 3, 3)).tolist() == [[[10, 20, 30]] * 3] * 3


def test_a_pyramidal_tiff_is_read_through_openslide(map_model, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    openslide = pytest.importorskip("openslide")
    base = np.asarray(Image.fromarray(layout_pixels(LAYOUT, 40)).resize((640, 480), Image.BILINEAR))
    half = np.asarray(Image.fromarray(base).resize((320, 240), Image.BILINEAR))
    with tifffile.TiffWriter(tmp_path / "slide.tif") as tif:  # 0.2475 um/px, and a level at 0.495
        tif.write(base, tile=(128, 128), photometric="rgb", resolution=(1e4 / 0.2475, 1e4 / 0.2475),
                  resolutionunit="CENTIMETER")
        tif.write(half, tile=(128, 128), photometric="rgb", subfiletype=1,
                  resolution=(1e4 / 0.495, 1e4 / 0.495), resolutionunit="CENTIMETER")
    assert openslide.OpenSlide.detect_format(str(tmp_path / "slide.tif")) == "generic-tiff"
    _map(map_model, tmp_path / "slide.tif", tmp_path / "maps")
    summary = json.loads((tmp_path / "maps" / "slide_summary.json").read_text())
    assert summary["mpp"] == pytest.approx(0.2475) and summary["level"] == 1 and summary["window"]["read_px"] == 40
    rows = read_csv(tmp_path / "maps" / "slide_tiles.csv")
    _, got, truth = _layout_found(map_model, rows, 80)
    assert set(got) == set(truth) and sum(got[k] == truth[k] for k in truth) >= 0.9 * len(truth)


def test_images_at_their_scale_and_stain_normalised(map_model, tmp_path, capsys):
    root = external_folder(tmp_path / "ext", np.random.default_rng(0))
    run = lambda out, *extra: predict.main(predict.get_args([str(map_model), "--images", str(root), "--device", "cpu",
                                                               "--predictions", str(tmp_path / out), *map(str, extra)]))
    run("crop.csv", "--image-mpp", 0.2475, "--scale-rule", "crop")
    assert "scale rule crop" in capsys.readouterr().out
    rows = read_csv(tmp_path / "crop.csv")
    names = ["zero", "one", "two", "three"]
    folder = lambda r: names.index(r["file"].split("/")[0])
    assert all(r["predicted"] == f"{folder(r) + 1:02d}_CLASS{folder(r)}" for r in rows)
    run("cover.csv", "--image-mpp", 0.2475, "--stain-norm", "macenko")  # cover: the default with a scale
    out = capsys.readouterr().out  # 2 x 2 fields of 80 px cover a 160 px tile
    assert "scale rule cover" in out and "(48 views of 12 tiles)" in out
    assert "stain normalised (macenko) to the training tiles of s.pt" in out
    assert len(read_csv(tmp_path / "cover.csv")) == 12
    with pytest.raises(mpkd.UserError, match="--stain-ref .* does not open"):
        run("x.csv", "--stain-norm", "macenko", "--stain-ref", tmp_path / "map.csv")


def test_map_stain_normalised_from_the_images_own_tissue(map_model, tmp_path):
    pixels = layout_pixels(LAYOUT, 40)
    Image.fromarray(pixels).save(tmp_path / "big.tif", resolution_unit=3, resolution=1e4 / 0.495)
    _map(map_model, tmp_path / "big.tif", tmp_path / "maps", "--stain-norm", "macenko")
    norm = json.loads((tmp_path / "maps" / "big_summary.json").read_text())["stain_norm"]
    ckpt = mpkd.load_file(map_model, mpkd.CHECKPOINT_FORMAT)
    assert norm["mode"] == "macenko" and norm["target"]["stains"] == ckpt["stain"]["stains"]
    assert norm["source"]["pixels"] > 0  # estimated once, from the image's tissue
    rows = read_csv(tmp_path / "maps" / "big_tiles.csv")
    windows = torch.from_numpy(np.stack([mpkd.model_input(Image.fromarray(pixels[int(r["y"]):int(r["y"]) + 40,
                                                                              int(r["x"]):int(r["x"]) + 40]), 32)
                                         for r in rows]))
    restained = mpkd.normalise_stain(windows, norm["source"], norm["target"])[0]  # every window alike
    direct = mpkd.predict(mpkd.load_model(ckpt, map_model), restained, "fp32").softmax(1)
    classes = ckpt["identity"]["classes"]
    assert np.allclose([[float(r[f"p_{c}"]) for c in classes] for r in rows], direct.numpy(), atol=1e-4)
    _map(map_model, tmp_path / "big.tif", tmp_path / "per-window", "--stain-norm", "macenko-tile")
    assert json.loads((tmp_path / "per-window" / "big_summary.json").read_text())["stain_norm"]["source"] is None


def test_map_messages_say_what_to_do_once_and_leave_no_empty_folder(map_model, trained, tmp_path, capsys, monkeypatch):
    Image.fromarray(layout_pixels(LAYOUT[:2, :3], 40)).save(tmp_path / "a.png")  # no scale
    with pytest.raises(mpkd.UserError, match="1 of 1 images failed: a.png .*pass --image-mpp"):
        _map(map_model, tmp_path / "a.png", tmp_path / "maps")
    out = capsys.readouterr().out
    assert "a.png: failed" in out and "--image-mpp" not in out  # the reason once, in the error
    assert not (tmp_path / "maps").exists()  # nothing written, no folder left
    with pytest.raises(mpkd.UserError, match=r"is the stored teacher logits .* pass a checkpoint .*or an .onnx "
                                             r"file written by export.py"):
        _map(trained / "teacher_logits.pt", tmp_path / "a.png", tmp_path / "maps")
    assert not (tmp_path / "maps").exists()
    _map(map_model, tmp_path / "a.png", tmp_path / "maps", "--shard", "3/4")  # an array job's spare task
    spare = f"shard 3/4 holds no images: {tmp_path / 'a.png'} has 1, fewer than the shards"
    assert capsys.readouterr().out.strip() == spare


def test_a_folder_never_holds_two_models_maps_unasked(map_model, student, tmp_path, capsys):
    Image.fromarray(layout_pixels(LAYOUT[:2, :3], 40)).save(tmp_path / "a.tif", resolution_unit=3,
                                                             resolution=1e4 / 0.495)
    _map(map_model, tmp_path / "a.tif", tmp_path / "maps")
    summary = json.loads((tmp_path / "maps" / "a_summary.json").read_text())
    assert summary["model"]["sha256"] == mpkd.file_sha256(map_model) and summary["settings"]["mask"] is True
    capsys.readouterr()
    _map(map_model, tmp_path / "a.tif", tmp_path / "maps")  # the same model and settings: done
    assert "done before" in capsys.readouterr().out
    for model, extra, differs in ((student, [], "another model"), (map_model, ["--no-mask"], "mask True, not False"),
                                  (map_model, ["--image-mpp", 0.25], "scale 0.495 um/px, not --image-mpp 0.25")):
        with pytest.raises(mpkd.UserError, match=f"1 of 1 images failed: a.tif .*{differs}.*--overwrite replaces "
                                                 f"it, --out-dir DIR keeps both"):
            _map(model, tmp_path / "a.tif", tmp_path / "maps", *extra)
    assert json.loads((tmp_path / "maps" / "a_summary.json").read_text()) == summary  # untouched


def test_overlay_has_the_legend_and_every_count_agrees_with_and_without_stride(map_model, tmp_path, capsys):
    Image.fromarray(layout_pixels(LAYOUT, 40)).save(tmp_path / "big.tif", resolution_unit=3, resolution=1e4 / 0.495)
    for extra, name in (([], "plain"), (["--stride", 0.495 * 40 / 2], "stride")):
        capsys.readouterr()
        _map(map_model, tmp_path / "big.tif", tmp_path / name, *extra)
        console = capsys.readouterr().out
        summary = json.loads((tmp_path / name / "big_summary.json").read_text())
        rows = read_csv(tmp_path / name / "big_tiles.csv")
        geo = json.loads((tmp_path / name / "big.geojson").read_text())
        windows, cells = summary["windows"], summary["cells"]["classified"]
        assert predict.windows_line(windows) in console and len(rows) == windows["classified"]  # every window
        assert len(geo["features"]) == cells and (cells == len(rows)) == (name == "plain")  # what the map shows
        names = [f["properties"]["classification"]["name"] for f in geo["features"]]
        for c in summary["class_fractions_by_area"]:
            assert summary["class_fractions_by_area"][c] == pytest.approx(names.count(c) / len(names))
            by_windows = [r["class"] for r in rows].count(c) / len(rows)
            assert summary["class_fractions_by_windows"][c] == pytest.approx(by_windows)
        corners = {tuple(map(tuple, f["geometry"]["coordinates"][0][:3])) for f in geo["features"]}
        assert len(corners) == cells  # no two squares overlap: one per cell
    colours = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
               for f in geo["features"]}
    with Image.open(tmp_path / "plain" / "big_overlay.png") as img:
        legend = np.asarray(img.convert("RGB"))[:, -predict.LEGEND_WIDTH:]
    present = {tuple(p) for p in legend.reshape(-1, 3)}
    assert set(colours.values()) <= present  # each class's swatch, in the GeoJSON's (QuPath's) colour
    a, tint = predict.OVERLAY_ALPHA / 255, summary["overlay_tint"]  # beside it, the tint the overlay shows
    assert {tuple(round(a * c + (1 - a) * t) for c, t in zip(colour, tint)) for colour in colours.values()} <= present
