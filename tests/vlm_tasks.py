"""An image-dependent task built from `shared/data/vlm_flags`: name the colour covering most of a flag.

The answer is computed from the pixels (nearest of five flag colours, majority over a 32x32 thumbnail; flags with
no clear majority dropped), so it is exactly checkable and only the image carries it: a model trained on the same
rows without their images can learn no more than the answers' prior. Test fixtures, not product code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("ALIGNKIT_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
FLAGS = DATA / "vlm_flags" / "vlm_flags.jsonl"
HAVE_FLAGS = FLAGS.is_file()
SKIP_REASON = f"vlm_flags not found at {FLAGS} (set ALIGNKIT_SHARED to the shared/ folder)"
PALETTE = {"red": (200, 16, 46), "white": (255, 255, 255), "blue": (0, 56, 168), "green": (0, 122, 61),
           "yellow": (252, 209, 22), "black": (0, 0, 0)}  # fmt: skip
COLOURS = ["red", "white", "blue", "green", "yellow"]
QUESTION = "Main colour?"


def flag_colours(min_margin: float = 0.05) -> list[tuple[str, str]]:
    """(absolute image path, colour) for every flag whose majority colour leads the next by ``min_margin``."""
    from PIL import Image

    pal = np.array(list(PALETTE.values()), float)
    out = []
    for line in FLAGS.read_text().splitlines():
        path = str(FLAGS.parent / json.loads(line)["images"][0])
        with Image.open(path) as im:
            px = np.asarray(im.convert("RGBA").convert("RGB").resize((32, 32)), float).reshape(-1, 3)
        share = np.bincount(((px[:, None] - pal[None]) ** 2).sum(-1).argmin(1), minlength=len(pal)) / len(px)
        top = np.sort(share)
        colour = list(PALETTE)[int(share.argmax())]
        if top[-1] - top[-2] >= min_margin and colour in COLOURS:
            out.append((path, colour))
    return out


def split(rows: list, held_out: float = 0.25, seed: int = 0) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(rows))
    n = int(round(len(rows) * (1 - held_out)))
    return [rows[i] for i in order[:n]], [rows[i] for i in order[n:]]


def conversation(path: str, answer: str | None, with_image: bool = True) -> dict:
    """An SFT row (answer given) or a prompt-only row (answer None); without the image for the text control."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": QUESTION}]
    row: dict = {"messages": [{"role": "user", "content": content}]}
    if answer is not None:
        row["messages"].append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    if with_image:
        row["images"] = [path]
    return row
