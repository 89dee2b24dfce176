"""A small stand-in for DRAKE-mini's public split (no tests here; imported by the model tests).

Coloured shapes drawn with PIL (questions about colour / shape / presence, one or two images)
plus a few text-only Q/A pairs: the same kind of content as DRAKE-mini, built in milliseconds.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from drake_data.prompts import RenderedSample

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220),
           "yellow": (230, 210, 30), "black": (10, 10, 10), "gray": (128, 128, 128)}
SHAPES = ("circle", "rectangle", "triangle")
TEXT_QA = [("What is your name?", "I am a bot."), ("How are you?", "I am fine."),
           ("What is two plus two?", "four"), ("Is the sky blue?", "yes")]


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.randint(1, size // 3), rng.randint(1, size // 3)
    x1, y1 = x0 + rng.randint(size // 2, size - 2 - x0), y0 + rng.randint(size // 2, size - 2 - y0)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    return image


def standin_public_samples(n: int = 64, seed: int = 0) -> list[RenderedSample]:
    """``n`` deterministic samples: colour / shape / yes-no about images, some two-image, some text."""
    rng = random.Random(seed)
    samples: list[RenderedSample] = []
    for index in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        kind = index % 5
        if kind == 4:
            question, answer = TEXT_QA[index % len(TEXT_QA)]
            samples.append(RenderedSample(f"s{index}", question, answer, [], None, "open-ended"))
            continue
        image = draw_shape(colour, shape, rng)
        if kind == 0:
            prompt, answer = "<image>\nWhat color is the shape?", colour
        elif kind == 1:
            prompt, answer = "<image>\nWhat shape is in the image?", shape
        elif kind == 2:
            asked = rng.choice(list(COLOURS))
            prompt, answer = f"<image>\nIs there a {asked} shape?", "yes" if asked == colour else "no"
        else:
            other = draw_shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng)
            samples.append(RenderedSample(
                f"s{index}", "<image><image>\nWhat color is the shape in the first image?\n"
                "Choice list:[red, green, blue, yellow, black, gray]", colour, [image, other],
                list(COLOURS), "multi-choice"))
            continue
        samples.append(RenderedSample(f"s{index}", prompt, answer, [image], None, "open-ended"))
    return samples
