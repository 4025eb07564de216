"""The model generators' throughput paths, on tiny random-weight models (CPU here; the
CUDA-only checks run where a GPU is present and are skipped elsewhere):

- text-to-image encodes batch n's images on a background thread while batch n+1
  denoises, yielding the same bytes in the same order as encoding each batch in turn;
  channels-last is a param;
- llm-captions decodes greedily at temperature 0 (the argmax at every step), and its
  sampled path draws each sample's noise from a generator on the model's device, so a
  caption depends on its seed alone, not on the batch it shared.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from synthfactory import tinymodels
from synthfactory.generators import Rejection, Sample, SampleSlot
from synthfactory.generators import llm_captions, text_to_image
from synthfactory.recipe import load_recipe, parse_recipe
from synthfactory.release.bundle import plugins_of
from synthfactory.samples import slot_for

REPO = Path(__file__).resolve().parent.parent
INSTRUCTIONS = REPO / "recipes" / "instructions.yaml"
cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-gpu-paths")
    return {"llm": tinymodels.write_tiny_causal_lm(root / "llm"),
            "sd": tinymodels.write_tiny_stable_diffusion(root / "sd")}


# --- text-to-image ---------------------------------------------------------------------------


def images_generator(tiny: dict[str, Path], **params: Any) -> Any:
    data = {
        "name": "t2i", "samples": 8, "shard_size": 8, "seed": 7, "checks": [],
        "generator": {"kind": "text-to-image", "params": {
            "model": str(tiny["sd"]), "device": "cpu", "steps": 2, "height": 32, "width": 32,
            "images_per_caption": 2, "batch_size": 4, "guidance_scale": 2.5,
            "captions": {"kind": "text-list", "params": {"texts": ["unused"]}}, **params,
        }},
    }
    return plugins_of(parse_recipe(data, "t2i", REPO / "recipes")).generator


class ScriptedCaptions:
    """An upstream that yields captions and rejections in a fixed interleaving."""

    def __init__(self, script: str) -> None:
        self.script = script  # "s": a caption sample, "r": a rejection

    def generate(self, slots):
        for slot, kind in zip(slots, self.script, strict=True):
            if kind == "r":
                yield Rejection(slot, "refused upstream")
            else:
                text = f"a photo of thing {slot.index}"
                yield Sample(slot, text, {"txt": text.encode()}, "txt", columns={"concept": str(slot.index)})


def outputs(generator: Any, script: str) -> list[tuple[str, str, dict[str, bytes]]]:
    generator.__dict__["captions"] = ScriptedCaptions(script)  # replaces the cached upstream
    slots = [slot_for(7, i) for i in range(len(script))]
    return [(type(x).__name__, x.slot.key, getattr(x, "files", {})) for x in generator.generate(slots)]


# rejections before, between and after batches of two captions, and a last, partial batch
SCRIPT = "rssrsrsrrsss"


def test_overlapped_encoding_gives_the_serial_bytes_in_the_serial_order(tiny):
    overlapped = images_generator(tiny)
    assert overlapped.params.overlap_encoding and overlapped.params.channels_last  # the defaults
    serial = images_generator(tiny, overlap_encoding=False)
    a, b = outputs(overlapped, SCRIPT), outputs(serial, SCRIPT)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert a == b  # the same PNG, txt and json bytes, sample for sample
    assert [kind for kind, _, _ in a].count("Sample") == 2 * SCRIPT.count("s")
    assert [kind for kind, _, _ in a].count("Rejection") == SCRIPT.count("r")
    # the order is the batch loop's: a rejection as soon as it is seen, a batch's images when drawn
    expected, pending = [], []
    for i, kind in enumerate(SCRIPT):
        key = slot_for(7, i).key
        if kind == "r":
            expected.append(("Rejection", key))
            continue
        pending.append(key)
        if len(pending) == 2:
            expected += [("Sample", f"{caption}-{j}") for caption in pending for j in range(2)]
            pending = []
    expected += [("Sample", f"{caption}-{j}") for caption in pending for j in range(2)]
    assert [x[:2] for x in a] == expected
    assert len({files["png"] for _, _, files in a if "png" in files}) == 2 * SCRIPT.count("s")


def test_a_batch_is_encoded_on_a_background_thread_while_the_next_one_denoises(tiny, monkeypatch):
    events: list[tuple[str, Any]] = []
    main = threading.get_ident()
    real_render, real_encode = text_to_image.TextToImage.render, text_to_image.encode_image

    def render(self, captions, seeds):
        events.append(("render", len(seeds)))
        return real_render(self, captions, seeds)

    def encode(image, image_format):
        events.append(("encode", threading.get_ident() != main))
        return real_encode(image, image_format)

    monkeypatch.setattr(text_to_image.TextToImage, "render", render)
    monkeypatch.setattr(text_to_image, "encode_image", encode)
    generator = images_generator(tiny)
    generator.__dict__["captions"] = ScriptedCaptions("ssssss")  # three batches of two captions
    for item in generator.generate([slot_for(7, i) for i in range(6)]):
        events.append(("yield", item.slot.key))
    assert all(off_main for kind, off_main in events if kind == "encode")
    renders = [i for i, (kind, _) in enumerate(events) if kind == "render"]
    yields = [i for i, (kind, _) in enumerate(events) if kind == "yield"]
    assert len(renders) == 3 and len(yields) == 12
    # batch 0's images are yielded only after batch 1 started denoising, batch 1's after batch 2's
    assert renders[1] < yields[0] and renders[2] < yields[4]
    # and no batch waits for more than one earlier batch: batch 0 is out before batch 2 starts
    assert yields[3] < renders[2]

    events.clear()
    generator = images_generator(tiny, overlap_encoding=False)
    generator.__dict__["captions"] = ScriptedCaptions("ssss")
    for item in generator.generate([slot_for(7, i) for i in range(4)]):
        events.append(("yield", item.slot.key))
    assert not any(off_main for kind, off_main in events if kind == "encode")


def test_stopping_early_leaves_no_encoder_running(tiny):
    generator = images_generator(tiny)
    generator.__dict__["captions"] = ScriptedCaptions("ssssss")
    before = {t.name for t in threading.enumerate()}
    items = generator.generate([slot_for(7, i) for i in range(6)])
    first = next(items)
    items.close()
    assert isinstance(first, Sample)
    assert not [t for t in threading.enumerate() if t.name.startswith("image-encode") and t.name not in before]


def test_channels_last_is_a_param_and_reaches_the_loader(tiny, monkeypatch):
    seen = []
    monkeypatch.setattr(text_to_image, "_load_pipeline", lambda *args: seen.append(args) or object())
    images_generator(tiny, channels_last=False, compile=True).pipeline()
    images_generator(tiny).pipeline()
    assert [(args[-2], args[-1]) for args in seen] == [(True, False), (False, True)]  # (compile, channels_last)
    assert "CUDA" in text_to_image.TextToImageParams.model_fields["channels_last"].description


@cuda
@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_sets_the_unets_memory_format_on_cuda(tiny, channels_last):
    import torch

    generator = images_generator(tiny, device="cuda", channels_last=channels_last)
    weight = generator.pipeline().unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last


@cuda
def test_overlapped_encoding_gives_the_serial_bytes_on_cuda(tiny):
    assert outputs(images_generator(tiny, device="cuda"), SCRIPT) == \
        outputs(images_generator(tiny, device="cuda", overlap_encoding=False), SCRIPT)


# --- llm-captions ----------------------------------------------------------------------------


def captions_generator(tiny: dict[str, Path], *overrides: str) -> Any:
    recipe = load_recipe(INSTRUCTIONS, overrides=[
        f"generator.params.model={tiny['llm']}", "generator.params.max_new_tokens=12", *overrides])
    return plugins_of(recipe).generator, recipe


def texts(generator: Any, slots: list[SampleSlot]) -> list[str | None]:
    return [answer.text for answer in generator._complete_here([generator.prompt(slot) for slot in slots])]


def argmax_decode(path: Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding by hand: the whole sequence through the model, argmax, append."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = int(model(torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], dim=1)).logits[0, -1].argmax())
            new.append(token)
            if token == model.generation_config.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_temperature_zero_is_greedy_decoding(tiny):
    generator, recipe = captions_generator(tiny, "generator.params.temperature=0", "generator.params.batch_size=4")
    assert generator.params.temperature == 0
    slots = [slot_for(recipe.seed, i) for i in range(4)]
    batched = texts(generator, slots)
    assert batched == texts(generator, slots)  # deterministic
    assert batched == [texts(generator, [slot])[0] for slot in slots]  # and batch-independent
    for slot, text in zip(slots, batched):
        assert text == argmax_decode(tiny["llm"], generator.prompt(slot).text, 12)
    # the seed plays no part: another slot with the same prompt gets the same text
    other = SampleSlot(slots[0].index, slots[0].key, slots[0].seed + 1)
    prompt = generator.prompt(slots[0])
    answers = generator._complete_here([prompt, llm_captions.Prompt(**{**prompt.__dict__, "slot": other})])
    assert answers[0].text == answers[1].text == batched[0]


def test_greedy_differs_from_sampling_and_negative_temperatures_are_refused(tiny):
    from synthfactory.recipe import RecipeError

    greedy, recipe = captions_generator(tiny, "generator.params.temperature=0")
    sampled, _ = captions_generator(tiny, "generator.params.temperature=1.0")
    slots = [slot_for(recipe.seed, i) for i in range(4)]
    assert texts(greedy, slots) != texts(sampled, slots)
    with pytest.raises(RecipeError, match="temperature: must be ≥ 0"):
        captions_generator(tiny, "generator.params.temperature=-0.5")


def test_a_sampled_caption_depends_on_its_seed_not_on_its_batch(tiny):
    generator, recipe = captions_generator(tiny, "generator.params.batch_size=8")
    slots = [slot_for(recipe.seed, i) for i in range(8)]
    together = texts(generator, slots)
    # the same slots in other company: alone, reversed, mixed with slots from elsewhere
    assert [texts(generator, [slot])[0] for slot in slots[:3]] == together[:3]
    assert texts(generator, slots[::-1]) == together[::-1]
    strangers = [slot_for(recipe.seed + 1, i) for i in range(3)]
    mixed = texts(generator, [strangers[0], slots[5], strangers[1], slots[2], strangers[2]])
    assert (mixed[1], mixed[3]) == (together[5], together[2])
    assert len(set(together)) > 1  # sampling does vary with the seed


def test_sampling_noise_comes_from_per_sample_generators_on_the_models_device(monkeypatch):
    import torch

    sampler = llm_captions._seeded_sampler([11, 12], temperature=1.0, top_p=1.0, device="cpu")
    assert [g.device for g in sampler.generators] == [torch.device("cpu")] * 2

    def no_cpu_noise(*args, **kwargs):
        raise AssertionError("per-step noise must not be drawn with torch.rand on the CPU and copied")

    monkeypatch.setattr(torch, "rand", no_cpu_noise)
    scores = torch.zeros(2, 50)  # flat logits: the argmax is the noise's argmax
    first = sampler(torch.zeros(2, 1, dtype=torch.long), scores).argmax(-1)
    monkeypatch.undo()
    # on CPU the draws are those of a CPU generator with the row's seed (the captions stay the same)
    expected = [int(torch.rand(50, generator=torch.Generator().manual_seed(seed)).argmax()) for seed in (11, 12)]
    assert first.tolist() == expected
    alone = llm_captions._seeded_sampler([12], temperature=1.0, top_p=1.0, device="cpu")
    assert int(alone(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 50)).argmax()) == expected[1]


@cuda
def test_sampled_and_greedy_captions_on_cuda_do_not_depend_on_the_batch(tiny):
    import torch

    for temperature in ("0.8", "0"):
        generator, recipe = captions_generator(tiny, "generator.params.device=cuda", "generator.params.dtype=float32",
                                               f"generator.params.temperature={temperature}")
        slots = [slot_for(recipe.seed, i) for i in range(6)]
        together = texts(generator, slots)
        assert texts(generator, slots) == together
        assert [texts(generator, [slot])[0] for slot in slots[:2]] == together[:2]
    sampler = llm_captions._seeded_sampler([1], 1.0, 0.9, torch.device("cuda"))
    assert sampler.generators[0].device.type == "cuda"
