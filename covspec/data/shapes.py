"""The synthetic "shapes" benchmark: seeded images of colored shapes on a 3x3 grid.

Every sample is a pure function of ``(split, index, seed)``: the same arguments always give the
same image bytes, question and answer. Splits are disjoint by construction: a scene's canonical
key is hashed into one of ten buckets (0-7 train, 8 val, 9 test) and a split only keeps scenes
whose bucket is its own, so no scene appears in two splits.

Question kinds and answer templates:

- ``color``:    "What color is the circle?"       -> "The circle is red."
- ``shape``:    "What shape is the red object?"   -> "The red object is a circle."
- ``count``:    "How many shapes are there?"      -> "There are three shapes."
- ``position``: "Where is the red circle?"        -> "The red circle is in the top left."
- ``describe``: "Describe the image."             -> "There are two shapes in the image: a red
  circle in the top left and a blue square in the center." (always >= 12 tokens)
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from covspec.data.metrics import exact_match

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip
KINDS: tuple[str, ...] = ("color", "shape", "count", "position", "describe")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
SPLITS: tuple[str, ...] = ("train", "val", "test")

IMAGE_SIZE = 96  # 96 px with 8 px patches: 12 x 12 = 144 visual tokens
GRID = 3
CELL = IMAGE_SIZE // GRID
MAX_SHAPES = 4
SHAPE_SIZE = 16  # one 2 x 2 block of 8 px patches, aligned to the patch grid
_SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}


@dataclass(frozen=True)
class Shape:
    """One object of a scene: its color, kind and grid cell (0..8, row-major)."""

    color: str
    kind: str
    cell: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    """A set of shapes in distinct cells with distinct (color, kind) pairs, plus render jitter."""

    shapes: tuple[Shape, ...]
    jitter: tuple[tuple[int, int, int], ...] = field(default=())  # (dx, dy, size) per shape

    @property
    def key(self) -> str:
        """Canonical key: the content of the scene, independent of jitter and order."""
        return ";".join(f"{s.cell}:{s.color}:{s.kind}" for s in sorted(self.shapes, key=lambda s: s.cell))

    def render(self) -> Image.Image:
        """Draw the scene on a black ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB canvas."""
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
        draw = ImageDraw.Draw(image)
        for shape, (dx, dy, size) in zip(self.shapes, self.jitter, strict=True):
            row, col = divmod(shape.cell, GRID)
            cx = col * CELL + CELL // 2 + dx
            cy = row * CELL + CELL // 2 + dy
            half = size // 2
            box = (cx - half, cy - half, cx + half - 1, cy + half - 1)  # exactly size x size pixels
            fill = COLORS[shape.color]
            if shape.kind == "circle":
                draw.ellipse(box, fill=fill)
            elif shape.kind == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half - 1), (cx + half - 1, cy + half - 1)], fill=fill)
        return image


@dataclass(frozen=True)
class Sample:
    """One benchmark item."""

    sample_id: str
    split: str
    kind: str
    question: str
    answer: str
    scene: Scene

    def image(self) -> Image.Image:
        return self.scene.render()

    def score(self, prediction: str) -> float:
        """The benchmark's metric: exact match of the normalized words, 1.0 or 0.0."""
        return exact_match(prediction, self.answer)


def scene_bucket(scene: Scene) -> int:
    """Bucket 0..9 of a scene, from a stable hash of its canonical key."""
    return int(hashlib.sha256(scene.key.encode()).hexdigest(), 16) % 10


def _sorted_shapes(scene: Scene) -> list[Shape]:
    return sorted(scene.shapes, key=lambda s: s.cell)


def _count_phrase(n: int) -> str:
    return "There is one shape" if n == 1 else f"There are {NUMBER_WORDS[n]} shapes"


def _describe(scene: Scene) -> str:
    parts = [f"a {s.color} {s.kind} in the {s.position}" for s in _sorted_shapes(scene)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{_count_phrase(len(parts))} in the image: {listed}."


def questions(scene: Scene, kind: str) -> list[tuple[str, str]]:
    """Every unambiguous (question, answer) of ``kind`` about ``scene``, in the scene's shape order (may be empty)."""
    shapes = list(scene.shapes)
    if kind == "color":
        unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
        return [(f"What color is the {s.kind}?", f"The {s.kind} is {s.color}.") for s in unique]
    if kind == "shape":
        unique = [s for s in shapes if sum(t.color == s.color for t in shapes) == 1]
        return [(f"What shape is the {s.color} object?", f"The {s.color} object is a {s.kind}.") for s in unique]
    if kind == "count":
        return [("How many shapes are there?", f"{_count_phrase(len(shapes))}.")]
    if kind == "position":
        return [(f"Where is the {s.color} {s.kind}?", f"The {s.color} {s.kind} is in the {s.position}.")
                for s in shapes]  # fmt: skip
    if kind == "describe":
        return [("Describe the image.", _describe(scene))]
    raise ValueError(f"unknown question kind {kind!r}; expected one of {', '.join(KINDS)}")


def make_question(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str] | None:
    """Question and answer of ``kind`` about ``scene``, or None if the kind has no unambiguous item."""
    options = questions(scene, kind)
    if kind in ("count", "describe"):
        return options[0]  # one question per scene; drawing it would shift ``rng`` and with it every split
    return rng.choice(options) if options else None


def random_scene(rng: random.Random) -> Scene:
    """A random scene of 1..4 shapes in distinct cells with distinct (color, kind) pairs."""
    n = rng.randint(1, MAX_SHAPES)
    cells = rng.sample(range(GRID * GRID), n)
    pairs = rng.sample([(c, k) for c in COLORS for k in SHAPES], n)
    shapes = tuple(Shape(color=c, kind=k, cell=cell) for (c, k), cell in zip(pairs, cells, strict=True))
    # Shapes sit centred in their cell, filling one 2 x 2 block of 8 px patches: every patch then holds a
    # shape-specific quadrant (full for a square, an arc for a circle, a slope for a triangle). Larger, jittered
    # shapes spread over 4 x 4 patches whose centres look alike for every kind, and the toy vision tower stayed
    # near chance on shape kinds after 1,000 steps.
    jitter = tuple((0, 0, SHAPE_SIZE) for _ in shapes)
    return Scene(shapes=shapes, jitter=jitter)


def make_sample(split: str, index: int, seed: int = 0, kind: str | None = None) -> Sample:
    """The ``index``-th sample of ``split``: deterministic in ``(split, index, seed, kind)``.

    Kinds cycle through ``KINDS`` by index unless ``kind`` is given, so every split is balanced.
    """
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"data.split must be one of {', '.join(SPLITS)}, got {split!r}")
    kind = kind or KINDS[index % len(KINDS)]
    rng = random.Random(f"shapes/{seed}/{split}/{index}/{kind}")
    while True:
        scene = random_scene(rng)
        if scene_bucket(scene) not in _SPLIT_BUCKETS[split]:
            continue
        qa = make_question(scene, kind, rng)
        if qa is not None:
            question, answer = qa
            return Sample(f"{split}-{index:06d}", split, kind, question, answer, scene)


def load_split(split: str, limit: int, seed: int = 0, offset: int = 0, kinds: Sequence[str] = ()) -> list[Sample]:
    """``limit`` consecutive samples of ``split`` starting at index ``offset``; with ``kinds``, only the samples of
    those question kinds, in index order: the same samples, with the same ids, as the unfiltered split holds."""
    if not kinds:
        return [make_sample(split, i, seed) for i in range(offset, offset + limit)]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown question kind {unknown[0]!r}; expected one of {', '.join(KINDS)}")
    indices = (i for i in itertools.count(offset) if KINDS[i % len(KINDS)] in kinds)
    return [make_sample(split, i, seed) for i in itertools.islice(indices, limit)]


def vocabulary() -> list[str]:
    """Every word the benchmark's questions and answers (and the prompt template) can use."""
    words = {"USER", "ASSISTANT", "What", "color", "is", "the", "shape", "object", "How", "many",
             "shapes", "are", "there", "Where", "Describe", "image", "The", "a", "There", "in",
             "and", "one"}  # fmt: skip
    words.update(COLORS)
    words.update(SHAPES)
    words.update(NUMBER_WORDS)
    for pos in POSITIONS:
        words.update(pos.split())
    return sorted(words)
