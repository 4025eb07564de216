"""Model stages: the factory's code path vs a bare batched loop on the same model, batch
size, steps and resolution, measured side by side in one run (interleaved repeats).

  images:   TextToImage.draw (per-image seeded generators, PNG encoding, provenance)
            vs `pipe(prompt=batch, num_images_per_prompt=k, ...)` returning PIL images
  captions: LLMCaptions.generate (SynCLR prompts, per-sample seeded sampling, clean-up)
            vs `model.generate(do_sample=True, temperature, top_p)` on the same prompts

With no model paths, tiny random-weight models are written first (CPU-sized, or larger
with --scale). Give --sd / --llm to run real checkpoints (e.g. on a GPU machine).

    python bench/model_throughput.py                       # tiny models, CPU
    python bench/model_throughput.py --sd DIR --llm DIR --size 512 --steps 25 --batch 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "synclr.yaml"


def timed(run: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    produced = run()
    return time.perf_counter() - started, produced


def side_by_side(name: str, bare: Callable[[], int], factory: Callable[[], int], repeats: int) -> dict:
    """Warm both up, then alternate them so machine drift hits both equally; median rates."""
    bare(), factory()
    rates: dict[str, list[float]] = {"bare": [], "factory": []}
    for _ in range(repeats):
        for label, run in (("bare", bare), ("factory", factory)):
            seconds, produced = timed(run)
            rates[label].append(produced / seconds)
    result = {label: round(statistics.median(values), 2) for label, values in rates.items()}
    result["ratio"] = round(result["factory"] / result["bare"], 3)
    result["all"] = {label: [round(v, 2) for v in values] for label, values in rates.items()}
    print(f"{name:8s} bare {result['bare']:8.2f}/s  factory {result['factory']:8.2f}/s  ratio {result['ratio']:.3f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", help="diffusers model dir or hub id (default: a tiny one written now)")
    parser.add_argument("--llm", help="causal LM dir or hub id (default: a tiny one written now)")
    parser.add_argument("--scale", type=int, default=1, help="widen the tiny models (1 = test size)")
    parser.add_argument("--captions", type=int, default=32, help="captions per timed run")
    parser.add_argument("--images-per-caption", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--caption-batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "model_throughput.json")
    args = parser.parse_args()

    from synthfactory import settings

    settings.apply_offline_defaults()
    import torch

    from synthfactory import tinymodels
    from synthfactory.generators import Sample
    from synthfactory.generators.llm_captions import _load_lm
    from synthfactory.recipe import load_recipe
    from synthfactory.release.bundle import plugins_of
    from synthfactory.samples import slot_for

    scratch = Path(tempfile.mkdtemp(prefix="synthfactory-model-bench-"))
    s = args.scale
    sd = args.sd or str(tinymodels.write_tiny_stable_diffusion(
        scratch / "sd", sample_size=args.size // 2, block_out_channels=(32 * s, 64 * s), cross_attention_dim=32 * s))
    llm = args.llm or str(tinymodels.write_tiny_causal_lm(scratch / "llm", hidden_size=64 * s, num_layers=2 * s))
    k = args.images_per_caption
    recipe = load_recipe(RECIPE, overrides=[
        f"generator.params.model={sd}", f"generator.params.captions.params.model={llm}",
        f"generator.params.images_per_caption={k}", f"generator.params.batch_size={args.batch}",
        f"generator.params.steps={args.steps}", f"generator.params.height={args.size}",
        f"generator.params.width={args.size}", f"generator.params.device={args.device}",
        f"generator.params.dtype={args.dtype}", f"generator.params.captions.params.device={args.device}",
        f"generator.params.captions.params.dtype={args.dtype}",
        f"generator.params.captions.params.batch_size={args.caption_batch}",
        f"generator.params.captions.params.max_new_tokens={args.max_new_tokens}",
    ])
    images = plugins_of(recipe).generator
    captions = images.captions
    slots = [slot_for(recipe.seed, i) for i in range(args.captions)]
    prompts = [captions.prompt(slot) for slot in slots]
    texts = [f"a photo of {p.fields['concept']}" for p in prompts]
    caption_samples = [Sample(slot, text, {"txt": text.encode()}, "txt") for slot, text in zip(slots, texts)]
    pipe = images.pipeline()
    per_call = args.batch // k

    def bare_images() -> int:
        produced = 0
        for start in range(0, len(texts), per_call):
            batch = texts[start : start + per_call]
            produced += len(pipe(
                prompt=batch, num_images_per_prompt=k, num_inference_steps=args.steps, guidance_scale=2.5,
                height=args.size, width=args.size, output_type="pil",
            ).images)
        return produced

    def factory_images() -> int:
        produced = 0
        for start in range(0, len(caption_samples), per_call):
            produced += sum(1 for _ in images.draw(caption_samples[start : start + per_call]))
        return produced

    lm, tokenizer = _load_lm(captions.model.path, captions.device, captions.params.dtype)
    params = captions.params

    def bare_captions() -> int:
        produced = 0
        for start in range(0, len(prompts), args.caption_batch):
            batch = [p.text for p in prompts[start : start + args.caption_batch]]
            encoded = tokenizer(batch, return_tensors="pt", padding=True).to(captions.device)
            with torch.inference_mode():
                output = lm.generate(**encoded, do_sample=True, temperature=params.temperature, top_p=params.top_p,
                                     max_new_tokens=params.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            produced += len(tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
        return produced

    def factory_captions() -> int:
        return sum(1 for _ in captions.generate(slots))

    print(f"device {images.device}, {args.captions} captions x {k} images, batch {args.batch}, "
          f"{args.steps} steps, {args.size}px; torch threads {torch.get_num_threads()}")
    results = {
        "machine": {"platform": platform.platform(), "device": images.device, "torch_threads": torch.get_num_threads()},
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "images_per_s": side_by_side("images", bare_images, factory_images, args.repeats),
        "captions_per_s": side_by_side("captions", bare_captions, factory_captions, args.repeats),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
