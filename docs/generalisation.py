"""The measurements of docs/generalisation.md, on real tissue from two labs: the four Table II
models trained on crops of the 24 real Kather 2016 tiles, with and without --stain-augment, scored
on the 16 real CRC-VAL-HE-7K tiles (another lab, scanner and stain) by every scale rule, with and
without --stain-norm; then every model's agreement with itself when the 24 Kather tiles' stains are
shifted synthetically, with growing strength. Tiny data: every number comes with its interval.

    python docs/generalisation.py                  # from the repository root; writes generalisation/

Needs ../shared/data (both sample folders) and matplotlib for the picture. About 40 minutes on 2
CPU cores (Intel Xeon). Training runs in this process through each script's main(), as a user's
command line would; a model already trained is kept (delete generalisation/ to start over).
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import distill  # noqa: E402
import evaluate  # noqa: E402
import mpkd  # noqa: E402
import train_teacher  # noqa: E402

KATHER = ROOT.parent / "shared" / "data" / "kather2016_samples"
CRC = ROOT.parent / "shared" / "data" / "crc_val_he_7k_samples"
OUT = Path("generalisation")
CROP, STEP = 100, (0, 17, 33, 50)  # 16 crops of 100 px (49.5 um) per 150 px tile
TRAIN = ["--img-size", "64", "--batch-size", "16", "--epochs", "20", "--device", "cpu"]
SEEDS = (0, 1)
SPLIT = ["--split-by", "group", "--test-frac", "0.34", "--val-frac", "0"]  # whole source tiles to one side
METHODS = (("alone", ["--distill-weight", "0"]), ("vanilla", []), ("mpkd", ["--multipart"]))
STRENGTHS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # synthetic HED shifts, as --stain-augment draws them
COPIES = 16  # seeded shifted copies of every tile per strength
SWEEP = (0.02, 0.05, 0.1, 0.2, 0.4)  # --stain-augment strengths tried on the student alone


def quiet(fn, log: Path):
    """Run fn() with its printed lines going to `log`."""
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn()


def make_crops() -> Path:
    """The training data: 16 crops of every real Kather tile, and a groups file naming each crop's
    tile, so that the split keeps a tile's crops on one side."""
    data = OUT / "crops"
    if data.is_dir():
        return data
    rows = ["file,group"]
    for path in sorted(KATHER.glob("*/*.tif")):
        (data / path.parent.name).mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            for y in STEP:
                for x in STEP:
                    name = f"{path.parent.name}/{path.stem}_{x}_{y}.png"
                    img.convert("RGB").crop((x, y, x + CROP, y + CROP)).save(data / name)
                    rows.append(f"{name},{path.stem}")
    (OUT / "groups.csv").write_text("\n".join(rows) + "\n")
    return data


def train(data: Path, tag: str, extra: list[str], seed: int, names=("teacher", "alone", "vanilla", "mpkd")
          ) -> dict[str, Path]:
    """The teacher and the students of one setting (tag) and seed, trained unless already there."""
    folder = OUT / f"{tag}-seed{seed}"
    folder.mkdir(exist_ok=True)
    out, logits = {n: folder / f"{n}.pt" for n in names}, folder / "teacher_logits.pt"
    given = ["--data", str(data), "--groups", str(OUT / "groups.csv"), *SPLIT, *TRAIN, "--seed", str(seed), *extra]
    if "teacher" in names and not out["teacher"].exists():
        quiet(lambda: train_teacher.main(train_teacher.get_args(
            [*given, "--no-pretrained", "--save-every", "2", "--out", str(out["teacher"]),
             "--logits-out", str(logits)])),
            folder / "log.txt")
    for method, flags in METHODS:
        if method in names and not out[method].exists():
            quiet(lambda: distill.main(distill.get_args(
                [*given, "--teacher-logits", str(logits), *flags, "--out", str(out[method])])), folder / "log.txt")
    return out


def score(models: list[Path], *flags) -> list[dict]:
    """evaluate.py's rows for `models` (on their held-out crops, or with flags on another set)."""
    args = evaluate.get_args([*map(str, models), "--device", "cpu", *map(str, flags)])
    return quiet(lambda: evaluate.main(args), OUT / "evaluate.txt")


def external(models: list[Path], rule: str, norm: str | None) -> list[dict]:
    """The rows of `models` on the 16 CRC-VAL-HE-7K tiles, read by `rule` (resize: no scale given)."""
    scale = [] if rule == "resize" else ["--image-mpp", "0.5", "--scale-rule", rule]
    return score(models, "--external", CRC, "--class-map", ROOT / "docs" / "crc-val-he-7k.csv", *scale,
                 *(["--stain-norm", norm] if norm else []))


def wilson_legend(n: int) -> str:
    """The 95% Wilson interval of every count out of n, for the tables' bare counts."""
    return ", ".join(f"{k}: {lo:.0f}-{hi:.0f}%" for k in range(n + 1) for lo, hi in [mpkd.wilson_interval(k, n)])


def centre_tiles(size: int) -> torch.Tensor:
    """The 24 real Kather tiles' centre 100 px (a training crop's field), uint8 (24, 3, size, size)."""
    tiles = []
    for path in sorted(KATHER.glob("*/*.tif")):
        with Image.open(path) as img:
            start = (img.width - CROP) // 2
            tiles.append(mpkd.model_input(img.crop((start, start, start + CROP, start + CROP)), size))
    return torch.from_numpy(np.stack(tiles))


def shifted(tiles: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    """COPIES HED-shifted copies of every tile (copy-major), rounded to uint8 as an image would be."""
    repeated = tiles.repeat(COPIES, 1, 1, 1)
    draws = mpkd.stain_draws(len(repeated), strength, torch.Generator().manual_seed(seed))
    return mpkd.hed_jitter(repeated.float(), draws[:, 0], draws[:, 1]).round().to(torch.uint8)


def robustness(models: list[Path]) -> dict:
    """For a model (its seeds) and every strength: the share of shifted copies on which it predicts
    what it predicts on the unshifted tile, per tile averaged over the seeds (`per_tile`), and the
    mean over the 24 tiles with its 95% t-interval (tiles are the independent unit; copies and seeds
    are not)."""
    tiles, points = centre_tiles(64), []
    own = {}
    for i, strength in enumerate(STRENGTHS):
        per_tile = torch.zeros(len(tiles))
        for path in models:
            model = mpkd.load_model(mpkd.load_file(path, mpkd.CHECKPOINT_FORMAT), path)
            if path not in own:
                own[path] = mpkd.predict(model, tiles, "fp32").argmax(1)
            got = mpkd.predict(model, shifted(tiles, strength, 100 + i), "fp32").argmax(1).view(COPIES, -1)
            per_tile += (got == own[path]).float().mean(0) / len(models)
        per_tile = (100 * per_tile).tolist()
        points.append({"strength": strength, "per_tile": per_tile, **evaluate.mean_interval(per_tile)})
    return points


def augmentation_gain(robust: dict) -> dict:
    """Per model and strength: agreement with --stain-augment minus without, paired on the tile,
    its mean over the 24 tiles with a 95% t-interval."""
    out = {}
    for name in NAMES:
        pairs = zip(robust[f"augmented/{name}"], robust[f"plain/{name}"])
        out[name] = [{"strength": a["strength"],
                      **evaluate.mean_interval([x - y for x, y in zip(a["per_tile"], b["per_tile"])])}
                     for a, b in pairs]
    return out


def cohort_stains() -> dict:
    """Each cohort's stain, as the median of its tiles' own estimates and as one estimate pooled over
    all their pixels: how far apart the two labs are, and what a few odd tiles do to a pooled one."""
    out = {}
    for name, paths in (("kather2016", sorted(KATHER.glob("*/*.tif"))), ("crc_val_he_7k", sorted(CRC.glob("*/*.png")))):
        tiles = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1) for p in paths]
        out[name] = {"median": mpkd.median_stain(mpkd.tile_stains(torch.stack(tiles))),
                     "pooled": mpkd.macenko_fit(torch.cat([t.permute(1, 2, 0).reshape(-1, 3) for t in tiles]))}
    return out


def plot(robust: dict, path: Path) -> None:
    plt = evaluate.import_pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colours = {"teacher": "#444444", "alone": "#1f77b4", "vanilla": "#ff7f0e", "mpkd": "#2ca02c"}
    for name, points in robust.items():
        tag, method = name.split("/")
        aug = tag == "augmented"
        xs = np.array([p["strength"] for p in points]) + (0.004 if aug else -0.004)
        means = np.array([p["mean"] for p in points])
        bars = np.array([[p["mean"] - p["ci95"][0], p["ci95"][1] - p["mean"]] for p in points]).T
        ax.errorbar(xs, means, yerr=bars, color=colours[method], ls="-" if aug else "--", marker="o" if aug else "s",
                    ms=4, capsize=3, label=f"{method}, {'--stain-augment' if aug else 'no augmentation'}")
    ax.set_xlabel("strength s of the synthetic HED shift: scale U(1-s, 1+s), shift U(-s, s) OD per stain")
    ax.set_ylabel("agreement with its own unshifted prediction (%)")
    ax.set_title(f"24 real Kather 2016 tiles x {COPIES} shifted copies, {len(SEEDS)} seeds per model;\n"
                 f"mean over tiles with its 95% t-interval", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    evaluate._finish(plt, fig, path)


NAMES = ("teacher", "alone", "vanilla", "mpkd")
TAGS = (("plain", []), ("augmented", ["--stain-augment"]))


def main():
    argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split())).parse_args()
    OUT.mkdir(exist_ok=True)
    data = make_crops()
    models = {(tag, seed): train(data, tag, extra, seed) for seed in SEEDS for tag, extra in TAGS}
    results = {"in_domain": {}, "external": {}, "mcnemar": {}, "cohorts": cohort_stains(), "robustness": {},
               "legend": {"16": wilson_legend(16), "128": "Wilson intervals over 128 crops of 8 tiles are too narrow: "
                          "crops of one tile are not independent"}}
    for (tag, seed), trained in models.items():
        key, paths = f"{tag}/seed{seed}", [trained[n] for n in NAMES]
        results["in_domain"][key] = {n: r["correct"] for n, r in zip(NAMES, score(paths))}
        for rule in mpkd.SCALE_RULES:
            for norm in (None, "macenko", "macenko-tile"):
                rows = external(paths, rule, norm)
                cell = {n: r["correct"] for n, r in zip(NAMES, rows)}
                cell["unchanged"] = rows[0]["data"]["external"].get("stain_unchanged")
                results["external"].setdefault(key, {})[f"{rule}/{norm or 'none'}"] = cell
        results["mcnemar"][key] = evaluate.mcnemar_pairs(external([trained["mpkd"], trained["vanilla"]], "cover", None))
    for tag, _ in TAGS:
        for n in NAMES:
            results["robustness"][f"{tag}/{n}"] = robustness([models[(tag, s)][n] for s in SEEDS])
    results["augmentation_gain"] = augmentation_gain(results["robustness"])
    results["sweep"] = {}
    for strength in SWEEP:  # the student alone, seed 0: in-domain and external (cover) accuracy
        alone = (models[("augmented", 0)]["alone"] if strength == mpkd.STAIN_AUGMENT else
                 train(data, f"sweep{strength}", ["--stain-augment", str(strength)], 0, ("alone",))["alone"])
        results["sweep"][strength] = {"in_domain": score([alone])[0]["correct"],
                                      "external": external([alone], "cover", None)[0]["correct"]}
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    if evaluate.import_pyplot() is not None:
        plot(results["robustness"], OUT / "hed_shift.png")
    print(json.dumps({k: v for k, v in results.items() if k != "robustness"}, indent=1))
    for name, points in results["robustness"].items():
        print(name, " ".join(f"{p['strength']}: {p['mean']:.1f} [{p['ci95'][0]:.1f}, {p['ci95'][1]:.1f}]"
                             for p in points))


if __name__ == "__main__":
    main()
