"""GPU throughput at real model sizes: the factory's model stages vs bare diffusers /
transformers loops on the same GPU, same weights, same prompts, measured side by side in
one run (alternating rounds, order flipped each round, medians).

Models. Stable Diffusion 1.5 (UNet, VAE, CLIP text encoder, PNDM scheduler) and a
Llama-2-7B-sized causal LM are built from their published configs (embedded below) with
random weights, initialised directly in the chosen dtype on the device (no float32 CPU
copy first, so the 7B model does not take minutes on a CPU), saved with save_pretrained
to a scratch dir (/dev/shm when there is room) and loaded back through
`from_pretrained(path)`: by the factory's own loaders (local model dirs, as tests and
benches use tinymodels dirs) and by the bare loops.
Nothing is downloaded: the tokenizers are the small ones synthfactory.tinymodels builds
(a CLIP BPE for SD, a byte-level BPE for the LM; their ids fit the published vocabularies,
prompts tokenize longer than with the real tokenizers). The random LM's generation
config has no EOS, so every row of both paths generates exactly --max-new-tokens (as
throughput benchmarks' ignore_eos); random SD weights do the same FLOPs as trained ones.

  images (images/s; per batch size x channels-last x torch.compile setting; each setting
  is a row, and the four paths below are its columns):
    bare          StableDiffusionPipeline.from_pretrained(dir, dtype).to(device); UNet
                  channels-last and torch.compile(unet, mode=--compile-mode, fullgraph=True)
                  as the setting says; `pipe(prompt=captions, num_images_per_prompt=k,
                  steps, guidance 2.5, one device generator per call)` -> PIL, then each
                  image PNG-encoded (compress_level=1, as the factory) after the call,
                  sequentially, and the PNGs written as a plain tar
    bare+overlap  the same, with the PNG encoding of batch n on a thread pool while the
                  pipeline runs batch n+1
    factory       build_shard of a one-shard recipe: text-to-image (model = the dir,
                  dtype, batch_size, images_per_caption, steps, size, guidance 2.5,
                  `channels_last` and `compile` as the setting says, `overlap_encoding:
                  true`, its default: batch n's PNGs encoded on one background thread
                  while batch n+1 denoises) over a text-list of the same captions:
                  per-image CPU generators, PNG encoding, provenance json, tar + parquet
                  manifest
    factory serial  the same recipe with `overlap_encoding: false` (each batch encoded
                  after its pipeline call, before the next starts)
  tokens (generated tokens/s; per batch size; four paths):
    bare greedy     AutoModelForCausalLM.from_pretrained(dir, dtype).to(device); left-padded
                    batches of the same SynCLR prompts; model.generate(do_sample=False,
                    max_new_tokens); batch_decode
    bare sampled    the same with do_sample=True, temperature/top-p of recipes/synclr.yaml
    factory greedy  build_shard of a one-shard llm-captions recipe (recipes/synclr.yaml's
                    captions stage: prompts with 3 in-context examples, clean-up, tar +
                    manifest), batch_size = the batch size, `temperature: 0` (greedy)
    factory sampled the same at synclr.yaml's temperature/top-p: per-sample seeded Gumbel
                    sampling, each sample's noise drawn by its own torch.Generator on the
                    model's device

Ratios (target >= 0.95) pair like with like: images factory / bare+overlap and factory
serial / bare; tokens factory greedy / bare greedy and factory sampled / bare sampled.
Settings the factory's generators do not expose are printed as such, not faked:
text-to-image has no attention switch (diffusers' default SDPA processor, shown) and a
fixed compile mode (max-autotune, fullgraph); channels-last and compile are honoured on
CUDA only (a CPU row with either on has no factory figure); llm-captions has no compile.
The first (warm-up) run of each setting includes torch.compile's compilation and is
reported apart. Published anchors (SD 1.5, 512x512, 50 steps, fp16, A100, trained
weights) are printed beside the results.

On a GPU machine, one command (the whole default matrix: batch 8/16/32 x channels-last
off/on x compile off/on = 12 image settings of 50-step 512x512 images, four paths each,
plus max-autotune compiles of the UNet for each path and batch shape, and 3 token
settings; expect well over half an hour, an estimate, not measured):

    python bench/gpu_throughput.py --device cuda

Sized for a short device slot (estimated ~5 min on an H100/H200, most of it writing and
loading the 7B model twice; compile rows left out):

    python bench/gpu_throughput.py --device cuda --compile off --channels-last on \
        --batch-sizes 16 --rounds 2 --calls 2

(--calls 2 or more: with one batch per run there is no next batch for the PNG encoding
to overlap with, and the factory and factory serial paths do the same work.)

Anchors are at batch 1: add `--batch-sizes 1 --images-per-caption 1` to compare with them.
Each setting's progress line (with its ratio) is printed as soon as it is measured, so a
run cut short still reports what it finished; a setting that fails (e.g. out of memory)
is recorded as failed and the others still run.

Tiny random models on CPU (--tiny: the same builders, loaders and loops on the shapes
synthfactory.tinymodels writes for tests, 32 px, 2 steps, 16 new tokens; no GPU needed;
~40 s on the 2-core development machine when idle, 2-3 min when others load it; its
rates only show that the paths run, each timed run being a fraction of a second):

    python bench/gpu_throughput.py --tiny --device cpu

Where this script was written no GPU was lent: only the tiny CPU mode was run (and
`--device cuda`, which exits with code 2 and a one-line message when CUDA is absent).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SYNCLR = REPO / "recipes" / "synclr.yaml"
TARGET = 0.95
GUIDANCE = 2.5  # SynCLR's classifier-free guidance

# --- published configs (runwayml/stable-diffusion-v1-5, meta-llama/Llama-2-7b-hf) ------------

SD15_UNET = {  # unet/config.json
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD15_VAE = {  # vae/config.json
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT_ENCODER = {  # text_encoder/config.json (CLIPTextModel, ViT-L/14's text tower)
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0,
    "initializer_range": 0.02, "initializer_factor": 1.0, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}
SD15_SCHEDULER = {  # scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "skip_prk_steps": True, "set_alpha_to_one": False,
    "steps_offset": 1, "clip_sample": False,
}
LLAMA2_7B = {  # config.json
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
    "initializer_range": 0.02, "rms_norm_eps": 1e-5, "use_cache": True, "pretraining_tp": 1,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
    "bos_token_id": 1, "eos_token_id": 2,
}

# --- tiny configs (--tiny): the shapes synthfactory.tinymodels writes for tests --------------

TINY_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 32,
    "attention_head_dim": 8, "norm_num_groups": 32,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [32, 64], "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 64,
}
TINY_TEXT_ENCODER = {  # vocab_size: the tiny CLIP tokenizer's, filled in when built
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 77,
}
TINY_SCHEDULER = {**SD15_SCHEDULER, "_class_name": "DDIMScheduler"}
TINY_LLAMA = {  # vocab_size: the tiny BPE's, filled in when built
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 1024,
}

# Published figures for SD 1.5 at 512x512, 50 steps, fp16, on an A100 (trained weights):
ANCHORS = (
    ("batch 1, SDPA", "1.59 s/image", 1 / 1.59),
    ("batch 1, torch.compile + channels-last", "1.07 s/image", 1 / 1.07),
    ("batch 16, compiled", "~1.5 images/s", 1.5),
)

# What the factory's generators do not let a recipe set, or do differently (printed with the results).
NOT_EXPOSED = (
    "text-to-image: channels_last and compile params are honoured on CUDA only; CPU rows with either on have "
    "no factory figure",
    "text-to-image: no attention param: both paths use diffusers' default processor (shown as 'attention')",
    "text-to-image: compile is on/off only, mode fixed to max-autotune with fullgraph=True (the bare loop uses "
    "--compile-mode, max-autotune by default, to match)",
    "text-to-image: latents come from one CPU torch.Generator per image (reproducibility), the bare loop uses "
    "one device generator per call",
    "text-to-image / llm-captions: dtype auto is bfloat16 on GPUs that have it (A100/H100/H200), so "
    "recipes/synclr.yaml as written runs bf16, not fp16; this bench passes dtype explicitly",
    "llm-captions: sampling is per-sample seeded (one device torch.Generator per row, Gumbel noise over the "
    "whole vocabulary each step, top-p by a full sort) where the bare loop calls torch.multinomial once per "
    "batch; no torch.compile, no attention or KV-cache settings (transformers' defaults, shown as 'attention')",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny configs instead of the published ones (CPU check)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda; cpu with --tiny)")
    parser.add_argument("--models", default="sd,llm", help="comma list of sd, llm")
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; 2 with --tiny)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default 512; 32 with --tiny)")
    parser.add_argument("--batch-sizes", default="8,16,32", help="images per pipeline call, prompts per generate")
    parser.add_argument("--rounds", type=int, help="timed rounds per setting, alternating (default 3; 2 with --tiny)")
    parser.add_argument("--calls", type=int, help="batches per timed run (default 2; >= 2 for the PNG overlap "
                        "to have a next batch to overlap with)")
    parser.add_argument("--channels-last", default=None, help="comma list of off,on (default off,on; off on CPU)")
    parser.add_argument("--compile", default=None, help="comma list of off,on (default off,on; off on CPU)")
    parser.add_argument("--compile-mode", default="max-autotune", help="bare loop's torch.compile mode "
                        "(the factory's is max-autotune)")
    parser.add_argument("--images-per-caption", type=int, default=4, help="SynCLR draws 4; divides each batch size")
    parser.add_argument("--max-new-tokens", type=int,
                        help="tokens per caption (default 60, synclr.yaml's; 16 with --tiny)")
    parser.add_argument("--dtype", help="float16 (default on CUDA), bfloat16 or float32 (default on CPU)")
    parser.add_argument("--workdir", type=Path,
                        help="where the models are written (default: /dev/shm if roomy, else tmp)")
    parser.add_argument("--keep-models", action="store_true", help="leave the written models in --workdir")
    parser.add_argument("--out", type=Path, help="results json (default bench/results/gpu_throughput[_tiny].json)")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny else "cuda")
    on_cuda = args.device.startswith("cuda")
    args.steps = args.steps or (2 if tiny else 50)
    args.resolution = args.resolution or (32 if tiny else 512)
    args.rounds = args.rounds or (2 if tiny else 3)
    args.calls = args.calls or 2
    args.max_new_tokens = args.max_new_tokens or (16 if tiny else 60)
    args.dtype = args.dtype or ("float16" if on_cuda else "float32")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    default_switch = "off,on" if on_cuda else "off"
    args.channels_last = _switches(args.channels_last or default_switch, "--channels-last")
    args.compile = _switches(args.compile or default_switch, "--compile")
    args.out = args.out or REPO / "bench" / "results" / f"gpu_throughput{'_tiny' if tiny else ''}.json"
    problems = [f"--models: unknown {m!r} (sd, llm)" for m in args.models if m not in ("sd", "llm")]
    problems += [f"--batch-sizes: {b} is not a multiple of --images-per-caption {args.images_per_caption}"
                 for b in args.batch_sizes if "sd" in args.models and b % args.images_per_caption]
    if args.resolution % 8:
        problems.append(f"--resolution {args.resolution} is not a multiple of 8")
    if problems:
        parser.error("; ".join(problems))
    return args


def _switches(text: str, flag: str) -> list[bool]:
    values = {"off": False, "on": True}
    try:
        return [values[v.strip()] for v in text.split(",") if v.strip()]
    except KeyError:
        raise SystemExit(f"gpu_throughput: {flag} takes a comma list of off,on; got {text!r}") from None


# --- building the models -------------------------------------------------------------------------


@contextmanager
def building_on(device: str, dtype: Any) -> Iterator[None]:
    """Modules constructed inside are allocated and randomly initialised on `device` in
    `dtype` directly (no CPU float32 copy first: a 7B model takes seconds, not minutes)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def write_sd(path: Path, tiny: bool, device: str, dtype: Any) -> Path:
    """SD 1.5 from its published configs (or the tiny ones), random weights, save_pretrained."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from synthfactory import tinymodels

    tokenizer_dir = tinymodels.write_tiny_clip_tokenizer(path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet_config, vae_config = (TINY_UNET, TINY_VAE) if tiny else (SD15_UNET, SD15_VAE)
    text_config = dict(SD15_TEXT_ENCODER)
    if tiny:
        v = len(tokenizer)  # tinymodels' ids: <|startoftext|> = v-2, <|endoftext|> = v-1
        text_config.update(TINY_TEXT_ENCODER, vocab_size=v, projection_dim=32,
                           bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1)
    scheduler_config = dict(TINY_SCHEDULER if tiny else SD15_SCHEDULER)
    scheduler = getattr(diffusers, scheduler_config.pop("_class_name")).from_config(scheduler_config)
    import torch

    torch.manual_seed(0)
    with building_on(device, dtype):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe, unet, vae, text_encoder
    return path


def write_llm(path: Path, tiny: bool, device: str, dtype: Any) -> Path:
    """A Llama-2-7B-sized LM (or the tiny one) with random weights and tinymodels' BPE tokenizer;
    its generation config has no EOS, so every row generates max_new_tokens tokens."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from synthfactory import tinymodels

    scratch = path.parent / f"{path.name}-tokenizer"
    tinymodels.write_tiny_causal_lm(scratch)  # its tokenizer (and a tiny model, not used)
    path.mkdir(parents=True, exist_ok=True)
    for file in scratch.iterdir():
        if file.name not in ("config.json", "generation_config.json") and not file.name.startswith("model"):
            shutil.copy2(file, path / file.name)
    shutil.rmtree(scratch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
    settings = dict(LLAMA2_7B)
    if tiny:
        settings.update(TINY_LLAMA, vocab_size=len(tokenizer))
    config = LlamaConfig(**{**settings, **ids})
    torch.manual_seed(0)
    with building_on(device, dtype):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
                                               eos_token_id=None)
    model.save_pretrained(path, safe_serialization=True)
    del model
    return path


def _workdir(requested: Path | None, tiny: bool, models: list[str]) -> Path:
    if requested:
        requested.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="synthfactory-gpu-bench-", dir=requested))
    need = 1 if tiny else (3 if "sd" in models else 0) + (15 if "llm" in models else 0)  # GB of weights
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > (need + 4) * 2**30:
        return Path(tempfile.mkdtemp(prefix="synthfactory-gpu-bench-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="synthfactory-gpu-bench-"))


# --- measuring -----------------------------------------------------------------------------------


def alternate(runs: dict[str, Callable[[], int]], rounds: int, device: str, label: str,
              pairs: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """One warm-up run of each (includes compiles), then `rounds` timed rounds with the order
    flipped each round so drift hits every path alike; per-path median rate and all rates.
    The progress line shows numerator/denominator for each of `pairs` that both ran."""
    first: dict[str, float] = {}
    for name, run in runs.items():
        started = time.perf_counter()
        run()
        _sync(device)
        first[name] = round(time.perf_counter() - started, 2)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            produced = runs[name]()
            _sync(device)
            rates[name].append(produced / (time.perf_counter() - started))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = "".join(f"  {a}/{b} {medians[a] / medians[b]:.3f}" for a, b in pairs if a in medians and b in medians)
    print(f"  {label:28s} " + "  ".join(f"{name} {medians[name]:9.2f}/s" for name in names)
          + f"{ratio}  (warm-up s: {first})", flush=True)
    return {"median": {k: round(v, 3) for k, v in medians.items()},
            "all": {k: [round(v, 3) for v in values] for k, values in rates.items()}, "first_run_s": first}


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # the factory's setting
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _attention(unet: Any) -> str:
    unet = getattr(unet, "_orig_mod", unet)
    return ",".join(sorted({type(p).__name__ for p in unet.attn_processors.values()}))


def bench_images(args: argparse.Namespace, sd_dir: Path, texts: list[str], scratch: Path) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from synthfactory.generators import text_to_image
    from synthfactory.recipe import parse_recipe
    from synthfactory.release.build import build_shard
    from synthfactory.release.bundle import plugins_of
    from synthfactory.shards import plan_shards

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    device, dtype, k = args.device, getattr(torch, args.dtype), args.images_per_caption
    on_cuda = device.startswith("cuda")
    seed = yaml.safe_load(SYNCLR.read_text())["seed"]
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)))
    png_stats: dict[str, list[float]] = {"seconds": [], "bytes": []}
    rows, info = [], {}

    def load_bare(channels_last: bool, compile_: bool) -> Any:
        pipe = StableDiffusionPipeline.from_pretrained(sd_dir, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if compile_:
            pipe.unet = torch.compile(pipe.unet, mode=args.compile_mode, fullgraph=True)
        return pipe

    def bare_run(pipe: Any, batch: int, overlap: bool) -> Callable[[], int]:
        per_call = batch // k
        captions = texts[: per_call * args.calls]

        def run() -> int:
            pngs: list[Any] = []
            for n, start in enumerate(range(0, len(captions), per_call)):
                images = pipe(prompt=captions[start: start + per_call], num_images_per_prompt=k,
                              num_inference_steps=args.steps, guidance_scale=GUIDANCE, height=args.resolution,
                              width=args.resolution, generator=torch.Generator(device).manual_seed(seed + n),
                              output_type="pil").images
                if overlap:
                    pngs += [pool.submit(_png, image) for image in images]
                else:
                    started = time.perf_counter()
                    encoded = [_png(image) for image in images]
                    png_stats["seconds"].append((time.perf_counter() - started) / len(images))
                    png_stats["bytes"] += [len(b) for b in encoded]
                    pngs += encoded
            data = [p.result() if overlap else p for p in pngs]
            members = [(f"{i:06d}.png", b) for i, b in enumerate(data)]
            members += [(f"{i:06d}.txt", captions[i // k].encode()) for i in range(len(data))]
            _write_tar(scratch / "bare.tar", members)
            return len(data)

        return run

    def factory_recipe(batch: int, channels_last: bool, compile_: bool, overlap: bool) -> Any:
        captions = texts[: (batch // k) * args.calls]
        data = {
            "name": "gpu-bench-images", "samples": len(captions), "shard_size": len(captions), "seed": seed,
            "generator": {"kind": "text-to-image", "params": {
                "model": str(sd_dir), "device": device, "dtype": args.dtype, "compile": compile_,
                "channels_last": channels_last, "overlap_encoding": overlap,
                "images_per_caption": k, "batch_size": batch, "steps": args.steps, "guidance_scale": GUIDANCE,
                "height": args.resolution, "width": args.resolution,
                "captions": {"kind": "text-list", "params": {"texts": captions}},
            }},
            "checks": [],
        }
        return parse_recipe(data, "gpu-bench", REPO / "recipes")

    def factory_run(recipe: Any) -> Callable[[], int]:
        (plan,) = plan_shards(recipe.name, recipe.samples, recipe.shard_size)

        def run() -> int:
            with tempfile.TemporaryDirectory(dir=scratch) as out:
                return build_shard(recipe, plan, Path(out), Path(out)).samples

        return run

    for compile_ in args.compile:
        for channels_last in args.channels_last:
            started = time.perf_counter()
            bare_pipe = load_bare(channels_last, compile_)
            load_s = round(time.perf_counter() - started, 2)
            for batch in args.batch_sizes:
                name = f"b{batch} cl={'on' if channels_last else 'off'} compile={'on' if compile_ else 'off'}"
                runs = {"bare": bare_run(bare_pipe, batch, False), "bare+overlap": bare_run(bare_pipe, batch, True)}
                why_not = None
                if not on_cuda and (channels_last or compile_):
                    why_not = "the factory honours channels_last and compile on CUDA only"
                png_stats["seconds"].clear()
                png_stats["bytes"].clear()
                try:
                    if why_not is None:
                        recipe = factory_recipe(batch, channels_last, compile_, overlap=True)
                        generator = plugins_of(recipe).generator
                        t = time.perf_counter()
                        generator.preflight()  # resolves the model dir (content hash), as a run does first
                        info.setdefault("factory_resolve_s", round(time.perf_counter() - t, 2))
                        t = time.perf_counter()
                        generator.pipeline()  # loaded once per worker (cached), as a shard's first batch would
                        info.setdefault("factory_load_s", {}).setdefault(f"compile={'on' if compile_ else 'off'}",
                                                                         round(time.perf_counter() - t, 2))
                        runs["factory"] = factory_run(recipe)
                        runs["factory serial"] = factory_run(factory_recipe(batch, channels_last, compile_,
                                                                            overlap=False))
                    result = alternate(runs, args.rounds, device, name,
                                       pairs=(("factory", "bare+overlap"), ("factory serial", "bare")))
                except Exception as exc:  # e.g. out of memory at this batch: keep the other settings' figures
                    print(f"  {name:28s} failed: {type(exc).__name__}: {exc}".splitlines()[0][:300], flush=True)
                    rows.append({"setting": name, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                    _free(device)
                    continue
                m = result["median"]
                row = {"setting": name, "batch": batch, "channels_last": channels_last, "compile": compile_,
                       "bare_load_s": load_s, **result,
                       "png_ms_per_image": round(1000 * statistics.median(png_stats["seconds"]), 2),
                       "png_bytes_per_image": round(statistics.mean(png_stats["bytes"]))}
                if "factory" in m:
                    row["ratio"] = round(m["factory"] / m["bare+overlap"], 3)  # both overlap PNG encoding
                    row["ratio_serial"] = round(m["factory serial"] / m["bare"], 3)  # neither does
                    row["overlap_gain"] = {"bare": round(m["bare+overlap"] / m["bare"], 3),
                                           "factory": round(m["factory"] / m["factory serial"], 3)}
                    row["factory_settings"] = {k: generator.params.model_dump()[k]
                                               for k in ("channels_last", "compile", "overlap_encoding")}
                    factory_pipe = generator.pipeline()
                    row["attention"] = {"bare": _attention(bare_pipe.unet), "factory": _attention(factory_pipe.unet)}
                    row["unet_dtype"] = {"bare": str(getattr(bare_pipe.unet, "dtype", "")),
                                         "factory": str(getattr(factory_pipe.unet, "dtype", ""))}
                else:
                    row["factory_not_run"] = why_not
                    row["attention"] = {"bare": _attention(bare_pipe.unet)}
                rows.append(row)
            del runs, bare_pipe  # the runs' closures hold the pipeline too
            text_to_image._load_pipeline.cache_clear()  # the factory's pipeline for this setting
            _free(device)
    pool.shutdown()
    text_to_image._load_pipeline.cache_clear()
    _free(device)
    return {"rows": rows, **info}


def bench_tokens(args: argparse.Namespace, llm_dir: Path, scratch: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthfactory.generators import llm_captions
    from synthfactory.recipe import parse_recipe
    from synthfactory.release.build import build_shard
    from synthfactory.release.bundle import plugins_of
    from synthfactory.samples import slot_for
    from synthfactory.shards import plan_shards

    device, n_new = args.device, args.max_new_tokens
    synclr = yaml.safe_load(SYNCLR.read_text())
    caption_spec = synclr["generator"]["params"]["captions"]
    temperature, top_p = caption_spec["params"]["temperature"], caption_spec["params"]["top_p"]

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info: dict[str, Any] = {"bare_load_s": round(time.perf_counter() - started, 2),
                            "attention": {"bare": model.config._attn_implementation}}
    rows = []

    def recipe_for(batch: int, greedy: bool) -> Any:
        spec = json.loads(json.dumps(caption_spec))
        spec["params"].update(model=str(llm_dir), device=device, dtype=args.dtype, batch_size=batch,
                              max_new_tokens=n_new)
        if greedy:
            spec["params"]["temperature"] = 0  # llm-captions' greedy mode
        samples = batch * args.calls
        data = {"name": "gpu-bench-captions", "samples": samples, "shard_size": samples, "seed": synclr["seed"],
                "generator": spec, "checks": []}
        return parse_recipe(data, "gpu-bench", REPO / "recipes")

    for batch in args.batch_sizes:
        recipe, greedy_recipe = recipe_for(batch, greedy=False), recipe_for(batch, greedy=True)
        generator = plugins_of(recipe).generator
        t = time.perf_counter()
        generator.preflight()
        info.setdefault("factory_resolve_s", round(time.perf_counter() - t, 2))
        t = time.perf_counter()
        llm_captions._load_lm(generator.model.path, generator.device, args.dtype)  # once per worker (cached)
        info.setdefault("factory_load_s", round(time.perf_counter() - t, 2))
        prompts = [generator.prompt(slot_for(recipe.seed, i)).text for i in range(recipe.samples)]
        (plan,) = plan_shards(recipe.name, recipe.samples, recipe.shard_size)
        recorded: dict[str, list[int]] = {"factory greedy": [], "factory sampled": []}
        prompt_tokens: list[int] = []

        def bare(sample: bool) -> Callable[[], int]:
            def run() -> int:
                produced = 0
                for start in range(0, len(prompts), batch):
                    encoded = tokenizer(prompts[start: start + batch], return_tensors="pt", padding=True).to(device)
                    options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else \
                        {"do_sample": False}
                    with torch.inference_mode():
                        output = model.generate(**encoded, max_new_tokens=n_new, pad_token_id=tokenizer.pad_token_id,
                                                **options)
                    new = output[:, encoded["input_ids"].shape[1]:]
                    tokenizer.batch_decode(new, skip_special_tokens=True)
                    if new.shape[1] != n_new:
                        raise RuntimeError(f"bare generate stopped after {new.shape[1]} of {n_new} tokens")
                    produced += new.numel()
                    prompt_tokens.append(int(encoded["attention_mask"].sum()) // new.shape[0])
                return produced

            return run

        def factory(recipe: Any, path: str) -> Callable[[], int]:
            def run() -> int:
                with tempfile.TemporaryDirectory(dir=scratch) as out:
                    result = build_shard(recipe, plan, Path(out), Path(out))
                recorded[path].append(int(result.usage.get("completion_tokens", 0)))
                return recipe.samples * n_new  # no EOS: every row runs n_new steps (recorded: non-pad ones)

            return run

        name = f"b{batch} max_new_tokens={n_new}"
        try:
            runs = {"bare greedy": bare(False), "bare sampled": bare(True),
                    "factory greedy": factory(greedy_recipe, "factory greedy"),
                    "factory sampled": factory(recipe, "factory sampled")}
            result = alternate(runs, args.rounds, device, name,
                               pairs=(("factory greedy", "bare greedy"), ("factory sampled", "bare sampled")))
        except Exception as exc:  # e.g. out of memory at this batch: keep the other batch sizes' figures
            print(f"  {name:28s} failed: {type(exc).__name__}: {exc}".splitlines()[0][:300], flush=True)
            rows.append({"setting": name, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            _free(device)
            continue
        m = result["median"]
        lm, _ = llm_captions._load_lm(generator.model.path, generator.device, args.dtype)
        info["attention"]["factory"] = lm.config._attn_implementation
        rows.append({"setting": name, "batch": batch, **result,
                     "ratio_greedy": round(m["factory greedy"] / m["bare greedy"], 3),
                     "ratio_sampled": round(m["factory sampled"] / m["bare sampled"], 3),
                     "factory_temperature": {"greedy": 0, "sampled": temperature}, "factory_top_p": top_p,
                     "prompt_tokens_mean": round(statistics.mean(prompt_tokens)),
                     "factory_recorded_completion_tokens": {k: v[-1] for k, v in recorded.items()},
                     "factory_tokens_per_run": recipe.samples * n_new})
    del model
    llm_captions._load_lm.cache_clear()
    _free(device)
    return {"rows": rows, **info}


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- report --------------------------------------------------------------------------------------


def _measured(rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows that ran; a row that failed is printed as its first error line."""
    for row in rows:
        if "error" in row:
            print(f"{row['setting']:28s} failed: {row['error'].splitlines()[0][:200]}")
        else:
            yield row


def print_report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    size = f"{args.resolution}x{args.resolution}"
    models = "tiny models" if args.tiny else "SD 1.5 / Llama-2-7B-sized"
    print(f"\n{models} (random weights) on {results['machine']['device_name']}, "
          f"{args.dtype}, {args.rounds} rounds (medians), {args.calls} batch(es) per run")
    if "images" in results:
        img = results["images"]
        print(f"\nimages/s  ({size}, {args.steps} steps, CFG {GUIDANCE}, {args.images_per_caption} images per caption, "
              f"PNG level 1; target >= {TARGET} for factory/bare+ovl and fac-ser/bare)")
        print("  bare: diffusers loop, PNGs encoded after each call; bare+ovl: the same, encoding batch n on a thread "
              "pool while batch n+1 runs;\n  factory: text-to-image with overlap_encoding on (its default), "
              "channels_last/compile as the row says; fac-ser: overlap_encoding off")
        print(f"{'setting':28s} {'bare':>8s} {'bare+ovl':>9s} {'factory':>8s} {'fac-ser':>8s} {'ratio':>6s} "
              f"{'ser rat':>7s} {'PNG ms':>7s} {'PNG kB':>7s}  attention")
        for row in _measured(img["rows"]):
            m = row["median"]
            factory = f"{m['factory']:8.2f}" if "factory" in m else f"{'n/a':>8s}"
            serial = f"{m['factory serial']:8.2f}" if "factory serial" in m else f"{'n/a':>8s}"
            ratio = f"{row['ratio']:6.3f}" if "ratio" in row else f"{'-':>6s}"
            ratio_serial = f"{row['ratio_serial']:7.3f}" if "ratio_serial" in row else f"{'-':>7s}"
            flag = "" if "ratio" not in row else \
                ("  ok" if min(row["ratio"], row["ratio_serial"]) >= TARGET else "  BELOW TARGET")
            print(f"{row['setting']:28s} {m['bare']:8.2f} {m['bare+overlap']:9.2f} {factory} {serial} {ratio} "
                  f"{ratio_serial} {row['png_ms_per_image']:7.1f} {row['png_bytes_per_image'] / 1000:7.1f}  "
                  f"{'/'.join(sorted(set(row['attention'].values())))}{flag}")
            if "factory_not_run" in row:
                print(f"{'':28s} factory n/a: {row['factory_not_run']}")
        small = [r for r in img["rows"] if r.get("png_bytes_per_image", 1e12) < 0.05 * 3 * args.resolution ** 2]
        if small:
            print("note: some images PNG-encode to under 5% of their raw size (flat output from random weights): "
                  "the PNG cost is understated there")
        print(f"\npublished anchors, SD 1.5 512x512, 50 steps, fp16, A100 (trained weights; compare at "
              f"--steps 50 --resolution 512):")
        for setting, figure, rate in ANCHORS:
            print(f"  {setting:40s} {figure:>14s}  = {rate:5.2f} images/s")
    if "tokens" in results:
        tok = results["tokens"]
        print(f"\ntokens/s  (generated tokens, {args.max_new_tokens} per prompt, SynCLR prompts; "
              f"target >= {TARGET} for each factory/bare pair; attention {tok['attention']})")
        print("  greedy: bare generate(do_sample=False) / factory llm-captions temperature 0; sampled: bare "
              "generate(do_sample=True) / factory per-sample seeded sampling on the device, both at synclr.yaml's "
              "temperature and top-p")
        print(f"{'setting':28s} {'bare grd':>9s} {'fac grd':>9s} {'ratio':>6s} {'bare smp':>9s} {'fac smp':>9s} "
              f"{'ratio':>6s} {'prompt tok':>10s}")
        for row in _measured(tok["rows"]):
            m = row["median"]
            flag = "  ok" if min(row["ratio_greedy"], row["ratio_sampled"]) >= TARGET else "  BELOW TARGET"
            print(f"{row['setting']:28s} {m['bare greedy']:9.1f} {m['factory greedy']:9.1f} {row['ratio_greedy']:6.3f} "
                  f"{m['bare sampled']:9.1f} {m['factory sampled']:9.1f} {row['ratio_sampled']:6.3f} "
                  f"{row['prompt_tokens_mean']:10d}{flag}")
    print("\nnot exposed by the factory's generators, or done differently (compared as the factory runs it):")
    for line in NOT_EXPOSED:
        print(f"  - {line}")
    fixed = results["fixed_costs_s"]
    print(f"\nfixed costs (s, not in the rates): {fixed}")
    load = results["load_1min"]
    print(f"load average (1 min) at start / end: {load[0]} / {load[-1]} on {os.cpu_count()} CPUs "
          "(other load skews the rates)")
    print(f"total {results['total_s']:.1f} s; wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_throughput: --device {args.device} asked but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, {torch.cuda.device_count()} CUDA devices): no GPU here; "
              "run `--tiny --device cpu` to check the code paths", file=sys.stderr)
        raise SystemExit(2)
    total = time.perf_counter()
    from synthfactory import settings

    settings.apply_offline_defaults()
    import diffusers
    import transformers

    from synthfactory.samples import slot_for

    dtype = getattr(torch, args.dtype)
    on_cuda = args.device.startswith("cuda")
    workdir = _workdir(args.workdir, args.tiny, args.models)
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "device_name": torch.cuda.get_device_name(args.device) if on_cuda else f"{platform.processor() or 'cpu'} "
                           f"({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)",
            "sdpa_backends": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                              "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                              "math": torch.backends.cuda.math_sdp_enabled()} if on_cuda else None,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "anchors": [{"setting": s, "published": f, "images_per_s": round(r, 3)} for s, f, r in ANCHORS],
        "not_exposed": list(NOT_EXPOSED),
        "fixed_costs_s": {},
        "load_1min": [round(os.getloadavg()[0], 2)],
    }
    fixed = results["fixed_costs_s"]
    print(f"gpu_throughput: {'tiny' if args.tiny else 'published'} configs on {args.device} "
          f"({results['machine']['device_name']}), {args.dtype}; models in {workdir}", flush=True)
    try:
        scratch = workdir / "out"
        scratch.mkdir()
        if "sd" in args.models:
            started = time.perf_counter()
            sd_dir = write_sd(workdir / "sd", args.tiny, args.device, dtype)
            _sync(args.device)
            _free(args.device)
            fixed["write_sd_s"] = round(time.perf_counter() - started, 2)
            # the same captions for both paths: "a photo of <concept>" from SynCLR's concept sampling
            from synthfactory.recipe import load_recipe
            from synthfactory.release.bundle import plugins_of

            captions = plugins_of(load_recipe(SYNCLR)).generator.captions
            seed = load_recipe(SYNCLR).seed
            needed = max(args.batch_sizes) // args.images_per_caption * args.calls
            texts = [f"a photo of {captions.prompt(slot_for(seed, i)).fields['concept']}" for i in range(needed)]
            print(f"images: writing took {fixed['write_sd_s']} s; {args.resolution}px, {args.steps} steps", flush=True)
            results["images"] = bench_images(args, sd_dir, texts, scratch)
            fixed["factory_resolve_sd_s"] = results["images"].pop("factory_resolve_s", None)
            fixed["factory_load_sd_s"] = results["images"].pop("factory_load_s", None)
        if "llm" in args.models:
            started = time.perf_counter()
            llm_dir = write_llm(workdir / "llm", args.tiny, args.device, dtype)
            _sync(args.device)
            _free(args.device)
            fixed["write_llm_s"] = round(time.perf_counter() - started, 2)
            print(f"tokens: writing took {fixed['write_llm_s']} s; {args.max_new_tokens} new tokens per prompt",
                  flush=True)
            results["tokens"] = bench_tokens(args, llm_dir, scratch)
            fixed["factory_resolve_llm_s"] = results["tokens"].pop("factory_resolve_s", None)
            fixed["factory_load_llm_s"] = results["tokens"].pop("factory_load_s", None)
            fixed["bare_load_llm_s"] = results["tokens"].pop("bare_load_s", None)
    finally:
        if not args.keep_models:
            shutil.rmtree(workdir, ignore_errors=True)
    results["total_s"] = round(time.perf_counter() - total, 1)
    results["load_1min"].append(round(os.getloadavg()[0], 2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_report(args, results)


if __name__ == "__main__":
    main()
