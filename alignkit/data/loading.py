"""Datasets from the hub, a local json/jsonl/parquet file or folder, or an in-memory object."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_rows(source: Any, split: str = "train", *, limit: int | None = None):  # noqa: ANN201
    """A `datasets.Dataset` from `source`: a Dataset / DatasetDict, a list of dicts, a local .json/.jsonl/
    .parquet file or a folder (saved with `save_to_disk` or of such files), or a hub id."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        source = source[split]
    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, list):
        ds = datasets.Dataset.from_list(source)
    elif isinstance(source, (str, Path)):
        p = Path(source).expanduser()
        suffix = p.suffix.lower()
        if p.is_file():
            kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
            if kind is None:
                raise ValueError(f"{p}: unsupported file type {suffix!r}; use .json, .jsonl, .parquet or .csv")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        elif p.is_dir() and (p / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif p.is_dir():
            ds = datasets.load_dataset(str(p), split=split)
        else:
            try:
                ds = datasets.load_dataset(str(source), split=split)
            except Exception as e:  # noqa: BLE001 - add what to do about it
                raise RuntimeError(
                    f"could not load dataset {source!r} (split {split!r}) as a local path or from the hub: {e}. "
                    "Offline? Pass a local .jsonl/.parquet file or a datasets.Dataset instead."
                ) from e
    else:
        raise TypeError(f"cannot load a dataset from {type(source).__name__}")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds
