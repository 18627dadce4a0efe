"""The shapes world: the miniature in which every model of the embedded default is trained.

Its 20 categories are colour x shape ("red circle", "blue ring", ...): names share words, every
colour comes in every shape, and each shape comes in every colour, so a category is told apart by
its form *and* its colour, never by a hue it owns. The tiny Stable Diffusion learns all 20 (as SD
knows COCO); the grounding head sees only the seen ones, and each unseen category's colour and
shape words are seen in other combinations (``SHAPES_WORLD_UNSEEN``).

A scene holds one or two objects on a dim, textured, unsaturated background, each in its own half
of the image (which half and which axis are random, so the caption's word order says nothing
about position). Its caption is the paper's template, "a photograph of a {c1} and a {c2}".
Scenes depend only on (seed, index).

The wide world (``world="shapes_wide"``, 48 categories) adds colour and shape words, so that a
word held out from the head has seen neighbours (``held_out_word``; docs/shapes_world.md
and docs/results.md, "Held-out words"). Its models are trained the same way (``make world-wide``).
"""

from __future__ import annotations

import colorsys
from typing import Literal

import numpy as np
from PIL import Image

# Hue of each colour word; each object draws its own hue, saturation and brightness around it.
COLOURS = {"red": 0.0, "yellow": 0.16, "green": 0.33, "blue": 0.62}
# Shape word -> the form drawn (shape_mask below).
SHAPES = {"circle": "disc", "square": "square", "triangle": "triangle", "cross": "cross", "ring": "ring"}
SHAPES_WORLD = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)

# The wide world: 8 colour words around the hue circle x 6 shape words, 48 categories. With four
# colours, a held-out colour word has no seen neighbour, and up to half of its categories'
# embeddings lie outside the seen ones' span, where the head's text projection was never fit.
# Here every colour has seen hue neighbours (orange between red and yellow), as "dog" has "cat"
# and "horse" in CLIP's text space; the first four hues are the 20-category world's.
WIDE_COLOURS = {**COLOURS, "orange": 0.08, "teal": 0.5, "purple": 0.76, "pink": 0.9}
WIDE_SHAPES = {**SHAPES, "star": "star"}
SHAPES_WIDE = tuple(f"{colour} {shape}" for colour in WIDE_COLOURS for shape in WIDE_SHAPES)
# Each world's categories, in label order (label k = categories[k - 1]).
WORLDS = {"shapes": SHAPES_WORLD, "shapes_wide": SHAPES_WIDE}
ShapesWorld = Literal["shapes", "shapes_wide"]


def diagonal(k: int) -> tuple[str, ...]:
    """The 5 categories whose colour index is (shape index + k) mod 4: the 4 diagonals
    partition the world, and each one holds every colour and every shape word."""
    colours = list(COLOURS)
    return tuple(f"{colours[(s + k) % len(colours)]} {shape}" for s, shape in enumerate(SHAPES))


# Split 1: one unseen combination per shape, on a cycle of colours (diagonal 0), so every unseen
# word is seen elsewhere. The seen-count ablation (paper Tab. 4 in miniature): 5, 10 and 15 seen
# categories, nested (one diagonal, two, three), never diagonal 0.
SHAPES_WORLD_UNSEEN = {
    1: diagonal(0),
    **{
        f"seen{5 * n}": tuple(
            c for c in SHAPES_WORLD if c not in sum((diagonal(k) for k in range(1, n + 1)), ())
        )
        for n in (1, 2, 3)
    },
}


def held_out_word(word: str, categories: tuple[str, ...] = SHAPES_WORLD) -> tuple[str, ...]:
    """Every category naming ``word``: with these unseen, the head never meets the word at all,
    as the paper's head never meets "dog" (split 1 only recombines words it has seen)."""
    return tuple(c for c in categories if word in c.split(" "))


# Held-out-word splits: a whole colour word, a whole shape word.
SHAPES_WORLD_UNSEEN.update({f"word_{w}": held_out_word(w) for w in ("green", "cross")})
SHAPES_WIDE_UNSEEN = {f"word_{w}": held_out_word(w, SHAPES_WIDE) for w in ("green", "cross")}


def world_categories(world: str) -> tuple[str, ...]:
    if world not in WORLDS:
        raise ValueError(f"No shapes world named '{world}'; the worlds are {', '.join(WORLDS)}")
    return WORLDS[world]


TWO_OBJECT_CAPTION = "a photograph of a {c1} and a {c2}"
ONE_OBJECT_CAPTION = "a photograph of a {c1}"


def shape_mask(name: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean mask of one shape centred at (cx, cy) with radius r (pixels)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    rho, theta = np.hypot(dx, dy), np.arctan2(v, u)
    if name == "disc":
        return rho <= r
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.75 * r
    if name == "triangle":
        return (v <= 0.5 * r) & (np.sqrt(3) * u - v <= r) & (-np.sqrt(3) * u - v <= r)
    if name == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if name == "cross":
        return ((abs(u) <= 0.28 * r) & (abs(v) <= r)) | ((abs(v) <= 0.28 * r) & (abs(u) <= r))
    if name == "star":
        return rho <= r * (0.55 + 0.45 * np.cos(5 * theta)) ** 1.2
    if name == "diamond":
        return abs(u) / 0.7 + abs(v) <= r
    if name == "bar":
        return (abs(u) <= r) & (abs(v) <= 0.3 * r)
    raise ValueError(f"No form named '{name}'")


def caption(names: list[str]) -> str:
    """The paper's prompt template over the named objects (one or two)."""
    template = ONE_OBJECT_CAPTION if len(names) == 1 else TWO_OBJECT_CAPTION
    return template.format(**{f"c{i + 1}": name for i, name in enumerate(names)})


def render_shapes_scene(
    index: int,
    size: int = 64,
    seed: int = 0,
    categories: tuple[str, ...] | None = None,
    world: ShapesWorld = "shapes",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image [H, W, 3] uint8, label map [H, W] (0 = background, k+1 = the world's category k) and
    the names of the objects in caption order, for scene ``index`` drawing from ``categories``
    (default: all of the world's)."""
    vocabulary = world_categories(world)
    categories = vocabulary if categories is None else categories
    rng = np.random.default_rng([seed, index])
    num_objects = int(rng.integers(1, 3))
    names = [str(n) for n in rng.choice(categories, size=num_objects, replace=False)]
    coarse = np.stack(
        [np.full((4, 4), rng.uniform(0, 1)), rng.uniform(0, 0.25, (4, 4)), rng.uniform(0.2, 0.5, (4, 4))], -1
    )  # HSV: one hue, low saturation, dim
    rgb = np.array([colorsys.hsv_to_rgb(*p) for p in coarse.reshape(-1, 3)]).reshape(4, 4, 3)
    background = Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    image = np.asarray(background, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
    labels = np.zeros((size, size), dtype=np.uint8)
    axis, first_half = int(rng.integers(0, 2)), int(rng.integers(0, 2))
    for k, name in enumerate(names):
        colour, shape = name.split(" ")
        r = size * (rng.uniform(0.17, 0.24) if num_objects == 1 else rng.uniform(0.15, 0.21))
        centre = rng.uniform(r, size - r, size=2)  # (x, y)
        if num_objects == 2:  # object k in one half along `axis`, clear of the middle line
            half = first_half if k == 0 else 1 - first_half
            inner = 0.7 * r
            centre[axis] = (
                rng.uniform(r, size / 2 - inner) if half == 0 else rng.uniform(size / 2 + inner, size - r)
            )
        mask = shape_mask(WIDE_SHAPES[shape], size, centre[0], centre[1], r, rng.uniform(0, 2 * np.pi))
        hue = (WIDE_COLOURS[colour] + rng.uniform(-0.025, 0.025)) % 1.0
        rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))) * 255
        shading = 1 + 0.2 * (np.mgrid[0:size, 0:size][0] - centre[1]) / size  # light from above
        image[mask] = rgb[None] * shading[mask][:, None]
        labels[mask] = vocabulary.index(name) + 1
    image = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    return image, labels, [n for n in names if (labels == vocabulary.index(n) + 1).any()]
