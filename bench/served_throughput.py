"""Served models: completion tokens/s through the factory's shard code vs a bare asynchronous
client loop, against the same OpenAI-compatible server at the same concurrency, measured
side by side in one run (interleaved repeats).

  bare:     openai.AsyncOpenAI + a semaphore of --concurrency, sending the same prompts
            (same seeds, max_tokens, sampling, stop) and counting usage.completion_tokens
  factory:  build_shard on an llm-captions recipe with `backend: {kind: openai}` (prompt
            building, adaptive concurrency, retries, usage accounting, caption clean-up,
            tar + manifest writing), the response cache off so every run asks the server

With no --base-url, `transformers serve` starts on a tiny random-weight llama (CPU).
Point it at a real server to measure one (e.g. `vllm serve MODEL` on a GPU machine):

    python bench/served_throughput.py
    python bench/served_throughput.py --base-url http://127.0.0.1:8000/v1 --model MODEL --concurrency 64

It also prints what a SynCLR-sized caption run (150M captions) costs at recipes/synclr.yaml's
prices, from the measured tokens per caption.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import yaml
from model_throughput import side_by_side  # bench/ is the script's directory: on sys.path

REPO = Path(__file__).resolve().parent.parent
SYNCLR_CAPTIONS = 150_000_000


def recipe_for(base_url: str, model: str, samples: int, concurrency: int, max_tokens: int) -> dict:
    """recipes/instructions.yaml's prompts on the endpoint, one shard of `samples`."""
    recipe = yaml.safe_load((REPO / "recipes" / "instructions.yaml").read_text())
    params = recipe["generator"]["params"]
    params["backend"] = {"kind": "openai", "base_url": base_url, "model": model, "max_concurrency": concurrency}
    params["max_new_tokens"] = max_tokens
    params["batch_size"] = samples  # one batch: the whole shard's requests in flight under the limit
    recipe.update(samples=samples, shard_size=samples, checks=[])
    return recipe


def factory_run(recipe, tmp: Path) -> Callable[[], int]:
    from synthfactory.release.build import build_shard
    from synthfactory.shards import plan_shards

    (plan,) = plan_shards(recipe.name, recipe.samples, recipe.shard_size)

    def run() -> int:
        with tempfile.TemporaryDirectory(dir=tmp) as out:
            result = build_shard(recipe, plan, Path(out), Path(out))
        return int(result.usage.get("completion_tokens", 0))

    return run


def bare_run(base_url: str, model: str, prompts: list[tuple[str, int]], concurrency: int, max_tokens: int,
             temperature: float, top_p: float) -> Callable[[], int]:
    import openai

    async def send_all() -> int:
        limit = asyncio.Semaphore(concurrency)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0) as client:
            async def one(prompt: str, seed: int) -> int:
                async with limit:
                    answer = await client.completions.create(model=model, prompt=prompt, seed=seed, max_tokens=max_tokens,
                                                             temperature=temperature, top_p=top_p, stop=["\n"])
                return answer.usage.completion_tokens if answer.usage else 0

            return sum(await asyncio.gather(*(one(p, s) for p, s in prompts)))

    return lambda: asyncio.run(send_all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="an OpenAI-compatible API root (default: transformers serve, tiny model)")
    parser.add_argument("--model", help="the served model name (with --base-url)")
    parser.add_argument("--samples", type=int, default=256, help="requests per timed run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "served_throughput.json")
    args = parser.parse_args()

    from synthfactory.generators.llm_captions import LLMCaptions
    from synthfactory.recipe import parse_recipe
    from synthfactory.samples import slot_for
    from synthfactory.serving.testserver import serve_tiny_lm

    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        base_url, model = args.base_url, args.model
        if base_url is None:
            served = stack.enter_context(serve_tiny_lm(Path(tmp)))
            base_url, model = served.base_url, served.model_id
        data = recipe_for(base_url, model, args.samples, args.concurrency, args.max_tokens)
        recipe = parse_recipe(data, "bench", REPO / "recipes")
        generator = LLMCaptions.from_params(recipe.generator.params)
        p = generator.params
        slots = [slot_for(recipe.seed, i) for i in range(recipe.samples)]
        prompts = [(generator.prompt(slot).text, slot.seed % 2**31) for slot in slots]
        bare = bare_run(base_url, model, prompts, args.concurrency, args.max_tokens, p.temperature, p.top_p)
        result = side_by_side("tokens", bare, factory_run(recipe, Path(tmp)), args.repeats)

        # What a SynCLR-sized caption run costs at recipes/synclr.yaml's prices, with SynCLR's
        # prompts (3 in-context examples) measured here: tokens ≈ characters / 4 for a
        # Llama-style tokenizer, completions at the recipe's caption length.
        synclr = yaml.safe_load((REPO / "recipes" / "synclr.yaml").read_text())
        captions = parse_recipe(synclr, "synclr", REPO / "recipes").generator.params["captions"]["params"]
        caption_generator = LLMCaptions.from_params(captions)
        sample_prompts = [caption_generator.prompt(slot_for(1, i)).text for i in range(2000)]
        prompt_tokens = statistics.mean(len(text) for text in sample_prompts) / 4
        completion_tokens = 20.0  # a one-sentence caption; max_new_tokens is 60
        prices = synclr["cost"]
        cost = SYNCLR_CAPTIONS * (prompt_tokens * prices["usd_per_million_input_tokens"]
                                  + completion_tokens * prices["usd_per_million_output_tokens"]) / 1e6
        result["synclr_estimate"] = {"captions": SYNCLR_CAPTIONS, "prompt_tokens_per_caption": round(prompt_tokens, 1),
                                     "completion_tokens_per_caption": completion_tokens, "prices": prices,
                                     "token_cost_usd": round(cost, 2)}
        print(f"SynCLR-sized caption run ({SYNCLR_CAPTIONS:,} captions, ~{prompt_tokens:.0f} prompt + "
              f"{completion_tokens:.0f} completion tokens each) at synclr.yaml's prices: ${cost:,.0f} in tokens")
    result.update(samples=args.samples, concurrency=args.concurrency, max_tokens=args.max_tokens,
                  machine=platform.platform(), server=args.base_url or "transformers serve (tiny llama, CPU)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
