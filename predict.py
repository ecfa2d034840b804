"""Apply a model to unlabelled pixels: predict a folder of new tiles, or map large images and whole
slides window by window.

    python predict.py student.pt --images new_tiles/                  # one CSV row per tile
    python predict.py student.pt --images new_tiles/ --tta --image-mpp 0.5  # at the training scale
    python predict.py student.onnx --map slides/ --out-dir maps       # tissue maps of slides or large images
    python predict.py student.onnx --map slides/ --shard 0/16         # one job of a cluster array

The model is a checkpoint (train_teacher.py, distill.py) or a file written by export.py; either
carries its classes, image size and the field of view it was trained on, so tiles and windows are
shown to it as its training tiles were. Labelled tiles are scored by evaluate.py.
"""

import argparse
import io
import json
import math
import os
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import mpkd

IMAGES_CHUNK = 1024  # tiles decoded and predicted at a time by --images: memory stays flat
ONNX_CHUNK = 32  # tiles per ONNX Runtime call: as fast as 64 once warm, and a first call costs less
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
MAP_BATCH = 256  # windows read and classified at a time (an image's first: a quarter); reading runs one batch ahead
SLIDE_CACHE = 256 * 2 ** 20  # bytes of decoded slide tiles OpenSlide keeps (its default is 32 MiB)
OVERLAY_WIDTH = 1600  # width of NAME_overlay.png (thumbnail and map side by side)
JOB_FLAGS = {"--images": ("tta", "predictions", "scale_rule"),  # the flags of one job only
             "--map": ("out_dir", "stride", "no_mask", "overwrite", "shard")}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),  # the first sentence, whole
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="+", help="a checkpoint written by train_teacher.py or distill.py, or an "
                                            ".onnx file written by export.py")
    job = p.add_mutually_exclusive_group(required=True)
    job.add_argument("--images", default=None, metavar="DIR",
                     help="predict every image under DIR (any nesting; hidden files ignored)")
    job.add_argument("--map", default=None, metavar="IMAGE_OR_FOLDER",
                     help="tissue map of a large image or whole slide (or of every one in a folder): PNG "
                          "map and overlay, tiles CSV, QuPath GeoJSON, summary JSON")
    p.add_argument("--predictions", default=None, metavar="FILE.csv",
                   help="--images: the CSV written (unset: <folder name>_predictions.csv)")
    p.add_argument("--tta", action="store_true", help="--images: average the logits of each tile and its mirror")
    p.add_argument("--out-dir", default=None, help="--map: folder of the outputs (unset: maps)")
    p.add_argument("--stride", type=float, default=None, metavar="UM",
                   help="--map: step between windows in micrometres (unset: the window, no overlap; "
                        "Kather 2016 used a third of it); overlapping windows are averaged per cell")
    p.add_argument("--no-mask", action="store_true",
                   help="--map: classify every window, background too (else only tissue windows)")
    p.add_argument("--overwrite", action="store_true", help="--map: redo images that are done")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="--map: only every N-th image from the K-th (0-based), for cluster array jobs")
    mpkd.add_scale_and_stain_flags(p, "--images", "for --map the image's metadata; for --images the training "
                                   "tiles' scale, i.e. resized whole", "the folder or large image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (a checkpoint; .onnx: the CPU)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="a checkpoint in bf16 autocast (default fp32, as the exported file computes)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Refuse flags of the other job, or values out of range, before any work."""
    if len(args.model) != 1:
        raise mpkd.UserError(f"{'--images predicts' if args.images else '--map classifies'} with one model, "
                             f"{len(args.model)} given")
    job, other = ("--images", "--map") if args.images else ("--map", "--images")
    if given := [f for f in JOB_FLAGS[other] if getattr(args, f) not in (None, False)]:
        raise mpkd.UserError(f"--{given[0].replace('_', '-')} is for {other}, not {job}")
    if args.image_mpp is not None and not args.image_mpp > 0:
        raise mpkd.UserError(f"--image-mpp {args.image_mpp} must be positive: microns per pixel (0.5 at 20x)")
    if args.stain_ref and not args.stain_norm:
        raise mpkd.UserError("--stain-ref is for --stain-norm")
    if args.any_mpp and not args.image_mpp:
        raise mpkd.UserError("--any-mpp is for --image-mpp")


# ----------------------------------------------------------------------------------------------
# The model: a checkpoint, or a file written by export.py (so that a lab checks the deployed file
# with the same command)


def load_predictor(path, device: torch.device, precision: str) -> dict:
    """What --images and --map classify with: the model's identity (classes, image size), the
    training tiles' field of view in micrometres, their stain, the file's SHA-256 prefix, and
    `logits`, a function of uint8 (N, 3, S, S) CPU images returning (N, C) CPU logits."""
    if str(path).endswith(".onnx"):
        session, meta = open_onnx(path)
        made = {"identity": json.loads(meta["identity"]), "tile_um": float(meta["tile_um"]),
                "stain": json.loads(meta["stain"]), "logits": lambda x: onnx_logits(session, x)}
    else:
        ckpt = mpkd.load_file(path, mpkd.CHECKPOINT_FORMAT, mpkd.FILE_KINDS[mpkd.CHECKPOINT_FORMAT]
                              + ", or an .onnx file written by export.py")
        model = mpkd.to_device(mpkd.load_model(ckpt, path), device)
        made = {"identity": ckpt["identity"], "tile_um": ckpt["tile"]["um"], "stain": ckpt["stain"],
                "logits": lambda x: mpkd.predict(model, x.to(device), precision).cpu()}
    return {**made, "classes": made["identity"]["classes"], "size": made["identity"]["img_size"],
            "path": str(path), "sha256": mpkd.file_sha256(path)}


def open_onnx(path):
    """An ONNX Runtime session for a file written by export.py, and its metadata; anything else is
    a clear error."""
    _, ort = mpkd.require("onnx", "onnxruntime", feature=".onnx models", install="onnx onnxscript onnxruntime")
    if not Path(path).is_file():
        raise mpkd.UserError(f"{path} does not exist")
    try:
        options = ort.SessionOptions()  # idle threads sleep rather than spin: window reading needs the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # truncated, not ONNX, an operator this runtime lacks
        raise mpkd.UserError(f"{path} is not a readable ONNX model ({type(err).__name__})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("mpkd_format") != mpkd.ONNX_FORMAT:
        raise mpkd.UserError(f"{path} is an ONNX model but not one written by export.py (no "
                             f"{mpkd.ONNX_FORMAT} metadata: classes and image size are unknown)")
    return session, meta


def onnx_logits(session, images: torch.Tensor) -> torch.Tensor:
    """Logits (N, C) of uint8 (N, 3, S, S) CPU images from an exported model, ONNX_CHUNK at a time."""
    tiles = images.permute(0, 2, 3, 1).contiguous().numpy()  # the exported input: (N, S, S, 3)
    return torch.cat([torch.from_numpy(session.run(["logits"], {"images": tiles[i:i + ONNX_CHUNK]})[0])
                      for i in range(0, len(tiles), ONNX_CHUNK)])


# ----------------------------------------------------------------------------------------------
# New tiles (--images): no labels, the model's own preprocessing


def predict_images(args, device: torch.device) -> dict:
    """--images: every image under the folder predicted, the CSV written and the summary printed."""
    folder = Path(args.images)
    if not folder.is_dir():
        raise mpkd.UserError(f"--images {folder} is not a folder")
    files = mpkd.list_images(folder)
    if not files:
        raise mpkd.UserError(f"--images {folder} holds no images ({' '.join(mpkd.IMAGE_SUFFIXES)}; "
                             f"hidden files are ignored)")
    out = args.predictions or f"{folder.resolve().name}_predictions.csv"
    mpkd.check_writable(out)
    predictor = load_predictor(args.model[0], device, mpkd.pick_precision(device, args.amp))
    rule = mpkd.scale_rule(args.scale_rule, args.image_mpp)
    if rule == "whole" and predictor["path"].endswith(".onnx"):
        raise mpkd.UserError(f"--scale-rule whole makes inputs of another size than the {predictor['size']} px "
                             f"{predictor['path']} takes: use crop or cover, or the checkpoint")
    tile_um = args.tile_um or predictor["tile_um"]
    views, words = mpkd.tile_plan(folder / files[0], predictor["size"], rule, args.image_mpp, tile_um)
    mpkd.check_scale(args.image_mpp, args.any_mpp, words)
    if views > mpkd.MANY_VIEWS:
        print(f"note: {words}: about {views * len(files)} views of {len(files)} tiles to read and predict")
    target = mpkd.stain_target(args.stain_norm, args.stain_ref, predictor["stain"], predictor["path"])
    pred = predict_folder(folder, files, predictor, rule, args.image_mpp, tile_um, target, args.stain_norm, args.tta)
    print("\n".join(images_report(pred, out)))
    return pred


def predict_folder(folder: Path, files: list[str], predictor: dict, rule: str, image_mpp: float | None,
                   tile_um: float, target: dict | None, stain_norm: str | None, tta: bool) -> dict:
    """Predict `files` under `folder`, in chunks (memory stays flat for any folder size), each
    brought to the model's scale by the scale rule (and restained to `target`, the stain estimated
    over the whole folder first for macenko); an unreadable file is listed with its reason and the
    rest are predicted."""
    read = lambda chunk: mpkd.decode_views(folder, chunk, predictor["size"], rule, image_mpp, tile_um)
    results, bad, views, unchanged, source = [], {}, 0, 0, None
    if stain_norm == "macenko":  # one estimate for the folder, from a sample of its tiles first
        sample = files[::-(-len(files) // mpkd.STAIN_TILES)]  # the tiles whose estimates give the median
        source = mpkd.folder_stain([views for views, _ in read(sample)[0]])
    progress = mpkd.Progress(len(files), "images", print)
    for chunk in (files[i:i + IMAGES_CHUNK] for i in range(0, len(files), IMAGES_CHUNK)):
        groups, errors = read(chunk)
        bad.update(errors)
        if target is not None:
            groups, how = mpkd.stain_normalised(groups, target, stain_norm, source)
            unchanged += how["stain_unchanged"]
        views += sum(len(o) for _, o in groups)
        if groups:
            probs = torch.softmax(mpkd.view_logits(predictor["logits"], groups, len(chunk), tta), 1)
            results += [(f, probs[j]) for j, f in enumerate(chunk) if f not in errors]
        progress.update(len(chunk))
    return {"checkpoint": predictor["path"], "classes": predictor["classes"], "results": results, "bad": bad,
            "files": files, "scale": mpkd.rule_line(rule, views, len(results)), "stain": target and
            f"stain normalised ({stain_norm}) to {target['from']}"
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
    mpkd.write_csv(["file", "predicted", "probability", *(f"p_{c}" for c in classes), "error"], rows, out)
    counts = {c: sum(r[1] == c for r in rows) for c in classes}
    lines = [f"{len(pred['results'])} of {len(pred['files'])} images predicted with {pred['checkpoint']}; "
             f"wrote {out}", pred["scale"], *([pred["stain"]] if pred["stain"] else []), "",
             f"{'predicted class':<24}{'images':>8}", *(f"{c:<24}{n:>8}" for c, n in counts.items())]
    if pred["bad"]:
        lines += ["", f"{len(pred['bad'])} unreadable (listed in {out} with the reason): "
                      + mpkd.first_few([f"{f} ({why})" for f, why in pred["bad"].items()])]
    return lines


# ----------------------------------------------------------------------------------------------
# Tissue maps (--map): a model trained on tiles of a known size in micrometres, applied to a large
# image or a whole slide window by window. Level-0 pixels are the image's own; the map lives at
# cell resolution (one cell per stride), never at the image's. Reading first (openslide imported
# only for slide formats), then the arithmetic of windows, levels, the tissue mask and the cells.


def import_openslide():
    """openslide, or a one-line error saying how to get it."""
    return mpkd.require("openslide", feature="whole-slide images", install="openslide-python openslide-bin")[0]


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
        """At least `side` px long: box averages over a whole number of pixels (faster than a resize)."""
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
    PlainImage (a TIFF in strips is one without importing OpenSlide)."""
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
    level, read_px, stride = plan["level"], plan["read_px"], plan["stride_px"]

    def read(run):  # one region for a run of neighbouring windows, cut into the windows
        (x, y), offsets, span = run_region(run, reader.downsamples[level], read_px)
        region = reader.read(x, y, level, span, read_px)
        return [mpkd.model_input(region.crop((o, 0, o + read_px, read_px)), size) for o in offsets]

    n = len(origins)  # a small first batch: classifying starts a few windows after opening, not MAP_BATCH
    edges = sorted({0, n, *range(min(MAP_BATCH // 4, n), n, MAP_BATCH)})
    parts = [origins[a:b] for a, b in zip(edges, edges[1:])]
    submit = lambda part: pool.map(read, [part[run] for run in window_runs(part, stride)])
    pending = [submit(part) for part in parts[:2]]
    for i in range(len(parts)):
        batch = torch.from_numpy(np.stack([w for run in pending.pop(0) for w in run]))  # popped: in `batch` now
        if i + 2 < len(parts):
            pending.append(submit(parts[i + 2]))
        yield batch


TISSUE_SATURATION = (15, 38)  # Otsu's threshold on saturation (0-255) is clipped into this range
MIN_TISSUE = 0.5  # a window is classified when at least this share of its mask pixels is tissue
MASK_PX = 8  # at least this many mask pixels per window side judge a window's tissue share


def pick_level(downsamples: list[float], image_mpp: float, want_mpp: float) -> int:
    """The pyramid level to read windows from: the coarsest whose resolution is still at least the
    one needed (microns per pixel at most `want_mpp`, 1% slack for rounded metadata); level 0 when
    even it is coarser than needed."""
    fine_enough = [i for i, d in enumerate(downsamples) if image_mpp * d <= want_mpp * 1.01]
    return max(fine_enough, key=lambda i: downsamples[i]) if fine_enough else 0


def window_origins(width: int, height: int, window: int, stride: int) -> np.ndarray:
    """Level-0 (x, y) of every whole window on a grid of `stride` from (0, 0): (n, 2), row by row.
    Windows are not shifted to fit the edges (a shifted window would put its classes in the wrong
    cells); the strip an edge leaves is not classified."""
    xs, ys = np.arange(0, width - window + 1, stride), np.arange(0, height - window + 1, stride)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)


def run_region(origins: np.ndarray, downsample: float, read_px: int) -> tuple[tuple[int, int], list[int], int]:
    """The one region that holds a run of neighbouring windows on a row (their level-0 (x, y)), read
    from a level of this downsample: its level-0 origin, on a whole pixel of that level (a fraction
    of one sends OpenSlide down a path that interpolates: each window blurred, the read slower),
    each window's offset in it and its width, both in level pixels. A window lands on the level
    pixel nearest its own position: within half a level pixel."""
    level_x = np.rint(origins[:, 0] / downsample).astype(np.int64)
    first = level_x[0], int(np.rint(origins[0, 1] / downsample))
    offsets = (level_x - first[0]).tolist()
    return (round(first[0] * downsample), round(first[1] * downsample)), offsets, offsets[-1] + read_px


def cell_grid(width: int, height: int, stride: int) -> tuple[int, int]:
    """(rows, columns) of the map: one cell per `stride` level-0 pixels, the last one partial."""
    return -(-height // stride), -(-width // stride)


def window_cells(origins: np.ndarray, window: int, stride: int) -> np.ndarray:
    """For each window, the cells whose centre lies inside it: (n, 4) = row0, row1, col0, col1
    (end exclusive). With stride = window each window is one cell; with a third, 3 x 3 cells."""
    first = origins // stride  # the grid starts at 0, so a window starts on a cell edge
    span = -(-(window - stride // 2) // stride) if window > stride // 2 else 1  # centres inside
    return np.stack([first[:, 1], first[:, 1] + span, first[:, 0], first[:, 0] + span], 1)


def accumulate(sums: np.ndarray, counts: np.ndarray, cells: np.ndarray, probs: np.ndarray) -> None:
    """Add each window's class probabilities (n, C) to the cells it covers: `sums` (R, K, C) and
    `counts` (R, K) in place; a cell's probabilities are then sums / counts, the mean over the
    windows that cover it."""
    for (r0, r1, c0, c1), p in zip(cells, probs):
        sums[r0:r1, c0:c1] += p
        counts[r0:r1, c0:c1] += 1


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t that maximises the between-class variance of
    values <= t and > t."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weight = np.cumsum(hist)  # pixels at or below t
    mass = np.cumsum(hist * np.arange(256))
    total, total_mass = weight[-1], mass[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * weight - total * mass) ** 2 / (weight * (total - weight))
    return int(np.nanargmax(np.where(np.isfinite(between), between, np.nan))) if total else 0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (0-255), (max - min) * 255 // max, of a uint8 RGB image (H, W, 3): glass is
    white or grey, stained tissue is not. PIL's HSV conversion gives exactly this (tested), faster than numpy."""
    return np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"))[..., 1]


def tissue_mask(thumbnail: np.ndarray) -> tuple[np.ndarray, int]:
    """Tissue pixels of an RGB thumbnail (H, W, 3) and the saturation threshold used: Otsu's,
    clipped into TISSUE_SATURATION so that an image that is all tissue (or all glass) is not
    split in two."""
    sat = saturation(thumbnail)
    threshold = int(np.clip(otsu_threshold(sat), *TISSUE_SATURATION))
    return sat > threshold, threshold


def tissue_share(mask: np.ndarray, scale: float, origins: np.ndarray, window: int) -> np.ndarray:
    """The share of tissue pixels in each window's footprint on the mask (mask pixels per level-0
    pixel: `scale`): (n,) in [0, 1]."""
    integral = np.pad(mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32), ((1, 0), (1, 0)))  # < 2**31 px
    h, w = mask.shape
    lo = np.clip((origins * scale).astype(np.int64), 0, [w - 1, h - 1])  # (n, 2): x0, y0
    hi = np.clip(np.ceil((origins + window) * scale).astype(np.int64), lo + 1, [w, h])  # x1, y1
    (x0, y0), (x1, y1) = lo.T, hi.T
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


def shard(items: list, spec: str) -> list:
    """Every N-th item from K, for --shard K/N (0 <= K < N): N jobs of a cluster array cover every
    item exactly once, with no scheduler of their own."""
    k, n = map(int, spec.split("/")) if re.fullmatch(r"\d+/\d+", spec) else (0, 0)
    if not k < n:
        raise mpkd.UserError(f"--shard {spec} must be K/N with 0 <= K < N, e.g. 0/4")
    return items[k::n]


# ----------------------------------------------------------------------------------------------
# One image's map: plan the windows, classify them, and write the five outputs


def plan_map(path: Path, predictor: dict, settings: dict, image_mpp: float | None, target: dict | None) -> dict:
    """Everything before the windows of one image: open it, its scale, the level, window and stride
    (in level-0 pixels), the thumbnail, the tissue mask and the windows to classify (`todo`,
    level-0 origins); with --stain-norm macenko the image's stain, estimated once from its tissue."""
    start = time.perf_counter()  # an image's seconds: opening, thumbnail and mask count too
    reader = open_map_image(path)
    mpp = image_mpp or reader.mpp
    if not mpp:
        raise mpkd.UserError(f"{path.name} records no microns per pixel: pass --image-mpp (e.g. 0.25 "
                             f"for a 40x scan, 0.5 for 20x)")
    tile_um = settings["window_um"]
    window, stride = round(tile_um / mpp), round(settings["stride_um"] / mpp)
    if stride < 1 or stride > window:
        raise mpkd.UserError(f"--stride {settings['stride_um']} must be between {mpp:.3g} um and the window, "
                             f"{tile_um:.4g} um")
    level = pick_level(list(reader.downsamples), mpp, tile_um / predictor["size"])
    width, height = reader.dimensions[0]
    origins = window_origins(width, height, window, stride)
    # the thumbnail the overlay is made from and the tissue mask reduced from: MASK_PX pixels per
    # window, its longest side at least 1024 (the overlay's detail), at most 4096 (its memory)
    thumb = reader.thumbnail(int(np.clip(MASK_PX * max(width, height) / window, 1024, 4096)))
    coarse = thumb.reduce(max(1, int(thumb.width / width * window / MASK_PX)))  # the overlay needs more
    mask, threshold = tissue_mask(np.asarray(coarse))
    share = tissue_share(mask, coarse.width / width, origins, window)
    stain = None
    if target is not None and settings["stain_norm"] == "macenko":
        try:
            stain = mpkd.macenko_fit(torch.from_numpy(np.asarray(coarse)[mask]))
        except ValueError as err:
            raise mpkd.UserError(f"{path.name} holds too little stained tissue to estimate its stain ({err})") from None
    read_px = max(1, round(window / reader.downsamples[level]))
    note = (f"note: {path.name}: its windows are {read_px} px, enlarged to the network's {predictor['size']} px: "
            f"at {mpp:g} um/px ({'--image-mpp' if image_mpp else 'its metadata'}) the image is much coarser than the "
            f"training tiles; {len(origins)} windows" if read_px < predictor["size"] / 2 else None)
    return {"reader": reader, "thumbnail": np.asarray(thumb), "mpp": mpp, "note": note, "read_px": read_px,
            "mpp_from": "--image-mpp" if image_mpp else "metadata", "level": level, "tile_um": tile_um,
            "level_mpp": mpp * reader.downsamples[level], "window_px": window, "stride_px": stride,
            "todo": origins if not settings["mask"] else origins[share >= MIN_TISSUE], "n_windows": len(origins),
            "n_tissue": int((share >= MIN_TISSUE).sum()), "threshold": threshold, "size": (width, height),
            "stain": stain, "tint": tuple(int(v) for v in np.median(np.asarray(coarse)[mask], 0)) if mask.any()
            else (255, 255, 255),  # the typical tissue colour, under the overlay's legend swatches
            "setup_seconds": time.perf_counter() - start}


def classify_windows(path: Path, plan: dict, predictor: dict, target: dict | None, say) -> dict:
    """Read and classify the plan's windows: the plan with, per classified window, its level-0
    origin and class probabilities, and the image's seconds (setup and windows, not the time it
    waited for the image before it); the image is let go."""
    todo, reader = plan.pop("todo"), plan.pop("reader")
    probs, start = [], time.perf_counter()
    progress = mpkd.Progress(len(todo), "windows", say, label=f"{path.name}: ")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for batch in window_batches(reader, todo, plan, predictor["size"], pool):
            if target is not None:  # from the image's stain, or each window's own
                batch = mpkd.normalise_stain(batch, plan["stain"], target)[0]
            probs.append(torch.softmax(predictor["logits"](batch).float(), 1).numpy())
            progress.update(len(batch))
    return {**plan, "origins": todo, "seconds": plan["setup_seconds"] + time.perf_counter() - start,
            "probs": np.concatenate(probs) if probs else np.zeros((0, len(predictor["classes"])), np.float32)}


def cell_map(plan: dict, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean class probabilities per cell (R, K, C) and the class of each cell (R, K), -1 where no
    window was classified."""
    rows, cols = cell_grid(*plan["size"], plan["stride_px"])
    sums, counts = np.zeros((rows, cols, len(classes)), np.float32), np.zeros((rows, cols), np.int32)
    cells = window_cells(plan["origins"], plan["window_px"], plan["stride_px"])
    accumulate(sums, counts, cells, plan["probs"])
    mean = sums / np.maximum(counts, 1)[..., None]
    return mean, np.where(counts > 0, mean.argmax(-1), -1)


CLASS_COLOURS = {  # fixed per class name (Kather 2016's and NCT-CRC-HE-100K's), so maps compare
    "TUMOR": (200, 30, 45), "TUM": (200, 30, 45), "STROMA": (255, 150, 200), "STR": (255, 150, 200),
    "COMPLEX": (150, 70, 170), "MUS": (150, 70, 170), "LYMPHO": (40, 70, 200), "LYM": (40, 70, 200),
    "DEBRIS": (130, 90, 40), "DEB": (130, 90, 40), "MUCOSA": (60, 170, 70), "NORM": (60, 170, 70),
    "MUC": (120, 210, 210), "ADIPOSE": (250, 220, 60), "ADI": (250, 220, 60),
    "EMPTY": (225, 225, 225), "BACK": (225, 225, 225),
}


UNCLASSIFIED = (245, 245, 245)  # cells no window classified, on every map
# CIE76 delta E between a map's derived colours and all others (tested; 2.3 is just noticeable side by side)
MIN_COLOUR_DISTANCE = 25.0


def lab(rgb) -> np.ndarray:
    """CIELAB (D65) of sRGB colours (..., 3) in 0..255: the space where colour distance is perceived."""
    c = np.asarray(rgb, np.float64) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)  # linear light
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    f = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(f > (6 / 29) ** 3, np.cbrt(f), f / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# Colours for class names without a fixed one: the sRGB grid of steps of 51, neither near-black nor
# near-white (CIELAB lightness 30-85), from which class_palette picks the farthest from those in use
_CANDIDATES = np.array([(r, g, b) for r in range(0, 256, 51) for g in range(0, 256, 51) for b in range(0, 256, 51)])
_CANDIDATES = _CANDIDATES[(lab(_CANDIDATES)[:, 0] > 30) & (lab(_CANDIDATES)[:, 0] < 85)]
_CANDIDATES_LAB = lab(_CANDIDATES)


def class_palette(classes: list[str]) -> list[tuple[int, int, int]]:
    """The RGB colour of each class on a map: fixed for Kather's and NCT's names (a folder's '01_'
    prefix and case ignored), so their maps compare; every other name gets, in class order, the
    candidate colour farthest (in CIELAB) from all colours already on this map, the fixed ones and
    the light grey of unclassified cells included: distinct by construction (at least
    MIN_COLOUR_DISTANCE apart for 12 classes and more, tested)."""
    fixed = {c: CLASS_COLOURS[mpkd.class_key(c)] for c in classes if mpkd.class_key(c) in CLASS_COLOURS}
    used = [lab(UNCLASSIFIED), *(lab(v) for v in fixed.values())]
    for name in classes:
        if name not in fixed:
            far = np.min(np.linalg.norm(_CANDIDATES_LAB[:, None] - np.array(used)[None], axis=-1), axis=1)
            fixed[name] = tuple(int(v) for v in _CANDIDATES[int(far.argmax())])
            used.append(lab(fixed[name]))
    return [fixed[name] for name in classes]


LEGEND_WIDTH = 260  # pixels of the legend beside a map or an overlay
OVERLAY_ALPHA = 150  # opacity (of 255) of the class colours laid over the tissue


def legend(draw, x: int, y: int, classes: list[str], shares: dict[str, float], tint=None) -> None:
    """Class swatches and names with their share of the classified area, from (x, y); with `tint`
    (the tissue colour under the overlay) each swatch has two halves: the class colour (the map's,
    QuPath's) and that colour as the overlay shows it on tissue."""
    for i, (name, colour) in enumerate([*zip(classes, class_palette(classes)), ("not classified", UNCLASSIFIED)]):
        top = y + 22 * i
        draw.rectangle((x, top, x + 18, top + 16), fill=colour, outline="black")
        if tint is not None and name in shares:
            a = OVERLAY_ALPHA / 255
            draw.rectangle((x + 19, top, x + 36, top + 16), outline="black",
                           fill=tuple(round(a * c + (1 - a) * t) for c, t in zip(colour, tint)))
        draw.text((x + 44, top + 2), name + (f"  {shares[name]:.0%}" if name in shares else ""), fill="black")


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
    palette = np.array(class_palette(classes) + [UNCLASSIFIED], np.uint8)  # cells of -1: the last, not classified
    k = max(1, min(24, 1000 // max(rows, cols)))
    return titled(Image.fromarray(palette[cells]).resize((cols * k, rows * k), Image.NEAREST), title, classes, shares)


def overlay_picture(plan: dict, cells: np.ndarray, classes: list[str], title: list[str],
                    shares: dict[str, float]) -> Image.Image:
    """The thumbnail beside the thumbnail with the map laid over it (classified cells only), at most
    OVERLAY_WIDTH wide and high, titled, with a legend whose swatches show each class colour as the
    overlay tints the image's typical tissue: a picture a pathologist reads without another file."""
    thumb = Image.fromarray(plan["thumbnail"])
    fit = min(1.0, (OVERLAY_WIDTH - 10) / 2 / thumb.width, OVERLAY_WIDTH / thumb.height)
    thumb = thumb.resize((max(1, round(thumb.width * fit)), max(1, round(thumb.height * fit))), Image.BILINEAR)
    rows, cols = cells.shape
    palette = np.array([c + (OVERLAY_ALPHA,) for c in class_palette(classes)] + [(0, 0, 0, 0)], np.uint8)
    side = plan["stride_px"] * (thumb.width / plan["size"][0])  # a cell on the thumbnail
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


def write_map(path: Path, plan: dict, predictor: dict, settings: dict, target: dict | None, out_dir: Path) -> dict:
    """The five outputs of one image; the summary last, so that a complete summary means done."""
    classes, name, w, start = predictor["classes"], path.stem, plan["window_px"], time.perf_counter()
    mean, cells = cell_map(plan, classes)
    classified, window_class = cells >= 0, plan["probs"].argmax(1)
    summary = {
        "image": str(path), "size_px": list(plan["size"]), "mpp": plan["mpp"], "mpp_from": plan["mpp_from"],
        "level": plan["level"], "level_mpp": plan["level_mpp"],
        "window": {"um": plan["tile_um"], "level0_px": w, "read_px": plan["read_px"]},
        "stride": {"um": plan["stride_px"] * plan["mpp"], "level0_px": plan["stride_px"]},
        "windows": {"total": plan["n_windows"], "tissue": plan["n_tissue"], "classified": len(window_class)},
        "tissue_threshold": plan["threshold"],
        "cells": {"rows": cells.shape[0], "columns": cells.shape[1], "classified": int(classified.sum())},
        # by area: each classified cell (stride x stride) its averaged class; by windows: each window its own
        "class_fractions_by_area": {c: float((cells == i).sum() / max(classified.sum(), 1))
                                    for i, c in enumerate(classes)},
        "class_fractions_by_windows": {c: float((window_class == i).sum() / max(len(window_class), 1))
                                       for i, c in enumerate(classes)},
        "settings": settings, "overlay_tint": list(plan["tint"]),  # the tissue under the legend's tints
        "model": {"path": predictor["path"], "identity": predictor["identity"], "sha256": predictor["sha256"]},
        # stain_norm's source None: per window
        "stain_norm": target and {"mode": settings["stain_norm"], "target": target, "source": plan["stain"]},
        "seconds": plan["seconds"], "windows_per_s": len(window_class) / max(plan["seconds"], 1e-9),
        "setup_seconds": plan["setup_seconds"]}
    named = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    title = [f"{path.name}, mapped by {Path(predictor['path']).name} ({named})",
             f"{plan['mpp']:.3g} um/px ({plan['mpp_from']}); windows of {plan['tile_um']:.4g} um every "
             f"{summary['stride']['um']:.4g} um: {windows_line(summary['windows'])}; shares of the classified area"]
    shares = summary["class_fractions_by_area"]
    for picture, suffix, level in ((map_picture(cells, classes, title, shares), "map", 6),
                                   (overlay_picture(plan, cells, classes, title, shares), "overlay", 1)):
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", compress_level=level)  # the photographic overlay: fast, a little larger
        mpkd.write_bytes_atomic(buffer.getvalue(), out_dir / f"{name}_{suffix}.png")
    mpkd.write_csv(["x", "y", "size", "class", "probability", *(f"p_{c}" for c in classes)],  # every window
                   [[int(x), int(y), w, classes[int(p.argmax())], float(p.max()), *map(float, p)]
                    for (x, y), p in zip(plan["origins"], plan["probs"])], out_dir / f"{name}_tiles.csv")
    colours, s = class_palette(classes), plan["stride_px"]
    features = [{"type": "Feature",  # QuPath: File > Import objects; level-0 pixels, what the map shows:
                 "geometry": {"type": "Polygon",  # one square per classified cell (= window without --stride)
                              "coordinates": [[[c * s, r * s], [c * s + s, r * s], [c * s + s, r * s + s],
                                               [c * s, r * s + s], [c * s, r * s]]]},
                 "properties": {"objectType": "tile", "measurements": {"probability": float(mean[r, c, k])},
                                "classification": {"name": classes[k], "color": list(colours[k])}}}
                for r, c in zip(*map(np.ndarray.tolist, np.nonzero(classified))) for k in [int(cells[r, c])]]
    mpkd.write_text_atomic(json.dumps({"type": "FeatureCollection", "features": features}), out_dir / f"{name}.geojson")
    summary.update(output_seconds=time.perf_counter() - start, complete=True)
    mpkd.write_text_atomic(json.dumps(summary, indent=1), out_dir / f"{name}_summary.json")
    return summary


# ----------------------------------------------------------------------------------------------
# A file or folder of images (--map): each image once, skipped when done, never two models' maps


def done_by_another(summary: dict, predictor: dict, settings: dict, image_mpp: float | None) -> str | None:
    """What differs between a done image's summary and this run: another model (by its file's
    SHA-256 prefix and identity), other settings, or another scale (--image-mpp against what the
    image was mapped at)."""
    model = summary["model"]
    if model["sha256"] != predictor["sha256"] or model["identity"] != predictor["identity"]:
        return f"model ({model['path']}, not {predictor['path']})"
    differ = [f"{k} {v}, not {settings[k]}" for k, v in summary["settings"].items() if settings.get(k) != v]
    if image_mpp is not None and not math.isclose(summary["mpp"], image_mpp):
        differ.append(f"scale {summary['mpp']:g} um/px, not --image-mpp {image_mpp:g}")
    elif image_mpp is None and summary["mpp_from"] == "--image-mpp":
        differ.append(f"scale --image-mpp {summary['mpp']:g}, not the image's own")
    return f"setting ({'; '.join(differ)})" if differ else None


def map_images(args, device: torch.device) -> list[str]:
    """--map: the images of the file or folder (of this --shard) mapped with the model; no output
    folder is left behind where nothing was written (a wrong model, no scale)."""
    everything = map_inputs(Path(args.map))
    images = shard(everything, args.shard) if args.shard else everything
    if not images:  # more shards than images: this job of the array has nothing to do
        print(f"shard {args.shard} holds no images: {args.map} has {len(everything)}, fewer than the shards")
        return []
    out_dir = Path(args.out_dir or "maps")
    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        mpkd.check_writable(out_dir / "x_summary.json")
        predictor = load_predictor(args.model[0], device, mpkd.pick_precision(device, args.amp))
        target = mpkd.stain_target(args.stain_norm, args.stain_ref, predictor["stain"], predictor["path"])
        tile_um = args.tile_um or predictor["tile_um"]
        if args.image_mpp:
            mpkd.check_scale(args.image_mpp, args.any_mpp, f"a window of the {tile_um:.4g} um training field would be "
                                                           f"{round(tile_um / args.image_mpp)} px of the image")
        settings = {"window_um": tile_um, "stride_um": args.stride or tile_um, "mask": not args.no_mask,
                    "stain_norm": args.stain_norm, "stain_ref": args.stain_ref}  # what a map depends on
        return map_folder(images, predictor, settings, args.image_mpp, target, args.overwrite, out_dir)
    finally:
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def map_folder(images: list[Path], predictor: dict, settings: dict, image_mpp: float | None, target: dict | None,
               overwrite: bool, out_dir: Path) -> list[str]:
    """Each image into its five outputs; an image whose complete summary exists is skipped (or
    refused, where another model or other settings made it), an unreadable one is named and the
    rest go on."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # large is what a map is for
    lines, failed, todo, mapped = [], {}, [], []  # mapped: windows classified per image whose outputs are written

    def fail(path, err):  # unreadable, truncated, no scale, a format OpenSlide refuses: named, the rest go on
        failed[path.name] = str(err) if isinstance(err, mpkd.UserError) else f"{type(err).__name__}: {err}"
        print(f"{path.name}: failed (why: in the error at the end)", flush=True)

    for path in images:
        done = out_dir / f"{path.stem}_summary.json"
        summary = json.loads(done.read_text()) if done.exists() and not overwrite else {}
        if not summary.get("complete"):
            todo.append(path)
        elif differ := done_by_another(summary, predictor, settings, image_mpp):
            # never two models' (or settings') maps in one folder without being asked
            fail(path, mpkd.UserError(f"{done} was made by another {differ}: --overwrite replaces it, "
                                      f"--out-dir DIR keeps both"))
        else:
            lines.append(f"{path.name}: done before ({done}) by this model and settings; --overwrite redoes it")
            print(lines[-1], flush=True)

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
    plan_of = lambda path: side.submit(plan_map, path, predictor, settings, image_mpp, target)
    with ThreadPoolExecutor(max_workers=2) as side:
        planned = plan_of(todo[0]) if todo else None
        for i, path in enumerate(todo):
            plan, planned = planned, plan_of(todo[i + 1]) if i + 1 < len(todo) else None
            try:
                plan = plan.result()
                if note := plan.pop("note"):
                    print(note, flush=True)
                plan = classify_windows(path, plan, predictor, target, print)
            except Exception as err:
                fail(path, err)
                continue
            if writing:
                finish(*writing)
            writing = path, side.submit(write_map, path, plan, predictor, settings, target, out_dir)
        if writing:
            finish(*writing)
    if len(todo) > 1:
        seconds = time.perf_counter() - start
        lines.append(f"{len(mapped)} of {len(todo)} images mapped in {seconds:.1f} s, outputs included: "
                     f"{sum(mapped)} windows, {sum(mapped) / seconds:.0f} windows/s")
        print(lines[-1], flush=True)
    if failed:
        raise mpkd.UserError(f"{len(failed)} of {len(images)} images failed: "
                             + mpkd.first_few([f"{n} ({why})" for n, why in failed.items()], most=5))
    return lines


# ----------------------------------------------------------------------------------------------


def main(args):
    check_args(args)
    device = mpkd.pick_device(args.device)
    return map_images(args, device) if args.map else predict_images(args, device)


if __name__ == "__main__":
    try:
        main(get_args())
    except mpkd.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
