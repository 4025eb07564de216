"""Rendered digits in the real digits' format (CPU, no weights): the synthetic side of
"train on synthetic, test on real" against the `sklearn-digits` source.

A digit is drawn as a pen draws it: a centre line, then a stroke around it. The centre
line comes from the built-in `hand` strokes (modelled on the UCI writers: open 4s,
crossed 7s, hooked 9s, footed 1s) or from a font glyph thinned to its skeleton. It is
distorted like handwriting (rotation, slant, width, an elastic warp), then preprocessed
as the UCI bitmaps were: the stroke thickened until ~30 % of the 32×32 bitmap is ink
(the real digits hold that much whatever the class), the outline fitted to a 20×32 box
(height filled, width by its aspect up to 20) and centred, and 4×4 blocks counted into
the 8×8 grid (`synthfactory.digits`). Drawing happens at 4× resolution, block-averaged down.

The defaults are tuned for utility: a logistic regression on the 64 grid values, trained
on 2,000 of these, reads ~85 % of the 1,797 real digits (Pillow's font alone: ~54 %;
mixing fonts into `hand` lowers it), so `hand` is the default and the box is filled and
centred exactly, as UCI's normalisation left every real digit.

Output is a pure function of (params, slot.seed) for one Pillow build (it bundles
FreeType); an installed font may differ between machines, the built-in strokes do not.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field, field_validator, model_validator

from synthfactory.digits import IMAGE_SIZE, digit_image, grid_from_bitmap
from synthfactory.generators.base import GENERATORS, Generator, GeneratorParams
from synthfactory.samples import Sample, SampleSlot

DIGITS = tuple(str(d) for d in range(10))
#: the built-in pen strokes (`HAND`): present everywhere, and the closest to the real digits
HAND_FONT = "hand"
#: Pillow's embedded face (Aileron Regular): present wherever Pillow has FreeType
BUNDLED_FONT = "pillow-aileron"
#: an installed font's file stem: no path, so a recipe cannot point at other files
FONT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
#: work resolution per bitmap pixel: strokes thicken in quarter pixels
SUPERSAMPLE = 4
CANVAS = IMAGE_SIZE * SUPERSAMPLE
#: the box the UCI preprocessing fits a digit into (width, height), bitmap pixels
BOX_WIDTH, BOX_HEIGHT = 20, 32
#: the most thickening steps (quarter pixels either side of the centre line)
MAX_STEPS = 32
#: font size a glyph is thinned at: fine enough that its skeleton has no gaps at 4×
GLYPH_SIZE = 200
#: width of the `HAND` unit box, in digit heights
HAND_WIDTH = 0.6
#: centre-line points per digit height: more than one per work pixel, so lines have no gaps
CURVE_DENSITY = 150


def _ellipse(cx: float, cy: float, rx: float, ry: float, start: float, end: float) -> list[tuple[float, float]]:
    """Points along an elliptic arc from `start` to `end` degrees (past 360: a closed loop)."""
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a))) for a in np.linspace(start, end, 24)]


#: per digit, its variants; a variant is pen strokes, each a curve through its points
#: (two points: a line) in a unit box, x to the right and y down
HAND: dict[str, list[list[list[tuple[float, float]]]]] = {
    "0": [[_ellipse(0.5, 0.5, 0.5, 0.5, -90, 275)],
          [_ellipse(0.5, 0.5, 0.45, 0.5, -100, 270)]],
    "1": [[[(0.2, 0.3), (0.6, 0.0)], [(0.6, 0.0), (0.5, 1.0)]],
          [[(0.15, 0.3), (0.6, 0.0)], [(0.6, 0.0), (0.55, 1.0)], [(0.25, 1.0), (0.95, 1.0)]],
          [[(0.3, 0.15), (0.6, 0.0)], [(0.6, 0.0), (0.5, 1.0)], [(0.5, 1.0), (0.9, 1.0)]],
          [[(0.35, 0.0), (0.4, 0.8), (0.95, 1.0)]],
          [[(0.75, 0.0), (0.35, 0.45), (0.55, 1.0)]]],
    "2": [[[(0.05, 0.3), (0.3, 0.02), (0.65, 0.05), (0.78, 0.3), (0.55, 0.6), (0.2, 0.85), (0.02, 0.95)], [(0.02, 0.95), (1.0, 0.95)]],
          [[(0.05, 0.25), (0.4, 0.0), (0.75, 0.15), (0.65, 0.5), (0.2, 0.92), (0.05, 0.85), (0.25, 0.75), (0.6, 0.92), (1.0, 1.0)]]],
    "3": [[[(0.05, 0.15), (0.45, 0.0), (0.9, 0.12), (0.85, 0.38), (0.4, 0.5)], [(0.4, 0.5), (0.95, 0.65), (0.85, 0.95), (0.4, 1.0), (0.0, 0.85)]],
          [[(0.05, 0.0), (0.95, 0.0)], [(0.95, 0.0), (0.4, 0.42)], [(0.4, 0.42), (0.9, 0.55), (0.95, 0.82), (0.55, 1.0), (0.05, 0.9)]]],
    "4": [[[(0.5, 0.0), (0.05, 0.65)], [(0.05, 0.65), (0.95, 0.6)], [(0.65, 0.35), (0.6, 1.0)]],
          [[(0.35, 0.0), (0.05, 0.62)], [(0.05, 0.62), (1.0, 0.58)], [(0.7, 0.2), (0.65, 1.0)]]],
    "5": [[[(0.95, 0.0), (0.15, 0.0)], [(0.15, 0.0), (0.1, 0.45)], [(0.1, 0.45), (0.5, 0.38), (0.8, 0.6), (0.7, 0.92), (0.35, 1.0), (0.05, 0.85)]],
          [[(0.15, 0.0), (0.1, 0.45)], [(0.1, 0.45), (0.5, 0.38), (0.85, 0.62), (0.7, 0.92), (0.35, 1.0), (0.05, 0.88)], [(0.15, 0.0), (0.95, 0.02)]]],
    "6": [[[(0.6, 0.0), (0.25, 0.25), (0.08, 0.6), (0.2, 0.95), (0.6, 1.0), (0.95, 0.78), (0.75, 0.52), (0.35, 0.55), (0.12, 0.75)]],
          [[(0.5, 0.0), (0.2, 0.35), (0.1, 0.75), (0.35, 1.0), (0.8, 0.95), (0.95, 0.7), (0.6, 0.55), (0.2, 0.7)]]],
    "7": [[[(0.05, 0.05), (1.0, 0.0)], [(1.0, 0.0), (0.3, 1.0)], [(0.3, 0.55), (0.85, 0.52)]],
          [[(0.05, 0.05), (1.0, 0.0)], [(1.0, 0.0), (0.6, 0.5), (0.35, 1.0)], [(0.25, 0.55), (0.85, 0.55)]],
          [[(0.0, 0.1), (0.2, 0.0), (1.0, 0.02)], [(1.0, 0.02), (0.3, 1.0)]]],
    "8": [[_ellipse(0.5, 0.23, 0.4, 0.23, 90, 455), _ellipse(0.5, 0.72, 0.42, 0.28, -90, 275)],
          [[(0.5, 0.45), (0.85, 0.2), (0.55, 0.0), (0.15, 0.15), (0.3, 0.4), (0.8, 0.68), (0.6, 1.0), (0.15, 0.88), (0.3, 0.6), (0.6, 0.45)]],
          [[(0.85, 0.05), (0.45, 0.0), (0.3, 0.2), (0.6, 0.5), (0.8, 0.75), (0.5, 1.0), (0.15, 0.85), (0.35, 0.55), (0.8, 0.3), (0.85, 0.05)]]],
    "9": [[_ellipse(0.47, 0.2, 0.45, 0.2, 0, 365), [(0.92, 0.2), (0.9, 0.75), (0.6, 1.0), (0.25, 0.97), (0.1, 0.82)]],
          [_ellipse(0.45, 0.2, 0.45, 0.2, 0, 365), [(0.9, 0.2), (0.8, 1.0)]],
          [_ellipse(0.5, 0.22, 0.48, 0.22, 0, 365), [(0.98, 0.22), (0.85, 0.8), (0.45, 1.0), (0.15, 0.9)]],
          [[(0.9, 0.15), (0.5, 0.0), (0.1, 0.2), (0.3, 0.45), (0.9, 0.35)], [(0.9, 0.02), (0.75, 1.0)]]],
}


def _curve(through: Sequence[tuple[float, float]]) -> np.ndarray:
    """Dense points of the Catmull–Rom curve through `through` (two points: the line)."""
    knots = np.asarray(through, dtype=np.float64)
    padded = np.vstack([knots[:1], knots, knots[-1:]])
    pieces = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1: i + 3]
        t = np.linspace(0, 1, max(2, math.ceil(np.linalg.norm(p2 - p1) * CURVE_DENSITY * 1.3)), endpoint=False)[:, None]
        pieces.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
    return np.vstack([*pieces, knots[-1:]])


def _centred(points: np.ndarray) -> np.ndarray:
    """Points in digit heights, centred on their box."""
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2) / (high[1] - low[1])


@functools.cache
def _hand(digit: str, variant: int) -> np.ndarray:
    """The centre line of a `HAND` variant."""
    points = np.vstack([_curve(stroke) for stroke in HAND[digit][variant]])
    points[:, 0] *= HAND_WIDTH
    return _centred(points)


def _font_dirs() -> list[Path]:
    """The XDG font directories, searched as Pillow searches them on Linux."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    data_dirs = os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    return [Path(d) / "fonts" for d in [data_home, *data_dirs.split(":")]]


@functools.cache
def _font_file(name: str) -> Path | None:
    """The installed `<name>.ttf` or `<name>.otf`, or None."""
    for directory in _font_dirs():
        for root, _, files in sorted(os.walk(directory)):
            for suffix in (".ttf", ".otf"):
                if name + suffix in files:
                    return Path(root) / (name + suffix)
    return None


def _font(name: str) -> ImageFont.FreeTypeFont:
    """The face; a worker without it fails naming it (recipes are validated elsewhere)."""
    if name == BUNDLED_FONT:
        return ImageFont.load_default(size=GLYPH_SIZE)
    path = _font_file(name)
    if path is None:
        raise ValueError(f"fonts: {name!r} is not installed on this machine")
    return ImageFont.truetype(str(path), GLYPH_SIZE)


def _thin(mask: np.ndarray) -> np.ndarray:
    """Zhang–Suen thinning: the one-pixel centre line of a shape."""
    image = np.pad(mask.astype(np.uint8), 1)
    changed = True
    while changed:
        changed = False
        for first_pass in (True, False):
            n, ne, e, se = image[:-2, 1:-1], image[:-2, 2:], image[1:-1, 2:], image[2:, 2:]
            s, sw, w, nw = image[2:, 1:-1], image[2:, :-2], image[1:-1, :-2], image[:-2, :-2]
            ring = (n, ne, e, se, s, sw, w, nw, n)
            neighbours = sum(ring[:8])
            transitions = sum((ring[i] == 0) & (ring[i + 1] == 1) for i in range(8))
            if first_pass:
                corner = (n * e * s == 0) & (e * s * w == 0)
            else:
                corner = (n * e * w == 0) & (n * s * w == 0)
            remove = (image[1:-1, 1:-1] == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & corner
            if remove.any():
                image[1:-1, 1:-1][remove] = 0
                changed = True
    return image[1:-1, 1:-1].astype(bool)


@functools.cache
def _glyph(font_name: str, digit: str) -> np.ndarray:
    """The centre line of a font's glyph: the glyph thinned to its skeleton."""
    font = _font(font_name)
    left, top, right, bottom = font.getbbox(digit)
    image = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(image).text((2 - left, 2 - top), digit, fill=255, font=font)
    rows, cols = np.nonzero(_thin(np.asarray(image) > 127))
    return _centred(np.stack([cols, rows], axis=1).astype(np.float64))


class DigitsParams(GeneratorParams):
    classes: tuple[str, ...] = Field(DIGITS, min_length=2, description="digits to make, drawn uniformly")
    fonts: tuple[str, ...] = Field(
        (HAND_FONT,), min_length=1,
        description=f"drawn uniformly: {HAND_FONT!r} (built-in strokes), {BUNDLED_FONT!r} (Pillow's face) "
        "or the stem of an installed .ttf/.otf (DejaVuSans)",
    )
    rotation: float = Field(8.0, ge=0, le=45, description="largest rotation either way, degrees")
    shear: float = Field(0.05, ge=0, le=1, description="largest slant either way (x shift per unit height)")
    aspect: tuple[float, float] = Field((0.8, 1.25), description="range of the width stretch, before fitting the box")
    scale: tuple[float, float] = Field(
        (1.0, 1.0), description="range of the box's size, a share of 20×32 (the UCI normalisation fills it)",
    )
    jitter: float = Field(0.0, ge=0, le=6, description="largest shift off centre either way, bitmap pixels (UCI centres)")
    elastic: float = Field(0.06, ge=0, le=0.3, description="largest elastic displacement, in digit heights")
    ink: tuple[float, float] = Field((0.28, 0.34), description="range of the bitmap's share of ink: sets the stroke width")
    salt: float = Field(0.0, ge=0, le=0.2, description="chance each bitmap pixel is switched on at random")

    @field_validator("classes")
    @classmethod
    def _known_digits(cls, classes: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [c for c in classes if c not in DIGITS]
        if unknown:
            raise ValueError(f"classes: {unknown[0]!r} is not a digit 0..9")
        if len(set(classes)) != len(classes):
            raise ValueError("classes must not repeat")
        return classes

    @field_validator("fonts")
    @classmethod
    def _installed_fonts(cls, fonts: tuple[str, ...]) -> tuple[str, ...]:
        for name in fonts:
            if name not in (HAND_FONT, BUNDLED_FONT) and (not FONT_NAME.fullmatch(name) or _font_file(name) is None):
                raise ValueError(
                    f"fonts: {name!r} is not installed (give {HAND_FONT!r}, {BUNDLED_FONT!r} or the stem of an installed .ttf/.otf)"
                )
        if len(set(fonts)) != len(fonts):
            raise ValueError("fonts must not repeat")
        return fonts

    @model_validator(mode="after")
    def _ranges(self) -> "DigitsParams":
        for name, (low, high), lowest, highest in (
            ("aspect", self.aspect, 0.3, 3.0), ("scale", self.scale, 0.5, 1.0), ("ink", self.ink, 0.05, 0.6),
        ):
            if not lowest <= low <= high <= highest:
                raise ValueError(f"{name}: ({low}, {high}) must be an ordered range within [{lowest}, {highest}]")
        return self


@GENERATORS.register("digits")
class DigitsGenerator(Generator):
    """8×8 rendered digits stored as the real ones are; the digit is the label."""

    Params = DigitsParams
    version = "1"
    code = ("synthfactory.digits",)
    columns = {
        "label": pa.string(),
        "font": pa.string(),
        "stroke": pa.int32(),
        "rotation": pa.float32(),
        "shear": pa.float32(),
        "width": pa.int32(),
        "height": pa.int32(),
    }
    params: DigitsParams

    def labels(self) -> tuple[str, ...]:
        return self.params.classes

    def image_size(self) -> tuple[int, int]:
        return (IMAGE_SIZE, IMAGE_SIZE)

    def preflight(self) -> None:
        """Load every font now: a worker may lack one the recipe's machine had."""
        for name in self.params.fonts:
            if name != HAND_FONT:
                _font(name)

    def generate(self, slots: Sequence[SampleSlot]) -> Iterator[Sample]:
        for slot in slots:
            yield self._digit(slot)

    def _digit(self, slot: SampleSlot) -> Sample:
        p = self.params
        rng = random.Random(slot.seed)
        digit = rng.choice(p.classes)
        font = rng.choice(p.fonts)
        render = {
            "label": digit,
            "font": font,
            "rotation": rng.uniform(-p.rotation, p.rotation),
            "shear": rng.uniform(-p.shear, p.shear),
            "aspect": rng.uniform(*p.aspect),
            "scale": rng.uniform(*p.scale),
            "shift": [rng.uniform(-p.jitter, p.jitter), rng.uniform(-p.jitter, p.jitter)],
            "ink": rng.uniform(*p.ink),
        }
        if font == HAND_FONT:
            render["variant"] = rng.randrange(len(HAND[digit]))
            centre_line = _hand(digit, render["variant"])
        else:
            centre_line = _glyph(font, digit)
        noise = np.random.default_rng(rng.getrandbits(64))
        bitmap, render["stroke"] = _draw(_distort(centre_line, render, p.elastic, noise), render)
        if p.salt:
            bitmap |= noise.random(bitmap.shape) < p.salt
        caption = f"a handwritten digit {digit}"
        truth = {"key": slot.key, "index": slot.index, "seed": slot.seed, **render}
        return Sample(
            slot=slot,
            caption=caption,
            files={
                "png": digit_image(grid_from_bitmap(bitmap)),
                "txt": caption.encode(),
                "json": json.dumps(truth, sort_keys=True, separators=(",", ":")).encode(),
            },
            payload="png",
            columns={**{name: render[name] for name in self.columns if name in render},
                     "width": IMAGE_SIZE, "height": IMAGE_SIZE},
        )


def _distort(points: np.ndarray, render: dict, elastic: float, noise: np.random.Generator) -> np.ndarray:
    """The centre line stretched, slanted, rotated and elastically warped (a smooth
    random displacement: a 4×4 field interpolated bilinearly over the digit)."""
    x = points[:, 0] * render["aspect"] - render["shear"] * points[:, 1]
    y = points[:, 1]
    angle = math.radians(render["rotation"])
    x, y = x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)
    if elastic:
        field = noise.uniform(-elastic, elastic, size=(2, 4, 4))
        u = (x - x.min()) / max(np.ptp(x), 1e-9) * 3
        v = (y - y.min()) / max(np.ptp(y), 1e-9) * 3
        i, j = np.minimum(v.astype(int), 2), np.minimum(u.astype(int), 2)
        fv, fu = v - i, u - j
        shift = (field[:, i, j] * (1 - fv) * (1 - fu) + field[:, i + 1, j] * fv * (1 - fu)
                 + field[:, i, j + 1] * (1 - fv) * fu + field[:, i + 1, j + 1] * fv * fu)
        x, y = x + shift[0], y + shift[1]
    return np.stack([x, y], axis=1)


def _dilate(mask: np.ndarray, square: bool) -> np.ndarray:
    """One step of a 3×3 square or plus-shaped dilation (alternated, they grow a disc).
    Shifts the flattened array, so the border must stay empty (ink would wrap a row)."""
    width = mask.shape[1]
    flat = mask.ravel()
    grown = flat.copy()
    grown[width:] |= flat[:-width]
    grown[:-width] |= flat[width:]
    source = grown.copy() if square else flat
    grown[1:] |= source[:-1]
    grown[:-1] |= source[1:]
    return grown.reshape(mask.shape)


def _draw(points: np.ndarray, render: dict) -> tuple[np.ndarray, int]:
    """(32×32 bitmap, stroke width in quarter pixels): the centre line thickened step by
    step, stopping at the step whose outline, fitted to the box, is nearest the target ink."""
    box_width = BOX_WIDTH * render["scale"] * SUPERSAMPLE
    box_height = BOX_HEIGHT * render["scale"] * SUPERSAMPLE
    low, high = points.min(axis=0), points.max(axis=0)
    width, height = np.maximum(high - low, 1e-9)
    # drawn a little under the box, so each thickening step is about a quarter pixel of the result
    line_height = box_height - 2 * SUPERSAMPLE
    line_width = min(box_width, width / height * line_height)
    cols = ((points[:, 0] - low[0]) / width * line_width).astype(np.intp)
    rows = ((points[:, 1] - low[1]) / height * line_height).astype(np.intp)
    # room for the thickest stroke, so the outline after k steps is the line's box grown by k
    mask = np.zeros((rows.max() + 1 + 2 * MAX_STEPS, cols.max() + 1 + 2 * MAX_STEPS), dtype=bool)
    mask[rows + MAX_STEPS, cols + MAX_STEPS] = True
    target = render["ink"] * CANVAS * CANVAS

    def outline_fit(steps: int) -> tuple[tuple[int, int], float]:
        """The outline's (width, height) fitted to the box, and its area scale: the height
        fills the box, the width keeps the aspect up to the box's (a wider digit is
        squeezed: 177 of the 178 real 0s span exactly six of the eight grid columns)."""
        out_w, out_h = cols.max() + 1 + 2 * steps, rows.max() + 1 + 2 * steps
        size = (max(1, round(min(box_width, out_w / out_h * box_height))), max(1, round(box_height)))
        return size, size[0] / out_w * size[1] / out_h

    def miss(mask: np.ndarray, steps: int) -> float:
        return abs(np.count_nonzero(mask) * outline_fit(steps)[1] - target)

    best, best_miss, steps = mask, miss(mask, 0), 0
    while steps < MAX_STEPS:
        mask = _dilate(mask, square=steps % 2 == 1)
        candidate_miss = miss(mask, steps + 1)
        if candidate_miss >= best_miss:
            break
        best, best_miss, steps = mask, candidate_miss, steps + 1
    edge = MAX_STEPS - steps
    outline = best[edge: best.shape[0] - edge, edge: best.shape[1] - edge]
    size = outline_fit(steps)[0]
    fitted = Image.fromarray(outline).convert("L").resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    shift_x, shift_y = (s * SUPERSAMPLE for s in render["shift"])
    canvas.paste(fitted, (round((CANVAS - size[0]) / 2 + shift_x), round((CANVAS - size[1]) / 2 + shift_y)))
    return np.asarray(canvas.reduce(SUPERSAMPLE)) >= 128, 2 * steps + 1
