"""Every way this project teaches from a teacher's stored epochs, compared on one stored run per
seed: the student alone, vanilla KD, Multi-Part KD, --anchors auto, Multi-Part KD without the stored
epochs whose softened targets are near uniform ("late"), each intermediate epoch alone as vanilla
KD, and the snapshot ensemble of all stored epochs (--ensemble all). The teachers are trained from
scratch (--no-pretrained), as the README's five-minute run trains them: five seeds on its stand-in,
then two seeds on the real crops of docs/generalisation.py (its teachers; no validation part there,
so no --anchors auto). Numbers for docs/route.md and docs/own-loop.md.

    python docs/checkpoint-teachers.py [standin|crops]   # from the repository root, after docs/generalisation.py

Both parts by default; each part can run in its own process (with OMP_NUM_THREADS=1 on a 2-core
machine), adding its results to checkpoint-teachers/results.json. About an hour on the 2-core
development CPU; models already trained are kept, and a killed teacher resumes.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import distill  # noqa: E402
import evaluate  # noqa: E402
import mpkd  # noqa: E402
import train_teacher  # noqa: E402

OUT = Path("checkpoint-teachers")
S = ["--batch-size", "16", "--epochs", "5", "--device", "cpu"]  # the README's five-minute block
CROPS = Path("generalisation")  # docs/generalisation.py's crops and its from-scratch teachers
CROP_ANCHORS = (4, 10, 16)  # the intermediate epochs tried alone on the crops (of 2, 4, ..., 20)
STANDIN_SEEDS = (0, 1, 2, 3, 4)


def quiet(fn, log: Path):
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn()


def uniformity(logits_file: Path, temperature: float = 5.0) -> dict[int, float]:
    """Per stored epoch: mpkd.target_uniformity of its softened targets over the training images."""
    stored = mpkd.load_file(logits_file, mpkd.LOGITS_FORMAT)["logits"]
    return {epoch: mpkd.target_uniformity(logits, temperature) for epoch, logits in sorted(stored.items())}


def students(folder: Path, logits: Path, given: list[str], runs: dict[str, list[str]]) -> dict[str, Path]:
    """The students `runs` names ({name: distill.py flags}), trained unless already there."""
    out = {}
    for name, flags in runs.items():
        out[name] = folder / f"{name}.pt"
        if not out[name].exists():
            again = ["--resume"] if mpkd.state_path(out[name]).exists() else []
            quiet(lambda: distill.main(distill.get_args([*given, "--teacher-logits", str(logits), *flags,
                                                         "--out", str(out[name]), *again])), folder / "log.txt")
    return out


def runs_for(logits: Path, singles, auto: bool) -> dict[str, list[str]]:
    stored = sorted(mpkd.load_file(logits, mpkd.LOGITS_FORMAT)["logits"])
    late = [e for e, u in uniformity(logits).items() if u <= mpkd.NEAR_UNIFORM]
    runs = {"alone": ["--distill-weight", "0"], "vanilla": [], "mpkd": ["--multipart"],
            "late": ["--anchors", ",".join(map(str, late or stored[-1:]))], "ensemble": ["--ensemble", "all"],
            **{f"anchor{e}": ["--anchors", str(e)] for e in singles}}
    return {**runs, "auto": ["--anchors", "auto"]} if auto else runs


def scored(models: dict[str, Path], log: Path) -> dict:
    """Correct test tiles per model, and McNemar's discordant counts of the pairs the docs cite."""
    rows = quiet(lambda: evaluate.main(evaluate.get_args([*map(str, models.values()), "--device", "cpu"])), log)
    by = dict(zip(models, rows))
    pairs = {}
    for a, b in (("ensemble", "mpkd"), ("ensemble", "vanilla"), ("mpkd", "vanilla"), ("late", "mpkd")):
        x, y = by[a]["outcomes"], by[b]["outcomes"]
        only_a, only_b = sum(p and not q for p, q in zip(x, y)), sum(q and not p for p, q in zip(x, y))
        pairs[f"{a}-{b}"] = [only_a, only_b, evaluate.mcnemar_exact(only_a, only_b)]
    return {"correct": {n: r["correct"] for n, r in by.items()}, "n_test": rows[0]["n_test"], "mcnemar": pairs}


def standin_part() -> dict:
    standin = mpkd.make_standin(OUT / "standin", per_class=50, size=64)
    results = {}
    for seed in STANDIN_SEEDS:
        folder = OUT / f"standin-seed{seed}"
        folder.mkdir(exist_ok=True)
        logits = folder / "teacher_logits.pt"
        if not logits.exists():
            again = ["--resume"] if mpkd.state_path(folder / "teacher.pt").exists() else []
            quiet(lambda: train_teacher.main(train_teacher.get_args(
                [*S, "--data", str(standin), "--img-size", "32", "--no-pretrained", "--save-every", "1", "--seed",
                 str(seed), "--out", str(folder / "teacher.pt"), "--logits-out", str(logits), *again])),
                folder / "log.txt")
        models = students(folder, logits, [*S, "--seed", str(seed)], runs_for(logits, (1, 2, 3, 4), auto=True))
        results[seed] = {"uniformity": uniformity(logits), **scored(models, folder / "log.txt")}
    return results


def crops_part() -> dict:
    results = {}
    for seed in (0, 1):
        teacher = CROPS / f"plain-seed{seed}"
        folder = OUT / f"crops-seed{seed}"
        folder.mkdir(exist_ok=True)
        given = ["--img-size", "64", "--batch-size", "16", "--epochs", "20", "--device", "cpu", "--seed", str(seed)]
        runs = runs_for(teacher / "teacher_logits.pt", CROP_ANCHORS, auto=False)
        done = {n: teacher / f"{n}.pt" for n in ("alone", "vanilla", "mpkd")}  # trained by docs/generalisation.py
        models = {**done, **students(folder, teacher / "teacher_logits.pt", given,
                                     {n: f for n, f in runs.items() if n not in done})}
        results[seed] = {"uniformity": uniformity(teacher / "teacher_logits.pt"), **scored(models, folder / "log.txt")}
    return results


def main():
    parts = {"standin": standin_part, "crops": crops_part}
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("parts", nargs="*", metavar="standin|crops", help="the parts to run (unset: both)")
    asked = p.parse_args().parts
    if set(asked) - set(parts):
        p.error(f"the parts are {' and '.join(parts)}")
    OUT.mkdir(exist_ok=True)
    for name in asked or parts:
        got = parts[name]()
        file = OUT / "results.json"
        results = json.loads(file.read_text()) if file.exists() else {}
        results[name] = got  # read again just before writing: the other part may have written meanwhile
        file.write_text(json.dumps(results, indent=1))
        print(json.dumps({name: got}, indent=1))


if __name__ == "__main__":
    main()
