"""Near-duplicate search throughput at growing sizes: does it stay near-linear?

For each n in --sizes, on synthetic data with 1% planted near-duplicates:

  captions: n template captions with random words (mostly distinct), 1% of them
            paraphrased copies (synonyms, articles, word order);
            timed: embed_texts (MiniLM, CPU, model loaded beforehand) and
            similar_pairs ("auto": exact up to 20k distinct rows, SimHash LSH beyond
            where estimated cheaper); also method="exact" for its time and as the
            reference for LSH recall (skip with --no-exact)
  images:   n 32x32 PNGs of smoothed random colours, 1% of them re-encoded copies with
            a little pixel noise;
            timed: perceptual_hash over all, then hash_pairs

Prints items/s per step and the time ratio between consecutive sizes (10x the items at
near-linear cost is a ratio of about 10; quadratic is 100). Writes
bench/results/quality_throughput.json.

    python bench/quality_throughput.py                      # sizes 10000 100000
    python bench/quality_throughput.py --sizes 2000 20000 --threshold 0.9
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from synthfactory.quality.near_duplicates import embed_texts, hash_pairs, perceptual_hash, similar_pairs

REPO = Path(__file__).resolve().parent.parent

ADJECTIVES = (
    "red blue green yellow orange purple black white grey pink small large old new shiny wooden striped tiny huge bright "
    "dark"
).split()
NOUNS = "car dog cat house tree boat bicycle horse bird flower chair table lamp cup book train plane apple guitar umbrella".split()
PLACES = (
    "street park beach forest kitchen garden lake field city river desert bridge market harbor meadow rooftop station "
    "library hill valley"
).split()
TIMES = (
    "at sunset|in the morning|at night|in the rain|under a cloudy sky|in winter|on a sunny day|in the fog|at noon|in autumn"
).split("|")
STYLES = (
    "a photo of|a painting of|a sketch of|a close-up of|a drawing of|a watercolor of|a 3d render of|an illustration of"
).split("|")
TEMPLATES = (
    "{style} a {adj} {noun} in the {place} {time}",
    "{style} a {adj} {noun} next to a {adj2} {noun2} near the {place}",
    "a {adj} {noun} and a {adj2} {noun2} in a {place} {time}",
    "{style} two {noun}s by the {place}, {adj} and {adj2}",
)
SYNONYMS = {
    "car": "automobile", "photo": "picture", "dog": "puppy", "house": "home", "boat": "ship",
    "large": "big", "small": "little", "street": "road", "sketch": "drawing", "cup": "mug",
}


def captions(n: int, rng: random.Random) -> tuple[list[str], list[tuple[int, int]]]:
    """n captions, the last 1% paraphrases of earlier ones: (captions, planted pairs)."""
    planted = n // 100
    texts = []
    for _ in range(n - planted):
        texts.append(rng.choice(TEMPLATES).format(
            style=rng.choice(STYLES), adj=rng.choice(ADJECTIVES), adj2=rng.choice(ADJECTIVES),
            noun=rng.choice(NOUNS), noun2=rng.choice(NOUNS), place=rng.choice(PLACES), time=rng.choice(TIMES),
        ))
    pairs = []
    for _ in range(planted):
        source = rng.randrange(len(texts))
        words = [SYNONYMS.get(w, w) for w in texts[source].split()]
        words = ["the" if w == "a" and rng.random() < 0.5 else w for w in words]
        pairs.append((source, len(texts)))
        texts.append(" ".join(words).capitalize())
    return texts, pairs


def images(n: int, rng: np.random.Generator, size: int = 32) -> tuple[list[bytes], list[tuple[int, int]]]:
    """n PNGs of 8x8 random colours smoothly upscaled, the last 1% copies of earlier ones
    with a little pixel noise: (PNG bytes, planted pairs)."""
    planted = n // 100
    arrays = [
        np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR))
        for _ in range(n - planted)
    ]
    pairs = []
    for _ in range(planted):
        source = int(rng.integers(len(arrays)))
        noise = rng.integers(-6, 7, arrays[source].shape)
        pairs.append((source, len(arrays)))
        arrays.append(np.clip(arrays[source].astype(int) + noise, 0, 255).astype(np.uint8))
    encoded = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded, pairs


def timed(step: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, result


def planted_found(pairs: list[tuple[int, int, Any]], planted: list[tuple[int, int]]) -> float:
    found = {(i, j) for i, j, _ in pairs}
    return round(sum(pair in found for pair in planted) / max(1, len(planted)), 4)


def run_size(n: int, threshold: float, max_distance: int, seed: int, exact: bool) -> dict[str, dict[str, float]]:
    texts, text_planted = captions(n, random.Random(seed))
    seconds_embed, embeddings = timed(lambda: embed_texts(texts))
    seconds_pairs, text_pairs = timed(lambda: similar_pairs(embeddings, threshold, seed=seed))
    pngs, image_planted = images(n, np.random.default_rng(seed))
    seconds_hash, hashes = timed(lambda: np.array([perceptual_hash(png) for png in pngs], dtype=np.uint64))
    seconds_hash_pairs, image_pairs = timed(lambda: hash_pairs(hashes, max_distance))
    steps = {
        "embed_texts": (seconds_embed, {"distinct_texts": len(set(texts))}),
        "similar_pairs": (seconds_pairs, {"pairs": len(text_pairs), "planted_found": planted_found(text_pairs, text_planted)}),
    }
    if exact:
        seconds_exact, exact_pairs = timed(lambda: similar_pairs(embeddings, threshold, method="exact"))
        reference = {(i, j) for i, j, _ in exact_pairs}
        recall = sum((i, j) in reference for i, j, _ in text_pairs) / max(1, len(reference))
        steps["similar_pairs"][1]["recall_vs_exact"] = round(recall, 4)
        steps["similar_exact"] = (seconds_exact, {"pairs": len(exact_pairs)})
    steps["perceptual_hash"] = (seconds_hash, {})
    steps["hash_pairs"] = (
        seconds_hash_pairs, {"pairs": len(image_pairs), "planted_found": planted_found(image_pairs, image_planted)}
    )
    return {
        name: {"seconds": round(seconds, 3), "items_per_s": round(n / seconds, 1), **extra}
        for name, (seconds, extra) in steps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--threshold", type=float, default=0.9, help="caption cosine counted as a duplicate")
    parser.add_argument("--max-distance", type=int, default=8, help="pHash Hamming distance counted as a duplicate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-exact", action="store_true", help="skip the exact caption search run for comparison")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality_throughput.json")
    args = parser.parse_args()

    seconds_load, _ = timed(lambda: embed_texts(["warm up: load the model before timing"]))
    print(f"model load + warm-up {seconds_load:.1f}s (not in the figures)", flush=True)
    by_size = {}
    for n in args.sizes:
        by_size[n] = run_size(n, args.threshold, args.max_distance, args.seed, exact=not args.no_exact)
        print(f"n={n} done: " + ", ".join(f"{k} {v['seconds']}s" for k, v in by_size[n].items()), flush=True)
    ratios = {
        f"{small}->{large}": {step: round(by_size[large][step]["seconds"] / by_size[small][step]["seconds"], 2) for step in by_size[large]}
        for small, large in zip(args.sizes, args.sizes[1:])
    }

    print(f"\n{'step':16s} {'n':>8s} {'seconds':>9s} {'items/s':>10s}  found")
    for n, steps in by_size.items():
        for step, row in steps.items():
            extra = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("seconds", "items_per_s"))
            print(f"{step:16s} {n:8d} {row['seconds']:9.2f} {row['items_per_s']:10.1f}  {extra}")
    for span, steps in ratios.items():
        print(f"time ratio {span}: " + ", ".join(f"{step} {ratio}x" for step, ratio in steps.items()))

    import torch

    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "params": {"threshold": args.threshold, "max_distance": args.max_distance, "seed": args.seed,
                   "planted_duplicates": "1% of n", "image_size": 32},
        "model_load_s": round(seconds_load, 2),
        "results": {str(n): steps for n, steps in by_size.items()},
        "time_ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
