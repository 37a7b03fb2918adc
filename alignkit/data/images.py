"""The images of a vision-language row: TRL's `images` (a list) or `image` (one) column, decoded to RGB PIL images.

An image may be given as a path (relative paths are relative to the dataset file; :func:`load_rows` makes them
absolute), a PIL image, raw bytes, a ``datasets`` Image value (``{"bytes": ..., "path": ...}``) or a ``[H, W, C]``
uint8 array. A row whose messages have a different number of image parts than it has images, a missing file or
bytes that do not decode raise :class:`RowError` naming the row, the field (``images[1]``) and what was expected.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data.rows import IMAGE_COLUMNS, RowError, Sample, Verbatim, is_array

__all__ = ["absolute_image_paths", "decode_image", "image_digest", "sample_images"]


def decode_image(value: Any, index: int | None, field: str) -> Any:  # noqa: ANN401 - a PIL.Image.Image
    """One image as an RGB ``PIL.Image`` (palette and alpha images converted), or RowError naming ``field``."""
    from PIL import Image, UnidentifiedImageError

    want = "an image: a file path, PIL image, bytes, {'bytes'/'path'} dict or [H, W, C] uint8 array"
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, Mapping):
            if value.get("bytes"):
                img = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                return decode_image(str(value["path"]), index, field)
            else:
                raise RowError(index, field, want, Verbatim("a dict with neither 'bytes' nor 'path'"))
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, Path)):
            p = Path(value).expanduser()
            if not p.is_file():
                raise RowError(index, field, "an existing image file", Verbatim(f"no file {str(p)!r}"))
            img = Image.open(p)
        elif is_array(value):
            img = Image.fromarray(value)
        else:
            raise RowError(index, field, want, type(value))
        img.load()
    except RowError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
        raise RowError(index, field, "an image that decodes", Verbatim(f"{type(e).__name__}: {e}")) from e
    return img if img.mode == "RGB" else img.convert("RGB")


def sample_images(sample: Sample, index: int | None) -> list[Any]:
    """A normalised row's images decoded (``normalize_row`` has checked there is one per image part)."""
    col = sample.image_field or "images"
    fields = [f"{col}[{k}]" if col == "images" else col for k in range(len(sample.images or []))]
    return [decode_image(v, index, f) for v, f in zip(sample.images or [], fields)]


@dataclass(frozen=True)
class _AbsolutePaths:
    """A row's relative image paths joined to ``base`` (a picklable map function: datasets can cache it)."""

    base: str
    columns: tuple[str, ...]

    def fix(self, v: Any) -> Any:  # noqa: ANN401
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
            return str(Path(self.base) / v)
        return [self.fix(x) for x in v] if isinstance(v, list) else v

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {c: self.fix(row[c]) for c in self.columns}


def absolute_image_paths(ds: Any, folder: Path) -> Any:  # noqa: ANN401 - a datasets.Dataset
    """``ds`` with relative image paths in its ``images`` / ``image`` column made relative to ``folder`` (the
    dataset file's folder, TRL's convention), so rows can be read from anywhere."""
    cols = tuple(c for c in IMAGE_COLUMNS if c in ds.column_names)
    first = [ds[0][c] for c in cols] if len(ds) else []
    if not any(isinstance(v, str) or (isinstance(v, list) and any(isinstance(x, str) for x in v)) for v in first):
        return ds  # no image column, or decoded images (a datasets Image feature) / bytes: nothing to resolve
    return ds.map(_AbsolutePaths(str(folder.resolve()), cols), desc="image paths")


def image_digest(images: list[Any]) -> str:
    """A digest of a row's images as given (a file by path, size and modification time; bytes, arrays and PIL
    images by content), so a cached reference is not reused for the same text with other images."""
    import hashlib

    from PIL import Image

    h = hashlib.blake2b(digest_size=16)
    for v in images:
        if isinstance(v, Mapping):
            v = v.get("bytes") or v.get("path")
        if isinstance(v, (str, Path)):
            p = Path(v).expanduser()
            st = p.stat() if p.is_file() else None
            h.update(f"path:{p.resolve()}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
        elif isinstance(v, (bytes, bytearray)):
            h.update(b"bytes:" + bytes(v))
        elif isinstance(v, Image.Image):
            h.update(f"pil:{v.mode}:{v.size}".encode() + v.tobytes())
        elif is_array(v):
            h.update(f"array:{v.shape}:{v.dtype}".encode() + bytes(memoryview(v.__array__()).cast("B")))
        else:
            h.update(repr(type(v)).encode())
        h.update(b"|")
    return h.hexdigest()
