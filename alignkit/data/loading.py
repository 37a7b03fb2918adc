"""Datasets from the hub, a local json/jsonl/parquet/csv file or folder, or an in-memory object.

A local file that `datasets` cannot read is diagnosed here, so the error names the file and the line (empty file,
bytes that are not UTF-8, a line that is not a JSON object) instead of the reader's internals. Errors found later
in rows that came from a file name only the row (the functions that check rows see rows, not files): within
:func:`track_sources`, :meth:`SourceLog.locate` adds the file and, for JSON lines, the line. The CLI does this for
every command, so each input error it prints reads ``train.jsonl, line 3 (row 2), field 'chosen': expected ...``.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.data.images import absolute_image_paths
from alignkit.data.rows import RowError, Verbatim
from alignkit.errors import AlignkitError

__all__ = [
    "DatasetLoadError", "Mixture", "MIXTURE_KEYS", "RowSource", "SourceLog", "check_data_file", "load_rows",
    "track_sources",
]  # fmt: skip

FILE_KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


class DatasetLoadError(AlignkitError):
    """A dataset that could not be loaded at all (not a local path, and the hub did not have it)."""


# ----------------------------------------------------------------------------------------------------------
# Where rows came from
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RowSource:
    """Rows `load_rows` returned: ``name`` for messages (the path as given, a hub id; None for objects) and, for a
    JSON-lines file, the file to count lines in (only when an error needs a line number: no cost otherwise)."""

    name: str | None
    rows: int
    path: Path | None = None  # a JSON-lines file: row k is its k-th non-blank line
    _blank: list[int] | None = field(default=None, init=False, repr=False)  # blank lines, counted on first use

    def line(self, index: int) -> int | None:
        """1-based line of row ``index`` in a JSON-lines file (blank lines hold no row), else None."""
        if self.path is None or not 0 <= index < self.rows:
            return None
        if self._blank is None:
            with self.path.open("rb") as f:
                self._blank = [n for n, raw in enumerate(f, 1) if not raw.strip()]
        line = index + 1
        for b in self._blank:  # ascending: each blank line at or before the row pushes it one line down
            if b > line:
                break
            line += 1
        return line

    def locate(self, error: RowError) -> RowError:
        """``error`` naming this source's file (and line), when it is about one of these rows."""
        if self.name is None or error.file is not None:
            return error
        if error.index is not None and not 0 <= error.index < self.rows:
            return error
        return error.located(self.name, None if error.index is None else self.line(error.index))


@dataclass
class MixedSource:
    """The rows of a :class:`Mixture`: its parts in order, so a row error names the part's file and line."""

    parts: list[RowSource]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def locate(self, error: RowError) -> RowError:
        if error.file is not None or error.index is None:
            return error
        start = 0
        for part in self.parts:
            if error.index < start + part.rows:
                return error if part.name is None else error.located(part.name, part.line(error.index - start))
            start += part.rows
        return error


# the keys of a mixture entry (TRL's DatasetConfig, plus `rows`)
MIXTURE_KEYS = {"path", "name", "split", "data_dir", "data_files", "columns", "rows"}


@dataclass
class Mixture:
    """Several datasets read as one, in order (TRL's ``datasets:``): each entry ``{path, split, name, data_dir,
    data_files, columns, rows}``; ``path`` as for :func:`load_rows`, ``name`` / ``data_dir`` / ``data_files`` for
    a hub or builder dataset, ``columns`` keeps those columns, ``rows`` the first that many."""

    entries: list[dict[str, Any]]
    split: str = "train"  # the default split of an entry


class SourceLog:
    """The sources `load_rows` read within one :func:`track_sources` block, in order."""

    def __init__(self) -> None:
        self.sources: list[RowSource] = []

    def locate(self, error: RowError) -> RowError:
        """``error`` with the file and line of its row, taken from the source loaded last.

        Every loop loads a dataset and checks its rows before it loads the next (train, then eval), so a row
        error raised while loading is about the rows loaded last. An error that already names a file, or whose
        row that source does not have, is returned as it is.
        """
        return self.sources[-1].locate(error) if self.sources else error


_LOG: contextvars.ContextVar[SourceLog | None] = contextvars.ContextVar("alignkit_row_sources", default=None)


@contextlib.contextmanager
def track_sources() -> Iterator[SourceLog]:
    """Record the sources `load_rows` reads in this block, so row errors can be located (``log.locate(err)``)."""
    log = SourceLog()
    token = _LOG.set(log)
    try:
        yield log
    finally:
        _LOG.reset(token)


# ----------------------------------------------------------------------------------------------------------
# Diagnosing text files
# ----------------------------------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(v), "null")


def _decode(raw: bytes, name: str, n: int, row: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        col = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
        got = Verbatim(f"byte 0x{raw[e.start]:02x} at column {col}")
        raise RowError(row, None, "UTF-8 text (re-save the file as UTF-8)", got, name, n) from None


def _json_document(text: str, name: str) -> None:
    """A .json file holding one JSON array (or object) of rows."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        got = Verbatim(f"invalid JSON ({e.msg}, column {e.colno})")
        raise RowError(None, None, "a JSON array of row objects", got, name, e.lineno) from None
    if isinstance(value, list):
        for k, v in enumerate(value):
            if not isinstance(v, dict):
                raise RowError(k, None, "a JSON object ({...}) per row", Verbatim(f"a JSON {_type_name(v)}"), name)


def _utf8_text(p: Path, chunk: int = 1 << 20) -> bool:
    """Whether the file is UTF-8 with something besides whitespace: one C-speed pass, no lines split."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    content = False
    try:
        with p.open("rb") as f:
            while block := f.read(chunk):
                decoder.decode(block)
                content = content or bool(block.strip())
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return content


def _json_lines(p: Path) -> bool:
    """A .jsonl file, or a .json file of JSON lines (not one array): its rows sit one per line."""
    suffix = p.suffix.lower()
    if suffix != ".json":
        return suffix == ".jsonl"
    with p.open("rb") as f:
        return not f.read(4096).lstrip().startswith(b"[")


def check_data_file(path: str | Path, name: str | None = None) -> None:
    """Raise a `RowError` naming the file and line of the first problem of a local .json/.jsonl/.csv file:
    empty, not UTF-8, or (JSON) a line that is not one JSON object; return when none is found.

    `load_rows` calls it only when a file is not UTF-8 text or `datasets` fails to read it, so reading a good
    file costs one decoding pass and no JSON parsing."""
    p = Path(path)
    name = str(path) if name is None else name
    csv = p.suffix.lower() == ".csv"
    per_line = not csv and _json_lines(p)
    document = not csv and not per_line
    row, lines = 0, []
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            text = _decode(raw, name, n, row if per_line else None)
            if document:  # blank lines too: the parser's line numbers are the file's
                lines.append(text)
                continue
            if not text.strip():
                continue
            if per_line:
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as e:
                    got = Verbatim(f"invalid JSON ({e.msg}, column {e.colno})")
                    raise RowError(row, None, "one JSON object per line", got, name, n) from None
                if not isinstance(value, dict):
                    got = Verbatim(f"a JSON {_type_name(value)}")
                    raise RowError(row, None, "one JSON object ({...}) per line", got, name, n)
            row += 1
    if row == 0 and not "".join(lines).strip():
        raise RowError(None, None, "at least one row", Verbatim("an empty file"), name)
    if document:
        _json_document("".join(lines), name)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def _read_failed(e: Exception, name: str) -> RowError:
    """`datasets`' failure on a file no check found fault with, as one line naming the file and the cause."""
    causes, c = [], e
    while c is not None and len(causes) < 3:
        causes.append(f"{type(c).__name__}: {c}".strip().rstrip(":"))
        c = c.__cause__ or c.__context__
    return RowError(None, None, "a file `datasets` can read", Verbatim(" <- ".join(causes)), name)


@contextlib.contextmanager
def _quiet_reader_logs() -> Iterator[None]:
    """`datasets`' json / csv readers log each failure before raising; the error raised here says it once."""
    loggers = [logging.getLogger(f"datasets.packaged_modules.{k}.{k}") for k in ("json", "csv")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_file(p: Path, name: str) -> Any:  # noqa: ANN401 - a datasets.Dataset
    import datasets

    suffix = p.suffix.lower()
    kind = FILE_KINDS.get(suffix)
    if kind is None:
        raise ValueError(f"{name}: unsupported file type {suffix!r}; use .json, .jsonl, .parquet or .csv")
    if suffix in TEXT_SUFFIXES and not _utf8_text(p):
        check_data_file(p, name)  # pyarrow keeps invalid UTF-8 in strings, to fail when a row is read: find it now
    try:
        with _quiet_reader_logs():
            return datasets.load_dataset(kind, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - find the line at fault, else name the file and the reader's cause
        if suffix in TEXT_SUFFIXES:
            check_data_file(p, name)
        if _json_lines(p) and _has_blank_lines(p):
            # every line is a JSON object: datasets (5.x) trips on blank lines only when rows mix a field's
            # types (its mixed-type retry parses every line), so read a copy without them
            return _load_without_blank_lines(p)
        raise _read_failed(e, name) from e


def _has_blank_lines(p: Path) -> bool:
    with p.open("rb") as f:
        return any(not raw.strip() for raw in f)


def _load_without_blank_lines(p: Path) -> Any:  # noqa: ANN401 - a datasets.Dataset
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        q = Path(tmp) / p.name
        with p.open("rb") as f, q.open("wb") as out:
            for raw in f:
                if raw.strip():
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        # in memory: the copy and its cache go with the temporary folder
        with _quiet_reader_logs():
            return datasets.load_dataset(
                "json", data_files=str(q), split="train", cache_dir=str(Path(tmp) / "cache"), keep_in_memory=True
            )


def _load_folder(p: Path, name: str, split: str) -> Any:  # noqa: ANN401 - a datasets.Dataset
    import datasets

    files = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
    for f in files:  # pyarrow keeps invalid UTF-8 to fail later, as for one file
        if not _utf8_text(f):
            check_data_file(f, str(Path(name) / f.relative_to(p)))
    try:
        with _quiet_reader_logs():
            return datasets.load_dataset(str(p), split=split)
    except Exception:  # noqa: BLE001 - the folder's files, one by one, for the one at fault
        for f in files:
            check_data_file(f, str(Path(name) / f.relative_to(p)))
        raise


def load_rows(source: Any, split: str = "train", *, limit: int | None = None):  # noqa: ANN201
    """A `datasets.Dataset` from `source`: a Dataset / DatasetDict, a list of dicts, a local .json/.jsonl/
    .parquet/.csv file or a folder (saved with `save_to_disk` or of such files), or a hub id.

    A local file that cannot be read raises `RowError` naming the file and line; a dataset with no rows raises
    `RowError` too. Within :func:`track_sources` the source is recorded, so later row errors can name it."""
    import datasets

    name: str | None = None
    json_lines: Path | None = None
    if isinstance(source, Mixture):
        return _load_mixture(source, limit)
    if isinstance(source, datasets.DatasetDict):
        source = source[split]
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, list):
        ds = datasets.Dataset.from_list(source)
    elif isinstance(source, (str, Path)):
        if not str(source).strip():  # Path("") is the working directory: never load that by accident
            raise ValueError("no dataset given: set `dataset` to a .jsonl/.json/.parquet/.csv file, folder or hub id")
        p = Path(source).expanduser()
        name = str(source)
        suffix = p.suffix.lower()
        if p.is_file():
            ds = absolute_image_paths(_load_file(p, name), p.parent)
            json_lines = p if _json_lines(p) else None
        elif p.is_dir() and (p / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif p.is_dir():
            ds = absolute_image_paths(_load_folder(p, name, split), p)
        elif suffix in FILE_KINDS:  # a data file name, not a hub id: say so rather than ask the hub
            raise FileNotFoundError(f"{name}: no such file")
        else:
            try:
                ds = datasets.load_dataset(str(source), split=split)
            except Exception as e:  # noqa: BLE001 - add what to do about it
                raise DatasetLoadError(
                    f"could not load dataset {source!r} (split {split!r}) as a local path or from the hub: {e}. "
                    "Offline? Pass a local .jsonl/.parquet file or a datasets.Dataset instead."
                ) from e
    else:
        raise TypeError(f"cannot load a dataset from {type(source).__name__}")
    if len(ds) == 0:
        raise RowError(None, None, "at least one row", Verbatim("none"), name or "dataset")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    log = _LOG.get()
    if log is not None:
        log.sources.append(RowSource(name, len(ds), json_lines))
    return ds


def _load_mixture(mix: Mixture, limit: int | None):  # noqa: ANN202
    import datasets

    parts, sources = [], []
    log = _LOG.get()
    for k, entry in enumerate(mix.entries):
        split = entry.get("split", mix.split)
        builder = {key: entry[key] for key in ("name", "data_dir", "data_files") if entry.get(key) is not None}
        if builder:  # a hub / builder dataset with a config name or files
            try:
                ds = datasets.load_dataset(str(entry["path"]), split=split, **builder)
            except Exception as e:  # noqa: BLE001 - name the entry
                raise DatasetLoadError(f"dataset mixture entry {k} ({entry['path']!r}): could not load it: {e}") from e
            source = RowSource(str(entry["path"]), len(ds))
        else:
            inner = SourceLog()
            token = _LOG.set(inner)
            try:
                ds = load_rows(entry["path"], split)
            finally:
                _LOG.reset(token)
            source = inner.sources[-1]
        if entry.get("columns"):
            missing = [c for c in entry["columns"] if c not in ds.column_names]
            if missing:
                raise RowError(None, "columns", f"columns of {entry['path']!r}", Verbatim(", ".join(ds.column_names)),
                               f"dataset mixture entry {k}")  # fmt: skip
            ds = ds.select_columns(list(entry["columns"]))
        if entry.get("rows") is not None:
            ds = ds.select(range(min(int(entry["rows"]), len(ds))))
            source = RowSource(source.name, len(ds), source.path)
        parts.append(ds)
        sources.append(source)
    columns = [sorted(ds.column_names) for ds in parts]
    if any(c != columns[0] for c in columns):
        listing = "; ".join(f"entry {k} ({e['path']}): {', '.join(c)}" for k, (e, c) in
                            enumerate(zip(mix.entries, columns)))  # fmt: skip
        raise DatasetLoadError(f"the datasets of a mixture must have the same columns (pick them with `columns`): "
                               f"{listing}")  # fmt: skip
    # a column whose inferred type differs between parts (nested differently, or irregular in one) is read as JSON
    # values in all of them, as `datasets` does for an irregular column within one file
    features = datasets.Features({
        c: parts[0].features[c] if all(p.features[c] == parts[0].features[c] for p in parts) else datasets.Json()
        for c in parts[0].column_names
    })  # fmt: skip
    ds = datasets.concatenate_datasets([p if p.features == features else p.cast(features) for p in parts])
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if log is not None:
        log.sources.append(MixedSource(sources))
    return ds
