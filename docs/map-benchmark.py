"""The tissue-map figures of the README: windows/s end to end and inference only, and peak memory,
for the exported student (fp32 and int8), the eager student and the teacher, on a generated
5000 x 5000 px image (0.495 um/px, Kather 2016's larger images' shape), a generated pyramidal
slide of 40,000 x 40,000 px at 0.25 um/px (a 40x scan's scale) and a folder of ten 5000 x 5000 px
images mapped in one run.
All are generated stand-in colours, not tissue. Each case runs REPEATS rounds of the map, then the
runtime alone; the table keeps the round whose ratio is the median.

    python docs/map-benchmark.py            # from the repository root; writes map-benchmark/
    python docs/map-benchmark.py student.onnx   # measure one model again, the other rows kept

Needs tifffile and openslide-python with openslide-bin (and imagecodecs for JPEG tiles, else the
slide is written with deflate, several GB). Trains its own small models on the stand-in if absent.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import export  # noqa: E402
import mpkd  # noqa: E402
import predict  # noqa: E402

OUT = Path("map-benchmark")
ROOT = Path(__file__).resolve().parent.parent
CELL_UM = 150 * mpkd.DEFAULT_MPP  # one stand-in class region per training tile's width
REPEATS = 3  # rounds per model and image; the table takes the round with the median ratio
FOLDER = 10  # images in the folder case, mapped in one run


def colours_at(xs_um: np.ndarray, ys_um: np.ndarray, rng_tile: np.ndarray, field_um: float,
               shift: int = 0) -> np.ndarray:
    """uint8 RGB of stand-in 'tissue' at positions in micrometres: classes in blocks of 4 x 4 training
    tiles (the pattern moved by `shift` blocks), glass outside a disc in the middle of the field, the
    stand-in's noise (a noise texture)."""
    cx, cy = xs_um // (4 * CELL_UM) + shift, ys_um // (4 * CELL_UM)
    classes = ((cx * 7 + cy * 3 + (cx * cy) % 5) % 8).astype(np.int64)
    palette = np.array([[(c * 70) % 256, (c * 150 + 40) % 256, (255 - c * 60) % 256] for c in range(8)]
                       + [[245, 245, 245]], np.float32)
    inside = (xs_um / field_um - 0.5) ** 2 + (ys_um / field_um - 0.5) ** 2 < 0.4 ** 2
    classes = np.where(inside, classes, 8)
    return np.clip(palette[classes] + rng_tile, 0, 255).astype(np.uint8)


def make_large_image(path: Path, side: int = 5000, mpp: float = 0.495, seed: int = 0) -> None:
    noise = np.random.default_rng(seed).normal(0, 20, (side, side, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float64) * mpp
    Image.fromarray(colours_at(xs, ys, noise, side * mpp, seed)).save(path, resolution_unit=3, resolution=1e4 / mpp)


def make_folder(path: Path, images: int = FOLDER) -> None:
    """Kather 2016's ten larger images' shape: ten 5000 x 5000 px images, each its own pattern."""
    path.mkdir()
    for i in range(images):
        make_large_image(path / f"large{i}.tif", seed=i + 1)


def make_slide(path: Path, side: int = 40000, mpp: float = 0.25, tile: int = 256) -> None:
    try:
        import tifffile
    except ImportError:
        sys.exit("the generated slide needs tifffile: pip install tifffile openslide-python openslide-bin")
    try:
        import imagecodecs  # noqa: F401
        compression = "jpeg"
    except ImportError:
        compression = "zlib"
    noise = np.random.default_rng(0).normal(0, 20, (tile, tile, 3)).astype(np.float32)

    def tiles(level_side, scale):
        for y in range(0, level_side, tile):
            for x in range(0, level_side, tile):
                ys, xs = np.mgrid[y:y + tile, x:x + tile].astype(np.float64) * mpp * scale
                yield colours_at(xs, ys, noise, side * mpp)

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        scale = 1
        while side // scale >= 1024:
            level_side = side // scale
            tif.write(tiles(level_side, scale), shape=(level_side, level_side, 3), dtype=np.uint8, tile=(tile, tile),
                      photometric="rgb", compression=compression, subfiletype=0 if scale == 1 else 1,
                      resolution=(1e4 / (mpp * scale),) * 2, resolutionunit="CENTIMETER")
            scale *= 2


def run(*argv) -> None:
    subprocess.run([sys.executable, *map(str, argv)], check=True, cwd=OUT, stdout=subprocess.DEVNULL)


def models() -> dict:
    if not (OUT / "teacher.pt").exists():
        mpkd.make_standin(OUT / "standin", per_class=60)
        flags = ["--data", "standin", "--batch-size", "16", "--device", "cpu"]
        run(ROOT / "train_teacher.py", *flags, "--epochs", "3", "--save-every", "1", "--no-pretrained")
        run(ROOT / "distill.py", *flags, "--epochs", "5", "--multipart")
        run(ROOT / "export.py", "student.pt", "--out", "student.onnx")
    if not (OUT / "student.int8.onnx").exists():
        int8_student()
    return {"student, ONNX Runtime": "student.onnx", "student int8, ONNX Runtime": "student.int8.onnx",
            "student, PyTorch eager": "student.pt", "teacher, PyTorch eager": "teacher.pt"}


def int8_student() -> None:
    """student.int8.onnx as export.py --int8 makes it, written whatever its gate says: this 5-epoch
    stand-in student is too fragile for the gate (docs/deploy.md), and speed does not depend on it."""
    import torch
    path = str(OUT / "student.pt")
    ckpt = mpkd.load_checkpoint(path)
    data, part = mpkd.load_test_split(ckpt, path, str(OUT / "standin"), None, torch.device("cpu"), {})
    made = export.int8_file(ckpt, path, mpkd.load_model(ckpt, path).eval(), data, part)
    mpkd.write_bytes_atomic(made["blob"], OUT / "student.int8.onnx")
    print(f"student.int8.onnx: {export.figures_line(made['figures'])}", flush=True)


def inference_rate(model: str, repeats: int = 8) -> float:
    """Windows/s of the runtime alone on random uint8 windows, batches of predict.MAP_BATCH."""
    import torch
    predictor = predict.load_predictor(OUT / model, torch.device("cpu"), "fp32")
    batch = torch.randint(0, 256, (predict.MAP_BATCH, 3, predictor["size"], predictor["size"]), dtype=torch.uint8)
    predictor["logits"](batch)
    start = time.perf_counter()
    for _ in range(repeats):
        predictor["logits"](batch)
    return repeats * predict.MAP_BATCH / (time.perf_counter() - start)


def reading_rate(image: str) -> float:
    """Windows/s of reading alone: the tissue windows of a student map, read and resized as --map
    does (its threads, one batch ahead), not classified."""
    from concurrent.futures import ThreadPoolExecutor
    import torch
    student = predict.load_predictor(OUT / "student.onnx", torch.device("cpu"), "fp32")
    settings = {"window_um": student["tile_um"], "stride_um": student["tile_um"], "mask": True, "stain_norm": None}
    plan = predict.plan_map(OUT / image, student, settings, None, None)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        n = sum(len(b) for b in predict.window_batches(plan["reader"], plan["todo"], plan, student["size"], pool))
    return n / (time.perf_counter() - start)


def map_once(model: str, image: str) -> dict:
    """One --map run in its own process: the summary's figures and the peak resident memory."""
    out = f"maps-{Path(model).stem}-{Path(model).suffix[1:]}"
    peak = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, ROOT / "predict.py", model, "--map", image,
                           "--out-dir", out, "--overwrite", "--device", "cpu"], cwd=OUT, capture_output=True,
                          text=True, check=True)
    peak_mb = int(peak.stderr.split()[-1]) / 1e3
    if (OUT / image).is_dir():  # a folder: its last line, outputs included, opening to last file written
        seconds, windows = re.search(r"mapped in ([\d.]+) s, outputs included: (\d+) windows", peak.stdout).groups()
        return {"windows": {"classified": int(windows), "total": "-"}, "end_to_end": int(windows) / float(seconds),
                "seconds": float(seconds), "peak_mb": peak_mb}
    summary = json.loads((OUT / out / f"{Path(image).stem}_summary.json").read_text())
    return {"windows": summary["windows"], "end_to_end": summary["windows_per_s"], "seconds": summary["seconds"],
            "setup_seconds": summary["setup_seconds"], "output_seconds": summary["output_seconds"],
            "peak_mb": peak_mb, "level": summary["level"], "size_px": summary["size_px"]}


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("models", nargs="*", help="model files to measure again (student.onnx, student.int8.onnx, "
                                             "student.pt, teacher.pt), the other rows kept (unset: all)")
    only = p.parse_args().models
    OUT.mkdir(exist_ok=True)
    images = {"large.tif": make_large_image, "slide.tif": make_slide, "folder": make_folder}
    for name, make in images.items():
        if not (OUT / name).exists():
            start = time.perf_counter()
            make(OUT / name)
            print(f"made {name} in {time.perf_counter() - start:.0f} s", flush=True)
    trained = models()  # the reading rate needs the student's field of view
    for image in ("large.tif", "slide.tif"):
        print(f"reading alone, {image}: {reading_rate(image):.0f} windows/s in {os.cpu_count()} threads", flush=True)
    wanted = {label: model for label, model in trained.items() if not only or model in only}
    done = OUT / "results.json"
    rows = [r for r in json.loads(done.read_text()) if r["model"] not in wanted] if only and done.exists() else []
    for label, model in wanted.items():
        for image in images:  # each round: the map, then the runtime alone, so that drift hits both
            runs = [{**map_once(model, image), "inference_only": inference_rate(model)} for _ in range(REPEATS)]
            for r in runs:
                r["ratio"] = r["end_to_end"] / r["inference_only"]
            runs.sort(key=lambda r: r["ratio"])
            r = {"model": label, "image": image, **runs[len(runs) // 2], "peak_mb": max(x["peak_mb"] for x in runs),
                 "rounds": [[round(x["end_to_end"]), round(x["inference_only"])] for x in runs]}
            rows.append(r)
            print(f"{label:<24}{image:<11}{r['windows']['classified']:>7} of {r['windows']['total']:>6} windows "
                  f"{r['seconds']:7.1f} s  end to end {r['end_to_end']:4.0f}/s, "
                  f"inference only {r['inference_only']:4.0f}/s "
                  f"({r['ratio']:.2f}x; rounds {r['rounds']})  peak {r['peak_mb']:5.0f} MB", flush=True)
    done.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
