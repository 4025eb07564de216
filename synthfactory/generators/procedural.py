"""Procedural labelled scenes: coloured shapes on patterned backgrounds (CPU, no weights).

The embedded default generator. Each scene has a subject shape (its class is the
sample's label) and up to `max_objects - 1` smaller distractors, with a caption and
ground truth (per-object class, colour and bounding box). Drawing happens at twice the
resolution and is box-filtered down, which anti-aliases edges cheaply.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw
from pydantic import Field, field_validator, model_validator

from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.samples import Rejection, Sample, SampleSlot

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "cyan": (40, 200, 210),
    "magenta": (220, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
PATTERN_WORDS = {"plain": "plain", "gradient": "gradient", "stripes": "striped"}
SUPERSAMPLE = 2


class ShapesParams(GeneratorParams):
    image_size: int = Field(64, ge=16, le=1024, description="width = height in pixels")
    classes: tuple[str, ...] = Field(("circle", "square", "triangle", "star", "hexagon"), min_length=2)
    class_weights: tuple[float, ...] | None = Field(None, description="sampling weight per class; default uniform")
    colors: tuple[str, ...] = Field(("red", "green", "blue", "yellow", "orange", "purple", "white", "black"), min_length=2)
    backgrounds: tuple[Literal["plain", "gradient", "stripes"], ...] = Field(("plain", "gradient", "stripes"), min_length=1)
    max_objects: int = Field(3, ge=1, le=8)
    max_overlap: float = Field(0.25, ge=0.0, le=1.0, description="largest IoU allowed between two objects")
    placement_attempts: int = Field(20, ge=1, le=1000)
    image_format: Literal["png", "jpg"] = "png"

    @field_validator("classes")
    @classmethod
    def _known_shapes(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shape {unknown[0]!r}; available: {', '.join(SHAPES)}")
        if len(set(classes)) != len(classes):
            raise ValueError("classes must not repeat")
        return classes

    @field_validator("colors")
    @classmethod
    def _known_colors(cls, colors: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"unknown colour {unknown[0]!r}; available: {', '.join(PALETTE)}")
        return colors

    @model_validator(mode="after")
    def _weights_match_classes(self) -> "ShapesParams":
        weights = self.class_weights
        if weights is not None:
            if len(weights) != len(self.classes):
                raise ValueError(f"class_weights has {len(weights)} values for {len(self.classes)} classes")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError("class_weights must be non-negative with a positive sum")
        return self


def _size_word(fraction: float) -> str:
    return "small" if fraction < 0.25 else "medium" if fraction < 0.4 else "large"


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of circumradius r (circles are drawn as 48-gons)."""
    if shape == "circle":
        corners, radii, angle = 48, (r,), 0.0
    elif shape == "square":
        corners, radii = 4, (r,)
    elif shape == "triangle":
        corners, radii = 3, (r,)
    elif shape == "hexagon":
        corners, radii = 6, (r,)
    elif shape == "diamond":
        corners, radii = 4, (r, r * 0.6)
    else:  # star
        corners, radii = 10, (r, r * 0.45)
    return [
        (
            cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / corners),
            cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


@GENERATORS.register("procedural-shapes")
class ShapesGenerator(Generator):
    """Labelled shape scenes; the subject's class is the label."""

    Params = ShapesParams
    version = "1"
    columns = {
        "label": pa.string(),
        "labels": pa.list_(pa.string()),
        "bboxes": pa.list_(pa.list_(pa.int32())),
        "colors": pa.list_(pa.string()),
        "background": pa.string(),
        "width": pa.int32(),
        "height": pa.int32(),
    }
    params: ShapesParams

    def labels(self) -> tuple[str, ...]:
        return self.params.classes

    def target_shares(self) -> dict[str, dict[str, float]]:
        weights = self.params.class_weights or (1.0,) * len(self.params.classes)
        return {"label": {label: weight / sum(weights) for label, weight in zip(self.params.classes, weights)}}

    def image_size(self) -> tuple[int, int]:
        return (self.params.image_size, self.params.image_size)

    def generate(self, slots: Sequence[SampleSlot]) -> Iterator[Sample | Rejection]:
        for slot in slots:
            yield self._scene(slot)

    def _scene(self, slot: SampleSlot) -> Sample | Rejection:
        p = self.params
        rng = random.Random(slot.seed)
        size = p.image_size
        canvas = size * SUPERSAMPLE
        bg_name = rng.choice(p.colors)
        pattern = rng.choice(p.backgrounds)
        image = self._background(bg_name, pattern, canvas, rng)
        draw = ImageDraw.Draw(image)
        object_colors = [c for c in p.colors if c != bg_name]
        n_objects = rng.randint(1, p.max_objects)

        objects: list[dict] = []
        for position in range(n_objects):
            shape = rng.choices(p.classes, weights=p.class_weights)[0] if position == 0 else rng.choice(p.classes)
            fraction = rng.uniform(0.3, 0.55) if position == 0 else rng.uniform(0.12, 0.3)
            radius = fraction * size / 2
            for _ in range(p.placement_attempts):
                cx = rng.uniform(radius, size - radius)
                cy = rng.uniform(radius, size - radius)
                angle = rng.uniform(0, 2 * math.pi)
                points = _shape_points(shape, cx, cy, radius, angle)
                xs, ys = [x for x, _ in points], [y for _, y in points]
                bbox = [max(0, math.floor(min(xs))), max(0, math.floor(min(ys))),
                        min(size, math.ceil(max(xs))), min(size, math.ceil(max(ys)))]
                if all(_iou(bbox, other["bbox"]) <= p.max_overlap for other in objects):
                    break
            else:
                return Rejection(
                    slot,
                    f"could not place object {position + 1} of {n_objects} with IoU <= {p.max_overlap} "
                    f"in {p.placement_attempts} attempts",
                )
            color = rng.choice(object_colors)
            draw.polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points], fill=PALETTE[color])
            objects.append({"class": shape, "color": color, "size": _size_word(fraction), "bbox": bbox})

        image = image.reduce(SUPERSAMPLE)
        caption = self._caption(objects, bg_name, pattern)
        encoded = io.BytesIO()
        if p.image_format == "png":
            image.save(encoded, "PNG", compress_level=6)
        else:
            image.save(encoded, "JPEG", quality=90)
        truth = {
            "key": slot.key,
            "index": slot.index,
            "seed": slot.seed,
            "label": objects[0]["class"],
            "objects": objects,
            "background": {"color": bg_name, "pattern": pattern},
            "caption": caption,
        }
        return Sample(
            slot=slot,
            caption=caption,
            files={
                p.image_format: encoded.getvalue(),
                "json": json.dumps(truth, sort_keys=True, separators=(",", ":")).encode(),
                "txt": caption.encode(),
            },
            payload=p.image_format,
            columns={
                "label": objects[0]["class"],
                "labels": [o["class"] for o in objects],
                "bboxes": [o["bbox"] for o in objects],
                "colors": [o["color"] for o in objects],
                "background": f"{bg_name} {pattern}",
                "width": size,
                "height": size,
            },
        )

    @staticmethod
    def _background(name: str, pattern: str, canvas: int, rng: random.Random) -> Image.Image:
        base = np.array(PALETTE[name], dtype=np.float32)
        if pattern == "plain":
            return Image.new("RGB", (canvas, canvas), PALETTE[name])
        if pattern == "gradient":
            ramp = np.linspace(0.55, 1.15, canvas, dtype=np.float32)[:, None, None]
            rows = np.clip(base[None, None, :] * ramp, 0, 255).astype(np.uint8)
            return Image.fromarray(np.repeat(rows, canvas, axis=1), "RGB")
        period = rng.randint(3, 8) * SUPERSAMPLE * 2
        shade = tuple(int(v) for v in np.clip(base * 0.7, 0, 255))
        image = Image.new("RGB", (canvas, canvas), PALETTE[name])
        draw = ImageDraw.Draw(image)
        for x in range(0, canvas, period):
            draw.rectangle([x, 0, x + period // 2 - 1, canvas], fill=shade)
        return image

    @staticmethod
    def _caption(objects: list[dict], bg_name: str, pattern: str) -> str:
        phrases = [f"a {o['size']} {o['color']} {o['class']}" for o in objects]
        scene = phrases[0] if len(phrases) == 1 else f"{phrases[0]} with {' and '.join(phrases[1:])}"
        return f"{scene} on a {PATTERN_WORDS[pattern]} {bg_name} background"
