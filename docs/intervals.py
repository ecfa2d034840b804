"""The coverage of evaluate.py's intervals when tiles share a slide: simulated test sets whose
tiles come from G slides of m tiles each, a slide's accuracy drawn from a Beta distribution whose
intra-slide correlation is rho (0: independent tiles); how often the 95% Wilson interval (tiles
taken as independent) and the clustered interval (evaluate.clustered_interval) hold the true
accuracy, for accuracy and for the paired difference of two checkpoints.

    python docs/intervals.py                 # from the repository root; about a minute on 2 cores
    python docs/intervals.py --sims 200      # fewer simulated test sets per row, quicker

Prints a Markdown table (docs/intervals.md has it). Nothing is written.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import evaluate  # noqa: E402
import mpkd  # noqa: E402


def slides(rng, accuracy: float, rho: float, groups: int, tiles: int) -> np.ndarray:
    """Outcomes (groups * tiles,) of one simulated test set: each slide's accuracy from Beta(a, b)
    with mean `accuracy` and intra-slide correlation `rho`, its tiles right with that chance."""
    if rho == 0:
        per_slide = np.full(groups, accuracy)
    else:
        a, b = accuracy * (1 - rho) / rho, (1 - accuracy) * (1 - rho) / rho
        per_slide = rng.beta(a, b, groups)
    return (rng.random((groups, tiles)) < per_slide[:, None]).ravel()


def coverage(accuracy: float, rho: float, groups: int, tiles: int, sims: int, seed: int = 0) -> dict:
    """Share of `sims` simulated test sets whose interval holds the truth: Wilson and clustered, of
    accuracy; clustered, of the difference of two independent checkpoints of equal accuracy (0)."""
    rng = np.random.default_rng(seed)
    names = np.repeat([f"slide{i}" for i in range(groups)], tiles)
    held = {"wilson": 0, "clustered": 0, "difference": 0}
    for _ in range(sims):
        a = slides(rng, accuracy, rho, groups, tiles)
        lo, hi = mpkd.wilson_interval(int(a.sum()), len(a))
        held["wilson"] += lo <= 100 * accuracy <= hi
        ci = evaluate.clustered_interval(a, names)
        held["clustered"] += ci is not None and ci["ci95"][0] <= 100 * accuracy <= ci["ci95"][1]
        b = slides(rng, accuracy, rho, groups, tiles)  # another checkpoint on the same slides
        d = evaluate.clustered_interval(a.astype(int) - b, names, proportion=False)
        held["difference"] += d is not None and d["ci95"][0] <= 0 <= d["ci95"][1]
    return {k: v / sims for k, v in held.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--sims", type=int, default=1000, help="simulated test sets per row")
    args = p.parse_args()
    print("| accuracy | rho | slides x tiles | Wilson | clustered | clustered, difference of two |")
    print("| --- | --- | --- | --- | --- | --- |")
    for accuracy in (0.95, 0.9, 0.7):
        for rho in (0.0, 0.05, 0.2):
            for groups in (4, 10, 20, 50):
                tiles = 1000 // groups
                c = coverage(accuracy, rho, groups, tiles, args.sims)
                print(f"| {accuracy:.0%} | {rho} | {groups} x {tiles} | {c['wilson']:.1%} | {c['clustered']:.1%} | "
                      f"{c['difference']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
