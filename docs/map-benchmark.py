"""The tissue-map figures of the README: windows/s end to end and inference only, and peak memory,
for the exported student, the eager student and the teacher, on a generated 5000 x 5000 px image
(0.495 um/px, Kather 2016's larger images' shape) and a generated pyramidal slide of 40,000 x
40,000 px at 0.25 um/px (a 40x scan's scale). Both are generated stand-in colours, not tissue.

    python docs/map-benchmark.py            # from the repository root; writes map-benchmark/

Needs tifffile and openslide-python with openslide-bin (and imagecodecs for JPEG tiles, else the
slide is written with deflate, several GB). Trains its own small models on the stand-in if absent.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
import mpkd  # noqa: E402

OUT = Path("map-benchmark")
ROOT = Path(__file__).resolve().parent.parent
CELL_UM = 150 * mpkd.DEFAULT_MPP  # one stand-in class region per training tile's width
REPEATS = 3  # map runs per model and image; the table takes the median's figures


def colours_at(xs_um: np.ndarray, ys_um: np.ndarray, rng_tile: np.ndarray, field_um: float) -> np.ndarray:
    """uint8 RGB of stand-in 'tissue' at positions in micrometres: classes in blocks of 4 x 4 training
    tiles, glass outside a disc in the middle of the field, the stand-in's noise (a noise texture)."""
    cx, cy = xs_um // (4 * CELL_UM), ys_um // (4 * CELL_UM)
    classes = ((cx * 7 + cy * 3 + (cx * cy) % 5) % 8).astype(np.int64)
    palette = np.array([[(c * 70) % 256, (c * 150 + 40) % 256, (255 - c * 60) % 256] for c in range(8)]
                       + [[245, 245, 245]], np.float32)
    inside = (xs_um / field_um - 0.5) ** 2 + (ys_um / field_um - 0.5) ** 2 < 0.4 ** 2
    classes = np.where(inside, classes, 8)
    return np.clip(palette[classes] + rng_tile, 0, 255).astype(np.uint8)


def make_large_image(path: Path, side: int = 5000, mpp: float = 0.495) -> None:
    noise = np.random.default_rng(0).normal(0, 20, (side, side, 3)).astype(np.float32)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float64) * mpp
    Image.fromarray(colours_at(xs, ys, noise, side * mpp)).save(path, resolution_unit=3, resolution=1e4 / mpp)


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
        run(ROOT / "evaluate.py", "student.pt", "--export", "student.onnx")
    return {"student, ONNX Runtime": "student.onnx", "student, PyTorch eager": "student.pt",
            "teacher, PyTorch eager": "teacher.pt"}


def inference_rate(model: str, repeats: int = 8) -> float:
    """Windows/s of the runtime alone on random uint8 windows, batches of evaluate.MAP_BATCH."""
    import torch
    args = evaluate.get_args([str(OUT / model), "--device", "cpu"])
    predictor = evaluate.load_predictor(OUT / model, args, mpkd.pick_device("cpu"))
    batch = torch.randint(0, 256, (evaluate.MAP_BATCH, 3, predictor["size"], predictor["size"]), dtype=torch.uint8)
    predictor["logits"](batch)
    start = time.perf_counter()
    for _ in range(repeats):
        predictor["logits"](batch)
    return repeats * evaluate.MAP_BATCH / (time.perf_counter() - start)


def map_once(model: str, image: str) -> dict:
    """One --map run in its own process: the summary's figures and the peak resident memory."""
    out = f"maps-{Path(model).stem}-{Path(model).suffix[1:]}"
    peak = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, ROOT / "evaluate.py", model, "--map", image,
                           "--out-dir", out, "--overwrite", "--device", "cpu"], cwd=OUT, capture_output=True,
                          text=True, check=True)
    summary = json.loads((OUT / out / f"{Path(image).stem}_summary.json").read_text())
    return {"windows": summary["windows"], "end_to_end": summary["windows_per_s"], "seconds": summary["seconds"],
            "peak_mb": int(peak.stderr.split()[-1]) / 1e3, "level": summary["level"], "size_px": summary["size_px"]}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    images = {"large.tif": make_large_image, "slide.tif": make_slide}
    for name, make in images.items():
        if not (OUT / name).exists():
            start = time.perf_counter()
            make(OUT / name)
            print(f"made {name} in {time.perf_counter() - start:.0f} s ({(OUT / name).stat().st_size / 1e6:.0f} MB)")
    rows = []
    for label, model in models().items():
        alone = inference_rate(model)
        for image in images:
            runs = sorted((map_once(model, image) for _ in range(REPEATS)), key=lambda r: r["end_to_end"])
            r = {"model": label, "image": image, **runs[len(runs) // 2], "inference_only": alone,
                 "rounds": [round(x["end_to_end"]) for x in runs], "peak_mb": max(x["peak_mb"] for x in runs)}
            rows.append(r)
            print(f"{label:<24}{image:<11}{r['windows']['classified']:>7} of {r['windows']['total']:>6} windows "
                  f"{r['seconds']:7.1f} s  end to end {r['end_to_end']:6.0f}/s {r['rounds']}  inference only "
                  f"{alone:6.0f}/s ({r['end_to_end'] / alone:.2f}x)  peak {r['peak_mb']:6.0f} MB", flush=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
