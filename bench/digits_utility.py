"""Digits utility sweep: what rendered digits are worth for training, tested on real ones.

The same linear probe the `utility` check runs (logistic regression on standardised 8×8
pixel grids) is trained on N real digits (scikit-learn's UCI digits, training split,
5…20 per class), on M digits from the `digits` generator, and on both, then scored on
the real test split (539 digits). It shows where synthetic data helps (few real digits)
and where it stops helping, which is what recipes/digits-mix.yaml's counts rest on.

    python bench/digits_utility.py [--real 20 50 100 200] [--synthetic 0 200 450 1000 2000] [--seed 20261204]
"""

from __future__ import annotations

import argparse

import numpy as np

from synthfactory.checks.utility import _linear_probe
from synthfactory.generators import GENERATORS
from synthfactory.plugins import RECIPE_DIR
from synthfactory.quality.features import image_pixels
from synthfactory.samples import slot_for
from synthfactory.sources import SOURCES, build_source


def digits(**params: object) -> tuple[np.ndarray, np.ndarray]:
    """Pixel features and labels of the real digits a `sklearn-digits` source selects."""
    resolved = SOURCES.get("sklearn-digits").Params.model_validate(params, context={RECIPE_DIR: "."})
    records = list(build_source({"kind": "sklearn-digits", "params": resolved.model_dump(mode="json")}, None).records())
    return image_pixels([r.files["png"] for r in records], 8), np.array([r.label for r in records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, nargs="+", default=[20, 50, 100, 200])
    parser.add_argument("--synthetic", type=int, nargs="+", default=[0, 200, 450, 1000, 2000])
    parser.add_argument("--seed", type=int, default=20261204)
    args = parser.parse_args()

    test_x, test_y = digits(split="test")
    generator = GENERATORS.get("digits").from_params({})
    drawn = list(generator.generate([slot_for(args.seed, i) for i in range(max(args.synthetic))]))
    drawn_x = image_pixels([s.files["png"] for s in drawn], 8)
    drawn_y = np.array([s.columns["label"] for s in drawn])

    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        return float((_linear_probe(x, y, test_x) == test_y).mean())

    print(f"accuracy on {len(test_y)} real test digits (linear probe)")
    print("real \\ drawn | " + " | ".join(f"{m:>5}" for m in args.synthetic))
    print("drawn only   | " + " | ".join("    –" if m == 0 else f"{accuracy(drawn_x[:m], drawn_y[:m]):.3f}"
                                          for m in args.synthetic))
    for n in args.real:
        real_x, real_y = digits(split="train", limit=n)
        cells = [accuracy(np.vstack([real_x, drawn_x[:m]]), np.concatenate([real_y, drawn_y[:m]])) for m in args.synthetic]
        print(f"{n:>12} | " + " | ".join(f"{cell:.3f}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
