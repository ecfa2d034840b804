"""A tissue map of real tissue: the README's picture. A mosaic of the real tiles of two labs at
their own scale (Kather 2016's at 0.495 um/px; CRC-VAL-HE-7K's at 0.5 um/px, resampled to 0.495),
one row per Kather 2016 class, each tile's centre field of the model's own field of view, mapped by
predict.py with a student trained here on crops of the Kather tiles (or with --model).

    python docs/tissue-map.py                              # from the repository root; writes tissue-map/
    python docs/tissue-map.py --picture docs/pictures/tissue_map.png   # and copies the overlay there
    python docs/tissue-map.py --model tissue.pt --kather K_DIR --crc CRC_DIR   # your model, your copies

Reads the sample tiles in ../shared/data, or the first tiles of each class folder of --kather and
--crc (the full sets, as downloaded). Without --model it trains a MixNet-L teacher and a
Multi-Part KD MixNet-S student from scratch on 16 crops of each Kather tile (20 epochs each, 64 px;
a few minutes on 2 CPU cores): far too little to trust, which the picture's caption says.
"""

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import mpkd  # noqa: E402
import predict  # noqa: E402

KATHER = ROOT.parent / "shared" / "data" / "kather2016_samples"
CRC = ROOT.parent / "shared" / "data" / "crc_val_he_7k_samples"
MPP, KATHER_UM = 0.495, 150 * 0.495  # Kather 2016's scale and tile width: the mosaic's scale
CRC_MPP = 0.5
CRC_CLASS = {"TUM": "01_TUMOR", "STR": "02_STROMA", "MUS": "02_STROMA", "LYM": "04_LYMPHO", "DEB": "05_DEBRIS",
             "MUC": "05_DEBRIS", "NORM": "06_MUCOSA", "ADI": "07_ADIPOSE"}  # docs/crc-val-he-7k.csv
TRAIN = ["--img-size", "64", "--batch-size", "16", "--epochs", "20", "--device", "cpu", "--split-by", "group",
         "--test-frac", "0.34", "--val-frac", "0"]


def run(script: str, *argv, out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], check=True, cwd=out,
                   stdout=subprocess.DEVNULL)


def tiles(folder: Path, per_class: int) -> list[Path]:
    """The first `per_class` images of every class folder."""
    return [folder / name / f for name in sorted(p.name for p in folder.iterdir() if p.is_dir())
            for f in mpkd.list_images(folder / name)[:per_class]]


def crops(out: Path, kather: Path) -> Path:
    """16 crops of 100 px of three Kather tiles per class, and a groups file naming each crop's tile
    (so the split keeps a tile's crops on one side), as docs/generalisation.py trains on."""
    data, rows = out / "crops", ["file,group"]
    for path in tiles(kather, 3):
        (data / path.parent.name).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            for y in (0, 17, 33, 50):
                for x in (0, 17, 33, 50):
                    name = f"{path.parent.name}/{path.stem}_{x}_{y}.png"
                    img.convert("RGB").crop((x, y, x + 100, y + 100)).save(data / name)
                    rows.append(f"{name},{path.stem}")
    (out / "groups.csv").write_text("\n".join(rows) + "\n")
    return data


def student(out: Path, kather: Path) -> Path:
    """A Multi-Part KD student of a teacher trained from scratch, both on the crops, 20 epochs."""
    if not (out / "student.pt").exists():
        given = ["--data", crops(out, kather).name, "--groups", "groups.csv", *TRAIN]
        run("train_teacher.py", *given, "--no-pretrained", "--save-every", "2", out=out)
        run("distill.py", *given, "--multipart", out=out)
    return out / "student.pt"


def centre(path: Path, mpp: float, field_um: float, side: int) -> Image.Image:
    """The centre `field_um` of a tile at `mpp` um/px, resampled once to `side` px (0.495 um/px)."""
    with Image.open(path) as img:
        field = field_um / mpp
        start = ((img.width - field) / 2, (img.height - field) / 2)
        box = (start[0], start[1], start[0] + field, start[1] + field)
        return img.convert("RGB").resize((side, side), Image.BILINEAR, box=box)


def mosaic(path: Path, kather: Path, crc: Path, field_um: float) -> dict[tuple[int, int], tuple[str, str]]:
    """One row per Kather 2016 class: three of its Kather tiles, then two CRC-VAL-HE-7K tiles of each
    folder mapped to it, each tile's centre `field_um` (the model's window, so that one window is one
    tile) at 0.495 um/px; glass where a row ends; saved as a TIFF that records its scale. Returns
    {(x, y) of a tile in pixels: (its lab, its class)}."""
    if field_um > KATHER_UM:
        sys.exit(f"the model's field of view, {field_um:.4g} um, is larger than a Kather 2016 tile "
                 f"({KATHER_UM:.4g} um)")
    side = round(field_um / MPP)
    rows = {}
    for tile in tiles(kather, 3):
        rows.setdefault(tile.parent.name, []).append(("Kather 2016", centre(tile, MPP, field_um, side)))
    for tile in (t for t in tiles(crc, 2) if t.parent.name in CRC_CLASS):
        rows[CRC_CLASS[tile.parent.name]].append(("CRC-VAL-HE-7K", centre(tile, CRC_MPP, field_um, side)))
    width = max(len(r) for r in rows.values())
    canvas = Image.new("RGB", (width * side, len(rows) * side), (242, 242, 240))  # glass
    where = {}
    for y, name in enumerate(sorted(rows)):
        for x, (lab, tile) in enumerate(rows[name]):
            canvas.paste(tile, (x * side, y * side))
            where[x * side, y * side] = lab, name
    canvas.save(path, resolution_unit=3, resolution=1e4 / MPP)  # pixels per cm
    return where


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--model", default=None, help="a checkpoint or .onnx file to map with (unset: train one)")
    p.add_argument("--out", default="tissue-map", help="the folder written")
    p.add_argument("--picture", default=None, metavar="PNG", help="also copy the map's overlay there")
    p.add_argument("--kather", default=str(KATHER), help="Kather 2016's class folders")
    p.add_argument("--crc", default=str(CRC), help="CRC-VAL-HE-7K's class folders")
    args = p.parse_args()
    if not Path(args.kather).is_dir() or not Path(args.crc).is_dir():
        sys.exit(f"needs Kather 2016's and CRC-VAL-HE-7K's tiles: {args.kather} and {args.crc}")
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    model = Path(args.model).resolve() if args.model else student(out, Path(args.kather)).resolve()
    field_um = predict.load_predictor(model, torch.device("cpu"), "fp32")["tile_um"]
    where = mosaic(out / "mosaic.tif", Path(args.kather), Path(args.crc), field_um)
    run("predict.py", model, "--map", "mosaic.tif", "--out-dir", "maps", "--overwrite", out=out)
    overlay = out / "maps" / "mosaic_overlay.png"
    if args.picture:
        shutil.copyfile(overlay, args.picture)
    with open(out / "maps" / "mosaic_tiles.csv", newline="") as f:
        windows = [(where.get((int(r["x"]), int(r["y"])), ("glass", "")), r["class"]) for r in csv.DictReader(f)]
    print(f"{overlay}: {len(windows)} windows of {len(where)} tiles classified (the rest masked as glass) "
          f"by {model.name}")
    for lab in sorted({lab for lab, _ in where.values()}):
        mine = [(truth, said) for (tile_lab, truth), said in windows if tile_lab == lab]
        print(f"  {lab}: {sum(t == s for t, s in mine)} of {len(mine)} classified tiles as their row's class")


if __name__ == "__main__":
    main()
