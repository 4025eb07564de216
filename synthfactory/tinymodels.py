"""Tiny random-weight models written to disk, so nothing has to come from the hub.

Tests, benchmarks and the offline demo run the project's real ``from_pretrained(path)``
code paths against these directories instead of downloaded checkpoints. Every writer
seeds torch before building its model, so the same call writes byte-identical weights.
The outputs are meaningless (random weights); only shapes, formats and plumbing are real.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

DEFAULT_CORPUS: tuple[str, ...] = (
    "a red circle on a white background", "a blue square in the middle of the image",
    "a green triangle next to a yellow star", "a photo of a cat sitting on a chair",
    "a photo of a dog running on the grass", "a small house with a red roof",
    "a car parked on a quiet street", "a bird flying over the sea at sunset",
    "two apples and a banana on a table", "a tree in a field under a cloudy sky",
    "a person riding a bicycle in the city", "a boat on a calm lake in the morning",
    "a close up of a flower with purple petals", "a mountain covered in snow", "an orange ball on the floor",
    "a black and white drawing of a horse", "a cup of coffee next to a book",
    "a striped shirt hanging on a door", "the sky is blue and the grass is green",
    "a large circle and a small square", "circle --> a round red circle, centered",
    "square --> a blue square, rotated, on grey", "triangle --> a green triangle, small, in the corner",
    "star --> a yellow star, bright, on black", "cat --> a sleepy cat, curled up, on a sofa",
    "dog --> a happy dog, running, in a park", "house --> a wooden house, old, near a river",
    "car --> a fast car, shiny, on a road", "tree --> a tall tree, green, in spring",
    "flower --> a pink flower, open, in the sun", "concept: circle, square, triangle, star",
    "concept: cat, dog, bird, horse, fish", "concept: car, boat, bicycle, train, plane",
    "colors: red, green, blue, yellow, orange, purple, black, white, grey, pink",
    "shapes, animals, vehicles, plants, objects", "A Red Circle. A Blue Square! A Green Triangle?",
    "Photo 1: a cat. Photo 2: a dog. Photo 3: a bird.", "label: circle\ncaption: a red circle\n",
    "label: square\ncaption: a blue square\n", "the quick brown fox jumps over the lazy dog",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100", "a painting of a city at night with lights",
    "an illustration of a robot holding a flag", "a simple icon of a heart, flat style",
    "a watercolor of a lighthouse by the sea", "a sketch of a chair, pencil, on paper",
    "a render of a cube, glossy, studio light", "a macro photo of a leaf with water drops",
    "a bowl of soup with bread on the side", "a child flying a kite on the beach",
)


def write_tiny_causal_lm(
    path: str | Path,
    *,
    arch: str = "llama",
    corpus: Iterable[str] | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> Path:
    """Write a tiny causal LM (``arch`` "llama" or "gpt2") with a byte-level BPE trained on ``corpus``.

    The tokenizer pads on the left, as batched ``generate`` needs for decoder-only models.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus if corpus is not None else DEFAULT_CORPUS), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="left", model_max_length=1024, **specials
    )
    tokenizer.save_pretrained(path)

    ids = {name: tokenizer.convert_tokens_to_ids(specials[f"{name}_token"]) for name in ("bos", "eos", "pad")}
    token_ids = {f"{name}_token_id": value for name, value in ids.items()}
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            **token_ids,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=1024, n_embd=hidden_size, n_layer=num_layers, n_head=4, **token_ids
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'gpt2'")
    model.generation_config = GenerationConfig(**token_ids)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocab: printable ASCII with and without "</w>", a few merged words, then the specials."""
    chars = [chr(c) for c in range(33, 127)]  # byte-level BPE maps these bytes to themselves
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in ("a", "the", "red", "blue", "circle", "square", "photo"):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _save_clip_tokenizer(path: Path) -> CLIPTokenizer:
    """Write the tiny CLIP vocab as vocab.json + merges.txt and as a saved CLIPTokenizer; return the tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab()
    (path / "vocab.json").write_text(json.dumps(vocab, indent=1), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer.save_pretrained(path)
    return tokenizer


def write_tiny_clip_tokenizer(path: str | Path) -> Path:
    """Write a tiny CLIP tokenizer (vocab.json, merges.txt, tokenizer.json; 77-token max length)."""
    path = Path(path)
    _save_clip_tokenizer(path)
    return path


def _clip_text_config(vocab_size: int, hidden_size: int) -> dict[str, int]:
    """Keyword arguments for a tiny CLIPTextConfig matching the tiny CLIP tokenizer."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def write_tiny_clip(path: str | Path, *, image_size: int = 32) -> Path:
    """Write a tiny CLIPModel plus a CLIPProcessor (PIL image processor, tiny tokenizer) to ``path``."""
    path = Path(path)
    tokenizer = _save_clip_tokenizer(path)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    vision = {
        "image_size": image_size,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    config = CLIPConfig(text_config=_clip_text_config(len(tokenizer), 32), vision_config=vision, projection_dim=32)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_stable_diffusion(
    path: str | Path,
    *,
    sample_size: int = 32,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    layers_per_block: int = 1,
) -> Path:
    """Write a tiny StableDiffusionPipeline (DDIM scheduler, no safety checker) to ``path``.

    Images are ``sample_size * 2 ** (len(block_out_channels) - 1)`` pixels square: 64x64 with the
    defaults, which is also the pipeline's default height/width. Explicit height/width must be
    multiples of 8.
    """
    # Imported here: diffusers takes seconds to import and only this writer needs it.
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    path = Path(path)
    tokenizer = _save_clip_tokenizer(path / "tokenizer")
    groups = math.gcd(*block_out_channels)
    blocks = len(block_out_channels)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (blocks - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=sample_size * 2 ** (blocks - 1),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_clip_text_config(len(tokenizer), cross_attention_dim)))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_stable_video_diffusion(
    path: str | Path,
    *,
    sample_size: int = 8,
    block_out_channels: tuple[int, ...] = (32, 32, 32),
    cross_attention_dim: int = 32,
    num_frames: int = 4,
) -> Path:
    """Write a tiny StableVideoDiffusionPipeline (image-to-video, Euler scheduler) to ``path``.

    The VAE halves each side per block after the first, so with the defaults latents are a
    quarter of the frame's side and the default height/width is 32x32 pixels; explicit
    height/width must be multiples of 8 (the pipeline's check). Every block has 32 channels,
    the least the SVD blocks' 32-group norms allow; three of them keep the UNet's costly
    full-latent level small (a 4-frame 32x32 continuation in 2 steps is about 0.1 s of one
    CPU core). ``num_frames`` is only the default frame count: the temporal layers take any.
    The CLIP image encoder sees 224x224 images, as the pipeline resizes the conditioning
    frame to that before encoding it.
    """
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    blocks = len(block_out_channels)
    time_embed_dim = 8  # per added time id (fps, motion bucket, noise augmentation): 3 of them
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=sample_size,
        in_channels=8,  # noisy latents + the conditioning frame's latents
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) + ("DownBlockSpatioTemporal",) * (blocks - 1),
        up_block_types=("UpBlockSpatioTemporal",) * (blocks - 1) + ("CrossAttnUpBlockSpatioTemporal",),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        num_attention_heads=4,
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=3 * time_embed_dim,
        num_frames=num_frames,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        sample_size=sample_size * 2 ** (blocks - 1),
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=224,
        patch_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=cross_attention_dim,
    ))
    scheduler = EulerDiscreteScheduler(  # the real SVD scheduler's settings
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=feature_extractor
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_all(root: str | Path) -> dict[str, Path]:
    """Write the tiny llama LM, CLIP, Stable Diffusion and Stable Video Diffusion under
    ``root``/llm, /clip, /sd and /svd."""
    root = Path(root)
    return {
        "llm": write_tiny_causal_lm(root / "llm"),
        "clip": write_tiny_clip(root / "clip"),
        "sd": write_tiny_stable_diffusion(root / "sd"),
        "svd": write_tiny_stable_video_diffusion(root / "svd"),
    }
